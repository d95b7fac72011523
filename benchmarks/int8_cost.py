"""Where the compact/int8 AdamW kernel's time goes: the generated kernel against variants of itself,
timed alternately in one process on the same tensors (wrong numbers, same shape of work):

- "no division or sqrt": every float division a multiplication, every square root an abs;
- "no state encode": the int8 states' group maximum, scale and codes not computed or written;
- "portable C": the same kernel without its AVX-512 code (``LO_NO_VECTOR``), as on CPUs without it;
- "gather decode", "register-permute decode": the first moment's codes decoded by a gather
  (``LO_NO_VBMI``: CPUs with AVX-512 but not VBMI), or by register permutes (with ``LO_SLOW_GATHER``:
  such CPUs whose gathers are slow), instead of byte permutes (AVX-512 VBMI, since 2026-11-30);
- "scales one group at a time": each group's largest magnitude reduced to a scalar, its bf16 scale and
  reciprocal computed there (``LO_SCALE_EACH``), instead of a block's 4 groups' at once in registers
  (since 2026-11-30); "both as before": this and the gather decode, the kernel before 2026-11-30;
- "weights register by register": a group's weights and bf16 gradients widened and narrowed 16 at a
  time (``LO_NO_PAIRS``) instead of by two-register permutes for the group's 32 (since commit eead853);
- with ``--against REV``: the kernel that native.py at git revision REV generates for the same step
  (e.g. ``--against 84cf6b8``, the kernels before commit eead853's changes).
- with ``--probes``: the kernel with 16 extra independent vector instructions of one kind (integer
  add, fp multiply, fp add, cross-lane permute; or 16 nops) at the start of every group of 32: what
  one more instruction of that kind costs there (x 16 / the group's time). Where one kind costs a whole
  cycle, that pipe is full; well under one for every kind, the kernel waits on its dependency chains
  rather than on a pipe. AVX-512 or AVX2 builds only.

    python benchmarks/int8_cost.py                  # 50M elements, 3 rounds
    python benchmarks/int8_cost.py --elements 10000000 --rounds 5
    python benchmarks/int8_cost.py --rounds 9 --against 84cf6b8
    python benchmarks/int8_cost.py --rounds 9 --against 84cf6b8 --states int4 --out benchmarks/results/int4_cost.json
    python benchmarks/int8_cost.py --elements 102400 --cols 1024 --threads 1 --rounds 9   # one core, in cache
    python benchmarks/int8_cost.py --elements 102400 --cols 1024 --threads 1 --rounds 9 --probes

``--states int4`` / ``--master exact`` time that kernel instead (the variants' names say int8 for short).

Writes benchmarks/results/int8_cost.json.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from _revision import kernels_module_at  # benchmarks/_revision.py

import leanopt
from leanopt.kernels import native
from leanopt.kernels.fused import fused_form

OUT = Path(__file__).resolve().parent / "results" / "int8_cost.json"


def median_ms(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def native_at(rev: str) -> types.ModuleType:
    """leanopt.kernels.native as it was at git revision ``rev`` (the rest of the package as it is now)."""
    return kernels_module_at(rev, "native")


#: where the probes go: the start of a full group's update in the vector code
GROUP_START = "        const int64_t q = q0 + gv, jg = j0 + gv * 32, base = r * n + jg;\n        __m512 VA"
PROBE_COUNT = 16


def probes(source: str) -> dict[str, str]:
    """Variants of ``source`` with PROBE_COUNT extra instructions of one kind per group (inline assembly
    that reads one vector register, AVX-512 zmm27 or AVX2 ymm14, and writes another, zmm28 or ymm15,
    declared clobbered: independent of each other and of the kernel's values, kept by the compiler)."""
    width = native.vector_width()
    if width not in (8, 16):
        raise SystemExit(f"--probes needs an AVX-512 or AVX2 build (this one runs {width} elements per register)")
    if source.count(GROUP_START) != 1:
        raise SystemExit("--probes: the generated kernel has no (single) full-group update to put probes in")
    src, dst = ("zmm27", "zmm28") if width == 16 else ("ymm14", "ymm15")
    kinds = {"int add": "vpaddd", "fp multiply": "vmulps", "fp add": "vaddps", "permute": "vpermd", "nop": "nop"}
    out = {}
    for name, op in kinds.items():
        text = "nop" if op == "nop" else f"{op} %%{src}, %%{src}, %%{dst}"
        extra = " ".join([f'__asm__ volatile("{text}" ::: "xmm{dst[3:]}");'] * PROBE_COUNT)
        start = GROUP_START.replace("        __m512 VA", f"        {extra}\n        __m512 VA")
        out[f"+{PROBE_COUNT} {name} per group"] = source.replace(GROUP_START, start)
    return out


def _cpu_name() -> str:
    """The CPU's model name and whether it has AVX-512 (its kernels' code differs), from /proc/cpuinfo."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    name = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), "unknown")
    flags = next((x.split(":", 1)[1].split() for x in lines if x.startswith("flags")), [])
    return f"{name} ({'AVX-512' if 'avx512f' in flags else 'AVX2' if 'avx2' in flags else 'no AVX2'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elements", type=int, default=50_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--states", choices=["int8", "int4"], default="int8")
    parser.add_argument("--master", choices=["compact", "exact"], default="compact")
    parser.add_argument("--against", metavar="REV", help="also time the kernel native.py at git revision REV generates")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="the kernels' threads")
    parser.add_argument("--cols", type=int, default=1000, help="row length (1000: each row ends in a partial group)")
    parser.add_argument(
        "--probes", action="store_true", help="also time the kernel with 16 extra instructions per group"
    )
    args = parser.parse_args()
    for name in ("elements", "cols", "threads", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    cols = args.cols
    rows = max(1, args.elements // cols)
    p = torch.nn.Parameter(torch.randn(rows, cols).bfloat16())
    p.grad = (torch.randn(rows, cols) * 1e-3).bfloat16()
    opt = leanopt.AdamW([p], lr=1e-3, master=args.master, states=args.states)
    opt.step()  # states exist
    group = opt.param_groups[0]
    spec, tensors = native.plan(opt.rule, *opt.formats(p, group), p, p.grad.dtype, opt.state[p], group)
    tensors.insert(len(spec.weight.ctypes_), p.grad)
    ptrs = (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])
    values = fused_form(opt.rule).scalars(group, 2.0)
    scalars = (ctypes.c_float * len(values))(*values)
    source = native.generate(spec)
    cheap = source.replace("_mm512_div_ps(", "_mm512_mul_ps(").replace("_mm512_sqrt_ps(", "_mm512_abs_ps(")
    cheap = cheap.replace("#define LO_DIV(a, b) ((a) / (b))", "#define LO_DIV(a, b) ((a) * (b))")
    cheap = cheap.replace("#define LO_SQRT(a) sqrtf(a)", "#define LO_SQRT(a) fabsf(a)")
    # the scales and codes: of a block of 4 groups at once (after their updates; and what is kept for
    # them), of each group of a shorter block by itself
    block = r"#ifndef LO_SCALE_EACH\n      if \(!each\) \{\n.*?\n#endif\n"
    each = r"        \{ __m512i code\[2\]; K_\w+\[r \* groups \+ q\] = lv_encode_\w+\([^\n]*\n[^\n]*\}\n"
    no_encode = re.sub(r"        KA_\w+\[2 \* gv\] = [^\n]*\n", "", re.sub(block, "", source, flags=re.S))
    no_encode = re.sub(each, "", no_encode)
    variants = {
        "generated": source,
        "no division or sqrt": cheap,
        "no state encode": no_encode,
        "portable C": "#define LO_NO_VECTOR 1\n" + source,
        "gather decode": "#define LO_NO_VBMI 1\n" + source,
        "register-permute decode": "#define LO_NO_VBMI 1\n#define LO_SLOW_GATHER 1\n" + source,
        "scales one group at a time": "#define LO_SCALE_EACH 1\n" + source,
        "both as before": "#define LO_SCALE_EACH 1\n#define LO_NO_VBMI 1\n" + source,
        "weights register by register": "#define LO_NO_PAIRS 1\n" + source,
    }
    if args.probes:
        variants.update(probes(source))
    if args.against:
        old = native_at(args.against)
        old_spec, _ = old.plan(opt.rule, *opt.formats(p, group), p, p.grad.dtype, opt.state[p], group)
        variants[f"at {args.against}"] = old.generate(old_spec)
    for name, text in variants.items():
        assert name == "generated" or text != source, f"the {name!r} variant did not change the source"
    kernels = {name: native.build(text) for name, text in variants.items()}
    rounds = []
    for _ in range(args.rounds):
        rounds.append({
            name: median_ms(lambda k=k: k.fn(rows, cols, ptrs, ctypes.addressof(scalars), args.threads))
            for name, k in kernels.items()
        })  # fmt: skip
        print({k: round(v, 1) for k, v in rounds[-1].items()})
    result = {
        "command": "python benchmarks/int8_cost.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "cpu": _cpu_name(),
        "elements": rows * cols,
        "cols": cols,
        "threads": args.threads,
        "compiler": native.compiler(),
        "states": args.states,
        "master": args.master,
        "against": args.against,
        "rounds_ms": rounds,
        "median_ms": {k: statistics.median(r[k] for r in rounds) for k in kernels},
    }
    result["vector_width"] = native.vector_width()
    result["over_generated"] = {k: v / result["median_ms"]["generated"] for k, v in result["median_ms"].items()}
    for name, ratio in result["over_generated"].items():
        print(f"{name} / generated: {ratio:.2f}")
    if args.probes:  # per core: the threads split the groups
        groups = rows * (cols // 32)
        group_ns = result["median_ms"]["generated"] * 1e6 * args.threads / groups
        result["group_ns_per_core"] = group_ns
        result["probe_ns_per_instruction"] = {}
        for name, ms in result["median_ms"].items():
            if name.startswith(f"+{PROBE_COUNT} "):
                extra = (ms - result["median_ms"]["generated"]) * 1e6 * args.threads / groups / PROBE_COUNT
                result["probe_ns_per_instruction"][name] = extra
                print(f"{name}: {extra:+.3f} ns per added instruction (a group of 32 takes {group_ns:.1f} ns per core)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
