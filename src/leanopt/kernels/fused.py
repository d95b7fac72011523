"""The compiled executor: one torch.compile pass over memory per tensor (Triton on CUDA; C++ on CPU
when the native kernels of kernels/native.py are off).

``fused_step`` is a drop-in replacement for ``reference_step``. For each (rule, weight format, state
format, structural flags, dtypes, device type) it builds one pure function

    decode weight -> decode states -> fused rule (fp32) -> encode states -> encode weight

out of the formats' own ``decode``/``encode`` and compiles it once with ``torch.compile(dynamic=True)``
(sizes are symbolic, so every shape of the same rank reuses the kernel). Hyper-parameters (lr, betas,
eps, weight decay, step count and the bias corrections derived from it) reach the kernel as one small
fp32 tensor, so changing them never recompiles; only structural choices (``maximize``, ``amsgrad``,
``nesterov``, whether weight decay / momentum is zero) are baked in.

Why rules have a separate "fused form" (measured, see docs/kernels.md): compiling ``Rule.update`` itself
with Python-float hyper-parameters either recompiles on every step (torch 2.13 specialises the scalar
``value=``/``alpha=``/``lerp`` weights it cannot turn into tensors) or evaluates ``beta**step`` in double
precision for every element. A fused form is the same arithmetic with tensor-valued hyper-parameters;
rules without one run on the reference executor, so adding a rule still touches one place.

Formats are used as they are, with two exceptions listed in ``TRACEABLE_WEIGHT_CODECS``: formats whose
eager code branches on data (``if nan.any()``) get a branch-free twin that is tested bit for bit against
the original. Any other format composes automatically (at worst with a graph break, i.e. two passes).
"""

from __future__ import annotations

import os
import struct
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..formats import noise as _noise
from ..formats.states import StateFormat
from ..formats.weights import RandomBits, WeightFormat
from ..rules.adam import AdamRule
from ..rules.base import Rule
from ..rules.lion import LionRule
from ..rules.sgd import SGDRule
from . import gpu, native
from .reference import reference_step

KERNEL_CHOICES = ("auto", "reference", "fused")
#: ``kernel="auto"`` uses the fused path for tensors with at least this many elements (smaller ones are
#: dominated by call overhead, and small models should not pay a first-step compile).
FUSED_MIN_NUMEL = int(os.environ.get("LEANOPT_FUSED_MIN_NUMEL", 1 << 20))

_INT32_MIN = -(2**31)
_CANONICAL_NAN = 0x7FC00000


# ---------------------------------------------------------------------------------------------------
# Fused forms of the rules: the rule's arithmetic with hyper-parameters as 0-d fp32 tensors.


class FusedRule:
    """Tensor-only form of a ``Rule``. ``scalars`` computes the hyper-parameters in Python (double
    precision, as the reference does) and ``update`` applies them, in place, to fp32 tensors."""

    def flags(self, group: dict[str, Any]) -> tuple:
        """Structural choices baked into the compiled kernel (changing one compiles a new kernel)."""
        raise NotImplementedError

    def scalars(self, group: dict[str, Any], step: float) -> list[float]:
        """Hyper-parameters for this step, in the order ``update`` reads them from ``s``."""
        raise NotImplementedError

    def update(self, param: Tensor, grad: Tensor, states: dict[str, Tensor], s: Tensor, flags: tuple) -> None:
        raise NotImplementedError


def _register_fma() -> None:
    """Make ``torch.ops.prims.fma`` available (Inductor registers it; imported only when compiling)."""
    import torch._inductor.inductor_prims  # noqa: F401


