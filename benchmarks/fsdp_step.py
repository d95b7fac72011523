"""Time of ``optimizer.step()`` on FSDP2 (DTensor) parameters: one process, a gloo group of one rank,
a model of ``--layers`` Linear layers (2 tensors each) sharded with ``fully_shard``, AdamW compact/int8
(default) on bf16 weights. Two paths: the native CPU kernels (``kernel="auto"``) and the multi-tensor
CUDA kernels' code emulated on the CPU (``kernel="fused"`` with ``gpu.EMULATE``), whose kernels are
replaced by no-ops after the warm-up (since 2026-11-30 late the NaN/inf checks too: on CPU rows they are
real work that a GPU does apart), so that its figure is the host's time around them: what an FSDP2
step costs the host before a GPU does anything.

Since 2026-11-30 a step launches every sharded parameter's update together with the others (one native
call; one CUDA launch per kernel); before, each was a call or launch of its own. To compare, run this
script against the code before (``--src`` of a checkout of that revision, e.g. a ``git worktree``):

    python benchmarks/fsdp_step.py                    # -> benchmarks/results/fsdp_step.json
    git worktree add /tmp/before 743a498 && python benchmarks/fsdp_step.py --src /tmp/before/src \\
        --out benchmarks/results/fsdp_step_before.json

With ``--device cuda`` (a GPU machine; an nccl group of one rank) the real CUDA kernels run: ``host_ms`` is
the time until ``step()`` returned, ``step_ms`` the step synchronised, ``pipelined_ms`` per step of as many
steps back to back with one wait at the end (the host runs ahead unless a step waits for the GPU). ``FULL=1 bash
benchmarks/gpu_check.sh`` runs it there when time is left (summary.json: ``fsdp_benchmark``).

Each run also times torch's ``AdamW(fused=True)`` on the same bf16 DTensor parameters (``torch-fused``;
fp32 states, not leanopt's formats; on the CPU its time includes its arithmetic, as ``native``'s does).

Since 2026-12-01 an FSDP2 step on the CUDA path repeats the step before from a plan (kernels/gpu.py) as
plain steps do: ``fsdp_step_plan_run1.json`` against ``fsdp_step_plan_before_run1.json`` (``--src`` of
commit b1e1e08).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "fsdp_step.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=64)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--states", default="int8")
    parser.add_argument("--master", default="compact")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cpu (default: gloo; native and emulated CUDA paths) or cuda (nccl; the real kernels: "
                        "host_ms until step() returned, step_ms synchronised)")  # fmt: skip
    parser.add_argument("--src", help="import leanopt from this src folder (another revision's code)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.src:
        sys.path.insert(0, str(Path(args.src).resolve()))
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    import leanopt
    from leanopt.kernels import gpu, native

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _results import write_rows  # benchmarks/_results.py

    store = tempfile.mkdtemp()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}/pg", rank=0, world_size=1)
    rows = []
    try:
        for path in ("cuda", "torch-fused") if cuda else ("native", "cuda-emulated", "torch-fused"):
            gpu.EMULATE = path == "cuda-emulated"
            torch.manual_seed(0)
            model = nn.Sequential(*[nn.Linear(args.width, args.width) for _ in range(args.layers)]).bfloat16()
            model = model.to(args.device)
            for layer in model:
                fully_shard(layer)
            fully_shard(model)
            kernel = "fused" if gpu.EMULATE else "auto"  # (on CUDA "auto" runs the multi-tensor CUDA kernels)
            if path == "torch-fused":  # for comparison: torch's fused AdamW on the same bf16 DTensor parameters
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
            else:
                opt = leanopt.AdamW(model.parameters(), lr=1e-3, master=args.master, states=args.states, kernel=kernel)
            params = list(model.parameters())
            for p in params:  # gradients as FSDP2 leaves them: DTensors placed like their parameters
                p.grad = p.detach().clone().normal_()
            for _ in range(3):
                opt.step()
            if gpu.EMULATE:  # the host's part alone: the kernels replaced by no-ops, the NaN/inf checks too
                for k in gpu.compile_stats():  # (on CPU rows the check is real work a GPU does apart, either
                    k.fn = lambda *a: None  # the emulated check kernel or, before 2026-11-30 night, the native one)
                for key in list(gpu._FINITE):
                    gpu._FINITE[key] = lambda *a: None
                native.all_finite_many = lambda rows: [True] * len(rows)
            times, host = [], []
            for _ in range(args.steps):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                opt.step()
                host.append(time.perf_counter() - t0)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            if cuda:  # back to back, one wait at the end: a step that waits for the GPU inside shows here
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            if cuda:
                torch.cuda.synchronize()
            pipelined = (time.perf_counter() - t0) / args.steps * 1e3
            ms = statistics.median(times) * 1e3
            rows.append({"path": path, "tensors": len(params), "step_ms": ms, "us_per_tensor": ms * 1e3 / len(params),
                         "host_ms": statistics.median(host) * 1e3, "pipelined_ms": pipelined,
                         "step_ms_all": [round(t * 1e3, 3) for t in times],
                         "kernels_used": [k.key for k in gpu.compile_stats()] if "cuda" in path else []})  # fmt: skip
            print(
                f"{path:14s} {len(params)} tensors: {ms:7.2f} ms per step, {ms * 1e3 / len(params):6.1f} us per tensor"
            )
    finally:
        gpu.EMULATE = False
        dist.destroy_process_group()
    command = "python benchmarks/fsdp_step.py " + " ".join(sys.argv[1:])
    write_rows(args.out, command, rows, leanopt_from=str(Path(leanopt.__file__).parent), layers=args.layers,
               width=args.width, master=args.master, states=args.states)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
