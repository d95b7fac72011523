"""Quality benchmark: a byte-level GPT trained on the Python standard library's own sources.

Same seed, same initial weights, same batches and the same LR schedule for every run; only the
precision recipe changes. Prints a table and writes benchmarks/results/quality.json.

    python benchmarks/quality.py              # full: 500 steps per run, nine runs (~25 CPU-minutes)
    python benchmarks/quality.py --short      # 60 steps, a smaller model: a smoke test

The nine runs can also go in parallel (``--runs NAME --out part.json`` each) and be merged with
``--combine part1.json part2.json ...``. ms/step is wall time and only meaningful on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import leanopt
from leanopt.data import get_batch, stdlib_corpus
from leanopt.models import GPT, TINY_BYTES, GPTConfig

#: TINY_BYTES (4 layers, width 128) with 64-byte contexts, to fit the runs on a shared 2-core machine
QUALITY_MODEL = replace(TINY_BYTES, block_size=64)

#: run name -> (description, how the model is kept, optimizer options)
RUNS: dict[str, str] = {
    "fp32": "fp32 weights, fp32 compute, torch.optim.AdamW",
    "compact_int8": "bf16 weights, leanopt master='compact', states='int8'",
    "compact_int4": "bf16 weights, leanopt master='compact', states='int4'",
    "none": "plain bf16 weights (round to nearest), leanopt master='none', fp32 states",
    "exact": "bf16 weights, leanopt master='exact', fp32 states",
    "stochastic": "bf16 weights, leanopt master='stochastic' (no extra weight bytes), fp32 states",
    "stochastic_int8": "bf16 weights, leanopt master='stochastic', states='int8'",
    "stochastic_int4": "bf16 weights, leanopt master='stochastic', states='int4'",
    "autocast": "fp32 weights + bf16 autocast, torch.optim.AdamW (standard mixed precision)",
}


@dataclass(frozen=True)
class Setup:
    """Everything that is the same across runs."""

    model: GPTConfig = QUALITY_MODEL
    steps: int = 500
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eval_batches: int = 16
    corpus_bytes: int = 8_000_000
    seed: int = 1234


SHORT = Setup(
    model=GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64),
    steps=60,
    batch_size=16,
    warmup=10,
    eval_batches=4,
    corpus_bytes=1_000_000,
)


def lr_at(step: int, s: Setup) -> float:
    """Linear warmup then cosine decay to ``min_lr_ratio * lr`` (step counts from 0)."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    t = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(run: str, model: torch.nn.Module, s: Setup, **leanopt_options) -> torch.optim.Optimizer:
    hyper = dict(lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
    if run in ("fp32", "autocast"):
        return torch.optim.AdamW(model.parameters(), foreach=False, **hyper)
    options = {
        "exact": dict(master="exact", states="fp32"),
        "compact_int8": dict(master="compact", states="int8"),
        "compact_int4": dict(master="compact", states="int4"),
        "none": dict(master="none", states="fp32"),
        "stochastic": dict(master="stochastic", states="fp32"),
        "stochastic_int8": dict(master="stochastic", states="int8"),
        "stochastic_int4": dict(master="stochastic", states="int4"),
    }[run]
    options.update(leanopt_options)
    return leanopt.AdamW(model.parameters(), seed=s.seed, **hyper, **options)


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: torch.Tensor, s: Setup, autocast: bool) -> float:
    gen = torch.Generator().manual_seed(s.seed + 1)  # the same validation batches for every run
    losses = []
    for _ in range(s.eval_batches):
        x, y = get_batch(val, s.batch_size, s.model.block_size, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            _, loss = model(x, y)
        losses.append(loss.item())
    return sum(losses) / len(losses)


def train(run: str, s: Setup, data: tuple[torch.Tensor, torch.Tensor] | None = None, **leanopt_options) -> dict:
    """Train one run; returns its final validation loss and a few facts. ``leanopt_options`` override
    the run's optimizer options (e.g. ``states=`` for an ablation)."""
    train_data, val_data = data if data is not None else stdlib_corpus(s.corpus_bytes)
    torch.manual_seed(s.seed)
    model = GPT(s.model)  # fp32 init, identical for every run
    if run not in ("fp32", "autocast"):
        model = model.to(torch.bfloat16)
    opt = make_optimizer(run, model, s, **leanopt_options)
    autocast = run == "autocast"
    gen = torch.Generator().manual_seed(s.seed)
    model.train()
    t0 = time.perf_counter()
    train_losses = []
    for step in range(s.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s)
        x, y = get_batch(train_data, s.batch_size, s.model.block_size, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_losses.append(loss.item())
    seconds = time.perf_counter() - t0
    model.eval()
    val = evaluate(model, val_data, s, autocast)
    report = leanopt.memory_report(opt)
    return {
        "run": run,
        "description": RUNS[run],
        "val_loss": val,
        "train_loss_last50": sum(train_losses[-50:]) / len(train_losses[-50:]),
        "finite": math.isfinite(val),
        "seconds": seconds,
        "ms_per_step": 1000 * seconds / s.steps,
        "optimizer_bytes_per_param": report.bytes_per_param,
        "options": {k: str(v) for k, v in leanopt_options.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="a 60-step smoke version on a smaller model")
    parser.add_argument("--steps", type=int, default=None, help="override the number of steps")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {list(RUNS)}")
    parser.add_argument("--seed", type=int, default=None, help="override the seed (weights, batches, validation)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quality.json")
    parser.add_argument(
        "--combine", type=Path, nargs="+", default=None, metavar="JSON",
        help="do not train: merge the results of earlier runs (same setup, e.g. run in parallel with "
        "--runs) into one table and --out",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.combine:
        return combine(args.combine, args.out, argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        parser.error(f"--runs: unknown {unknown}; choose from {list(RUNS)}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    s = SHORT if args.short else Setup()
    if args.steps is not None:
        s = replace(s, steps=args.steps)
    if args.seed is not None:
        s = replace(s, seed=args.seed)
    data = stdlib_corpus(s.corpus_bytes)
    print(f"train {data[0].numel():,} bytes, validation {data[1].numel():,} bytes; {s.steps} steps, "
          f"batch {s.batch_size}x{s.model.block_size}, model {s.model}", flush=True)  # fmt: skip
    payload = {
        "setup": {**asdict(s), "model": asdict(s.model)},
        "command": "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": args.threads,
        "complete": False,
        "results": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for run in runs:
        r = train(run, s, data)
        payload["results"].append(r)
        print(f"  {run:15s} val {r['val_loss']:.4f}  ({r['ms_per_step']:.0f} ms/step)", flush=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n")  # partial results survive an interruption
    print_table(payload["results"])
    payload["complete"] = True
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


def print_table(results: list[dict]) -> None:
    """The results table; adds ``vs_fp32`` (relative difference of the validation loss) to each."""
    base = next((r["val_loss"] for r in results if r["run"] == "fp32"), None)
    print()
    print(f"{'run':15s}  {'val loss':>8s}  {'vs fp32':>8s}  {'ms/step':>7s}  description")
    for r in results:
        rel = f"{100 * (r['val_loss'] / base - 1):+.2f}%" if base else "n/a"
        r["vs_fp32"] = (r["val_loss"] / base - 1) if base else None
        print(f"{r['run']:15s}  {r['val_loss']:8.4f}  {rel:>8s}  {r['ms_per_step']:7.0f}  {r['description']}")


def combine(paths: list[Path], out: Path, argv: list[str] | None) -> int:
    """Merge result files written by runs with the same setup (in ``RUNS`` order)."""
    parts = [json.loads(p.read_text()) for p in paths]
    setups = {json.dumps(p["setup"], sort_keys=True) for p in parts}
    if len(setups) != 1:
        raise SystemExit(f"--combine: the files were run with different setups: {[str(p) for p in paths]}")
    by_run = {r["run"]: r for p in parts for r in p["results"]}
    results = [by_run[name] for name in RUNS if name in by_run]
    payload = {
        **parts[0],
        "command": "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "parts": [{"file": str(p), "command": part["command"]} for p, part in zip(paths, parts, strict=True)],
        "complete": all(p.get("complete", False) for p in parts),
        "results": results,
    }
    print_table(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
