"""CUDA kernels: the native kernels' code as one multi-tensor CUDA kernel per combination.

Why: on CUDA the compiled path (kernels/fused.py) launches one Triton kernel per tensor and spends
~100 us of host time on each (``LEANOPT_NATIVE=0 python benchmarks/compiled_call_overhead.py``): ~15 ms
per step for GPT-2's 148 tensors, whatever the GPU. Here every tensor of a step that shares a
(rule, weight format, state format, dtypes) combination is updated by ONE launch: a table of
pointers, sizes and hyper-parameters goes to the GPU in one pinned, non-blocking copy, and each
block finds its tensor in it by binary search.

The code is the native CPU kernels' (kernels/native.py): the same traced rule (``trace_rule``: one
fp32 operation per statement, ``fmaf`` where torch uses an FMA), the same weight, gradient and state
codecs, the same int8/int4 quantiser (``native.quant_code``). Flat formats run one thread per
element; grouped int8/int4 states one warp per 32-element group (``GROUP_SIZE`` is the warp size),
the group's maximum read from shared memory after a ``__syncwarp``. It is compiled at run time with
NVRTC (``torch.cuda._compile_kernel``) with ``--fmad=false``, so nothing is contracted into an FMA
(the CPU kernels' ``-ffp-contract=off``); CUDA's ``/`` and ``sqrtf`` round correctly by default. So
results are meant to be bit-identical to the native CPU kernels.

The same source compiles as C on the CPU (each warp's lanes run in a loop, ``LO_EACH``): with
:data:`EMULATE` set, CPU tensors take this path and the tests compare it bit for bit with the native
kernels on machines without a GPU (tests/test_gpu_kernels.py), and NVRTC itself (from its pip wheel:
:func:`find_nvrtc`, :func:`nvrtc_compile`) compiles every kernel to CUBIN for sm_80 and sm_90 there
(benchmarks/nvrtc_check.py reports registers and spills). What only a GPU checks: the launch, the
warp synchronisation and the bits on the device (benchmarks/gpu_check.sh runs the CUDA tests; on an
H200 they pass: benchmarks/results/gpu-2026-11-29-run2).

Used for ``kernel="auto"`` and ``"fused"`` on CUDA (:func:`wanted`). Every combination the native
kernels have is covered: fp16 weights and gradients as their bits, as the native kernels hold them
(:data:`native.F16_BITS`); stochastic rounding with the reference's bits, computed in the kernel from the
update's key and each element's index (formats/noise.py).
A step whose tensors are all covered is kept as a plan (:class:`GpuStepPlan`), so the next one costs
the host a few microseconds per tensor; FSDP2 steps too (DTensors on one device mesh: the plan reads
their local tensors and all-reduces the NaN/inf verdicts between the check and the updates).
"""

from __future__ import annotations

import ctypes
import os
import time
import warnings
import weakref
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..formats.noise import key as noise_key
from ..formats.quantized import GROUP_SIZE
from ..formats.states import StateFormat
from ..formats.weights import WeightFormat
from ..rules.base import Rule
from . import native
from .native import KernelSpec, _ident, _lit, _quant_consts

#: tests: CPU tensors with ``kernel="fused"`` take this path, the kernels compiled as C (no GPU needed)
EMULATE = False
THREADS = 256  # threads per block
ITEMS = 4  # elements per thread (flat kernels)
FLAT_UNIT = THREADS * ITEMS  # elements per block (flat kernels)
WARPS = THREADS // 32  # groups per block (grouped kernels)
META = 3  # table row per tensor: first block, rows, n; then the pointers
NVRTC_OPTIONS = ["--fmad=false"]
#: code-shape choices (the same arithmetic, so the same bits; benchmarks/gpu_variants.py times them):
#: ``hoist``: a flat kernel's thread loads all its ITEMS elements before computing any (more loads in
#: flight per thread); ``warp_max``: a grouped kernel finds its group's largest magnitude with one
#: warp reduction (``__reduce_max_sync``) instead of each lane reading all 32 from shared memory.
#: ``chunks``: blocks of FLAT_UNIT elements one flat kernel's block updates in turn (its setup - finding
#: its tensor, reading the table row: dependent loads - paid once for them all);
#: ``groups``: consecutive int8/int4 groups one warp updates together (its setup paid once for them all,
#: every load of them issued before any arithmetic: more bytes in flight per warp);
#: ``table``: signed int8/int4 codes decoded through a per-block table of ``y / (2 - |y|)`` in shared
#: memory, built by the block's threads (since 2026-11-30 the default reads a constant table made in
#: Python, :func:`_decode_table`, through the L1 cache: no divisions per element either); ``vec``: a flat
#: kernel's thread updates ITEMS consecutive elements, each array read and written in one 4-16 byte
#: access where aligned (as torch's fused kernels do).
#: ``search``: how a block finds its tensor (:func:`_find`): 0, each thread by a binary search (the
#: default); 1, each warp by a 32-way search, one ``__ballot_sync`` a round (fewer instructions by
#: benchmarks/sass_count.py); 2, the block's first warp so, shared after a barrier (the fewest
#: instructions of the three: the other warps skip it). All three gave the native bits on an H200
#: (``test_cuda_many_tensors_give_the_native_bits_with_each_search``, 2026-11-30).
#: The defaults are what an H200 chose by timing (benchmarks/gpu_variants.py, 2026-11-30,
#: benchmarks/results/gpu-2026-11-30/variants.json, every variant's bits equal to the native kernels'):
#: ``vec`` (the flat kernels' device time 0.94x the variant before, worst case 1.06x) and ``groups=2``
#: (grouped kernels 0.93x, worst 1.04x); ``search=2`` ran there too (its bits equal, 0.947x: not chosen,
#: and not timed on top of ``vec`` yet). With ``groups=2`` ptxas compiles two kernels for sm_80 (A100:
#: SGD with stochastic rounding and int8/int4 momentum) at 40 registers with an 8-byte spill; none for
#: sm_90 (tests/test_gpu_kernels.py, ``SPILL_EXEMPT``). The environment variable ``LEANOPT_GPU_VARIANT`` (e.g.
#: ``"chunks=4,vec=0"``) sets any of them (:func:`parse_variant`).
#: ``lanes`` (since 2026-12-01, not yet timed on a GPU): a grouped kernel's lane updates one whole group
#: of 32 by itself (:func:`_grouped_lanes`): its scale, largest magnitude and ``1 / scale`` once per group
#: instead of once per element, every array read and written 8 elements at a time (4-16 byte accesses
#: where aligned), the group's decoded states held in registers; no warp reduction, no shared memory.
#: ``benchmarks/sass_count.py`` counts its instructions per element against the warp-per-group shape.
VARIANT: dict[str, Any] = {"hoist": True, "warp_max": True, "chunks": 1, "groups": 2, "table": False,
                           "vec": True, "search": 0, "lanes": False, "blocks": 0}  # fmt: skip
#: ``blocks`` (with ``lanes``): the blocks per multiprocessor asked of ptxas (``__launch_bounds__``'s
#: second argument; 0: none): ``lanes`` kernels hold a group's states in registers (~150 for AdamW with
#: int8 states on sm_90: one block of 256 threads per multiprocessor), 2 caps them at 128 (spilling what
#: does not fit) for twice the warps in flight.
#: counts (the other keys are 0 or 1). A warp's groups take its block's static shared memory (at most
#: 48 KiB: 8 warps x up to 3 states x 32 x groups floats, AMSGrad's 3 states at 16 groups overflow it;
#: NVRTC, sm_90), so at most 8
_VARIANT_RANGE = {"chunks": range(1, 65), "groups": range(1, 9), "search": range(0, 3), "blocks": range(0, 9)}


def parse_variant(text: str) -> dict[str, Any]:
    """``"chunks=4,vec=1"`` -> ``{"chunks": 4, "vec": True}``: the ``LEANOPT_GPU_VARIANT`` syntax, checked
    (ValueError naming the variable, the key and what is accepted)."""
    out: dict[str, Any] = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        key, eq, value = (x.strip() for x in item.partition("="))
        if key not in VARIANT or not eq:
            raise ValueError(f"LEANOPT_GPU_VARIANT: {item!r} is not KEY=VALUE with KEY one of {sorted(VARIANT)}")
        accepted = _VARIANT_RANGE.get(key, range(0, 2))
        if not value.isdigit() or int(value) not in accepted:
            raise ValueError(f"LEANOPT_GPU_VARIANT: {key}={value!r}; accepted: an integer in "
                             f"[{accepted.start}, {accepted.stop - 1}]")  # fmt: skip
        out[key] = int(value) if key in _VARIANT_RANGE else bool(int(value))
    return out


VARIANT.update(parse_variant(os.environ.get("LEANOPT_GPU_VARIANT", "")))

_CUDA_PRELUDE = r"""
#ifdef __CUDACC__
/* NVRTC has no <stdint.h>; macros, not typedefs, so that no builtin definition can conflict */
#define uint32_t unsigned int
#define int32_t int
#define uint16_t unsigned short
#define int16_t short
#define int8_t signed char
#define uint8_t unsigned char
#define int64_t long long
#define uint64_t unsigned long long
#define LO_FN static __device__ __forceinline__
#define LO_COLD static __device__ __noinline__
#define LO_RESTRICT __restrict__
#define LO_SYNC() __syncwarp()
#define LO_UNROLL _Pragma("unroll")
/* n 32-bit words at p (aligned to 4n bytes) in one load / store */
#define LO_WLOAD(w, p, n) do { if ((n) == 1) (w)[0] = *(const uint32_t *)(p); \
  else if ((n) == 2) { const uint2 v_ = *(const uint2 *)(p); (w)[0] = v_.x; (w)[1] = v_.y; } \
  else { const uint4 v_ = *(const uint4 *)(p); (w)[0] = v_.x; (w)[1] = v_.y; (w)[2] = v_.z; (w)[3] = v_.w; } } while (0)
#define LO_WSTORE(p, w, n) do { if ((n) == 1) *(uint32_t *)(p) = (w)[0]; \
  else if ((n) == 2) *(uint2 *)(p) = make_uint2((w)[0], (w)[1]); \
  else *(uint4 *)(p) = make_uint4((w)[0], (w)[1], (w)[2], (w)[3]); } while (0)
/* 16 read-only bytes at p (aligned to 16) in one load through the read-only data cache */
#define LO_RLOAD4(w, p) do { const uint4 v_ = __ldg((const uint4 *)(p)); \
  (w)[0] = v_.x; (w)[1] = v_.y; (w)[2] = v_.z; (w)[3] = v_.w; } while (0)
#ifndef FLT_MAX
#define FLT_MAX 3.402823466e+38f
#endif
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#ifndef NAN
#define NAN __int_as_float(0x7fffffff)
#endif
LO_FN float lo_f(uint32_t b) { return __uint_as_float(b); }
LO_FN uint32_t lo_u(float f) { return __float_as_uint(f); }
#else  /* the same code on the CPU: a block's threads (a warp's lanes) one after the other */
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <float.h>
#define LO_FN static inline
#define LO_COLD static
#define LO_RESTRICT restrict
#define LO_SYNC()
#define LO_UNROLL
/* as the GPU's word accesses, but where the GPU would fault on a misaligned address the copy is
   garbage instead, so that the emulated tests see it */
static inline void lo_words(void *dst, const void *src, const void *global, int bytes) {
  if ((uintptr_t)global & (uintptr_t)(bytes - 1)) memset(dst, 0xA5, bytes); else memcpy(dst, src, bytes); }
#define LO_WLOAD(w, p, n) lo_words((w), (p), (p), 4 * (n))
#define LO_WSTORE(p, w, n) lo_words((p), (w), (p), 4 * (n))
#define LO_RLOAD4(w, p) lo_words((w), (p), (p), 16)
static inline float lo_f(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
static inline uint32_t lo_u(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }
#endif
#define LO_ADDR(p) ((unsigned long long)(p))
/* x in [0, count): on CUDA the calling thread's own x (me >= 0: one pass, no loop left after
   compiling), on the CPU (me < 0) each in turn */
#ifdef __CUDACC__
#define LO_EACH(x, count) for (int x = me, x##_end = me + 1; x < x##_end; x++)
#else
#define LO_EACH(x, count) for (int x = me < 0 ? 0 : me, x##_end = me < 0 ? (count) : me + 1; x < x##_end; x++)
#endif
"""


#: the tensor of a block: table rows of ``stride`` int64, each starting with the tensor's first block;
#: the last row whose first block is <= ``unit``. ``search=0`` (default): each thread by a binary search.
#: ``search`` 1 and 2: a warp searches together: its 32 lanes each test one row of the range left,
#: spaced evenly, and the range shrinks to the gap after the last row that passes (a 32-way search: 2
#: rounds of dependent loads for up to 1024 tensors, where a binary search takes 10). On CUDA the lanes'
#: answers meet in one ``__ballot_sync`` (every lane of the warp calls this, at the kernel's start); on
#: the CPU one caller tests the 32 rows itself, the same rounds, whatever ``search`` is.
_FIND_BODY = """LO_FN int lo_find(const int64_t *LO_RESTRICT meta, int count, int64_t unit, int stride) {
  int lo = 0;
#if defined(__CUDACC__) && LO_SEARCH == 0  /* each thread by itself: a binary search (before 2026-11-30) */
  int hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (meta[(int64_t)mid * stride] <= unit) lo = mid; else hi = mid - 1;
  }
#else
  int span = count;  /* the answer is in [lo, lo + span); row lo passes */
  while (span > 1) {
    const int step = (span + 31) >> 5;  /* lane k tests row lo + k step, if k step < span */
#ifdef __CUDACC__
    const int k = (int)(threadIdx.x & 31u), row = lo + k * step;  /* past the range: the last row, ignored */
    const int pass = (meta[(int64_t)(row < count ? row : count - 1) * stride] <= unit) & (k * step < span);
    const int last = 31 - __clz((int)__ballot_sync(0xFFFFFFFFu, pass));  /* lane 0 passes */
#else
    int last = 0;
    for (int k = 1; k < 32 && k * step < span; k++)
      if (meta[(int64_t)(lo + k * step) * stride] <= unit) last = k;
#endif
    lo += last * step;
    span = span - last * step < step ? span - last * step : step;
  }
#endif
  return lo; }
#ifdef __CUDACC__
/* the tensor of this block (all its threads work on one: a tensor's blocks are its own), found by the
   block's first warp alone and shared: the other warps wait at the barrier instead of searching too */
LO_FN int lo_block_tensor(const int64_t *LO_RESTRICT meta, int count, int stride) {
#if LO_SEARCH < 2  /* every warp (thread) searches by itself */
  return lo_find(meta, count, blockIdx.x, stride); }
#else
  __shared__ int found;
  if (threadIdx.x < 32) {
    const int t = lo_find(meta, count, blockIdx.x, stride);
    if (threadIdx.x == 0) found = t;
  }
  __syncthreads();
  return found; }
#endif
#endif"""


