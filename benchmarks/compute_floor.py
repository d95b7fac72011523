"""Is an optimizer step memory-bound or compute-bound on this machine? Step time per element of
torch's fused AdamW and of leanopt's modes, from tensors that fit in cache to one that does not.

In cache, a step costs only its arithmetic; out of cache it also waits for memory. If torch's fused
AdamW costs about as much per element in cache as out of it, the step is compute-bound here, and a
format that moves fewer bytes but does more arithmetic per element (int8/int4 states: decode, group
maxima, scales, companded codes) cannot beat it. The last lines print what the compact/int8 target
(<= 0.8x torch fused, issue 5) asks for against what torch's own arithmetic costs in cache.

    python benchmarks/compute_floor.py                       # 2^16 .. 2^22 and 50M elements
    python benchmarks/compute_floor.py --rounds 5 --out /tmp/floor.json

All modes use nonfinite="ignore" (torch.optim does not check either), AdamW lr=1e-3, 2-D tensors of
1024 columns, bf16 weights/gradients for leanopt and fp32 for torch (what each keeps). Cases run in
turn within each round; the figure is the median over rounds. Writes
benchmarks/results/compute_floor.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import leanopt
from leanopt.kernels import native

OUT = Path(__file__).resolve().parent / "results" / "compute_floor.json"
SIZES = [1 << 16, 1 << 18, 1 << 20, 1 << 22, 50_000_000]
COLS = 1024


def make(mode: str, rows: int):
    g = torch.Generator().manual_seed(0)
    if mode == "torch fused":
        p = torch.nn.Parameter(torch.randn(rows, COLS, generator=g))
        p.grad = torch.randn(rows, COLS, generator=g) * 1e-3
        return torch.optim.AdamW([p], lr=1e-3, fused=True), p
    p = torch.nn.Parameter(torch.randn(rows, COLS, generator=g).bfloat16())
    p.grad = (torch.randn(rows, COLS, generator=g) * 1e-3).bfloat16()
    master, states = mode.split()[1].split("/")
    return leanopt.AdamW([p], lr=1e-3, master=master, states=states, nonfinite="ignore"), p


def per_element_ns(opt, elements: int) -> float:
    reps = max(1, 20_000_000 // elements)  # ~20M elements per timing: well above timer resolution
    start = time.perf_counter()
    for _ in range(reps):
        opt.step()
    return (time.perf_counter() - start) / reps / elements * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma list of element counts")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes: comma list of element counts, got {args.sizes!r}")
    if not sizes or min(sizes) < COLS:
        parser.error(f"--sizes: each at least {COLS} elements")
    modes = ["torch fused", "leanopt exact/fp32", "leanopt compact/int8", "leanopt compact/int4"]
    results = []
    for size in sizes:
        rows = size // COLS
        cases = {m: make(m, rows) for m in modes}
        for opt, _ in cases.values():
            opt.step()  # states exist, kernels built
        rounds = {m: [] for m in modes}
        for _ in range(args.rounds):
            for m, (opt, _) in cases.items():
                opt.step()
                rounds[m].append(per_element_ns(opt, rows * COLS))
        row = {"elements": rows * COLS, "ns_per_element": {m: statistics.median(v) for m, v in rounds.items()},
               "rounds": rounds}  # fmt: skip
        results.append(row)
        ns = row["ns_per_element"]
        print(f"{rows * COLS:>11,} elements: " + "  ".join(f"{m} {v:.3f}" for m, v in ns.items())
              + f"  (int8/torch {ns['leanopt compact/int8'] / ns['torch fused']:.2f}x)", flush=True)  # fmt: skip
        del cases
    largest = max(results, key=lambda r: r["elements"])["ns_per_element"]
    in_cache = min(min(r["ns_per_element"]["torch fused"] for r in results), largest["torch fused"])
    target = 0.8 * largest["torch fused"]
    verdict = {
        "int8_target_ns": target,
        "torch_fused_best_ns": in_cache,
        "int8_largest_ns": largest["leanopt compact/int8"],
        "exact_fp32_largest_ns": largest["leanopt exact/fp32"],
    }
    print(f"\ncompact/int8 <= 0.8x torch fused at the largest size asks for {target:.3f} ns/element;"
          f"\ntorch's fused AdamW at its fastest size (its arithmetic, little memory wait) takes {in_cache:.3f},"
          f"\nleanopt exact/fp32 (the same Adam arithmetic, bit for bit) {largest['leanopt exact/fp32']:.3f}"
          f" and compact/int8 {largest['leanopt compact/int8']:.3f} at the largest size.")  # fmt: skip
    info = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "vector_width": native.vector_width(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", "benchmarks/compute_floor.py", *sys.argv[1:]]),
        "results": results,
        "verdict": verdict,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
