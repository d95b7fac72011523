"""What one vector instruction costs on this CPU: the throughput of the instructions the int8/int4 kernels
are made of (AVX-512 and AVX2 forms), so a kernel's instruction count can be set against its time.

Each instruction runs in 8 independent dependency chains (enough to hide its latency), compiled with
the kernels' own compiler and flags (leanopt.kernels.native); the clock is measured by a chain of
dependent integer additions (one cycle each). Reported per step of a chain (one instruction; two
for the "pair" entries, which show whether two kinds share a pipe): cycles (reciprocal throughput)
and ns.

    python benchmarks/vector_op_cost.py            # writes benchmarks/results/vector_op_cost.json
    python benchmarks/vector_op_cost.py --iterations 20000000
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

from _results import write_rows

from leanopt.kernels import native

OUT = Path(__file__).resolve().parent / "results" / "vector_op_cost.json"

#: name -> (C type, the statement applied to each chain variable ``a``; ``b`` is a loop-invariant operand)
OPS_512 = {
    "vmulps zmm": ("__m512", "a = _mm512_mul_ps(a, b);"),
    "vfmadd231ps zmm": ("__m512", "a = _mm512_fmadd_ps(a, b, b);"),
    "vaddps zmm": ("__m512", "a = _mm512_add_ps(a, b);"),
    "vminps zmm": ("__m512", "a = _mm512_min_ps(a, b);"),
    "vdivps zmm": ("__m512", "a = _mm512_div_ps(a, b);"),
    "vsqrtps zmm": ("__m512", "a = _mm512_sqrt_ps(a);"),
    "vcvtps2dq + vcvtdq2ps zmm (a pair)": ("__m512", "a = _mm512_cvtepi32_ps(_mm512_cvtps_epi32(a));"),
    "vmulps + vaddps zmm (a pair)": ("__m512", "a = _mm512_add_ps(_mm512_mul_ps(a, b), b);"),
    "vpermps + vmulps zmm (a pair)": (
        "__m512",
        "a = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_castps_si512(b), a), b);",
    ),
    "vpaddd zmm": ("__m512i", "a = _mm512_add_epi32(a, b);"),
    "vpternlogd zmm": ("__m512i", "a = _mm512_ternarylogic_epi32(a, b, b, 0xEA);"),
    "vpermt2d zmm": ("__m512i", "a = _mm512_permutex2var_epi32(a, b, b);"),
    "vpermps zmm": ("__m512i", "a = _mm512_permutexvar_epi32(b, a);"),
}
OPS_VBMI = {"vpermt2b zmm": ("__m512i", "a = _mm512_permutex2var_epi8(a, b, b);")}
OPS_256 = {
    "vmulps ymm": ("__m256", "a = _mm256_mul_ps(a, b);"),
    "vdivps ymm": ("__m256", "a = _mm256_div_ps(a, b);"),
    "vsqrtps ymm": ("__m256", "a = _mm256_sqrt_ps(a);"),
    "vpermps ymm": ("__m256i", "a = _mm256_permutevar8x32_epi32(a, b);"),
}
#: initial values: b close to 1 keeps divisions, products and square roots of values near 1 normal
_INIT = {
    "__m512": ("_mm512_set1_ps(1.0f + 0.01f * (float)k)", "_mm512_set1_ps(0.99999f)"),
    "__m512i": ("_mm512_set1_epi32(k)", "_mm512_set1_epi32(3)"),
    "__m256": ("_mm256_set1_ps(1.0f + 0.01f * (float)k)", "_mm256_set1_ps(0.99999f)"),
    "__m256i": ("_mm256_set1_epi32(k)", "_mm256_set1_epi32(3)"),
}


def _function(index: int, ctype: str, statement: str) -> str:
    init_a, init_b = _INIT[ctype]
    # the empty volatile asm keeps the compiler from folding, hoisting or dropping the chains
    return f"""
double lo_op_{index}(int64_t n) {{
  {ctype} v[8]; {ctype} b = {init_b};
  for (int k = 0; k < 8; k++) v[k] = {init_a};
  for (int64_t i = 0; i < n; i++) {{
    for (int k = 0; k < 8; k++) {{ {ctype} a = v[k]; {statement} __asm__ volatile("" : "+v"(a)); v[k] = a; }}
    __asm__ volatile("" : "+v"(b));
  }}
  double sum = 0;  /* every chain's first lane: each chain stays live */
  for (int k = 0; k < 8; k++) {{ float out[16] = {{0}}; memcpy(out, &v[k], sizeof(v[k])); sum += out[0]; }}
  return sum;
}}
"""


_CLOCK = """
int64_t lo_clock_chain(int64_t n) {
  int64_t x = 1;
  for (int64_t i = 0; i < n; i++) __asm__ volatile("add $1, %0" : "+r"(x));
  return x;
}
"""


def _timed(fn, n: int, repeats: int) -> float:
    fn(n // 10)  # warm up (and let the core reach its clock)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(n)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=5_000_000, help="loop iterations (8 instructions each)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    width = native.vector_width()
    ops = dict(OPS_256)
    if width == 16:
        ops = {**OPS_512, **OPS_VBMI, **ops}
    names = list(ops)
    body = ["#include <immintrin.h>", "#include <stdint.h>", "#include <string.h>", _CLOCK]
    for i, name in enumerate(names):
        body.append(f"#ifdef __AVX512VBMI__\n{_function(i, *ops[name])}\n#endif" if name in OPS_VBMI
                    else _function(i, *ops[name]))  # fmt: skip
    source = "\n".join(body)
    clock = native.build(source, "lo_clock_chain", argtypes=[ctypes.c_int64], restype=ctypes.c_int64)
    seconds = _timed(clock.fn, args.iterations * 8, args.repeats)
    ghz = args.iterations * 8 / seconds / 1e9
    print(f"clock: {ghz:.2f} GHz (a chain of dependent integer additions)")
    rows = []
    for i, name in enumerate(names):
        try:
            k = native.build(source, f"lo_op_{i}", argtypes=[ctypes.c_int64], restype=ctypes.c_double)
        except (native.BuildError, AttributeError) as err:  # e.g. no VBMI: the function was not compiled in
            print(f"{name}: not built ({str(err).splitlines()[0][:80]})")
            continue
        per = _timed(k.fn, args.iterations, args.repeats) / (args.iterations * 8)
        rows.append({"op": name, "cycles_per_step": per * ghz * 1e9, "ns_per_step": per * 1e9})
        print(f"{name:38s} {per * ghz * 1e9:6.2f} cycles  {per * 1e9:6.3f} ns per step")
    write_rows(args.out, " ".join(["python", *sys.argv]), rows, ghz=ghz, vector_width=width,
               compiler=native.compiler(), iterations=args.iterations)  # fmt: skip


if __name__ == "__main__":
    main()
