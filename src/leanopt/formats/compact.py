"""The "compact" weight format: a 16-bit weight plus an int8 residual in units of the weight's ULP.

3 bytes per parameter instead of 4 (exact split) or 6 (fp32 master + bf16 copy).

bf16 parameters
    The master value is the fp32 value rounded to nearest (ties away from zero) at 16 significant bits
    (the 8 bits of bf16 plus 8 more). On fp32 bits viewed as int32 (sign-magnitude, so integer
    addition rounds the magnitude)::

        bits16 = (bits + 0x80) & ~0xFF          # keep 16 significant bits
        hi     = (bits16 + 0x8000) & ~0xFFFF    # the bf16 weight: nearest bf16 (of bits16)
        lo     = (bits16 - hi) >> 8             # in [-128, 127]: int8 residual, 1/256 of the weight's ULP

    and the master value is rebuilt exactly as ``hi + (lo << 8)``. ``hi`` is the bf16 value nearest to
    the master (ties away from zero), so the model computes with round-to-nearest weights. Max relative
    error of the kept master value against the fp32 value given to ``encode``: ``2**-16`` (1.53e-5) for
    every fp32 normal value (|x| >= 2**-126); absolute error at most ``2**-142`` for fp32 subnormals.
    Infinities are kept; NaNs become a canonical NaN of the same sign.

fp16 parameters
    The weight is the fp16 value nearest to the master; the residual ``r = round((x - w) / (ulp(w)/256))``
    is clamped to [-128, 127] (``ulp`` is fp16's spacing at ``w``: ``2**(e-10)`` for normal ``w``,
    ``2**-24`` in the subnormal range). Rebuilt as ``w + r * ulp(w) / 256`` (exact in fp32). Max relative
    error ``2**-18`` (3.8e-6) for values in fp16's normal range (6.1e-5 <= |x| <= 65504); absolute
    error at most ``2**-32`` below it. Values beyond fp16's range become inf, as a plain fp16 weight.

Small updates: a change smaller than half the residual unit (relative ``2**-17`` for bf16) is rounded
away, like any round-to-nearest storage; "exact" (int16 remainder) keeps every fp32 bit instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .weights import WeightFormat, join_fp32, split_fp32

_ROUND8 = 0x80
_LOW8_MASK = -0x100  # ~0xFF as a signed int32
_CANONICAL_NAN = 0x7FC00000
_FP16_MIN_EXP = -14  # exponent of fp16's smallest normal value
_FP16_MANT = 10  # fp16 stored mantissa bits

#: max relative error of the kept master value (fp32 normal range for bf16, fp16 normal range for fp16)
MAX_REL_ERROR = {torch.bfloat16: 2.0**-16, torch.float16: 2.0**-18}


def round_fp32_to_16_bits(value: Tensor) -> Tensor:
    """fp32 ``value`` rounded to nearest (ties away from zero) at 16 significant bits, as int32 bits.

    NaNs become a canonical quiet NaN of the same sign; infinities stay infinite.
    """
    if value.dtype != torch.float32:
        raise TypeError(f"round_fp32_to_16_bits expects float32 values, got {value.dtype}")
    bits = value.view(torch.int32)
    nan = torch.isnan(value)
    if value.device.type != "cpu" or bool(nan.any()):  # off the CPU: no sync, always the where
        bits = torch.where(nan, (bits & torch.iinfo(torch.int32).min) | _CANONICAL_NAN, bits)
    return (bits + _ROUND8) & _LOW8_MASK


def compact_split_bf16(value: Tensor) -> tuple[Tensor, Tensor]:
    """Split fp32 values into (bf16 weight, int8 residual); ``compact_join_bf16`` inverts it."""
    hi, lo = split_fp32(round_fp32_to_16_bits(value).view(torch.float32))
    # lo is a multiple of 256 in [-0x8000, 0x7F00]: an exact shift to int8.
    return hi, (lo >> 8).to(torch.int8)


def compact_join_bf16(hi: Tensor, residual: Tensor) -> Tensor:
    """The fp32 master value kept by (bf16 weight, int8 residual)."""
    return join_fp32(hi, residual.to(torch.int16) << 8)


def _fp16_ulp(weight: Tensor) -> Tensor:
    """fp32 spacing of fp16 numbers at each (finite) fp16 ``weight``."""
    w32 = weight.float()
    _, exp = torch.frexp(w32)  # |w| = m * 2**exp, m in [0.5, 1); frexp(0) gives exp 0
    exp = torch.where(w32 == 0, _FP16_MIN_EXP, exp - 1).clamp_(min=_FP16_MIN_EXP)
    return torch.ldexp(torch.ones_like(weight, dtype=torch.float32), exp - _FP16_MANT)


def compact_split_fp16(value: Tensor) -> tuple[Tensor, Tensor]:
    """Split fp32 values into (nearest fp16 weight, int8 residual in 1/256 of its ULP)."""
    weight = value.to(torch.float16)
    w32 = weight.float()
    finite = torch.isfinite(w32) & torch.isfinite(value)
    unit = _fp16_ulp(torch.where(finite, weight, torch.zeros_like(weight))) / 256.0
    r = torch.round((value - w32) / unit).clamp_(-128, 127)
    r = torch.where(finite, r, torch.zeros_like(r))
    return weight, r.to(torch.int8)


def compact_join_fp16(weight: Tensor, residual: Tensor) -> Tensor:
    """The fp32 master value kept by (fp16 weight, int8 residual)."""
    w32 = weight.float()
    finite = torch.isfinite(w32)
    unit = _fp16_ulp(torch.where(finite, weight, torch.zeros_like(weight))) / 256.0
    return torch.where(finite, w32 + residual.float() * unit, w32)


class Compact(WeightFormat):
    """16-bit weight (nearest to the master) + int8 residual: 3 bytes/param, ~16 (bf16) or ~19 (fp16)
    significant bits. See the module docstring for the exact arithmetic and error bounds."""

    name = "compact"
    buffers = ("residual",)
    dtypes = (torch.bfloat16, torch.float16)

    def init_buffers(self, param: Tensor) -> dict[str, Tensor]:
        return {"residual": torch.zeros_like(param, dtype=torch.int8, memory_format=torch.preserve_format)}

    def decode(self, param: Tensor, buffers: dict[str, Tensor]) -> Tensor:
        if param.dtype == torch.bfloat16:
            return compact_join_bf16(param.data, buffers["residual"])
        return compact_join_fp16(param.data, buffers["residual"])

    def encode(self, value: Tensor, param: Tensor, buffers: dict[str, Tensor], random_bits=None) -> None:
        if param.dtype == torch.bfloat16:
            hi, lo = compact_split_bf16(value)
        else:
            hi, lo = compact_split_fp16(value)
        param.data.copy_(hi)
        buffers["residual"].copy_(lo)
