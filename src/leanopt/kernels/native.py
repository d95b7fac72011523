"""Native CPU kernels: each rule's fused form, generated as C and compiled once with the system compiler.

Why (measured, docs/kernels.md): Inductor's C++ backend does not vectorise 16-bit integers and compiles
the grouped int8/int4 formats into several passes, so the exact split ran at ~3.5x torch's fused AdamW
and int8 states stayed on the eager path. Here one loop reads and writes every byte once:

    decode weight -> decode states -> fused rule (fp32) -> encode states -> encode weight

The C for the rule is not written by hand: ``FusedRule.update`` (kernels/fused.py, the same code the
compiled CUDA path runs) is traced once with symbolic values (:class:`Expr`), each tensor operation
becomes one fp32 C expression with the same rounding (``fmaf`` where torch's eager CPU kernels use an
FMA, ``-ffp-contract=off`` everywhere else), so results are bit-identical to the reference executor
for SGD and Lion, and to torch's fused AdamW for Adam (the reference's eager sqrt is MKL's; see
docs/kernels.md; tests/test_native.py compares bits). Weight and state formats contribute short C
load/store snippets (:data:`WEIGHT_CODECS`, :data:`FLAT_STATE_CODECS`, the grouped int8/int4 code
below); a format without one runs on the other executors.

Kernels are cached on disk (``$LEANOPT_CACHE_DIR`` or ``~/.cache/leanopt/kernels``) keyed by their
source, compiler, flags and CPU, so a machine compiles each (rule, formats, dtypes) combination once
(0.1-0.4 s with gcc). Threads: ``torch.get_num_threads()``, through OpenMP (the process's libgomp,
which torch has already loaded) or, for compilers without OpenMP, POSIX threads. ``step()`` prepares
its updates with :func:`launch` and runs them all in one call (:func:`run_many`). No C compiler: one
warning, then the other executors.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..formats import noise as _noise
from ..formats.quantized import GROUP_SIZE, QuantizedStates, rows_shape
from ..formats.states import StateFormat
from ..formats.weights import WeightFormat
from ..rules.base import Rule

# ---------------------------------------------------------------------------------------------------
# Tracing a fused form into C.


def _lit(x: float) -> str:
    """An fp32 C literal with the exact value of ``x`` rounded to fp32 (as torch does with scalars)."""
    value = torch.tensor(float(x), dtype=torch.float32).item()
    if value != value:
        return "NAN"
    if value in (float("inf"), float("-inf")):
        return "INFINITY" if value > 0 else "(-INFINITY)"
    return f"({value.hex()}f)"


class Program:
    """The C statements of one element's update, in order."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._n = 0

    def tmp(self, code: str, kind: str = "float") -> Expr:
        self._n += 1
        name = f"t{self._n}"
        self.lines.append(f"const {'LO_M' if kind == 'int' else 'LO_F'} {name} = {code};")
        return Expr(name, self, kind)


class Expr:
    """A symbolic fp32 (or boolean) value inside a traced fused form. Supports the tensor operations
    the fused forms use; each one emits one C statement, evaluated where the Python code runs it.

    Statements are written with the ``LO_*`` macros of :data:`_PRELUDE` (``LO_ADD(a, b)``, ``LO_F`` for
    the fp32 type, ...): one element at a time they are plain C operators; :func:`generate` also pastes
    the same statements with ``LV_*`` macros, 16 elements at a time in AVX-512 registers, each macro
    one instruction with the same IEEE rounding."""

    __hash__ = None  # type: ignore[assignment]  # == builds an expression

    def __init__(self, code: str, prog: Program, kind: str = "float", mutable: bool = False) -> None:
        self.code, self.prog, self.kind, self.mutable = code, prog, kind, mutable

    # operands ------------------------------------------------------------------------------------
    def _c(self, other: Any) -> str:
        if isinstance(other, Expr):
            return other.code
        if isinstance(other, bool | int | float):
            return f"LO_K({_lit(other)})"
        raise TypeError(f"leanopt.native: cannot trace operand of type {type(other).__name__}")

    def _bin(self, op: str, other: Any, reverse: bool = False) -> Expr:
        a, b = (self._c(other), self.code) if reverse else (self.code, self._c(other))
        return self.prog.tmp(f"LO_{op}({a}, {b})")

    def _cmp(self, op: str, other: Any) -> Expr:
        return self.prog.tmp(f"LO_{op}({self.code}, {self._c(other)})", "int")

    def __neg__(self):
        return self.prog.tmp(f"LO_NEG({self.code})")

    def abs(self) -> Expr:
        return self.prog.tmp(f"LO_ABS({self.code})")

    def sqrt(self) -> Expr:
        return self.prog.tmp(f"LO_SQRT({self.code})")

    def sign(self) -> Expr:
        return self.prog.tmp(f"LO_SIGN({self.code})")

    def float(self) -> Expr:
        return self

    def clone(self) -> Expr:
        return self

    def copy_(self, other: Any) -> Expr:
        if not self.mutable:
            raise TypeError("leanopt.native: copy_ into a temporary")
        self.prog.lines.append(f"{self.code} = {self._c(other)};")
        return self

    @staticmethod
    def __leanopt_fma__(a: Any, b: Any, c: Any) -> Expr:
        e = next(x for x in (a, b, c) if isinstance(x, Expr))
        return e.prog.tmp(f"LO_FMA({e._c(a)}, {e._c(b)}, {e._c(c)})")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.where:
            cond, a, b = args
            return cond.prog.tmp(f"LO_SEL({cond.code}, {cond._c(a)}, {cond._c(b)})")
        if func in (torch.maximum, torch.minimum) and not kwargs:
            a, b = args
            e = a if isinstance(a, Expr) else b
            return e.prog.tmp(f"LO_{func.__name__[:3].upper()}({e._c(a)}, {e._c(b)})")
        if func is torch.broadcast_tensors:
            return args
        raise TypeError(f"leanopt.native: cannot trace {getattr(func, '__name__', func)}")


def _operators() -> None:
    """Expr's arithmetic (both operand orders) and comparisons, one ``LO_*`` macro each."""

    def binary(op: str, reverse: bool) -> Callable[[Expr, Any], Expr]:
        return lambda self, other: self._bin(op, other, reverse)

    def compare(op: str) -> Callable[[Expr, Any], Expr]:
        return lambda self, other: self._cmp(op, other)

    for name, op in (("add", "ADD"), ("sub", "SUB"), ("mul", "MUL"), ("truediv", "DIV")):
        setattr(Expr, f"__{name}__", binary(op, False))
        setattr(Expr, f"__r{name}__", binary(op, True))
    for name, op in (("lt", "LT"), ("le", "LE"), ("gt", "GT"), ("ge", "GE"), ("eq", "EQ"), ("ne", "NE")):
        setattr(Expr, f"__{name}__", compare(op))


_operators()


class _Scalars:
    """``s[k]`` inside a traced form: the k-th hyper-parameter, read from the kernel's fp32 array."""

    def __init__(self, prog: Program) -> None:
        self.prog = prog

    def __getitem__(self, k: int) -> Expr:
        return Expr(f"s[{int(k)}]", self.prog)


def trace_rule(form: Any, flags: tuple, state_names: tuple[str, ...]) -> list[str]:
    """C statements updating the locals ``p``, ``g`` and ``st_<name>`` with ``form.update``."""
    prog = Program()
    param = Expr("p", prog, mutable=True)
    grad = Expr("g", prog)
    states = {n: Expr(f"st_{_ident(n)}", prog, mutable=True) for n in state_names}
    form.update(param, grad, states, _Scalars(prog), flags)
    return prog.lines


def _ident(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


# ---------------------------------------------------------------------------------------------------
# Formats as C load/store snippets. ``{i}`` is the element index; buffers are named by the caller.


@dataclass(frozen=True)
class WeightCodec:
    """C for one weight format on one parameter dtype: pointer types of (param, *buffers), the load
    of ``p`` from element ``i`` and the store of ``p`` back."""

    ctypes_: tuple[str, ...]
    load: str
    store: str
    random: bool = False  # the store uses ``LO_NOISE``: element i's 16 random bits (stochastic rounding)
    # the same for elements i .. i + 15 in an AVX-512 register ``p`` ("": no vector form)
    vload: str = ""
    vstore: str = ""
    # instead, a full group of 32 at ``base`` in ``PW[2]`` (lv_load_compact2 & co: two-register permutes
    # where the CPU has them, else register by register; "": vload / vstore)
    vload2: str = ""
    vstore2: str = ""


#: 16-bit float storage: dtype -> (C type, widen ``{x}`` to fp32, round fp32 ``{x}`` to nearest even)
HALF_TYPES: dict[torch.dtype, tuple[str, str, str]] = {
    torch.bfloat16: ("uint16_t", "lo_f((uint32_t){x} << 16)", "lo_bf16({x})"),
    torch.float16: ("uint16_t", "lo_h2f({x})", "lo_f2h({x})"),
}
#: the same 16 at a time (AVX-512 helpers): the C suffix of ``lv_load_*`` (16 values at a pointer),
#: ``lv_store_*`` (rounded to nearest) and ``lv_round_*`` (the rounded value, as fp32)
VECTOR_HALF: dict[torch.dtype, str] = {torch.bfloat16: "bf16", torch.float16: "f16"}


def _round_nearest_codec(dtype: torch.dtype) -> WeightCodec:
    """``none``: the 16-bit weight itself, rounded to nearest on every write."""
    ct, widen, narrow = HALF_TYPES[dtype]
    v = VECTOR_HALF[dtype]
    return WeightCodec((ct,), widen.format(x="W0[i]"), f"W0[i] = {narrow.format(x='p')};",
                       vload=f"lv_load_{v}(W0 + i)", vstore=f"lv_store_{v}(W0 + i, p);")  # fmt: skip


def _kahan_codec(dtype: torch.dtype) -> WeightCodec:
    """``kahan``: weight + 16-bit compensation; the rounding error is kept when finite, else 0."""
    ct, widen, narrow = HALF_TYPES[dtype]
    v = VECTOR_HALF[dtype]
    return WeightCodec(
        (ct, ct),
        f"{widen.format(x='W0[i]')} + {widen.format(x='W1[i]')}",
        f"{{ const {ct} h = {narrow.format(x='p')}; const float err = p - {widen.format(x='h')};"
        f" W0[i] = h; W1[i] = {narrow.format(x='fabsf(err) <= FLT_MAX ? err : 0.0f')}; }}",
        vload=f"_mm512_add_ps(lv_load_{v}(W0 + i), lv_load_{v}(W1 + i))",
        vstore=f"{{ const __m512 h = lv_round_{v}(p), err = _mm512_sub_ps(p, h); lv_store_{v}(W0 + i, h);"
        f" lv_store_{v}(W1 + i, _mm512_maskz_mov_ps(LV_LE(_mm512_abs_ps(err), LV_K(FLT_MAX)), err)); }}",
    )


WEIGHT_CODECS: dict[tuple[str, torch.dtype], WeightCodec] = {
    ("exact", torch.bfloat16): WeightCodec(
        ("uint16_t", "int16_t"),
        "lo_f(((uint32_t)W0[i] << 16) + (uint32_t)(int32_t)W1[i])",
        "{ uint32_t b = lo_canon(p); uint32_t hi = (b + 0x8000u) & 0xFFFF0000u;"
        " W0[i] = (uint16_t)(hi >> 16); W1[i] = (int16_t)(uint16_t)(b - hi); }",
        vload2="lv_load_exact2(W0 + base, W1 + base, PW);",
        vstore2="lv_store_exact2(W0 + base, W1 + base, PW);",
    ),
    ("compact", torch.bfloat16): WeightCodec(
        ("uint16_t", "int8_t"),
        "lo_f(((uint32_t)W0[i] << 16) + (uint32_t)((int32_t)W1[i] * 256))",
        "{ uint32_t b = (lo_canon(p) + 0x80u) & 0xFFFFFF00u; uint32_t hi = (b + 0x8000u) & 0xFFFF0000u;"
        " W0[i] = (uint16_t)(hi >> 16); W1[i] = (int8_t)((int32_t)(b - hi) >> 8); }",
        vload2="lv_load_compact2(W0 + base, W1 + base, PW);",
        vstore2="lv_store_compact2(W0 + base, W1 + base, PW);",
    ),
    ("stochastic", torch.bfloat16): WeightCodec(
        ("uint16_t",),
        "lo_f((uint32_t)W0[i] << 16)",
        "W0[i] = (uint16_t)(((lo_canon(p) + (uint32_t)LO_NOISE) & 0xFFFF0000u) >> 16);",
        random=True,
        vload="lv_load_bf16(W0 + i)",
        vstore="lv_st16(W0 + i, _mm512_srli_epi32(_mm512_and_si512(_mm512_add_epi32(lv_canon(p), LV_NOISE),"
        " lv_i((int32_t)0xFFFF0000u)), 16));",
    ),
    # fp16: the weight is the nearest fp16; the int8 residual counts 1/256 of its ULP (formats/compact.py)
    ("compact", torch.float16): WeightCodec(
        ("uint16_t", "int8_t"), "lo_c16_join_b(W0[i], W1[i])", "lo_c16_split_b(p, W0 + i, W1 + i);"
    ),
    ("stochastic", torch.float16): WeightCodec(
        ("uint16_t",), "lo_h2f(W0[i])", "W0[i] = lo_sr16_b(p, LO_NOISE);", random=True
    ),
    **{("none", dt): _round_nearest_codec(dt) for dt in HALF_TYPES},
    **{("kahan", dt): _kahan_codec(dt) for dt in HALF_TYPES},
    ("fp32", torch.float32): WeightCodec(
        ("float",), "W0[i]", "W0[i] = p;", vload="_mm512_loadu_ps(W0 + i)", vstore="_mm512_storeu_ps(W0 + i, p);"
    ),
}

#: gradient dtype -> (C pointer type, load of element i from ``G``, load of elements i .. i + 15)
GRAD_CODECS: dict[torch.dtype, tuple[str, str, str]] = {
    torch.float32: ("float", "G[i]", "_mm512_loadu_ps(G + i)"),
    **{
        dt: (ct, widen.format(x="G[i]"), f"lv_load_{VECTOR_HALF[dt]}(G + i)")
        for dt, (ct, widen, _) in HALF_TYPES.items()
    },
}


@dataclass(frozen=True)
class StateCodec:
    """C for one stored state: ``kind`` is "flat" (elementwise load/store of ``S[i]``) or "q8", "q4p"
    (two 4-bit codes per byte), "q4b" (one 4-bit code per byte) for grouped quantised states."""

    kind: str
    ctype: str = ""
    load: str = ""
    store: str = ""


FLAT_STATE_CODECS: dict[torch.dtype, StateCodec] = {
    torch.float32: StateCodec("flat", "float", "S[i]", "S[i] = v;"),
    torch.bfloat16: StateCodec(
        "flat",
        "uint16_t",
        HALF_TYPES[torch.bfloat16][1].format(x="S[i]"),
        f"S[i] = {HALF_TYPES[torch.bfloat16][2].format(x='v')};",
    ),  # fmt: skip
}


def state_codec(fmt: StateFormat, name: str, stored: dict[str, Tensor], like: Tensor) -> StateCodec | None:
    """The C codec for state ``name`` as ``fmt`` stores it for a tensor shaped like ``like`` (None: no
    native code for this format)."""
    if isinstance(fmt, QuantizedStates):
        rows = rows_shape(like.shape)
        if rows is None:
            return FLAT_STATE_CODECS[torch.float32]
        if not fmt.compand or fmt.scale_dtype != torch.bfloat16:
            return None
        if fmt.bits == 8:
            return StateCodec("q8")
        return StateCodec("q4p" if fmt._packed(rows[-1]) else "q4b")
    if fmt.name in ("fp32", "bf16"):
        return FLAT_STATE_CODECS[torch.float32 if fmt.name == "fp32" else torch.bfloat16]
    return None


#: A gradient checked for NaN/inf while another tensor's update runs (lo_step_side; step_plan's
#: lo_step_all): ``mask`` as lo_all_finite's masks (bit 0: 32-bit values, the rest: the exponent mask)
LO_SIDE_C = r"""
typedef struct { const void *data; int64_t n; uint32_t mask; int bad; int64_t chunk; } lo_side;
/* whether elements [u * chunk, (u + 1) * chunk) of the side tensor (chunk: its elements over the work
   units, rounded up) hold a NaN or inf: their magnitude bits reach the exponent mask; and the elements
   of unit u + 8 prefetched, so that these loads find them in cache. One stream, not lo_finite16/32's
   eight: a unit's range is short (about 128 elements), eighths of it would be 16 */
static int lo_side_range(const lo_side *sd, int64_t u) {
  const int64_t a = u * sd->chunk < sd->n ? u * sd->chunk : sd->n;
  const int64_t b = a + sd->chunk < sd->n ? a + sd->chunk : sd->n;
  const int wide = (int)(sd->mask & 1u);
  const uint32_t mask = sd->mask & ~1u;
  const int64_t ahead = (u + 8) * sd->chunk;
  for (int64_t i = ahead; i < ahead + sd->chunk && i < sd->n; i += 32)
    __builtin_prefetch((const char *)sd->data + (i << (wide ? 2 : 1)), 0, 0);
  if (wide) {
    const uint32_t *x = (const uint32_t *)sd->data; uint32_t m = 0;
    for (int64_t i = a; i < b; i++) { const uint32_t v = x[i] & 0x7FFFFFFFu; m = v > m ? v : m; }
    return m >= mask;
  }
  const uint16_t *x = (const uint16_t *)sd->data; uint16_t m = 0;
  for (int64_t i = a; i < b; i++) { const uint16_t v = (uint16_t)(x[i] & 0x7FFFu); m = v > m ? v : m; }
  return m >= (uint16_t)mask;
}
"""

#: C headers and the fp32 bit casts of the CPU kernels
_C_HEADERS = (
    r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <float.h>
#ifdef _OPENMP
#include <omp.h>
#else
#include <pthread.h>
#endif
#define LO_FN static inline
static inline float lo_f(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
static inline uint32_t lo_u(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }
"""
    + LO_SIDE_C
)

#: Helpers of the traced rules and weight codecs, shared with the CUDA kernels (kernels/gpu.py), where
#: ``LO_FN`` makes them device functions.
SHARED_HELPERS = (
    r"""
/* fp32 bits with NaNs made quiet NaNs of the same sign (as the formats' encode). */
LO_FN uint32_t lo_canon(float f) {
  uint32_t b = lo_u(f); return (f != f) ? ((b & 0x80000000u) | 0x7FC00000u) : b; }
/* fp32 -> bf16, round to nearest even (torch's conversion; NaN -> 0x7FC0). */
LO_FN uint16_t lo_bf16(float f) {
  uint32_t b = lo_u(f); return (f != f) ? (uint16_t)0x7FC0 : (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16); }
LO_FN float lo_sign(float x) { return (float)((0.0f < x) - (x < 0.0f)); }
LO_FN float lo_maximum(float a, float b) { return (a != a) ? a : ((b != b) ? b : (a > b ? a : b)); }
LO_FN float lo_minimum(float a, float b) { return (a != a) ? a : ((b != b) ? b : (a < b ? a : b)); }
"""
    + _noise.C_SOURCE
    + r"""
#define LO_NOISE lo_noise(NK, NB + (uint64_t)i) /* element i's bits, in a weight codec's store */
"""
)

#: fp16 as its bits (uint16_t), on the CPU and on CUDA (NVRTC has no ``_Float16``, and gcc 12 vectorises no
#: loop over ``_Float16`` without AVX512-FP16): IEEE conversions written out (gcc vectorises them), the
#: compact format's residual and stochastic rounding over those bits. tests/test_gpu_kernels.py compares the
#: conversions with torch's and the hardware's on every fp16 value and around every rounding boundary.
F16_BITS = r"""
LO_FN int lo_fin(float x) { return (lo_u(x) & 0x7F800000u) != 0x7F800000u; }
/* fp16 bits -> fp32 (exact; a NaN quiet with its payload, as F16C's vcvtph2ps). Selects, no early
   returns, here and below: gcc vectorises the loops that call them. */
LO_FN float lo_h2f(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  const float sub = (float)m * 5.9604644775390625e-8f;  /* e == 0: m * 2^-24 */
  const uint32_t special = sign | 0x7F800000u | (m << 13) | (m ? 0x00400000u : 0u);  /* e == 31 */
  const uint32_t normal = sign | ((e + 112u) << 23) | (m << 13);
  return e == 0x1Fu ? lo_f(special) : (e == 0u ? (sign ? -sub : sub) : lo_f(normal)); }
/* fp32 -> fp16 bits, rounded to nearest even (overflow to inf; a NaN quiet, its payload's top bits) */
LO_FN uint16_t lo_f2h(float f) {
  const uint32_t x = lo_u(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7FFFFFFFu;
  const uint32_t nan = 0x7E00u | ((ax >> 13) & 0x3FFu);
  const uint32_t r = ax - 0x38000000u;  /* a normal fp16 (>= 2^-14): rebias, round the 13 dropped bits */
  const uint32_t normal = (r + 0xFFFu + ((r >> 13) & 1u)) >> 13;
  const uint32_t sub = (uint32_t)rintf(lo_f(ax < 0x38800000u ? ax : 0u) * 16777216.0f);  /* x * 2^24, exact */
  return (uint16_t)(sign | (ax > 0x7F800000u ? nan : ax >= 0x477FF000u ? 0x7C00u /* >= 65520: inf */
                            : ax >= 0x38800000u ? normal : sub)); }
LO_FN float lo_c16_unit(float w) {
  int e = w == 0.0f ? -14 : (int)((lo_u(w) >> 23) & 0xFFu) - 127; e = e < -14 ? -14 : e;
  return lo_f((uint32_t)(e - 18 + 127) << 23); }
LO_FN float lo_c16_join_b(uint16_t h, int8_t r) {
  const float w = lo_h2f(h); return lo_fin(w) ? w + (float)r * lo_c16_unit(w) : w; }
LO_FN void lo_c16_split_b(float p, uint16_t *h, int8_t *r) {
  const uint16_t w16 = lo_f2h(p); const float w = lo_h2f(w16); const int fin = lo_fin(w) && lo_fin(p);
  float q = rintf((p - w) / lo_c16_unit(fin ? w : 0.0f));
  q = q < -128.0f ? -128.0f : (q > 127.0f ? 127.0f : q);
  *h = w16; *r = (int8_t)(fin ? (int)q : 0); }
/* (selects, no early returns: gcc vectorises loops that call these) */
LO_FN uint16_t lo_next16_b(uint16_t b, float y) {  /* nextafter(x, y), y one of 0, +-inf */
  const float xf = lo_h2f(b);
  const uint16_t step = (uint16_t)((xf < y) == (xf > 0.0f) ? b + 1u : b - 1u);
  const uint16_t from_zero = (uint16_t)(y > 0.0f ? 0x0001u : 0x8001u);
  return xf == y ? lo_f2h(y) : (xf == 0.0f ? from_zero : step); }
LO_FN uint16_t lo_sr16_b(float v, int32_t rb) {
  const uint16_t down = lo_f2h(v);  /* a non-finite v: its own fp16 */
  const uint16_t down_in = lo_next16_b(down, 0.0f);
  const uint16_t tz = fabsf(lo_h2f(down)) > fabsf(v) ? down_in : down;
  const uint16_t away = lo_next16_b(tz, v < 0.0f ? -INFINITY : INFINITY);
  const float lo = lo_h2f(tz), hi = lo_h2f(away), lo_in = lo_h2f(lo_next16_b(tz, 0.0f));
  const float span = !lo_fin(hi) ? fabsf(lo - lo_in) : fabsf(hi - lo);
  const uint16_t r = (float)rb / 65536.0f < fabsf(v - lo) / span ? away : tz;
  return lo_fin(v) ? r : down; }
"""

#: The ``LO_*`` statements of a traced rule, one element at a time (CPU and CUDA).
RULE_MACROS = r"""
#define LO_F float
#define LO_M int
#define LO_K(x) (x)
#define LO_ADD(a, b) ((a) + (b))
#define LO_SUB(a, b) ((a) - (b))
#define LO_MUL(a, b) ((a) * (b))
#define LO_DIV(a, b) ((a) / (b))
#define LO_NEG(a) (-(a))
#define LO_ABS(a) fabsf(a)
#define LO_SQRT(a) sqrtf(a)
#define LO_SIGN(a) lo_sign(a)
#define LO_FMA(a, b, c) fmaf(a, b, c)
#define LO_MAX(a, b) lo_maximum(a, b)
#define LO_MIN(a, b) lo_minimum(a, b)
#define LO_SEL(c, a, b) ((c) ? (a) : (b))
#define LO_LT(a, b) ((a) < (b))
#define LO_LE(a, b) ((a) <= (b))
#define LO_GT(a, b) ((a) > (b))
#define LO_GE(a, b) ((a) >= (b))
#define LO_EQ(a, b) ((a) == (b))
#define LO_NE(a, b) ((a) != (b))
"""

_PRELUDE = _C_HEADERS + SHARED_HELPERS + F16_BITS + RULE_MACROS

#: AVX2 + FMA + F16C (CPUs without AVX-512, e.g. AMD Zen 2/3): every AVX-512 intrinsic the vector code
#: uses, as a macro over a pair of 8-lane registers (lanes 0-7, 8-15) with the same result in each lane;
#: a 16-lane mask is a pair of all-ones/all-zero registers. The vector code itself is unchanged.
_AVX2_SHIM = r"""
#undef LO_SLOW_GATHER  /* the table lookup by register permutes is AVX-512's; AVX2 gathers */
typedef struct { __m256 lo, hi; } lo2_f;
typedef struct { __m256i lo, hi; } lo2_i;
typedef struct { __m256 lo, hi; } lo2_m;
#define __m512 lo2_f
#define __m512i lo2_i
#define __mmask16 lo2_m
static inline int lv_none(lo2_m m) { return _mm256_testz_ps(m.lo, m.lo) & _mm256_testz_ps(m.hi, m.hi); }
static inline lo2_f lo2_set1_ps(float x) { const __m256 v = _mm256_set1_ps(x); return (lo2_f){v, v}; }
static inline lo2_f lo2_setzero_ps(void) { const __m256 v = _mm256_setzero_ps(); return (lo2_f){v, v}; }
static inline lo2_f lo2_loadu_ps(const float *p) { return (lo2_f){_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline void lo2_storeu_ps(float *p, lo2_f a) { _mm256_storeu_ps(p, a.lo); _mm256_storeu_ps(p + 8, a.hi); }
#define LO2_BIN(name, op) \
  static inline lo2_f name(lo2_f a, lo2_f b) { return (lo2_f){op(a.lo, b.lo), op(a.hi, b.hi)}; }
LO2_BIN(lo2_add_ps, _mm256_add_ps)
LO2_BIN(lo2_sub_ps, _mm256_sub_ps)
LO2_BIN(lo2_mul_ps, _mm256_mul_ps)
LO2_BIN(lo2_div_ps, _mm256_div_ps)
LO2_BIN(lo2_min_ps, _mm256_min_ps)
LO2_BIN(lo2_max_ps, _mm256_max_ps)
LO2_BIN(lo2_xor_ps, _mm256_xor_ps)
#define LO2_IBIN(name, op) \
  static inline lo2_i name(lo2_i a, lo2_i b) { return (lo2_i){op(a.lo, b.lo), op(a.hi, b.hi)}; }
LO2_IBIN(lo2_add_epi32, _mm256_add_epi32)
LO2_IBIN(lo2_sub_epi32, _mm256_sub_epi32)
LO2_IBIN(lo2_and_si512, _mm256_and_si256)
LO2_IBIN(lo2_or_si512, _mm256_or_si256)
LO2_IBIN(lo2_max_epu32, _mm256_max_epu32)
LO2_IBIN(lo2_max_epi32, _mm256_max_epi32)
static inline lo2_f lo2_sqrt_ps(lo2_f a) { return (lo2_f){_mm256_sqrt_ps(a.lo), _mm256_sqrt_ps(a.hi)}; }
static inline lo2_f lo2_abs_ps(lo2_f a) {
  const __m256 s = _mm256_set1_ps(-0.0f); return (lo2_f){_mm256_andnot_ps(s, a.lo), _mm256_andnot_ps(s, a.hi)}; }
static inline lo2_f lo2_fmadd_ps(lo2_f a, lo2_f b, lo2_f c) {
  return (lo2_f){_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
static inline lo2_f lo2_mask_blend_ps(lo2_m k, lo2_f a, lo2_f b) {  /* b where k, else a */
  return (lo2_f){_mm256_blendv_ps(a.lo, b.lo, k.lo), _mm256_blendv_ps(a.hi, b.hi, k.hi)}; }
static inline lo2_i lo2_mask_blend_epi32(lo2_m k, lo2_i a, lo2_i b) {
  return (lo2_i){_mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(a.lo), _mm256_castsi256_ps(b.lo), k.lo)),
                 _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(a.hi), _mm256_castsi256_ps(b.hi), k.hi))}; }
static inline lo2_f lo2_mask_mul_ps(lo2_f src, lo2_m k, lo2_f a, lo2_f b) {  /* a * b where k, else src */
  return lo2_mask_blend_ps(k, src, lo2_mul_ps(a, b)); }
static inline lo2_f lo2_maskz_mov_ps(lo2_m k, lo2_f a) {
  return (lo2_f){_mm256_and_ps(k.lo, a.lo), _mm256_and_ps(k.hi, a.hi)}; }
static inline lo2_m lo2_mask_and(lo2_m k, lo2_m m) {
  return (lo2_m){_mm256_and_ps(k.lo, m.lo), _mm256_and_ps(k.hi, m.hi)}; }
#define lo2_cmp_ps_mask(a, b, pred) __extension__({ const lo2_f a_ = (a), b_ = (b); \
  (lo2_m){_mm256_cmp_ps(a_.lo, b_.lo, pred), _mm256_cmp_ps(a_.hi, b_.hi, pred)}; })
#define lo2_mask_cmp_ps_mask(k, a, b, pred) lo2_mask_and((k), lo2_cmp_ps_mask(a, b, pred))
#define lo2_roundscale_ps(a, imm) __extension__({ const lo2_f a_ = (a); \
  (lo2_f){_mm256_round_ps(a_.lo, imm), _mm256_round_ps(a_.hi, imm)}; })
