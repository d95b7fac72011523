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
