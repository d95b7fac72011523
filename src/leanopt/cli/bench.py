"""``leanopt bench``: optimizer step time of leanopt's modes next to torch.optim's fused and foreach AdamW.

Importable for other benchmarks: :func:`make_params` builds parameters with fixed gradients,
:func:`time_steps` times ``optimizer.step()``, :func:`bench_cases` lists what is installed and
:func:`run_bench` runs cases and returns one JSON-ready dict per case.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .common import CLIError, detect_features, jsonable, ratio, table
from .plan import OPTIMIZERS, Mode, Shape, check_mode, resolve_model

EXAMPLES = """\
examples:
  leanopt bench                          # GPT-2-small shapes (124M parameters), AdamW
  leanopt bench --size 10M --steps 10    # 10M parameters as rows of 4096
  leanopt bench --size path/to/config.json --optimizer sgd
  leanopt bench --modes exact/fp32,compact/int8 --out bench.json
"""


@dataclass
class BenchCase:
    """One optimizer to time: ``make(params)`` builds it; ``dtype`` is the parameters' dtype."""

    name: str
    label: str
    dtype: torch.dtype
    make: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    kind: str = "leanopt"


def _torch_cases(optimizer: str) -> list[BenchCase]:
    if optimizer in ("adamw", "adam"):
        cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
        return [
            BenchCase(f"torch-{impl}", f"torch.optim.{cls.__name__}(fp32, {impl}=True)", torch.float32,
                      lambda ps, cls=cls, impl=impl: cls(ps, lr=1e-3, **{impl: True}), "torch")
            for impl in ("fused", "foreach")
        ]  # fmt: skip
    if optimizer == "sgd":
        return [
            BenchCase(f"torch-{impl}", f"torch.optim.SGD(fp32, momentum=0.9, {impl}=True)", torch.float32,
                      lambda ps, impl=impl: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, **{impl: True}), "torch")
            for impl in ("fused", "foreach")
        ]  # fmt: skip
    return []  # torch has no Lion


def bench_cases(optimizer: str = "adamw", modes: list[Mode] | None = None, **leanopt_options: Any) -> list[BenchCase]:
    """torch.optim baselines plus leanopt in each mode (default: every installed master/state pairing
    of interest). ``leanopt_options`` are passed to the leanopt optimizers (e.g. ``kernel=``)."""
    import leanopt

    features = detect_features()
    if modes is None:
        wanted = [Mode("exact", "fp32"), Mode("exact", "bf16"), Mode("compact", "int8"), Mode("compact", "int4")]
        modes = [m for m in wanted if features.has_master(m.master) and features.has_states(m.states)]
    cls_name, hyper = OPTIMIZERS[optimizer]
    cases = _torch_cases(optimizer)
    for m in modes:
        if m.release:
            raise CLIError(f"mode {m.name!r}: bench times optimizer.step() alone; drop '+release'")
        check_mode(m, features)
        cls = getattr(leanopt, cls_name)
        cases.append(BenchCase(
            m.name, f"leanopt.{cls_name}(bf16, master={m.master}, states={m.states})", torch.bfloat16,
            lambda ps, cls=cls, m=m: cls(ps, lr=1e-3, master=m.master, states=m.states, **hyper, **leanopt_options),
        ))  # fmt: skip
    return cases


def make_params(
    shapes: list[Shape], dtype: torch.dtype, device: str | torch.device, seed: int = 0
) -> list[nn.Parameter]:
    """Parameters of ``shapes`` with fixed random values and gradients (the same for every dtype)."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device=device, dtype=dtype))
        p.grad = (torch.randn(s, generator=gen) * 1e-3).to(device=device, dtype=dtype)
        params.append(p)
    return params


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(opt: torch.optim.Optimizer, steps: int, warmup: int = 1) -> list[float]:
    """Seconds per ``opt.step()`` for ``steps`` steps after ``warmup`` untimed ones (gradients stay set)."""
    device = next(p.device for g in opt.param_groups for p in g["params"])
    for _ in range(warmup):
        opt.step()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def run_bench(
    shapes: list[Shape],
    cases: list[BenchCase],
    steps: int = 5,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Time each case on fresh parameters; returns dicts with median/min ms and bytes per parameter."""
    from leanopt import memory_report

    device = torch.device(device)
    results = []
    for case in cases:
        if progress:
            progress(case.name)
        params = make_params(shapes, case.dtype, device)
        opt = case.make(params)
        first = time_steps(opt, warmup, 0)  # warm-up steps, timed apart (they include any compilation)
        times = time_steps(opt, steps, 0)
        report = memory_report(opt)
        results.append({
            "name": case.name, "label": case.label, "kind": case.kind, "dtype": str(case.dtype).replace("torch.", ""),
            "median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
            "times_ms": [1e3 * t for t in times], "warmup_ms": [1e3 * t for t in first],
            "bytes_per_param": report.bytes_per_param,
            "by_category": dict(report.by_category),
        })  # fmt: skip
        del opt, params, report
        gc.collect()
    return results


