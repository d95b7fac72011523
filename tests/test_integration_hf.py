"""Hugging Face Trainer and Accelerate with leanopt optimizers, with and without gradient release, on
tiny random-init GPT-2 and Llama models built from configs (no downloads)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

import leanopt  # noqa: E402
from leanopt.integrations.hf import LeanTrainer, release_backward, unwrap_optimizer  # noqa: E402

pytestmark = pytest.mark.slow
VOCAB, SEQ = 64, 16


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view({torch.float32: torch.int32, torch.bfloat16: torch.int16}.get(t.dtype, t.dtype))


def tiny_model(arch: str = "gpt2", **cast_kw):
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=SEQ,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(cfg)
    return leanopt.cast_model(model, **cast_kw)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def targs(out, **kw) -> "transformers.TrainingArguments":
    base = dict(
        output_dir=str(out), per_device_train_batch_size=2, max_steps=4, learning_rate=3e-3,
        lr_scheduler_type="linear", warmup_steps=1, weight_decay=0.1, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    base.update(kw)
    return transformers.TrainingArguments(**base)


def trained_state(model, optimizer) -> dict:
    opt = unwrap_optimizer(optimizer)
    out = {}
    for n, p in model.named_parameters():
        out[n] = bits(p).clone()
        for k, v in opt.state[p].items():
            out[f"{n}:{k}"] = v.clone()
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def run_trainer(out, arch="gpt2", release=False, trainer_cls=None, resume=None, keep_fp32=None, **argkw):
    model = tiny_model(arch) if keep_fp32 is None else tiny_model(arch, keep_fp32=keep_fp32)
    args = targs(out, **argkw)
    if trainer_cls is transformers.Trainer:
        opt = leanopt.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
        sched = transformers.get_linear_schedule_with_warmup(opt, 1, args.max_steps)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, sched))
    else:
        trainer = LeanTrainer(model=model, args=args, train_dataset=Tokens(), release=release)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_llama_rmsnorm_kept_fp32_computes_and_hands_bf16_on():
    model = tiny_model("llama")
    norms = [n for n, m in model.named_modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert norms and leanopt.integrations.kept_fp32_modules(model) == norms
    assert {p.dtype for n, p in model.named_parameters() if "norm" in n} == {torch.float32}
    x = Tokens()[0]["input_ids"][None]
    out = model(input_ids=x, labels=x)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert model.model.norm.weight.grad.dtype == torch.float32
    # Without cast_model's hooks the fp32 RMSNorm weight would hand fp32 activations to a bf16 Linear.
    bare = tiny_model("llama", keep_fp32=())
    for n in norms:
        bare.get_submodule(n).float()
    with pytest.raises(RuntimeError, match="dtype"):
        bare(input_ids=x)


def test_plain_trainer_with_optimizers_tuple_resumes_bit_exactly(tmp_path):
    """optimizers=(leanopt.AdamW, scheduler); accumulation 2 and clipping on; resume from step 2."""
    kw = dict(gradient_accumulation_steps=2, max_grad_norm=0.5, save_strategy="steps", save_steps=2)
    full = run_trainer(tmp_path / "a", trainer_cls=transformers.Trainer, **kw)
    resumed = run_trainer(
        tmp_path / "b", trainer_cls=transformers.Trainer, resume=str(tmp_path / "a" / "checkpoint-2"), **kw
    )
    assert resumed.state.global_step == 4
    assert resumed.lr_scheduler.get_last_lr() == full.lr_scheduler.get_last_lr()
    assert_same(trained_state(full.model, full.optimizer), trained_state(resumed.model, resumed.optimizer))
    assert any(k.endswith(":remainder") for k in trained_state(full.model, full.optimizer))


def test_lean_trainer_builds_leanopt_adamw_from_the_arguments(tmp_path):
    trainer = run_trainer(tmp_path, max_steps=1, adam_beta2=0.95, adam_epsilon=1e-7)
    opt = trainer.optimizer.optimizer  # accelerate's wrapper
    assert isinstance(opt, leanopt.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["betas"] == (0.9, 0.95) and decay["eps"] == 1e-7
    # The Trainer's no-decay group holds biases and LayerNorm weights (kept fp32 by cast_model).
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert "transformer.ln_f.weight" in {names[id(p)] for p in no_decay["params"]}


@pytest.mark.parametrize(
    "arch, accum, keep_fp32",
    [
        ("gpt2", 2, ()),  # accumulated gradient: clipped exactly in optimizer.step()
        ("llama", 1, ()),  # no accumulation: a measuring backward gives the norm first
        pytest.param("gpt2", 2, None, id="gpt2-2-mixed"),  # bf16 + fp32 norms, combined in torch's order
    ],
)
def test_release_in_lean_trainer_matches_the_trainer_without_release_bit_for_bit(tmp_path, arch, accum, keep_fp32):
    """Clipping (max_grad_norm) and accumulation are honoured under release: same bits as without it."""
    kw = dict(arch=arch, gradient_accumulation_steps=accum, max_grad_norm=0.05, max_steps=3, keep_fp32=keep_fp32)
    plain = run_trainer(tmp_path / "plain", **kw)
    released = run_trainer(tmp_path / "rel", release=True, **kw)
    handle = released.release_handle
    assert handle is not None and handle.max_norm == 0.05
    assert_same(trained_state(plain.model, plain.optimizer), trained_state(released.model, released.optimizer))
    # The clip was active (the norm exceeded it), so ignoring it would have changed the result.
    assert handle.last_norm is not None and float(handle.last_norm) > 0.05
    logged = [e for e in released.state.log_history if "grad_norm" in e]
    assert len(logged) == 3 and logged[-1]["grad_norm"] == pytest.approx(float(handle.last_norm))


def test_release_without_clipping_matches_on_a_mixed_bf16_fp32_model(tmp_path):
    kw = dict(gradient_accumulation_steps=2, max_grad_norm=0, max_steps=2)
    plain = run_trainer(tmp_path / "plain", **kw)
    released = run_trainer(tmp_path / "rel", release=True, **kw)
    assert {p.dtype for p in released.model.parameters()} == {torch.bfloat16, torch.float32}
    assert_same(trained_state(plain.model, plain.optimizer), trained_state(released.model, released.optimizer))


def test_release_with_clip_previous_and_no_clipping(tmp_path):
    unclipped = run_trainer(tmp_path / "a", release=True, max_grad_norm=0, max_steps=2)
    assert unclipped.release_handle.max_norm is None
    prev = run_trainer(tmp_path / "b", release={"clip": "previous"}, max_grad_norm=0.05, max_steps=2)
    assert prev.release_handle.clip == "previous"
    a = trained_state(unclipped.model, unclipped.optimizer)
    b = trained_state(prev.model, prev.optimizer)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # clipping changed the weights


def test_release_resume_from_checkpoint_bit_exact(tmp_path):
    kw = dict(release=True, gradient_accumulation_steps=2, max_grad_norm=0.05, save_strategy="steps", save_steps=2)
    full = run_trainer(tmp_path / "a", **kw)
    resumed = run_trainer(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"), **kw)
    assert resumed.lr_scheduler.get_last_lr() == full.lr_scheduler.get_last_lr()
    assert_same(trained_state(full.model, full.optimizer), trained_state(resumed.model, resumed.optimizer))


def test_lean_trainer_refuses_settings_it_cannot_honour(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match=r"unknown options \['max_norm'\].*max_grad_norm"):
        LeanTrainer(model=model, args=targs(tmp_path), train_dataset=Tokens(), release={"max_norm": 1.0})
    opt = leanopt.AdamW(model.parameters())
    handle = leanopt.release_gradients(opt, max_norm=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(ValueError, match=r"max_norm=0.5 but TrainingArguments.max_grad_norm=1.0"):
        LeanTrainer(model=model, args=targs(tmp_path, max_grad_norm=1.0), optimizers=(opt, sched))
    args = targs(tmp_path, max_grad_norm=0.5)
    args.fp16 = True  # TrainingArguments refuses fp16 on CPU at construction; set it afterwards
    with pytest.raises(ValueError, match="fp16=True"):
        LeanTrainer(model=model, args=args, optimizers=(opt, sched))
    handle.remove()
    leanopt.release_gradients(opt, accumulation="states", micro_batches=3)
    with pytest.raises(ValueError, match="micro_batches=3 but gradient_accumulation_steps=2"):
        LeanTrainer(model=model, args=targs(tmp_path, max_grad_norm=0, gradient_accumulation_steps=2),
                    optimizers=(opt, sched))  # fmt: skip


def test_fp32_save_pretrained_round_trips_the_master_weights(tmp_path):
    trainer = run_trainer(tmp_path / "run", max_steps=2)
    model, opt = trainer.model, trainer.optimizer.optimizer
    sd = leanopt.integrations.export_state_dict(model, opt, torch.float32)
    model.save_pretrained(tmp_path / "fp32", state_dict=dict(sd))  # a copy: save_pretrained drops tied keys
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "fp32", dtype=torch.float32)
    for n, p in loaded.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(bits(p), bits(sd[n])), n
    # Back into a bf16 model + fresh optimizer: the low bits come back too.
    model2 = tiny_model()
    opt2 = leanopt.AdamW(model2.parameters())
    leanopt.load_fp32_state_dict(model2, opt2, loaded.state_dict())
    for (n, p), p2 in zip(model.named_parameters(), model2.parameters(), strict=True):
        assert torch.equal(bits(opt.master_value(p)), bits(opt2.master_value(p2))), n


# ------------------------------------------------------------------------------------------ Accelerate


def accelerate_run(out, steps, release=False, save_at=None, load=None, max_norm=0.05, accum=2):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(gradient_accumulation_steps=accum, cpu=True)
    set_seed(0)
    model = tiny_model()
    opt = leanopt.AdamW(model.parameters(), lr=3e-3)
    handle = leanopt.release_gradients(opt, max_norm=max_norm) if release else None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    loader = torch.utils.data.DataLoader(Tokens(), batch_size=2, shuffle=False)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    if load is not None:
        accelerator.load_state(load)
    done = 0 if load is None else save_at
    batches = list(loader)[done * accum : steps * accum]
    for i, batch in enumerate(batches):
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            if release:
                release_backward(accelerator, loss)
            else:
                accelerator.backward(loss)
                if accelerator.sync_gradients and max_norm:
                    accelerator.clip_grad_norm_(model.parameters(), max_norm)
            opt.step()
            sched.step()
            opt.zero_grad()
        if accelerator.sync_gradients and save_at is not None and load is None and (i + 1) == save_at * accum:
            accelerator.save_state(str(out))
    state = trained_state(model, opt)
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    accelerate.state.GradientState._reset_state()
    return state, handle


def test_accelerate_accumulation_and_clipping_with_release_match_without(tmp_path):
    plain, _ = accelerate_run(tmp_path, steps=3)
    released, handle = accelerate_run(tmp_path, steps=3, release=True)
    assert_same(plain, released)
    assert float(handle.last_norm) > 0.05  # the clip was active


@pytest.mark.parametrize("release", [False, True])
def test_accelerate_save_state_load_state_resumes_bit_exactly(tmp_path, release):
    full, _ = accelerate_run(tmp_path / "full", steps=4, release=release, save_at=2)
    resumed, _ = accelerate_run(tmp_path / "r", steps=4, release=release, save_at=2, load=str(tmp_path / "full"))
    assert_same(full, resumed)
