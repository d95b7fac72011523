"""Where a CUDA step's host time goes: each CUDA call the multi-tensor path makes, timed alone, and the
host and wall time of whole steps and of gradient release hooks, for the code in ``src/`` or another
revision's (``--src``), so that two revisions can be compared in one device session.

On an H200 (benchmarks/results/gpu-2026-11-30) a planned kernel="fused" step of ONE 50M-element tensor
took 0.64 ms of host time (torch's fused AdamW: 0.11 ms), and a gradient release hook 348 us, where
the same Python with the kernels replaced by no-ops costs ~70 us and ~35 us: the rest is in the CUDA
calls. ``primitives`` times each of them (median microseconds of many calls, nothing synchronised in
between): a pinned allocation, a pinned copy to the device, an event, torch's kernel wrapper, the
driver's cuLaunchKernel called directly, this revision's launcher (``gpu._nvrtc``), and the pool of
pinned buffers (``gpu._pinned``, where this revision has it). ``host_events`` (since 2026-12-01): the
profiler's host-side events of planned one-tensor steps (CUDA runtime and driver calls among them), with
their self CPU time per step: which call holds the host.

    python benchmarks/gpu_host_parts.py --device cuda --out /tmp/new.json
    python benchmarks/gpu_host_parts.py --device cuda --src /tmp/old/src --out /tmp/old.json
    python benchmarks/gpu_host_parts.py        # the CPU, emulated kernels, tiny: checks the script
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path


def median_us(fn, reps: int) -> float | str:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - recorded, the other figures still count
        return f"{type(err).__name__}: {str(err)[:200]}"
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1e6, 2)


def primitives(torch, gpu, reps: int) -> dict:
    """Each CUDA call of the path alone (CUDA only)."""
    import ctypes

    dev = torch.device("cuda", torch.cuda.current_device())
    src = 'extern "C" __global__ void lo_nop(const long long *a, int n, float *b, int *c) { }'
    out: dict[str, float] = {}
    host = torch.empty(512, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(512, dtype=torch.uint8, device=dev)
    out["torch.empty(512 B, pin_memory=True)"] = median_us(lambda: torch.empty(512, dtype=torch.uint8,
                                                                                pin_memory=True), reps)  # fmt: skip
    out["pinned 512 B .to(cuda, non_blocking)"] = median_us(lambda: host.to(dev, non_blocking=True), reps)
    out["dst.copy_(pinned 512 B, non_blocking)"] = median_us(lambda: dst.copy_(host, non_blocking=True), reps)
    out["device 16 B -> pinned copy_"] = median_us(lambda: host[:16].copy_(dst[:16], non_blocking=True), reps)
    out["torch.cuda.Event() + record()"] = median_us(lambda: torch.cuda.Event().record(), reps)
    ev = torch.cuda.Event()
    ev.record()
    out["event.record() again"] = median_us(ev.record, reps)
    out["event.query()"] = median_us(ev.query, reps)
    out["torch.cuda.current_stream(dev)"] = median_us(lambda: torch.cuda.current_stream(dev), reps)
    s = torch.cuda.current_stream(dev)
    out["stream != stream"] = median_us(lambda: torch.cuda.current_stream(dev) != s, reps)
    out["ctypes.CDLL(libcuda).cuLaunchKernel"] = median_us(lambda: ctypes.CDLL("libcuda.so.1").cuLaunchKernel, reps)
    try:
        kern = torch.cuda._compile_kernel(src, "lo_nop")
    except Exception:  # noqa: BLE001 - no CUDA toolkit headers: NVRTC directly, as gpu._nvrtc does
        kern = gpu._nvrtc_direct(src, "lo_nop")
    args = [dst, 1, dst, dst]

    def torch_wrapper():
        with torch.cuda.device(dev):
            kern(grid=(1, 1, 1), block=(256, 1, 1), args=list(args))

    out["torch kernel wrapper launch (in torch.cuda.device)"] = median_us(torch_wrapper, reps)
    out["torch kernel wrapper launch"] = median_us(lambda: kern(grid=(1, 1, 1), block=(256, 1, 1), args=args), reps)
    run = gpu._nvrtc(src, dev, "lo_nop")
    out["this revision's launch (gpu._nvrtc)"] = median_us(lambda: run(1, *args), reps)
    pool = gpu._pinned(dev) if hasattr(gpu, "_pinned") else None
    if pool is not None:

        def pooled():
            buf, event = pool.take(512)
            dst.copy_(buf[:512], non_blocking=True)
            pool.put(buf, event, torch.cuda.current_stream(dev))

        out["pool take + copy_ + put (this revision)"] = median_us(pooled, reps)
    torch.cuda.synchronize()
    return out


def steps(torch, leanopt, device: str, workloads: list[str], reps: int) -> list[dict]:
    """Host time (until step() returned), the host thread's CPU time in it (``host_cpu_ms``: well below
    the host time when step() waits inside a CUDA call), wall time (synchronised after each step) and the
    time per step of ``reps`` steps back to back (``pipelined_ms``: one wait at the end), kernel="auto"."""
    from leanopt.cli import bench
    from leanopt.models import GPT, GPT2_SMALL

    rows = []
    for wname in workloads:
        if wname == "tensor50m":
            shapes = [(50_000_000,)]
        elif wname == "tiny":
            shapes = [(1000,), (64, 64)]
        else:
            with torch.device("meta"):
                shapes = [tuple(p.shape) for p in GPT(GPT2_SMALL).parameters()]
        for mode in ("torch-fused", "exact/fp32", "exact/fp32:ignore", "compact/int8"):
            if mode == "torch-fused":
                params = bench.make_params(shapes, torch.float32, device)
                opt = torch.optim.AdamW(params, lr=1e-4, fused=True) if device == "cuda" else \
                    torch.optim.AdamW(params, lr=1e-4)  # fmt: skip
            else:
                spec, _, nonfinite = mode.partition(":")
                master, states = spec.split("/")
                params = bench.make_params(shapes, torch.bfloat16, device)
                opt = leanopt.AdamW(params, lr=1e-4, master=master, states=states, nonfinite=nonfinite or "skip",
                                    kernel="fused" if device == "cpu" else "auto")  # fmt: skip
            host: list[float] = []
            wall = bench.time_steps(opt, reps, warmup=3, host=host)
            cpu = []  # the host thread's CPU time in step(): far below host_ms, it waited inside a CUDA call
            for _ in range(reps):
                bench._sync(torch.device(device))
                t = time.thread_time()
                opt.step()
                cpu.append(time.thread_time() - t)
            bench._sync(torch.device(device))
            start = time.perf_counter()  # back to back, one wait at the end: as in training, where the host
            for _ in range(reps):  # prepares a step while the GPU still runs the one before
                opt.step()
            bench._sync(torch.device(device))
            rows.append({"workload": wname, "mode": mode, "host_ms": round(statistics.median(host) * 1e3, 4),
                         "step_ms": round(statistics.median(wall) * 1e3, 4),
                         "host_cpu_ms": round(statistics.median(cpu) * 1e3, 4),
                         "pipelined_ms": round((time.perf_counter() - start) / reps * 1e3, 4)})  # fmt: skip
            r = rows[-1]
            print(
                f"  {wname:10s} {mode:18s} host {r['host_ms']:.3f} ms (CPU {r['host_cpu_ms']:.3f})  "
                f"step {r['step_ms']:.3f} ms  "
                f"back to back {r['pipelined_ms']:.3f} ms"
            )
            del opt, params
    return rows


def planned_one_tensor(torch, leanopt, device: str):  # noqa: ANN001, ANN201 - modules of --src's revision
    """exact/fp32 AdamW over one bf16 tensor (50M elements on CUDA, 1000 emulated), warmed up: its steps
    are planned (the cases ``profile`` and ``cuda_calls`` look into)."""
    from leanopt.cli import bench

    params = bench.make_params([(50_000_000 if device == "cuda" else 1000,)], torch.bfloat16, device)
    opt = leanopt.AdamW(params, lr=1e-4, kernel="fused" if device == "cpu" else "auto")
    bench.time_steps(opt, 3, warmup=3)
    return opt


def profile(torch, leanopt, device: str, reps: int) -> str:
    """cProfile of planned exact/fp32 steps of one tensor (skip), the top of the host's own time."""

    opt = planned_one_tensor(torch, leanopt, device)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        opt.step()
    prof.disable()
    if device == "cuda":
        torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(18)
    return text.getvalue()


