"""Optimizer-step speed against memory bandwidth: leanopt's fused kernels and their peers, in one run.

For each workload (GPT-2 small's parameter shapes, 124M; one 50M-element tensor) and each mode it
measures the median step time (after warm-up steps, which include any compilation: reported as
"first step") and derives

- bytes touched per parameter per step (what the update must read and write; see ``MODES``),
- achieved GB/s = touched bytes / step time,
- the bandwidth bound = touched bytes / plain-copy GB/s measured in the same run, and the ratio to it,
- persistent bytes per parameter (weights + gradient + optimizer state, measured from the tensors).

Peers that are not installed or do not run on this device are recorded with the exact error.

    python benchmarks/kernels.py                       # default: both workloads, CPU, < 3 minutes
    python benchmarks/kernels.py --workloads tensor50m --steps 10
    python benchmarks/kernels.py --device cuda --modes all   # adds FlashOptim on CUDA

Writes benchmarks/results/kernels.json (``--out`` to change) and prints a table. Targets (CPU, ratios
from one run): leanopt exact/fp32 <= 1.0x torch fused fp32 AdamW; compact/int8 <= 0.8x; every leanopt
mode within 1.5x of its bandwidth bound.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

# GPT-2 small (124M): token/position embeddings and 12 blocks of (ln, attn qkv, attn proj, ln, mlp in, mlp out)
GPT2_SMALL_SHAPES: list[tuple[int, ...]] = [(50257, 768), (1024, 768)]
for _ in range(12):
    GPT2_SMALL_SHAPES += [(768,), (768,), (2304, 768), (2304,), (768, 768), (768,), (768,), (768,),
                          (3072, 768), (3072,), (768, 3072), (768,)]  # fmt: skip
GPT2_SMALL_SHAPES += [(768,), (768,)]
# one 50M-element tensor, 2-D so that row-grouped quantised states apply to it
WORKLOADS = {"gpt2-small": GPT2_SMALL_SHAPES, "tensor50m": [(12_500, 4_000)]}


@dataclass
class Mode:
    """One optimizer configuration. ``touched``: bytes each parameter's update must read + write."""

    name: str
    touched: float
    param_dtype: torch.dtype
    build: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    family: str = "peer"
    device_types: tuple[str, ...] = ("cpu", "cuda")


def _torch_adamw(fused: bool):
    return lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=fused, foreach=not fused)


def _leanopt(master: str, states: str, kernel: str = "auto"):
    def build(ps):
        import leanopt

        return leanopt.AdamW(ps, lr=1e-4, master=master, states=states, kernel=kernel)

    return build


def _torchao(name: str):
    def build(ps):
        import torchao.optim

        return getattr(torchao.optim, name)(ps, lr=1e-4)

    return build


def _bnb(ps):
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(ps, lr=1e-4)


def _optimi(ps):
    import optimi

    return optimi.AdamW(ps, lr=1e-4, kahan_sum=True)


def _flashoptim(ps):
    import flashoptim

    return flashoptim.FlashAdamW(ps, lr=1e-4)


# Touched bytes per parameter per step (read + write), by component:
#   fp32 AdamW: param 4+4, grad 4, exp_avg 4+4, exp_avg_sq 4+4                               = 28
#   exact/fp32: bf16 param 2+2, int16 remainder 2+2, bf16 grad 2, states 16                   = 26
#   compact/int8: bf16 param 2+2, int8 residual 1+1, grad 2, 2 x (int8 codes 1+1, bf16 scale/32 2x2/32) = 12.25
#   compact/int4: as int8 with 4-bit codes (0.5+0.5 per state)                                = 10.25
#   8-bit peers (blocks of 256 with an fp32 scale): bf16 param 4, grad 2, 2 x (1+1 + 2x4/256) = 10.06
#   4-bit peers (blocks of 128): bf16 param 4, grad 2, 2 x (0.5+0.5 + 2x4/128)                = 8.13
#   optimi Kahan: bf16 param 4, bf16 Kahan buffer 4, bf16 grad 2, bf16 states 8              = 18
#   FlashOptim AdamW (24-bit master): bf16 param 4, int8 ECC 2, grad 2, int8 states 4, fp16 scales/32 0.25 = 12.25
MODES: dict[str, Mode] = {
    m.name: m
    for m in [
        Mode("torch AdamW fp32 fused", 28, torch.float32, _torch_adamw(True), "baseline"),
        Mode("torch AdamW fp32 foreach", 28, torch.float32, _torch_adamw(False), "baseline"),
        Mode("leanopt exact/fp32", 26, torch.bfloat16, _leanopt("exact", "fp32"), "leanopt"),
        Mode("leanopt compact/int8", 12.25, torch.bfloat16, _leanopt("compact", "int8"), "leanopt"),
        Mode("leanopt compact/int4", 10.25, torch.bfloat16, _leanopt("compact", "int4"), "leanopt"),
        Mode("leanopt exact/fp32 reference", 26, torch.bfloat16, _leanopt("exact", "fp32", "reference"), "leanopt"),
        Mode("torchao AdamW8bit", 10.06, torch.bfloat16, _torchao("AdamW8bit")),
        Mode("torchao AdamW4bit", 8.13, torch.bfloat16, _torchao("AdamW4bit")),
        Mode("bitsandbytes AdamW8bit", 10.06, torch.bfloat16, _bnb),
        Mode("optimi AdamW kahan", 18, torch.bfloat16, _optimi),
        Mode("FlashOptim AdamW", 12.25, torch.bfloat16, _flashoptim, device_types=("cuda",)),
    ]
}
DEFAULT_MODES = [
    "torch AdamW fp32 fused", "torch AdamW fp32 foreach", "leanopt exact/fp32", "leanopt compact/int8",
    "leanopt compact/int4", "torchao AdamW8bit", "torchao AdamW4bit", "bitsandbytes AdamW8bit", "optimi AdamW kahan",
    "FlashOptim AdamW",
]  # fmt: skip


