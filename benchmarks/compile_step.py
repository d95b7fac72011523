"""A training step compiled with ``torch.compile`` (Inductor) that calls a leanopt optimizer inside it,
on the byte-level GPT (4 layers, width 128, batch 16x128, bf16): the first step's seconds (compilation),
the median step, and how many graphs Dynamo made, for

- ``eager step``: leanopt as shipped: ``optimizer.step()`` is left to run eagerly (one graph break);
- ``traced step``: the same optimizer with torch's step wrapper put back undecorated, so Dynamo traces
  leanopt's Python (what every leanopt version before this script did);
- ``no compile``: the same training step without ``torch.compile``.

Each configuration runs in a fresh process with an empty Inductor cache (a first run's compilation);
the weights after the run are compared with ``eager step``'s (a SHA-256 of their bits; ``no compile``
differs from both because Inductor's fused model kernels round differently from eager torch; that the
optimizer step itself gives the eager bits is tests/test_integration_compile.py's check).

    python benchmarks/compile_step.py                       # -> benchmarks/results/compile_step.json
    python benchmarks/compile_step.py --steps 20 --states fp32,int8
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "compile_step.json"
CONFIGS = ("eager step", "traced step", "no compile")


def worker(config: str, states: str, steps: int) -> dict:
    import torch
    import torch._dynamo.utils as dynamo_utils

    import leanopt
    from leanopt.data import get_batch, stdlib_corpus
    from leanopt.models import GPT, TINY_BYTES

    torch.manual_seed(0)
    model = GPT(TINY_BYTES).bfloat16()
    master = "exact" if states == "fp32" else "compact"
    opt = leanopt.AdamW(model.parameters(), lr=1e-3, master=master, states=states)
    if config == "traced step":
        type(opt).step = type(opt).step.__wrapped__  # torch's hooked wrapper, without torch.compiler.disable

    def train_step(x, y):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    fn = train_step if config == "no compile" else torch.compile(train_step)
    train, _ = stdlib_corpus(2_000_000)
    gen = torch.Generator().manual_seed(1)
    batches = [get_batch(train, 16, TINY_BYTES.block_size, gen) for _ in range(steps)]
    times, losses = [], []
    for x, y in batches:
        start = time.perf_counter()
        losses.append(float(fn(x, y)))
        times.append(time.perf_counter() - start)
    stats = dynamo_utils.counters["stats"]
    digest = hashlib.sha256(b"".join(p.detach().view(torch.int16).numpy().tobytes() for p in model.parameters()))
    return {
        "first_step_s": round(times[0], 3),
        "median_step_ms": round(statistics.median(times[1:]) * 1e3, 2),
        "graphs": int(stats.get("unique_graphs", 0)),
        "graph_breaks": int(sum(dynamo_utils.counters["graph_break"].values())),
        "final_loss": losses[-1],
        "weights_sha256": digest.hexdigest(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--states", default="fp32,int8", help="comma list of leanopt state formats")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "STATES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.steps)))
        return
    rows = []
    for states in args.states.split(","):
        results = {}
        for config in CONFIGS:
            cmd = [sys.executable, __file__, "--steps", str(args.steps), "--worker", config, states]
            with tempfile.TemporaryDirectory() as cache:  # Inductor compiles from scratch, as on a first run
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
                proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            results[config] = json.loads(proc.stdout.strip().splitlines()[-1])
        same = {c: results[c]["weights_sha256"] == results["eager step"]["weights_sha256"] for c in CONFIGS}
        for config in CONFIGS:
            row = {"states": states, "config": config, **results[config], "same_weights_as_eager_step": same[config]}
            rows.append(row)
            print(
                f"{states:5} {config:12} first step {row['first_step_s']:7.2f} s  step {row['median_step_ms']:7.2f} ms"
                f"  graphs {row['graphs']:3}  breaks {row['graph_breaks']:3}  weights = eager step's: {same[config]}"
            )
    from _results import write_rows  # benchmarks/_results.py (imports torch)

    write_rows(
        args.out, "python benchmarks/compile_step.py" + (f" --steps {args.steps}" if args.steps != 15 else ""), rows
    )


if __name__ == "__main__":
    main()