def cuda_calls(torch, leanopt, device: str, reps: int) -> list[dict]:
    """torch.profiler over ``reps`` planned exact/fp32 steps of one tensor (the step whose host time
    ``steps`` reports): every host-side event (torch ops, CUDA runtime and driver calls, as the profiler
    records them) with its count and self CPU time per step, largest first. Where the host time of a
    step goes beyond its Python (cProfile above) shows here: a runtime call that waits (a copy from
    pageable memory, an event synchronisation, an allocation) holds the host for its duration."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from leanopt.cli import bench

    opt = planned_one_tensor(torch, leanopt, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    bench._sync(torch.device(device))
    with torch_profile(activities=activities) as prof:
        for _ in range(reps):
            opt.step()
        bench._sync(torch.device(device))
    rows = [{"name": e.key, "calls_per_step": round(e.count / reps, 2),
             "self_cpu_us_per_step": round(e.self_cpu_time_total / reps, 2)}
            for e in prof.key_averages() if e.self_cpu_time_total > 0]  # fmt: skip
    rows.sort(key=lambda r: -r["self_cpu_us_per_step"])
    del opt
    return rows[:25]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--src", help="import leanopt from this src folder (another revision's code)")
    ap.add_argument("--label", default="", help="a name for this revision in the output")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--release-rounds", type=int, default=3)
    ap.add_argument("--out", default="/tmp/gpu_host_parts.json")
    args = ap.parse_args()
    if args.src:
        sys.path.insert(0, str(Path(args.src).resolve()))
    import torch

    import leanopt
    from leanopt.kernels import gpu

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import release_overhead
    from _results import write_rows

    if args.device == "cpu":
        gpu.EMULATE = True
    print(f"leanopt from {leanopt.__file__} ({args.label or 'this revision'}), device {args.device}")
    prims = primitives(torch, gpu, args.reps) if args.device == "cuda" else {}
    for name, us in prims.items():
        print(f"  {name:52s} {us:>8} us")
    workloads = ["tensor50m", "gpt2-small"] if args.device == "cuda" else ["tiny"]
    rows = steps(torch, leanopt, args.device, workloads, args.steps)
    path = "cuda" if args.device == "cuda" else "cuda-emulated"
    release = release_overhead.run("mlp", 10, args.release_rounds, 3, path=path)
    print(f"  release per hook: {release['per_param_us']}")
    prof = profile(torch, leanopt, args.device, args.steps)
    print(prof)
    calls = cuda_calls(torch, leanopt, args.device, args.steps)
    print("  host-side events per planned step (torch.profiler, self CPU time):")
    for r in calls[:12]:
        print(f"    {r['name'][:60]:60s} {r['calls_per_step']:>6} calls  {r['self_cpu_us_per_step']:>9} us")
    write_rows(args.out, "python " + " ".join(sys.argv), rows, label=args.label, leanopt_from=leanopt.__file__,
               device=args.device, primitives_us=prims, release=release, profile=prof,
               host_events=calls)  # fmt: skip


if __name__ == "__main__":
    main()
