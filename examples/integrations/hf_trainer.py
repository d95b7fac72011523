"""Train a tiny random-init GPT-2 (or Llama) with leanopt inside the Hugging Face Trainer.

    python examples/integrations/hf_trainer.py                      # leanopt.AdamW, no release
    python examples/integrations/hf_trainer.py --release            # gradient release
    python examples/integrations/hf_trainer.py --arch llama --accum 2 --max-grad-norm 1.0 --release

The model is built from a config (no download) and cast with leanopt.cast_model (bf16, norms fp32).
It trains on bytes of the Python standard library's sources, saves a checkpoint half way, resumes from
it in a fresh Trainer, and writes the fp32 master weights with save_pretrained + a safetensors file.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import leanopt  # noqa: E402
from leanopt.data import stdlib_corpus  # noqa: E402
from leanopt.integrations import export_state_dict  # noqa: E402
from leanopt.integrations.hf import LeanTrainer  # noqa: E402

SEQ = 64


class Bytes(torch.utils.data.Dataset):
    """Fixed windows of a byte corpus as {"input_ids", "labels"} (the model shifts the labels)."""

    def __init__(self, data: torch.Tensor, n: int) -> None:
        self.data, self.n = data.long(), n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        x = self.data[i * SEQ : (i + 1) * SEQ]
        return {"input_ids": x, "labels": x}


def build(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=256, n_positions=SEQ, n_embd=64, n_layer=2, n_head=2)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=SEQ,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(cfg)
    return leanopt.cast_model(model)  # bf16 weights, normalisation layers kept in fp32


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--release", action="store_true")
    ap.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    args = ap.parse_args(argv)

    out = args.out or tempfile.mkdtemp(prefix="leanopt-hf-")
    train, _ = stdlib_corpus(400_000)
    dataset = Bytes(train, n=len(train) // SEQ)

    def trainer_for(model: torch.nn.Module) -> LeanTrainer:
        targs = transformers.TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=4,
            gradient_accumulation_steps=args.accum, max_grad_norm=args.max_grad_norm, learning_rate=3e-3,
            lr_scheduler_type="cosine", warmup_steps=4, weight_decay=0.1, logging_steps=5,
            save_strategy="steps", save_steps=args.steps // 2, report_to="none", use_cpu=True, seed=0,
            disable_tqdm=True,
        )  # fmt: skip
        # No optimizer given: LeanTrainer builds leanopt.AdamW from the arguments (and the scheduler).
        return LeanTrainer(model=model, args=targs, train_dataset=dataset, release=args.release)

    first = trainer_for(build(args.arch))
    first.train()
    half = os.path.join(out, f"checkpoint-{args.steps // 2}")
    resumed = trainer_for(build(args.arch))
    resumed.train(resume_from_checkpoint=half)  # weights + remainders + Adam states + LR schedule
    same = all(
        torch.equal(a, b)
        for a, b in zip(first.model.state_dict().values(), resumed.model.state_dict().values(), strict=True)
    )
    print(f"resumed from {half}: final weights identical to the uninterrupted run: {same}")

    opt = resumed.optimizer.optimizer  # accelerate wraps the leanopt optimizer
    fp32_dir = os.path.join(out, "fp32")
    resumed.model.save_pretrained(fp32_dir, state_dict=export_state_dict(resumed.model, opt, torch.float32))
    leanopt.save_safetensors(resumed.model, opt, os.path.join(out, "weights-bf16.safetensors"), dtype=torch.bfloat16)
    print(f"fp32 master weights (from_pretrained-ready): {fp32_dir}")
    print(leanopt.memory_report(opt))
    return {"identical_after_resume": same, "loss": resumed.state.log_history[-2].get("loss")}


if __name__ == "__main__":
    main()