def _find() -> str:
    """lo_find and lo_block_tensor for ``VARIANT["search"]``: 0 (default), every thread by a binary
    search; 1, every warp by a 32-way search; 2, the block's first warp so, shared with the block. The
    CPU's (emulated) search is the 32-way search's rounds for all three (the same answer)."""
    return f"#define LO_SEARCH {VARIANT['search']}\n" + _FIND_BODY


#: bytes of gradient a block of the NaN/inf check reads per chunk: two 16-byte loads per thread (4096
#: bf16/fp16 values, 2048 fp32)
CHECK_BYTES = THREADS * 32


def _finite_source(chunks: int = 1) -> str:
    """NaN/inf check of many gradients in one launch: table rows (first block, numel, pointer, kind: 0
    fp32, 1 bf16, 2 fp16); ``flags[t]`` (1 on entry) becomes 0 where tensor t holds a NaN or inf
    (exponent bits all ones, as the native check). A block checks ``chunks`` x CHECK_BYTES bytes
    (``VARIANT["chunks"]``, as the flat update kernels), its table row found once for them all. Each
    thread reads 16 bytes at a time (8 bf16/fp16 or 4 fp32 values; a warp's loads side by side) and
    tests a whole word at once: with the exponent bits masked, adding their lowest bit carries into
    the bit above the exponent (the sign bit's place) exactly when they were all ones, in each 16-bit
    half separately (0x7F80 + 0x80 = 0x8000: no carry into the next half). A tensor's last partial
    16 bytes, or all of a tensor whose address is not a multiple of 16, go element by element after
    the loads (the block's threads in turn), so the loads' loop has no other path."""
    return (
        _CUDA_PRELUDE
        + _find()
        + f"""
/* values [from, end) of a block, element by element (the block's threads in turn): a call on CUDA, not
   inlined into the loads' straight code (rarely taken: the end of a tensor, or a misaligned one) */
LO_COLD uint32_t lo_check_rest(const char *LO_RESTRICT data, int size, int64_t from, int64_t end,
                               uint32_t mask, uint32_t low, int me) {{
  uint32_t acc = 0;
  LO_EACH(x, {THREADS}) {{
    for (int64_t e = from + x; e < end; e += {THREADS}) {{
      const uint32_t b = size == 4 ? ((const uint32_t *)data)[e] : (uint32_t)((const uint16_t *)data)[e];
      acc |= (b & mask) + low;
    }}
  }}
  return acc; }}
LO_FN void lo_check(const int64_t *LO_RESTRICT meta, int32_t *flags, int t, int64_t unit, int me) {{
  const int64_t *LO_RESTRICT m = meta + (int64_t)t * 4;
  const int kind = (int)m[3], size = kind == 0 ? 4 : 2, per = 16 / size;  /* bytes, values per load */
  const int64_t total = m[1], first = (unit - m[0]) * ({CHECK_BYTES * chunks} / size);
  const uint32_t mask = kind == 0 ? 0x7F800000u : (kind == 1 ? 0x7F807F80u : 0x7C007C00u);
  const uint32_t low = kind == 0 ? 0x00800000u : (kind == 1 ? 0x00800080u : 0x04000400u);
  const uint32_t high = kind == 0 ? 0x80000000u : 0x80008000u;  /* the bits above the exponents */
  const char *LO_RESTRICT data = (const char *)m[2];
  /* the values read by whole 16-byte loads: all but the last partial load's, none if misaligned */
  const int64_t full = (LO_ADDR(data) & 15u) == 0 ? total / per * per : 0;
  uint32_t acc = 0;  /* a bit of high set: a NaN or inf */
  for (int c = 0; c < {2 * chunks}; c++) {{  /* a block's loads of {THREADS} x 16 bytes, in turn */
    LO_EACH(x, {THREADS}) {{
      const int64_t i = first + ((int64_t)c * {THREADS} + x) * per;
      if (i + per <= full) {{
        uint32_t w[4];
        LO_RLOAD4(w, data + i * size);
        acc |= ((w[0] & mask) + low) | ((w[1] & mask) + low) | ((w[2] & mask) + low) | ((w[3] & mask) + low);
      }}
    }}
  }}
  /* the rest of the block's values, one at a time (a tensor's last few, or all where misaligned) */
  const int64_t end = first + {2 * chunks * THREADS} * per < total ? first + {2 * chunks * THREADS} * per : total;
  const int64_t from = first > full ? first : full;
  if (from < end) acc |= lo_check_rest(data, size, from, end, mask, low, me);
  if (acc & high) flags[t] = 0;  /* every writer writes 0 */
}}
#ifdef __CUDACC__
extern "C" __global__ void __launch_bounds__({THREADS})
lo_cuda_finite(const int64_t *meta, int count, int32_t *flags) {{
  lo_check(meta, flags, lo_block_tensor(meta, count, 4), blockIdx.x, threadIdx.x);
}}
#else
void lo_finite_emulate(const int64_t *meta, int count, int32_t *flags, int64_t units) {{
  for (int64_t u = 0; u < units; u++) lo_check(meta, flags, lo_find(meta, count, u, 4), u, -1);
}}
#endif
"""
    )


_FINITE_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _scalars(spec: KernelSpec) -> tuple[list[str], str, int]:
    """(declarations of the scalars the body reads, the body with ``s[k]`` -> ``s_k``, scalars per row)."""
    used, body = native.scalar_uses(spec)
    return [f"  const float s_{k} = s[{k}];" for k in used], body, (max(used) + 1 if used else 0)


def scalar_count(spec: KernelSpec) -> int:
    return _scalars(spec)[2]


def generate(spec: KernelSpec, nscalars: int) -> str:
    """CUDA C (also C, for the CPU) of the multi-tensor kernel for ``spec``: ``lo_cuda(meta, count,
    scal)``, one block per unit (FLAT_UNIT elements, or WARPS groups), and ``lo_emulate(meta, count,
    scal, units)`` on the CPU. ``meta`` holds per tensor (in order of their first unit) the first unit,
    rows, n and the pointers (weight tensors, gradient, states); ``scal`` ``nscalars`` fp32 values per
    tensor."""
    ptr_lines, nptr = native.pointer_decls(spec, "m", META, "LO_RESTRICT")
    scal_lines, body, _ = _scalars(spec)
    stride = META + nptr
    head = [
        native.SHARED_HELPERS,
        native.F16_BITS,
        native.RULE_MACROS,
        f"#define LO_STRIDE {stride}",
        _find(),
    ]
    common = [
        "  if (!ok[t]) return;  /* its gradient holds a NaN or inf (the check kernel ran first) */",
        "  const int64_t *LO_RESTRICT m = meta + (int64_t)t * LO_STRIDE;",
        "  const int64_t rows = m[1], n = m[2];",
        *ptr_lines,
        f"  const float *LO_RESTRICT s = scal + (int64_t)t * {max(nscalars, 1)};",
        *scal_lines,
    ]
    wload, wstore, gload = spec.weight.load, spec.weight.store, spec.grad[1]
    if not spec.grouped:
        loads, stores = native.flat_state_io(spec)
        head_fn = [
            "LO_FN void lo_unit(const int64_t *LO_RESTRICT meta, const float *LO_RESTRICT scal,"
            " const int32_t *LO_RESTRICT ok, int t,"
            " int64_t unit, int me) {",
            *common,
            f"  const int64_t total = rows * n, first = (unit - m[0]) * {FLAT_UNIT * VARIANT['chunks']};",
            f"  for (int c = 0; c < {VARIANT['chunks']}; c++) {{  /* a block's chunks of FLAT_UNIT, in turn */",
            f"  const int64_t base = first + (int64_t)c * {FLAT_UNIT};",
            "  if (base >= total) break;",
        ]
        index = f"      const int64_t i = base + k * {THREADS} + x;"
        read = [f"      float p = {wload};", f"      const float g = {gload};", loads]  # element i's values
        update = [body, stores, f"      {wstore}"]  # the rule, then the stores
        if VARIANT["vec"]:  # a thread's ITEMS consecutive elements, each array read and written whole
            loops = _vector_loops(spec, read, update, ptr_lines)
        elif VARIANT["hoist"]:  # every load of the thread's ITEMS elements first, then the arithmetic
            names = ["p", "g", *(f"st_{_ident(n)}" for n, _, _ in spec.states)]
            keep = " ".join(f"H_{v}[k] = {v};" for v in names)
            take = "\n".join(f"      {'const ' if v == 'g' else ''}float {v} = H_{v}[k];" for v in names)
            each = ["    LO_UNROLL", f"    for (int k = 0; k < {ITEMS}; k++) {{", index, "      if (i >= total) break;"]
            loops = [f"  LO_EACH(x, {THREADS}) {{", "    " + " ".join(f"float H_{v}[{ITEMS}];" for v in names),
                     *each, *read, f"      {keep}", "    }", *each, take, *update, "    }", "  }"]  # fmt: skip
        else:  # one element at a time
            loops = [f"  for (int k = 0; k < {ITEMS}; k++) {{", f"    LO_EACH(x, {THREADS}) {{", index,
                     "      if (i >= total) continue;", *read, *update, "    }", "  }"]  # fmt: skip
        unit_fn = "\n".join([*head_fn, *loops, "  }", "}"])  # the chunk loop, the function
        entry = f"""#ifdef __CUDACC__
extern "C" __global__ void __launch_bounds__({THREADS})
lo_cuda(const int64_t *meta, int count, const float *scal, const int32_t *ok) {{
  lo_unit(meta, scal, ok, lo_block_tensor(meta, count, LO_STRIDE), blockIdx.x, threadIdx.x);
}}
#else
void lo_emulate(const int64_t *meta, int count, const float *scal, const int32_t *ok, int64_t units) {{
  for (int64_t u = 0; u < units; u++) lo_unit(meta, scal, ok, lo_find(meta, count, u, LO_STRIDE), u, -1);
}}
#endif"""
        return "\n".join([_CUDA_PRELUDE, *head, unit_fn, entry])
    grouped = _grouped_lanes(spec, common, body, ptr_lines) if VARIANT["lanes"] else _grouped(spec, common, body)
    return "\n".join([_CUDA_PRELUDE, *head, *grouped])


def groups_per_warp() -> int:
    """Groups of GROUP_SIZE elements a warp of a grouped kernel updates under the current VARIANT."""
    return 32 if VARIANT["lanes"] else VARIANT["groups"]


_SIZES = {"float": 4, "uint16_t": 2, "int16_t": 2, "int8_t": 1, "uint8_t": 1}
_FROM_BITS = {"float": "lo_f({})", "uint16_t": "(uint16_t){}", "int16_t": "(int16_t)(uint16_t){}",
              "int8_t": "(int8_t)(uint8_t){}", "uint8_t": "(uint8_t){}"}  # fmt: skip
_TO_BITS = {"float": "lo_u({})", "uint16_t": "(uint32_t){}", "int16_t": "(uint32_t)(uint16_t){}",
            "int8_t": "(uint32_t)(uint8_t){}", "uint8_t": "(uint32_t){}"}  # fmt: skip


def _vector_loads(arrays: list[tuple[str, str]], written: set[str]) -> tuple[list[str], list[str]]:
    """(C that fills ``V_<name>[k]`` with elements i0..i0+ITEMS-1 of each array, C that writes the
    ``written`` ones back): whole 4/8/16-byte words where every array is aligned for that and all
    ITEMS elements exist, else element by element."""
    aligned = " && ".join(f"(LO_ADDR({n} + i0) & {ITEMS * _SIZES[t] - 1}) == 0" for n, t in arrays)
    head = [f"    const int full = i0 + {ITEMS} <= total && {aligned};",
            *(f"    {t} V_{n}[{ITEMS}];" for n, t in arrays)]  # fmt: skip
    vread, vwrite = [], []
    for n, t in arrays:
        e = _SIZES[t]
        words = ITEMS * e // 4
        get = [f"V_{n}[{k}] = " + _FROM_BITS[t].format(
            f"((w[{k * e // 4}] >> {(k * e) % 4 * 8}) & 0x{(1 << (8 * e)) - 1:X}u)") for k in range(ITEMS)]  # fmt: skip
        unpack = " ".join(x + ";" for x in get)
        vread.append(f"      {{ uint32_t w[{words}]; LO_WLOAD(w, {n} + i0, {words}); {unpack} }}")
        if n in written:
            put = [f"w[{k * e // 4}] |= (" + _TO_BITS[t].format(f"V_{n}[{k}]") + f" & 0x{(1 << (8 * e)) - 1:X}u)"
                   f" << {(k * e) % 4 * 8};" for k in range(ITEMS)]  # fmt: skip
            vwrite.append(f"      {{ uint32_t w[{words}] = {{0}}; {' '.join(put)} LO_WSTORE({n} + i0, w, {words}); }}")
    each = f"      for (int k = 0; k < {ITEMS} && i0 + k < total; k++) "  # the unaligned or last elements
    one_read = " ".join(f"V_{n}[k] = {n}[i0 + k];" for n, _ in arrays)
    one_write = " ".join(f"{n}[i0 + k] = V_{n}[k];" for n, _ in arrays if n in written)
    reads = [*head, "    if (full) {", *vread, "    } else {", f"{each}{{ {one_read} }}", "    }"]
    writes = ["    if (full) {", *vwrite, "    } else {", f"{each}{{ {one_write} }}", "    }"]
    return reads, writes


