"""Host-side cost per tensor of the compiled (torch.compile) executor, measured on the CPU.

On CUDA the compiled path runs one compiled call per parameter tensor, and its Python and torch.compile
overhead is paid on the host whatever the GPU does. This script measures that overhead here, where it
can be measured without a GPU: `fused.fused_step` on a small tensor (64x64, so the kernel itself is a
few microseconds), split into the compiled call and leanopt's own Python around it, next to a trivial
torch.compile'd function of the same arity (what any per-tensor compiled call costs).

    LEANOPT_NATIVE=0 python benchmarks/compiled_call_overhead.py   # writes results/compiled_call_overhead.json

Host CPUs differ (the GPU machines' are faster), so read the figures as shares, not as a GPU's numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import leanopt
from leanopt.kernels import fused

OUT = Path(__file__).resolve().parent / "results" / "compiled_call_overhead.json"


def per_call_us(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.calls < 1 or args.rounds < 1:
        parser.error("--calls and --rounds must be at least 1")
    os.environ["LEANOPT_NATIVE"] = "0"  # the compiled executor, as on CUDA
    p = torch.nn.Parameter(torch.randn(64, 64).bfloat16())
    p.grad = torch.randn_like(p)
    opt = leanopt.AdamW([p], lr=1e-3, kernel="fused")
    group = opt.param_groups[0]
    state = opt.state_for(p, group)
    wfmt, sfmt = opt.formats(p, group)

    def step() -> None:
        assert fused.fused_step(opt.rule, wfmt, sfmt, p, p.grad, state, group)

    for _ in range(3):
        step()  # compiles
    (key, compiled), *_ = fused._PIPELINES.items()
    inner: list[float] = []

    def timed(*a, **k):
        t0 = time.perf_counter()
        out = compiled(*a, **k)
        inner.append(time.perf_counter() - t0)
        return out

    def trivial_fn(a, b, c, d, e):
        a.add_(b * e[0])
        c.mul_(e[1])
        d.mul_(e[2])

    trivial = torch.compile(trivial_fn, dynamic=True)
    t = [torch.randn(64, 64) for _ in range(4)] + [torch.tensor([1e-3, 0.9, 0.99])]
    for _ in range(3):
        trivial(*t)
    rounds = []
    for _ in range(args.rounds):
        fused._PIPELINES[key] = compiled
        total = per_call_us(step, args.calls)
        fused._PIPELINES[key] = timed
        inner.clear()
        per_call_us(step, args.calls)
        call = statistics.mean(inner) * 1e6
        rounds.append({
            "fused_step_us": total,
            "compiled_call_us": call,
            "leanopt_python_us": total - call,
            "trivial_compiled_call_us": per_call_us(lambda: trivial(*t), args.calls),
        })  # fmt: skip
        print({k: round(v, 1) for k, v in rounds[-1].items()}, flush=True)
    fused._PIPELINES[key] = compiled
    median = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
            "pair_mode": bool(key[-2]), "rounds": rounds, "median": median,
            "command": "LEANOPT_NATIVE=0 python benchmarks/compiled_call_overhead.py"}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(info, indent=2) + "\n")
    print("median:", {k: round(v, 1) for k, v in median.items()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
