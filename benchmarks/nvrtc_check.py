"""Every CUDA kernel leanopt generates, compiled by NVIDIA's NVRTC without a GPU: does it compile, how
many registers, how much shared memory, any stack frame or register spills, per GPU architecture.

NVRTC comes from the ``nvidia-cuda-nvrtc`` wheel (``pip install 'leanopt[nvrtc]'``, also installed by
``python3 run.py test``) or ``$LEANOPT_NVRTC``; it compiles exactly as a step on a GPU does
(``leanopt.kernels.gpu.nvrtc_compile``: the runtime's options, CUBIN for the architecture) and adds
``--ptxas-options=-v`` to read ptxas's report. What this cannot show is how the kernels run.

    python benchmarks/nvrtc_check.py                                   # sm_80, sm_90, sm_100, sm_120
    python benchmarks/nvrtc_check.py --arch sm_90 --out /tmp/nvrtc.json

Writes benchmarks/results/nvrtc_check.json; exits 1 if a kernel fails to compile (spills are reported;
tests/test_gpu_kernels.py asserts none on sm_80 and sm_90).
"""

from __future__ import annotations

import argparse
import ctypes
import re
import sys
import time
from pathlib import Path

from _results import write_rows

from leanopt.kernels import gpu

OUT = Path(__file__).resolve().parent / "results" / "nvrtc_check.json"


def ptxas_report(log: str) -> dict:
    """Registers, shared memory, stack frame and spill bytes from ptxas's ``-v`` lines."""
    used = re.search(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not (used and frame):
        raise RuntimeError(f"no ptxas report in NVRTC's log:\n{log}")
    return {"registers": int(used.group(1)), "smem_bytes": int(used.group(2) or 0), "stack_bytes": int(frame.group(1)),
            "spill_store_bytes": int(frame.group(2)), "spill_load_bytes": int(frame.group(3))}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append",
                        help="e.g. sm_90 (repeatable; default sm_75 sm_80 sm_86 sm_90 sm_100 sm_120)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    nvrtc = gpu.find_nvrtc()
    if nvrtc is None:
        print("no NVRTC library: pip install 'leanopt[nvrtc]' (or set LEANOPT_NVRTC)", file=sys.stderr)
        return 2
    major, minor = ctypes.c_int(), ctypes.c_int()
    nvrtc.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    version = f"{major.value}.{minor.value}"
    sources = gpu.every_source()
    rows, bad = [], 0
    for arch in args.arch or ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]:
        for label, name, source in sources:
            row = {"arch": arch, "kernel": label}
            start = time.perf_counter()
            try:
                cubin, _, log = gpu.nvrtc_compile(nvrtc, source, name, arch, ("--ptxas-options=-v",))
                row.update(ok=True, compile_ms=round((time.perf_counter() - start) * 1e3, 1),
                           cubin_bytes=len(cubin), **ptxas_report(log))  # fmt: skip
            except RuntimeError as err:
                row.update(ok=False, error=str(err)[:2000])
                bad += 1
            rows.append(row)
        done = [r for r in rows if r["arch"] == arch and r["ok"]]
        regs = [r["registers"] for r in done]
        print(f"{arch}: {len(done)}/{len(sources)} kernels compiled, registers {min(regs, default=0)}-"
              f"{max(regs, default=0)}, with a stack frame or spills: "
              f"{sum(r['stack_bytes'] + r['spill_store_bytes'] > 0 for r in done)}, "
              f"compile {sum(r['compile_ms'] for r in done) / 1e3:.1f} s")  # fmt: skip
    write_rows(args.out, "python benchmarks/nvrtc_check.py " + " ".join(sys.argv[1:]), rows, nvrtc=version,
               nvrtc_options=list(gpu.NVRTC_OPTIONS), threads_per_block=gpu.THREADS)  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
