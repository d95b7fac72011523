"""A LightningModule trained with a leanopt optimizer, with or without gradient release.

    python examples/integrations/lightning_module.py               # no release
    python examples/integrations/lightning_module.py --release     # gradient release

Subclass leanopt.integrations.lightning.LeanLightningModule (a LightningModule): with release on, it
routes accumulate_grad_batches and gradient_clip_val through the release handle, and refuses settings it
cannot honour. Keep Trainer(precision="32-true") (the default): the model is already bf16 where it should be.
"""

from __future__ import annotations

import argparse
import tempfile

import lightning.pytorch as pl
import torch

import leanopt
from leanopt.data import get_batch, stdlib_corpus
from leanopt.integrations.lightning import LeanLightningModule
from leanopt.models import GPT, GPTConfig

CFG = GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64)


class ByteGPT(LeanLightningModule):
    def __init__(self, release: bool, max_norm: float, steps: int) -> None:
        super().__init__()
        self.release, self.max_norm, self.steps = release, max_norm, steps
        self.gpt = leanopt.cast_model(GPT(CFG))  # bf16 weights, LayerNorms in fp32

    def training_step(self, batch, batch_idx):
        _, loss = self.gpt(*batch)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = leanopt.AdamW(self.parameters(), lr=3e-3, weight_decay=0.1)
        if self.release:
            leanopt.release_gradients(opt, max_norm=self.max_norm)  # must match gradient_clip_val
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--max-norm", type=float, default=1.0)
    ap.add_argument("--release", action="store_true")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    train, _ = stdlib_corpus(400_000)
    gen = torch.Generator().manual_seed(0)
    batches = [get_batch(train, 8, CFG.block_size, gen) for _ in range(args.steps * args.accum)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    out = tempfile.mkdtemp(prefix="leanopt-lightning-")
    trainer = pl.Trainer(
        max_steps=args.steps, accelerator="cpu", devices=1, accumulate_grad_batches=args.accum,
        gradient_clip_val=args.max_norm, logger=False, enable_checkpointing=False, default_root_dir=out,
        enable_progress_bar=False, log_every_n_steps=10,
    )  # fmt: skip
    module = ByteGPT(args.release, args.max_norm, args.steps)
    trainer.fit(module, loader)
    ckpt = f"{out}/last.ckpt"
    trainer.save_checkpoint(ckpt)  # resume later with trainer.fit(module, loader, ckpt_path=ckpt)
    loss = float(trainer.callback_metrics["loss"])
    print(f"final loss {loss:.4f}; checkpoint {ckpt}")
    print(leanopt.memory_report(trainer.optimizers[0]))
    return {"loss": loss}


if __name__ == "__main__":
    main()