static inline lo2_i lo2_cvtps_epi32(lo2_f a) { return (lo2_i){_mm256_cvtps_epi32(a.lo), _mm256_cvtps_epi32(a.hi)}; }
static inline lo2_i lo2_cvttps_epi32(lo2_f a) { return (lo2_i){_mm256_cvttps_epi32(a.lo), _mm256_cvttps_epi32(a.hi)}; }
static inline lo2_f lo2_cvtepi32_ps(lo2_i a) { return (lo2_f){_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)}; }
static inline lo2_f lo2_castsi512_ps(lo2_i a) { return (lo2_f){_mm256_castsi256_ps(a.lo), _mm256_castsi256_ps(a.hi)}; }
static inline lo2_i lo2_castps_si512(lo2_f a) { return (lo2_i){_mm256_castps_si256(a.lo), _mm256_castps_si256(a.hi)}; }
static inline lo2_i lo2_set1_epi32(int32_t x) { const __m256i v = _mm256_set1_epi32(x); return (lo2_i){v, v}; }
#define lo2_setr_epi32(a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p) \
  ((lo2_i){_mm256_setr_epi32(a, b, c, d, e, f, g, h), _mm256_setr_epi32(i, j, k, l, m, n, o, p)})
#define lo2_slli_epi32(a, imm) __extension__({ const lo2_i a_ = (a); \
  (lo2_i){_mm256_slli_epi32(a_.lo, imm), _mm256_slli_epi32(a_.hi, imm)}; })
#define lo2_srli_epi32(a, imm) __extension__({ const lo2_i a_ = (a); \
  (lo2_i){_mm256_srli_epi32(a_.lo, imm), _mm256_srli_epi32(a_.hi, imm)}; })
#define lo2_srai_epi32(a, imm) __extension__({ const lo2_i a_ = (a); \
  (lo2_i){_mm256_srai_epi32(a_.lo, imm), _mm256_srai_epi32(a_.hi, imm)}; })
static inline lo2_m lo2_test_epi32_mask(lo2_i a, lo2_i b) {  /* (a & b) != 0 */
  const __m256i z = _mm256_setzero_si256(), ones = _mm256_set1_epi32(-1);
  return (lo2_m){_mm256_castsi256_ps(_mm256_xor_si256(_mm256_cmpeq_epi32(_mm256_and_si256(a.lo, b.lo), z), ones)),
                 _mm256_castsi256_ps(_mm256_xor_si256(_mm256_cmpeq_epi32(_mm256_and_si256(a.hi, b.hi), z), ones))}; }
#define lo2_ternarylogic_epi32(a, b, c, imm) lo2_ternary_ea((a), (b), (c), sizeof(char[(imm) == 0xEA ? 1 : -1]))
static inline lo2_i lo2_ternary_ea(lo2_i a, lo2_i b, lo2_i c, size_t only_0xEA) {  /* (a & b) | c */
  (void)only_0xEA;
  return (lo2_i){_mm256_or_si256(_mm256_and_si256(a.lo, b.lo), c.lo),
                 _mm256_or_si256(_mm256_and_si256(a.hi, b.hi), c.hi)}; }
static inline uint32_t lo2_reduce_max_epu32(lo2_i a) {
  __m256i m = _mm256_max_epu32(a.lo, a.hi);
  m = _mm256_max_epu32(m, _mm256_permute2x128_si256(m, m, 1));
  m = _mm256_max_epu32(m, _mm256_shuffle_epi32(m, 0x4E));
  m = _mm256_max_epu32(m, _mm256_shuffle_epi32(m, 0xB1));
  return (uint32_t)_mm256_cvtsi256_si32(m); }
/* a[idx & 15] (permutexvar) and, with bit 4 choosing b, (a|b)[idx & 31] (permutex2var) */
static inline __m256 lo2_perm16(lo2_f a, __m256i idx) {
  const __m256 low = _mm256_permutevar8x32_ps(a.lo, idx), high = _mm256_permutevar8x32_ps(a.hi, idx);
  return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28))); }
static inline lo2_f lo2_permutexvar_ps(lo2_i idx, lo2_f a) {
  return (lo2_f){lo2_perm16(a, idx.lo), lo2_perm16(a, idx.hi)}; }
static inline __m256 lo2_perm32(lo2_f a, lo2_f b, __m256i idx) {
  return _mm256_blendv_ps(lo2_perm16(a, idx), lo2_perm16(b, idx), _mm256_castsi256_ps(_mm256_slli_epi32(idx, 27))); }
static inline lo2_f lo2_permutex2var_ps(lo2_f a, lo2_i idx, lo2_f b) {
  return (lo2_f){lo2_perm32(a, b, idx.lo), lo2_perm32(a, b, idx.hi)}; }
static inline lo2_i lo2_permutex2var_epi32(lo2_i a, lo2_i idx, lo2_i b) {
  return lo2_castps_si512(lo2_permutex2var_ps(lo2_castsi512_ps(a), idx, lo2_castsi512_ps(b))); }
#define lo2_i32gather_ps(idx, base, scale) __extension__({ const lo2_i i_ = (idx); \
  (lo2_f){_mm256_i32gather_ps(base, i_.lo, scale), _mm256_i32gather_ps(base, i_.hi, scale)}; })
/* widening loads (16 bytes / 16 halves -> 16 int32) and truncating narrowing, as AVX-512's */
static inline lo2_i lo2_cvtepi8_epi32(__m128i x) {
  return (lo2_i){_mm256_cvtepi8_epi32(x), _mm256_cvtepi8_epi32(_mm_srli_si128(x, 8))}; }
static inline lo2_i lo2_cvtepu8_epi32(__m128i x) {
  return (lo2_i){_mm256_cvtepu8_epi32(x), _mm256_cvtepu8_epi32(_mm_srli_si128(x, 8))}; }
static inline lo2_i lo2_cvtepi16_epi32(__m256i x) {
  return (lo2_i){_mm256_cvtepi16_epi32(_mm256_castsi256_si128(x)),
                 _mm256_cvtepi16_epi32(_mm256_extracti128_si256(x, 1))}; }
static inline lo2_i lo2_cvtepu16_epi32(__m256i x) {
  return (lo2_i){_mm256_cvtepu16_epi32(_mm256_castsi256_si128(x)),
                 _mm256_cvtepu16_epi32(_mm256_extracti128_si256(x, 1))}; }
static inline __m256i lo2_cvtepi32_epi16(lo2_i v) {  /* the low 16 bits of each lane */
  const __m256i m = _mm256_set1_epi32(0xFFFF);
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(_mm256_and_si256(v.lo, m), _mm256_and_si256(v.hi, m)), 0xD8); }
/* the low bytes of 32 lanes (two registers) in order: masked (the packs then never saturate), two packs,
   and one permute of their 4-byte runs (the packs interleave the 128-bit halves) */
static inline __m256i lo2_bytes32(lo2_i a, lo2_i b) {
  const __m256i m = _mm256_set1_epi32(0xFF);
  const __m256i wa = _mm256_packus_epi32(_mm256_and_si256(a.lo, m), _mm256_and_si256(a.hi, m));
  const __m256i wb = _mm256_packus_epi32(_mm256_and_si256(b.lo, m), _mm256_and_si256(b.hi, m));
  return _mm256_permutevar8x32_epi32(_mm256_packus_epi16(wa, wb), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)); }
static inline __m128i lo2_cvtepi32_epi8(lo2_i v) {  /* the low 8 bits of each lane */
  const __m256i m = _mm256_set1_epi32(0xFF);
  const __m256i w16 = _mm256_packus_epi32(_mm256_and_si256(v.lo, m), _mm256_and_si256(v.hi, m));
  const __m256i w = _mm256_permute4x64_epi64(w16, 0xD8);
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi16(w, w), 0x08)); }
#define lo2_cvtps_ph(a, imm) __extension__({ const lo2_f a_ = (a); \
  _mm256_set_m128i(_mm256_cvtps_ph(a_.hi, imm), _mm256_cvtps_ph(a_.lo, imm)); })
static inline lo2_f lo2_cvtph_ps(__m256i h) {
  return (lo2_f){_mm256_cvtph_ps(_mm256_castsi256_si128(h)), _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1))}; }
