"""Host time per tensor of a kernel="fused" step on CUDA's path (kernels/gpu.py): planned steps
(the launch tables of the last step, refilled) against the general path (each tensor prepared).

On a machine without a GPU (default ``--device cpu``) the path runs emulated (``gpu.EMULATE``) with the
kernels replaced by no-ops, so the time is the Python around them: what a CUDA step costs the host
before the GPU does anything. With ``--device cuda`` the real kernels run; the figure is then the time
``step()`` takes to return (the launches are asynchronous) and ``gpu_ms`` the step with a synchronise.
``check_us_per_tensor``: of a planned step's host time, the check that nothing the plan relies on has
changed (``plan_check.check``: in C), timed alone. Planned steps alternate, on the same plan, between
that check in C and in Python (``step_plan._valid``): ``host_us_per_tensor_python_check`` and
``check_us_per_tensor_python`` are the same figures with the Python check, measured side by side.

    python benchmarks/gpu_host_overhead.py                  # -> benchmarks/results/gpu_host_overhead.json
    python benchmarks/gpu_host_overhead.py --device cuda --out /tmp/g.json
    python benchmarks/gpu_host_overhead.py --tensors 1 --src .ab/src --out /tmp/old.json  # another revision
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if "--src" in sys.argv[:-1]:  # another revision's leanopt (its src folder), imported instead of this one's
    sys.path.insert(0, str(Path(sys.argv[sys.argv.index("--src") + 1]).resolve()))

import torch
from _results import write_rows  # benchmarks/_results.py

import leanopt
from leanopt.kernels import gpu, plan_check


def measure(device: str, count: int, states: str, nonfinite: str, steps: int, planned: bool) -> dict:
    params = [torch.nn.Parameter(torch.randn(64, 64, device=device).bfloat16()) for _ in range(count)]
    opt = leanopt.AdamW(params, lr=1e-3, master="compact", states=states, kernel="fused", nonfinite=nonfinite)
    for p in params:
        p.grad = torch.randn_like(p)
    for _ in range(3):
        opt.step()
    if device == "cpu":  # the Python alone: kernels replaced by no-ops (all gradients read as finite)
        for k in gpu.compile_stats():
            k.fn = lambda *a: None
        gpu._FINITE[torch.device("cpu"), gpu.VARIANT["chunks"]] = lambda *a: None
    assert isinstance(opt._step_plan, gpu.GpuStepPlan), "the step was not planned"
    # a planned step's check: in C (plan_check.Checker) and in Python (step_plan._valid), in turn
    plan = opt._step_plan
    assert plan_check.check(plan, opt) is not None
    checkers = {"C": plan.checker or None, "Python": False}
    host: dict[str, list[float]] = {"C": [], "Python": []}
    wall = []
    for i in range(2 * steps):
        how = "C" if i % 2 == 0 or not planned else "Python"
        if not planned:
            opt._step_plan = None
        else:
            assert opt._step_plan is plan, "the plan was not kept"
            plan.checker = checkers[how]
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        t1 = time.perf_counter()
        if device == "cuda":
            torch.cuda.synchronize()
        host[how].append(t1 - t0)
        wall.append(time.perf_counter() - t0)
    check: dict[str, list[float]] = {"C": [], "Python": []}  # the check alone (plan_check.check)
    for i in range(2 * steps if planned else 0):
        how = "C" if i % 2 == 0 else "Python"
        plan.checker = checkers[how]
        t0 = time.perf_counter()
        ok = plan_check.check(plan, opt) is not None
        check[how].append(time.perf_counter() - t0)
        assert ok, "the plan no longer applies"
    plan.checker = checkers["C"]
    gpu.reset()
    if planned and checkers["C"] is None:
        print("  (the C check is not available here: both are the Python check)")
    per = {k: round(statistics.median(v) / count * 1e6, 2) if v else None for k, v in host.items()}
    med = statistics.median(host["C"])
    return {"tensors": count, "states": states, "nonfinite": nonfinite, "planned": planned,
            "host_ms": round(med * 1e3, 3), "host_us_per_tensor": per["C"],
            "host_us_per_tensor_python_check": per["Python"] if planned else None,
            "check_us_per_tensor": round(statistics.median(check["C"]) / count * 1e6, 2) if planned else None,
            "check_us_per_tensor_python": round(statistics.median(check["Python"]) / count * 1e6, 2)
            if planned else None,
            "gpu_ms": round(statistics.median(wall) * 1e3, 3) if device == "cuda" else None}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tensors", type=int, default=500)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_host_overhead.json"))
    ap.add_argument("--src", help="import leanopt from this src folder (another revision's code)")
    args = ap.parse_args()
    print(f"leanopt from {leanopt.__file__}")
    if args.device == "cpu":
        gpu.EMULATE = True
    configs = [("int8", "skip", True), ("int8", "skip", False), ("int8", "ignore", True), ("fp32", "skip", True),
               ("fp32", "skip", False)]  # fmt: skip
    found: dict[tuple, list[dict]] = {}
    for _ in range(args.rounds):  # rounds interleaved: a drift of the machine's speed hits every config
        for config in configs:
            row = measure(args.device, args.tensors, *config[:2], args.steps, config[2])
            found.setdefault(config, []).append(row)
    rows = []
    for (states, nonfinite, planned), runs in found.items():
        row = runs[0] | {"rounds_host_ms": [r["host_ms"] for r in runs]}  # medians of the rounds' medians
        for key in ("host_ms", "gpu_ms", "host_us_per_tensor_python_check", "check_us_per_tensor",
                    "check_us_per_tensor_python"):  # fmt: skip
            if row[key] is not None:
                row[key] = statistics.median(r[key] for r in runs)
        row["host_us_per_tensor"] = round(row["host_ms"] / args.tensors * 1e3, 2)
        rows.append(row)
        gpu_ms = f"  gpu {row['gpu_ms']:.2f} ms" if row["gpu_ms"] else ""
        how = "planned" if planned else "general"
        print(f"{states:5} {nonfinite:6} {how:8} host {row['host_ms']:8.2f} ms", end="")
        print(f"  {row['host_us_per_tensor']:6.1f} us/tensor{gpu_ms}", end="")
        if planned:
            print(
                f"  (check {row['check_us_per_tensor']:.1f}); with the check in Python:"
                f" {row['host_us_per_tensor_python_check']:.1f} (check {row['check_us_per_tensor_python']:.1f})"
            )
        else:
            print()
    write_rows(args.out, "python benchmarks/gpu_host_overhead.py " + " ".join(sys.argv[1:]), rows,
               device=args.device, emulated_no_op_kernels=args.device == "cpu",
               leanopt_from=leanopt.__file__)  # fmt: skip


if __name__ == "__main__":
    main()