def _fma(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """a * b + c with one rounding (compiled to a hardware FMA). Eager CPU kernels use FMAs in
    ``lerp``, ``addcmul`` and ``add(alpha=)``, so the fused forms do too (bit-identical results).
    Only meaningful inside compiled code: the prim's eager fallback rounds twice."""
    for t in (a, b, c):  # symbolic values (kernels/native.py traces the fused forms into C)
        hook = getattr(type(t), "__leanopt_fma__", None)
        if hook is not None:
            return hook(a, b, c)
    a, b, c = torch.broadcast_tensors(a, b, c)
    return torch.ops.prims.fma(a, b, c)


def _lerp(start: Tensor, end: Tensor, weight: Tensor) -> Tensor:
    """``torch.lerp`` as eager CPU computes it: fma(w, end - start, start) for |w| < 0.5, else
    fma(w - 1, end - start, end)."""
    diff = end - start
    small = weight.abs() < 0.5
    return torch.where(small, _fma(weight, diff, start), _fma(weight - 1, diff, end))


class FusedAdam(FusedRule):
    """Adam / AdamW (``decoupled`` from the rule), as ``rules/adam.py``, op for op."""

    def __init__(self, decoupled: bool) -> None:
        self.decoupled = decoupled

    def flags(self, group):
        return (bool(group["maximize"]), group["weight_decay"] != 0, bool(group["amsgrad"]))

    def scalars(self, group, step):
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        return [1 - lr * wd, wd, 1 - beta1, beta2, 1 - beta2, -(lr / bias_correction1), bias_correction2**0.5, eps]

    def update(self, param, grad, states, s, flags):
        maximize, decay, amsgrad = flags
        if maximize:
            grad = -grad
        if decay:
            if self.decoupled:
                param.copy_(param * s[0])  # param.mul_(1 - lr * wd)
            else:
                grad = _fma(param, s[1], grad)  # grad.add(param, alpha=wd)
        exp_avg, exp_avg_sq = states["exp_avg"], states["exp_avg_sq"]
        exp_avg.copy_(_lerp(exp_avg, grad, s[2]))  # exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.copy_(_fma(s[4] * grad, grad, exp_avg_sq * s[3]))  # mul_(beta2).addcmul_(value=1 - beta2)
        if amsgrad:
            states["max_exp_avg_sq"].copy_(torch.maximum(states["max_exp_avg_sq"], exp_avg_sq))
            denom = states["max_exp_avg_sq"].sqrt() / s[6] + s[7]
        else:
            denom = exp_avg_sq.sqrt() / s[6] + s[7]
        param.copy_(s[5] * exp_avg / denom + param)  # addcdiv_(value=-step_size): (v * t1) / t2 + self


class FusedSGD(FusedRule):
    """SGD with momentum, dampening, Nesterov and L2 weight decay, as ``rules/sgd.py``, op for op."""

    def flags(self, group):
        return (bool(group["maximize"]), group["weight_decay"] != 0, group["momentum"] != 0, bool(group["nesterov"]))

    def scalars(self, group, step):
        return [-group["lr"], group["weight_decay"], group["momentum"], 1 - group["dampening"], float(step == 1)]

    def update(self, param, grad, states, s, flags):
        maximize, decay, momentum, nesterov = flags
        if maximize:
            grad = -grad
        if decay:
            grad = _fma(param, s[1], grad)  # grad.add(param, alpha=wd)
        if momentum:
            buf = states["momentum_buffer"]
            # step 1: buf.copy_(grad); later: buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            buf.copy_(torch.where(s[4] != 0, grad, _fma(grad, s[3], buf * s[2])))
            grad = _fma(buf, s[2], grad) if nesterov else buf
        param.copy_(_fma(grad, s[0], param))  # param.add_(grad, alpha=-lr)


class FusedLion(FusedRule):
    """Lion, as ``rules/lion.py``, op for op."""

    def flags(self, group):
        return (bool(group["maximize"]), group["weight_decay"] != 0)

    def scalars(self, group, step):
        lr, wd = group["lr"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        return [-lr, 1 - lr * wd, beta1, 1 - beta1, beta2, 1 - beta2]

    def update(self, param, grad, states, s, flags):
        maximize, decay = flags
        if maximize:
            grad = -grad
        exp_avg = states["exp_avg"]
        direction = _fma(grad, s[3], exp_avg * s[2]).sign()  # exp_avg.mul(b1).add_(grad, alpha=1 - b1).sign_()
        if decay:
            param.copy_(param * s[1])
        param.copy_(_fma(direction, s[0], param))  # param.add_(direction, alpha=-lr)
        exp_avg.copy_(_fma(grad, s[5], exp_avg * s[4]))  # exp_avg.mul_(b2).add_(grad, alpha=1 - b2)


def fused_form(rule: Rule) -> FusedRule | None:
    """The fused form of ``rule``, or None (then the reference executor runs it)."""
    key = (type(rule), getattr(rule, "decoupled", None))
    if key not in _FORMS:
        _FORMS[key] = _make_form(rule)
    return _FORMS[key]


_FORMS: dict[tuple, FusedRule | None] = {}


def _make_form(rule: Rule) -> FusedRule | None:
    if isinstance(rule, AdamRule):
        return FusedAdam(rule.decoupled)
    if isinstance(rule, SGDRule):
        return FusedSGD()
    if isinstance(rule, LionRule):
        return FusedLion()
    return None


# ---------------------------------------------------------------------------------------------------
# Branch-free twins of weight formats whose eager code branches on data.


def _canonical_nan_bits(value: Tensor) -> Tensor:
    """fp32 bits as int32, NaNs replaced by a quiet NaN of the same sign (always, without a branch)."""
    bits = value.view(torch.int32)
    return torch.where(torch.isnan(value), (bits & _INT32_MIN) | _CANONICAL_NAN, bits)


def _exact_decode(param: Tensor, buffers: dict[str, Tensor]) -> Tensor:
    hi = param.view(torch.int16).to(torch.int32) << 16
    return (hi + buffers["remainder"].to(torch.int32)).view(torch.float32)


def _exact_encode(value: Tensor, param: Tensor, buffers: dict[str, Tensor], random_bits=None) -> None:
    bits = _canonical_nan_bits(value)
    hi = (bits + 0x8000) & -0x10000
    param.copy_((hi >> 16).to(torch.int16).view(torch.bfloat16))
    buffers["remainder"].copy_((bits - hi).to(torch.int16))


def _compact_decode(param: Tensor, buffers: dict[str, Tensor]) -> Tensor:
    if param.dtype != torch.bfloat16:
        raise NotImplementedError  # fp16 compact: the format's own code
    # bf16 -> fp32 is a 16-bit shift; the int8 residual counts 1/256 of the weight's ULP.
    hi = param.float().view(torch.int32)
    return (hi + (buffers["residual"].to(torch.int32) << 8)).view(torch.float32)


def _compact_encode(value: Tensor, param: Tensor, buffers: dict[str, Tensor], random_bits=None) -> None:
    bits16 = (_canonical_nan_bits(value) + 0x80) & -0x100
    hi = (bits16 + 0x8000) & -0x10000
    # Through int16, not a float->bf16 conversion: conversions do not keep a NaN's sign.
    param.copy_((hi >> 16).to(torch.int16).view(torch.bfloat16))
    buffers["residual"].copy_(((bits16 - hi) >> 8).to(torch.int8))


@dataclass(frozen=True)
class WeightCodec:
    """A traceable (decode, encode) pair standing in for a weight format inside compiled code."""

    decode: Callable[[Tensor, dict[str, Tensor]], Tensor]
    encode: Callable[..., None]
    dtypes: tuple[torch.dtype, ...] = field(default=(torch.bfloat16,))


#: weight format name -> branch-free twin (tested bit for bit against the format in tests/test_fused.py)
TRACEABLE_WEIGHT_CODECS: dict[str, WeightCodec] = {
    "exact": WeightCodec(_exact_decode, _exact_encode),
    "compact": WeightCodec(_compact_decode, _compact_encode),
}


def weight_codec(fmt: WeightFormat, dtype: torch.dtype) -> tuple[Callable, Callable]:
    """(decode, encode) used inside compiled code for ``fmt`` on ``dtype`` parameters."""
    twin = TRACEABLE_WEIGHT_CODECS.get(fmt.name)
    if twin is not None and dtype in twin.dtypes:
        return twin.decode, twin.encode
    return fmt.decode, fmt.encode


# ---------------------------------------------------------------------------------------------------
# Building and caching compiled pipelines.


@dataclass
class CompileRecord:
    """One compiled pipeline: what it is for and how long its first call (trace + compile) took."""

    key: tuple
    seconds: float = 0.0
    calls: int = 0


_PIPELINES: dict[tuple, Callable] = {}
_RECORDS: dict[tuple, CompileRecord] = {}
_FAILED: dict[tuple, str] = {}
_WARNED = False
_DISABLED_REASON: str | None = None


def compile_stats() -> list[CompileRecord]:
    """Every pipeline compiled in this process, with its first-call (compile) time in seconds."""
    return list(_RECORDS.values())


#: Inductor options for every pipeline. ``emulate_precision_casts``: a cast to a 16-bit type and back
#: rounds, as in eager mode (by default Inductor may drop the pair; the int8/int4 encode then divided by
#: the group's unrounded maximum instead of its bf16 scale, and 7-12% of the codes came out one apart
#: from the reference's).
COMPILE_OPTIONS = {"emulate_precision_casts": True}

#: (device, hyper-parameter values) -> those values as an fp32 tensor on the device
_SCALARS: dict[tuple, Tensor] = {}


def device_scalars(values: list[float], device: torch.device) -> Tensor:
    """``values`` as an fp32 tensor on ``device``, made once per distinct values (every tensor of a
    param group at the same step shares one). On CUDA it is copied from pinned memory without waiting:
    a plain ``.to("cuda")`` of a pageable tensor synchronises the stream, which would make every
    tensor's update wait for all the work queued before it. The copy is ordered on the current stream,
    so the cache is kept per stream."""
    where = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    try:  # fp32 bits, rounded as torch converts doubles (to nearest); -0.0 is not 0.0
        key: tuple = (*where, struct.pack(f"<{len(values)}f", *values))
    except (OverflowError, struct.error):  # beyond fp32's range: torch makes it inf
        key = (*where, *torch.tensor(values, dtype=torch.float32).view(torch.int32).tolist())
    found = _SCALARS.get(key)
    if found is None:
        host = torch.tensor(values, dtype=torch.float32)
        if device.type == "cuda":  # torch's pinned allocator keeps the buffer until the copy has run
            found = host.pin_memory().to(device, non_blocking=True)
        else:
            found = host.to(device)
        if len(_SCALARS) >= 1024:  # a new step brings new values: drop the old ones
            _SCALARS.clear()
        _SCALARS[key] = found
    return found


_COUNTERS: dict[int, tuple] = {}  # id(step tensor) -> native._step_counter's (weakref, C float view, address)


def _advance_step(state: dict[str, Any]) -> float:
    """``state["step"] += 1`` and its new value; a plain fp32 CPU step tensor is written through a C
    float view of its storage (float32 + 1, as torch's ``add_`` rounds; ~1 us instead of ~10)."""
    t = state["step"]
    counter = _COUNTERS.get(id(t))
    if counter is None or counter[0]() is not t or counter[2] != t.data_ptr():
        counter = native._step_counter(t)
        if counter is None:
            state["step"] += 1
            return float(state["step"])
        if len(_COUNTERS) > 100_000:
            _COUNTERS.clear()
        _COUNTERS[id(t)] = counter
    counter[1].value = counter[1].value + 1.0
    return counter[1].value


def reset() -> None:
    """Forget compiled pipelines and failures (tests; after changing torch._dynamo settings)."""
    global _WARNED, _DISABLED_REASON
    _SCALARS.clear()
    _PIPELINES.clear()
    _RECORDS.clear()
    _FAILED.clear()
    _WARNED = False
    _DISABLED_REASON = None


def _weight_aliases(fmt: WeightFormat, dtype: torch.dtype) -> bool:
    """Whether ``fmt.decode`` returns the parameter itself (then the rule updates it in place and
    ``encode`` has nothing to do). Probed once on a 2-element tensor: weight formats are elementwise."""
    probe = torch.zeros(2, dtype=dtype)
    value = fmt.decode(probe, fmt.init_buffers(probe))
    return value.dtype == torch.float32 and value.data_ptr() == probe.data_ptr()


def _make_pipeline(
    form: FusedRule, flags: tuple, specs: tuple, wdecode: Callable, wencode: Callable, w_alias: bool,
    sfmt: StateFormat, needs_random: bool,
) -> Callable:  # fmt: skip
    _register_fma()

    def pipeline(param, grad, buffers, stored, s, rbits):
        g32 = grad if grad.dtype == torch.float32 else grad.float()
        master = wdecode(param, buffers)
        states32 = {spec.name: sfmt.decode(spec.name, stored, spec.signed, shape=param.shape) for spec in specs}
        form.update(master, g32, states32, s, flags)
        for spec in specs:
            value = states32[spec.name]
            if not any(value is t for t in stored.values()):  # decoded in place: nothing to write
                sfmt.encode(spec.name, value, stored, spec.signed)
        if not w_alias:  # rbits: stochastic rounding's key and base index, its bits computed in the kernel
            noise = (lambda like: _noise.bits_from(rbits, like.shape)) if needs_random else None
            wencode(master, param, buffers, noise)

    # A fresh code object per pipeline: dynamo keeps its cache (and recompile limit) per code object.
    code = pipeline.__code__.replace(co_name=f"leanopt_fused_{len(_PIPELINES)}")
    fn = types.FunctionType(code, pipeline.__globals__, code.co_name, None, pipeline.__closure__)
    return torch.compile(fn, dynamic=True, options=COMPILE_OPTIONS)


# ---------------------------------------------------------------------------------------------------
# Pair mode (CPU): exact split + fp32 states without any int16 arithmetic.
#
# Inductor's C++ backend does not vectorize int16 (torch 2.13: int16 is missing from its vectorizable
# dtypes), so a kernel that reads or writes the int16 remainder runs as a scalar loop, about 2-4x
# slower (docs/kernels.md). Pair mode views every 16-bit tensor as int32 pairs and every fp32 tensor
# as int64 pairs, splits each pair into its even and odd elements with shifts and masks, runs the
# fused rule on both halves and packs the results back: the same bits, in vectorized code.

PAIR_MODE = os.environ.get("LEANOPT_FUSED_PAIRS", "1") != "0"
_LOW32 = 0xFFFFFFFF


def _fp32_pairs(x: Tensor) -> tuple[Tensor, Tensor]:
    """int64 view of fp32 pairs -> (even, odd) fp32 values."""
    return (x & _LOW32).to(torch.int32).view(torch.float32), (x >> 32).to(torch.int32).view(torch.float32)


def _join_fp32_pairs(even: Tensor, odd: Tensor) -> Tensor:
    return (even.view(torch.int32).to(torch.int64) & _LOW32) | (odd.view(torch.int32).to(torch.int64) << 32)


def _split_bits(value: Tensor) -> tuple[Tensor, Tensor]:
    """Exact split as int32 (hi with 16 zero low bits, remainder in [-0x8000, 0x7FFF])."""
    bits = _canonical_nan_bits(value)
    hi = (bits + 0x8000) & -0x10000
    return hi, bits - hi


def _uses_pair_mode(weight_format: WeightFormat, state_format: StateFormat, param: Tensor, grad: Tensor,
                    stored: dict[str, Tensor], specs: tuple, buffers: dict[str, Tensor]) -> bool:  # fmt: skip
    return (
        PAIR_MODE
        and param.device.type == "cpu"
        and weight_format.name == "exact"
        and state_format.name == "fp32"
        and param.dtype == torch.bfloat16
        and grad.dtype in (torch.bfloat16, torch.float32)
        and param.numel() % 2 == 0
        and param.is_contiguous()
        and grad.is_contiguous()
        and set(stored) == {spec.name for spec in specs}
        and all(t.dtype == torch.float32 and t.is_contiguous() for t in stored.values())
        and all(t.is_contiguous() for t in buffers.values())
    )


def _make_pair_pipeline(form: FusedRule, flags: tuple, specs: tuple) -> Callable:
    _register_fma()
    names = tuple(spec.name for spec in specs)

    def pipeline(P, R, G, stored, s):  # P, R: int32 pairs; G: int32 (bf16) or int64 (fp32) pairs
        hi_e, hi_o = P << 16, P & -0x10000
        m_e = (hi_e + ((R << 16) >> 16)).view(torch.float32).clone()
        m_o = (hi_o + (R >> 16)).view(torch.float32).clone()
        if G.dtype == torch.int32:
            g_e, g_o = (G << 16).view(torch.float32), (G & -0x10000).view(torch.float32)
        else:
            g_e, g_o = _fp32_pairs(G)
        halves = {n: _fp32_pairs(stored[n]) for n in names}
        s_e = {n: halves[n][0].clone() for n in names}
        s_o = {n: halves[n][1].clone() for n in names}
        form.update(m_e, g_e, s_e, s, flags)
        form.update(m_o, g_o, s_o, s, flags)
        h_e, l_e = _split_bits(m_e)
        h_o, l_o = _split_bits(m_o)
        P.copy_(((h_e >> 16) & 0xFFFF) | h_o)
        R.copy_((l_e & 0xFFFF) | (l_o << 16))
        for n in names:
            stored[n].copy_(_join_fp32_pairs(s_e[n], s_o[n]))

    code = pipeline.__code__.replace(co_name=f"leanopt_fused_pairs_{len(_PIPELINES)}")
    fn = types.FunctionType(code, pipeline.__globals__, code.co_name, None, pipeline.__closure__)
    return torch.compile(fn, dynamic=True, options=COMPILE_OPTIONS)


def _warn_once(reason: str) -> None:
    global _WARNED
    if not _WARNED:
        _WARNED = True
        warnings.warn(
            f"leanopt: fused optimizer kernels are not available ({reason}); using the reference "
            "executor (correct, slower). Pass kernel='reference' to silence this warning.",
            RuntimeWarning,
            stacklevel=4,
        )


def available() -> tuple[bool, str]:
    """Whether torch.compile can be used at all here (and if not, why)."""
    if _DISABLED_REASON is not None:
        return False, _DISABLED_REASON
    if not hasattr(torch, "compile"):
        return False, "torch.compile is missing"
    return True, ""


#: State formats the fused path takes. Elementwise formats compile to one fast pass. The grouped
#: int8/int4 formats (formats/quantized.py) trace and run fused unmodified, but Inductor's CPU kernel
#: for them took 34.7 s per step on a 50M-element tensor (torch's fused AdamW: 0.22 s in the same run;
#: grouping, padding and reductions under symbolic shapes; docs/kernels.md), so this path leaves them to
#: the reference executor (on CPU the native kernels run them first).
FUSED_STATE_FORMATS = {"fp32", "bf16"}
#: ... except when asked for: with ``kernel="fused"`` the compiled path also takes these state formats
#: on these devices (CUDA: only where the multi-tensor CUDA kernels are off or cannot build; otherwise
#: the grouped formats run eagerly there, a dozen small kernels per tensor: 172x torch's fused AdamW on
#: GPT-2's tensors on an H200). Its results match the reference as the native kernels' do
#: (tests/test_fused.py).
OPT_IN_STATE_FORMATS: dict[str, set[str]] = {"cuda": {"int8", "int4"}}


def supports(
    rule: Rule, weight_format: WeightFormat, param: Tensor, state_format: StateFormat | None = None,
    forced: bool = False,
) -> bool:  # fmt: skip
    """Whether the fused executor handles this parameter: the rule has a fused form, the state format
    is in FUSED_STATE_FORMATS (or, when ``forced`` by ``kernel="fused"``, in OPT_IN_STATE_FORMATS for the
    parameter's device), and the tensor is dense."""
    if state_format is not None and state_format.name not in FUSED_STATE_FORMATS:
        if not (forced and state_format.name in OPT_IN_STATE_FORMATS.get(param.device.type, ())):
            return False
    return fused_form(rule) is not None and param.layout == torch.strided and not param.is_sparse


def fused_step(
    rule: Rule,
    weight_format: WeightFormat,
    state_format: StateFormat,
    param: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    group: dict[str, Any],
    random_bits: RandomBits | None = None,
) -> bool:
    """One update of ``param`` from ``grad``, like ``reference_step``, in one compiled pass.

    Returns False, changing nothing, if no compiled kernel can be used (the caller then runs the
    reference executor); a compile failure warns once and disables the fused path for the process.
    """
    global _DISABLED_REASON
    form = fused_form(rule)
    if form is None or _DISABLED_REASON is not None:
        return False
    specs = tuple(rule.states(group))
    flags = form.flags(group)
    wdecode, wencode = weight_codec(weight_format, param.dtype)
    stored = {k: v for k, v in state.items() if k != "step" and k not in weight_format.buffers}
    buffers = {k: state[k] for k in weight_format.buffers}
    pairs = _uses_pair_mode(weight_format, state_format, param, grad, stored, specs, buffers)
    key = (
        type(rule), getattr(rule, "decoupled", None), flags, specs, weight_format.name, state_format.name,
        param.dtype, grad.dtype, param.device.type, 1 if pairs else param.dim(), pairs,
        tuple(sorted((k, v.dtype) for k, v in stored.items())),
    )  # fmt: skip
    if key in _FAILED:
        return False
    fn = _PIPELINES.get(key)
    if fn is None:
        if pairs:
            fn = _make_pair_pipeline(form, flags, specs)
        else:
            w_alias = _weight_aliases(weight_format, param.dtype)
            fn = _make_pipeline(form, flags, specs, wdecode, wencode, w_alias, state_format, weight_format.needs_random)
        _PIPELINES[key] = fn
        _RECORDS[key] = CompileRecord(key)
    if pairs:
        pair_args = (
            param.data.view(-1).view(torch.int32),
            buffers["remainder"].view(-1).view(torch.int32),
            grad.view(-1).view(torch.int32 if grad.dtype == torch.bfloat16 else torch.int64),
            {k: v.view(-1).view(torch.int64) for k, v in stored.items()},
        )
        run = lambda s, rbits: fn(*pair_args, s)  # noqa: E731
    else:
        run = lambda s, rbits: fn(param.data, grad, buffers, stored, s, rbits)  # noqa: E731
    step = _advance_step(state)  # before drawing random bits: they depend on the step, as in the reference
    s = device_scalars(form.scalars(group, step), param.device)
    rbits = None
    if random_bits is not None and weight_format.needs_random:  # formats/noise.py: computed in the kernel
        rbits = _noise.key_tensor(random_bits.key_at(step), random_bits.base(param), param.device)
    record = _RECORDS[key]
    if record.calls == 0:
        start = time.perf_counter()
        try:
            run(s, rbits)
        except Exception as err:  # compile failure (no C++ compiler, unsupported op, ...): nothing written
            state["step"] -= 1
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            _FAILED[key] = reason
            if _is_toolchain_failure(err):
                _DISABLED_REASON = reason
            _warn_once(reason)
            return False
        record.seconds = time.perf_counter() - start
    else:
        run(s, rbits)
    record.calls += 1
    return True


_GROUP_NUMEL: dict[int, tuple[int, int, int]] = {}


def _group_numel(group: dict[str, Any]) -> int:
    """Elements in a param group (cached per group object and parameter list)."""
    params = group["params"]
    cached = _GROUP_NUMEL.get(id(group))
    if cached is None or cached[0] != id(params) or cached[1] != len(params):
        cached = _GROUP_NUMEL[id(group)] = (id(params), len(params), sum(p.numel() for p in params))
    return cached[2]


def check_kernel(kernel: Any) -> None:
    """Raise ValueError unless ``kernel`` is one of KERNEL_CHOICES."""
    if kernel not in KERNEL_CHOICES:
        raise ValueError(f"kernel must be one of {list(KERNEL_CHOICES)}, got {kernel!r}")


def dispatch_step(
    kernel: str,
    rule: Rule,
    weight_format: WeightFormat,
    state_format: StateFormat,
    param: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    group: dict[str, Any],
    random_bits: RandomBits | None = None,
    cache_key: int | None = None,
) -> str:
    """Run one update with the executor ``kernel`` asks for; returns the one used ("gpu", "native",
    "fused" or "reference"). ``"fused"`` on CUDA first tries the CUDA kernels (kernels/gpu.py).
    ``cache_key``: what the native and CUDA kernels keep this update's launch under (default
    ``id(state)``; for a DTensor's local views, made anew each time, the id of its own state dict).
    Unless ``kernel="reference"``, CPU tensors the native kernels cover run there.
    Otherwise ``"auto"`` uses the compiled path when the parameter's group holds at least
    FUSED_MIN_NUMEL elements (a model big enough to repay a compile; its small tensors then use the
    same kernels) and the rule has a fused form; ``"fused"`` for every tensor it can."""
    if kernel != "reference" and _on_contiguous_twin(weight_format, param, grad, state):
        on_cpu = param.device.type == "cpu" and not gpu.wanted(kernel, param.device)  # (not the CUDA path, emulated)
        if on_cpu and native.native_step(rule, weight_format, state_format, param, grad, state, group, random_bits):
            return "native"  # a native kernel that transposes the weight's rows in cache: no copies
        twin = dict(state)
        twin.update({b: _contiguous(state[b]) for b in weight_format.buffers})
        flat = _contiguous(param.detach())
        used = dispatch_step(kernel, rule, weight_format, state_format, flat, _contiguous(grad), twin, group,
                             random_bits)  # fmt: skip
        _copy_back(param.detach(), flat)
        for b in weight_format.buffers:
            _copy_back(state[b], twin[b])
        return used
    if gpu.wanted(kernel, param.device) and gpu.gpu_step(
        rule, weight_format, state_format, param, grad, state, group, random_bits, cache_key
    ):  # fmt: skip
        return "gpu"
    if kernel != "reference" and param.device.type == "cpu":
        if native.native_step(rule, weight_format, state_format, param, grad, state, group, random_bits, cache_key):
            return "native"
    want = kernel == "fused" or (kernel == "auto" and _group_numel(group) >= FUSED_MIN_NUMEL)
    if want and supports(rule, weight_format, param, state_format, forced=kernel == "fused"):
        if fused_step(rule, weight_format, state_format, param, grad, state, group, random_bits):
            return "fused"
    reference_step(rule, weight_format, state_format, param, grad, state, group, random_bits)
    return "reference"


def _contiguous(t: Tensor) -> Tensor:
    """``t.contiguous()``; a channels_last CPU tensor by the native transpose (the same bytes; faster
    than torch's permuted copy here, above all for int8: ``python benchmarks/channels_last.py``)."""
    out = native.to_logical(t) if t.device.type == "cpu" and not t.is_contiguous() else None
    return t.contiguous() if out is None else out


def _copy_back(dst: Tensor, src: Tensor) -> None:
    """``dst.copy_(src)`` (``src`` a contiguous twin of ``dst``), natively where :func:`_contiguous` was."""
    if dst.device.type != "cpu" or not native.from_logical(dst, src):
        dst.copy_(src)


def _on_contiguous_twin(weight_format: WeightFormat, param: Tensor, grad: Tensor, state: dict[str, Any]) -> bool:
    """Whether ``param`` is a dense, non-contiguous parameter (a channels_last conv weight) whose
    int8/int4 states are grouped along rows in logical (contiguous) order (formats/quantized.py), which
    the flat kernels cannot walk in the parameter's memory order. On the CPU a native kernel that
    transposes each row in cache takes it (``native.KernelSpec.permuted``); elsewhere the kernels run on
    copies of the parameter, its weight-format buffers and its gradient, and the parameter and buffers
    are copied back: the bits of a contiguous parameter (docs/kernels.md, "Dense layouts"). The
    reference executor needs neither."""
    if param.is_contiguous() or not native.dense(param) or not native.same_layout(grad, param):
        return False
    if not any(k.endswith(".codes") for k in state):
        return False
    return all(isinstance(state.get(b), Tensor) and state[b].shape == param.shape for b in weight_format.buffers)


def _is_toolchain_failure(err: Exception) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return any(w in text for w in ("compiler", "invalidcxx", "g++", "cc1plus", "triton", "no such file"))


__all__ = [
    "FUSED_MIN_NUMEL",
    "FUSED_STATE_FORMATS",
    "OPT_IN_STATE_FORMATS",
    "KERNEL_CHOICES",
    "FusedRule",
    "TRACEABLE_WEIGHT_CODECS",
    "available",
    "check_kernel",
    "compile_stats",
    "dispatch_step",
    "fused_form",
    "fused_step",
    "reset",
    "supports",
    "weight_codec",
]
