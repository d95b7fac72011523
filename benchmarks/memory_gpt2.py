"""Memory held by the optimizer setups for a GPT-2-small-shaped model (124M parameters).

Builds leanopt.models.GPT(GPT2_SMALL) (random init, tied embeddings), runs one real forward/backward
on 8 tokens and one optimizer step, so weights, gradients and every optimizer state exist, then reads
leanopt.memory_report (storage sizes of the tensors actually held, not formulas). Prints one table per
setup plus a summary, and writes benchmarks/results/memory_gpt2.json.

    python benchmarks/memory_gpt2.py          # about a minute and 2.5 GB of RAM on 2 CPU cores
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

import leanopt
from leanopt.models import GPT, GPT2_SMALL

#: name -> (description, dtype of the model's params, optimizer factory)
SETUPS: dict[str, tuple[str, torch.dtype, Callable]] = {
    "standard": (
        "fp32 params + torch.optim.AdamW (the standard recipe's master weights and states)",
        torch.float32,
        lambda params: torch.optim.AdamW(params, lr=1e-4, fused=True),
    ),
    "exact_fp32": (
        "bf16 params + leanopt.AdamW(master='exact', states='fp32')",
        torch.bfloat16,
        lambda params: leanopt.AdamW(params, lr=1e-4, master="exact", states="fp32"),
    ),
    "exact_bf16": (
        "bf16 params + leanopt.AdamW(master='exact', states='bf16')",
        torch.bfloat16,
        lambda params: leanopt.AdamW(params, lr=1e-4, master="exact", states="bf16"),
    ),
}


def measure(name: str) -> leanopt.MemoryReport:
    """Build the model for setup ``name``, take one real step, and report what the optimizer holds."""
    _, dtype, make = SETUPS[name]
    torch.manual_seed(0)
    model = GPT(GPT2_SMALL).to(dtype)
    opt = make(model.parameters())
    idx = torch.randint(0, GPT2_SMALL.vocab_size, (1, 8))
    model(idx, idx)[1].backward()
    opt.step()
    report = leanopt.memory_report(opt)
    del model, opt
    gc.collect()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory_gpt2.json"))
    parser.add_argument("--only", nargs="*", choices=list(SETUPS), help="measure only these setups")
    args = parser.parse_args()
    results = {}
    for name in args.only or SETUPS:
        start = time.perf_counter()
        report = measure(name)
        print(f"\n== {name}: {SETUPS[name][0]}  ({time.perf_counter() - start:.1f} s)")
        print(report)
        results[name] = {
            "description": SETUPS[name][0],
            "num_params": report.num_params,
            "total_bytes": report.total_bytes,
            "bytes_per_param": report.bytes_per_param,
            "by_category": report.by_category,
        }
    print("\nsetup        bytes/param   total GiB")
    for name, r in results.items():
        print(f"{name:<12} {r['bytes_per_param']:>11.3f}   {r['total_bytes'] / 2**30:>9.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": "leanopt.models.GPT(GPT2_SMALL)", "torch": torch.__version__, "python": platform.python_version()}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