@dataclass
class Result:
    workload: str
    mode: str
    params: int = 0
    status: str = "ok"
    error: str = ""
    first_step_s: float = 0.0
    step_ms: float = 0.0
    step_ms_all: list[float] = field(default_factory=list)
    touched_bytes_per_param: float = 0.0
    achieved_gbps: float = 0.0
    bound_ms: float = 0.0
    ratio_to_bound: float = 0.0
    ratio_to_torch_fused: float = 0.0
    bytes_per_param: float = 0.0
    leanopt_fused_pipelines: list[str] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_gbps(device: torch.device, n: int = 50_000_000, reps: int = 7) -> float:
    """Plain fp32 copy bandwidth (read + write bytes per second): the best of ``reps`` copies (the
    machine's attainable bandwidth; on a shared machine the median would move with the load)."""
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t)
    del src, dst
    return 8 * n / min(times) / 1e9


def _persistent_bytes(params: list[torch.Tensor], opt: torch.optim.Optimizer) -> int:
    seen: set[int] = set()
    total = 0

    def add(t) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            for inner in _flatten_tensor(t):
                key = inner.untyped_storage().data_ptr()
                if key not in seen and inner.numel() > 1:
                    seen.add(key)
                    total += inner.untyped_storage().nbytes()

    for p in params:
        add(p)
        add(p.grad)
    for state in opt.state.values():
        for v in state.values():
            add(v)
    return total


def _flatten_tensor(t: torch.Tensor) -> list[torch.Tensor]:
    """Plain tensors inside tensor subclasses (torchao keeps codes and scales in a subclass)."""
    if type(t) is torch.Tensor or type(t) is torch.nn.Parameter:
        return [t]
    names = getattr(t, "__tensor_flatten__", None)
    if names is None:
        return [t]
    out: list[torch.Tensor] = []
    for name in names()[0]:
        out += _flatten_tensor(getattr(t, name))
    return out


