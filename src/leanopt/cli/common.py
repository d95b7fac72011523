"""Shared pieces of the command line: errors, size parsing, feature detection, tables, progress bars."""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, TextIO


class CLIError(Exception):
    """A user error: printed as one line ``leanopt <command>: error: ...`` with exit code 2."""


_COUNT_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_BYTES_SUFFIX = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}  # fmt: skip
_NUMBER = r"([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+(?:[eE][+-]?[0-9]+)?)"


def parse_count(text: str, what: str = "parameter count") -> int:
    """Parse a count such as ``"124M"``, ``"7B"``, ``"1.3e9"``, ``"350k"`` or ``"1_000_000"``."""
    m = re.fullmatch(_NUMBER + r"\s*([a-zA-Z]?)", text.strip().replace("_", "").replace(",", ""))
    if not m or m.group(2).upper() not in _COUNT_SUFFIX:
        raise CLIError(
            f"cannot read {what} {text!r}; use a number with an optional K, M, B or T suffix (124M, 7B, 1.3e9)"
        )
    value = float(m.group(1)) * _COUNT_SUFFIX[m.group(2).upper()]
    if not math.isfinite(value) or value < 1:
        raise CLIError(f"{what} must be at least 1, got {text!r}")
    return int(round(value))


def parse_bytes(text: str, what: str = "--memory") -> int:
    """Parse a memory size: ``"24GB"`` (10^9), ``"24GiB"`` (2^30), ``"80 GB"``, ``"512MiB"``, ``"1e10"``."""
    m = re.fullmatch(_NUMBER + r"\s*([a-zA-Z]*)", text.strip().replace("_", ""))
    if not m or m.group(2).upper() not in _BYTES_SUFFIX:
        raise CLIError(f"cannot read {what} {text!r}; use e.g. 24GB (10^9 bytes), 24GiB (2^30 bytes) or 512MiB")
    value = float(m.group(1)) * _BYTES_SUFFIX[m.group(2).upper()]
    if not math.isfinite(value) or value <= 0:
        raise CLIError(f"{what} must be a positive size, got {text!r}")
    return int(value)


def format_bytes(n: float) -> str:
    """Human-readable binary size (``1.50 GiB``)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_count(n: int) -> str:
    """``124.44M``-style parameter count."""
    for unit, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


# ------------------------------------------------------------------------------------ features


@dataclass(frozen=True)
class Features:
    """Which optional parts of leanopt exist in this installation (other work lands over time)."""

    release: bool
    masters: tuple[str, ...]
    states: tuple[str, ...]

    def has_master(self, name: str) -> bool:
        return name in self.masters

    def has_states(self, name: str) -> bool:
        return name in self.states


def detect_features() -> Features:
    """Look at the installed leanopt: gradient release, weight (master) formats, state formats."""
    import leanopt
    from leanopt.formats.states import STATE_FORMATS
    from leanopt.formats.weights import MASTER_CHOICES

    masters = tuple(m for m in MASTER_CHOICES if m != "auto")
    return Features(
        release=callable(getattr(leanopt, "release_gradients", None)),
        masters=masters,
        states=tuple(STATE_FORMATS),
    )


# ------------------------------------------------------------------------------------ output


def table(rows: list[list[str]], header: list[str], right: set[int] | None = None) -> str:
    """A plain-text table; columns in ``right`` (default: all but the first) are right-aligned."""
    right = set(range(1, len(header))) if right is None else right
    all_rows = [header, *rows]
    widths = [max(len(str(r[i])) for r in all_rows) for i in range(len(header))]

    def line(r: list[str]) -> str:
        cells = [
            str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


class ProgressBar:
    """A plain-text progress bar. On a terminal it redraws one line; elsewhere it prints a few lines."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None, width: int = 28) -> None:
        self.label, self.total, self.width = label, max(int(total), 1), width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_quarter = -1

    def render(self, done: int, note: str = "") -> str:
        frac = min(max(done / self.total, 0.0), 1.0)
        fill = int(round(frac * self.width))
        return f"{self.label}  [{'#' * fill}{'.' * (self.width - fill)}] {done}/{self.total} {note}".rstrip()

    def update(self, done: int, note: str = "") -> None:
        if self.tty:
            self.stream.write("\r\033[K" + self.render(done, note))
            self.stream.flush()
            return
        quarter = 4 * done // self.total
        if quarter > self._last_quarter:  # 0%, 25%, 50%, 75%, 100%
            self._last_quarter = quarter
            print(self.render(done, note), file=self.stream, flush=True)

    def close(self, note: str = "") -> None:
        if self.tty:
            self.stream.write("\r\033[K" + self.render(self.total, note) + "\n")
            self.stream.flush()


def loadavg() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def busy_note() -> str | None:
    """A warning when other work is keeping this machine's CPUs busy (1-minute load average above half
    the CPU count), since timings then move from run to run; None when it is quiet or unknown."""
    load, cpus = loadavg(), os.cpu_count() or 1
    if load is None or load <= 0.5 * cpus:
        return None
    return f"note: this machine is busy (load average {load:.1f} on {cpus} CPUs): times will be noisy"


def ratio(value: float | None, base: float | None) -> str:
    """``"0.62x"`` or ``"-"`` when either side is missing or the base is zero."""
    if value is None or base is None or base == 0 or not math.isfinite(value) or not math.isfinite(base):
        return "-"
    return f"{value / base:.2f}x"


def jsonable(obj: Any) -> Any:
    """Replace non-finite floats by None so the JSON stays strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj
