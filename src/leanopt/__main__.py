"""Command line: ``python -m leanopt demo`` (or the ``leanopt`` console script)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "demo":
        print("usage: leanopt demo [--steps N]", file=sys.stderr)
        return 2
    example = Path(__file__).resolve().parents[2] / "examples" / "train_tiny_gpt.py"
    sys.argv = [str(example), *argv[1:]]
    runpy.run_path(str(example), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