def _vector_loops(spec: KernelSpec, read: list[str], update: list[str], ptr_lines: list[str]) -> list[str]:
    """The flat kernel's loops for ``VARIANT["vec"]``: thread x updates elements base + ITEMS*x + k, its
    arrays read and written through locals ``V_<name>[k]`` (the codecs' ``X[i]`` and ``X + i`` become
    ``V_X[k]`` and ``V_X + k``), the loads first, as ``hoist``."""
    import re

    arrays = []  # (name, C type) of the weight tensors, the gradient and the flat states
    for line in ptr_lines:
        m = re.match(r"\s*(?:const )?(\w+) \*\w* ?(W\d|G|S_\w+) = ", line)
        if m:
            arrays.append((m.group(2), m.group(1)))
    names = "|".join(re.escape(n) for n, _ in arrays)

    def local(code: str) -> str:
        code = re.sub(rf"\b({names})\[i\]", r"V_\1[k]", code)
        return re.sub(rf"\b({names}) \+ i\b", r"(V_\1 + k)", code)

    written = {n for n, _ in arrays if n != "G"}
    reads, writes = _vector_loads(arrays, written)
    vars_ = ["p", "g", *(f"st_{_ident(n)}" for n, _, _ in spec.states)]
    keep = " ".join(f"H_{v}[k] = {v};" for v in vars_)
    take = "\n".join(f"      {'const ' if v == 'g' else ''}float {v} = H_{v}[k];" for v in vars_)
    each = ["    LO_UNROLL", f"    for (int k = 0; k < {ITEMS}; k++) {{", "      const int64_t i = i0 + k;",
            "      if (i >= total) break;"]  # fmt: skip
    return [f"  LO_EACH(x, {THREADS}) {{", f"    const int64_t i0 = base + (int64_t)x * {ITEMS};",
            "    if (i0 >= total) continue;", *reads,
            "    " + " ".join(f"float H_{v}[{ITEMS}];" for v in vars_),
            *each, *(local(r) for r in read), f"      {keep}", "    }",
            *each, take, *(local(u) for u in update), "    }", *writes, "  }"]  # fmt: skip


def _decode_table(kind: str) -> str:
    """``lo_dec_<kind>[c + levels / 2]``: the decoded signed code c before its scale, y / (2 - |y|) with
    y = c / Q, every fp32 operation of the division form done here (torch's fp32 division and
    subtraction, correctly rounded like CUDA's and the CPU kernels'), written as exact literals: one
    load where the division form takes two IEEE divisions (~20 instructions on a GPU)."""
    qs, levels = _quant_consts(kind)
    c = torch.arange(-(levels // 2), levels // 2, dtype=torch.float32)
    y = c / torch.tensor(float(qs), dtype=torch.float32)
    x = y / (torch.tensor(2.0, dtype=torch.float32) - y.abs())
    values = ", ".join(_lit(v) for v in x.tolist())
    return (f"#ifdef __CUDACC__\n__device__\n#else\nstatic\n#endif\n"
            f"const float lo_dec_{kind}[{levels}] = {{{values}}};")  # fmt: skip


def _grouped(spec: KernelSpec, common: list[str], body: str) -> list[str]:
    """A warp per ``VARIANT["groups"]`` consecutive groups of GROUP_SIZE elements (each within one row);
    lane e holds element e of each. The warp loads all its groups' values first, then updates
    them; each state's decoded value (signed) or its square root (unsigned: what is quantised) goes to
    the warp's shared scratch (one slot per group), so after ``LO_SYNC`` each lane finds its groups'
    largest magnitudes there, as the CPU kernel's encode loop does (on CUDA: one warp reduction each)."""
    gs = GROUP_SIZE
    assert gs == 32, "one warp per group"
    states = spec.states
    fns = []
    for name, signed, codec in states:  # one element's code, given the group's top and 1 / scale
        fns.append(
            f"LO_FN int lo_code_{_ident(name)}(float gv, float mag, float top, float inv) {{\n"
            f"  const int is_top = (mag == top) & (top > 0.0f);\n"
            f"  {native.quant_code(signed, codec.kind)}\n  return code; }}"
        )
    decode, keep, encode = [], [], []
    tables: set[str] = set()  # signed codec kinds decoded through a table in shared memory (``table``)
    consts: set[str] = set()  # ... through a constant table (global memory, read through the L1 cache)
    per_warp = VARIANT["groups"]  # consecutive groups a warp updates together
    # each of the warp's groups in turn: its length (0: past the tensor's last group), the index of its
    # first element and of its scale
    each_group = "\n".join([f"    LO_UNROLL for (int q = 0; q < {per_warp}; q++) {{", "      const int len = L_[q];",
                            "      const int64_t b0 = B_[q], k0 = KI_[q]; (void)k0;"])  # fmt: skip
    for name, signed, codec in states:
        v = _ident(name)
        qs, levels = _quant_consts(codec.kind)
        if codec.kind == "q4p":  # two codes per byte, low nibble first (n, so b0, is even)
            raw = f"(((int)C_{v}[(b0 + e) / 2] >> ((e & 1) * 4)) & 15)"
            code = f"({raw} - {8 if signed else 0})"
        else:
            code = f"((int)C_{v}[b0 + e] + {0 if signed else levels // 2})"
        if signed:  # as the CPU kernels' table: y = c / Q; x = y / (2 - |y|)
            if VARIANT["table"]:  # y / (2 - |y|) of each code from the block's table (the same bits)
                decode.append(f"      float st_{v} = T_{codec.kind}[{code} + {levels // 2}] * sc_{v};")
                tables.add(codec.kind)
            else:  # from the constant table of every code's value, made here with the same operations
                decode.append(f"      float st_{v} = lo_dec_{codec.kind}[{code} + {levels // 2}] * sc_{v};")
                consts.add(codec.kind)
            keep.append(f"      X_{v}[e] = st_{v};")
            mag_k, gv_e, mag_e = f"fabsf(X_{v}[k])", f"X_{v}[e]", f"fabsf(X_{v}[e])"
        else:
            decode.append(
                f"      const float u_{v} = ((float){code} + {_lit(1)}) / {_lit(levels)} * sc_{v};"
                f" float st_{v} = u_{v} * u_{v};"
            )
            keep.append(f"      X_{v}[e] = st_{v} < 0.0f ? 0.0f : sqrtf(st_{v});")
            mag_k, gv_e, mag_e = f"X_{v}[k]", f"X_{v}[e]", f"X_{v}[e]"
        if codec.kind == "q4p":
            off = 8 if signed else 0
            put = (
                f"      if (e < len && (e & 1) == 0) {{\n"
                f"        const int lo = lo_code_{v}({gv_e}, {mag_e}, top, inv) + {off};\n"
                f"        const int hi = e + 1 < len ? lo_code_{v}(X_{v}[e + 1], {mag_e.replace('[e]', '[e + 1]')},"
                f" top, inv) + {off} : 0;\n"
                f"        C_{v}[(b0 + e) / 2] = (uint8_t)(lo | (hi << 4));\n      }}"
            )
        else:
            off = 0 if signed else levels // 2
            put = f"      if (e < len) C_{v}[b0 + e] = (int8_t)(lo_code_{v}({gv_e}, {mag_e}, top, inv) - {off});"
        loop_max = (
            f"      uint32_t topb = 0;\n"
            f"      for (int k = 0; k < len; k++) {{ const uint32_t mb = lo_u({mag_k}) & 0x7FFFFFFFu;"
            " topb = mb > topb ? mb : topb; }"
        )
        if VARIANT["warp_max"]:  # on CUDA one reduction over the warp's lanes (sm_80+); the loop on the CPU
            own = f"e < len ? lo_u({mag_e}) & 0x7FFFFFFFu : 0u"
            loop_max = (
                "#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800\n"
                f"      const uint32_t topb = __reduce_max_sync(0xFFFFFFFFu, {own});\n"
                "#elif defined(__CUDACC__)  /* older GPUs: five shuffles */\n"
                f"      uint32_t topb = {own};\n"
                "      for (int o = 16; o > 0; o >>= 1) { const uint32_t w = __shfl_xor_sync(0xFFFFFFFFu, topb, o);"
                " topb = w > topb ? w : topb; }\n"
                f"#else\n{loop_max}\n#endif"
            )
        encode.append(
            f"""      {{  /* {name}: the group's largest magnitude (bits of values >= 0 order like them), the codes */
      float *LO_RESTRICT X_{v} = sh + {len(encode) * gs * per_warp} + q * {gs};
{loop_max}
      const float top = lo_f(topb);
      const uint16_t sb = lo_bf16(top); const float s32 = lo_f((uint32_t)sb << 16);
      const float inv = 1.0f / (s32 > 0.0f ? s32 : 1.0f);
{put}
      if (e == 0 && len > 0) K_{v}[k0] = sb;
      }}"""
        )
    scratch = [f"      float *LO_RESTRICT X_{_ident(n)} = sh + {k * gs * per_warp} + q * {gs};"
               for k, (n, _, _) in enumerate(states)]  # fmt: skip
    scales = [f"      const float sc_{_ident(n)} = lo_f((uint32_t)K_{_ident(n)}[k0] << 16);"
              for n, _, _ in states]  # fmt: skip
    names = ["p", "g", *(f"st_{_ident(n)}" for n, _, _ in states)]
    table_args = "".join(f", const float *LO_RESTRICT T_{k}" for k in sorted(tables))
    unit_fn = "\n".join(
        [
            "LO_FN void lo_unit(const int64_t *LO_RESTRICT meta, const float *LO_RESTRICT scal,"
            " const int32_t *LO_RESTRICT ok, int t,"
            f" int64_t unit, int warp, int me, float *LO_RESTRICT sh{table_args}) {{",
            *common,
            f"  const int64_t gpr = (n + {gs - 1}) / {gs}, groups = rows * gpr;",
            f"  const int64_t first = ((unit - m[0]) * {WARPS} + warp) * {per_warp};",
            "  if (first >= groups) return;  /* the whole warp: its lanes share its groups */",
            "  /* the warp's groups: first element, scale, length (0: past the tensor's last group) */",
            f"  int64_t B_[{per_warp}], KI_[{per_warp}]; int L_[{per_warp}];",
            f"  if ((n & {gs - 1}) == 0) {{  /* rows of whole groups: group k starts at element {gs} k */",
            f"    LO_UNROLL for (int q = 0; q < {per_warp}; q++) {{",
            f"      B_[q] = (first + q) * {gs}; KI_[q] = first + q; L_[q] = first + q >= groups ? 0 : {gs};",
            "    }",
            "  } else {  /* a row ends in a partial group: the warp's row and index in it */",
            "    int64_t r = first / gpr, gi = first % gpr;",
            f"    LO_UNROLL for (int q = 0; q < {per_warp}; q++) {{",
            f"      B_[q] = r * n + gi * {gs}; KI_[q] = r * gpr + gi;"
            f" L_[q] = first + q >= groups ? 0 : (n - gi * {gs} < {gs} ? (int)(n - gi * {gs}) : {gs});",
            "      if (++gi == gpr) { gi = 0; r++; }",
            "    }",
            "  }",
            f"  LO_EACH(e, {gs}) {{  /* every load of the warp's groups first (more in flight), then the arithmetic */",
            "    " + " ".join(f"float H_{v}[{per_warp}];" for v in names),
            each_group,
            "      if (e >= len) continue;",
            "      const int64_t i = b0 + e;",
            *scales,
            *decode,
            f"      float p = {spec.weight.load};",
            f"      const float g = {spec.grad[1]};",
            "      " + " ".join(f"H_{v}[q] = {v};" for v in names),
            "    }",
            each_group,
            "      if (e >= len) continue;",
            "      const int64_t i = b0 + e;",
            *scratch,
            "      " + " ".join(f"{'const ' if v == 'g' else ''}float {v} = H_{v}[q];" for v in names),
            body,
            *keep,
            f"      {spec.weight.store}",
            "    }",
            "  }",
            "  LO_SYNC();",
            f"  LO_EACH(e, {gs}) {{",
            each_group,
            *encode,
            "    }",
            "  }",
            "}",
        ]
    )
    nst = len(states) * gs * per_warp
    # the tables: entry c + half of kind k's codes holds (c / Q) / (2 - |c / Q|), as the decode computed it
    tdecl, tfill, targs = [], [], ""
    for k in sorted(tables):
        qs, levels = _quant_consts(k)
        tdecl.append(f"float T_{k}[{levels}];")
        tfill.append(
            f"if (c < {levels}) {{ const float y = (float)(c - {levels // 2}) / {_lit(qs)};"
            f" T_{k}[c] = y / ({_lit(2)} - fabsf(y)); }}"
        )
        targs += f", T_{k}"
    fill_cuda = f"  {{ const int c = threadIdx.x; {' '.join(tfill)} }}\n  __syncthreads();" if tables else ""
    fill_cpu = f"  for (int c = 0; c < 256; c++) {{ {' '.join(tfill)} }}" if tables else ""
    entry = f"""#ifdef __CUDACC__
extern "C" __global__ void __launch_bounds__({THREADS})
lo_cuda(const int64_t *meta, int count, const float *scal, const int32_t *ok) {{
  __shared__ float sh[{WARPS}][{nst}];
  {" ".join("__shared__ " + d for d in tdecl)}
{fill_cuda}
  const int t = lo_block_tensor(meta, count, LO_STRIDE);
  lo_unit(meta, scal, ok, t, blockIdx.x, threadIdx.x >> 5, threadIdx.x & 31, sh[threadIdx.x >> 5]{targs});
}}
#else
void lo_emulate(const int64_t *meta, int count, const float *scal, const int32_t *ok, int64_t units) {{
  float sh[{nst}];
  {" ".join(tdecl)}
{fill_cpu}
  for (int64_t u = 0; u < units; u++) {{
    const int t = lo_find(meta, count, u, LO_STRIDE);
    for (int w = 0; w < {WARPS}; w++) lo_unit(meta, scal, ok, t, u, w, -1, sh{targs});
  }}
}}
#endif"""
    return [*(_decode_table(k) for k in sorted(consts)), *fns, unit_fn, entry]


LANE_ITEMS = 8  # elements a lane of a ``lanes`` kernel reads and writes at a time


def _lane_io(
    arrays: list[tuple[str, str, int]], written: set[str], bound: str
) -> tuple[list[str], list[str], list[str]]:
    """For :func:`_grouped_lanes`: (declarations and the test ``full``, C that fills ``V_<name>[k]``,
    C that writes the ``written`` ones back) for LANE_ITEMS elements from ``i0`` of each of ``arrays``
    ((name, C type, elements per array entry: 1, or 2 for packed nibbles)), in whole 4-32 byte words
    where every array is aligned for that and all LANE_ITEMS elements are below ``bound``, else entry by
    entry."""
    n_items = LANE_ITEMS
    aligned = " && ".join(f"(LO_ADDR({n} + i0 / {per}) & {min(n_items // per * _SIZES[t], 16) - 1}) == 0"
                          for n, t, per in arrays)  # fmt: skip
    head = [f"    const int full = i0 + {n_items} <= {bound} && {aligned};",
            *(f"    {t} V_{n}[{n_items // per}];" for n, t, per in arrays)]  # fmt: skip
    vread, vwrite, one_read, one_write = [], [], [], []
    for n, t, per in arrays:
        e, entries = _SIZES[t], n_items // per
        words = entries * e // 4
        mask = f"0x{(1 << (8 * e)) - 1:X}u"
        get = " ".join(f"V_{n}[{k}] = " + _FROM_BITS[t].format(f"((w[{k * e // 4}] >> {(k * e) % 4 * 8}) & {mask})")
                       + ";" for k in range(entries))  # fmt: skip
        at, half = f"{n} + i0 / {per}", f"{n} + i0 / {per} + {16 // e}"  # (32 bytes: two 16-byte accesses)
        load = f"LO_WLOAD(w, {at}, {words});" if words <= 4 else \
            f"LO_WLOAD(w, {at}, 4); LO_WLOAD(w + 4, {half}, {words - 4});"  # fmt: skip
        vread.append(f"      {{ uint32_t w[{words}]; {load} {get} }}")
        count = f"({bound} - i0 + {per - 1}) / {per}" if per > 1 else f"{bound} - i0"
        one_read.append(f"      for (int k = 0; k < {entries} && k < {count}; k++) V_{n}[k] = {n}[i0 / {per} + k];")
        if n in written:
            bits = [_TO_BITS[t].format(f"V_{n}[{k}]") for k in range(entries)]
            put = " ".join(f"w[{k * e // 4}] |= ({b} & {mask}) << {(k * e) % 4 * 8};" for k, b in enumerate(bits))
            store = f"LO_WSTORE({at}, w, {words});" if words <= 4 else \
                f"LO_WSTORE({at}, w, 4); LO_WSTORE({half}, w + 4, {words - 4});"  # fmt: skip
            vwrite.append(f"      {{ uint32_t w[{words}] = {{0}}; {put} {store} }}")
            one_write.append(
                f"      for (int k = 0; k < {entries} && k < {count}; k++) {n}[i0 / {per} + k] = V_{n}[k];"
            )
    reads = ["    if (full) {", *vread, "    } else {", *one_read, "    }"]
    writes = ["    if (full) {", *vwrite, "    } else {", *one_write, "    }"] if vwrite else []
    return head, reads, writes


def _grouped_lanes(spec: KernelSpec, common: list[str], body: str, ptr_lines: list[str]) -> list[str]:
    """``VARIANT["lanes"]``: a lane per group of GROUP_SIZE elements (a warp: 32 consecutive groups, a block
    WARPS x 32). The lane reads the group's scales once, then LANE_ITEMS elements at a time (weights,
    gradient and codes in whole words where aligned) decodes, updates and writes the weights, keeping
    each state's decoded value (signed) or its square root (unsigned: what is quantised) in registers and
    its largest magnitude as it goes; then ``1 / scale`` once and the codes, LANE_ITEMS at a time. The same
    operations on the same values as :func:`_grouped` and the CPU kernels (the maximum does not depend
    on the order): the same bits."""
    import re

    gs = GROUP_SIZE
    states = spec.states
    fns, decode, keep, encode = [], [], [], []
    consts: set[str] = set()
    for name, signed, codec in states:
        fns.append(
            f"LO_FN int lo_code_{_ident(name)}(float gv, float mag, float top, float inv) {{\n"
            f"  const int is_top = (mag == top) & (top > 0.0f);\n"
            f"  {native.quant_code(signed, codec.kind)}\n  return code; }}"
        )
    arrays = []  # (name, C type, elements per entry) of the weight tensors and the gradient
    for line in ptr_lines:
        m = re.match(r"\s*(?:const )?(\w+) \*\w* ?(W\d|G) = ", line)
        if m:
            arrays.append((m.group(2), m.group(1), 1))
    names = "|".join(re.escape(n) for n, _, _ in arrays)

    def local(code: str) -> str:
        code = re.sub(rf"\b({names})\[i\]", r"V_\1[k]", code)
        return re.sub(rf"\b({names}) \+ i\b", r"(V_\1 + k)", code)

    codes = []  # (name, C type, elements per entry) of the code arrays
    for line in ptr_lines:
        m = re.match(r"\s*(?:const )?(\w+) \*\w* ?(C_\w+) = ", line)
        if m:
            kind = next(c.kind for n, _, c in states if f"C_{_ident(n)}" == m.group(2))
            codes.append((m.group(2), m.group(1), 2 if kind == "q4p" else 1))
    tops = []
    for name, signed, codec in states:
        v = _ident(name)
        qs, levels = _quant_consts(codec.kind)
        if codec.kind == "q4p":  # two codes per byte, low nibble first
            code = f"((((int)V_C_{v}[k >> 1] >> ((k & 1) * 4)) & 15) - {8 if signed else 0})"
        else:
            code = f"((int)V_C_{v}[k] + {0 if signed else levels // 2})"
        if signed:  # as the CPU kernels' table: y = c / Q; x = y / (2 - |y|)
            decode.append(f"        float st_{v} = lo_dec_{codec.kind}[{code} + {levels // 2}] * sc_{v};")
            consts.add(codec.kind)
            keep.append(f"        X_{v}[c + k] = st_{v}; T_{v} = lo_max_bits(T_{v}, fabsf(st_{v}));")
            gv, mag = f"X_{v}[c + k]", f"fabsf(X_{v}[c + k])"
        else:
            decode.append(
                f"        const float u_{v} = ((float){code} + {_lit(1)}) / {_lit(levels)} * sc_{v};"
                f" float st_{v} = u_{v} * u_{v};"
            )
            keep.append(f"        X_{v}[c + k] = st_{v} < 0.0f ? 0.0f : sqrtf(st_{v});"
                        f" T_{v} = lo_max_bits(T_{v}, X_{v}[c + k]);")  # fmt: skip
            gv, mag = f"X_{v}[c + k]", f"X_{v}[c + k]"
        tops.append(f"    float X_{v}[{gs}]; uint32_t T_{v} = 0u;")
        head, _, writes = _lane_io([(f"C_{v}", dict((n, t) for n, t, _ in codes)[f"C_{v}"],
                                     2 if codec.kind == "q4p" else 1)], {f"C_{v}"}, "end")  # fmt: skip
        if codec.kind == "q4p":
            off = 8 if signed else 0
            gv2, mag2 = (x.replace("c + k]", "c + k + 1]") for x in (gv, mag))  # the high nibble's element
            fill = (f"        if (c + k < len && (k & 1) == 0) {{"
                    f" const int lo = lo_code_{v}({gv}, {mag}, top, inv) + {off};"
                    f" const int hi = c + k + 1 < len ? lo_code_{v}({gv2}, {mag2}, top, inv) + {off} : 0;"
                    f" V_C_{v}[k >> 1] = (uint8_t)(lo | (hi << 4)); }}")  # fmt: skip
        else:
            off = 0 if signed else levels // 2
            fill = f"        if (c + k < len) V_C_{v}[k] = (int8_t)(lo_code_{v}({gv}, {mag}, top, inv) - {off});"
        encode.append("\n".join([
            f"    {{  /* {name}: the codes from the group's largest magnitude */",
            f"    const float top = lo_f(T_{v});",
            "    const uint16_t sb = lo_bf16(top); const float s32 = lo_f((uint32_t)sb << 16);",
            "    const float inv = 1.0f / (s32 > 0.0f ? s32 : 1.0f);",
            f"    LO_UNROLL for (int c = 0; c < {gs}; c += {LANE_ITEMS}) {{",
            "    if (c >= len) break;",
            "    const int64_t i0 = b0 + c;",
            *head,
            f"      LO_UNROLL for (int k = 0; k < {LANE_ITEMS}; k++) {{",
            fill,
            "      }",
            *writes,
            "    }",
            f"    K_{v}[k0] = sb;",
            "    }",
        ]))  # fmt: skip
    scales = [f"    const float sc_{_ident(n)} = lo_f((uint32_t)K_{_ident(n)}[k0] << 16);" for n, _, _ in states]
    head, reads, writes = _lane_io(arrays + codes, {n for n, _, _ in arrays if n != "G"}, "end")
    unit_fn = "\n".join(
        [
            "LO_FN uint32_t lo_max_bits(uint32_t top, float mag) {  /* bits of values >= 0 order like them */",
            "  const uint32_t b = lo_u(mag) & 0x7FFFFFFFu; return b > top ? b : top; }",
            "LO_FN void lo_unit(const int64_t *LO_RESTRICT meta, const float *LO_RESTRICT scal,"
            " const int32_t *LO_RESTRICT ok, int t, int64_t unit, int warp, int me) {",
            *common,
            f"  const int64_t gpr = (n + {gs - 1}) / {gs}, groups = rows * gpr;",
            "  LO_EACH(lane, 32) {  /* lane's group: gq */",
            f"    const int64_t gq = ((unit - m[0]) * {WARPS} + warp) * 32 + lane;",
            "    if (gq >= groups) continue;",
            "    int64_t b0; int len; const int64_t k0 = gq;",
            f"    if ((n & {gs - 1}) == 0) {{ b0 = gq * {gs}; len = {gs}; }}  /* rows of whole groups */",
            f"    else {{ const int64_t r = gq / gpr, gi = gq - r * gpr; b0 = r * n + gi * {gs};"
            f" len = n - gi * {gs} < {gs} ? (int)(n - gi * {gs}) : {gs}; }}",
            "    const int64_t end = b0 + len;",
            *scales,
            *tops,
            f"    LO_UNROLL for (int c = 0; c < {gs}; c += {LANE_ITEMS}) {{",
            "    if (c >= len) break;",
            "    const int64_t i0 = b0 + c;",
            *head,
            *reads,
            f"      LO_UNROLL for (int k = 0; k < {LANE_ITEMS}; k++) {{",
            "        if (c + k >= len) break;",
            "        const int64_t i = i0 + k; (void)i;",
            *decode,
            f"        float p = {local(spec.weight.load)};",
            f"        const float g = {local(spec.grad[1])};",
            local(body),
            *keep,
            f"        {local(spec.weight.store)}",
            "      }",
            *writes,
            "    }",
            *encode,
            "  }",
            "}",
        ]
    )
    bounds = f"{THREADS}, {VARIANT['blocks']}" if VARIANT["blocks"] else f"{THREADS}"
    entry = f"""#ifdef __CUDACC__
extern "C" __global__ void __launch_bounds__({bounds})
lo_cuda(const int64_t *meta, int count, const float *scal, const int32_t *ok) {{
  const int t = lo_block_tensor(meta, count, LO_STRIDE);
  lo_unit(meta, scal, ok, t, blockIdx.x, threadIdx.x >> 5, threadIdx.x & 31);
}}
#else
void lo_emulate(const int64_t *meta, int count, const float *scal, const int32_t *ok, int64_t units) {{
  for (int64_t u = 0; u < units; u++) {{
    const int t = lo_find(meta, count, u, LO_STRIDE);
    for (int w = 0; w < {WARPS}; w++) lo_unit(meta, scal, ok, t, u, w, -1);
  }}
}}
#endif"""
    return [*(_decode_table(k) for k in sorted(consts)), *fns, unit_fn, entry]


# ---------------------------------------------------------------------------------------------------
# Building, preparing and launching.


@dataclass
class GpuKernel:
    """One compiled multi-tensor kernel on one device (CPU: emulated)."""

    spec: KernelSpec
    device: torch.device
    fn: Any  # (units, meta, count, scal, ok) -> None
    nscalars: int
    seconds: float  # compile time
    launches: int = 0
    tensors: int = 0
    groups_per_warp: int = 1  # grouped kernels: VARIANT["groups"] when it was generated
    chunks: int = 1  # flat kernels: VARIANT["chunks"] when it was generated (FLAT_UNIT elements each)

    @property
    def key(self) -> str:  # what ``leanopt bench`` lists under kernels_used (as native.Kernel's key)
        return f"multi-tensor {self.spec.form} on {self.device}"

    @property
    def calls(self) -> int:
        return self.launches


_KERNELS: dict[tuple, GpuKernel] = {}
_FAILED: dict[tuple, str] = {}
_STATUS: dict[str, Any] = {"disabled": None, "warned": False}


def compile_stats() -> list[GpuKernel]:
    return list(_KERNELS.values())


def reset() -> None:
    """Forget built kernels, prepared updates and failures (tests)."""
    _KERNELS.clear()
    _PREPARED.clear()
    _FINITE.clear()
    _FAILED.clear()
    _STATUS.update(disabled=None, warned=False)


def _fail(key: Any, err: Exception) -> None:
    # NVRTC's log follows "Kernel compilation failed:" on the next lines: keep the start of it
    reason = f"{type(err).__name__}: {' | '.join(str(err).strip().splitlines()[:4])[:600]}"
    _FAILED[key] = reason
    if isinstance(err, RuntimeError) and "_compile_kernel" in str(err):
        _STATUS["disabled"] = reason  # this torch has no NVRTC entry point: never again
    _warn(reason)


def _warn(reason: str) -> None:
    if not _STATUS["warned"]:
        _STATUS["warned"] = True
        warnings.warn(
            f"leanopt: multi-tensor CUDA kernels are not available ({reason}); CUDA tensors use the "
            "per-tensor compiled kernels (kernel='fused', or 'auto' where they apply) or the eager ones instead.",
            RuntimeWarning,
            stacklevel=6,
        )


def nvrtc_compile(
    nvrtc: Any, source: str, name: str, arch: str, options: tuple[str, ...] = ()
) -> tuple[bytes, str, str]:
    """``source`` compiled by the NVRTC library ``nvrtc`` (its C API through ctypes) for ``arch``
    (``"sm_90"``) with :data:`NVRTC_OPTIONS` and ``options``: (CUBIN, the lowered name of the kernel
    ``name``, NVRTC's log). A compile error raises ``RuntimeError`` with the log. Needs no GPU: the
    offline check (``find_nvrtc``, benchmarks/nvrtc_check.py) compiles every kernel with it."""

    def log_of(prog: Any) -> str:
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(prog, buf)
        return buf.value.decode(errors="replace")

    def check(code: int, prog: Any = None) -> None:
        if code == 0:
            return
        name_of = nvrtc.nvrtcGetErrorString  # const char *nvrtcGetErrorString(nvrtcResult)
        name_of.restype = ctypes.c_char_p
        log = log_of(prog) if prog is not None else ""
        raise RuntimeError(f"NVRTC: {(name_of(code) or b'error').decode()}\n{log}")

    flags = [f"--gpu-architecture={arch}".encode(), *(o.encode() for o in (*NVRTC_OPTIONS, *options))]
    prog = ctypes.c_void_p()
    check(nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"leanopt.cu", 0, None, None))
    try:
        check(nvrtc.nvrtcAddNameExpression(prog, name.encode()))
        check(nvrtc.nvrtcCompileProgram(prog, len(flags), (ctypes.c_char_p * len(flags))(*flags)), prog)
        size = ctypes.c_size_t()
        check(nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size)))
        cubin = ctypes.create_string_buffer(size.value)
        check(nvrtc.nvrtcGetCUBIN(prog, cubin))
        lowered = ctypes.c_char_p()
        check(nvrtc.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(lowered)))
        mangled = (lowered.value or name.encode()).decode()
        log = log_of(prog)
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return cubin.raw, mangled, log