def build_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench",
        help="time optimizer steps: leanopt modes vs torch.optim fused/foreach",
        description="Times optimizer.step() (fixed gradients, no model) for leanopt's modes and torch.optim's "
        "fused and foreach implementations, prints a table and writes JSON.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--size", default="gpt2-small", help="model: gpt2-small (default), a count (10M), config.json, module:factory"
    )
    p.add_argument("--optimizer", default="adamw", choices=sorted(OPTIMIZERS))
    p.add_argument("--modes", help="comma list of MASTER/STATES for leanopt (default: installed ones)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per case (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when present)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--kernel", help="passed to leanopt optimizers as kernel= (e.g. reference, fused, auto)")
    p.add_argument("--out", default="leanopt-bench.json", help="JSON file to write (default leanopt-bench.json)")
    p.set_defaults(func=run)
    return p


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; otherwise the named device, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name!r} is not a device; accepted: auto, cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise CLIError(f"--device {name!r}: accepted: auto, cpu, cuda, cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name!r}: CUDA is not available on this machine")
    return device


def run(args: argparse.Namespace) -> int:
    """Entry point of ``leanopt bench``."""
    if args.steps < 1:
        raise CLIError(f"--steps must be at least 1, got {args.steps}")
    if args.warmup < 0:
        raise CLIError(f"--warmup must be 0 or more, got {args.warmup}")
    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    out = Path(args.out)
    if out.parent and not out.parent.exists():
        raise CLIError(f"--out {args.out!r}: folder {str(out.parent)!r} does not exist")
    model = resolve_model(args.size)
    modes = [Mode.parse(t) for t in args.modes.split(",") if t.strip()] if args.modes else None
    options = {} if args.kernel is None else {"kernel": args.kernel}
    if options:
        import leanopt

        try:
            leanopt.AdamW([nn.Parameter(torch.empty(2, dtype=torch.bfloat16, device="meta"))], **options)
        except (ValueError, TypeError) as err:
            raise CLIError(f"--kernel {args.kernel!r}: {err}") from None
    cases = bench_cases(args.optimizer, modes, **options)
    n = model.num_params
    print(
        f"bench: {model.source}, {n:,} parameters in {len(model.shapes)} tensors, {args.optimizer}, "
        f"{device}, {torch.get_num_threads()} threads, {args.steps} steps after {args.warmup} warm-up",
        flush=True,
    )
    results = run_bench(model.shapes, cases, args.steps, args.warmup, device,
                        progress=lambda name: print(f"  timing {name} ...", flush=True))  # fmt: skip
    base = next((r["median_ms"] for r in results if r["name"] == "torch-fused"), None)
    rows = [
        [r["name"], f"{r['median_ms']:.2f}", f"{r['min_ms']:.2f}", ratio(r["median_ms"], base),
         f"{r['bytes_per_param']:.3f}", f"{sum(r['warmup_ms']):.0f}" if r["warmup_ms"] else "-"]
        for r in results
    ]  # fmt: skip
    print()
    print(table(rows, ["case", "median ms", "min ms", "vs torch fused", "B/param", "warm-up ms"]))
    print("\nB/param: weights + gradients + optimizer states, from leanopt.memory_report. warm-up ms: the untimed")
    print("first steps together (they include any kernel compilation).")
    doc = {
        "command": "leanopt bench",
        "model": {"source": model.source, "num_params": n, "num_tensors": len(model.shapes)},
        "optimizer": args.optimizer, "device": str(device), "threads": torch.get_num_threads(),
        "steps": args.steps, "warmup": args.warmup, "torch": torch.__version__, "platform": platform.platform(),
        "results": results,
    }  # fmt: skip
    out.write_text(json.dumps(jsonable(doc), indent=2))
    print(f"wrote {out}")
    return 0 if all(math.isfinite(r["median_ms"]) for r in results) else 1
