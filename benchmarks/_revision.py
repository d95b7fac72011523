"""A module of leanopt.kernels as it was at another git revision, loaded next to today's (the rest of the
package as it is now): what ``--against REV`` compares with (benchmarks/int8_cost.py, sass_count.py)."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path


def kernels_module_at(rev: str, name: str) -> types.ModuleType:
    """``leanopt.kernels.<name>`` at git revision ``rev`` (an error naming ``--against`` if git cannot show it)."""
    root = Path(__file__).resolve().parent.parent
    path = f"src/leanopt/kernels/{name}.py"
    text = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, text=True)
    if text.returncode != 0:
        raise SystemExit(f"--against {rev!r}: git cannot show {path} there ({text.stderr.strip()}); "
                         "give a commit of this repository that has it, e.g. 84cf6b8")  # fmt: skip
    module = types.ModuleType(f"leanopt.kernels.{name}_at_{rev}")
    module.__package__ = "leanopt.kernels"
    module.__file__ = str(root / path)
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(text.stdout, f"{rev}:{path}", "exec"), module.__dict__)
    return module
