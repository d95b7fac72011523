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

    python benchmarks/int8_cost.py                  # 50M elements, 3 rounds
    python benchmarks/int8_cost.py --elements 10000000 --rounds 5
    python benchmarks/int8_cost.py --rounds 9 --against 84cf6b8
    python benchmarks/int8_cost.py --rounds 9 --against 84cf6b8 --states int4 --out benchmarks/results/int4_cost.json
    python benchmarks/int8_cost.py --elements 102400 --cols 1024 --threads 1 --rounds 9   # one core, in cache

``--states int4`` / ``--master exact`` time that kernel instead (the variants' names say int8 for short).

Writes benchmarks/results/int8_cost.json.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

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
    root = Path(__file__).resolve().parent.parent
    path = "src/leanopt/kernels/native.py"
    text = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, text=True)
    if text.returncode != 0:
        raise SystemExit(f"--against {rev!r}: git cannot show {path} there ({text.stderr.strip()}); "
                         "give a commit of this repository that has it, e.g. 84cf6b8")  # fmt: skip
    module = types.ModuleType(f"leanopt.kernels.native_at_{rev}")
    module.__package__ = "leanopt.kernels"
    module.__file__ = str(root / path)
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(text.stdout, f"{rev}:{path}", "exec"), module.__dict__)
    return module


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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