#undef _mm512_set1_ps
#define _mm512_set1_ps lo2_set1_ps
#undef _mm512_setzero_ps
#define _mm512_setzero_ps lo2_setzero_ps
#undef _mm512_loadu_ps
#define _mm512_loadu_ps lo2_loadu_ps
#undef _mm512_storeu_ps
#define _mm512_storeu_ps lo2_storeu_ps
#undef _mm512_add_ps
#define _mm512_add_ps lo2_add_ps
#undef _mm512_sub_ps
#define _mm512_sub_ps lo2_sub_ps
#undef _mm512_mul_ps
#define _mm512_mul_ps lo2_mul_ps
#undef _mm512_div_ps
#define _mm512_div_ps lo2_div_ps
#undef _mm512_min_ps
#define _mm512_min_ps lo2_min_ps
#undef _mm512_max_ps
#define _mm512_max_ps lo2_max_ps
#undef _mm512_xor_ps
#define _mm512_xor_ps lo2_xor_ps
#undef _mm512_sqrt_ps
#define _mm512_sqrt_ps lo2_sqrt_ps
#undef _mm512_abs_ps
#define _mm512_abs_ps lo2_abs_ps
#undef _mm512_fmadd_ps
#define _mm512_fmadd_ps lo2_fmadd_ps
#undef _mm512_mask_blend_ps
#define _mm512_mask_blend_ps lo2_mask_blend_ps
#undef _mm512_mask_blend_epi32
#define _mm512_mask_blend_epi32 lo2_mask_blend_epi32
#undef _mm512_mask_mul_ps
#define _mm512_mask_mul_ps lo2_mask_mul_ps
#undef _mm512_maskz_mov_ps
#define _mm512_maskz_mov_ps lo2_maskz_mov_ps
#undef _mm512_cmp_ps_mask
#define _mm512_cmp_ps_mask lo2_cmp_ps_mask
#undef _mm512_mask_cmp_ps_mask
#define _mm512_mask_cmp_ps_mask lo2_mask_cmp_ps_mask
#undef _mm512_roundscale_ps
#define _mm512_roundscale_ps lo2_roundscale_ps
#undef _mm512_cvtps_epi32
#define _mm512_cvtps_epi32 lo2_cvtps_epi32
#undef _mm512_cvttps_epi32
#define _mm512_cvttps_epi32 lo2_cvttps_epi32
#undef _mm512_cvtepi32_ps
#define _mm512_cvtepi32_ps lo2_cvtepi32_ps
#undef _mm512_castsi512_ps
#define _mm512_castsi512_ps lo2_castsi512_ps
#undef _mm512_castps_si512
#define _mm512_castps_si512 lo2_castps_si512
#undef _mm512_set1_epi32
#define _mm512_set1_epi32 lo2_set1_epi32
#undef _mm512_setr_epi32
#define _mm512_setr_epi32 lo2_setr_epi32
#undef _mm512_add_epi32
#define _mm512_add_epi32 lo2_add_epi32
#undef _mm512_sub_epi32
#define _mm512_sub_epi32 lo2_sub_epi32
#undef _mm512_and_si512
#define _mm512_and_si512 lo2_and_si512
#undef _mm512_or_si512
#define _mm512_or_si512 lo2_or_si512
#undef _mm512_max_epu32
#define _mm512_max_epu32 lo2_max_epu32
#undef _mm512_max_epi32
#define _mm512_max_epi32 lo2_max_epi32
#undef _mm512_slli_epi32
#define _mm512_slli_epi32 lo2_slli_epi32
#undef _mm512_srli_epi32
#define _mm512_srli_epi32 lo2_srli_epi32
#undef _mm512_srai_epi32
#define _mm512_srai_epi32 lo2_srai_epi32
#undef _mm512_test_epi32_mask
#define _mm512_test_epi32_mask lo2_test_epi32_mask
#undef _mm512_ternarylogic_epi32
#define _mm512_ternarylogic_epi32 lo2_ternarylogic_epi32
#undef _mm512_reduce_max_epu32
#define _mm512_reduce_max_epu32 lo2_reduce_max_epu32
#undef _mm512_permutexvar_ps
#define _mm512_permutexvar_ps lo2_permutexvar_ps
#undef _mm512_permutex2var_ps
#define _mm512_permutex2var_ps lo2_permutex2var_ps
#undef _mm512_permutex2var_epi32
#define _mm512_permutex2var_epi32 lo2_permutex2var_epi32
#undef _mm512_i32gather_ps
#define _mm512_i32gather_ps lo2_i32gather_ps
#undef _mm512_cvtepi8_epi32
#define _mm512_cvtepi8_epi32 lo2_cvtepi8_epi32
#undef _mm512_cvtepu8_epi32
#define _mm512_cvtepu8_epi32 lo2_cvtepu8_epi32
#undef _mm512_cvtepi16_epi32
#define _mm512_cvtepi16_epi32 lo2_cvtepi16_epi32
#undef _mm512_cvtepu16_epi32
#define _mm512_cvtepu16_epi32 lo2_cvtepu16_epi32
#undef _mm512_cvtepi32_epi16
#define _mm512_cvtepi32_epi16 lo2_cvtepi32_epi16
#undef _mm512_cvtepi32_epi8
#define _mm512_cvtepi32_epi8 lo2_cvtepi32_epi8
#undef _mm512_cvtps_ph
#define _mm512_cvtps_ph lo2_cvtps_ph
#undef _mm512_cvtph_ps
#define _mm512_cvtph_ps lo2_cvtph_ps
"""


#: The same, 16 elements at a time (AVX-512; C comparisons are the ordered/unordered quiet predicates
#: that give the same answers on NaN). Compiled where the compiler targets AVX-512 F/BW/DQ/VL
#: (``-march=native`` on such a CPU), or AVX2 + FMA + F16C (then :data:`_AVX2_SHIM` runs each 16-lane
#: operation as two 8-lane ones, with the same bits), and ``LO_NO_VECTOR`` is not defined.
_VECTOR_PRELUDE = r"""
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__) \
    && !defined(LO_NO_VECTOR)
#define LO_VECTOR 1
#include <immintrin.h>
#define lv_none(m) ((m) == 0)
#if defined(__AVX512VBMI__) && !defined(LO_NO_VBMI)
#define LO_VBMI 1  /* byte permutes: signed codes decoded by byte-wide table lookups (lv_decode_signed) */
#endif
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(LO_NO_VECTOR)
#define LO_VECTOR 1
#define LO_AVX2 1
#include <immintrin.h>
@AVX2_SHIM@
#endif
#ifdef LO_VECTOR
#define LV_F __m512
#define LV_M __mmask16
#define LV_K(x) _mm512_set1_ps(x)
#define LV_ADD(a, b) _mm512_add_ps(a, b)
#define LV_SUB(a, b) _mm512_sub_ps(a, b)
#define LV_MUL(a, b) _mm512_mul_ps(a, b)
#define LV_DIV(a, b) _mm512_div_ps(a, b)
#define LV_NEG(a) _mm512_xor_ps(a, _mm512_set1_ps(-0.0f))
#define LV_ABS(a) _mm512_abs_ps(a)
#define LV_SQRT(a) _mm512_sqrt_ps(a)
#define LV_SIGN(a) lv_sign(a)
#define LV_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define LV_MAX(a, b) lv_maximum(a, b)
#define LV_MIN(a, b) lv_minimum(a, b)
#define LV_SEL(c, a, b) _mm512_mask_blend_ps(c, b, a)
#define LV_USEL(c, a, b) ((c) ? (a) : (b)) /* the same condition for every element */
#define LV_LT(a, b) _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ)
#define LV_LE(a, b) _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ)
#define LV_GT(a, b) _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ)
#define LV_GE(a, b) _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ)
#define LV_EQ(a, b) _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ)
#define LV_NE(a, b) _mm512_cmp_ps_mask(a, b, _CMP_NEQ_UQ)
static inline __m512i lv_i(int32_t x) { return _mm512_set1_epi32(x); }
/* lo_noise of elements i0 .. i0 + 15 */
#ifdef LO_AVX2
static inline __m512i lv_noise(uint64_t key, uint64_t i0) {
  int32_t t[16];
  for (int l = 0; l < 16; l++) t[l] = lo_noise(key, i0 + (uint64_t)l);
  return (lo2_i){_mm256_loadu_si256((const __m256i *)t), _mm256_loadu_si256((const __m256i *)(t + 8))}; }
#else
static inline __m512i lv_mix32(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, lv_i(0x7FEB352D));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, lv_i((int32_t)0x846CA68Bu));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16)); }
static inline __m512i lv_noise(uint64_t key, uint64_t i0) {
  const __m512i first = lv_i((int32_t)(uint32_t)i0);
  const __m512i lo = _mm512_add_epi32(first, _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __mmask16 carry = _mm512_cmplt_epu32_mask(lo, first);  /* lanes past a multiple of 2^32 */
  const __m512i hi = _mm512_mask_add_epi32(lv_i((int32_t)(uint32_t)(i0 >> 32)), carry,
                                           lv_i((int32_t)(uint32_t)(i0 >> 32)), lv_i(1));
  const __m512i h = lv_mix32(_mm512_xor_si512(lo, lv_i((int32_t)(uint32_t)key)));
  return _mm512_srli_epi32(lv_mix32(_mm512_xor_si512(_mm512_xor_si512(h, hi), lv_i((int32_t)(uint32_t)(key >> 32)))),
                           16); }
#endif
#define LV_NOISE lv_noise(NK, NB + (uint64_t)i)
static inline __m512 lv_sign(__m512 x) {  /* lo_sign: 1, -1, or 0 (also for NaN) */
  const __m512 z = _mm512_setzero_ps();
  __m512 r = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, z, _CMP_GT_OQ), z, _mm512_set1_ps(1.0f));
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, z, _CMP_LT_OQ), r, _mm512_set1_ps(-1.0f)); }
/* max_ps/min_ps give (a > b ? a : b) / (a < b ? a : b), b when either is NaN: then a NaN a wins */
static inline __m512 lv_maximum(__m512 a, __m512 b) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), _mm512_max_ps(a, b), a); }
static inline __m512 lv_minimum(__m512 a, __m512 b) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), _mm512_min_ps(a, b), a); }
/* 16 elements of 8/16-bit storage widened to int32, and back (truncating) */
static inline __m512i lv_i8(const void *p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)); }
static inline __m512i lv_u8(const void *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
static inline __m512i lv_i16(const void *p) { return _mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i *)p)); }
static inline __m512i lv_u16(const void *p) { return _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)); }
static inline void lv_st8(void *p, __m512i v) { _mm_storeu_si128((__m128i *)p, _mm512_cvtepi32_epi8(v)); }
static inline void lv_st16(void *p, __m512i v) { _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(v)); }
static inline __m512 lv_f(__m512i b) { return _mm512_castsi512_ps(b); }
static inline __m512i lv_u(__m512 f) { return _mm512_castps_si512(f); }
static inline __m512 lv_widen_bf16(__m512i h) { return lv_f(_mm512_slli_epi32(h, 16)); }
#define LV_F16_ROUND (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
static inline __m512 lv_load_f16(const void *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
static inline void lv_store_f16(void *p, __m512 x) {
  _mm256_storeu_si256((__m256i *)p, _mm512_cvtps_ph(x, LV_F16_ROUND)); }
static inline __m512 lv_round_f16(__m512 x) { return _mm512_cvtph_ps(_mm512_cvtps_ph(x, LV_F16_ROUND)); }
/* lo_canon and lo_bf16, 16 at a time */
static inline __m512i lv_canon(__m512 f) {
  const __m512i b = lv_u(f);
  const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
  if (__builtin_expect(lv_none(nan), 1)) return b;
  return _mm512_mask_blend_epi32(nan, b,
                                 _mm512_or_si512(_mm512_and_si512(b, lv_i((int32_t)0x80000000u)), lv_i(0x7FC00000))); }
/* lv_canon of a group's two registers: one test for a NaN in either */
static inline void lv_canon2(const __m512 *p, __m512i *b) {
  if (__builtin_expect(lv_none(_mm512_cmp_ps_mask(p[0], p[1], _CMP_UNORD_Q)), 1)) {
    b[0] = lv_u(p[0]); b[1] = lv_u(p[1]); return; }
  b[0] = lv_canon(p[0]); b[1] = lv_canon(p[1]); }
static inline __m512i lv_bf16(__m512 f) {
  const __m512i b = lv_u(f);
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, lv_i(0x7FFF)),
                                                       _mm512_and_si512(_mm512_srli_epi32(b, 16), lv_i(1))), 16);
  return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), r, lv_i(0x7FC0)); }
static inline __m512 lv_load_bf16(const void *p) { return lv_widen_bf16(lv_u16(p)); }
static inline void lv_store_bf16(void *p, __m512 x) { lv_st16(p, lv_bf16(x)); }
static inline __m512 lv_round_bf16(__m512 x) { return lv_widen_bf16(lv_bf16(x)); }
/* A full group (two registers of 16 at p, p + 16) of weights and bf16 gradients as vload/vstore and
   lv_load_bf16 give them register by register, the same bits: with AVX-512 both registers' bytes go
   between the stored planes and the fp32 words by two-register permutes (16-bit; the compact format's
   bytes need VBMI's byte permutes; the orders: _pair_orders in native.py). LO_NO_PAIRS: register by
   register always. */
#if !defined(LO_AVX2) && !defined(LO_NO_PAIRS)
#define LO_PAIRS 1
@TABLES@
#endif
#if defined(LO_PAIRS) && defined(LO_VBMI)
/* compact: bits = (W0 << 16) + W1 * 256 = ((W0 << 16) | (W1 ^ 0x80) << 8) - 0x8000 */
static inline void lv_load_compact2(const uint16_t *w0, const int8_t *w1, __m512 *p) {
  const __m512i hi = _mm512_loadu_si512(w0);
  const __m512i lo = _mm512_castsi256_si512(_mm256_xor_si256(_mm256_loadu_si256((const __m256i *)w1),
                                                             _mm256_set1_epi8((char)0x80)));
  for (int h = 0; h < 2; h++)
    p[h] = lv_f(_mm512_sub_epi32(_mm512_maskz_permutex2var_epi8(0xEEEEEEEEEEEEEEEEull, hi,
                                     _mm512_loadu_si512(lv_compact2_order[h]), lo), lv_i(0x8000))); }
/* t = canon(p) + 0x80: W0 = word 1 of t + 0x8000, W1 = byte 1 of t (the bits vstore keeps) */
static inline void lv_store_compact2(uint16_t *w0, int8_t *w1, const __m512 *p) {
  __m512i b[2]; lv_canon2(p, b);
  const __m512i t0 = _mm512_add_epi32(b[0], lv_i(0x80)), t1 = _mm512_add_epi32(b[1], lv_i(0x80));
  const __m512i u0 = _mm512_add_epi32(t0, lv_i(0x8000)), u1 = _mm512_add_epi32(t1, lv_i(0x8000));
  _mm512_storeu_si512(w0, _mm512_permutex2var_epi16(u0, _mm512_loadu_si512(lv_word1_order), u1));
  _mm256_storeu_si256((__m256i *)w1,
                      _mm512_castsi512_si256(_mm512_permutex2var_epi8(t0, _mm512_loadu_si512(lv_byte1_order), t1))); }
#else
#ifdef LO_AVX2
/* AVX2: bits = ((W0 << 16) | (W1 ^ 0x80) << 8) - 0x8000 as the pairs version, by unpacks: words (W1 ^ 0x80)
   << 8 from byte unpacks with zero, dwords from word unpacks with W0; each unpack's inputs first
   64-bit-permuted (0xD8) so that its in-lane halves come out in the elements' order */
static inline void lv_load_compact2(const uint16_t *w0, const int8_t *w1, __m512 *p) {
  const __m256i z = _mm256_setzero_si256(), bias = _mm256_set1_epi32(0x8000);
  const __m256i c = _mm256_permute4x64_epi64(_mm256_xor_si256(_mm256_loadu_si256((const __m256i *)w1),
                                                              _mm256_set1_epi8((char)0x80)), 0xD8);
  const __m256i lo[2] = {_mm256_unpacklo_epi8(z, c), _mm256_unpackhi_epi8(z, c)};  /* elements 0-15, 16-31 */
  for (int h = 0; h < 2; h++) {
    const __m256i v = _mm256_permute4x64_epi64(lo[h], 0xD8);
    const __m256i w = _mm256_permute4x64_epi64(_mm256_loadu_si256((const __m256i *)(w0 + 16 * h)), 0xD8);
    p[h] = lv_f((lo2_i){_mm256_sub_epi32(_mm256_unpacklo_epi16(v, w), bias),
                        _mm256_sub_epi32(_mm256_unpackhi_epi16(v, w), bias)}); } }
#else
static inline void lv_load_compact2(const uint16_t *w0, const int8_t *w1, __m512 *p) {
  for (int h = 0; h < 2; h++)
    p[h] = lv_f(_mm512_add_epi32(_mm512_slli_epi32(lv_u16(w0 + 16 * h), 16),
                                 _mm512_slli_epi32(lv_i8(w1 + 16 * h), 8))); }
#endif
#ifdef LO_AVX2
/* AVX2: as the pairs version, t = canon(p) + 0x80, W0 = word 1 of t + 0x8000, W1 = byte 1 of t, for the
   group's 32 elements at once: (t + 0x8000) >> 16 and (t >> 8) & 0xFF packed without saturation
   (values fit), then 64-bit (words) or 32-bit (bytes) permutes back into order across the halves */
static inline void lv_store_compact2(uint16_t *w0, int8_t *w1, const __m512 *p) {
  __m512i b[2]; lv_canon2(p, b);
  const __m256i half[4] = {b[0].lo, b[0].hi, b[1].lo, b[1].hi};  /* elements 0-7, 8-15, 16-23, 24-31 */
  __m256i t[4], u[4], d[4];
  for (int k = 0; k < 4; k++) {
    t[k] = _mm256_add_epi32(half[k], _mm256_set1_epi32(0x80));
    u[k] = _mm256_srli_epi32(_mm256_add_epi32(t[k], _mm256_set1_epi32(0x8000)), 16);
    d[k] = _mm256_and_si256(_mm256_srli_epi32(t[k], 8), _mm256_set1_epi32(0xFF)); }
  _mm256_storeu_si256((__m256i *)w0, _mm256_permute4x64_epi64(_mm256_packus_epi32(u[0], u[1]), 0xD8));
  _mm256_storeu_si256((__m256i *)(w0 + 16), _mm256_permute4x64_epi64(_mm256_packus_epi32(u[2], u[3]), 0xD8));
  const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(d[0], d[1]), _mm256_packus_epi32(d[2], d[3]));
  _mm256_storeu_si256((__m256i *)w1, _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))); }
#else
static inline void lv_store_compact2(uint16_t *w0, int8_t *w1, const __m512 *p) {
  for (int h = 0; h < 2; h++) {
    const __m512i b = _mm512_and_si512(_mm512_add_epi32(lv_canon(p[h]), lv_i(0x80)), lv_i((int32_t)0xFFFFFF00u)),
                  hi = _mm512_and_si512(_mm512_add_epi32(b, lv_i(0x8000)), lv_i((int32_t)0xFFFF0000u));
    lv_st16(w0 + 16 * h, _mm512_srli_epi32(hi, 16));
    lv_st8(w1 + 16 * h, _mm512_srai_epi32(_mm512_sub_epi32(b, hi), 8)); } }
#endif
#endif
#ifdef LO_PAIRS
/* exact: bits = (W0 << 16) + W1 = ((W0 << 16) | (W1 ^ 0x8000)) - 0x8000 */
static inline void lv_load_exact2(const uint16_t *w0, const int16_t *w1, __m512 *p) {
  const __m512i hi = _mm512_loadu_si512(w0);
  const __m512i lo = _mm512_xor_si512(_mm512_loadu_si512(w1), _mm512_set1_epi16((short)0x8000));
  for (int h = 0; h < 2; h++)
    p[h] = lv_f(_mm512_sub_epi32(_mm512_permutex2var_epi16(lo, _mm512_loadu_si512(lv_exact2_order[h]), hi),
                                 lv_i(0x8000))); }
/* b = canon(p): W0 = word 1 of b + 0x8000, W1 = word 0 of b */
static inline void lv_store_exact2(uint16_t *w0, int16_t *w1, const __m512 *p) {
  __m512i b[2]; lv_canon2(p, b);
  const __m512i u0 = _mm512_add_epi32(b[0], lv_i(0x8000)), u1 = _mm512_add_epi32(b[1], lv_i(0x8000));
  _mm512_storeu_si512(w0, _mm512_permutex2var_epi16(u0, _mm512_loadu_si512(lv_word1_order), u1));
  _mm512_storeu_si512(w1, _mm512_permutex2var_epi16(b[0], _mm512_loadu_si512(lv_word0_order), b[1])); }
/* 32 codes (two registers of int32) less ``offset`` as bytes at p, truncated as lv_st8 stores them */
static inline void lv_st8x2(void *p, __m512i c0, __m512i c1, int offset) {
#ifdef LO_VBMI
  const __m512i b = _mm512_permutex2var_epi8(c0, _mm512_loadu_si512(lv_byte0_order), c1);
  _mm256_storeu_si256((__m256i *)p, _mm256_sub_epi8(_mm512_castsi512_si256(b), _mm256_set1_epi8((char)offset)));
#else
  lv_st8(p, _mm512_sub_epi32(c0, lv_i(offset))); lv_st8((int8_t *)p + 16, _mm512_sub_epi32(c1, lv_i(offset)));
#endif
}
/* bf16: each word to the top of its element's dword */
static inline void lv_load_bf16x2(const uint16_t *p, __m512 *g) {
  const __m512i x = _mm512_loadu_si512(p);
  for (int h = 0; h < 2; h++)
    g[h] = lv_f(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, _mm512_loadu_si512(lv_top_order[h]), x)); }
#else
static inline void lv_load_exact2(const uint16_t *w0, const int16_t *w1, __m512 *p) {
  for (int h = 0; h < 2; h++)
    p[h] = lv_f(_mm512_add_epi32(_mm512_slli_epi32(lv_u16(w0 + 16 * h), 16), lv_i16(w1 + 16 * h))); }
static inline void lv_store_exact2(uint16_t *w0, int16_t *w1, const __m512 *p) {
  for (int h = 0; h < 2; h++) {
    const __m512i b = lv_canon(p[h]);
    const __m512i hi = _mm512_and_si512(_mm512_add_epi32(b, lv_i(0x8000)), lv_i((int32_t)0xFFFF0000u));
    lv_st16(w0 + 16 * h, _mm512_srli_epi32(hi, 16)); lv_st16(w1 + 16 * h, _mm512_sub_epi32(b, hi)); } }
