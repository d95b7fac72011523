"""Gradient release: measured peak memory and step time on a GPT-2-small-shaped model (124M params, bf16).

Each configuration trains a few steps in a fresh Python process, so one run's allocations cannot hide
in another's peak. Peak memory is the process's measured peak resident set size (VmHWM from
/proc/self/status; ru_maxrss where that is missing), not a figure computed from shapes. Step time is the
median wall time of the timed steps (forward + backward + optimizer.step + zero_grad), after warm-up steps.
Tokens are random ids (the benchmark measures memory and time, not learning). Prints a table and writes
benchmarks/results/release_memory.json.

    python benchmarks/release_memory.py                 # GPT-2 small, batch 2 x 128 tokens, 1 + 3 steps
    python benchmarks/release_memory.py --repeats 3     # median of 3 fresh processes per config
    python benchmarks/release_memory.py --short         # a small model: a smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import leanopt
from leanopt.models import GPT, GPT2_SMALL, GPTConfig

CONFIGS = {
    "no_release": "AdamW (bf16 weights, master='exact', fp32 states); loss.backward(); optimizer.step()",
    "release": "the same with leanopt.release_gradients(optimizer): updates inside backward, grads freed",
}
SHORT_MODEL = GPTConfig(vocab_size=4096, block_size=128, n_layer=4, n_head=4, n_embd=256)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far, measured by the kernel."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def current_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(config: str, short: bool, batch: int, seq: int, warmup: int, steps: int, untied: bool = False) -> dict:
    """One configuration, in this (fresh) process."""
    torch.manual_seed(0)
    cfg = SHORT_MODEL if short else GPT2_SMALL
    if untied:  # the same shapes with a separate output layer (GPT-2 small untied: 163M params)
        cfg = dataclasses.replace(cfg, tie_embeddings=False)
    torch.set_default_dtype(torch.bfloat16)  # build the model in bf16: no fp32 copy ever exists
    model = GPT(cfg)
    torch.set_default_dtype(torch.float32)
    opt = leanopt.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, master="exact", states="fp32")
    handle = leanopt.release_gradients(opt) if config == "release" else None
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    y = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    rss_after_build = current_rss_bytes()
    times, grad_bytes_seen = [], 0
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        rss_after_backward = current_rss_bytes()
        grad_bytes_seen = max(grad_bytes_seen, leanopt.memory_report(opt).by_category["gradients"])
        opt.step()
        opt.zero_grad()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    report = leanopt.memory_report(opt)
    params = {id(p): p for p in model.parameters()}.values()
    if handle is not None:
        handle.remove()
    return {
        "config": config,
        "params": sum(p.numel() for p in params),
        "grad_bytes": sum(p.numel() * p.element_size() for p in params),
        "grad_bytes_held_after_backward": grad_bytes_seen,
        "rss_after_build_bytes": rss_after_build,
        "rss_after_backward_bytes": rss_after_backward,  # last step, before optimizer.step()
        "peak_rss_bytes": peak_rss_bytes(),
        "median_step_s": statistics.median(times),
        "step_times_s": times,
        "optimizer_bytes": report.total_bytes - report.by_category["weights"] - report.by_category["gradients"],
        "final_loss": loss.detach().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="a small model (smoke test)")
    parser.add_argument("--untied", action="store_true", help="output layer not tied to the token embedding")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--repeats", type=int, default=1, help="runs per config (medians are reported)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "release_memory.json"))
    parser.add_argument("--worker", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name in ("batch", "seq", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")

    if args.worker:
        result = worker(args.worker, args.short, args.batch, args.seq, args.warmup, args.steps, args.untied)
        print(json.dumps(result))
        return

    runs: list[dict] = []
    for rep in range(args.repeats):  # alternate the configs; each run in a fresh process
        for config in CONFIGS:
            cmd = [sys.executable, __file__, "--worker", config, "--batch", str(args.batch), "--seq", str(args.seq),
                   "--warmup", str(args.warmup), "--steps", str(args.steps)]  # fmt: skip
            cmd += ["--short"] if args.short else []
            cmd += ["--untied"] if args.untied else []
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.exit(f"{config} failed:\n{done.stderr[-3000:]}")
            runs.append({"repeat": rep, **json.loads(done.stdout.strip().splitlines()[-1])})

    def med(config: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["config"] == config)

    keys = ("peak_rss_bytes", "rss_after_build_bytes", "rss_after_backward_bytes", "grad_bytes_held_after_backward")
    results = [{"config": c, **{k: med(c, k) for k in (*keys, "median_step_s")}} for c in CONFIGS]
    base, rel = results
    grad_bytes = runs[0]["grad_bytes"]
    saved = base["peak_rss_bytes"] - rel["peak_rss_bytes"]
    after = base["rss_after_backward_bytes"] - rel["rss_after_backward_bytes"]
    mib = 2**20
    name = f"{'small (--short)' if args.short else 'GPT-2 small'}{' untied' if args.untied else ''}"
    print(f"model: {name}, {runs[0]['params']:,} params, bf16; "
          f"batch {args.batch} x {args.seq} tokens; {args.warmup} warm-up + {args.steps} timed steps; "
          f"median of {args.repeats} run(s) per config")  # fmt: skip
    print(f"{'config':<12} {'peak RSS MiB':>13} {'RSS after build':>16} {'RSS after backward':>19} "
          f"{'grads held MiB':>15} {'median step s':>14}")  # fmt: skip
    for r in results:
        print(f"{r['config']:<12} {r['peak_rss_bytes'] / mib:>13.1f} {r['rss_after_build_bytes'] / mib:>16.1f} "
              f"{r['rss_after_backward_bytes'] / mib:>19.1f} {r['grad_bytes_held_after_backward'] / mib:>15.1f} "
              f"{r['median_step_s']:>14.3f}")  # fmt: skip
    for c in CONFIGS:
        peaks = ", ".join(f"{r['peak_rss_bytes'] / mib:.1f}" for r in runs if r["config"] == c)
        print(f"  {c} peak RSS of each run (MiB): {peaks}")
    print(f"RSS after backward lowered by {after / mib:.1f} MiB")
    print(f"peak RSS lowered by {saved / mib:.1f} MiB; gradient bytes {grad_bytes / mib:.1f} MiB "
          f"(ratio {saved / grad_bytes:.2f}); step time ratio release/no_release "
          f"{rel['median_step_s'] / base['median_step_s']:.3f}")  # fmt: skip
    summary = {
        "command": " ".join(["python", "benchmarks/release_memory.py", *sys.argv[1:]]),
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "out")},
        "configs": CONFIGS,
        "results": results,
        "runs": runs,
        "grad_bytes": grad_bytes,
        "peak_rss_saved_bytes": saved,
        "rss_after_backward_saved_bytes": after,
        "saved_over_grad_bytes": saved / grad_bytes,
        "step_time_ratio": rel["median_step_s"] / base["median_step_s"],
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "load_average": os.getloadavg(),
        },  # fmt: skip
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
