"""Memory accounting measured from the tensors an optimizer actually holds."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

#: optimizer-state keys that belong to the weight format (extra bits of the master value)
MASTER_KEYS = ("remainder", "compensation", "residual")


def _local(t: Tensor) -> Tensor:
    to_local = getattr(t, "to_local", None)  # DTensor (FSDP2): count this rank's shard
    return to_local() if callable(to_local) else t


class ByteTotals:
    """Totals over ``by_category`` (bytes) for ``num_params`` parameters; shared by reports and plans."""

    num_params: int
    by_category: dict[str, int]

    @property
    def total_bytes(self) -> int:
        return sum(self.by_category.values())

    @property
    def bytes_per_param(self) -> float:
        return self.total_bytes / self.num_params if self.num_params else 0.0


@dataclass
class MemoryReport(ByteTotals):
    """Bytes held for an optimizer's parameters, by category, from real storage sizes.

    ``by_category`` has ``weights`` (the model's parameter tensors), ``master`` (extra bits that stand
    in for an fp32 master copy), ``gradients``, one entry per optimizer state (``exp_avg``, ...), and
    ``other`` (step counters and other small tensors). A storage shared by several tensors counts once.
    """

    num_params: int
    by_category: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        rows = [("category", "bytes", "MiB", "bytes/param")]
        for name, nbytes in self.by_category.items():
            rows.append((name, f"{nbytes:,}", f"{nbytes / 2**20:.2f}", f"{nbytes / max(self.num_params, 1):.3f}"))
        total = self.total_bytes
        rows.append(("total", f"{total:,}", f"{total / 2**20:.2f}", f"{self.bytes_per_param:.3f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [f"memory for {self.num_params:,} parameters"]
        for k, r in enumerate(rows):
            cells = zip(r, widths, strict=True)
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells)))
            if k == 0 or k == len(rows) - 2:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)


def state_category(key: str, value: Tensor) -> str:
    """The report category of an optimizer-state entry."""
    base = key.split(".", 1)[0]
    if base in MASTER_KEYS:
        return "master"
    if value.dim() == 0:
        return "other"
    return base


def memory_report(optimizer: torch.optim.Optimizer) -> MemoryReport:
    """Measure what ``optimizer`` (a leanopt or any torch.optim optimizer) holds for its params."""
    seen: set[tuple[torch.device, int]] = set()
    report = MemoryReport(num_params=0, by_category={"weights": 0, "master": 0, "gradients": 0})

    def add(category: str, tensor: Tensor) -> None:
        local = _local(tensor)
        storage = local.untyped_storage()
        key = (local.device, storage.data_ptr())
        if storage.nbytes() == 0 or key in seen:
            return
        seen.add(key)
        report.by_category[category] = report.by_category.get(category, 0) + storage.nbytes()

    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        report.num_params += _local(p).numel()  # FSDP2: this rank's elements, as the bytes
        add("weights", p)
    for p in params:
        if p.grad is not None:
            add("gradients", p.grad)
    for p in params:
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, Tensor):
                add(state_category(key, value), value)
    return report