def run_mode(workload: str, mode: Mode, device: torch.device, steps: int, warmup: int) -> Result:
    res = Result(workload, mode.name, touched_bytes_per_param=mode.touched)
    if device.type not in mode.device_types:
        res.status, res.error = "skipped", f"runs on {'/'.join(mode.device_types)} only"
        return res
    params: list[torch.Tensor] = []
    opt = None
    calls_before: dict = {}
    if mode.family == "leanopt":
        from leanopt.kernels import fused

        calls_before = {r.key: r.calls for r in fused.compile_stats()}
    try:
        torch.manual_seed(0)
        for shape in WORKLOADS[workload]:
            p = torch.nn.Parameter(torch.randn(shape, device=device, dtype=mode.param_dtype) * 0.02)
            p.grad = torch.randn(shape, device=device, dtype=mode.param_dtype) * 1e-3
            params.append(p)
        res.params = sum(p.numel() for p in params)
        opt = mode.build(params)
        _sync(device)
        t = time.perf_counter()
        opt.step()
        _sync(device)
        res.first_step_s = time.perf_counter() - t
        for _ in range(max(warmup - 1, 0)):
            opt.step()
        times = []
        for i in range(steps):
            for group in opt.param_groups:  # a changing LR must not recompile anything
                group["lr"] = 1e-4 * (1 + 0.01 * i) if not isinstance(group["lr"], torch.Tensor) else group["lr"]
            _sync(device)
            t = time.perf_counter()
            opt.step()
            _sync(device)
            times.append(time.perf_counter() - t)
        res.step_ms_all = [round(x * 1e3, 3) for x in times]
        res.step_ms = statistics.median(times) * 1e3
        res.bytes_per_param = _persistent_bytes(params, opt) / res.params
        if mode.family == "leanopt":  # which compiled pipelines ran (none: the reference executor)
            from leanopt.kernels import fused

            res.leanopt_fused_pipelines = [
                f"{r.key[4]}/{r.key[5]} {'pairs' if r.key[10] else 'generic'} (first call {r.seconds:.1f} s)"
                for r in fused.compile_stats() if r.calls > calls_before.get(r.key, 0)
            ]  # fmt: skip
    except Exception as err:  # record the exact error; a peer that cannot run is a result too
        res.status = "error"
        res.error = f"{type(err).__name__}: {err}".strip()[:600]
        if os.environ.get("LEANOPT_BENCH_DEBUG"):
            traceback.print_exc()
    finally:
        del params, opt
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workloads", default="gpt2-small,tensor50m", help=f"comma list of {list(WORKLOADS)}")
    ap.add_argument("--modes", default="default", help="'default', 'all', or a comma list of mode names")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per mode (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation happens here)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default=str(HERE / "results" / "kernels.json"))
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for w in workloads:
        if w not in WORKLOADS:
            ap.error(f"--workloads: unknown workload {w!r}; choose from {list(WORKLOADS)}")
    names = DEFAULT_MODES if args.modes == "default" else list(MODES) if args.modes == "all" else args.modes.split(",")
    for n in names:
        if n not in MODES:
            ap.error(f"--modes: unknown mode {n!r}; choose from {list(MODES)}")

    started = time.time()
    bw = copy_gbps(device)
    print(f"device {device} ({_device_name(device)}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"plain fp32 copy: {bw:.1f} GB/s (read + write)\n")
    results: list[Result] = []
    for w in workloads:
        fused_ms = None
        for n in names:
            r = run_mode(w, MODES[n], device, args.steps, args.warmup)
            if r.status == "ok":
                r.achieved_gbps = r.touched_bytes_per_param * r.params / (r.step_ms / 1e3) / 1e9
                r.bound_ms = r.touched_bytes_per_param * r.params / (bw * 1e9) * 1e3
                r.ratio_to_bound = r.step_ms / r.bound_ms
                if n == "torch AdamW fp32 fused":
                    fused_ms = r.step_ms
                if fused_ms:
                    r.ratio_to_torch_fused = r.step_ms / fused_ms
            results.append(r)
            _print_row(r)
            _write(args, argv, device, bw, None, started, results)  # partial results survive an interrupted run
        print()
    bw_end = copy_gbps(device)
    print(f"plain fp32 copy at the end: {bw_end:.1f} GB/s (the bound uses the start's {bw:.1f})\n")
    _print_targets(results)
    out = _write(args, argv, device, bw, bw_end, started, results)
    print(f"\nwrote {out} ({time.time() - started:.0f} s)")
    return 0


def _write(args, argv, device, bw, bw_end, started, results) -> Path:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": "python benchmarks/kernels.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "device": str(device),
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "copy_gbps": bw,
        "copy_gbps_end": bw_end,
        "wall_s": time.time() - started,
        "results": [asdict(r) for r in results],
        "targets": _targets(results),
        "complete": bw_end is not None,
    }
    out.write_text(json.dumps(payload, indent=1))
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _print_row(r: Result) -> None:
    if r.status != "ok":
        print(f"{r.workload:11} {r.mode:37} {r.status.upper()}: {r.error[:150]}")
        return
    fused = f"{r.ratio_to_torch_fused:5.2f}x" if r.ratio_to_torch_fused else "   -  "
    name = r.mode + (" [eager]" if r.mode.startswith("leanopt") and not r.leanopt_fused_pipelines else "")
    print(
        f"{r.workload:11} {name:37} step {r.step_ms:8.1f} ms  first {r.first_step_s:6.1f} s  "
        f"vs torch fused {fused}  {r.achieved_gbps:6.1f} GB/s  bound {r.bound_ms:7.1f} ms "
        f"({r.ratio_to_bound:4.2f}x)  touched {r.touched_bytes_per_param:5.2f} B/p  memory {r.bytes_per_param:5.2f} B/p"
    )


def _targets(results: list[Result]) -> list[dict]:
    checks = []
    for r in results:
        if r.status != "ok" or not r.mode.startswith("leanopt") or "reference" in r.mode:
            continue
        if r.mode == "leanopt exact/fp32" and r.ratio_to_torch_fused:
            checks.append({"workload": r.workload, "check": "exact/fp32 <= 1.0x torch fused",
                           "value": r.ratio_to_torch_fused, "met": r.ratio_to_torch_fused <= 1.0})  # fmt: skip
        if r.mode == "leanopt compact/int8" and r.ratio_to_torch_fused:
            checks.append({"workload": r.workload, "check": "compact/int8 <= 0.8x torch fused",
                           "value": r.ratio_to_torch_fused, "met": r.ratio_to_torch_fused <= 0.8})  # fmt: skip
        checks.append({"workload": r.workload, "check": f"{r.mode} <= 1.5x bandwidth bound",
                       "value": r.ratio_to_bound, "met": r.ratio_to_bound <= 1.5})  # fmt: skip
    return checks


def _print_targets(results: list[Result]) -> None:
    print("targets:")
    for c in _targets(results):
        print(f"  {'MET ' if c['met'] else 'MISS'} {c['workload']:11} {c['check']:45} {c['value']:.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
