"""The kernel benchmark: ``leanopt bench`` (src/leanopt/cli/bench.py) writing benchmarks/results/kernels.json.

Optimizer-step speed against memory bandwidth for torch's AdamW (fp32, fused and foreach), leanopt AdamW
(exact/fp32, compact/int8, compact/int4) and the peers that run on the device (torchao AdamW8bit/4bit,
bitsandbytes AdamW8bit, optimi AdamW + Kahan; FlashOptim on CUDA), on GPT-2 small's shapes and one
50M-element tensor, with the targets marked met or missed. Every option of ``leanopt bench`` works here:

    python benchmarks/kernels.py                       # both workloads, CPU (cuda when present)
    python benchmarks/kernels.py --workloads tensor50m --steps 10
    python benchmarks/kernels.py --device cuda --modes all   # adds FlashOptim on CUDA
"""

from __future__ import annotations

import sys
from pathlib import Path

from leanopt.cli import main

OUT = Path(__file__).resolve().parent / "results" / "kernels.json"

if __name__ == "__main__":
    OUT.parent.mkdir(exist_ok=True)
    given = any(a == "--out" or a.startswith("--out=") for a in sys.argv[1:])
    raise SystemExit(main(["bench", *([] if given else ["--out", str(OUT)]), *sys.argv[1:]]))
