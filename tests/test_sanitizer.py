"""leanopt's C kernels under AddressSanitizer and UndefinedBehaviorSanitizer: a worker process
(tests/_asan_worker.py) with gcc's sanitizer runtime preloaded builds every kernel it uses with
``-fsanitize=...`` (``LEANOPT_CFLAGS``, a kernel cache of its own) and steps through them; any read or
write outside a tensor, or undefined behaviour (signed overflow, an out-of-range shift or float-to-int
conversion), aborts it with the sanitizer's report. The canary tests show the harness catches a one-byte
overflow of a torch tensor and a signed overflow. The whole suite runs under ASan too (docs/kernels.md,
"Memory safety and undefined behaviour")."""

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


#: sanitizer -> (its runtime, the compiler flags, its options)
SANITIZERS = {
    "address": ("libasan.so", "-fsanitize=address -fno-omit-frame-pointer",
                ("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=1")),
    "undefined": ("libubsan.so", "-fsanitize=undefined,float-cast-overflow -fno-sanitize-recover=all",
                  ("UBSAN_OPTIONS", "print_stacktrace=1")),
}  # fmt: skip


def sanitizer_env(tmp_path: Path, kind: str) -> dict[str, str]:
    """The environment for a process whose kernels are built and run under the sanitizer ``kind`` (skips
    where gcc's runtime is not installed: the preload needs it, and clang's differs)."""
    runtime, flags, (option, value) = SANITIZERS[kind]
    cc = native.compiler()
    if cc is None or os.environ.get("CC"):
        pytest.skip("needs the system gcc (CC unset)")
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("needs gcc")
    libs = []
    for name in (runtime, "libstdc++.so.6"):  # libstdc++ too: ASan must find the real __cxa_throw
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
        "LEANOPT_CFLAGS": flags,
        "LEANOPT_CACHE_DIR": str(tmp_path / "kernels"),
        option: value,
    }


def run_worker(tmp_path: Path, kind: str, *what: str) -> subprocess.CompletedProcess:
    env = sanitizer_env(tmp_path, kind)
    return subprocess.run([sys.executable, str(WORKER), *what], env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("kind,report", [("address", "ERROR: AddressSanitizer: heap-buffer-overflow"),
                                         ("undefined", "runtime error: signed integer overflow")])  # fmt: skip
def test_the_sanitizer_catches_its_canary(tmp_path, kind, report):
    out = run_worker(tmp_path, kind, "canary", kind)
    assert out.returncode != 0, out.stdout + out.stderr
    assert report in out.stderr, out.stderr[-3000:]
    assert "not caught" not in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(SANITIZERS))
def test_the_kernels_run_clean_under_the_sanitizer(tmp_path, kind):
    """address: no byte outside its tensors; undefined: no undefined behaviour."""
    out = run_worker(tmp_path, kind, "kernels")
    assert "Sanitizer" not in out.stderr and "runtime error" not in out.stderr, out.stderr[-6000:]
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    # what ran: the native kernels (many formats), the CUDA source emulated, the checks
    assert result["optimizer_runs"] == 34
    assert result["native_kernels"] >= 16 and result["native_calls"] >= 100, result
    assert result["emulated_cuda_launches"] >= 12, result
    assert result["finite_checks"] == 3 * 74 + 42, result
    built = list((tmp_path / "kernels").glob("lo_*.so"))
    assert len(built) >= 16  # the sanitized builds, in the process's own cache
