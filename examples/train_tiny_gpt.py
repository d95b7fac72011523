"""Train a small byte-level GPT on the standard library's sources with a leanopt optimizer.

    python examples/train_tiny_gpt.py --steps 200 --master exact

The model computes in bf16 with its own bf16 weights; leanopt keeps the exact fp32 master value in the
bf16 weight plus a 16-bit remainder, so there is no fp32 copy of the weights anywhere.
"""

from __future__ import annotations

import argparse
import time

import torch

import leanopt
from leanopt.data import get_batch, stdlib_corpus
from leanopt.models import GPT, TINY_BYTES


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--master", default="exact", choices=["exact", "none", "stochastic", "kahan"])
    ap.add_argument("--states", default="fp32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    train, val = stdlib_corpus(2_000_000)
    model = GPT(TINY_BYTES).to(torch.bfloat16)
    opt = leanopt.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, master=args.master, states=args.states)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = get_batch(train, args.batch, TINY_BYTES.block_size, gen)
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if step % 50 == 0 or step == 1:
            print(f"step {step:5d}  train loss {loss.item():.4f}  {time.perf_counter() - t0:6.1f}s", flush=True)
    with torch.no_grad():
        vgen = torch.Generator().manual_seed(1234)
        val_loss = sum(model(*get_batch(val, 32, TINY_BYTES.block_size, vgen))[1].item() for _ in range(8)) / 8
    print(f"validation loss {val_loss:.4f}")
    print(leanopt.memory_report(opt))
    return {"val_loss": val_loss}


if __name__ == "__main__":
    main()
