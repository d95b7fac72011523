"""Train a byte-level GPT with a leanopt optimizer on one process, or on N with DDP or FSDP2.

    python examples/train.py --steps 200                                   # one process
    torchrun --nproc-per-node 2 examples/train.py --parallel ddp --steps 200
    torchrun --nproc-per-node 2 examples/train.py --parallel fsdp2 --steps 200 --ckpt ckpt/ --save-at 100
    torchrun --nproc-per-node 2 examples/train.py --parallel fsdp2 --steps 200 --ckpt ckpt/ --resume

The weights stay bf16 (the model computes with them); leanopt keeps the rest of each fp32 master value
in the optimizer state. ``--batch`` is per rank; the global batch of step s is the same for any number
of ranks with the same ``--batch`` x ranks, so N ranks with ``--batch B`` train on the batches one
process sees with ``--batch N*B``. Checkpoints use torch.distributed.checkpoint (one directory, written
by all ranks together) and load on any number of ranks. See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn

import leanopt
from leanopt.data import get_batch, stdlib_corpus
from leanopt.distributed import load_checkpoint, save_checkpoint
from leanopt.models import GPT, GPTConfig

OPTIMIZERS = {"adamw": leanopt.AdamW, "adam": leanopt.Adam, "lion": leanopt.Lion, "sgd": leanopt.SGD}


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parallel", default="none", choices=["none", "ddp", "fsdp2"], help="how to use several ranks")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16, help="sequences per rank and step")
    ap.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS))
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--master", default="exact", help="weight format: exact, compact, stochastic, kahan, none")
    ap.add_argument("--states", default="fp32", help="state format: fp32, bf16, int8, int4")
    ap.add_argument("--release", action="store_true", help="update inside backward (gradient release)")
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--data-bytes", type=int, default=2_000_000, help="bytes of stdlib sources to train on")
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--ckpt", default=None, help="checkpoint directory (DCP)")
    ap.add_argument("--save-at", type=int, nargs="*", default=None, help="steps after which to save (default: last)")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoint in --ckpt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.resume and not args.ckpt:
        ap.error("--resume needs --ckpt DIR")
    return args


def setup_distributed(parallel: str) -> tuple[int, int, bool]:
    """(rank, world size, whether we started the process group). torchrun sets RANK and WORLD_SIZE."""
    if parallel == "none":
        return 0, 1, False
    started = False
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise SystemExit(f"--parallel {parallel}: launch with torchrun (see the docstring)")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        started = True
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return dist.get_rank(), dist.get_world_size(), started


def global_mean(value: torch.Tensor, world: int) -> float:
    """Mean of a scalar over the ranks (the loss of the global batch)."""
    value = value.detach().float().reshape(1).clone()
    if world > 1:
        dist.all_reduce(value)
    return (value / world).item()


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    rank, world, started = setup_distributed(args.parallel)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    log = (lambda *a: print(*a, flush=True)) if rank == 0 and not args.quiet else (lambda *a: None)

    train_data, val_data = stdlib_corpus(args.data_bytes)
    cfg = GPTConfig(vocab_size=256, block_size=args.block_size, n_layer=args.n_layer, n_head=4, n_embd=args.n_embd)
    torch.manual_seed(args.seed)  # the same initial weights on every rank (FSDP2 shards them in place)
    model: nn.Module = GPT(cfg).to(device=device, dtype=torch.bfloat16)
    raw = model
    if args.parallel == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)  # build the optimizer after sharding: it must see the sharded params
    elif args.parallel == "ddp":
        model = nn.parallel.DistributedDataParallel(model)

    opt = OPTIMIZERS[args.optimizer](
        raw.parameters(), lr=args.lr, weight_decay=0.1, master=args.master, states=args.states, seed=args.seed
    )  # the same seed= on every rank: stochastic rounding stays identical across replicas
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    handle = leanopt.release_gradients(opt, ddp=model if args.parallel == "ddp" else None) if args.release else None

    start = 0
    if args.resume:
        extra = load_checkpoint(args.ckpt, raw, opt, extra={"scheduler": sched.state_dict(), "step": 0})
        sched.load_state_dict(extra["scheduler"])
        start = int(extra["step"])
        log(f"resumed from {args.ckpt} at step {start}")
    save_at = set(args.save_at if args.save_at is not None else [args.steps]) if args.ckpt else set()

    losses, t0 = [], time.perf_counter()
    for step in range(start, args.steps):
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)  # the global batch of this step
        x, y = get_batch(train_data, args.batch * world, cfg.block_size, gen)
        rows = slice(rank * args.batch, (rank + 1) * args.batch)  # this rank's part of it
        _, loss = model(x[rows].to(device), y[rows].to(device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(global_mean(loss, world))
        if step + 1 in save_at:
            save_checkpoint(args.ckpt, raw, opt, extra={"scheduler": sched.state_dict(), "step": step + 1})
            log(f"saved {args.ckpt} after step {step + 1}")
        if step == start or (step + 1) % 50 == 0:
            log(f"step {step + 1:5d}  loss {losses[-1]:.4f}  {time.perf_counter() - t0:6.1f}s")
    if handle is not None:
        handle.remove()

    with torch.no_grad():
        vgen = torch.Generator().manual_seed(1234)
        val = []
        for _ in range(args.eval_batches):
            x, y = get_batch(val_data, args.batch * world, cfg.block_size, vgen)
            rows = slice(rank * args.batch, (rank + 1) * args.batch)
            val.append(global_mean(model(x[rows].to(device), y[rows].to(device))[1], world))
    val_loss = sum(val) / len(val)
    log(f"validation loss {val_loss:.4f}  ({world} rank{'s' if world > 1 else ''}, {args.parallel})")
    if not args.quiet and rank == 0:
        print(leanopt.memory_report(opt))  # this rank's share under FSDP2
    if started:
        dist.destroy_process_group()
    return {"start_step": start, "losses": losses, "val_loss": val_loss, "world_size": world}


if __name__ == "__main__":
    main()
