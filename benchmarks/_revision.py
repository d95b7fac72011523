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
    return _module(name, rev, text.stdout, f"{rev}:{path}", root / path)


def kernels_module_in(src: str, name: str) -> types.ModuleType:
    """``leanopt.kernels.<name>`` as the src folder ``src`` has it (another revision's tree unpacked by
    ``git archive REV src | tar -x -C DIR``: where git is not at hand, e.g. on a device machine)."""
    path = Path(src) / "leanopt" / "kernels" / f"{name}.py"
    if not path.is_file():
        raise SystemExit(f"{src!r}: no leanopt/kernels/{name}.py in it; give another revision's src folder")
    label = "".join(c if c.isalnum() else "_" for c in src)
    return _module(name, label, path.read_text(), str(path), path)


def _module(name: str, label: str, text: str, where: str, path: Path) -> types.ModuleType:
    module = types.ModuleType(f"leanopt.kernels.{name}_at_{label}")
    module.__package__ = "leanopt.kernels"
    module.__file__ = str(path)
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(text, where, "exec"), module.__dict__)
    return module
