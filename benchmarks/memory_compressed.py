"""Bytes per parameter of compact or stochastic master weights + 8-bit / 4-bit states on the GPT-2 shape.

Every figure is measured from the tensors the optimizer really holds after a real training step
(``leanopt.memory_report``) and from the size of a real ``torch.save`` checkpoint (model state dict +
optimizer state dict) on disk. "with release" runs the step inside backward
(``leanopt.release_gradients``), so no gradients are held after it.

    python benchmarks/memory_compressed.py            # 124M GPT-2 shape (needs ~4 GB of RAM)
    python benchmarks/memory_compressed.py --small    # a small GPT for a quick check

Prints a table and writes benchmarks/results/memory_compressed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import leanopt
from leanopt.models import GPT, GPT2_SMALL, GPTConfig

#: (name, optimizer class, options, release, target bytes/param or None)
CONFIGS = [
    ("AdamW exact + fp32 states", leanopt.AdamW, dict(master="exact", states="fp32"), False, None),
    ("AdamW compact + int8", leanopt.AdamW, dict(master="compact", states="int8"), False, 7.2),
    ("AdamW compact + int8, release", leanopt.AdamW, dict(master="compact", states="int8"), True, 5.2),
    ("AdamW compact + int4, release", leanopt.AdamW, dict(master="compact", states="int4"), True, 4.2),
    ("Lion compact + int8, release", leanopt.Lion, dict(master="compact", states="int8"), True, 4.2),
    ("SGD-momentum compact + int8, release", leanopt.SGD, dict(master="compact", states="int8", momentum=0.9), True,
     4.2),
    # no extra weight bytes (stochastic rounding), the smallest AdamW
    ("AdamW stochastic + int8, release", leanopt.AdamW, dict(master="stochastic", states="int8"), True, None),
    ("AdamW stochastic + int4, release", leanopt.AdamW, dict(master="stochastic", states="int4"), True, None),
]  # fmt: skip
#: the on-disk target (torch.save of model + optimizer state dicts)
CHECKPOINT_TARGET = {"AdamW compact + int8": 5.2}


def measure(name, cls, options, release, cfg: GPTConfig, tokens: int) -> dict:
    torch.manual_seed(0)
    model = GPT(cfg).to(torch.bfloat16)
    opt = cls(model.parameters(), lr=1e-4, kernel="reference", **options)
    handle = leanopt.release_gradients(opt) if release else None
    x = torch.randint(0, cfg.vocab_size, (1, tokens))
    t0 = time.perf_counter()
    _, loss = model(x, x)
    loss.backward()
    opt.step()
    seconds = time.perf_counter() - t0
    report = leanopt.memory_report(opt)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ckpt.pt")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
        disk = os.path.getsize(path)
    if handle is not None:
        handle.remove()
    return {
        "config": name,
        "optimizer": cls.__name__,
        "options": {k: v for k, v in options.items()},
        "release": release,
        "num_params": report.num_params,
        "by_category_bytes": report.by_category,
        "bytes_per_param": report.bytes_per_param,
        "checkpoint_bytes": disk,
        "checkpoint_bytes_per_param": disk / report.num_params,
        "step_seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a small GPT instead of the 124M GPT-2 shape")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "memory_compressed.json")
    args = parser.parse_args(argv)
    cfg = GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=128) if args.small else GPT2_SMALL
    tokens = 16 if args.small else 32
    rows = []
    for name, cls, options, release, target in CONFIGS:
        row = measure(name, cls, options, release, cfg, tokens)
        row["target_bytes_per_param"] = target
        row["checkpoint_target_bytes_per_param"] = CHECKPOINT_TARGET.get(name)
        rows.append(row)
        print(f"  measured {name}: {row['bytes_per_param']:.3f} B/param", flush=True)
    cats = ["weights", "master", "gradients", "states", "other"]
    print(f"\n{rows[0]['num_params']:,} parameters ({'small GPT' if args.small else 'GPT-2 124M shape'}, bf16)")
    head = f"{'configuration':38s} " + " ".join(f"{c:>9s}" for c in cats)
    print(head + f" {'total':>7s} {'target':>7s} {'on disk':>8s} {'target':>7s}")
    for r in rows:
        by = r["by_category_bytes"]
        states = sum(v for k, v in by.items() if k not in ("weights", "master", "gradients", "other"))
        vals = [by.get("weights", 0), by.get("master", 0), by.get("gradients", 0), states, by.get("other", 0)]
        t = f"{r['target_bytes_per_param']:.1f}" if r["target_bytes_per_param"] else "-"
        ct = r["checkpoint_target_bytes_per_param"]
        print(
            f"{r['config']:38s} " + " ".join(f"{v / r['num_params']:9.3f}" for v in vals)
            + f" {r['bytes_per_param']:7.3f} {t:>7s} {r['checkpoint_bytes_per_param']:8.3f} "
            + f"{(f'{ct:.1f}' if ct else '-'):>7s}"
        )  # fmt: skip
    ok = all(r["target_bytes_per_param"] is None or r["bytes_per_param"] <= r["target_bytes_per_param"] for r in rows)
    ok &= all(
        r["checkpoint_target_bytes_per_param"] is None
        or r["checkpoint_bytes_per_param"] <= r["checkpoint_target_bytes_per_param"]
        for r in rows
    )
    print("(bytes per parameter; 'states' = all optimizer states incl. scales; 'on disk' = torch.save of "
          "model + optimizer state dicts)")  # fmt: skip
    print(f"all targets met: {ok}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": "python benchmarks/memory_compressed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": "small" if args.small else "GPT2_SMALL",
        "torch": torch.__version__,
        "all_targets_met": ok,
        "results": rows,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
