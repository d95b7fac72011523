"""One demo configuration, trained in its own process so its memory figures stand alone.

``python -m leanopt.cli.worker CONFIG.json RESULT.json``: reads the configuration written by
``leanopt demo``, trains, and writes every figure to RESULT.json. Progress goes to stdout as lines
``@progress STEP TOTAL LOSS STEP_MS`` that the parent turns into a progress bar.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from typing import Any

import torch


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0). True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss() -> int:
    """Resident set size in bytes (0 where unknown)."""
    kib = _status_kib("VmRSS")
    return 1024 * kib if kib is not None else 0


def peak_rss() -> int:
    """Peak resident set size in bytes: VmHWM where available, else getrusage's ru_maxrss."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return 1024 * kib
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else 1024 * maxrss)


def trim_heap() -> None:
    """Return freed heap memory to the system (glibc's malloc_trim; nothing elsewhere)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state (master bits included) that ``opt`` holds now, from its tensors."""
    from leanopt import memory_report

    by_category = memory_report(opt).by_category
    return sum(v for k, v in by_category.items() if k not in ("weights", "gradients"))


def train(cfg: dict[str, Any], emit=print) -> dict[str, Any]:
    """Train one configuration; returns the figures (see ``leanopt demo``'s JSON)."""
    import leanopt
    import leanopt.kernels
    from leanopt.data import get_batch, stdlib_corpus
    from leanopt.models import GPT, GPTConfig

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    device = torch.device(cfg["device"])
    mcfg = GPTConfig(**cfg["model"])
    train_data, val_data = stdlib_corpus(int(cfg["corpus_bytes"]))
    standard = cfg["kind"] == "standard"
    hyper = {"lr": cfg["lr"], "betas": (0.9, 0.95), "weight_decay": 0.1}
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if standard else nullcontext

    def build(model_cfg: GPTConfig) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
        torch.manual_seed(cfg["seed"])
        model = GPT(model_cfg).to(device)  # the same fp32 initialisation for every configuration
        if standard:
            return model, torch.optim.AdamW(model.parameters(), fused=True, **hyper), None
        model = model.to(torch.bfloat16)
        opt = leanopt.AdamW(model.parameters(), master=cfg["master"], states=cfg["states"], **hyper)
        return model, opt, leanopt.release_gradients(opt) if cfg["release"] else None

    # One step of the same recipe on a throwaway miniature model first, so that per-process costs
    # (lazy imports, thread pools, kernel caches) are paid before the baseline and not counted.
    t_start = time.perf_counter()
    mini_cfg = GPTConfig(vocab_size=mcfg.vocab_size, block_size=16, n_layer=1, n_head=1, n_embd=16)
    mini, mini_opt, mini_handle = build(mini_cfg)
    with autocast():
        mini(*(t.to(device) for t in get_batch(train_data, 2, 16, torch.Generator().manual_seed(0))))[1].backward()
    mini_opt.step()
    if mini_handle is not None and hasattr(mini_handle, "remove"):
        mini_handle.remove()
    del mini, mini_opt, mini_handle
    gc.collect()
    trim_heap()  # memory freed so far leaves the RSS: what the model takes must raise it to count

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    base_alloc = torch.cuda.memory_allocated(device) if cuda else 0
    reset = reset_peak_rss()
    rss_before = current_rss()
    t_build = time.perf_counter()
    model, opt, handle = build(mcfg)
    build_peak = peak_rss()
    build_cuda_peak = torch.cuda.max_memory_allocated(device) if cuda else 0
    # Build every kernel the optimizer will need now (leanopt.kernels.prepare, where it exists; it may
    # create the optimizer state, as the first step would, but changes no value), so that compiling is
    # not counted as training memory: the peak counters are reset after it, and the RSS it added beyond
    # the state it created (kernel code and caches) is subtracted. Without prepare this measures the
    # same peak as one reset before the build.
    prepare = None if standard else getattr(leanopt.kernels, "prepare", None)
    t_prepare, prepare_rss, prepare_state = time.perf_counter(), 0, 0
    if prepare is not None:
        rss0, state0 = current_rss(), optimizer_state_bytes(opt)
        prepare(opt)
        gc.collect()
        trim_heap()  # freed scratch memory leaves the RSS, so that what remains is what prepare keeps
        prepare_state = optimizer_state_bytes(opt) - state0
        prepare_rss = max(0, current_rss() - rss0 - prepare_state)
    t_train = time.perf_counter()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    reset = reset_peak_rss() and reset
    steps, warm = int(cfg["steps"]), max(1, int(cfg["steps"]) // 10)

    def lr_at(i: int) -> float:  # linear warm-up, cosine decay to 10%
        if i < warm:
            return (i + 1) / warm
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(cfg["seed"])
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    losses, times, report = [], [], None
    parent = os.getppid()
    for step in range(1, steps + 1):
        if os.getppid() != parent:  # the demo was stopped: do not train on as an orphan
            raise SystemExit(1)
        x, y = (t.to(device) for t in get_batch(train_data, cfg["batch"], mcfg.block_size, gen))
        sync()
        t0 = time.perf_counter()
        with autocast():
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        if step == steps:
            report = leanopt.memory_report(opt)  # gradients still held (unless released)
        opt.zero_grad(set_to_none=True)
        sched.step()
        value = loss.item()  # synchronises
        times.append(time.perf_counter() - t0)
        losses.append(value)
        emit(f"@progress {step} {steps} {value:.4f} {1e3 * times[-1]:.1f}")
        if not math.isfinite(value):
            break
    peak = max(build_peak, peak_rss() - prepare_rss)
    cuda_peak = max(build_cuda_peak, torch.cuda.max_memory_allocated(device)) - base_alloc if cuda else None

    t_eval = time.perf_counter()
    model.eval()
    vgen = torch.Generator().manual_seed(1234)
    with torch.no_grad(), autocast():
        val = [model(*(t.to(device) for t in get_batch(val_data, cfg["batch"], mcfg.block_size, vgen)))[1].item()
               for _ in range(cfg["eval_batches"])]  # fmt: skip
    t_end = time.perf_counter()
    if handle is not None and hasattr(handle, "remove"):
        handle.remove()
    tail = losses[-max(1, len(losses) // 10) :]
    timed = times[min(len(times) - 1, max(1, len(times) // 10)) :]  # drop warm-up steps
    assert report is not None or len(losses) < steps
    return {
        "name": cfg["name"],
        "num_params": report.num_params if report else sum(p.numel() for p in model.parameters()),
        "bytes_by_category": dict(report.by_category) if report else {},
        "bytes_per_param": report.bytes_per_param if report else None,
        "peak_rss_bytes": peak,
        "rss_before_model_bytes": rss_before,
        "peak_rss_above_start_bytes": peak - rss_before,
        # RSS added by leanopt.kernels.prepare beyond the state it created: subtracted from the peak
        "kernel_prepare": {"called": prepare is not None, "rss_bytes": prepare_rss, "state_bytes": prepare_state},
        "peak_rss_reset": reset,
        "cuda_peak_allocated_bytes": cuda_peak,
        "median_step_s": statistics.median(timed),
        "step_times_s": times,
        "train_losses": losses,
        "final_train_loss": statistics.fmean(tail),
        "val_loss": statistics.fmean(val),
        "completed_steps": len(losses),
        "torch_threads": torch.get_num_threads(),
        # wall seconds by phase: miniature-model warm-up, build, kernel prepare, training steps, evaluation
        "phase_s": {
            "warmup": t_build - t_start,
            "build": t_prepare - t_build,
            "prepare": t_train - t_prepare,
            "train": t_eval - t_train,
            "eval": t_end - t_eval,
        },
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m leanopt.cli.worker CONFIG.json RESULT.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        cfg = json.load(f)
    result = train(cfg, emit=lambda line: print(line, flush=True))
    tmp = argv[1] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