static inline void lv_load_bf16x2(const uint16_t *p, __m512 *g) {
  for (int h = 0; h < 2; h++) g[h] = lv_load_bf16(p + 16 * h); }
static inline void lv_st8x2(void *p, __m512i c0, __m512i c1, int offset) {
#ifdef LO_AVX2  /* the 32 low bytes at once, less offset as bytes (the same low bytes) */
  _mm256_storeu_si256((__m256i *)p, _mm256_sub_epi8(lo2_bytes32(c0, c1), _mm256_set1_epi8((char)offset)));
#else
  lv_st8(p, _mm512_sub_epi32(c0, lv_i(offset))); lv_st8((int8_t *)p + 16, _mm512_sub_epi32(c1, lv_i(offset)));
#endif
}
#endif
#ifdef LO_AVX2
/* the signed table's entry of code c, computed as the table is (y = c / q, y / (2 - |y|)): the same
   bits. AVX2 builds use it instead of a gather (two divisions per 8 lanes; faster on AMD Zen 4 with an
   AVX2 build; -DLO_AVX2_GATHER gathers instead) */
static inline __m512 lv_signed_value(__m512i c, float q) {
  const __m512 y = _mm512_div_ps(_mm512_cvtepi32_ps(c), _mm512_set1_ps(q));
  return _mm512_div_ps(y, _mm512_sub_ps(_mm512_set1_ps(2.0f), _mm512_abs_ps(y))); }
#endif
/* table[idx] (idx in 0..255) for 16 elements: a gather, or, where gathers are slow (CPUs with the
   microcode mitigation of Gather Data Sampling: LO_SLOW_GATHER), 8 two-register permutes of the table
   held in registers (tv) and a blend tree on the index bits. */
static inline __m512 lv_lookup256(const float *t, const __m512 *tv, __m512i idx) {
#ifdef LO_SLOW_GATHER
  __m512 r[8];
  (void)t;
  for (int k = 0; k < 8; k++) r[k] = _mm512_permutex2var_ps(tv[2 * k], idx, tv[2 * k + 1]);
  const __mmask16 b5 = _mm512_test_epi32_mask(idx, lv_i(32)), b6 = _mm512_test_epi32_mask(idx, lv_i(64)),
                  b7 = _mm512_test_epi32_mask(idx, lv_i(128));
  for (int k = 0; k < 4; k++) r[k] = _mm512_mask_blend_ps(b5, r[2 * k], r[2 * k + 1]);
  for (int k = 0; k < 2; k++) r[k] = _mm512_mask_blend_ps(b6, r[2 * k], r[2 * k + 1]);
  return _mm512_mask_blend_ps(b7, r[0], r[1]);
#else
  (void)tv;
  return _mm512_i32gather_ps(idx, t, 4);
#endif
}
#ifdef LO_VBMI
/* ``count`` signed codes at p -> out[0, count rounded up to 64): the table's entry for
   each code, as lv_lookup256 gives it, 64 codes at a time without a gather. The four bytes of the
   entries for |code| (tb: per byte plane, the entries of codes 0-63 and 64-127) are looked up by four
   byte permutes, a negative code flips the sign bit in the top byte (the table is odd: entry -c is
   -(entry c), bit for bit, as (-c) / Q = -(c / Q) exactly; +0 at 0), and code -128, which has no
   opposite, takes its own entry's bytes (m128). Two unpacks (bytes -> 16-bit -> 32-bit) turn the byte planes into
   floats in the order the codes were first permuted into (``order``: each 4-code run to where the
   unpacks take it from), which is the codes' own order. */
static const uint8_t lv_unpack_order[64] = {  /* byte 16k + 4a + j takes code 16a + 4k + j */
  0, 1, 2, 3, 16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51, 4, 5, 6, 7, 20, 21, 22, 23, 36, 37, 38, 39,
  52, 53, 54, 55, 8, 9, 10, 11, 24, 25, 26, 27, 40, 41, 42, 43, 56, 57, 58, 59, 12, 13, 14, 15, 28, 29, 30, 31,
  44, 45, 46, 47, 60, 61, 62, 63};
static inline void lv_decode_signed(const int8_t *p, int64_t count, const __m512i *tb, const uint8_t *m128,
                                    float *out) {
  const __m512i order = _mm512_loadu_si512(lv_unpack_order);  /* (no _mm512_set_epi8 before gcc 9) */
  for (int64_t k = 0; k < count; k += 64) {
    const __mmask64 live = count - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (count - k)) - 1);
    const __m512i c = _mm512_permutexvar_epi8(order, _mm512_maskz_loadu_epi8(live, p + k));
    const __m512i a = _mm512_abs_epi8(c);  /* -128 stays 0x80: entry 0 here, replaced below */
    const __mmask64 low = _mm512_cmpeq_epi8_mask(c, _mm512_set1_epi8(-128));
    __m512i b[4];
    for (int j = 0; j < 4; j++) b[j] = _mm512_permutex2var_epi8(tb[2 * j], a, tb[2 * j + 1]);
    b[3] = _mm512_ternarylogic_epi32(b[3], c, _mm512_set1_epi8((char)0x80), 0x78);  /* b3 ^ (c & 0x80) */
    for (int j = 0; j < 4; j++) b[j] = _mm512_mask_mov_epi8(b[j], low, _mm512_set1_epi8((char)m128[j]));
    const __m512i w0 = _mm512_unpacklo_epi8(b[0], b[1]), w1 = _mm512_unpackhi_epi8(b[0], b[1]);
    const __m512i w2 = _mm512_unpacklo_epi8(b[2], b[3]), w3 = _mm512_unpackhi_epi8(b[2], b[3]);
    _mm512_storeu_si512(out + k, _mm512_unpacklo_epi16(w0, w2));
    _mm512_storeu_si512(out + k + 16, _mm512_unpackhi_epi16(w0, w2));
    _mm512_storeu_si512(out + k + 32, _mm512_unpacklo_epi16(w1, w3));
    _mm512_storeu_si512(out + k + 48, _mm512_unpackhi_epi16(w1, w3));
  }
}
/* tb and m128 of lv_decode_signed from the table of all 256 codes (t[c + 128]) */
static inline void lv_byte_table(const float *t, __m512i *tb, uint8_t *m128) {
  uint8_t planes[4][128];
  for (int e = 0; e < 128; e++) {
    const uint32_t u = lo_u(t[128 + e]);
    for (int j = 0; j < 4; j++) planes[j][e] = (uint8_t)(u >> (8 * j));
  }
  for (int j = 0; j < 4; j++) {
    tb[2 * j] = _mm512_loadu_si512(planes[j]); tb[2 * j + 1] = _mm512_loadu_si512(planes[j] + 64);
    m128[j] = (uint8_t)(lo_u(t[0]) >> (8 * j));
  }
}
#endif
/* One group of 32 (two vectors) of a quantised state, as the scalar code does it element by element.
   The group's largest |x| (bits: NaN above inf; NaN where it is not > 0: no element is the top then),
   its bf16 scale and the scale's reciprocal. */
static inline uint16_t lv_scale(const __m512 *a, __m512 *inv, __m512 *top) {
  const __m512i m = lv_i(0x7FFFFFFF);
  const float t = lo_f(_mm512_reduce_max_epu32(_mm512_max_epu32(_mm512_and_si512(lv_u(a[0]), m),
                                                                 _mm512_and_si512(lv_u(a[1]), m))));
  const uint16_t sb = lo_bf16(t); const float s32 = lo_f((uint32_t)sb << 16);
  *inv = _mm512_set1_ps(1.0f / (s32 > 0.0f ? s32 : 1.0f)); *top = _mm512_set1_ps(t > 0.0f ? t : NAN);
  return sb; }
#ifdef LO_AVX2
/* lv_scales4's reduction: each group's largest partial maximum (pm[g]) in lanes 4g..4g+3. AVX2: by 128-bit
   lane swaps and in-lane shuffles, not the shim's emulated cross-register permutes (the same maxima) */
static inline __m512i lv_max4(const __m512i *pm) {
  __m256i h[2];
  for (int k = 0; k < 2; k++) {  /* groups 2k (lanes 0-3 of h[k]) and 2k + 1 (lanes 4-7) */
    const __m256i a = _mm256_max_epu32(pm[2 * k].lo, pm[2 * k].hi), b = _mm256_max_epu32(pm[2 * k + 1].lo,
                                                                                          pm[2 * k + 1].hi);
    __m256i x = _mm256_max_epu32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
    x = _mm256_max_epu32(x, _mm256_shuffle_epi32(x, 0x4E));
    h[k] = _mm256_max_epu32(x, _mm256_shuffle_epi32(x, 0xB1));
  }
  return (lo2_i){h[0], h[1]}; }
#else
static inline __m512i lv_max4(const __m512i *pm) {
  /* by 128-bit lanes: ab = max([pm0.0, pm0.1, pm1.0, pm1.1], [pm0.2, pm0.3, pm1.2, pm1.3]) holds 8 partial
     maxima of group 0 (lanes 0-1), 8 of group 1 (lanes 2-3); cd those of groups 2 and 3; then lane k group
     k's 4, and its maximum in each of them by two in-lane swaps (shuffles with immediates: no index
     registers, shorter latency than cross-lane permutes) */
  const __m512i ab = _mm512_max_epu32(_mm512_shuffle_i32x4(pm[0], pm[1], 0x44),
                                      _mm512_shuffle_i32x4(pm[0], pm[1], 0xEE));
  const __m512i cd = _mm512_max_epu32(_mm512_shuffle_i32x4(pm[2], pm[3], 0x44),
                                      _mm512_shuffle_i32x4(pm[2], pm[3], 0xEE));
  const __m512i m = _mm512_max_epu32(_mm512_shuffle_i32x4(ab, cd, 0x88), _mm512_shuffle_i32x4(ab, cd, 0xDD));
  const __m512i m2 = _mm512_max_epu32(m, _mm512_shuffle_epi32(m, 0xB1));
  return _mm512_max_epu32(m2, _mm512_shuffle_epi32(m2, 0x4E)); }
#endif
/* The scales of 4 groups at once (no reduction to a scalar): pm[g] holds group g's 16 partial maxima
   (bits of magnitudes: values >= 0 order like their bits, NaN above inf). Lanes 4g..4g+3 of *top get
   group g's largest magnitude (NaN where it is not > 0), of *inv the reciprocal of its bf16 scale (1
   where the scale is not > 0), sb[g] its bf16 scale: what lv_scale gives for each group, bit for bit. */
static inline void lv_scales4(const __m512i *pm, __m512 *top, __m512 *inv, uint16_t *sb) {
  const __m512 t = lv_f(lv_max4(pm)), one = _mm512_set1_ps(1.0f);
  const __m512i b = lv_bf16(t);
  const __m512 s32 = lv_widen_bf16(b);
  *top = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(t, _mm512_setzero_ps(), _CMP_GT_OQ), _mm512_set1_ps(NAN), t);
  *inv = _mm512_div_ps(one, _mm512_mask_blend_ps(_mm512_cmp_ps_mask(s32, _mm512_setzero_ps(), _CMP_GT_OQ), one, s32));
  float lanes[16];
  _mm512_storeu_ps(lanes, lv_f(b));
  for (int g = 0; g < 4; g++) sb[g] = (uint16_t)lo_u(lanes[4 * g]); }
/* group g's (top, inv) of lv_scales4 in every lane */
static inline void lv_group(__m512 top4, __m512 inv4, int g, __m512 *top, __m512 *inv) {
#ifdef LO_AVX2  /* one 8-lane permute each, for both halves */
  const __m256i at = _mm256_set1_epi32(4 * (g & 1));
  const __m256 t = _mm256_permutevar8x32_ps(g < 2 ? top4.lo : top4.hi, at);
  const __m256 i = _mm256_permutevar8x32_ps(g < 2 ? inv4.lo : inv4.hi, at);
  *top = (lo2_f){t, t}; *inv = (lo2_f){i, i};
#else
  const __m512i at = _mm512_set1_epi32(4 * g);
  *top = _mm512_permutexvar_ps(at, top4); *inv = _mm512_permutexvar_ps(at, inv4);
#endif
}
/* one group's 16 partial maxima of lv_scales4 */
static inline __m512i lv_partial_max(const __m512 *a) {
  const __m512i m = lv_i(0x7FFFFFFF);
  return _mm512_max_epu32(_mm512_and_si512(lv_u(a[0]), m), _mm512_and_si512(lv_u(a[1]), m)); }
/* signed (momentum): code = rint(q * y), y = 2x / (1 + |x|), x = clamp(a / scale, -1, 1) (+-1 at the top).
   Computed on |a| with a's sign put back before the rounding: every step is odd (rint too, halves going
   to even), so the codes are the same bit for bit (a NaN gives INT_MIN either way); and 2x / d * q as
   x / d * 2q (scaling by 2 is exact). */
static inline void lv_codes_signed(const __m512 *a, __m512 inv, __m512 top, float q, __m512i *code) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int h = 0; h < 2; h++) {
    /* x = 1 in lanes equal to the group's top (NaN where the group has none), else min(1, |a| * inv): NaN
       stays NaN (!= is true for it, min returns its second operand then) */
    const __m512 m = _mm512_abs_ps(a[h]);
    const __m512 x = _mm512_min_ps(one, _mm512_mask_mul_ps(one, _mm512_cmp_ps_mask(m, top, _CMP_NEQ_UQ), m, inv));
    const __m512 y = _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, x)), _mm512_set1_ps(2.0f * q));
    const __m512i sign = lv_i((int32_t)0x80000000u);  /* (a & sign) | y: */
    code[h] = _mm512_cvtps_epi32(lv_f(_mm512_ternarylogic_epi32(lv_u(a[h]), sign, lv_u(y), 0xEA)));
  } }
static inline uint16_t lv_encode_signed(const __m512 *a, float q, __m512i *code) {
  __m512 inv, top; const uint16_t sb = lv_scale(a, &inv, &top);
  lv_codes_signed(a, inv, top, q, code);
  return sb; }
/* unsigned (second moment, by its square root r): code = max(rint(levels * min(r / scale, 1)) - 1, 0);
   the rounding to an integer in one conversion, max(c, 1) - 1 on integers (a NaN: INT_MIN -> 0, as
   max(NaN - 1, 0) truncated gave). ``invl`` is levels / scale (1 / scale times levels, a power of two:
   exact, as 1 / scale <= 2^75: r, a square root of a float, is 0 or >= 2^-74.5), and levels * min(r *
   (1 / scale), 1) = min(r * invl, levels) bit for bit: scaling by a power of two commutes with the
   rounding of r * (1 / scale) unless that is below 2^-126, where both give code 0. */
static inline void lv_codes_unsigned(const __m512 *r, __m512 invl, __m512 top, float levels, __m512i *code) {
  const __m512 l = _mm512_set1_ps(levels);
  for (int h = 0; h < 2; h++) {  /* the top's lanes: levels (as in lv_codes_signed) */
    const __m512 x = _mm512_min_ps(l, _mm512_mask_mul_ps(l, _mm512_cmp_ps_mask(r[h], top, _CMP_NEQ_UQ), r[h], invl));
    code[h] = _mm512_sub_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(x), lv_i(1)), lv_i(1));
  } }
static inline uint16_t lv_encode_unsigned(const __m512 *r, float levels, __m512i *code) {
  __m512 inv, top; const uint16_t sb = lv_scale(r, &inv, &top);
  lv_codes_unsigned(r, _mm512_mul_ps(inv, _mm512_set1_ps(levels)), top, levels, code);
  return sb; }
/* unsigned decode: ((code + 1) / levels * scale)^2 of code + 1 = the stored code + ``add``: (code + 1) /
   levels is exact (an integer <= levels over a power of two), so one fma of the stored code gives it */
static inline __m512 lv_decode_unsigned(__m512i stored, float add, float inv_levels, __m512 scale) {
  const __m512 u = _mm512_mul_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(stored), _mm512_set1_ps(inv_levels),
                                                 _mm512_set1_ps(add * inv_levels)), scale);
  return _mm512_mul_ps(u, u); }
/* 16 bytes of two 4-bit codes each (low nibble first) <-> 32 codes in two vectors */
#ifdef LO_AVX2
/* byte shuffles instead of the shim's emulated cross-register permutes: the same codes */
static inline void lv_unpack_nibbles(const uint8_t *p, __m512i *code) {
  const __m128i b = _mm_loadu_si128((const __m128i *)p), m = _mm_set1_epi8(15);
  const __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
  const __m128i c0 = _mm_unpacklo_epi8(lo, hi), c1 = _mm_unpackhi_epi8(lo, hi);  /* codes 0-15, 16-31 */
  code[0] = (lo2_i){_mm256_cvtepu8_epi32(c0), _mm256_cvtepu8_epi32(_mm_srli_si128(c0, 8))};
  code[1] = (lo2_i){_mm256_cvtepu8_epi32(c1), _mm256_cvtepu8_epi32(_mm_srli_si128(c1, 8))}; }
static inline void lv_pack_nibbles(uint8_t *p, __m512i n0, __m512i n1) {
  /* (even | odd << 4) truncated to 8 bits, as below: from the 32 codes' low bytes, as 16-bit pairs */
  const __m256i x = lo2_bytes32(n0, n1);
  const __m256i w = _mm256_or_si256(_mm256_and_si256(x, _mm256_set1_epi16(0x00FF)),
                                    _mm256_and_si256(_mm256_srli_epi16(x, 4), _mm256_set1_epi16(0x00F0)));
  _mm_storeu_si128((__m128i *)p, _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1))); }
#else
static inline void lv_unpack_nibbles(const uint8_t *p, __m512i *code) {
  const __m512i b = lv_u8(p), lo = _mm512_and_si512(b, lv_i(15)), hi = _mm512_srli_epi32(b, 4);
  code[0] = _mm512_permutex2var_epi32(lo, _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19,
                                                             4, 20, 5, 21, 6, 22, 7, 23), hi);
  code[1] = _mm512_permutex2var_epi32(lo, _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27,
                                                             12, 28, 13, 29, 14, 30, 15, 31), hi); }
static inline void lv_pack_nibbles(uint8_t *p, __m512i n0, __m512i n1) {
  const __m512i even = _mm512_permutex2var_epi32(n0, _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14,
                                                                        16, 18, 20, 22, 24, 26, 28, 30), n1);
  const __m512i odd = _mm512_permutex2var_epi32(n0, _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15,
                                                                       17, 19, 21, 23, 25, 27, 29, 31), n1);
  lv_st8(p, _mm512_or_si512(even, _mm512_slli_epi32(odd, 4))); }
