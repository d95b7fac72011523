"""The JSON a benchmark script writes: the command that made it, when, on what, and its rows."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch


def write_rows(out: str | Path, command: str, rows: list[dict], **extra: Any) -> None:
    """Write ``{"command", **extra, "torch", "cpu", "threads", "date", "rows"}`` to ``out`` (folders made)."""
    doc = {"command": command, **extra, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "rows": rows}  # fmt: skip
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print("wrote", out)


def held_bytes_per_param(opt: torch.optim.Optimizer) -> float:
    """Bytes of the optimizer's parameters and of every optimizer state tensor (not 0-d step counts),
    per parameter: weights + master + states, without gradients."""
    params = [p for g in opt.param_groups for p in g["params"]]
    held = sum(p.untyped_storage().nbytes() for p in params)
    held += sum(v.untyped_storage().nbytes() for st in opt.state.values() for v in st.values()
                if isinstance(v, torch.Tensor) and v.dim())  # fmt: skip
    return held / sum(p.numel() for p in params)
