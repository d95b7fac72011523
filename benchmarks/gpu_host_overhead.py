"""Host time per tensor of a kernel="fused" step on CUDA's path (kernels/gpu.py): planned steps
(the launch tables of the last step, refilled) against the general path (each tensor prepared).

On a machine without a GPU (default ``--device cpu``) the path runs emulated (``gpu.EMULATE``) with the
kernels replaced by no-ops, so the time is the Python around them: what a CUDA step costs the host
before the GPU does anything. With ``--device cuda`` the real kernels run; the figure is then the time
``step()`` takes to return (the launches are asynchronous) and ``gpu_ms`` the step with a synchronise.
``check_us_per_tensor``: of a planned step's host time, the check that nothing the plan relies on has
changed (``step_plan._signature`` and ``_valid``), timed alone.

    python benchmarks/gpu_host_overhead.py                  # -> benchmarks/results/gpu_host_overhead.json
    python benchmarks/gpu_host_overhead.py --device cuda --out /tmp/g.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from _results import write_rows  # benchmarks/_results.py

import leanopt
from leanopt.kernels import gpu, step_plan


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
    host, wall = [], []
    for _ in range(steps):
        if not planned:
            opt._step_plan = None
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        t1 = time.perf_counter()
        if device == "cuda":
            torch.cuda.synchronize()
        host.append(t1 - t0)
        wall.append(time.perf_counter() - t0)
    check = []  # a planned step's check that nothing it relies on changed, alone (step_plan._valid)
    plan = opt._step_plan if planned else None
    for _ in range(steps if plan is not None else 0):
        t0 = time.perf_counter()
        sig, live, grads = step_plan._signature(opt.param_groups)
        ok = sig == plan.signature and step_plan._valid(plan, opt, live, grads)
        check.append(time.perf_counter() - t0)
        assert ok, "the plan no longer applies"
    gpu.reset()
    med = statistics.median(host)
    return {"tensors": count, "states": states, "nonfinite": nonfinite, "planned": planned,
            "host_ms": round(med * 1e3, 3), "host_us_per_tensor": round(med / count * 1e6, 2),
            "check_us_per_tensor": round(statistics.median(check) / count * 1e6, 2) if check else None,
            "gpu_ms": round(statistics.median(wall) * 1e3, 3) if device == "cuda" else None}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tensors", type=int, default=500)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_host_overhead.json"))
    args = ap.parse_args()
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
        row["host_ms"] = statistics.median(r["host_ms"] for r in runs)
        if row["gpu_ms"] is not None:
            row["gpu_ms"] = statistics.median(r["gpu_ms"] for r in runs)
        row["host_us_per_tensor"] = round(row["host_ms"] / args.tensors * 1e3, 2)
        if row["check_us_per_tensor"] is not None:
            row["check_us_per_tensor"] = statistics.median(r["check_us_per_tensor"] for r in runs)
        rows.append(row)
        gpu_ms = f"  gpu {row['gpu_ms']:.2f} ms" if row["gpu_ms"] else ""
        how = "planned" if planned else "general"
        print(f"{states:5} {nonfinite:6} {how:8} host {row['host_ms']:8.2f} ms", end="")
        check = f" (its check {row['check_us_per_tensor']:.1f})" if row["check_us_per_tensor"] is not None else ""
        print(f"  {row['host_us_per_tensor']:6.1f} us/tensor{check}{gpu_ms}")
    write_rows(args.out, "python benchmarks/gpu_host_overhead.py " + " ".join(sys.argv[1:]), rows,
               device=args.device, emulated_no_op_kernels=args.device == "cpu")  # fmt: skip


if __name__ == "__main__":
    main()
