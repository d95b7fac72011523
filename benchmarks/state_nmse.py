"""Quantisation error (NMSE) of 8-bit / 4-bit optimizer states across gradient magnitudes 1e-8 .. 1e2.

For each magnitude g: momentum-like values m = g * N(0,1) * exp(0.5 N(0,1)) and second moments v = m**2
(shape 256 x 1024, groups of 32 along rows). NMSE = ||decode(encode(x)) - x||^2 / ||x||^2.

Columns: leanopt's int8 / int4 (bf16 scales), the same with fp32 scales, the same codes with fp16
scales, and FlashOptim's arrangement (codes taken against the exact group max, then the scale stored
in fp16). bf16 scales stay flat; fp16 scales break once the scale (about g) goes subnormal (< 6e-5).

    python benchmarks/state_nmse.py          # prints a table, writes benchmarks/results/state_nmse.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from leanopt.formats.quantized import QuantizedStates

MAGNITUDES = [10.0**k for k in range(-8, 3)]


def nmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).square().sum() / b.double().square().sum()).item()


def roundtrip(fmt: QuantizedStates, x: torch.Tensor, signed: bool) -> torch.Tensor:
    codes, scales = fmt.quantize(x, signed)
    return fmt.dequantize(codes, scales, signed)


def flashoptim_style(bits: int, x: torch.Tensor, signed: bool) -> torch.Tensor:
    """Codes against the exact (fp32) group max, scales then stored in fp16."""
    exact = QuantizedStates("fp32-scales", bits, scale_dtype=torch.float32)
    codes, scales = exact.quantize(x, signed)
    return exact.dequantize(codes, scales.to(torch.float16), signed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "state_nmse.json")
    args = parser.parse_args(argv)
    columns = {
        "int8 bf16 (leanopt)": lambda x, s: roundtrip(QuantizedStates("int8", 8), x, s),
        "int8 fp32": lambda x, s: roundtrip(QuantizedStates("a", 8, scale_dtype=torch.float32), x, s),
        "int8 fp16": lambda x, s: roundtrip(QuantizedStates("b", 8, scale_dtype=torch.float16), x, s),
        "int8 fp16 FlashOptim": lambda x, s: flashoptim_style(8, x, s),
        "int4 bf16 (leanopt)": lambda x, s: roundtrip(QuantizedStates("int4", 4), x, s),
        "int4 fp16": lambda x, s: roundtrip(QuantizedStates("c", 4, scale_dtype=torch.float16), x, s),
    }
    g = torch.Generator().manual_seed(0)
    base = torch.randn(256, 1024, generator=g, dtype=torch.float64) * torch.exp(
        0.5 * torch.randn(256, 1024, generator=g, dtype=torch.float64)
    )
    results = []
    for kind, signed in (("momentum m", True), ("second moment v = m^2", False)):
        print(f"\nNMSE, {kind}")
        print(f"{'|g|':>7s}  " + "  ".join(f"{c:>20s}" for c in columns))
        for mag in MAGNITUDES:
            m = (base * mag).float()
            x = m if signed else m.square()
            row = {"state": kind, "magnitude": mag}
            for name, fn in columns.items():
                row[name] = nmse(fn(x, signed), x)
            results.append(row)
            print(f"{mag:7.0e}  " + "  ".join(f"{row[c]:20.2e}" for c in columns))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": "python benchmarks/state_nmse.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "shape": [256, 1024],
        "results": results,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
