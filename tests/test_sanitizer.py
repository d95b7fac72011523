"""leanopt's C kernels under AddressSanitizer: a worker process (tests/_asan_worker.py) with gcc's libasan
preloaded builds every kernel it uses with ``-fsanitize=address`` (``LEANOPT_CFLAGS``, a kernel cache of its
own) and steps through them; any read or write outside a tensor aborts it with ASan's report. The canary
test shows the harness catches a one-byte overflow of a torch tensor. The whole suite runs this way too
(docs/kernels.md, "Memory safety")."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from leanopt.kernels import native

WORKER = Path(__file__).resolve().parent / "_asan_worker.py"


def asan_env(tmp_path: Path) -> dict[str, str]:
    """The environment for a process whose kernels are built and run under ASan (skips where gcc's
    runtime is not installed: the preload needs it, and clang's differs)."""
    cc = native.compiler()
    if cc is None or os.environ.get("CC"):
        pytest.skip("needs the system gcc (CC unset)")
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("needs gcc")
    libs = []
    for name in ("libasan.so", "libstdc++.so.6"):  # libstdc++ too: ASan must find the real __cxa_throw
        path = subprocess.run([gcc, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        if not os.path.isabs(path) or not os.path.exists(path):
            pytest.skip(f"gcc has no {name}")
        libs.append(path)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    if "Free Software Foundation" not in version:  # gcc's banner; clang's runtime is another
        pytest.skip(f"the kernels' compiler {cc} is not gcc")
    return {
        **os.environ,
        "LD_PRELOAD": " ".join(libs),
        "LEANOPT_CFLAGS": "-fsanitize=address -fno-omit-frame-pointer",
        "LEANOPT_CACHE_DIR": str(tmp_path / "kernels"),
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
    }


def run_worker(what: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = asan_env(tmp_path)
    return subprocess.run([sys.executable, str(WORKER), what], env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_the_sanitizer_catches_a_write_past_a_tensors_end(tmp_path):
    out = run_worker("canary", tmp_path)
    assert out.returncode != 0, out.stdout + out.stderr
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in out.stderr, out.stderr[-3000:]
    assert "not caught" not in out.stdout


@pytest.mark.slow
def test_the_kernels_touch_no_byte_outside_their_tensors(tmp_path):
    out = run_worker("kernels", tmp_path)
    assert "AddressSanitizer" not in out.stderr, out.stderr[-6000:]
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    # what ran: the native kernels (many formats), the CUDA source emulated, the checks
    assert result["optimizer_runs"] == 24
    assert result["native_kernels"] >= 16 and result["native_calls"] >= 100, result
    assert result["emulated_cuda_launches"] >= 12, result
    assert result["finite_checks"] == 3 * 74 + 42, result
    built = list((tmp_path / "kernels").glob("lo_*.so"))
    assert len(built) >= 16  # the ASan builds, in the process's own cache
