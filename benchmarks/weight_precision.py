"""How precisely each master= weight format keeps fp32 values and small updates.

Two measurements per (param dtype, master format), all through the public optimizer:

1. storage: load 1M fp32 values (log-uniform magnitudes 2**-12 .. 2**2, random signs) with
   ``set_master_value`` and read them back with ``master_value``: the fraction kept bit for bit and the
   largest relative error.
2. drift: 4,096 weights in [1, 1.5) get 500 SGD updates (lr=1), each of random size 0.01-0.3 of a
   bf16 ulp at 1.0 (all below half an ulp), either all in one direction per weight ("steady", like a
   consistent gradient) or of random sign ("noisy"); compare the stored master value with the same
   updates applied in fp64. Reported in units of the bf16 ulp at 1.0 (2**-7); the steady updates move
   each weight by about 78 such ulps in all.

Prints a table and writes benchmarks/results/weight_precision.json.

    python benchmarks/weight_precision.py     # about 20 s on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import leanopt

CASES = [
    (torch.bfloat16, "exact"),
    (torch.bfloat16, "kahan"),
    (torch.bfloat16, "stochastic"),
    (torch.bfloat16, "none"),
    (torch.float16, "kahan"),
    (torch.float16, "stochastic"),
    (torch.float16, "none"),
]
BF16_ULP_AT_1 = 2.0**-7


def storage(dtype: torch.dtype, master: str, n: int = 1_000_000) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    mag = torch.exp2(torch.rand(n, generator=gen, dtype=torch.float64) * 14 - 12)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    x = (mag * sign).float()
    p = torch.nn.Parameter(torch.zeros(n, dtype=dtype))
    opt = leanopt.SGD([p], lr=0.0, master=master, seed=0)
    opt.set_master_value(p, x)
    got = opt.master_value(p)
    rel = ((got.double() - x.double()).abs() / x.double().abs()).max().item()
    exact = (got.view(torch.int32) == x.view(torch.int32)).double().mean().item()
    return {"bit_exact_fraction": exact, "max_relative_error": rel}


def drift(dtype: torch.dtype, master: str, steady: bool, n: int = 4096, steps: int = 500) -> dict[str, float]:
    gen = torch.Generator().manual_seed(1)
    direction = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    start = 1.0 + torch.rand(n, generator=gen).double() * 0.5
    p = torch.nn.Parameter(start.to(dtype))
    truth = p.detach().double().clone()
    opt = leanopt.SGD([p], lr=1.0, master=master, seed=0)
    for _ in range(steps):
        size = (0.01 + 0.29 * torch.rand(n, generator=gen)) * BF16_ULP_AT_1
        sign = direction if steady else torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
        g = (size * sign).float()
        p.grad = g.to(dtype)  # the gradient the optimizer sees, in the param's dtype
        truth -= p.grad.double()
        opt.step()
    err = (opt.master_value(p).double() - truth).abs() / BF16_ULP_AT_1
    kind = "steady" if steady else "noisy"
    return {f"{kind}_mean_abs_error_ulps": err.mean().item(), f"{kind}_max_abs_error_ulps": err.max().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "weight_precision.json"))
    args = parser.parse_args()
    rows = []
    head = ("dtype", "master", "bit-exact", "max rel err", "steady mean", "steady max", "noisy mean", "noisy max")
    print("{:<9} {:<11} {:>9} {:>11} {:>11} {:>10} {:>10} {:>9}".format(*head))
    print(
        "{:<9} {:<11} {:>9} {:>11} {:>11} {:>10} {:>10} {:>9}".format("", "", "(storage)", "(storage)", *["(ulp)"] * 4)
    )
    for dtype, master in CASES:
        s, d1, d2 = storage(dtype, master), drift(dtype, master, True), drift(dtype, master, False)
        name = str(dtype).removeprefix("torch.")
        rows.append({"dtype": name, "master": master, **s, **d1, **d2})
        print(
            f"{name:<9} {master:<11} {s['bit_exact_fraction']:>9.4f} {s['max_relative_error']:>11.2e} "
            f"{d1['steady_mean_abs_error_ulps']:>11.3f} {d1['steady_max_abs_error_ulps']:>10.3f} "
            f"{d2['noisy_mean_abs_error_ulps']:>10.3f} {d2['noisy_max_abs_error_ulps']:>9.3f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