def find_nvrtc() -> Any | None:
    """An NVRTC library to compile with where there may be no GPU: ``$LEANOPT_NVRTC`` (a path), else
    the one the ``nvidia-cuda-nvrtc`` wheels install (the ``nvrtc`` extra), else torch's own where
    torch was built with CUDA; None if there is none. For the offline check only: a step on a GPU
    uses torch's (``_nvrtc``)."""
    import glob

    paths = [os.environ["LEANOPT_NVRTC"]] if os.environ.get("LEANOPT_NVRTC") else []
    try:
        import nvidia  # namespace package of NVIDIA's CUDA wheels

        for root in nvidia.__path__:
            for pattern in ("cuda_nvrtc/lib/libnvrtc.so.*", "cu*/lib/libnvrtc.so.*"):
                paths += sorted(
                    p for p in glob.glob(os.path.join(root, pattern)) if "alt" not in p and "builtins" not in p
                )
    except ImportError:
        pass
    for path in paths:
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    if torch.version.cuda:
        try:
            from torch.cuda import _utils

            return _utils._get_gpu_rtc_library()
        except Exception:  # noqa: BLE001 - no usable NVRTC
            return None
    return None


def every_source() -> list[tuple[str, str, str]]:
    """(label, kernel name, CUDA source) of one kernel for every rule (AdamW with AMSGrad, SGD with
    Nesterov momentum, Lion) x weight format x state format on bf16, fp16 weights (as bits) in four
    weight formats, and the NaN/inf check: what the offline checks compile (tests/test_gpu_kernels.py,
    benchmarks/nvrtc_check.py)."""
    import itertools

    from ..optimizer import SGD, AdamW, Lion

    out = [("nan check", "lo_cuda_finite", _finite_source(VARIANT["chunks"]))]
    rules = [(AdamW, dict(amsgrad=True)), (SGD, dict(momentum=0.9, nesterov=True)), (Lion, {})]
    cases = [
        (cls, kw, torch.bfloat16, master, states)
        for (cls, kw), master, states in itertools.product(
            rules, ["exact", "compact", "none", "kahan", "stochastic"], ["fp32", "bf16", "int8", "int4"]
        )
    ]
    cases += [(AdamW, {}, torch.float16, master, "int8") for master in ["none", "kahan", "compact", "stochastic"]]
    for cls, kw, dtype, master, states in cases:
        p = torch.nn.Parameter(torch.randn(4, 33).to(dtype))
        opt = cls([p], lr=1e-2, master=master, states=states, **kw)
        group = opt.param_groups[0]
        spec = native.plan(opt.rule, *opt.formats(p, group), p, dtype, opt._init_state(p, group), group)[0]
        label = f"{cls.__name__}/{master}/{states}" if dtype == torch.bfloat16 else f"fp16/{master}"
        out.append((label, "lo_cuda", generate(spec, scalar_count(spec))))
    return out


def _nvrtc_direct(source: str, name: str) -> Any:
    """``name`` compiled by NVRTC and loaded on the current device, without the CUDA toolkit's headers
    (the source includes none): torch's own ``_compile_kernel`` adds the toolkit's include folder and
    fails where there is no toolkit (pip-installed torch), though NVRTC itself ships with torch."""
    from torch.cuda import _utils

    major, minor = torch.cuda.get_device_capability()
    cubin, mangled, _ = nvrtc_compile(_utils._get_gpu_rtc_library(), source, name, f"sm_{major}{minor}")
    return _utils._cuda_load_module(cubin, [mangled])[mangled]


def _nvrtc(source: str, device: torch.device, name: str) -> Any:
    """The CUDA kernel ``name`` of ``source``, compiled with NVRTC for ``device``: called as
    ``fn(units, *args)`` (one block of THREADS threads per unit, on the current stream). Through
    ``torch.cuda._compile_kernel``, or NVRTC directly where that cannot find the CUDA toolkit."""
    compile_kernel = getattr(torch.cuda, "_compile_kernel", None)
    with torch.cuda.device(device):
        try:
            if compile_kernel is None:
                raise RuntimeError(f"torch {torch.__version__} has no torch.cuda._compile_kernel (torch >= 2.8)")
            kern = compile_kernel(source, name, nvcc_options=list(NVRTC_OPTIONS))
        except Exception as first:  # e.g. CUDA_HOME not found (no toolkit), another signature: NVRTC itself
            try:
                kern = _nvrtc_direct(source, name)
            except Exception:
                raise first from None  # (a compile error fails both ways: torch's message names it)

    func = getattr(kern, "func", None)  # torch's wrapper holds the CUfunction (CUDA; not on ROCm)
    launch = _driver_launch() if isinstance(func, ctypes.c_void_p) else None
    index = device.index if device.index is not None else torch.cuda.current_device()
    raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)

    def run(units: int, *args: Any) -> None:
        if launch is None or raw_stream is None:
            with torch.cuda.device(device):  # the module was loaded there; its current stream, as the table's
                kern(grid=(units, 1, 1), block=(THREADS, 1, 1), args=list(args))
            return
        held = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, Tensor) else ctypes.c_int(a) for a in args]
        argv = (ctypes.c_void_p * len(held))(*map(ctypes.addressof, held))
        if torch.cuda.current_device() == index:
            code = launch(func, units, 1, 1, THREADS, 1, 1, 0, raw_stream(index), argv, None)
        else:
            with torch.cuda.device(index):  # the module was loaded in that device's context
                code = launch(func, units, 1, 1, THREADS, 1, 1, 0, raw_stream(index), argv, None)
        if code != 0:
            from torch.cuda import _utils

            _utils._check_cuda(code)  # raises with the driver's message

    return run


_DRIVER: dict[str, Any] = {}