#endif
#endif
"""


def _pair_orders() -> str:
    """C tables of the permutes of lv_load_compact2 & co: for the byte permute of two registers (a, b)
    index 64 + k is b's byte k; for the 16-bit one, 32 + k is b's word k."""

    def table(name: str, ctype: str, rows: list[list[int]]) -> str:
        body = ", ".join("{" + ", ".join(map(str, r)) + "}" for r in rows)
        dims = f"[{len(rows)}][{len(rows[0])}]" if len(rows) > 1 else f"[{len(rows[0])}]"
        init = body if len(rows) == 1 else "{" + body + "}"
        return f"static const {ctype} {name}{dims} __attribute__((aligned(64))) = {init};"

    # register h's dword k is element e = 16h + k of the group
    # compact: [0 (masked), W1 byte e, W0 bytes 2e, 2e + 1] from (a = W0, b = W1 ^ 0x80)
    compact = [[v for k in range(16) for v in (0, 64 + 16 * h + k, 2 * (16 * h + k), 2 * (16 * h + k) + 1)]
               for h in range(2)]  # fmt: skip
    # exact: [W1 ^ 0x8000 word e, W0 word e] from (a = W1 ^ 0x8000, b = W0)
    exact = [[v for k in range(16) for v in (16 * h + k, 32 + 16 * h + k)] for h in range(2)]
    # word / byte j of the stored planes from element j's dword in (a, b) = elements (0-15, 16-31)
    word1 = [2 * j + 1 if j < 16 else 32 + 2 * (j - 16) + 1 for j in range(32)]
    word0 = [2 * j if j < 16 else 32 + 2 * (j - 16) for j in range(32)]
    byte1 = [4 * j + 1 if j < 16 else 64 + 4 * (j - 16) + 1 for j in range(32)] + [0] * 32
    byte0 = [4 * j if j < 16 else 64 + 4 * (j - 16) for j in range(32)] + [0] * 32
    # bf16 gradients: word 2k + 1 of register h is word 16h + k (word 2k zeroed by the mask)
    top = [[v for k in range(16) for v in (0, 16 * h + k)] for h in range(2)]
    return "\n".join([
        table("lv_compact2_order", "uint8_t", compact), table("lv_exact2_order", "uint16_t", exact),
        table("lv_word1_order", "uint16_t", [word1]), table("lv_word0_order", "uint16_t", [word0]),
        table("lv_byte1_order", "uint8_t", [byte1]),
        table("lv_byte0_order", "uint8_t", [byte0]),
        table("lv_top_order", "uint16_t", top),
    ])  # fmt: skip


_VECTOR_PRELUDE = _VECTOR_PRELUDE.replace("@AVX2_SHIM@", _AVX2_SHIM).replace("@TABLES@", _pair_orders())


@dataclass(frozen=True)
class KernelSpec:
    """Everything that decides a kernel's code."""

    form: str  # the fused form's class name and structural flags, for the cache key
    body: tuple[str, ...]  # traced rule statements
    weight: WeightCodec
    grad: tuple[str, str]
    states: tuple[tuple[str, bool, StateCodec], ...]  # (name, signed, codec)
    #: S > 0: the weight tensors and gradient are stored channels_last-like (each row an (S x n/S)
    #: matrix in memory, ``row_transpose_dims``); the kernel transposes each row in cache (grouped only)
    permuted: int = 0

    @property
    def grouped(self) -> bool:
        return any(c.kind != "flat" for _, _, c in self.states)


#: groups of one row processed together by the grouped kernels
BLOCK_GROUPS = int(os.environ.get("LEANOPT_BLOCK_GROUPS", 4))


def _quant_consts(kind: str) -> tuple[int, int]:
    """(Q for signed codes, L levels for unsigned) of a quantised codec kind."""
    return (127, 256) if kind == "q8" else (7, 16)


def generate(spec: KernelSpec) -> str:
    """C source of ``void lo_step(int64_t rows, int64_t n, void **ptrs, const float *s, int threads)``.

    ``ptrs`` holds, in order: the weight tensors, the gradient, then per state its tensors (flat: one;
    quantised: codes, scales). Tensors are contiguous and shaped (rows, n) (flat kernels use rows=1).
    """
    head = (
        "static void lo_body(int64_t rows, int64_t n, void **ptrs, const float *s, int64_t t0, int64_t t1,"
        " lo_side *side) {"
    )
    vector = _vector_group(spec) if spec.grouped else None
    # the vector code's declarations at the top of lo_body and its last pending block's codes at the end
    vector, _, kept = (vector or "").partition("@DECLARE@\n")
    declare, _, flush = kept.partition("@FLUSH@\n")
    vector = vector or None
    lines = [_PRELUDE + (_VECTOR_PRELUDE if vector else ""), head]
    lines += pointer_decls(spec)[0]
    used, body = scalar_uses(spec)
    lines += [f"  const float s_{k} = s[{k}];" for k in used]
    wload = spec.weight.load
    wstore = spec.weight.store
    gload = spec.grad[1]
    if not spec.grouped:
        loads, stores = flat_state_io(spec)
        lines.append(
            f"""  const int64_t total = rows * n, chunk = {FLAT_CHUNK};
  int bad = 0;
  for (int64_t c = t0; c < t1; c++) {{
    if (side) bad |= lo_side_range(side, c);
    const int64_t end = (c + 1) * chunk < total ? (c + 1) * chunk : total;
    #pragma GCC ivdep
    for (int64_t i = c * chunk; i < end; i++) {{
      float p = {wload};
      const float g = {gload};
{loads}
{body}
{stores}
      {wstore}
    }}
  }}
  if (bad) __atomic_store_n(&side->bad, 1, __ATOMIC_RELAXED);
}}"""
        )
        lines.append(_launcher(f"(rows * n + {FLAT_CHUNK} - 1) / {FLAT_CHUNK}", side=False))
        return "\n".join(lines)
    # Grouped: one group of GROUP_SIZE elements of one row at a time, decoded into local arrays.
    gs = GROUP_SIZE
    for qs in sorted({_quant_consts(c.kind)[0] for _, signed, c in spec.states if signed}):
        # every code a stored byte or nibble can hold (-128..127), not only the ones encode writes: a
        # zero nibble is code -8, and the table must give what the formula gives for it
        lines.append(f"  float lo_signed_{qs}[256];")
        lines.append(
            f"  for (int c = -128; c <= 127; c++) {{ const float y = (float)c / {_lit(qs)};"
            f" lo_signed_{qs}[c + 128] = y / ({_lit(2)} - fabsf(y)); }}"
        )
    if vector:
        lines.append("#ifdef LO_VECTOR")
        for qs in sorted({_quant_consts(c.kind)[0] for _, signed, c in spec.states if signed}):
            lines.append(f"  __m512 lv_signed_{qs}[16];  /* the table in registers (LO_SLOW_GATHER) */")
            lines.append(
                f"  for (int k = 0; k < 16; k++) lv_signed_{qs}[k] = _mm512_loadu_ps(lo_signed_{qs} + 16 * k);"
            )
            lines.append("#ifdef LO_VBMI")
            lines.append(f"  __m512i lb_signed_{qs}[8]; uint8_t lm_signed_{qs}[4];")
            lines.append(f"  lv_byte_table(lo_signed_{qs}, lb_signed_{qs}, lm_signed_{qs});")
            lines.append("#endif")
        lines += [f"  const __m512 vs_{k} = _mm512_set1_ps(s_{k});" for k in used]
        lines.append("#endif")
    bs = gs * BLOCK_GROUPS
    decl = "\n".join(f"    float A_{_ident(n)}[{bs}];" for n, _, _ in spec.states)
    decl += f"\n    float M[{bs}];"
    decl += "".join(f"\n    int U_{_ident(n)}[{bs}];" for n, _, c in spec.states if c.kind == "q4p")
    dec, enc = [], []
    for name, signed, codec in spec.states:
        dec.append(_group_decode(name, signed, codec))
        enc.append(_group_encode(name, signed, codec))
    loads = "\n".join(f"      float st_{_ident(n)} = A_{_ident(n)}[e];" for n, _, _ in spec.states)
    stores = "\n".join(f"      A_{_ident(n)}[e] = st_{_ident(n)};" for n, _, _ in spec.states)
    # Unsigned states are quantised by their square root: taken here, next to the rule's own sqrt of the
    # same value (Adam's denominator), the compiler computes it once.
    stores += "".join(
        f"\n      R_{_ident(n)}[e] = st_{_ident(n)} < 0.0f ? 0.0f : sqrtf(st_{_ident(n)});"
        for n, signed, _ in spec.states
        if not signed
    )
    decl += "".join(f"\n    float R_{_ident(n)}[{bs}];" for n, signed, _ in spec.states if not signed)
    block = f"""{decl}
{"".join(dec)}
    for (int64_t e = 0; e < len; e++) {{
      const int64_t i = r * n + j0 + e;
      float p = {wload};
      const float g = {gload};
{loads}
{body}
{stores}
      {wstore}
    }}
{"".join(enc)}"""
    # A block is BLOCK_GROUPS groups of one row (independent groups side by side keep the core busy);
    # full blocks get a copy with constant trip counts (vectorised); a row's last block may be shorter.
    lines.append(
        f"""  const int64_t groups = (n + {gs} - 1) / {gs}, blocks = (groups + {BLOCK_GROUPS - 1}) / {BLOCK_GROUPS};
  /* blocks [t0, t1) of the rows * blocks; (row, block) advanced without dividing */
  int64_t r = blocks ? t0 / blocks : 0, b = blocks ? t0 % blocks : 0;
  int bad = 0;
{declare}
  for (int64_t t = t0; t < t1; t++, b = (b + 1 == blocks) ? (r++, 0) : b + 1) {{
    if (side) bad |= lo_side_range(side, t);
    int64_t q0 = b * {BLOCK_GROUPS}, j0 = q0 * {gs};{_vector_blocks(vector, body)}
    if (n - j0 >= {bs}) {{
    const int64_t len = {bs}, ng = {BLOCK_GROUPS};
{block.replace(f"e1 = e0 + {gs} < len ? e0 + {gs} : len", f"e1 = e0 + {gs}")}
    }} else {{
    const int64_t len = n - j0, ng = (len + {gs - 1}) / {gs};
{block}
    }}
  }}
{flush}
  if (bad) __atomic_store_n(&side->bad, 1, __ATOMIC_RELAXED);
}}"""
    )
    if spec.permuted:
        lines.append(_permuted_rows(spec))
        lines.append(_launcher("rows", "lo_body_rows"))
        return "\n".join(lines)
    blocks = f"rows * (((n + {gs - 1}) / {gs} + {BLOCK_GROUPS - 1}) / {BLOCK_GROUPS})"
    lines.append(_launcher(blocks))
    return "\n".join(lines)


_TRANSPOSE_ROW = r"""
/* one row: (S x L) -> (L x S) (tl) or back, with the tables of its direction */
LO_INLINE void lo_tr_row(const uint8_t *s, uint8_t *d, int64_t S, int64_t L, const int es, const int tl,
                         const uint16_t *idx16, const uint32_t *idx32, const uint32_t *mask, int vec) {
  int64_t b0 = 0;
  (void)idx16; (void)idx32; (void)mask; (void)vec;
#ifdef LO_TR_VECTOR
  if (vec) b0 = lo_tr_vector(s, d, S, L, es, tl, idx16, idx32, mask);
#endif
  lo_tr_scalar(s, d, S, L, b0, es, tl);
}
"""

_CTYPE_BYTES = {"float": 4, "uint16_t": 2, "int16_t": 2, "int8_t": 1, "uint8_t": 1}


def _permuted_rows(spec: KernelSpec) -> str:
    """C of ``lo_body_rows``: rows [t0, t1) of a parameter stored channels_last-like (``spec.permuted``
    = S: each row an (S x L) matrix in memory, L = n / S, an (L x S) one in logical order). Per row, the
    weight tensors and the gradient are transposed into per-thread scratch (in cache), ``lo_body`` updates
    that row there with its states' codes and scales (stored in logical order), and the weight tensors
    are transposed back: one pass over memory, the bits of a contiguous parameter."""
    side = [_CTYPE_BYTES[c] for c in spec.weight.ctypes_] + [_CTYPE_BYTES[spec.grad[0]]]
    nw = len(spec.weight.ctypes_)
    sizes = [f"(n * {es} + 63) / 64 * 64" for es in side]  # each tensor's row in scratch, 64-byte aligned
    # after the weight side: per state its codes (a row: n bytes, n / 2 packed) and scales (2 per group)
    state_rows = [r for _, _, c in spec.states for r in ("(n / 2)" if c.kind == "q4p" else "n", "(groups * 2)")]
    count = nw + 1 + len(state_rows) + 2 * int(spec.weight.random)
    lines = [
        "static void lo_body_rows(int64_t rows, int64_t n, void **ptrs, const float *s, int64_t t0, int64_t t1,"
        " lo_side *side) {",
        "  int bad = 0;",
        f"  const int64_t S = {spec.permuted}, L = n / S, groups = (n + {GROUP_SIZE - 1}) / {GROUP_SIZE};",
        f"  const int64_t blocks = (groups + {BLOCK_GROUPS - 1}) / {BLOCK_GROUPS};",
        "  (void)rows;",
        f"  uint8_t *scratch = (uint8_t *)malloc((size_t)({' + '.join(sizes)}));",
        '  if (!scratch) { fputs("leanopt: out of memory for a row\'s scratch\\n", stderr); abort(); }',
        "  /* permute tables into (in) and out of (out) logical order, for 32 lanes (1-, 2-byte) and 16 (4-byte) */",
        "  uint16_t *in16 = 0, *out16 = 0; uint32_t *in32 = 0, *out32 = 0;",
        "  uint32_t in_m32[32 * 32], in_m16[32 * 32], out_m32[32 * 32], out_m16[32 * 32];",
        "  int v32 = 0, v16 = 0;",
        "#ifdef LO_TR_VECTOR",
        "  if (S <= 32) {",
        "    in16 = (uint16_t *)calloc((size_t)(S * S * 32), 2); out16 = (uint16_t *)calloc((size_t)(S * S * 32), 2);",
        "    in32 = (uint32_t *)calloc((size_t)(S * S * 16), 4); out32 = (uint32_t *)calloc((size_t)(S * S * 16), 4);",
        "    if (in16 && out16 && in32 && out32) {",
        "      lo_tr_tables((int)S, 32, 1, in16, in32, in_m32); lo_tr_tables((int)S, 16, 1, in16, in32, in_m16);",
        "      lo_tr_tables((int)S, 32, 0, out16, out32, out_m32); lo_tr_tables((int)S, 16, 0, out16, out32, out_m16);",
        "      v32 = L >= 32; v16 = L >= 16;",
        "    }",
        "  }",
        "#endif",
        f"  void *p[{count}];",
        "  for (int64_t r = t0; r < t1; r++) {",
        "    if (side) bad |= lo_side_range(side, r);",
    ]
    for k, es in enumerate(side):
        w = "16" if es == 4 else "32"
        lines.append(f"    p[{k}] = scratch + {' + '.join(sizes[:k]) or '0'};")
        lines.append(f"    lo_tr_row((const uint8_t *)ptrs[{k}] + r * n * {es}, (uint8_t *)p[{k}], S, L, {es}, 1,"
                     f" in16, in32, in_m{w}, v{w});")  # fmt: skip
    for j, stride in enumerate(state_rows):
        lines.append(f"    p[{nw + 1 + j}] = (uint8_t *)ptrs[{nw + 1 + j}] + r * {stride};")
    if spec.weight.random:  # stochastic rounding: the key, and the index of the row's first element
        lines.append(f"    p[{count - 2}] = ptrs[{count - 2}];")
        lines.append(f"    p[{count - 1}] = (void *)((uint64_t)ptrs[{count - 1}] + (uint64_t)(r * n));")
    lines.append("    lo_body(1, n, p, s, 0, blocks, 0);")
    for k, es in enumerate(side[:nw]):
        w = "16" if es == 4 else "32"
        lines.append(f"    lo_tr_row((const uint8_t *)p[{k}], (uint8_t *)ptrs[{k}] + r * n * {es}, S, L, {es}, 0,"
                     f" out16, out32, out_m{w}, v{w});")  # fmt: skip
    lines += ["  }", "  free(scratch); free(in16); free(out16); free(in32); free(out32);",
              "  if (bad) __atomic_store_n(&side->bad, 1, __ATOMIC_RELAXED);", "}"]  # fmt: skip
    return "#include <stdio.h>\n#include <stdlib.h>\n" + _TRANSPOSE_CORE + _TRANSPOSE_ROW + "\n".join(lines)


def pointer_decls(
    spec: KernelSpec, array: str = "ptrs", first: int = 0, restrict: str = "restrict"
) -> tuple[list[str], int]:
    """C declarations of a kernel's pointers, ``array[first]`` on: the weight tensors ``W<j>``, the
    gradient ``G``, per state ``S_<name>`` (flat) or codes ``C_<name>`` and scales ``K_<name>``, then the
    noise's key ``NK`` and base index ``NB`` (stochastic rounding: values, not pointers); and how many
    there are. Shared with the CUDA kernels."""
    lines, k = [], first
    for j, ct in enumerate(spec.weight.ctypes_):
        lines.append(f"  {ct} *{restrict} W{j} = ({ct} *){array}[{k}];")
        k += 1
    lines.append(f"  const {spec.grad[0]} *{restrict} G = (const {spec.grad[0]} *){array}[{k}];")
    k += 1
    for name, _, codec in spec.states:
        v = _ident(name)
        if codec.kind == "flat":
            lines.append(f"  {codec.ctype} *{restrict} S_{v} = ({codec.ctype} *){array}[{k}];")
            k += 1
        else:
            ct = "uint8_t" if codec.kind == "q4p" else "int8_t"
            lines.append(f"  {ct} *{restrict} C_{v} = ({ct} *){array}[{k}];")
            lines.append(f"  uint16_t *{restrict} K_{v} = (uint16_t *){array}[{k + 1}];")
            k += 2
    if spec.weight.random:  # stochastic rounding: the update's key and the index of element 0 (noise.py)
        lines.append(f"  const uint64_t NK = (uint64_t){array}[{k}], NB = (uint64_t){array}[{k + 1}];")
        k += 2
    return lines, k - first


def scalar_uses(spec: KernelSpec) -> tuple[list[int], str]:
    """(the hyper-parameters ``s[k]`` the traced body reads, the body reading locals ``s_k`` instead)."""
    used = sorted({int(m) for line in spec.body for m in re.findall(r"\bs\[(\d+)\]", line)})
    body = "\n".join("      " + re.sub(r"\bs\[(\d+)\]", r"s_\1", line) for line in spec.body)
    return used, body


def flat_state_io(spec: KernelSpec) -> tuple[str, str]:
    """C loading each flat state of element ``i`` into ``st_<name>`` and storing it back."""
    loads = "\n".join(
        f"      float st_{_ident(n)} = {c.load.replace('S[', f'S_{_ident(n)}[')};" for n, _, c in spec.states
    )
    stores = "\n".join(
        f"      {{ const float v = st_{_ident(n)}; {c.store.replace('S[', f'S_{_ident(n)}[')} }}"
        for n, _, c in spec.states
    )
    return loads, stores


_TEMP = re.compile(r"^(\s*)const (LO_F|LO_M) (t\d+) = (.*);$")


def _vector_body(body: str) -> str:
    """The traced statements for 16 elements at a time: ``LO_*`` -> ``LV_*``, except statements that
    depend on hyper-parameters only (e.g. ``|1 - beta1| < 0.5`` choosing lerp's formula): those stay
    scalar, a uniform condition selects with ``LV_USEL`` (one branch, not a blend of both sides) and a
    uniform value is broadcast where a vector statement uses it."""
    uniform: dict[str, str] = {}  # temp -> kind ("LO_F" / "LO_M")
    out = []
    for line in body.split("\n"):
        m = _TEMP.match(line)
        rhs = m.group(4) if m else line
        names = set(re.findall(r"\b(?:p|g|st_\w+)\b", rhs)) | {
            t for t in re.findall(r"\bt\d+\b", rhs) if t not in uniform
        }
        if m and not names:
            uniform[m.group(3)] = m.group(2)
            out.append(line)
            continue
        for t, kind in uniform.items():
            if kind == "LO_M":
                line = re.sub(rf"\bLO_SEL\({t},", f"LO_USEL({t},", line)
            else:
                line = re.sub(rf"\b{t}\b", f"LO_K({t})", line)
        out.append(re.sub(r"\bs_(\d+)\b", r"vs_\1", line.replace("LO_", "LV_")))
    return "\n".join(out)


def _vector_blocks(vector: str | None, body: str) -> str:
    """C run at the start of each block where AVX-512 is compiled in: the block's full groups, 16
    elements per register; a row's last, partial group is left to the scalar code after it. The part of
    ``vector`` before ``@GROUPS@`` runs once per block (``full`` groups), then the part up to ``@AFTER@``
    once per group, then the rest once per block."""
    if not vector:
        return ""
    vbody = _vector_body(body)
    gs = GROUP_SIZE
    before, _, vector = vector.partition("@GROUPS@\n")
    vector, _, after = vector.partition("@AFTER@\n")
    return f"""
#ifdef LO_VECTOR
    {{
      const int64_t full = (n - j0) / {gs} < {BLOCK_GROUPS} ? (n - j0) / {gs} : {BLOCK_GROUPS};
{before}      for (int64_t gv = 0; gv < full; gv++) {{
        const int64_t q = q0 + gv, jg = j0 + gv * {gs}, base = r * n + jg;
{vector.replace("@BODY@", vbody)}
      }}
{after}
      if (full == {BLOCK_GROUPS} || j0 + full * {gs} >= n) continue;
      q0 += full; j0 += full * {gs};
    }}
#endif"""


