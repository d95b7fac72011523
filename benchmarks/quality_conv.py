"""Quality on a conv net: do int8/int4 states on conv weights (grouped in rows of in*kh*kw,
formats/quantized.py ``rows_shape``) train as well as fp32 states?

A small ResNet (3x3 stem, four basic blocks with 32-64-128 channels, average pool, linear head) learns
to classify generated 24x24 RGB images (10 classes: oriented sinusoidal gratings of a class-specific
angle and frequency, random phase, colour and contrast, Gaussian noise; nothing downloaded). Same seed,
initial weights, batches and cosine schedule for every run; only the optimizer and its formats change:

- torch.optim.AdamW on fp32 weights (fp32 compute): the reference;
- leanopt AdamW on bf16 weights: exact/fp32, compact/int8, compact/int4.

Reported per run: training loss (mean of the last 50 steps), validation loss and accuracy on 2,048
held-out images, the share of parameters whose states are quantised, and bytes held per parameter in
weights and optimizer state.

    python benchmarks/quality_conv.py                    # 400 steps per run, ~8 minutes on 2 cores
    python benchmarks/quality_conv.py --steps 60 --out /tmp/q.json   # a smoke run
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from _results import held_bytes_per_param, write_rows  # benchmarks/_results.py
from torch import nn

import leanopt
from leanopt.formats.quantized import rows_shape

OUT = Path(__file__).resolve().parent / "results" / "quality_conv.json"
CLASSES = 10
SIZE = 24


def images(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` generated images (n, 3, SIZE, SIZE) and their labels."""
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    angle = labels.float() * (math.pi / CLASSES) + 0.2 * torch.randn(n, generator=gen)
    freq = 0.35 + 0.08 * (labels % 3).float() + 0.02 * torch.randn(n, generator=gen)
    phase = 2 * math.pi * torch.rand(n, generator=gen)
    ys, xs = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
    wave = torch.sin(
        freq[:, None, None] * (xs * torch.cos(angle)[:, None, None] + ys * torch.sin(angle)[:, None, None])
        + phase[:, None, None]
    )
    colour = torch.rand(n, 3, generator=gen) * 0.8 + 0.2
    contrast = torch.rand(n, generator=gen) * 0.7 + 0.3
    x = wave[:, None] * colour[:, :, None, None] * contrast[:, None, None, None]
    return x + 1.2 * torch.randn(x.shape, generator=gen), labels


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = None if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.skip is None else self.skip(x)))


def resnet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        Block(32, 32, 1), Block(32, 64, 2), Block(64, 64, 1), Block(64, 128, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, CLASSES),
    )  # fmt: skip


RUNS = {
    "torch AdamW fp32": None,
    "leanopt exact/fp32": ("exact", "fp32"),
    "leanopt compact/int8": ("compact", "int8"),
    "leanopt compact/int4": ("compact", "int4"),
}


def run(
    name: str, steps: int, batch: int, lr: float, seed: int, val_images: int = 2048, channels_last: bool = False
) -> dict:
    """One training run; ``val_images`` held-out images score it. ``channels_last``: the model and its
    inputs in that layout (bf16 convolutions on CPUs without AVX512-BF16 run ~3x faster so; the short
    test uses it, the README's figures do not)."""
    model = resnet(seed)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    formats = RUNS[name]
    hyper = dict(lr=lr, betas=(0.9, 0.99), weight_decay=0.05)
    if formats is None:
        opt = torch.optim.AdamW(model.parameters(), **hyper)
        dtype = torch.float32
    else:
        model = model.bfloat16()
        opt = leanopt.AdamW(model.parameters(), master=formats[0], states=formats[1], **hyper)
        dtype = torch.bfloat16
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed + 1)
    losses, start = [], time.perf_counter()
    model.train()
    for _ in range(steps):
        x, y = images(batch, gen)
        loss = nn.functional.cross_entropy(model(x.to(dtype).contiguous(memory_format=layout)).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        vx, vy = images(val_images, torch.Generator().manual_seed(seed + 2))
        logits = model(vx.to(dtype).contiguous(memory_format=layout)).float()
        val_loss = nn.functional.cross_entropy(logits, vy).item()
        accuracy = (logits.argmax(1) == vy).float().mean().item()
    params = list(model.parameters())
    quantised = sum(p.numel() for p in params if rows_shape(p.shape) is not None)
    tail = losses[-50:]
    return {
        "run": name,
        "train_loss_last50": round(sum(tail) / len(tail), 4),
        "val_loss": round(val_loss, 4),
        "val_accuracy": round(accuracy, 4),
        "quantised_state_share": round(quantised / sum(p.numel() for p in params), 4) if formats and
        formats[1] in ("int8", "int4") else 0.0,
        "bytes_per_param_held": round(held_bytes_per_param(opt), 3),
        "seconds": round(seconds, 1),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rows = []
    for name in RUNS:
        row = run(name, args.steps, args.batch, args.lr, args.seed)
        rows.append(row)
        print(f"{name:24} train {row['train_loss_last50']:.4f}  val {row['val_loss']:.4f}  "
              f"acc {row['val_accuracy']:.3f}  quantised {row['quantised_state_share']:.3f}  "
              f"{row['bytes_per_param_held']:.3f} B/param  {row['seconds']:.0f}s", flush=True)  # fmt: skip
    command = "python benchmarks/quality_conv.py " + " ".join(
        f"--{k} {getattr(args, k)}" for k in ("steps", "batch", "lr", "seed")
    )
    write_rows(args.out, command, rows)


if __name__ == "__main__":
    main()
