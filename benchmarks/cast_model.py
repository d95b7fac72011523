"""Evidence behind leanopt.cast_model's default (keep normalisation layers in fp32), measured.

1. What keeping norms in fp32 costs: for GPT-2 small (leanopt's GPT and Hugging Face's GPT2LMHeadModel)
   and a Llama-3.2-1B-shaped model (built on the meta device: no weights, no download), the share of
   parameters the default keeps in fp32 and the bytes per parameter of weights + master bits + gradient,
   from the dtypes cast_model leaves (an fp32 param: 4 B weight + 4 B grad, no master bits; a bf16 param
   with the exact split: 2 B weight + 2 B remainder + 2 B grad).
2. What bf16 does to a BatchNorm's running statistics (buffers the optimizer never sees, so no master
   bits protect them): a BatchNorm1d fed batches with variance 1.5 and momentum 0.01, cast with
   keep_fp32=() (all bf16) versus the default, running_var after each number of batches.

Prints tables and writes benchmarks/results/cast_model.json.

    python benchmarks/cast_model.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

import leanopt
from leanopt.models import GPT, GPT2_SMALL


def models() -> dict[str, nn.Module]:
    out = {}
    with torch.device("meta"):
        out["leanopt GPT (GPT-2 small)"] = GPT(GPT2_SMALL)
    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import transformers

        with torch.device("meta"):
            out["HF GPT2LMHeadModel (124M)"] = transformers.GPT2LMHeadModel(transformers.GPT2Config())
            llama = transformers.LlamaConfig(
                vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
            )  # fmt: skip
            out["HF Llama (3.2-1B shape)"] = transformers.LlamaForCausalLM(llama)
    except ImportError:
        print("transformers not installed: Hugging Face rows skipped")
    return out


def cost_rows() -> list[dict]:
    rows = []
    for name, model in models().items():
        leanopt.cast_model(model)
        params = {id(p): p for p in model.parameters()}.values()
        total = sum(p.numel() for p in params)
        fp32 = sum(p.numel() for p in params if p.dtype == torch.float32)
        # weights + master bits + gradient, per the dtypes cast_model left
        nbytes = sum(p.numel() * (8 if p.dtype == torch.float32 else 6) for p in params)
        rows.append(
            {
                "model": name,
                "params": total,
                "kept_fp32_params": fp32,
                "kept_fp32_share": fp32 / total,
                "weights_master_grad_bytes_per_param": nbytes / total,
                "all_bf16_bytes_per_param": 6.0,
            }
        )
    return rows


def batchnorm_rows(checkpoints=(10, 100, 1000), momentum: float = 0.01, var: float = 1.5) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(256, 8, generator=gen) * var**0.5 for _ in range(max(checkpoints))]
    rows = []
    for label, keep in (("bf16 (keep_fp32=())", ()), ("fp32 (default)", leanopt.integrations.DEFAULT_KEEP_FP32)):
        bn = leanopt.cast_model(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8, momentum=momentum)), keep_fp32=keep)
        bn[0].weight.data.copy_(torch.eye(8))
        bn[0].bias.data.zero_()
        bn.train()
        row = {"running_stats": label, "true_variance": var}
        with torch.no_grad():
            for i, x in enumerate(batches, 1):
                bn(x.to(torch.bfloat16))
                if i in checkpoints:
                    row[f"running_var_after_{i}"] = float(bn[1].running_var.float().mean())
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    cells = [[k for k in keys]] + [
        [
            f"{r[k]:.4g}" if isinstance(r[k], float) else f"{r[k]:,}" if isinstance(r[k], int) else str(r[k])
            for k in keys
        ]
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(keys))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(keys))) for c in cells)


def main() -> dict:
    result = {"cost": cost_rows(), "batchnorm": batchnorm_rows(), "torch": torch.__version__}
    print("Keeping normalisation layers in fp32: cost (weights + master bits + gradient)")
    print(table(result["cost"]))
    print("\nBatchNorm1d running_var (true variance 1.5, momentum 0.01)")
    print(table(result["batchnorm"]))
    out = Path(__file__).parent / "results" / "cast_model.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