def _vector_group(spec: KernelSpec) -> str | None:
    """C for one full group of a grouped kernel in AVX-512 registers (two halves of 16): the scalar
    code's operations in the same order, so the same bits (the ``lv_*`` helpers of
    :data:`_VECTOR_PRELUDE`); ``@BODY@`` stands for the traced rule. After ``@DECLARE@``: what lo_body
    declares before its blocks (the kept block of the software pipelining), after ``@FLUSH@``: what it
    runs after them (that block's codes); :func:`generate` puts both there. None when a part has no
    vector form (then the scalar code does every group)."""
    w = spec.weight
    pair_g = spec.grad[2] == GRAD_CODECS[torch.bfloat16][2]
    if not ((w.vload and w.vstore) or w.vload2) or any(c.kind == "flat" for _, _, c in spec.states):
        return None
    decode, encode, loads, stores, block = [], [], [], [], []
    declare, keep, after_head, after, kept_decl, pending_head = [], [], [], [], [], []
    for name, signed, codec in spec.states:
        v = _ident(name)
        qs, levels = _quant_consts(codec.kind)
        packed = codec.kind == "q4p"
        at = f"C_{v} + r * (n / 2) + jg / 2" if packed else f"C_{v} + base"
        decode.append(f"        __m512 VA_{v}[2], VR_{v}[2]; (void)VR_{v};")
        decode.append(
            f"        {{ const __m512 sc = _mm512_set1_ps(lo_f((uint32_t)K_{v}[r * groups + q] << 16));"
            " __m512i code[2];"
        )
        decode.append(f"          lv_unpack_nibbles({at}, code);" if packed else
                      f"          code[0] = lv_i8({at}); code[1] = lv_i8({at} + 16);")  # fmt: skip
        for h in range(2):
            if signed and packed:  # nibble 0..15 is code -8..7: 16 table entries
                value = f"_mm512_mul_ps(_mm512_permutexvar_ps(code[{h}], _mm512_loadu_ps(lo_signed_{qs} + 120)), sc)"
            elif signed:  # from the table of every storable code (LO_VBMI: decoded for the block before)
                idx = f"_mm512_add_epi32(code[{h}], lv_i(128))"
                value = (f"_mm512_mul_ps(\n#ifdef LO_VBMI\n"
                         f"            _mm512_loadu_ps(D_{v} + gv * {GROUP_SIZE} + {16 * h})\n"
                         "#elif defined(LO_AVX2) && !defined(LO_AVX2_GATHER)\n"
                         f"            lv_signed_value(code[{h}], {_lit(qs)})\n#else\n"
                         f"            lv_lookup256(lo_signed_{qs}, lv_signed_{qs}, {idx})\n#endif\n"
                         "            , sc)")  # fmt: skip
                if h == 0:
                    room = -(-GROUP_SIZE * BLOCK_GROUPS // 64) * 64  # lv_decode_signed writes 64 at a time
                    block.append(f"      float D_{v}[{room}] __attribute__((aligned(64)));"
                                 f" lv_decode_signed(C_{v} + r * n + j0, full * {GROUP_SIZE}, lb_signed_{qs},"
                                 f" lm_signed_{qs}, D_{v});")  # fmt: skip
            else:
                add = 1 if packed else levels // 2 + 1  # int8: stored code - 128
                value = f"lv_decode_unsigned(code[{h}], {_lit(add)}, {_lit(1 / levels)}, sc)"
            decode.append(f"          VA_{v}[{h}] = {value};")
        decode.append("        }")
        loads.append(f"          LV_F st_{v} = VA_{v}[h];")
        stores.append(f"          VA_{v}[h] = st_{v};")
        if not signed:  # sqrt(max(v, 0)), next to the rule's own sqrt of the same value
            stores.append(f"          VR_{v}[h] = _mm512_mask_blend_ps(LV_LT(st_{v}, _mm512_setzero_ps()),"
                          f" _mm512_sqrt_ps(st_{v}), _mm512_setzero_ps());")  # fmt: skip
        kind, arg, kept = ("signed", _lit(qs), f"VA_{v}") if signed else ("unsigned", _lit(levels), f"VR_{v}")
        offset = 0 if signed else levels // 2
        if packed:
            nibble = 8 if signed else 0
            n0, n1 = (f"_mm512_add_epi32(code[{h}], lv_i({nibble}))" for h in range(2))
            put = f"lv_pack_nibbles({at}, {n0}, {n1});"
        else:
            put = f"lv_st8x2({at}, code[0], code[1], {offset});"
        encode.append(f"        {{ __m512i code[2]; K_{v}[r * groups + q] = lv_encode_{kind}({kept}, {arg}, code);\n"
                      f"          {put} }}")  # fmt: skip
        # the block's groups' scales at once (lv_scales4): per group, its values and partial maxima kept
        declare.append(f"      __m512 *KA_{v} = KB_{v}[par]; __m512i PM_{v}[{BLOCK_GROUPS}];")
        kept_decl.append(f"  __m512 KB_{v}[2][{2 * BLOCK_GROUPS}], PT_{v}, PI_{v}; uint16_t PB_{v}[{BLOCK_GROUPS}];")
        pending_head.append(f"          const __m512 T_{v} = PT_{v}, I_{v} = PI_{v}; const uint16_t *B_{v} = PB_{v};"
                            f" const __m512 *KA_{v} = KB_{v}[par ^ 1];")  # fmt: skip
        keep.append(f"        KA_{v}[2 * gv] = {kept}[0]; KA_{v}[2 * gv + 1] = {kept}[1];"
                    f" PM_{v}[gv] = lv_partial_max({kept});")  # fmt: skip
        # unsigned codes take levels / scale (lv_codes_unsigned): the block's reciprocals times levels at once
        levels_over = "" if signed else f" I_{v} = _mm512_mul_ps(I_{v}, _mm512_set1_ps({arg}));"
        after_head.append(f"        {{ __m512 T_{v}, I_{v}; lv_scales4(PM_{v}, &T_{v}, &I_{v}, PB_{v});{levels_over}"
                          f" PT_{v} = T_{v}; PI_{v} = I_{v}; }}")  # fmt: skip
        after.append(f"          {{ __m512 top, inv; lv_group(T_{v}, I_{v}, (int)gv, &top, &inv); __m512i code[2];\n"
                     f"            lv_codes_{kind}(KA_{v} + 2 * gv, inv, top, {arg}, code);"
                     f" {put} K_{v}[r * groups + q] = B_{v}[gv]; }}")  # fmt: skip
    before = ["#ifdef LO_VBMI", *block, "#endif"] if block else []
    if BLOCK_GROUPS == 4:
        # A block of 4 full groups: their scales at once (lv_scales4), after the 4 updates; a block of
        # fewer (short rows, a row's end): each group's scale by itself, as LO_SCALE_EACH does always
        before += ["#ifdef LO_SCALE_EACH", "      const int each = 1;", "#else", "      const int each = full < 4;",
                   *declare, "#endif"]  # fmt: skip
        encode = ["        if (each) {", *encode, "        }", "#ifndef LO_SCALE_EACH", "        else {", *keep,
                  "        }", "#endif"]  # fmt: skip
        # ... and the block's codes one block later: after the next full block's updates (or at the end of
        # the thread's blocks), so that their wait for the scales overlaps other work (software
        # pipelining); the block's kept values in one half of a double buffer (KB), its scales kept
        pending = ["        { const int64_t r = pend_r; (void)r;", *pending_head,
                   f"          for (int64_t gv = 0; gv < {BLOCK_GROUPS}; gv++) {{",
                   f"          const int64_t q = pend_q0 + gv, jg = pend_j0 + gv * {GROUP_SIZE}, base = r * n + jg;"
                   " (void)jg; (void)base;", *after, "          }", "        }"]  # fmt: skip
        tail = ["@AFTER@", "#ifndef LO_SCALE_EACH", "      if (!each) {", "        if (pend) {", *pending,
                "        }", *after_head, "        pend = 1; pend_r = r; pend_q0 = q0; pend_j0 = j0; par ^= 1;",
                "      }", "#endif",
                "@DECLARE@", "#if defined(LO_VECTOR) && !defined(LO_SCALE_EACH)",
                "  int pend = 0, par = 0; int64_t pend_r = 0, pend_q0 = 0, pend_j0 = 0;", *kept_decl, "#endif",
                "@FLUSH@", "#if defined(LO_VECTOR) && !defined(LO_SCALE_EACH)", "  if (pend) {", *pending, "  }",
                "#endif"]  # fmt: skip
    else:
        tail = []
    return "\n".join([
        *before,
        "@GROUPS@",
        *decode,
        *([f"        __m512 PW[2]; {w.vload2}"] if w.vload2 else []),
        *(["        __m512 GV[2]; lv_load_bf16x2(G + base, GV);"] if pair_g else []),
        "        for (int h = 0; h < 2; h++) {",
        "          const int64_t i = base + 16 * h;",
        f"          LV_F p = {'PW[h]' if w.vload2 else w.vload};",
        f"          const LV_F g = {'GV[h]' if pair_g else spec.grad[2]};",
        *loads,
        "@BODY@",
        *stores,
        f"          {'PW[h] = p;' if w.vload2 else w.vstore}",
        "        }",
        *([f"        {w.vstore2}"] if w.vload2 else []),
        *encode,
        *tail,
    ])  # fmt: skip


#: elements per work unit of the flat kernels
FLAT_CHUNK = 16384
#: below this many elements a kernel runs on the calling thread (OpenMP: a pooled team is cheap, so lower)
PARALLEL_MIN = {"openmp": 1 << 15, "pthreads": 1 << 20}


def _launcher(units: str, body: str = "lo_body", side: bool = True) -> str:
    """``lo_step``: splits ``units`` work units (chunks, blocks or rows) into contiguous ranges, one per
    thread, each run by ``body``: an OpenMP team where the compiler has OpenMP (the process's libgomp,
    shared with torch), else POSIX threads. ``side``: also export ``lo_step_side`` (the next tensor's
    NaN/inf check during this update: for compute-bound kernels, whose arithmetic hides its loads; a
    memory-bound one is better off with the check's own pass, lo_all_finite's interleaved streams)."""
    text = _LAUNCHER.format(units=units, omp_min=PARALLEL_MIN["openmp"], pt_min=PARALLEL_MIN["pthreads"])
    if not side:
        text = text.replace("void lo_step_side(", "static void lo_step_with(")
        text = text.replace("  lo_step_side(", "  lo_step_with(")
    return text.replace("lo_body(", f"{body}(")


_LAUNCHER = """
typedef struct {{ int64_t rows, n, t0, t1; void **ptrs; const float *s; lo_side *side; }} lo_job;
static void *lo_run(void *a) {{
  lo_job *j = (lo_job *)a; lo_body(j->rows, j->n, j->ptrs, j->s, j->t0, j->t1, j->side); return 0; }}
/* lo_step, and with ``side`` (not NULL) the side check: side->bad set if an element of side->data is
   not finite, its loads spread over the work units (they overlap the update's arithmetic) */
void lo_step_side(int64_t rows, int64_t n, void **ptrs, const float *s, int threads, lo_side *side) {{
  const int64_t total = {units};
#ifdef _OPENMP
  int64_t nt = rows * n >= {omp_min} ? threads : 1;
#else
  int64_t nt = rows * n >= {pt_min} ? threads : 1;
  if (nt > 64) nt = 64;
#endif
  if (nt > total) nt = total;
  if (side) {{
    side->chunk = total ? (side->n + total - 1) / total : side->n;
    if (total == 0) side->bad |= lo_side_range(side, 0);
  }}
  if (nt <= 1) {{ lo_body(rows, n, ptrs, s, 0, total, side); return; }}
  const int64_t per = (total + nt - 1) / nt;
#ifdef _OPENMP
  #pragma omp parallel num_threads((int)nt)
  {{
    const int64_t t0 = omp_get_thread_num() * per, t1 = t0 + per < total ? t0 + per : total;
    if (t0 < total) lo_body(rows, n, ptrs, s, t0, t1, side);
  }}
#else
  pthread_t th[64]; lo_job jobs[64]; int started[64];
  for (int64_t k = 0; k < nt; k++) {{
    const int64_t t0 = k * per < total ? k * per : total, t1 = t0 + per < total ? t0 + per : total;
    jobs[k] = (lo_job){{rows, n, t0, t1, ptrs, s, side}};
    started[k] = k > 0 && pthread_create(&th[k], 0, lo_run, &jobs[k]) == 0;
    if (k > 0 && !started[k]) lo_run(&jobs[k]);  /* no thread: do it here */
  }}
  lo_run(&jobs[0]);
  for (int64_t k = 1; k < nt; k++) if (started[k]) pthread_join(th[k], 0);
#endif
}}
void lo_step(int64_t rows, int64_t n, void **ptrs, const float *s, int threads) {{
  lo_step_side(rows, n, ptrs, s, threads, 0);
}}
"""


def _code_at(codec: StateCodec, v: str) -> tuple[str, str]:
    """(index of element e's byte, array name) for a codec with one code per byte."""
    return "(r * n + j0 + e)", f"C_{v}"


def _group_decode(name: str, signed: bool, codec: StateCodec) -> str:
    """C decoding state ``name`` of the block's groups into ``A_<name>[0, len)``."""
    v = _ident(name)
    qs, levels = _quant_consts(codec.kind)
    idx, arr = _code_at(codec, v)
    unpack = ""
    if codec.kind == "q4p":  # two codes per byte, low nibble first: unpacked first (vectorises)
        unpack = (
            f"        for (int64_t e = e0 / 2; e < e1 / 2; e++) {{ const uint8_t b = {arr}[r * (n / 2) + j0 / 2 + e];"
            f" U_{v}[2 * e] = b & 15; U_{v}[2 * e + 1] = b >> 4; }}\n"
        )
        code = f"(U_{v}[e] - {8 if signed else 0})"
    else:
        offset = 0 if signed else levels // 2
        code = f"((int){arr}[{idx}] + {offset})"
    if signed:  # y = c / Q; x = y / (2 - |y|): from a table of every storable code (no division)
        value = f"A_{v}[e] = lo_signed_{qs}[({code}) + 128] * sc;"
    else:
        value = f"const float u = ((float)({code}) + {_lit(1)}) / {_lit(levels)} * sc; A_{v}[e] = u * u;"
    return f"""    for (int64_t gi = 0; gi < ng; gi++) {{
        const int64_t e0 = gi * {GROUP_SIZE}, e1 = e0 + {GROUP_SIZE} < len ? e0 + {GROUP_SIZE} : len;
        const float sc = lo_f((uint32_t)K_{v}[r * groups + q0 + gi] << 16);
{unpack}        for (int64_t e = e0; e < e1; e++) {{ {value} }}
    }}
"""


def quant_code(signed: bool, kind: str) -> str:
    """C computing ``const int code`` of one element as formats/quantized.py encodes it, from ``gv``
    (the value; for unsigned states its square root), ``inv`` (1 / the group's bf16 scale) and
    ``is_top`` (the element holds the group's largest magnitude); a NaN element gets code 0, as in the
    reference (its group's scale is NaN, so it decodes to NaN). Shared with the CUDA kernels."""
    qs, levels = _quant_consts(kind)
    if signed:
        return (
            f"float xr = gv * inv; xr = xr < {_lit(-1)} ? {_lit(-1)} : xr; xr = xr > {_lit(1)} ? {_lit(1)} : xr;"
            f" float x = is_top ? copysignf(1.0f, gv) : xr; x = {_lit(2)} * x / ({_lit(1)} + fabsf(x));"
            f" const int code = x == x ? (int)rintf(x * {_lit(qs)}) : 0;"  # NaN: code 0 (C leaves (int)NaN undefined)
        )
    # gv >= 0 (a square root) and x <= 1, so of the format's clamps only x <= 1 and code >= 0 can bind
    return (
        f"float xr = gv * inv; xr = xr > {_lit(1)} ? {_lit(1)} : xr;"
        f" const float x = is_top ? {_lit(1)} : xr; float cf = rintf(x * {_lit(levels)}) - {_lit(1)};"
        f" cf = cf < {_lit(0)} ? {_lit(0)} : cf; const int code = cf == cf ? (int)cf : 0;"
    )


def _group_encode(name: str, signed: bool, codec: StateCodec) -> str:
    v = _ident(name)
    qs, levels = _quant_consts(codec.kind)
    idx, arr = _code_at(codec, v)
    if signed:
        mag = f"fabsf(A_{v}[e])"
        src = f"A_{v}[e]"
    else:
        src = f"R_{v}[e]"  # sqrt(max(v, 0)), taken in the update loop
        mag = "M[e]"
    quant = quant_code(signed, codec.kind)
    pack = ""
    if codec.kind == "q4p":  # nibbles collected, then packed two per byte
        put = f"U_{v}[e] = code + {8 if signed else 0};"
        pack = (
            f"        for (int64_t e = e0 / 2; e < e1 / 2; e++)"
            f" {arr}[r * (n / 2) + j0 / 2 + e] = (uint8_t)(U_{v}[2 * e] | (U_{v}[2 * e + 1] << 4));\n"
        )
    else:
        offset = 0 if signed else levels // 2
        put = f"{arr}[{idx}] = (int8_t)(code - {offset});"
    return f"""    for (int64_t gi = 0; gi < ng; gi++) {{
        const int64_t e0 = gi * {GROUP_SIZE}, e1 = e0 + {GROUP_SIZE} < len ? e0 + {GROUP_SIZE} : len;
        uint32_t topb = 0;
        for (int64_t e = e0; e < e1; e++) M[e] = {src if not signed else mag};
        for (int64_t e = e0; e < e1; e++) {{  /* >= 0: the bits order like the values, NaN above inf */
          const uint32_t mb = lo_u(M[e]) & 0x7FFFFFFFu;
          topb = mb > topb ? mb : topb;
        }}
        const float top = lo_f(topb);
        const uint16_t sb = lo_bf16(top); const float s32 = lo_f((uint32_t)sb << 16);
        const float inv = 1.0f / (s32 > 0.0f ? s32 : 1.0f);
        for (int64_t e = e0; e < e1; e++) {{
          const float gv = {"A_" + v + "[e]" if signed else "M[e]"};
          const int is_top = ({mag} == top) & (top > 0.0f);
          {quant}
          {put}
        }}
{pack}        K_{v}[r * groups + q0 + gi] = sb;
    }}
"""


# ---------------------------------------------------------------------------------------------------
# Building and loading.

CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off",
          "-std=c11", "-shared", "-fPIC", "-Werror=implicit-function-declaration"]  # fmt: skip


#: without OpenMP the kernels split their work over POSIX threads (``LEANOPT_OPENMP=0`` forces this)
_NO_OPENMP = [f for f in CFLAGS if f != "-fopenmp"] + ["-pthread"]


def cache_dir() -> Path:
    """Where compiled kernels live: ``$LEANOPT_CACHE_DIR`` or ``~/.cache/leanopt/kernels``."""
    env = os.environ.get("LEANOPT_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "leanopt" / "kernels"


def compiler() -> str | None:
    """The C compiler command: ``$CC`` (may carry arguments, e.g. ``python -m ziglang cc``), else
    cc / gcc / clang on PATH. None if there is none. clang's code for the grouped int8/int4 kernels
    runs faster than gcc 12's (docs/kernels.md), so ``CC=clang`` is worth setting where it exists."""
    env = os.environ.get("CC")
    if env:
        return env
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()}|{platform.processor()}|{flags}"


class BuildError(RuntimeError):
    """The C compiler failed (message holds its output)."""


@dataclass
class Kernel:
    fn: Any
    key: str
    compile_seconds: float  # 0.0 when loaded from the disk cache
    calls: int = 0
    symbol: str = "lo_step"
    #: address of the library's ``lo_step_side`` (0: none): lo_step with a side check (LO_SIDE_C)
    side: int = 0


_LOCK = threading.Lock()
_LOADED: dict[str, Kernel] = {}


_STEP_ARGS = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]


