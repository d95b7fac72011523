"""Weight formats: how a parameter's fp32 master value is kept between steps.

Each format is an encode/decode pair. ``decode`` returns an fp32 working tensor that the update rule
may change in place; ``encode`` writes an fp32 value back into the model's own parameter tensor (and
the format's extra buffers, kept in the optimizer state under the names in ``buffers``).

Formats know nothing about optimizers, hooks or checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# int32 constants for the exact split (all fit a signed 32-bit integer).
_HALF = 0x8000
_HIGH_MASK = -0x10000  # ~0xFFFF as a signed int32
_CANONICAL_NAN = 0x7FC00000

RandomBits = Callable[[Tensor], Tensor]
"""Returns uniform random integers in [0, 65536) as int32, shaped like its argument."""


def split_fp32(value: Tensor) -> tuple[Tensor, Tensor]:
    """Split fp32 values into (bf16 high part rounded to nearest, int16 remainder).

    The high part is ``value`` rounded to the nearest bf16, ties away from zero (the one tie rule
    that makes the split a bijection; see docs). ``hi_bits + remainder == value_bits`` exactly, as
    int32, for every finite value and for infinities. NaNs become a canonical quiet NaN of the same
    sign with remainder 0 (their payload is not kept).
    """
    if value.dtype != torch.float32:
        raise TypeError(f"split_fp32 expects float32 values, got {value.dtype}")
    bits = value.view(torch.int32)
    nan = torch.isnan(value)
    if value.device.type != "cpu" or bool(nan.any()):  # off the CPU: no sync, always the where
        sign = bits & torch.iinfo(torch.int32).min
        bits = torch.where(nan, sign | _CANONICAL_NAN, bits)
    # Adding half an ULP to the int32 bit pattern grows the magnitude (sign-magnitude layout), so
    # masking off the low half rounds the magnitude to nearest, ties away from zero. No overflow:
    # the largest non-NaN magnitude is 0x7F800000.
    hi = (bits + _HALF) & _HIGH_MASK
    lo = bits - hi  # in [-0x8000, 0x7FFF]
    return (hi >> 16).to(torch.int16).view(torch.bfloat16), lo.to(torch.int16)


def join_fp32(hi: Tensor, remainder: Tensor) -> Tensor:
    """Rebuild fp32 values from a bf16 high part and an int16 remainder (inverse of split_fp32)."""
    bits = (hi.view(torch.int16).to(torch.int32) << 16) + remainder.to(torch.int32)
    return bits.view(torch.float32)


def stochastic_round_bf16(value: Tensor, random_bits: Tensor) -> Tensor:
    """Round fp32 to bf16 stochastically: up in magnitude with probability (low 16 bits)/65536.

    ``random_bits`` are int32 in [0, 65536), one per element. NaNs stay NaN.
    """
    bits = value.view(torch.int32)
    nan = torch.isnan(value)
    if value.device.type != "cpu" or bool(nan.any()):  # off the CPU: no sync, always the where
        bits = torch.where(nan, (bits & torch.iinfo(torch.int32).min) | _CANONICAL_NAN, bits)
    rounded = (bits + random_bits) & _HIGH_MASK
    return (rounded >> 16).to(torch.int16).view(torch.bfloat16)


class WeightFormat:
    """Base class. Subclasses set ``name``, ``buffers`` and ``dtypes`` and implement the pair."""

    name: str = ""
    buffers: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = ()
    needs_random: bool = False

    def init_buffers(self, param: Tensor) -> dict[str, Tensor]:
        """Extra buffers for a parameter whose current value is its exact master value."""
        return {}

    def decode(self, param: Tensor, buffers: dict[str, Tensor]) -> Tensor:
        """The fp32 master value. May alias ``param`` (then the rule updates it in place)."""
        raise NotImplementedError

    def encode(
        self,
        value: Tensor,
        param: Tensor,
        buffers: dict[str, Tensor],
        random_bits: RandomBits | None = None,
    ) -> None:
        """Store fp32 ``value`` into ``param`` (in place) and ``buffers``.

        ``random_bits`` is given to formats with ``needs_random``; without it they round to nearest.
        """
        raise NotImplementedError


class Plain32(WeightFormat):
    """fp32 parameters: updated in place, exactly like torch.optim."""

    name = "fp32"
    dtypes = (torch.float32,)

    def decode(self, param, buffers):
        return param.data

    def encode(self, value, param, buffers, random_bits=None):
        if value.data_ptr() != param.data.data_ptr():
            param.data.copy_(value)


class RoundNearest(WeightFormat):
    """Plain 16-bit weights; each update is rounded to nearest (small updates are lost)."""

    name = "none"
    dtypes = (torch.bfloat16, torch.float16)

    def decode(self, param, buffers):
        return param.data.float()

    def encode(self, value, param, buffers, random_bits=None):
        param.data.copy_(value)


class ExactSplit(WeightFormat):
    """bf16 weight (master rounded to nearest) + int16 remainder: the fp32 master, bit for bit."""

    name = "exact"
    buffers = ("remainder",)
    dtypes = (torch.bfloat16,)

    def init_buffers(self, param):
        return {"remainder": torch.zeros_like(param, dtype=torch.int16)}

    def decode(self, param, buffers):
        return join_fp32(param.data, buffers["remainder"])

    def encode(self, value, param, buffers, random_bits=None):
        hi, lo = split_fp32(value)
        param.data.copy_(hi)
        buffers["remainder"].copy_(lo)


class Stochastic(WeightFormat):
    """bf16 weights with stochastic rounding: no extra memory, unbiased in expectation."""

    name = "stochastic"
    dtypes = (torch.bfloat16, torch.float16)
    needs_random = True

    def decode(self, param, buffers):
        return param.data.float()

    def encode(self, value, param, buffers, random_bits=None):
        if random_bits is None:
            param.data.copy_(value)
        elif param.dtype == torch.bfloat16:
            param.data.copy_(stochastic_round_bf16(value, random_bits(value)))
        else:
            param.data.copy_(_stochastic_round_generic(value, param.dtype, random_bits))


def _stochastic_round_generic(value: Tensor, dtype: torch.dtype, random_bits: RandomBits) -> Tensor:
    """Stochastic rounding to fp16 (``dtype``): round toward zero, then away from zero with
    probability (distance to the lower neighbour) / ulp. Unbiased; for fp16 normals exactly so (their
    13 dropped bits are resolved by the 16 random bits), elsewhere to within 2**-16 ulp. Beyond the
    largest finite value the next neighbour is infinity, one ulp further (as for bf16).

    The neighbours are found on the fp16 bit patterns (int32 arithmetic: one step in magnitude is one
    in the bits), not with ``torch.nextafter``: under ``torch.compile`` Inductor computed nextafter of
    fp16 values in fp32, so the compiled path never rounded away from zero (biased toward zero;
    tests/test_core_weight_formats.py compares this with the nextafter form, eager and compiled)."""
    if dtype != torch.float16:
        raise ValueError(f"dtype must be torch.float16 here, got {dtype} (bf16: use stochastic_round_bf16)")
    down = value.to(dtype)
    b = down.view(torch.int16).to(torch.int32) & 0xFFFF
    # ``down`` rounded to nearest; one step toward zero if that went past ``value`` (never from 0)
    too_big = down.float().abs() > value.abs()
    tz = torch.where(too_big, b - 1, b)
    # one step away from zero, toward ``value``'s side: from +-0 the smallest subnormal of that sign
    at_zero = (tz & 0x7FFF) == 0
    away = torch.where(at_zero, torch.where(value < 0, 0x8001, 0x0001), tz + 1)
    below = torch.where(at_zero, tz, tz - 1)  # one step toward zero (0 stays 0)
    lo_f, hi_f, below_f = (_f16_from_bits(x) for x in (tz, away, below))
    span = (hi_f - lo_f).abs()
    # Past the largest finite value ``away`` is inf: use the ulp below it, so that values at least
    # one ulp beyond the largest finite value always overflow, as round-to-nearest would.
    span = torch.where(torch.isinf(hi_f), (lo_f - below_f).abs(), span)
    frac = (value - lo_f).abs() / span
    u = random_bits(value).float() / 65536.0
    out = torch.where(u < frac, away, tz)
    return torch.where(torch.isfinite(value), _f16_from_int(out), down)


def _f16_from_int(bits: Tensor) -> Tensor:
    """fp16 values from their bit patterns in int32 (0 .. 0xFFFF)."""
    return torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16).view(torch.float16)


def _f16_from_bits(bits: Tensor) -> Tensor:
    return _f16_from_int(bits).float()


class Kahan(WeightFormat):
    """16-bit weights plus a 16-bit compensation buffer holding the rounding error."""

    name = "kahan"
    buffers = ("compensation",)
    dtypes = (torch.bfloat16, torch.float16)

    def init_buffers(self, param):
        return {"compensation": torch.zeros_like(param)}

    def decode(self, param, buffers):
        return param.data.float() + buffers["compensation"].float()

    def encode(self, value, param, buffers, random_bits=None):
        param.data.copy_(value)
        error = value - param.data.float()
        buffers["compensation"].copy_(torch.where(torch.isfinite(error), error, 0.0))


WEIGHT_FORMATS: dict[str, WeightFormat] = {
    f.name: f for f in (Plain32(), RoundNearest(), ExactSplit(), Stochastic(), Kahan())
}
MASTER_CHOICES = ("auto", "exact", "none", "stochastic", "kahan")


def resolve_weight_format(master: str, dtype: torch.dtype) -> WeightFormat:
    """The format used for a parameter of ``dtype`` when the group asks for ``master``.

    fp32 parameters never need a master copy and are updated in place whatever ``master`` says.
    """
    if dtype == torch.float32:
        return WEIGHT_FORMATS["fp32"]
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"weight formats keep bfloat16, float16 or float32 params, not {dtype}")
    if master == "auto":
        master = "exact" if dtype == torch.bfloat16 else "kahan"
    fmt = WEIGHT_FORMATS[master]
    if dtype not in fmt.dtypes:
        accepted = [n for n, f in WEIGHT_FORMATS.items() if dtype in f.dtypes and n != "fp32"]
        raise ValueError(
            f"master={master!r} does not support {dtype} parameters; for {dtype} use master= one of "
            f"{accepted} (or 'auto'), or keep those parameters in float32"
        )
    return fmt


# Formats in their own modules register here (they import this module, so this comes last).
from .compact import Compact  # noqa: E402

WEIGHT_FORMATS[Compact.name] = Compact()
MASTER_CHOICES += (Compact.name,)
