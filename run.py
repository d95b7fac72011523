#!/usr/bin/env python3
"""One entry point that sets up what it needs and runs: ``python3 run.py demo`` or ``python3 run.py test``.

It creates ``.venv`` beside this file (if missing), installs leanopt with its test extras and the CPU
build of torch pinned to 2.13.0, then runs the demo or the test suite. Extra arguments are passed on.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
STAMP = VENV / ".leanopt-installed"
TORCH_PIN = "torch==2.13.0"  # the CPU build lies on our machines' disk; a bare "torch" pulls CUDA (GBs)


def sh(*args: str | Path) -> None:
    print("+", " ".join(map(str, args)), flush=True)
    subprocess.run([str(a) for a in args], check=True, cwd=ROOT)


EXTRAS = {"demo": "demo", "test": "test,demo,hf,lightning,nvrtc"}


def setup(command: str) -> None:
    extras = EXTRAS[command]
    deps = (ROOT / "pyproject.toml").read_bytes() + extras.encode()
    if STAMP.exists() and STAMP.read_bytes() in (deps, (ROOT / "pyproject.toml").read_bytes() + EXTRAS["test"].encode()):
        return
    if not PY.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [PY, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    sh(*pip, TORCH_PIN)
    sh(*pip, "-e", f"{ROOT}[{extras}]", TORCH_PIN)
    STAMP.write_bytes(deps)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test"):
        print("usage: python3 run.py demo [args...] | python3 run.py test [pytest args...]", file=sys.stderr)
        return 2
    setup(argv[0])
    if argv[0] == "test":
        code = subprocess.run([str(PY), "-m", "pytest", *argv[1:]], cwd=ROOT).returncode
        if code == 5:  # pytest: no tests collected
            print("pytest collected no tests", file=sys.stderr)
            return 1
        return code
    return subprocess.run([str(PY), "-m", "leanopt", "demo", *argv[1:]], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
