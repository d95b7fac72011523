"""The NaN/inf check (native.all_finite) reading its range as 8 interleaved streams, against the same
check reading it as one stream, on gradients that are not in cache (each timing reads a buffer that
the previous ones have evicted), alternating in one process.

    python benchmarks/finite_check_streams.py      # writes benchmarks/results/finite_check_streams.json
"""

from __future__ import annotations

import ctypes
import json
import statistics
import time
from pathlib import Path

import torch

from leanopt.kernels import native

OUT = Path(__file__).resolve().parent / "results" / "finite_check_streams.json"
ONE_STREAM = r"""#define LO_TOP(T, x, n, sign)                                                               \
  T top = 0;                                                                                \
  for (int64_t i = 0; i < (n); i++) { const T v = (x)[i] & (T)~(sign); top = v > top ? v : top; }
"""


def main() -> None:
    source = native._FINITE_SOURCE
    start = source.index("#define LO_TOP")
    end = source.index("static int lo_finite16")
    variants = {"8 streams": source, "1 stream": source[:start] + ONE_STREAM + source[end:]}
    assert variants["1 stream"] != source
    args = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_uint32, ctypes.c_int]
    fns = {k: native.build(v, "lo_all_finite", args, ctypes.c_int).fn for k, v in variants.items()}
    n = 50_000_000
    buffers = [torch.randn(n).bfloat16() for _ in range(6)]  # 600 MB: every check reads cold memory
    times: dict[str, list[float]] = {k: [] for k in fns}
    i = 0
    for _ in range(6):
        for name, fn in fns.items():
            b = buffers[i % len(buffers)]
            i += 1
            t = time.perf_counter()
            assert fn(b.data_ptr(), n, 16, 0x7F80, torch.get_num_threads()) == 1
            times[name].append((time.perf_counter() - t) * 1e3)
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "elements": n,
        "dtype": "bfloat16",
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "ms": times,
        "median_ms": median,
        "GB_per_s": {k: 2 * n / v / 1e6 for k, v in median.items()},
        "8_over_1": median["8 streams"] / median["1 stream"],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_ms", "GB_per_s", "8_over_1")}, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
