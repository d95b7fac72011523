"""Gradient release: how far the approximate modes move from the exact ones (measured, not assumed).

1. accumulation="states" (micro-batch gradients folded into the optimizer states, no gradient buffer) vs
   exact accumulation (bit-identical to ordinary accumulation), for SGD-momentum, Adam, AdamW and Lion.
2. clip="previous" (single pass, clipped with the previous step's norm) vs clip="exact" (two passes).

A small byte-level GPT trains on the Python standard library's sources (leanopt.data; no downloads), same
seed, weights and batches for both sides of each comparison. Reported: relative weight deviation
||w_approx - w_exact|| / ||w_exact - w_0|| after the run, and the final training losses. Also the exact
mode's cost: median step time of clip="exact" (a measuring backward first) over no clipping.
Prints a table and writes benchmarks/results/release_accuracy.json.

    python benchmarks/release_accuracy.py            # 12 steps of 4 micro-batches
    python benchmarks/release_accuracy.py --steps 4  # quicker
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import leanopt
from leanopt.data import get_batch, stdlib_corpus
from leanopt.models import GPT, GPTConfig

MODEL = GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64)
OPTIMIZERS = {
    "sgd": lambda ps: leanopt.SGD(ps, lr=0.1, momentum=0.9, seed=1),
    "adam": lambda ps: leanopt.Adam(ps, lr=2e-3, seed=1),
    "adamw": lambda ps: leanopt.AdamW(ps, lr=2e-3, weight_decay=0.1, seed=1),
    "lion": lambda ps: leanopt.Lion(ps, lr=2e-4, weight_decay=0.1, seed=1),
}


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


def train(model, opt, batches, micro, handle=None, max_norm=None, clip=None):
    """Train; returns (final loss, median step seconds)."""
    times, loss = [], torch.tensor(0.0)
    params = [p for g in opt.param_groups for p in g["params"]]
    for s in range(0, len(batches), micro):
        t0 = time.perf_counter()
        chunk = batches[s : s + micro]
        for j, (x, y) in enumerate(chunk):
            _, loss = model(x, y)
            loss = loss / micro
            if handle is None:
                loss.backward()
            else:
                with handle.accumulate(enabled=j < len(chunk) - 1):
                    handle.backward(loss)
        if handle is None and max_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return loss.detach().item() * micro, statistics.median(times)


def compare(name, batches, micro, exact_kw, approx_kw, base_model):
    a, b = copy.deepcopy(base_model), copy.deepcopy(base_model)
    w0 = flat(base_model)
    opt_a, opt_b = OPTIMIZERS[name](a.parameters()), OPTIMIZERS[name](b.parameters())
    handle_a = leanopt.release_gradients(opt_a, **exact_kw)
    handle_b = leanopt.release_gradients(opt_b, **approx_kw)
    loss_a, time_a = train(a, opt_a, batches, micro, handle_a)
    loss_b, time_b = train(b, opt_b, batches, micro, handle_b)
    wa, wb = flat(a), flat(b)
    return {
        "optimizer": name,
        "exact": exact_kw,
        "approx": approx_kw,
        "relative_weight_deviation": float((wb - wa).norm() / (wa - w0).norm()),
        "final_loss_exact": loss_a,
        "final_loss_approx": loss_b,
        "median_step_s_exact": time_a,
        "median_step_s_approx": time_b,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--micro", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-norm", type=float, default=0.25)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "release_accuracy.json"))
    args = parser.parse_args()
    for name in ("steps", "micro", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if not args.max_norm > 0:
        parser.error("--max-norm must be > 0")
    torch.manual_seed(0)
    base = GPT(MODEL).bfloat16()
    train_data, _ = stdlib_corpus(2_000_000)
    gen = torch.Generator().manual_seed(0)
    batches = [get_batch(train_data, args.batch, MODEL.block_size, gen) for _ in range(args.steps * args.micro)]

    rows = []
    for name in OPTIMIZERS:
        rows.append(
            {"study": "accumulation='states' vs 'grad'",
             **compare(name, batches, args.micro, {}, {"accumulation": "states", "micro_batches": args.micro}, base)}
        )  # fmt: skip
    single = batches[: args.steps]
    rows.append(
        {"study": "clip='previous' vs 'exact'",
         **compare("adamw", single, 1, {"max_norm": args.max_norm}, {"max_norm": args.max_norm, "clip": "previous"},
                   base)}
    )  # fmt: skip
    cost = compare("adamw", single, 1, {"max_norm": args.max_norm}, {}, base)
    exact_cost = cost["median_step_s_exact"] / cost["median_step_s_approx"]

    print(f"{args.steps} steps, {args.micro} micro-batches of {args.batch} x {MODEL.block_size} bytes (accumulation)")
    print(f"{'study':<34} {'optimizer':<8} {'rel. weight dev.':>17} {'loss exact':>11} {'loss approx':>12}")
    for r in rows:
        print(f"{r['study']:<34} {r['optimizer']:<8} {r['relative_weight_deviation']:>17.4f} "
              f"{r['final_loss_exact']:>11.4f} {r['final_loss_approx']:>12.4f}")  # fmt: skip
    print(f"clip='exact' (measuring backward + updating backward) step time / unclipped: {exact_cost:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": " ".join(["python", "benchmarks/release_accuracy.py", *sys.argv[1:]]),
        "args": vars(args), "rows": rows,
        "exact_clip_step_time_ratio": exact_cost, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }, indent=2))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
