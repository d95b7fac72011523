"""A plain Accelerate training loop with a leanopt optimizer: accumulation, clipping, save/load state.

    python examples/integrations/accelerate_loop.py               # no release
    python examples/integrations/accelerate_loop.py --release     # gradient release

With release the gradients are gone after backward, so clipping is the release handle's job
(release_gradients(opt, max_norm=...)) and backward goes through leanopt's release_backward, which puts
the micro-batches before the last one inside handle.accumulate(). Everything else is ordinary Accelerate.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

import leanopt
from leanopt.data import get_batch, stdlib_corpus
from leanopt.integrations.hf import release_backward
from leanopt.models import GPT, GPTConfig

CFG = GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--max-norm", type=float, default=1.0)
    ap.add_argument("--release", action="store_true")
    args = ap.parse_args(argv)

    accelerator = Accelerator(gradient_accumulation_steps=args.accum, cpu=True)
    set_seed(0)
    model = leanopt.cast_model(GPT(CFG))  # bf16 weights, LayerNorms in fp32
    opt = leanopt.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    if args.release:
        leanopt.release_gradients(opt, max_norm=args.max_norm)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    train, _ = stdlib_corpus(400_000)
    gen = torch.Generator().manual_seed(0)
    batches = [get_batch(train, 8, CFG.block_size, gen) for _ in range(args.steps * args.accum)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)

    ckpt = tempfile.mkdtemp(prefix="leanopt-accelerate-")
    for i, (x, y) in enumerate(loader):
        with accelerator.accumulate(model):
            _, loss = model(x, y)
            if args.release:
                release_backward(accelerator, loss)  # the handle clips with max_norm
            else:
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_norm)
            opt.step()
            sched.step()
            opt.zero_grad()
        if accelerator.sync_gradients and (i + 1) % (10 * args.accum) == 0:
            print(f"step {(i + 1) // args.accum:4d}  loss {loss.item():.4f}")
        if (i + 1) == args.steps * args.accum // 2:
            accelerator.save_state(ckpt)  # model (bf16 + fp32 norms), optimizer (remainders, moments), scheduler
    accelerator.load_state(ckpt)  # e.g. after a restart: exact, low bits included
    print(f"state saved and reloaded from {ckpt}")
    print(leanopt.memory_report(opt.optimizer))
    return {"loss": loss.item()}


if __name__ == "__main__":
    main()