def _compile(cc: str, flags: list[str], source: str, lib: Path) -> None:
    """Compile ``source`` into the shared library ``lib`` (atomically replaced). Without OpenMP
    support (zig cc, clang without its headers) the build is repeated with POSIX threads."""
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        src = Path(tmp) / "k.c"
        src.write_text(source)
        out = Path(tmp) / "k.so"
        cmd = [*shlex.split(cc), *flags, str(src), "-o", str(out), "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 and "-fopenmp" in flags:
            cmd = [
                *shlex.split(cc),
                *_NO_OPENMP,
                *(f for f in flags if f not in CFLAGS),
                str(src),
                "-o",
                str(out),
                "-lm",
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            name = Path(shlex.split(cc)[0]).name
            raise BuildError(f"{name} failed: {(proc.stderr or proc.stdout).strip()[:2000]}")
        os.replace(out, lib)  # atomic: concurrent processes may build the same kernel


_GDS = Path("/sys/devices/system/cpu/vulnerabilities/gather_data_sampling")


def slow_gather() -> bool:
    """Whether this CPU runs AVX-512 gathers under the microcode mitigation of Gather Data Sampling
    (Intel Skylake to Tiger Lake with current microcode: several times slower gathers); the int8
    kernels then look their table up with register permutes instead (``LO_SLOW_GATHER``)."""
    if not _SLOW_GATHER:
        try:
            _SLOW_GATHER.append(_GDS.read_text().strip().startswith("Mitigation"))
        except OSError:
            _SLOW_GATHER.append(False)
    return _SLOW_GATHER[0]


_SLOW_GATHER: list[bool] = []


def build(
    source: str, symbol: str = "lo_step", argtypes: list | None = None, restype: Any = None, python_api: bool = False
) -> Kernel:
    """Compile (or load from the cache) ``source`` and return its function ``symbol``. ``python_api``:
    the function calls CPython's C API, so it is loaded with ``ctypes.PyDLL`` (called holding the GIL)."""
    cc = compiler()
    if cc is None:
        raise BuildError("no C compiler found (set CC or install gcc/clang)")
    flags = CFLAGS if os.environ.get("LEANOPT_OPENMP", "1") != "0" else _NO_OPENMP
    if slow_gather():
        flags = [*flags, "-DLO_SLOW_GATHER"]
    # extra flags, after ours: e.g. "-DLO_NO_VECTOR" (the portable scalar code only) or another -march
    flags = [*flags, *shlex.split(os.environ.get("LEANOPT_CFLAGS", ""))]
    key = hashlib.sha256("\n".join([source, cc, " ".join(flags), _cpu_id(), sys.platform]).encode()).hexdigest()[:24]
    with _LOCK:
        if python_api:
            key += "-py"
        kernel = _LOADED.get(f"{key}:{symbol}")  # one library may export several functions
        if kernel is not None:
            return kernel
        folder = cache_dir()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not os.access(folder, os.W_OK):
                raise PermissionError(folder)
        except OSError:  # e.g. a read-only home directory: a private folder under the temp dir
            folder = Path(tempfile.gettempdir()) / f"leanopt-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}"
            folder.mkdir(parents=True, exist_ok=True)
        lib = folder / f"lo_{key}.so"
        seconds = 0.0
        if not lib.exists():
            start = time.perf_counter()
            _compile(cc, flags, source, lib)
            seconds = time.perf_counter() - start
        load = ctypes.PyDLL if python_api else ctypes.CDLL
        try:
            handle = load(str(lib))
        except OSError:
            if "-fopenmp" not in flags:
                raise
            # compiled for an OpenMP runtime this process lacks (clang's libomp): POSIX threads instead
            start = time.perf_counter()
            _compile(cc, [*_NO_OPENMP, *(f for f in flags if f not in CFLAGS)], source, lib)
            seconds += time.perf_counter() - start
            handle = load(str(lib))
        fn = getattr(handle, symbol)
        fn.argtypes = _STEP_ARGS if argtypes is None else argtypes
        fn.restype = restype
        side = getattr(handle, "lo_step_side", None) if symbol == "lo_step" else None
        side_addr = (ctypes.cast(side, ctypes.c_void_p).value or 0) if side is not None else 0
        kernel = _LOADED[f"{key}:{symbol}"] = Kernel(fn, key, seconds, symbol=symbol, side=side_addr)
        return kernel


# ---------------------------------------------------------------------------------------------------
# The executor.


def _form_key(form: Any) -> str:
    return f"{type(form).__name__}:{getattr(form, 'decoupled', '')}"


_SPECS: dict[tuple, KernelSpec | None] = {}


def plan(
    rule: Rule, weight_format: WeightFormat, state_format: StateFormat, param: Tensor, grad_dtype: torch.dtype,
    state: dict[str, Any], group: dict[str, Any],
) -> tuple[KernelSpec, list[Tensor]] | None:  # fmt: skip
    """The kernel spec and the tensors it reads (in ``ptrs`` order) for this update, or None when the
    native path does not cover it (device, dtype, format, layout); the spec a native step would use."""
    planned = _plan(rule, weight_format, state_format, param, grad_dtype, state, group, permuted_rows=True)
    return None if planned is None else planned[:2]


def _plan(
    rule: Rule, weight_format: WeightFormat, state_format: StateFormat, param: Tensor, grad_dtype: torch.dtype,
    state: dict[str, Any], group: dict[str, Any], device_type: str = "cpu", permuted_rows: bool = False,
) -> tuple[KernelSpec, list[Tensor], list[str]] | None:  # fmt: skip
    """``plan`` plus the state keys of the tensors after the parameter (for a parameter on a
    ``device_type`` device: kernels/gpu.py plans CUDA tensors with the same specs). ``permuted_rows``:
    a channels_last conv weight with grouped states may get a kernel that transposes its rows
    (``KernelSpec.permuted``; native CPU launches only)."""
    from .fused import fused_form  # fused imports this module

    form = fused_form(rule)
    if form is None or param.device.type != device_type or param.layout != torch.strided:
        return None
    wcodec = WEIGHT_CODECS.get((weight_format.name, param.dtype))
    gcodec = GRAD_CODECS.get(grad_dtype)
    if wcodec is None or gcodec is None:
        return None
    specs = tuple(rule.states(group))
    keys = list(weight_format.buffers)
    tensors: list[Tensor] = [param.data, *(state[b] for b in weight_format.buffers)]
    codecs = []
    for sp in specs:
        codec = state_codec(state_format, sp.name, state, param)
        if codec is None:
            return None
        codecs.append((sp.name, bool(sp.signed), codec))
        if codec.kind == "flat":
            t = state.get(sp.name)
            if t is None or t.dtype != (torch.float32 if codec.ctype == "float" else torch.bfloat16):
                return None
            tensors.append(t)
            keys.append(sp.name)
        else:
            tensors += [state.get(f"{sp.name}.codes"), state.get(f"{sp.name}.scales")]
            keys += [f"{sp.name}.codes", f"{sp.name}.scales"]
    if any(t is None or t.device != param.device for t in tensors):
        return None
    permuted = 0
    if not all(t.is_contiguous() for t in tensors):
        # A dense non-contiguous layout (channels_last conv weights): the elementwise (flat) kernels walk
        # memory order, the same element order in every tensor when all share the parameter's shape and
        # strides. Not for stochastic rounding (its bits follow the logical order). Grouped states follow the
        # logical order of a conv weight's rows (out, in * kh * kw): a kernel that transposes each row of
        # a channels_last weight (its weight tensors; codes and scales contiguous), where asked.
        nweight = 1 + len(weight_format.buffers)
        if not dense(param):
            return None
        if any(t.shape != param.shape or t.stride() != param.stride() for t in tensors[:nweight]):
            return None
        if any(c.kind != "flat" for _, _, c in codecs):  # (the noise follows the logical order, as they do)
            permuted_rows = permuted_rows and PERMUTED_ROWS and device_type == "cpu"
            dims = row_transpose_dims(param) if permuted_rows else None
            if dims is None or any(c.kind == "flat" for _, _, c in codecs):
                return None
            if kernel_rows(param.shape) != (dims[0], dims[1] * dims[2]) or dims[1] == 1:
                return None  # grouped along another dim (a last dim of 32 or more)
            if not all(t.is_contiguous() for t in tensors[nweight:]):
                return None
            permuted = dims[1]
        elif weight_format.needs_random or any(t.shape != param.shape or t.stride() != param.stride() for t in tensors):
            return None
    flags = form.flags(group)
    key = (_form_key(form), flags, wcodec, gcodec, tuple(codecs), permuted)
    spec = _SPECS.get(key)
    if spec is None:
        body = tuple(trace_rule(form, flags, tuple(sp.name for sp in specs)))
        spec = KernelSpec(f"{_form_key(form)}{flags}", body, wcodec, gcodec, tuple(codecs), permuted)
        spec = _SPECS[key] = spec
    return spec, tensors, keys


#: channels_last conv weights with grouped int8/int4 states get kernels that transpose each row in
#: cache (``KernelSpec.permuted``); off: they are updated through contiguous copies (benchmarks)
PERMUTED_ROWS = os.environ.get("LEANOPT_PERMUTED_ROWS", "1") != "0"
_STATUS: dict[str, Any] = {"disabled": None, "warned": False}
#: id(state dict) -> (what the plan depends on, spec, kernel, [(state key, weakref to tensor)]); checked on use
_PLANS: dict[int, tuple] = {}
_BY_SPEC: dict[KernelSpec, Kernel] = {}
_FAILED: dict[KernelSpec, str] = {}


def disabled_reason() -> str | None:
    """Why the native path is off in this process (None while it works)."""
    if os.environ.get("LEANOPT_NATIVE", "1") == "0":
        return "LEANOPT_NATIVE=0"
    return _STATUS["disabled"]


def kernel_for(spec: KernelSpec) -> Kernel | None:
    """The compiled kernel for ``spec``; None (after one warning) if the compiler fails."""
    if disabled_reason() is not None:
        return None
    kernel = _BY_SPEC.get(spec)
    if kernel is not None:
        return kernel
    if spec in _FAILED:
        return None
    try:
        kernel = _BY_SPEC[spec] = build(generate(spec))
        return kernel
    except (BuildError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        if compiler() is not None and isinstance(err, BuildError):
            # the compiler works but not on this kernel (e.g. a missing intrinsic): only this
            # combination falls back
            _FAILED[spec] = reason
            warnings.warn(f"leanopt: a native kernel failed to compile ({reason}); that parameter uses the "
                          "slower executors", RuntimeWarning, stacklevel=5)  # fmt: skip
            return None
        _STATUS["disabled"] = reason
        if not _STATUS["warned"]:
            _STATUS["warned"] = True
            warnings.warn(
                f"leanopt: native CPU kernels are not available ({_STATUS['disabled']}); using the slower "
                "executors. Pass kernel='reference' to silence this warning.",
                RuntimeWarning,
                stacklevel=5,
            )
        return None


def dense(t: Tensor) -> bool:
    """Whether ``t`` holds exactly its elements, each once, in ``[data_ptr, data_ptr + numel * itemsize)``:
    contiguous, or its dims' strides a permutation of a contiguous tensor's (``channels_last``, a
    transposed matrix). An elementwise kernel may then walk it as a flat array, in memory order, as long
    as every tensor it walks has the same shape and strides (the same element at the same offset)."""
    if t.is_contiguous():
        return True
    expected = 1
    dims = [(n, s) for n, s in zip(t.shape, t.stride(), strict=True) if n != 1]  # a size-1 dim's stride is free
    for size, stride in sorted(dims, key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(grad: Tensor, param: Tensor) -> bool:
    """Whether a kernel planned for ``param`` may read ``grad`` as it reads the parameter: contiguous
    like a contiguous parameter, else the parameter's very strides (autograd gives a dense parameter's
    gradient its strides)."""
    return grad.is_contiguous() if param.is_contiguous() else grad.stride() == param.stride()


def same_tensors(refs: tuple, state: dict[str, Any]) -> bool:
    """Whether each (state key, weakref, address) of ``refs`` is still that state's tensor, there."""
    for k, ref, ptr in refs:
        t = ref()
        if t is None or state.get(k) is not t or t.data_ptr() != ptr:
            return False
    return True


@dataclass(slots=True)
class Launch:
    """One prepared kernel call (the step count has already advanced); ``keep`` holds the gradient and
    noise the pointers point into until the call has run. ``ptrs`` is the state's pointer array, reused
    by its next launch: run a launch before preparing the next one for the same state."""

    kernel: Kernel
    rows: int
    n: int
    ptrs: Any
    scalars: Any
    keep: list
    slot: int = 0  # the gradient's index in ``ptrs``
    counter: Any = None  # (weakref, C float view, address) of the fp32 step tensor, or None
    refs: tuple = ()  # (state key, weakref, address) of every state tensor in ``ptrs``
    random: bool = False  # stochastic rounding: the last two of ``ptrs`` are the noise's key and base (per step)


def launch(
    rule: Rule,
    weight_format: WeightFormat,
    state_format: StateFormat,
    param: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    group: dict[str, Any],
    random_bits: Any = None,
    scalars: dict | None = None,
    ready: bool = False,
    cache_key: int | None = None,
) -> Launch | None:
    """Prepare one update like ``reference_step`` as a native call, advancing ``state['step']``; None
    (nothing changed) if the native path does not cover it. ``random_bits`` (stochastic rounding) is
    called once, after the step count advances, as the reference executor does. ``scalars`` may cache
    the hyper-parameter arrays (and the rule's flags) per group across the launches of one optimizer
    step, so it must not outlive that step (hyper-parameters change between steps); ``ready``:
    the caller has just seen :func:`disabled_reason` return None. ``cache_key``: what the plan is kept
    under (default ``id(state)``; for a DTensor's local views, made anew each step, the id of the
    DTensor's own state dict); it is used only if the same tensors are found in ``state`` again."""
    if (not ready and disabled_reason() is not None) or not same_layout(grad, param) or grad.device != param.device:
        return None
    if weight_format.needs_random and random_bits is None:
        return None
    form = None if scalars is None else scalars.get(("form", id(rule)))
    if form is None:
        form = _fused_form()(rule)
        if form is None:
            return None
        if scalars is not None:
            scalars["form", id(rule)] = form
    flags = None if scalars is None else scalars.get(("flags", id(group)))
    if flags is None:
        flags = form.flags(group)
        if scalars is not None:
            scalars["flags", id(group)] = flags
    # The plan of this state's last update, if nothing it depends on changed (saves ~20 us per tensor):
    # the same tensors (weakrefs: never keeps states alive) at the same addresses.
    check = (rule, weight_format, state_format, flags, grad.dtype, param.dtype, param.shape,
             param.data_ptr(), param.stride(), param.device)  # fmt: skip
    ident = id(state) if cache_key is None else cache_key
    cached = _PLANS.get(ident)
    if cached is not None and cached[0] == check and same_tensors(cached[3], state):
        spec, kernel, refs, ptrs, counter = cached[1], cached[2], cached[3], cached[4], cached[5]
    else:
        planned = _plan(rule, weight_format, state_format, param, grad.dtype, state, group, permuted_rows=True)
        if planned is None:
            return None
        spec, tensors, keys = planned
        kernel = kernel_for(spec)
        if kernel is None:
            return None
        if len(_PLANS) > 100_000:
            _PLANS.clear()
        refs = tuple((k, weakref.ref(t), t.data_ptr()) for k, t in zip(keys, tensors[1:], strict=True))
        tensors.insert(len(spec.weight.ctypes_), grad)
        if spec.weight.random:
            tensors += [grad, grad]  # slots for the noise's key and base index, filled below
        # The pointer array is kept with the plan and reused: only the gradient (and noise) slots change.
        ptrs = (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])
        counter = None
        cached = _PLANS[ident] = (check, spec, kernel, refs, ptrs, counter)

    count = state["step"]
    if counter is None or counter[0]() is not count or counter[2] != count.data_ptr():
        counter = _step_counter(count)  # a new step tensor (e.g. loaded): remember it
        _PLANS[ident] = (*cached[:5], counter)
    if counter is not None:  # the fp32 step tensor, written in place (~1 us)
        step = counter[1].value + 1.0
        counter[1].value = step  # float32 + 1 rounds like torch's add_: t + 1 is exact in double
        step = counter[1].value
    else:
        state["step"] += 1
        step = float(state["step"])
    key = (id(group), step)
    values = None if scalars is None else scalars.get(key)
    if values is None:
        floats = form.scalars(group, step)
        values = (ctypes.c_float * len(floats))(*floats)  # double -> float rounds to nearest, as torch does
        if scalars is not None:
            scalars[key] = values
    keep: list[Any] = [grad]
    ptrs[len(spec.weight.ctypes_)] = grad.data_ptr()
    if spec.weight.random:  # the reference's noise (formats/noise.py): this update's key, element 0's index
        ptrs[len(ptrs) - 2], ptrs[len(ptrs) - 1] = random_bits.key_at(step), random_bits.base(param)
    rows, n = kernel_rows(check[6])
    return Launch(kernel, rows, n, ptrs, values, keep, len(spec.weight.ctypes_), counter, refs, spec.weight.random)


_FUSED_FORM: list[Any] = []


def kernel_rows(shape: torch.Size) -> tuple[int, int]:
    """(rows, n) a kernel walks a contiguous parameter of ``shape`` as: rows of its last dim, or the
    rows its int8/int4 states are grouped in (formats/quantized.py ``rows_shape``: a conv weight's
    ``(out, in * kh * kw)``). Elementwise kernels give the same result either way."""
    grouped = rows_shape(shape)
    n = grouped[-1] if grouped is not None else shape[-1] if len(shape) else 1
    return (math.prod(shape) // n if n else 0), n


def _fused_form() -> Any:
    """kernels.fused.fused_form (imported on first use: fused imports this module)."""
    if not _FUSED_FORM:
        from .fused import fused_form

        _FUSED_FORM.append(fused_form)
    return _FUSED_FORM[0]


def _step_counter(t: Any) -> tuple | None:
    """(weakref to the step tensor, a C float over its storage) for a plain 0-d fp32 CPU step tensor
    (incrementing it through the view skips torch's ~5 us per in-place add); None otherwise."""
    if not (isinstance(t, Tensor) and t.dtype == torch.float32 and t.device.type == "cpu" and t.dim() == 0):
        return None
    if t.requires_grad or type(t) is not Tensor:
        return None
    return weakref.ref(t), ctypes.c_float.from_address(t.data_ptr()), t.data_ptr()


def native_step(
    rule: Rule,
    weight_format: WeightFormat,
    state_format: StateFormat,
    param: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    group: dict[str, Any],
    random_bits: Any = None,
    cache_key: int | None = None,
) -> bool:
    """One update like ``reference_step``, in one native pass. False (nothing changed) if not covered."""
    job = launch(rule, weight_format, state_format, param, grad, state, group, random_bits, cache_key=cache_key)
    if job is None:
        return False
    if job.rows * job.n:
        job.kernel.fn(job.rows, job.n, job.ptrs, ctypes.addressof(job.scalars), torch.get_num_threads())
    job.kernel.calls += 1
    return True


_MANY_SOURCE = r"""
#include <stdint.h>
typedef void (*lo_step_fn)(int64_t, int64_t, void **, const float *, int);
/* Run many prepared updates in one call. Large tensors one after the other, each split over the
   threads by its own kernel; small ones spread over the threads, one tensor per thread at a time. */
void lo_run_many(int64_t count, void **fns, const int64_t *rows, const int64_t *ns, void ***ptrs,
                 const float **scalars, int threads, int64_t small) {
  for (int64_t t = 0; t < count; t++)
    if (rows[t] * ns[t] >= small) ((lo_step_fn)fns[t])(rows[t], ns[t], ptrs[t], scalars[t], threads);
  #pragma omp parallel for schedule(dynamic, 4) num_threads(threads) if(count > 8)
  for (int64_t t = 0; t < count; t++)
    if (rows[t] * ns[t] < small && rows[t] * ns[t] > 0)
      ((lo_step_fn)fns[t])(rows[t], ns[t], ptrs[t], scalars[t], 1);
}
"""
_MANY: list[Any] = []
#: tensors below this many elements are updated several at a time, one per thread
SMALL_TENSOR = 1 << 16


def run_many(jobs: list[Launch]) -> None:
    """Run prepared launches in one native call (one per launch if that call cannot be built)."""
    if not jobs:
        return
    if not _MANY:
        args = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]  # fmt: skip
        try:
            _MANY.append(build(_MANY_SOURCE, "lo_run_many", args).fn)
        except (BuildError, OSError):
            _MANY.append(None)
    count = len(jobs)
    if _MANY[0] is None:
        for job in jobs:
            if job.rows * job.n:
                job.kernel.fn(job.rows, job.n, job.ptrs, ctypes.addressof(job.scalars), torch.get_num_threads())
    else:
        fns = (ctypes.c_void_p * count)(*[ctypes.cast(j.kernel.fn, ctypes.c_void_p).value for j in jobs])
        rows = (ctypes.c_int64 * count)(*[j.rows for j in jobs])
        ns = (ctypes.c_int64 * count)(*[j.n for j in jobs])
        ptrs = (ctypes.c_void_p * count)(*[ctypes.addressof(j.ptrs) for j in jobs])
        scal = (ctypes.c_void_p * count)(*[ctypes.addressof(j.scalars) for j in jobs])
        _MANY[0](count, fns, rows, ns, ptrs, scal, torch.get_num_threads(), SMALL_TENSOR)
    for job in jobs:
        job.kernel.calls += 1


def prepare_param(rule: Rule, weight_format: WeightFormat, state_format: StateFormat, param: Tensor,
                  state: dict[str, Any], group: dict[str, Any], grad_dtype: torch.dtype) -> bool:  # fmt: skip
    """Build (or load) the kernel this parameter's updates will use, changing nothing. True if one is ready."""
    planned = plan(rule, weight_format, state_format, param, grad_dtype, state, group)
    return planned is not None and kernel_for(planned[0]) is not None


def prepare(optimizer: Any) -> int:
    """Build (or load from the disk cache) every native kernel ``optimizer``'s parameters will use,
    so the first ``step()`` does not compile (e.g. before measuring peak memory or step time).
    Creates the optimizer state (zeros, as the first step would) but changes no weight or value.
    Assumes gradients of the parameters' own dtype. Returns how many parameters have a kernel ready.
    With ``kernel="fused"`` on CUDA these are the multi-tensor CUDA kernels (kernels/gpu.py)."""
    from . import gpu  # gpu imports this module

    ready = 0
    if optimizer.kernel == "reference":
        return 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state_for(param, group)
            wfmt, sfmt = optimizer.formats(param, group)
            on_gpu = gpu.wanted(optimizer.kernel, param.device)
            ready += (gpu.prepare_param if on_gpu else prepare_param)(
                optimizer.rule, wfmt, sfmt, param, state, group, param.dtype
            )
    return ready


def reset() -> None:
    """Forget loaded kernels and a disabled state (tests; after changing ``CC``)."""
    _LOADED.clear()
    _BY_SPEC.clear()
    _MANY.clear()
    _FAILED.clear()
    _PLANS.clear()
    _FINITE.clear()
    _FINITE_MANY.clear()
    _TRANSPOSE.clear()
    _STATUS.update(disabled=None, warned=False)


_VECTOR_PROBE = (
    _PRELUDE  # the vector helpers use the scalar ones (clang rejects implicit declarations)
    + _VECTOR_PRELUDE
    + r"""
int lo_vector_width(void) {
#ifdef LO_VECTOR
#ifdef LO_AVX2
  return 8;
#else
  return 16;
#endif
#else
  return 1;
#endif
}
"""
)


def vector_width() -> int | None:
    """Elements per register the grouped (int8/int4) kernels run with under the current compiler, flags
    and CPU: 16 (AVX-512 compiled in), 8 (AVX2: the same code on pairs of 8-lane registers) or 1
    (portable C, which the compiler may still vectorise in part). None when no kernel can be built."""
    try:
        return int(build(_VECTOR_PROBE, "lo_vector_width", argtypes=[], restype=ctypes.c_int).fn())
    except BuildError:
        return None


def compile_stats() -> list[Kernel]:
    """Update kernels loaded in this process (``compile_seconds`` 0.0 when they came from the disk cache)."""
    return [k for k in _LOADED.values() if k.symbol == "lo_step"]


__all__ = [
    "BuildError",
    "Expr",
    "Kernel",
    "KernelSpec",
    "FLAT_STATE_CODECS",
    "WEIGHT_CODECS",
    "build",
    "cache_dir",
    "compile_stats",
    "compiler",
    "disabled_reason",
    "all_finite",
    "all_finite_many",
    "generate",
    "Launch",
    "launch",
    "native_step",
    "run_many",
    "plan",
    "prepare",
    "prepare_param",
    "reset",
    "trace_rule",
    "vector_width",
]


# ---------------------------------------------------------------------------------------------------
# Non-finite check (the optimizer's skip/raise decision), at memory speed.

_FINITE_SOURCE = r"""
#include <stdint.h>
/* 1 if no element has an all-ones exponent (inf or NaN). bits: 16 or 32; mask: the exponent bits.
   A value is non-finite iff its magnitude bits are >= the mask: one unsigned max over the tensor
   (vectorises to one max instruction per register), one comparison at the end. The range is read as
   8 interleaved streams (eighths of it, in step): more reads in flight per core, faster from memory
   than one stream (`python benchmarks/finite_check_streams.py`). */
#define LO_TOP(T, x, n, sign)                                                               \
  T top = 0;                                                                                \
  {                                                                                         \
    const int64_t q_ = (n) / 8;                                                             \
    T t_[8] = {0};                                                                          \
    for (int64_t i = 0; i < q_; i++)                                                        \
      for (int k = 0; k < 8; k++) {                                                         \
        const T v = (x)[k * q_ + i] & (T)~(sign); t_[k] = v > t_[k] ? v : t_[k]; }          \
    for (int k = 0; k < 8; k++) top = t_[k] > top ? t_[k] : top;                             \
    for (int64_t i = 8 * q_; i < (n); i++) { const T v = (x)[i] & (T)~(sign); top = v > top ? v : top; } \
  }
static int lo_finite16(const uint16_t *x, int64_t n, uint16_t mask) {
  LO_TOP(uint16_t, x, n, 0x8000u) return top < mask; }
static int lo_finite32(const uint32_t *x, int64_t n, uint32_t mask) {
  LO_TOP(uint32_t, x, n, 0x80000000u) return top < mask; }
int lo_all_finite(const void *data, int64_t n, int bits, uint32_t mask, int threads) {
  const int nt = n >= (1 << 18) ? threads : 1;
  const int64_t per = (n + nt - 1) / nt;
  int ok = 1;
  #pragma omp parallel for reduction(&:ok) num_threads(nt) schedule(static, 1)
  for (int t = 0; t < nt; t++) {
    const int64_t a = t * per, len = a >= n ? 0 : (a + per < n ? per : n - a);
    ok &= bits == 16 ? lo_finite16((const uint16_t *)data + a, len, (uint16_t)mask)
                     : lo_finite32((const uint32_t *)data + a, len, mask);
  }
  return ok;
}
/* The same for many tensors: ok[k] = 1 if tensor k (n[k] elements) is finite. mask[k]: its exponent
   bits, bit 0 set for 32-bit elements. Small tensors one per thread, large ones split. */
static int lo_one(const void *data, int64_t n, uint32_t mask) {
  return (mask & 1u) ? lo_finite32((const uint32_t *)data, n, mask & ~1u)
                     : lo_finite16((const uint16_t *)data, n, (uint16_t)mask);
}
void lo_all_finite_many(int64_t count, void **data, const int64_t *n, const uint32_t *mask, int8_t *ok,
                        int threads) {
  #pragma omp parallel for schedule(dynamic, 8) num_threads(count > 1 ? threads : 1)
  for (int64_t k = 0; k < count; k++) if (n[k] < (1 << 18)) ok[k] = (int8_t)lo_one(data[k], n[k], mask[k]);
  for (int64_t k = 0; k < count; k++)
    if (n[k] >= (1 << 18))
      ok[k] = (int8_t)lo_all_finite(data[k], n[k], (mask[k] & 1u) ? 32 : 16, mask[k] & ~1u, threads);
}
"""

_EXPONENT_MASKS = {torch.bfloat16: (16, 0x7F80), torch.float16: (16, 0x7C00), torch.float32: (32, 0x7F800000)}
_FINITE: list[Any] = []
_FINITE_MANY: list[Any] = []


def all_finite_many(tensors: list[Tensor]) -> list[bool] | None:
    """:func:`all_finite` of many CPU tensors in one native call (small ones one per thread); None when
    the native path cannot answer for every one of them."""
    specs = [_EXPONENT_MASKS.get(t.dtype) for t in tensors]
    if any(sp is None or t.device.type != "cpu" or not dense(t) for sp, t in zip(specs, tensors, strict=True)):
        return None
    fn = finite_many_fn()
    if fn is None:
        return None
    count = len(tensors)
    data = (ctypes.c_void_p * count)(*[t.data_ptr() for t in tensors])
    sizes = (ctypes.c_int64 * count)(*[t.numel() for t in tensors])
    masks = (ctypes.c_uint32 * count)(*[sp[1] | (sp[0] == 32) for sp in specs])  # type: ignore[index]
    out = (ctypes.c_int8 * count)()
    fn(count, data, sizes, masks, out, torch.get_num_threads())
    return [bool(x) for x in out]


def finite_many_fn() -> Any:
    """The compiled ``lo_all_finite_many(count, data, sizes, masks, out, threads)`` (out[t] = 1 where
    tensor t is free of NaN and inf), or None where the native path is off or cannot build."""
    if disabled_reason() is not None:
        return None
    if not _FINITE_MANY:
        args = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        try:
            _FINITE_MANY.append(build(_FINITE_SOURCE, "lo_all_finite_many", args).fn)
        except (BuildError, OSError):
            _FINITE_MANY.append(None)
    return _FINITE_MANY[0]


def _finite_fn() -> Any:
    if not _FINITE:
        args = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_uint32, ctypes.c_int]
        try:
            _FINITE.append(build(_FINITE_SOURCE, "lo_all_finite", args, ctypes.c_int).fn)
        except (BuildError, OSError):
            return None
    return _FINITE[0]


def all_finite(t: Tensor) -> bool | None:
    """Whether every element of the CPU tensor ``t`` is finite, in one native pass; None when the
    native path cannot answer (other device, dtype or layout, or no compiler)."""
    spec = _EXPONENT_MASKS.get(t.dtype)
    if spec is None or t.device.type != "cpu" or not dense(t) or disabled_reason() is not None:
        return None
    fn = _finite_fn()
    if fn is None:
        return None
    if t.numel() == 0:
        return True
    return bool(fn(t.data_ptr(), t.numel(), spec[0], spec[1], torch.get_num_threads()))


# ---------------------------------------------------------------------------------------------------
# Channels-last <-> logical order (the grouped int8/int4 states' rows): the row transposes of the
# permuted kernels (``_permuted_rows``), and the copies a channels_last conv weight is updated through
# where those do not run (kernels/fused.py, ``_on_contiguous_twin``).

_TRANSPOSE_CORE = r"""
/* Each of `rows` rows holds S*L elements of `es` bytes: in memory order (S x L) (channels_last: S =
   kh*kw, L = in channels) or in logical order (L x S). to_logical: src (S x L) -> dst (L x S); else
   src (L x S) -> dst (S x L). Bytes are moved, never changed. With AVX-512 BW and S <= 32: blocks of
   W elements along L (W = 32 for 1- and 2-byte elements, 1-byte ones widened to 16 bits; 16 for 4-byte),
   S registers in, S out, each output lane taken from its input register by a masked permute; the
   rest (L % W, larger S, other CPUs) element by element. */
#define LO_SRC(a, b) (tl ? (a) * L + (b) : (b) * S + (a)) /* element (s=a, l=b) in src */
#define LO_DST(a, b) (tl ? (b) * S + (a) : (a) * L + (b))
#define LO_INLINE static inline __attribute__((always_inline))
LO_INLINE void lo_tr_scalar(const uint8_t *s8, uint8_t *d8, int64_t S, int64_t L, int64_t b0, const int es,
                            const int tl) {
  for (int64_t b = b0; b < L; b++)
    for (int64_t a = 0; a < S; a++) {
      if (es == 1) d8[LO_DST(a, b)] = s8[LO_SRC(a, b)];
      else if (es == 2) ((uint16_t *)d8)[LO_DST(a, b)] = ((const uint16_t *)s8)[LO_SRC(a, b)];
      else ((uint32_t *)d8)[LO_DST(a, b)] = ((const uint32_t *)s8)[LO_SRC(a, b)];
    }
}
#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(LO_NO_VECTOR)
#include <immintrin.h>
#define LO_TR_VECTOR 1
/* out[j] lane l = in[v] lane idx[j][v][l] for the v whose mask[j][v] has bit l */
static void lo_tr_tables(int S, int W, int tl, uint16_t *idx16, uint32_t *idx32, uint32_t *mask) {
  memset(mask, 0, sizeof(uint32_t) * S * S);
  for (int j = 0; j < S; j++)
    for (int l = 0; l < W; l++) {
      /* the input block: tl, S registers of W (row a = register a); else W rows of S, flat */
      const int k = tl ? W * j + l : l * S + j;
      const int v = tl ? k % S : k / W, lane = tl ? k / S : k % W;
      if (W == 32) idx16[(j * S + v) * 32 + l] = (uint16_t)lane;
      else idx32[(j * S + v) * 16 + l] = (uint32_t)lane;
      mask[j * S + v] |= 1u << l;
    }
}
LO_INLINE int64_t lo_tr_vector(const uint8_t *s, uint8_t *d, int64_t S, int64_t L, const int es, const int tl,
                               const uint16_t *idx16, const uint32_t *idx32, const uint32_t *mask) {
  const int64_t W = es == 4 ? 16 : 32;
  int64_t b0 = 0;
  for (; b0 + W <= L; b0 += W) {
    __m512i in[32];
    for (int64_t a = 0; a < S; a++) {  /* register a: tl, row a's W elements; else the a-th W of the block */
      const uint8_t *p = s + (tl ? a * L + b0 : b0 * S + W * a) * es;
      in[a] = es == 1 ? _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p)) : _mm512_loadu_si512(p);
    }
    for (int64_t j = 0; j < S; j++) {
      __m512i acc = _mm512_setzero_si512();
      for (int64_t v = 0; v < S; v++) {
        const uint32_t m = mask[j * S + v];
        if (es == 4)
          acc = _mm512_mask_permutexvar_epi32(acc, (__mmask16)m, _mm512_loadu_si512(idx32 + (j * S + v) * 16), in[v]);
        else
          acc = _mm512_mask_permutexvar_epi16(acc, (__mmask32)m, _mm512_loadu_si512(idx16 + (j * S + v) * 32), in[v]);
      }
      uint8_t *q = d + (tl ? b0 * S + W * j : j * L + b0) * es;
      if (es == 1) _mm256_storeu_si256((__m256i *)q, _mm512_cvtepi16_epi8(acc));
      else _mm512_storeu_si512(q, acc);
    }
  }
  return b0;
}
#endif
"""

_TRANSPOSE_SOURCE = (
    r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
"""
    + _TRANSPOSE_CORE
    + r"""
LO_INLINE void lo_tr_rows(const uint8_t *src, uint8_t *dst, int64_t rows, int64_t S, int64_t L, const int es,
                          const int tl, int vec, const uint16_t *idx16, const uint32_t *idx32, const uint32_t *mask,
                          int threads) {
  (void)vec; (void)idx16; (void)idx32; (void)mask; (void)threads;
#ifdef _OPENMP
  #pragma omp parallel for num_threads(threads) schedule(static) if (rows * S * L >= 65536 && threads > 1)
#endif
  for (int64_t r = 0; r < rows; r++) {
    const uint8_t *s = src + r * S * L * es;
    uint8_t *d = dst + r * S * L * es;
    int64_t b0 = 0;
#ifdef LO_TR_VECTOR
    if (vec) b0 = lo_tr_vector(s, d, S, L, es, tl, idx16, idx32, mask);
#endif
    lo_tr_scalar(s, d, S, L, b0, es, tl);
  }
}
/* returns the vector width used (1: element by element) */
int lo_transpose(const void *src, void *dst, int64_t rows, int64_t S, int64_t L, int es, int to_logical, int threads) {
  uint16_t *idx16 = 0; uint32_t *idx32 = 0; uint32_t mask[32 * 32];
  int vec = 0, W = 1;
#ifdef LO_TR_VECTOR
  /* the tables, shared by the threads (read only): S * S permutes of W lanes */
  W = es == 4 ? 16 : 32;
  vec = S <= 32 && L >= W;
  if (vec) {
    idx16 = (uint16_t *)calloc((size_t)(S * S * 32), sizeof(uint16_t));
    idx32 = (uint32_t *)calloc((size_t)(S * S * 16), sizeof(uint32_t));
    vec = idx16 && idx32;
    if (vec) lo_tr_tables((int)S, W, to_logical, idx16, idx32, mask);
  }
#endif
  const uint8_t *s = (const uint8_t *)src; uint8_t *d = (uint8_t *)dst;
  /* constant element sizes and directions: each combination its own specialised loop */
  if (es == 1 && to_logical) lo_tr_rows(s, d, rows, S, L, 1, 1, vec, idx16, idx32, mask, threads);
  else if (es == 1) lo_tr_rows(s, d, rows, S, L, 1, 0, vec, idx16, idx32, mask, threads);
  else if (es == 2 && to_logical) lo_tr_rows(s, d, rows, S, L, 2, 1, vec, idx16, idx32, mask, threads);
  else if (es == 2) lo_tr_rows(s, d, rows, S, L, 2, 0, vec, idx16, idx32, mask, threads);
  else if (to_logical) lo_tr_rows(s, d, rows, S, L, 4, 1, vec, idx16, idx32, mask, threads);
  else lo_tr_rows(s, d, rows, S, L, 4, 0, vec, idx16, idx32, mask, threads);
  free(idx16); free(idx32);
  return vec ? W : 1;
}
"""
)

_TRANSPOSE: list[Any] = []


def row_transpose_dims(t: Tensor) -> tuple[int, int, int] | None:
    """(rows, S, L) when ``t`` (3+ dims) is stored channels_last-like: dim 0 outermost, then dims 2.. in
    order, then dim 1 innermost (``torch.channels_last``, ``channels_last_3d``), so that each row (an
    output channel) is an (S x L) matrix in memory, S = prod(shape[2:]), L = shape[1], and an (L x S)
    one in logical order. None for any other layout."""
    if t.dim() < 3 or t.is_contiguous():
        return None
    rows, L = t.shape[0], t.shape[1]
    S = t.numel() // max(rows * L, 1)
    expected = 1
    for dim in [1, *range(t.dim() - 1, 1, -1), 0]:  # innermost first
        if t.shape[dim] != 1 and t.stride(dim) != expected:
            return None
        expected *= t.shape[dim]
    return rows, S, L


def _transpose_fn() -> Any:
    if not _TRANSPOSE:
        args = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                ctypes.c_int, ctypes.c_int]  # fmt: skip
        try:
            _TRANSPOSE.append(build(_TRANSPOSE_SOURCE, "lo_transpose", args, ctypes.c_int).fn)
        except (BuildError, OSError):
            _TRANSPOSE.append(None)
    return _TRANSPOSE[0]


def _transposer(t: Tensor) -> tuple[Any, tuple[int, int, int]] | None:
    """(the native transpose, ``row_transpose_dims(t)``) for a channels_last-like CPU tensor ``t`` of
    1-, 2- or 4-byte elements; None when the native path cannot move it."""
    dims = row_transpose_dims(t) if t.device.type == "cpu" and t.element_size() in (1, 2, 4) else None
    fn = None if dims is None or disabled_reason() is not None else _transpose_fn()
    return None if fn is None else (fn, dims)  # type: ignore[return-value]


def to_logical(t: Tensor) -> Tensor | None:
    """A contiguous copy of the channels_last-like CPU tensor ``t`` (``t.contiguous()``, the same
    bytes), made by one native pass; None when the native path cannot (another layout or device, no
    compiler): then ``t.contiguous()``."""
    found = _transposer(t)
    if found is None:
        return None
    out = torch.empty(t.shape, dtype=t.dtype)
    found[0](t.data_ptr(), out.data_ptr(), *found[1], t.element_size(), 1, torch.get_num_threads())
    return out


def from_logical(dst: Tensor, src: Tensor) -> bool:
    """``dst.copy_(src)`` for a channels_last-like CPU tensor ``dst`` and a contiguous ``src`` of its
    shape and dtype, by one native pass; False (nothing written) when the native path cannot."""
    if not src.is_contiguous() or src.dtype != dst.dtype or src.shape != dst.shape:
        return False
    found = _transposer(dst)
    if found is None:
        return False
    found[0](src.data_ptr(), dst.data_ptr(), *found[1], dst.element_size(), 0, torch.get_num_threads())
    return True
