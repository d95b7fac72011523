"""What the default NaN/inf check (``nonfinite="skip"``) costs a compact/int8 AdamW step on CPU, and
what checking each large tensor's gradient during the update before it (``lo_step_side``, whole-step
plans) saves against a check pass of its own: the same planned step timed with the check overlapped
(as shipped), with the overlap turned off in the plan (every check its own pass, as before), and with
``nonfinite="ignore"`` (no check), alternating in one process.

    python benchmarks/nan_check_overlap.py                    # GPT-2 small's tensors, 5 rounds
    python benchmarks/nan_check_overlap.py --workloads gpt2-small,gpt2-untied,20x768x3072

Writes benchmarks/results/nan_check_overlap.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import leanopt
from leanopt.cli.bench import resolve_workloads

OUT = Path(__file__).resolve().parent / "results" / "nan_check_overlap.json"


def shapes_of(name: str) -> list[tuple[int, ...]]:
    """A bench workload's shapes; ``KxRxC``: K tensors of R x C; ``gpt2-untied``: GPT-2 small's with an
    output layer of its word embedding's shape after the last block (the largest tensors first and
    last, as in models that do not tie them)."""
    if name.count("x") == 2 and name.replace("x", "").isdigit():
        k, r, c = (int(v) for v in name.split("x"))
        return [(r, c)] * k
    if name == "gpt2-untied":
        shapes = shapes_of("gpt2-small")
        return [*shapes, max(shapes, key=lambda s: torch.Size(s).numel())]
    return [tuple(s) for s in resolve_workloads(name, None, False)[name].shapes]


def time_step(params: list[torch.nn.Parameter], nonfinite: str, overlap: bool, steps: int) -> float:
    opt = leanopt.AdamW(params, lr=1e-4, master="compact", states="int8", nonfinite=nonfinite)
    for _ in range(3):  # states, then the whole-step plan
        opt.step()
    plan = opt._step_plan
    if plan is None:
        raise SystemExit("no whole-step plan was built (is the native executor available?)")
    if not overlap:  # every kernel's lo_step_side dropped: lo_step_all checks each gradient by itself
        for t in range(plan.count):
            plan.fns[plan.count + t] = None
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="gpt2-small")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    cases = {"check overlapped": ("skip", True), "check by itself": ("skip", False), "no check": ("ignore", True)}
    doc = {
        "command": " ".join(["python", "benchmarks/nan_check_overlap.py", *sys.argv[1:]]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "threads": torch.get_num_threads(),
        "workloads": {},
    }
    for name in args.workloads.split(","):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s).bfloat16()) for s in shapes_of(name)]
        for p in params:
            p.grad = (torch.randn(p.shape) * 1e-3).bfloat16()
        rounds = []
        for _ in range(args.rounds):
            rounds.append({k: time_step(params, nf, ov, args.steps) for k, (nf, ov) in cases.items()})
            print(name, {k: round(v, 2) for k, v in rounds[-1].items()}, flush=True)
        median = {k: statistics.median(r[k] for r in rounds) for k in cases}
        # each round's difference to the same round's step without a check, then the median: a machine
        # whose speed drifts between rounds cancels out
        cost = {k: statistics.median(r[k] - r["no check"] for r in rounds) for k in cases if k != "no check"}
        doc["workloads"][name] = {
            "params": sum(p.numel() for p in params),
            "tensors": len(params),
            "rounds_ms": rounds,
            "median_ms": median,
            "check_cost_ms": cost,
        }
        print(f"{name}: median ms {({k: round(v, 2) for k, v in median.items()})}; the check costs "
              f"{cost['check overlapped']:.2f} ms overlapped, {cost['check by itself']:.2f} ms by itself")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
