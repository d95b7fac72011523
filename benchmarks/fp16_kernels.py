"""Step time of leanopt AdamW on fp16 parameters against the same on bf16 parameters and torch's fused fp32
AdamW, side by side in one run: every case in turn for ``--rounds`` rounds (median of ``--steps`` timed
steps each, one tensor of ``--elements`` elements, its gradient in the parameter's dtype), each case's ratio
to torch's fused step the median of its per-round ratios. Weight formats with an fp16 form (``none``,
``kahan``, ``compact``, ``stochastic``) x states fp32 and int8. The native CPU kernels hold fp16 values as
their bits and convert them with integer code that the compiler vectorises (native.F16_BITS, since
2026-11-30); before, C's ``_Float16``, which gcc 12 vectorises in no loop on a CPU without AVX512-FP16.

    python benchmarks/fp16_kernels.py                  # -> benchmarks/results/fp16_kernels.json
    python benchmarks/fp16_kernels.py --steps 5 --rounds 3 --elements 4194304
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from _results import write_rows  # benchmarks/_results.py

import leanopt
from leanopt.cli.bench import time_steps
from leanopt.kernels import native

OUT = Path(__file__).resolve().parent / "results" / "fp16_kernels.json"
MASTERS = ["none", "kahan", "compact", "stochastic"]
STATES = ["fp32", "int8"]
TORCH = "torch AdamW fp32 fused"


def param(n: int, dtype: torch.dtype) -> torch.nn.Parameter:
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter((torch.randn(n // 1024, 1024, generator=gen) * 0.02).to(dtype))
    p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(dtype)
    return p


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--elements", type=int, default=4 * 2**20, help="a multiple of 1024")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    opts = {TORCH: torch.optim.AdamW([param(args.elements, torch.float32)], lr=1e-4, fused=True)}
    for master in MASTERS:
        for states in STATES:
            for dtype in (torch.bfloat16, torch.float16):
                name = f"leanopt {master}/{states} {str(dtype).removeprefix('torch.')}"
                opts[name] = leanopt.AdamW([param(args.elements, dtype)], lr=1e-4, master=master, states=states)
    ratios: dict[str, list[float]] = {name: [] for name in opts}
    times: dict[str, list[float]] = {name: [] for name in opts}
    calls = {}
    for _ in range(args.rounds):
        for name, opt in opts.items():
            before = sum(k.calls for k in native.compile_stats())
            times[name].append(statistics.median(time_steps(opt, args.steps)) * 1e3)
            calls[name] = sum(k.calls for k in native.compile_stats()) - before
        for name in opts:
            ratios[name].append(times[name][-1] / times[TORCH][-1])
    rows = []
    for name in opts:
        ms, ratio = statistics.median(times[name]), statistics.median(ratios[name])
        native_ran = name == TORCH or calls[name] >= args.steps + 1  # every step (and the warm-up) natively
        rows.append({"case": name, "step_ms": round(ms, 3), "vs_torch_fused": round(ratio, 2),
                     "native": native_ran, "rounds_ms": [round(t, 3) for t in times[name]]})  # fmt: skip
        print(f"{name:36} {ms:8.2f} ms  {ratio:5.2f}x torch fused{'' if native_ran else '  (not native)'}")
    for master in MASTERS:
        for states in STATES:
            bf, fp = (statistics.median(ratios[f"leanopt {master}/{states} {d}"]) for d in ("bfloat16", "float16"))
            print(f"{master}/{states}: fp16 takes {fp / bf:.2f}x the bf16 step")
    write_rows(args.out, f"python benchmarks/fp16_kernels.py --steps {args.steps} --rounds {args.rounds} "
               f"--elements {args.elements}", rows, elements=args.elements)  # fmt: skip


if __name__ == "__main__":
    main()
