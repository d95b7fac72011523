"""Optimizer step time on ResNet-50's parameters (25.6M, 161 tensors) stored channels_last, as conv nets
are trained on GPUs with bf16: its 3x3 and 7x7 conv weights are then not contiguous. Side by side in
one run, every case in turn for ``--rounds`` rounds (median of ``--steps`` timed steps each):

- torch.optim.AdamW fp32, fused (channels_last fp32 parameters);
- leanopt AdamW exact/fp32 and compact/int8 with channels_last bf16 parameters: the native kernels walk
  a dense layout in memory order (kernels/native.py ``dense``);
- the same with that support switched off (``native.dense`` reporting only contiguous tensors): the
  non-contiguous conv weights then take the eager reference, as before it existed;
- leanopt exact/fp32 and compact/int8 with the same parameters contiguous (what the layout costs).

int8/int4 states of a conv weight are grouped in rows of ``in * kh * kw`` in logical order
(formats/quantized.py ``rows_shape``), so a channels_last conv weight with compact/int8 runs a kernel
that transposes each row in cache (``KernelSpec.permuted``). The cases "copies" run the kernels on
contiguous copies instead (``native.PERMUTED_ROWS`` off: kernels/fused.py ``_on_contiguous_twin``), made
by the native transpose (``native.to_logical`` / ``from_logical``) or, "torch copies", by torch's
``.contiguous()`` / ``copy_``. ``bytes_per_param`` is what the case holds
in weights and optimizer state (torch: fp32 weights; gradients not counted).

    python benchmarks/channels_last.py              # -> benchmarks/results/channels_last.json
    python benchmarks/channels_last.py --steps 5 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _results import held_bytes_per_param, write_rows  # benchmarks/_results.py

import leanopt
from leanopt.cli.bench import time_steps
from leanopt.formats.quantized import rows_shape
from leanopt.kernels import native

OUT = Path(__file__).resolve().parent / "results" / "channels_last.json"


def resnet50_shapes() -> list[tuple[int, ...]]:
    """torchvision's resnet50() parameter shapes, in its order (conv, then its batch norm's two)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True):
        for b in range(blocks):
            shapes += [(width, cin, 1, 1), (width,), (width,), (width, width, 3, 3), (width,), (width,),
                       (4 * width, width, 1, 1), (4 * width,), (4 * width,)]  # fmt: skip
            if b == 0:
                shapes += [(4 * width, cin, 1, 1), (4 * width,), (4 * width,)]
            cin = 4 * width
    return shapes + [(1000, 2048), (1000,)]


def make(dtype: torch.dtype, channels_last: bool) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for s in resnet50_shapes():
        p = (torch.randn(s, generator=gen) * 0.02).to(dtype)
        g = (torch.randn(s, generator=gen) * 1e-3).to(dtype)
        if channels_last and len(s) == 4:
            p, g = p.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
        param = torch.nn.Parameter(p)
        param.grad = g
        params.append(param)
    return params


def _leanopt(master: str, states: str, channels_last: bool = True):
    return lambda: leanopt.AdamW(make(torch.bfloat16, channels_last), lr=1e-4, master=master, states=states)


CASES = {
    "torch AdamW fp32 fused, channels_last": lambda: torch.optim.AdamW(make(torch.float32, True), lr=1e-4, fused=True),
    "leanopt exact/fp32, channels_last": _leanopt("exact", "fp32"),
    "leanopt exact/fp32, channels_last, dense layouts off": _leanopt("exact", "fp32"),
    "leanopt exact/fp32, contiguous": _leanopt("exact", "fp32", channels_last=False),
    "leanopt compact/int8, channels_last": _leanopt("compact", "int8"),
    "leanopt compact/int8, channels_last, copies": _leanopt("compact", "int8"),
    "leanopt compact/int8, channels_last, torch copies": _leanopt("compact", "int8"),
    "leanopt compact/int8, channels_last, dense layouts off": _leanopt("compact", "int8"),
    "leanopt compact/int8, contiguous": _leanopt("compact", "int8", channels_last=False),
}


def permuted_copy_ms(rounds: int = 30) -> dict[str, float]:
    """What the int8 copies cost per tensor: ResNet-50's largest 3x3 conv weight (512x512x3x3, bf16, and
    its int8 residual) made contiguous from channels_last by torch and by the native transpose, against
    a plain clone of the same bytes (fastest of ``rounds``)."""
    x = torch.randn(512, 512, 3, 3).bfloat16()
    cl = x.to(memory_format=torch.channels_last)
    r8 = torch.randint(-128, 128, x.shape, dtype=torch.int8).to(memory_format=torch.channels_last)

    def fastest(fn) -> float:
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return round(min(times) * 1e3, 3)

    return {
        "channels_last_to_contiguous": fastest(cl.contiguous),
        "native_transpose": fastest(lambda: native.to_logical(cl)),
        "int8_channels_last_to_contiguous": fastest(r8.contiguous),
        "int8_native_transpose": fastest(lambda: native.to_logical(r8)),
        "clone": fastest(x.clone),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    shapes = resnet50_shapes()
    strided = sum(1 for s in shapes if len(s) == 4 and (s[2] > 1 or s[3] > 1))
    fp32_kept = sum(torch.Size(s).numel() for s in shapes if rows_shape(s) is None)
    fp32_kept_before = sum(torch.Size(s).numel() for s in shapes if not (len(s) >= 2 and s[-1] >= 32))
    print(f"ResNet-50: {sum(torch.Size(s).numel() for s in shapes) / 1e6:.1f}M parameters, {len(shapes)} tensors, "
          f"{strided} of them not contiguous in channels_last; int8/int4 keep fp32 states for {fp32_kept:,} "
          f"parameters (grouping along the last dim only: {fp32_kept_before:,})")  # fmt: skip
    real_dense, real_to, real_from = native.dense, native.to_logical, native.from_logical
    opts = {}
    for name, build in CASES.items():
        opts[name] = build()
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.rounds):
        for name, opt in opts.items():
            native.dense = (lambda t: t.is_contiguous()) if "dense layouts off" in name else real_dense
            native.PERMUTED_ROWS = "copies" not in name
            if "torch copies" in name:  # the twin path's copies by torch (the native transpose declines)
                native.to_logical, native.from_logical = (lambda t: None), (lambda dst, src: False)
            try:
                times[name].append(statistics.median(time_steps(opt, args.steps)) * 1e3)
            finally:
                native.dense, native.to_logical, native.from_logical = real_dense, real_to, real_from
                native.PERMUTED_ROWS = True
    base = statistics.median(times["torch AdamW fp32 fused, channels_last"])
    rows = []
    for name in CASES:
        ms = statistics.median(times[name])
        held = held_bytes_per_param(opts[name])
        rows.append({"case": name, "step_ms": round(ms, 2), "vs_torch_fused": round(ms / base, 2),
                     "bytes_per_param": round(held, 3), "rounds_ms": [round(t, 2) for t in times[name]]})  # fmt: skip
        print(f"{name:56} {ms:9.2f} ms  {ms / base:6.2f}x torch fused  {held:6.3f} bytes/param held")
    copies = permuted_copy_ms()
    print("512x512x3x3 channels_last -> contiguous:", ", ".join(f"{k} {v:.3f} ms" for k, v in copies.items()))
    write_rows(args.out, f"python benchmarks/channels_last.py --steps {args.steps} --rounds {args.rounds}", rows,
               int8_fp32_state_params=fp32_kept, int8_fp32_state_params_last_dim_rule=fp32_kept_before,
               copy_512x512x3x3_bf16_ms=copies)  # fmt: skip


if __name__ == "__main__":
    main()