def _driver_launch() -> Any:
    """The CUDA driver's ``cuLaunchKernel``, looked up once. torch's kernel wrapper (``_compile_kernel``'s)
    opens the driver library, looks the function up and builds a Stream object at every launch; on an
    H200 a step's host time was dominated by such per-launch costs (benchmarks/results/gpu-2026-11-30)."""
    fn = _DRIVER.get("launch")
    if fn is None:
        fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernel
        u = ctypes.c_uint
        fn.argtypes = [ctypes.c_void_p, u, u, u, u, u, u, u, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        fn.restype = ctypes.c_int
        _DRIVER["launch"] = fn
    return fn


class _PinnedPool:
    """Pinned host buffers kept for one device's copies (launch tables to it, verdicts back), each reused
    once the copy that read or wrote it has run (``put(..., stream)``: an event recorded behind the copy on
    that stream) or its contents were read (``put(..., None)``). Before, each copy took a new pinned tensor
    from torch's caching host allocator; with the GPU busy (gradient release hooks during backward) that
    cost far more than the copy: on an H200 a release hook took 331-345 us with it and torch's kernel
    wrapper, 108-136 us with this pool and :func:`_driver_launch`
    (benchmarks/results/gpu-2026-11-30-host). Thread-safe: release hooks run on autograd's device thread."""

    LIMIT = 64  # idle buffers kept at most (each at least MIN bytes)
    MIN = 4096

    def __init__(self, alloc: Callable[[int], Tensor] | None = None, new_event: Callable[[], Any] | None = None):
        import threading

        self.alloc = alloc or (lambda size: torch.empty(size, dtype=torch.uint8, pin_memory=True))
        self.new_event = new_event or torch.cuda.Event
        self.idle: list[tuple[Tensor, Any, bool]] = []  # (buffer, its event or None, event to wait for)
        self.lock = threading.Lock()

    QUERIES = 2  # busy buffers asked about per take at most: the oldest first; later ones are younger

    def take(self, nbytes: int) -> tuple[Tensor, Any]:
        """A pinned uint8 tensor of at least ``nbytes`` bytes that nothing reads or writes any more, and
        its event to record again (None for a new buffer). With the GPU behind (release hooks during
        backward) most idle buffers are still being copied: after QUERIES busy ones a new buffer is made
        rather than asking every event."""
        with self.lock:
            asked = 0
            for k, (buf, event, wait) in enumerate(self.idle):
                if buf.numel() < nbytes:
                    continue
                if wait:
                    if asked == self.QUERIES:
                        break
                    asked += 1
                    if not event.query():
                        continue
                del self.idle[k]
                return buf, event
        return self.alloc(max(self.MIN, 1 << max(nbytes - 1, 0).bit_length())), None

    def put(self, buf: Tensor, event: Any, stream: Any) -> None:
        """``buf`` (and ``event``, from :meth:`take`) back; ``stream``: the stream a copy reading or writing
        it was just queued on (it is reused once that copy has run), or None: it is free now."""
        if stream is not None:
            if event is None:
                event = self.new_event()
            event.record(stream)
        with self.lock:
            if len(self.idle) < self.LIMIT:
                self.idle.append((buf, event, stream is not None))


_PINNED: dict[int, _PinnedPool] = {}  # device index -> its pool (an event belongs to one device)


def _pinned(device: torch.device) -> _PinnedPool:
    index = device.index if device.index is not None else torch.cuda.current_device()
    pool = _PINNED.get(index)
    if pool is None:
        pool = _PINNED.setdefault(index, _PinnedPool())
    return pool


def _emulated(source: str, name: str = "lo_emulate", arity: int = 4) -> Any:
    """The same source as C on the CPU: ``fn(units, *args)`` with tensors and ints, like :func:`_nvrtc`
    (``arity`` arguments before ``units``: the second an int, the others pointers)."""
    kinds = [ctypes.c_int if i == 1 else ctypes.c_void_p for i in range(arity)]
    fn = native.build(source, name, [*kinds, ctypes.c_int64]).fn

    def run(units: int, *args: Any) -> None:
        fn(*(a if isinstance(a, int) else a.data_ptr() for a in args), units)

    return run


def _layout(parts: list[array]) -> tuple[list[int], int]:
    """The offsets of ``parts`` laid out one after the other, each 8-byte aligned, and the total bytes."""
    offsets, total = [], 0
    for a in parts:
        offsets.append(total)
        total += -(-len(a) * a.itemsize // 8) * 8
    return offsets, max(total, 8)


def _views(table: Tensor, parts: list[array], offsets: list[int]) -> list[Tensor]:
    """Each of ``parts`` in ``table`` (bytes laid out by :func:`_layout`), as a tensor of its type."""
    kinds = {"q": torch.int64, "f": torch.float32, "i": torch.int32}
    return [table[o : o + len(a) * a.itemsize].view(kinds[a.typecode]) for a, o in zip(parts, offsets, strict=True)]


def _to_device(parts: list[array], device: torch.device) -> list[Tensor]:
    """``parts`` (int64 / fp32 / int32 arrays) on ``device`` in one copy: pinned and non-blocking on
    CUDA (queued on the current stream, no wait; torch keeps the pinned block until it has run)."""
    offsets, total = _layout(parts)
    cuda = device.type == "cuda"
    if cuda:
        pool = _pinned(device)
        buf, event = pool.take(total)
        host = buf[:total]
    else:
        host = torch.empty(total, dtype=torch.uint8)
    base = host.data_ptr()
    for a, off in zip(parts, offsets, strict=True):
        ctypes.memmove(base + off, a.buffer_info()[0], len(a) * a.itemsize)
    if not cuda:
        return _views(host, parts, offsets)
    table = host.to(device, non_blocking=True)  # on the device's current stream
    pool.put(buf, event, torch.cuda.current_stream(device))
    return _views(table, parts, offsets)


def _padded(values: list[float], width: int) -> list[float]:
    """A tensor's row of ``width`` hyper-parameters in a launch table: ``values`` cut or padded with 0."""
    return (values[:width] + [0.0] * width)[:width]


_FINITE: dict[tuple[torch.device, int], Any] = {}


def _finite_kernel(device: torch.device, chunks: int | None = None) -> Any:
    """The NaN/inf check kernel on ``device`` whose blocks check ``chunks`` x CHECK_BYTES bytes
    (default ``VARIANT["chunks"]``; its table must be made for the same: :func:`finite_table`)."""
    chunks = VARIANT["chunks"] if chunks is None else chunks
    fn = _FINITE.get((device, chunks))
    if fn is None and _STATUS["disabled"] is None and ("finite", device, chunks) not in _FAILED:
        try:
            if device.type == "cpu":
                fn = _emulated(_finite_source(chunks), "lo_finite_emulate", 3)
            else:
                fn = _nvrtc(_finite_source(chunks), device, "lo_cuda_finite")
        except Exception as err:  # noqa: BLE001 - no NVRTC, a compile error: the per-tensor check
            _fail(("finite", device, chunks), err)
            return None
        _FINITE[device, chunks] = fn
    return fn


def finite_table(grads: list[Tensor], chunks: int | None = None) -> tuple[array, int] | None:
    """The NaN/inf check's table for ``grads`` (contiguous, one device, fp32/bf16/fp16) and its block
    count, for the check kernel of ``chunks`` (default ``VARIANT["chunks"]``); None if one of them
    cannot be checked this way."""
    unit = CHECK_BYTES * (VARIANT["chunks"] if chunks is None else chunks)  # bytes a block checks
    meta, first = array("q"), 0
    for g in grads:
        kind = _FINITE_KINDS.get(g.dtype)
        if kind is None or not native.dense(g):
            return None
        meta.extend((first, g.numel(), g.data_ptr(), kind))
        first += -(-g.numel() // (unit // g.element_size()))
    return meta, first


def can_check(grad: Tensor) -> bool:
    """Whether ``run_many(..., check=True)`` can check this gradient on its device."""
    return finite_table([grad]) is not None and _finite_kernel(grad.device) is not None


def finite_flags(grads: list[Tensor]) -> Tensor | None:
    """An int32 tensor on the device of ``grads`` (one device, at least one tensor): 1 where that
    gradient is free of NaN and inf, else 0, from one launch of the check kernel, without waiting for
    it (FSDP2 all-reduces these flags on the device: leanopt.distributed); None when this check cannot
    run (the caller checks per tensor)."""
    table = finite_table(grads)
    fn = None if table is None else _finite_kernel(grads[0].device)
    if fn is None:
        return None
    meta, units = table
    dev_meta, flags = _to_device([meta, array("i", [1]) * len(grads)], grads[0].device)
    if units:
        fn(units, dev_meta, len(grads), flags)
    return flags


def all_finite_many(grads: list[Tensor]) -> list[bool] | None:
    """Whether each of ``grads`` (on one device) is free of NaN and inf: one launch, one transfer back
    (the step's one wait for the GPU); None when this check cannot run (the caller checks per tensor)."""
    if not grads:
        return []
    flags = finite_flags(grads)
    return None if flags is None else [bool(f) for f in flags.tolist()]


def kernel_for(spec: KernelSpec, device: torch.device) -> GpuKernel | None:
    """The kernel for ``spec`` on ``device``; None (one warning) if it cannot be compiled there."""
    key = (spec, device, *VARIANT.values())
    kernel = _KERNELS.get(key)
    if kernel is not None:
        return kernel
    if key in _FAILED or _STATUS["disabled"] is not None:
        return None
    nscalars = scalar_count(spec)
    source = generate(spec, nscalars)
    start = time.perf_counter()
    try:
        fn = _emulated(source, "lo_emulate", 4) if device.type == "cpu" else _nvrtc(source, device, "lo_cuda")
    except Exception as err:  # noqa: BLE001 - no NVRTC, a compile error: the other executors
        _fail(key, err)
        return None
    kernel = _KERNELS[key] = GpuKernel(spec, device, fn, nscalars, time.perf_counter() - start,
                                       groups_per_warp=groups_per_warp(), chunks=VARIANT["chunks"])  # fmt: skip
    return kernel


def wanted(kernel: str, device: torch.device) -> bool:
    """Whether an update on ``device`` with the optimizer's ``kernel`` choice takes this path: on CUDA
    for ``"auto"`` and ``"fused"`` (measured on an H200: benchmarks/results/gpu-2026-11-29; 13x faster
    than the per-tensor compiled path on GPT-2's tensors, 50x than the eager int8 path), on the CPU
    only emulated (tests). ``LEANOPT_GPU_KERNELS=0``: never (``"fused"`` then means the per-tensor
    compiled path, ``"auto"`` that path for large groups and fp32/bf16 states, else the eager one)."""
    if kernel not in ("auto", "fused") or os.environ.get("LEANOPT_GPU_KERNELS", "1") == "0":
        return False
    return device.type == "cuda" or (EMULATE and kernel == "fused" and device.type == "cpu")


@dataclass(slots=True)
class GpuLaunch:
    """One tensor's prepared update (its step count already advanced); ``keep`` holds what the
    pointers point into until the launch is queued."""

    kernel: GpuKernel
    units: int
    row: list[int]  # rows, n, pointers
    scalars: list[float]
    keep: list = field(default_factory=list)
    slot: int = 0  # the gradient's index in ``row``
    refs: tuple = ()  # (state key, weakref, address) of every state tensor in ``row``


#: id(state dict) -> (what the preparation depends on, kernel, [(state key, weakref, address)], table row
#: with the gradient's slot to fill, that slot, blocks); checked on use, as native.launch's plans
_PREPARED: dict[int, tuple] = {}


def launch(
    rule: Rule, weight_format: WeightFormat, state_format: StateFormat, param: Tensor, grad: Tensor,
    state: dict[str, Any], group: dict[str, Any], scalars: dict | None = None, random_bits: Any = None,
    cache_key: int | None = None,
) -> GpuLaunch | None:  # fmt: skip
    """Prepare one update like ``reference_step`` for :func:`run_many`, advancing ``state['step']``;
    None (nothing changed) when this path does not cover it. ``scalars`` caches the rule's flags and
    hyper-parameter values per group within one optimizer step. ``random_bits`` (stochastic rounding)
    is called once, after the step count advances, as the reference executor does. ``cache_key``: as
    :func:`native.launch`'s (what the prepared table row is kept under; default ``id(state)``)."""
    from .fused import _advance_step, fused_form

    if not native.same_layout(grad, param) or grad.device != param.device:
        return None
    if weight_format.needs_random and random_bits is None:
        return None
    cache = scalars if scalars is not None else {}
    form = cache.get(("gpu form", id(rule)))
    if form is None:
        form = cache["gpu form", id(rule)] = fused_form(rule)
        if form is None:
            return None
    flags = cache.get(("gpu flags", id(group)))
    if flags is None:
        flags = cache["gpu flags", id(group)] = form.flags(group)
    check = (rule, weight_format, state_format, flags, grad.dtype, param.dtype, param.shape,
             param.data_ptr(), param.stride(), param.device)  # fmt: skip
    ident = id(state) if cache_key is None else cache_key
    prepared = _PREPARED.get(ident)
    if prepared is None or prepared[0] != check or not native.same_tensors(prepared[2], state):
        planned = native._plan(rule, weight_format, state_format, param, grad.dtype, state, group, param.device.type)
        spec = None if planned is None else planned[0]
        if spec is None:
            return None
        _, tensors, keys = planned
        kernel = kernel_for(spec, param.device)
        if kernel is None:
            return None
        refs = tuple((k, weakref.ref(t), t.data_ptr()) for k, t in zip(keys, tensors[1:], strict=True))
        rows, n = native.kernel_rows(param.shape)
        slot = 2 + len(spec.weight.ctypes_)  # after rows, n and the weight tensors
        row = [rows, n, *(t.data_ptr() for t in tensors)]
        row.insert(slot, 0)
        if spec.weight.random:
            row += [0, 0]  # the noise's key and base index (formats/noise.py), per step
        if spec.grouped:
            units = -(-rows * -(-n // GROUP_SIZE) // (WARPS * kernel.groups_per_warp))
        else:
            units = -(-rows * n // (FLAT_UNIT * kernel.chunks))
        if len(_PREPARED) > 100_000:
            _PREPARED.clear()
        prepared = _PREPARED[ident] = (check, kernel, refs, row, slot, units)
    step = _advance_step(state)
    key = ("gpu", id(group), step)  # the native launches cache ctypes arrays in the same dict
    values = cache.get(key)
    if values is None:
        values = cache[key] = form.scalars(group, step)
    row = list(prepared[3])
    row[prepared[4]] = grad.data_ptr()
    keep: list = [grad]
    if prepared[1].spec.weight.random:  # the reference's noise: this update's key, element 0's index
        row[-2], row[-1] = _signed64(random_bits.key_at(step)), random_bits.base(param)
    return GpuLaunch(prepared[1], prepared[5], row, values, keep, prepared[4], prepared[2])


def _signed64(k: int) -> int:
    """A 64-bit key as the signed int64 the launch tables hold (the kernels read its bits back)."""
    return k - (1 << 64) if k >> 63 else k


def _batch(group: list[GpuLaunch]) -> tuple[array, array, int]:
    """The table, hyper-parameters and block count of one kernel's launch over ``group``."""
    kernel = group[0].kernel
    meta, scal, first = array("q"), array("f"), 0
    width = max(kernel.nscalars, 1)
    for job in group:
        meta.append(first)
        meta.extend(job.row)
        first += job.units
        scal.extend(_padded(job.scalars, width))
    return meta, scal, first


def _by_kernel(jobs: list[GpuLaunch]) -> list[list[GpuLaunch]]:
    by: dict[int, list[GpuLaunch]] = {}
    for job in jobs:
        if job.units:
            by.setdefault(id(job.kernel), []).append(job)
    return list(by.values())


def run_many(
    jobs: list[GpuLaunch], check: bool = False, reduce: Callable[[Tensor], Any] | None = None,
    verdicts: tuple[Tensor, list[int]] | None = None,
) -> list[tuple[GpuLaunch, Tensor]]:  # fmt: skip
    """Run prepared updates: one launch per kernel (combination and device), its table copied once.

    ``verdicts`` = (flags, positions): each job's verdict is already on the device, ``flags[positions[k]]``
    for ``jobs[k]`` (int32, 1 = update; an FSDP2 step's, all-reduced over the ranks): each kernel's
    launch reads its jobs' verdicts gathered on the device (``index_select``), the host never waits.

    ``check``: each gradient is first checked for NaN/inf on the device (one more launch per kernel)
    and a tensor whose gradient holds one is left unchanged, without the host waiting for the verdict;
    returns (job, its verdict: a 0-d int32 device tensor, 1 = updated) for the caller to read later
    (without ``check``: nothing).
    ``reduce`` (with ``check``): called on a kernel's int32 verdicts between the check and the update,
    to change them in place on the device (FSDP2: the minimum over the ranks, so that every rank skips
    a tensor whose gradient holds a NaN or inf in any rank's rows)."""
    out = []
    position = {id(job): k for k, job in enumerate(jobs)} if verdicts is not None else {}
    for group in _by_kernel(jobs):
        kernel = group[0].kernel
        meta, scal, units = _batch(group)
        parts = [meta, scal, array("i", [1]) * len(group)]
        table = finite_table([job.keep[0] for job in group]) if check else None
        fn = _finite_kernel(kernel.device) if table is not None else None
        if check and fn is None:
            raise RuntimeError("leanopt: the NaN/inf check kernel is not available for these gradients")
        if table is not None:
            parts.append(table[0])
        if verdicts is not None:  # where each job's verdict sits in the flags: gathered on the device
            parts.append(array("q", (verdicts[1][position[id(job)]] for job in group)))
        dev = _to_device(parts, kernel.device)
        if table is not None and table[1]:
            fn(table[1], dev[3], len(group), dev[2])  # writes 0 into ok[t] for a gradient with NaN/inf
        if table is not None and reduce is not None:
            reduce(dev[2])
        ok = dev[2] if verdicts is None else verdicts[0].index_select(0, dev[-1])
        kernel.fn(units, dev[0], len(group), dev[1], ok)
        kernel.launches += 1
        kernel.tensors += len(group)
        if check:
            out += [(job, ok[k]) for k, job in enumerate(group)]
    return out


@dataclass(slots=True)
class GpuStepPlan:
    """A step of CUDA updates kept for the next ``step()`` (kernels/step_plan.py does the same for the
    native CPU kernels): what must not have changed (checked by ``step_plan._valid``), the step
    counters, and per kernel its launch table with the gradients' slots to refill. A planned step is
    Python over lists and one copy to the device, then the launches: no per-tensor preparation."""

    signature: tuple
    mode: tuple  # (kernel, nonfinite) of the optimizer
    form: Any
    segments: list  # step_plan.Segment: tensors of one param group at one step count
    state_ids: list[int]
    refs: list[tuple]
    param_ptrs: list[int]
    shapes: list
    layouts: list  # step_plan.layouts: None (contiguous) or a dense parameter's strides
    grad_dtypes: list
    device: torch.device
    device_index: int  # for step_plan._valid: every gradient on this device (-1: the CPU)
    counters: list  # per tensor: a C float view of its fp32 step tensor
    seg_of: list[int]  # per tensor: its segment
    #: (check table, [(position of a gradient's pointer, tensor)], blocks, tensors in order, the check
    #: kernel's chunks: what the table was made for)
    finite: tuple | None
    batches: list[tuple]  # (kernel, table, [(position, tensor)], tensors in rows, blocks)
    #: stochastic rounding, per batch: [(position of a tensor's noise key, parameter index, tensor)]
    noise: list = field(default_factory=list)
    checker: Any = None  # plan_check.Checker (made at the first check), or False: the check in Python
    #: FSDP2: the device mesh of every parameter (None: plain tensors; the meshes are equal, not always
    #: the same object) and per tensor the mesh and placements its gradient must have (its parameter's);
    #: the plan's addresses, shapes and layouts are then those of the local tensors, and the NaN/inf
    #: verdicts are all-reduced over the mesh before the updates
    mesh: Any = None
    meshes: list = field(default_factory=list)
    placements: list = field(default_factory=list)
    #: per batch: where its tensors' verdicts sit in the check's flags: (start, stop) of a slice, or the
    #: position of an int64 index array among the copied parts (an FSDP2 plan checks in step order, the
    #: same on every rank, which the batches need not follow)
    verdict_at: list = field(default_factory=list)
    #: the launch tables (:class:`_PlanTable`): a host image and its device copy with its views, made at
    #: the plan's first run; each step writes what changes into the image and copies it over
    table: Any = None


def build_plan(
    opt: Any, work: list[tuple[Tensor, dict]], jobs: list[GpuLaunch], mesh: Any = None
) -> GpuStepPlan | None:
    """The plan of the step that has just run ``jobs`` for ``work`` (one per item, in order), or None
    when such a step cannot be repeated by a plan (tensors on several devices, a step counter that is
    not a plain fp32 tensor, a gradient the NaN/inf kernel does not read). ``mesh``: FSDP2, every
    parameter a DTensor on this device mesh whose gradient is placed like it (else None); ``jobs`` then
    update their local rows."""
    from . import step_plan
    from .fused import fused_form  # fused imports this module

    if not jobs or len(jobs) != len(work) or len({p.device for p, _ in work}) != 1:
        return None
    form = fused_form(opt.rule)
    sig, _, grads = step_plan._signature(opt.param_groups)
    if form is None or len(grads) != len(jobs):
        return None
    params, meshes, placements, rows = [p for p, _ in work], [], [], [job.refs for job in jobs]
    if mesh is not None:  # FSDP2: the local tensors the jobs were made for, and what makes them so
        sharded = step_plan.sharded(opt, work, grads, rows, mesh)
        if sharded is None:
            return None
        params, grads, meshes, placements, rows = sharded
    segments: list = []
    index: dict[tuple[int, float], int] = {}
    seg_of, counters, refs = [], [], []
    for (p, group), row in zip(work, rows, strict=True):
        counter = native._step_counter(opt.state[p]["step"])
        if counter is None:
            return None
        value = counter[1].value  # after this step
        if (id(group), value) not in index:
            index[id(group), value] = len(segments)
            segments.append(step_plan.Segment(group, form.flags(group), tuple(opt.rule.states(group)),
                                              (group["master"], group["states"]), value, None))  # fmt: skip
        seg_of.append(index[id(group), value])
        counters.append(counter[1])
        refs.append((*row, ("step", counter[0], counter[2])))
    batches = []
    by: dict[int, list[int]] = {}
    for i, job in enumerate(jobs):
        if job.units:
            by.setdefault(id(job.kernel), []).append(i)
    noise = []
    for members in by.values():
        meta, _, units = _batch([jobs[i] for i in members])
        width = 1 + len(jobs[members[0]].row)
        slots = [(k * width + 1 + jobs[i].slot, i) for k, i in enumerate(members)]
        batches.append((jobs[members[0]].kernel, meta, slots, members, units))
        random = jobs[members[0]].kernel.spec.weight.random  # the key: second to last in a row
        noise.append([((k + 1) * width - 2, opt.param_index(work[i][0]), i) for k, i in enumerate(members)]
                     if random else [])  # fmt: skip
    finite, verdict_at = None, []
    if opt.nonfinite != "ignore":
        # checked in batch order (each batch's verdicts one slice); FSDP2: in step order, every tensor
        # (the ranks' flags meet in an all-reduce: the same tensors in the same order on each rank)
        order = [i for *_, members, _ in batches for i in members] if mesh is None else list(range(len(jobs)))
        table = finite_table([grads[i] for i in order])
        if table is None:
            return None
        finite = (table[0], [(4 * k + 2, i) for k, i in enumerate(order)], table[1], order, VARIANT["chunks"])
        where = {i: k for k, i in enumerate(order)}
        for *_, members, _ in batches:
            at = [where[i] for i in members]
            run = at == list(range(at[0], at[0] + len(at)))
            verdict_at.append((at[0], at[0] + len(at)) if run else array("q", at))
    device = work[0][0].device
    return GpuStepPlan(
        signature=sig, mode=(opt.kernel, opt.nonfinite), form=form, segments=segments,
        state_ids=[id(opt.state.get(p)) for p, _ in work], refs=refs,
        param_ptrs=[p.data_ptr() for p in params], shapes=[p.shape for p in params],
        layouts=step_plan.layouts([(p, None) for p in params]), grad_dtypes=[g.dtype for g in grads], device=device,
        device_index=device.index if device.type == "cuda" else -1, counters=counters, seg_of=seg_of,
        finite=finite, batches=batches, noise=noise,
        mesh=mesh, meshes=meshes, placements=placements, verdict_at=verdict_at,
    )  # fmt: skip


def run_plan(plan: GpuStepPlan, opt: Any) -> list[int] | None:
    """One ``step()`` of ``opt`` by ``plan``: [] when it ran, None (nothing changed) when the plan does
    not apply. The NaN/inf check runs on the device first; with ``nonfinite="skip"`` the update kernels
    leave a tensor with a bad gradient alone and the host does not wait: the verdicts are copied back
    right behind the check, ahead of the updates, and read later (``opt._step_verdicts``, see
    :func:`read_verdicts`; the next ``step()`` reads them, so it waits for this step's check, not for
    its updates: it prepares its launches while the GPU still runs them). With "raise" it waits for
    them and returns None if one is bad (the general path then raises). An FSDP2 plan (``plan.mesh``)
    checks every tensor in step order and all-reduces the verdicts over the mesh (the minimum: a NaN or
    inf in any rank's rows) between the check and the updates, on the device; a rank whose plan does
    not apply makes the same all-reduce in ``optimizer._step_sharded``."""
    from . import plan_check

    if (opt.kernel, opt.nonfinite) != plan.mode or not wanted(opt.kernel, plan.device):
        return None
    checked = plan_check.check(plan, opt)
    if checked is None:
        return None
    params, grad_ptrs = checked
    segments = plan.segments
    if not plan_check.counters_at(plan, [seg.expect for seg in segments]):  # a step count changed from outside
        return None
    fn = None if plan.finite is None else _finite_kernel(plan.device, plan.finite[4])
    if plan.finite is not None and fn is None:
        return None
    steps = [ctypes.c_float(seg.expect + 1.0).value for seg in segments]  # float32 + 1
    values = [plan.form.scalars(seg.group, step) for seg, step in zip(segments, steps, strict=True)]
    kept = plan.table
    if kept is None:
        kept = plan.table = _PlanTable(plan)
    kept.fill(plan, opt, grad_ptrs, steps, values)
    on_device, oks = kept.to_device(plan), kept.oks
    nb = 3 * len(plan.batches)
    pending = None
    if plan.finite is not None:
        flags = on_device[nb + 1]
        if plan.finite[2]:
            fn(plan.finite[2], on_device[nb], len(plan.finite[3]), flags)
        if plan.mesh is not None:  # FSDP2: a tensor with a NaN/inf in any rank's rows is left alone on all
            from ..distributed import all_ranks_min

            all_ranks_min(flags, plan.mesh)
        if opt.nonfinite == "raise":
            verdicts = flags.tolist()  # waits: nothing may change before the error
            if not all(verdicts):
                if plan.mesh is not None:  # FSDP2: raised here (the general path would all-reduce again)
                    bad = plan.finite[3][verdicts.index(0)]
                    raise FloatingPointError(f"non-finite gradient for parameter {opt.param_index(params[bad])}")
                return None
        else:  # "skip": the verdicts' copy queued here, between the check and the updates
            befores = _Befores(params, plan.finite[3], plan.counters, plan.seg_of, [s.expect for s in segments])
            pending = _verdicts_later(flags, befores)
        if any(ok is None for ok in oks):  # FSDP2: a gather of the verdicts where a batch's do not run in check order
            gathers = iter(on_device[nb + 2 :])
            oks = [flags.index_select(0, next(gathers)) if ok is None else ok for ok in oks]
    for b, (kernel, _, _, members, units) in enumerate(plan.batches):
        kernel.fn(units, on_device[3 * b], len(members), on_device[3 * b + 1], oks[b])
        kernel.launches += 1
        kernel.tensors += len(members)
    plan_check.set_counters(plan, steps)
    for seg, step in zip(segments, steps, strict=True):
        seg.expect = step
    if pending is not None:
        opt._step_verdicts = pending
    return []


class _PlanTable:
    """A planned step's launch tables: one host image of them (ctypes bytes laid out as :func:`_to_device`
    lays out its parts: per batch its table, hyper-parameters and verdicts; then the NaN/inf check's table,
    its verdicts and an FSDP2 plan's gathers), made from the plan's templates at its first run, and its
    device copy with the views the launches read. Each step writes into the image only what changes (the
    gradients' addresses, by one C scatter where the plan's check ran in C; the hyper-parameters; the
    stochastic rounding keys) and copies the image over in one copy. Before 2026-12-01 each step built
    every part anew and the device table and its views too."""

    __slots__ = ("offsets", "total", "image", "words", "pairs", "src", "dst", "rows", "table", "views", "oks",
                 "stream")  # fmt: skip

    def __init__(self, plan: GpuStepPlan) -> None:
        c = ctypes
        parts: list[array] = []
        for kernel, template, _, members, _ in plan.batches:
            width = max(kernel.nscalars, 1)
            parts += [array("q", template), array("f", [0.0]) * (width * len(members)), array("i", [1]) * len(members)]
        nb = 3 * len(plan.batches)
        if plan.finite is not None:
            parts += [array("q", plan.finite[0]), array("i", [1]) * len(plan.finite[3])]
            parts += [at for at in plan.verdict_at if isinstance(at, array)]  # gathers (FSDP2 plans only)
        self.image, self.offsets = _image(parts)
        self.total = len(self.image)
        self.words = (c.c_int64 * (self.total // 8)).from_buffer(self.image)  # (_layout: 8-byte multiples)
        slots = [(self.offsets[3 * b] // 8, batch[2]) for b, batch in enumerate(plan.batches)]
        if plan.finite is not None:
            slots.append((self.offsets[nb] // 8, plan.finite[1]))
        self.pairs = [(base + pos, i) for base, within in slots for pos, i in within]  # (word, gradient)
        self.dst = (c.c_int64 * max(len(self.pairs), 1))(*[w for w, _ in self.pairs])
        self.src = (c.c_int64 * max(len(self.pairs), 1))(*[i for _, i in self.pairs])
        #: per batch: (byte offset of its hyper-parameters, width, the segment of each row or, when all
        #: rows are of one segment, that segment alone)
        self.rows = []
        for b, (kernel, _, _, members, _) in enumerate(plan.batches):
            segs = [plan.seg_of[i] for i in members]
            self.rows.append((self.offsets[3 * b + 1], max(kernel.nscalars, 1),
                              segs[0] if len(set(segs)) == 1 else segs))  # fmt: skip
        self.table = torch.empty(self.total, dtype=torch.uint8, device=plan.device)
        self.views = _views(self.table, parts, self.offsets)
        if plan.finite is None:
            self.oks = [self.views[3 * b + 2] for b in range(len(plan.batches))]
        else:  # the update kernels read their slice of the check's verdicts (FSDP2: maybe a gather)
            flags = self.views[nb + 1]
            self.oks = [flags[at[0] : at[1]] if isinstance(at, tuple) else None for at in plan.verdict_at]
        self.stream = torch.cuda.current_stream(plan.device) if plan.device.type == "cuda" else None

    def fill(self, plan: GpuStepPlan, opt: Any, grad_ptrs: Any, steps: list[float], values: list) -> None:
        """This step's gradient addresses (``grad_ptrs``, from plan_check.check), hyper-parameters
        (``values``, per segment) and stochastic rounding keys into the image."""
        from . import plan_check

        scatter = plan_check._function("lo_scatter64") if isinstance(grad_ptrs, ctypes.Array) else None
        if scatter:
            scatter(len(self.pairs), self.src, self.dst, grad_ptrs, self.words)
        else:
            words = self.words
            for w, i in self.pairs:
                words[w] = grad_ptrs[i]
        base = ctypes.addressof(self.image)
        for b, (offset, width, segs) in enumerate(self.rows):
            row = [array("f", _padded(v, width)).tobytes() for v in values]
            many = isinstance(segs, list)  # rows of several segments, else each row the one segment's
            data = b"".join(map(row.__getitem__, segs)) if many else row[segs] * len(plan.batches[b][3])
            ctypes.memmove(base + offset, data, len(data))
            at = self.offsets[3 * b] // 8
            for pos, index, i in plan.noise[b]:  # stochastic rounding: this update's key (formats/noise.py)
                self.words[at + pos] = _signed64(noise_key(opt.seed, index, int(steps[plan.seg_of[i]])))

    def to_device(self, plan: GpuStepPlan) -> list[Tensor]:
        """The image copied into the device table; its views. CUDA: one pinned, non-blocking copy on the
        current stream, which comes after the launches of the plan's last step that read the table (after
        a change of stream: made to wait for the old one)."""
        if plan.device.type != "cuda":  # emulated: straight into the table
            ctypes.memmove(self.table.data_ptr(), self.image, self.total)
            return self.views
        stream = torch.cuda.current_stream(plan.device)
        if stream != self.stream:  # the table's last readers were queued on another stream: after them
            stream.wait_stream(self.stream)
            self.table.record_stream(stream)  # and not reused after the plan is dropped before this one's have run
            self.stream = stream
        pool = _pinned(plan.device)
        buf, event = pool.take(self.total)
        ctypes.memmove(buf.data_ptr(), self.image, self.total)
        self.table.copy_(buf[: self.total], non_blocking=True)
        pool.put(buf, event, stream)
        return self.views


# ---------------------------------------------------------------------------------------------------
# One parameter's plan on the CUDA path: gradient release's hooks (release.py) update one parameter at
# a time; each went through the general path (checks, state, formats, launch preparation, a table made
# and copied). After a hook's update ran here, its plan repeats it: the checks of step_plan.run_param
# for that tensor, its step counter compared and advanced through a C float, and its launch table -
# kept on the device with its views, made once - refilled on the host (the gradient's address, the
# step's hyper-parameters) and copied over in one pinned copy; then the NaN/inf check's launch and the
# update's, the verdict queued for optimizer.step().


@dataclass(slots=True)
class GpuParamPlan:
    mode: tuple  # (kernel, nonfinite) of the optimizer
    form: Any
    group_id: int
    group_key: tuple  # (formats, states, flags) of the group when planned (step_plan._group_key)
    state_id: int
    refs: tuple  # (state key, weakref, address) of every state tensor, the step tensor last
    param_ptr: int
    shape: torch.Size
    layout: Any  # None (contiguous) or the parameter's strides
    grad_dtype: torch.dtype
    device: torch.device
    kernel: GpuKernel
    units: int
    counter: Any  # a C float over the step tensor
    expect: float  # the counter's value before the next update
    index: int  # the parameter's index (its verdict)
    check: tuple | None  # the NaN/inf check: (its blocks, the check kernel's chunks); None: "ignore"
    #: the launch tables as one host image (ctypes bytes: table row, hyper-parameters, verdict, check
    #: row) and its device copy; views of the image where each hook writes (the gradient's address in
    #: both rows, the hyper-parameters) and of the device copy that the launches read
    image: Any
    grad_slots: tuple
    scal: Any
    on_device: Tensor
    views: tuple  # (table, hyper-parameters, verdicts, check table, the verdict as a 0-d tensor)
    stream: Any  # CUDA: the stream the table's last copy and launches were queued on


def param_plan(opt: Any, param: Tensor, group: dict[str, Any], grad: Tensor) -> GpuParamPlan | None:
    """The plan of the update of ``param`` from ``grad`` that has just run on this path (a gradient
    release hook), or None when a plan cannot repeat it (stochastic rounding, an empty tensor, a step
    counter that is not a plain fp32 CPU tensor, ``nonfinite="raise"``, verdicts not deferred). Only
    reads (it allocates the plan's device table)."""
    from . import step_plan
    from .fused import fused_form

    skip = opt.nonfinite == "skip"
    if not (opt.nonfinite == "ignore" or (skip and opt._defer_verdicts)) or type(grad) is not Tensor:
        return None
    state = opt.state.get(param)
    prepared = _PREPARED.get(id(state)) if state is not None else None
    form = fused_form(opt.rule)
    if prepared is None or form is None:
        return None
    wfmt, sfmt = opt.formats(param, group)
    now = (opt.rule, wfmt, sfmt, form.flags(group), grad.dtype, param.dtype, param.shape, param.data_ptr(),
           param.stride(), param.device)  # fmt: skip
    _, kernel, refs, row, slot, units = prepared
    if prepared[0] != now or not native.same_tensors(refs, state) or kernel.spec.weight.random or not units:
        return None
    counter = native._step_counter(state.get("step"))
    if counter is None:
        return None
    check = None
    parts = [array("q", [0, *row]), array("f", [0.0] * max(kernel.nscalars, 1)), array("i", [1])]
    if skip:
        chunks = VARIANT["chunks"]
        table = finite_table([grad], chunks)
        if table is None or _finite_kernel(grad.device, chunks) is None:
            return None
        check = (table[1], chunks)
        parts.append(table[0])
    image, offsets = _image(parts)
    c = ctypes
    grad_slots = (c.c_int64.from_buffer(image, offsets[0] + 8 * (1 + slot)),) + (
        (c.c_int64.from_buffer(image, offsets[3] + 16),) if skip else ()  # the check row's pointer
    )  # fmt: skip
    scal = (c.c_float * len(parts[1])).from_buffer(image, offsets[1])
    on_device = torch.empty(len(image), dtype=torch.uint8, device=param.device)
    table, scal_view, ok, *finite = _views(on_device, parts, offsets)
    return GpuParamPlan(
        mode=(opt.kernel, opt.nonfinite), form=form, group_id=id(group),
        group_key=step_plan._group_key(opt, form, group), state_id=id(state),
        refs=(*refs, ("step", counter[0], counter[2])), param_ptr=param.data_ptr(),
        shape=param.shape, layout=None if param.is_contiguous() else param.stride(), grad_dtype=grad.dtype,
        device=param.device, kernel=kernel, units=units, counter=counter[1], expect=counter[1].value,
        index=opt.param_index(param), check=check, image=image, grad_slots=grad_slots, scal=scal,
        on_device=on_device, views=(table, scal_view, ok, finite[0] if finite else None, ok[0]),
        stream=torch.cuda.current_stream(param.device) if param.device.type == "cuda" else None,
    )  # fmt: skip


def _image(parts: list[array]) -> tuple[Any, list[int]]:
    """``parts`` laid out as :func:`_to_device` lays them out, in a ctypes buffer, and their offsets."""
    offsets, total = _layout(parts)
    image = (ctypes.c_char * total)()
    for a, off in zip(parts, offsets, strict=True):
        ctypes.memmove(ctypes.addressof(image) + off, a.buffer_info()[0], len(a) * a.itemsize)
    return image, offsets


def run_param(plan: GpuParamPlan, opt: Any, param: Tensor, grad: Tensor, group: dict, cache: dict) -> bool | None:
    """Update ``param`` from ``grad`` by its ``plan``: True when queued (with "skip" the NaN/inf verdict
    is read at ``optimizer.step()``, as on the general path), None (nothing changed) when the plan does
    not apply: then the general path runs. ``cache``: what every hook of one backward shares (as
    step_plan.run_param's). A plan runs at most once between two ``step()`` calls (release refuses a
    second update of a parameter), so its device table is free again by then: the launches that read
    it were queued before, and its verdict has been read."""
    from . import step_plan

    state = step_plan.applies(plan, opt, param, grad, group, cache, plan.device)
    if state is None or plan.counter.value != plan.expect:  # (or a step count changed from outside)
        return None
    check = plan.check
    fn = None if check is None else _finite_kernel(plan.device, check[1])
    if check is not None and fn is None:
        return None
    before = plan.expect
    step = ctypes.c_float(before + 1.0).value  # float32 + 1, as the counters advance
    kernel = plan.kernel
    width = len(plan.scal)
    values = cache.get(("gpu", plan.group_id, step, width))
    if values is None:  # this step's hyper-parameters, once per group and backward
        values = cache["gpu", plan.group_id, step, width] = _padded(plan.form.scalars(group, step), width)
    plan.scal[:] = values
    gptr = grad.data_ptr()
    for slot in plan.grad_slots:
        slot.value = gptr
    image = plan.image
    if plan.device.type == "cuda":  # one pinned, non-blocking copy (torch keeps the block until it has run)
        stream = torch.cuda.current_stream(plan.device)
        if stream != plan.stream:  # the table's last readers were queued on another stream: after them
            stream.wait_stream(plan.stream)
            plan.on_device.record_stream(stream)  # (the caching allocator: freed only after this one's)
            plan.stream = stream
        pool = _pinned(plan.device)
        buf, event = pool.take(len(image))
        ctypes.memmove(buf.data_ptr(), image, len(image))
        plan.on_device.copy_(buf[: len(image)], non_blocking=True)
        pool.put(buf, event, stream)
    else:  # emulated
        ctypes.memmove(plan.on_device.data_ptr(), image, len(image))
    table, scal, ok, finite, verdict = plan.views
    if check is not None and check[0]:
        fn(check[0], finite, 1, ok)  # writes 0 into ok[0] for a gradient with NaN/inf
    kernel.fn(plan.units, table, 1, scal, ok)
    kernel.launches += 1
    kernel.tensors += 1
    plan.counter.value = step
    plan.expect = step
    if check is not None:
        opt._pending_verdicts.append((plan.index, verdict, state, before, None))
    return True


class _Befores:
    """(param, step counter, step count before) of the k-th tensor a planned step's NaN/inf check read,
    made only when asked for (read_verdicts asks for the tensors left alone): no tuple per tensor and
    step."""

    __slots__ = ("params", "order", "counters", "seg_of", "expects")

    def __init__(self, params: list, order: list[int], counters: list, seg_of: list[int], expects: list) -> None:
        self.params, self.order, self.counters, self.seg_of, self.expects = params, order, counters, seg_of, expects

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int) -> tuple:
        i = self.order[k]
        return self.params[i], self.counters[i], self.expects[self.seg_of[i]]


def _verdicts_later(flags: Tensor, tensors: Any) -> tuple:
    """The verdicts ``flags`` (on the device, written by queued kernels), copied to the host behind them
    without waiting: (event or None, host copy, [(param, counter, step count before)]). The event
    marks the copy's end on the current stream: waiting for it waits for nothing queued later."""
    if flags.device.type != "cuda":
        return None, flags, tensors  # emulated: already written
    pool = _pinned(flags.device)
    buf, event = pool.take(flags.numel() * flags.element_size())
    host = buf[: flags.numel() * flags.element_size()].view(flags.dtype)
    host.copy_(flags, non_blocking=True)  # on the device's current stream
    if event is None:
        event = pool.new_event()
    event.record(torch.cuda.current_stream(flags.device))
    return event, host, tensors, (pool, buf)


def read_verdicts(pending: tuple) -> list[tuple]:
    """Wait for the copy of the verdicts (only for it, not for work queued after it) and return the
    (param, counter, step count before) of each tensor that was left alone."""
    event, host, tensors, *buf = pending
    if event is not None and not event.query():
        event.synchronize()
    oks = host.tolist()
    if buf:  # the pinned buffer is free again (its copy has run and been read)
        pool, block = buf[0]
        pool.put(block, event, None)
    if len(oks) != len(tensors):
        raise RuntimeError(f"{len(oks)} verdicts for {len(tensors)} tensors")
    return [] if all(oks) else [tensors[k] for k, ok in enumerate(oks) if not ok]


def prepare_param(rule: Rule, weight_format: WeightFormat, state_format: StateFormat, param: Tensor,
                  state: dict[str, Any], group: dict[str, Any], grad_dtype: torch.dtype) -> bool:  # fmt: skip
    """Build the kernels this parameter's updates will use (and the NaN/inf check), changing nothing
    (``leanopt.kernels.prepare``). True if they are ready."""
    planned = native._plan(rule, weight_format, state_format, param, grad_dtype, state, group, param.device.type)
    spec = None if planned is None else planned[0]
    if spec is None:
        return False
    return kernel_for(spec, param.device) is not None and _finite_kernel(param.device) is not None


def gpu_step(
    rule: Rule, weight_format: WeightFormat, state_format: StateFormat, param: Tensor, grad: Tensor,
    state: dict[str, Any], group: dict[str, Any], random_bits: Any = None, cache_key: int | None = None,
) -> bool:  # fmt: skip
    """One update in one launch (gradient release: one tensor at a time); False if not covered."""
    job = launch(rule, weight_format, state_format, param, grad, state, group, None, random_bits, cache_key)
    if job is None:
        return False
    run_many([job])
    return True


__all__ = ["EMULATE", "GpuKernel", "GpuLaunch", "GpuStepPlan", "all_finite_many", "build_plan", "compile_stats",
           "finite_flags",
           "generate", "gpu_step", "launch", "prepare_param", "run_many", "run_plan", "wanted"]  # fmt: skip
