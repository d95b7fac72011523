"""A byte-level text corpus that ships with every Python: the standard library's own ``.py`` files.

Nothing is downloaded. Train and validation sets are split by file (every 10th file in sorted order is
validation), so the split is fixed for a given Python version.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch


def stdlib_corpus(max_bytes: int = 8_000_000) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) uint8 tensors of stdlib source bytes, at most ``max_bytes`` in all."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    files += sorted(p for p in root.glob("*/*.py") if "test" not in p.parts[-2] and p.is_file())
    if not files:
        raise RuntimeError(f"no standard-library sources found under {root}")
    train, val, total = [], [], 0
    for i, path in enumerate(files):
        data = path.read_bytes()
        (val if i % 10 == 9 else train).append(data)
        total += len(data)
        if total >= max_bytes:
            break
    to_tensor = lambda chunks: torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)  # noqa: E731
    return to_tensor(train), to_tensor(val)


def get_batch(
    data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (inputs, next-byte targets), each ``batch_size x block_size`` int64."""
    starts = torch.randint(0, data.numel() - block_size - 1, (batch_size,), generator=generator)
    x = torch.stack([data[s : s + block_size] for s in starts]).long()
    y = torch.stack([data[s + 1 : s + block_size + 1] for s in starts]).long()
    return x, y
