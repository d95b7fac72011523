"""Host time of a planned kernel="fused" CUDA step's launch preparation (``gpu.run_plan``) of this revision
against ``gpu.run_plan`` as another git revision has it (``--against REV``), called alternately in one
process on the same plan: the ratio of the two, side by side, where separate runs of a whole step on a
noisy 2-core VM differ by up to 2x between processes.

Each call is one planned step's host work: the plan's check (plan_check, C), the launch tables refilled
and copied, the launches, and reading the last call's NaN/inf verdicts (``nonfinite="skip"``; as the next
``step()`` does). On a machine without a GPU (default ``--device cpu``) the CUDA path runs emulated with
the kernels replaced by no-ops: only the host's work is timed. With ``--device cuda`` the real kernels
are queued (reading "skip"'s verdicts then waits for the check kernel; "ignore" waits for nothing).

    python benchmarks/gpu_plan_host.py --against 855b674      # -> benchmarks/results/gpu_plan_host.json
    python benchmarks/gpu_plan_host.py --against 855b674 --device cuda --out /tmp/p.json
    python benchmarks/gpu_plan_host.py --against .ab/src   # git archive 855b674 src | tar -x -C .ab
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from _results import write_rows  # benchmarks/_results.py
from _revision import kernels_module_at, kernels_module_in  # benchmarks/_revision.py

import leanopt
from leanopt.kernels import gpu

OUT = Path(__file__).resolve().parent / "results" / "gpu_plan_host.json"


def planned(device: str, tensors: int, states: str, nonfinite: str) -> leanopt.AdamW:
    """compact/``states`` AdamW over ``tensors`` 64 x 64 bf16 tensors after 3 steps: its next step is planned."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 64, generator=gen).bfloat16().to(device)) for _ in range(tensors)]
    opt = leanopt.AdamW(params, lr=1e-3, master="compact", states=states, kernel="fused", nonfinite=nonfinite)
    for p in params:
        p.grad = torch.randn_like(p)
    for _ in range(3):
        opt.step()
    if not isinstance(opt._step_plan, gpu.GpuStepPlan):
        raise SystemExit(f"the step was not planned ({device}, {states}, {nonfinite})")
    return opt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--against",
        metavar="REV",
        required=True,
        help="the git revision whose gpu.run_plan to time, or its src folder (git archive REV src)",
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tensors", default="1,8,64", help="comma-separated tensor counts (default 1,8,64)")
    ap.add_argument("--calls", type=int, default=500, help="calls per timing (default 500)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    counts = [int(n) for n in args.tensors.split(",")]
    if args.calls < 1 or args.rounds < 1 or min(counts) < 1:
        raise SystemExit("--calls, --rounds and each of --tensors must be at least 1")
    there = Path(args.against)
    old = kernels_module_in(args.against, "gpu") if there.is_dir() else kernels_module_at(args.against, "gpu")
    if args.device == "cpu":
        gpu.EMULATE = old.EMULATE = True
    runs = {"this revision": gpu.run_plan, f"at {args.against}": old.run_plan}
    rows = []
    for states in ("int8", "fp32"):
        for nonfinite in ("skip", "ignore"):
            for count in counts:
                opt = planned(args.device, count, states, nonfinite)
                plan = opt._step_plan
                if args.device == "cpu":  # the host's work alone: kernels replaced by no-ops (gradients finite)
                    for k in gpu.compile_stats():
                        k.fn = lambda *a: None
                    key = (torch.device("cpu"), gpu.VARIANT["chunks"])
                    gpu._FINITE[key] = old._FINITE[key] = lambda *a: None

                def timed(fn, plan=plan, opt=opt) -> float:
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        if fn(plan, opt) != []:
                            raise SystemExit("the plan no longer applies")
                        opt._settle_step_verdicts()
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    return (time.perf_counter() - start) / args.calls * 1e6

                for fn in runs.values():
                    timed(fn)  # warm-up (CUDA: the old revision's check kernel compiled)
                per: dict[str, list[float]] = {name: [] for name in runs}
                for r in range(args.rounds):  # alternately, the order swapped each round
                    for name in list(runs)[:: 1 if r % 2 == 0 else -1]:
                        per[name].append(timed(runs[name]))
                this, then = (statistics.median(v) for v in per.values())
                ratios = [a / b for a, b in zip(*per.values(), strict=True)]
                row = {"states": states, "nonfinite": nonfinite, "tensors": count,
                       "us_per_step": round(this, 2), f"us_per_step_at_{args.against}": round(then, 2),
                       "ratio_median": round(statistics.median(ratios), 3),
                       "ratios": [round(x, 3) for x in ratios]}  # fmt: skip
                rows.append(row)
                print(f"compact/{states:4} {nonfinite:6} {count:3} tensors: {this:8.1f} us per step, at "
                      f"{args.against} {then:8.1f} us: {row['ratio_median']:.3f}x")  # fmt: skip
                gpu.reset()
                del opt, plan
    write_rows(args.out, "python benchmarks/gpu_plan_host.py " + " ".join(sys.argv[1:]), rows,
               against=args.against, device=args.device, emulated_no_op_kernels=args.device == "cpu")  # fmt: skip


if __name__ == "__main__":
    main()
