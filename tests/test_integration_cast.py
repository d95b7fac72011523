"""cast_model: which modules stay fp32, how they compute, and leanopt optimizers on the mixed-dtype
param groups it creates (steps and state dicts, bit for bit)."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import leanopt
from leanopt.integrations import kept_fp32_modules
from leanopt.models import GPT, GPTConfig

CFG = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a tensor's bits, for bit-exact comparisons."""
    return t.detach().view({torch.float32: torch.int32, torch.bfloat16: torch.int16}.get(t.dtype, t.dtype))


def tiny_gpt(seed: int = 0, **cast_kw) -> GPT:
    torch.manual_seed(seed)
    return leanopt.cast_model(GPT(CFG), **cast_kw)


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, CFG.vocab_size, (4, CFG.block_size), generator=g)
    return x, torch.roll(x, -1, dims=1)


def train(model, opt, steps: int, start: int = 0) -> None:
    for s in range(start, start + steps):
        _, loss = model(*batch(s))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_default_keeps_layernorms_fp32_and_casts_everything_else_to_bf16():
    model = tiny_gpt()
    for name, p in model.named_parameters():
        want = torch.float32 if ".ln_" in f".{name}" else torch.bfloat16
        assert p.dtype == want, name
    assert kept_fp32_modules(model) == ["blocks.0.ln_1", "blocks.0.ln_2", "blocks.1.ln_1", "blocks.1.ln_2", "ln_f"]


def test_cast_keeps_values_and_parameter_identity():
    torch.manual_seed(0)
    model = GPT(CFG)
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    leanopt.cast_model(model)
    for n, p in model.named_parameters():
        orig, value = before[n]
        assert p is orig
        assert torch.equal(bits(p), bits(value.to(p.dtype)))


def test_kept_module_computes_in_fp32_and_returns_the_model_dtype():
    model = tiny_gpt()
    seen = {}
    # Appended pre-hook: runs after leanopt's input cast; prepended hook: before its output cast.
    model.ln_f.register_forward_pre_hook(lambda m, a: seen.update(inp=a[0].dtype))
    model.ln_f.register_forward_hook(lambda m, a, out: seen.update(out=out.dtype), prepend=True)
    logits, loss = model(*batch(0))
    assert seen == {"inp": torch.float32, "out": torch.float32}
    assert logits.dtype == torch.bfloat16
    loss.backward()
    assert model.ln_f.weight.grad.dtype == torch.float32
    assert model.blocks[0].attn.weight.grad.dtype == torch.bfloat16


def test_keep_fp32_accepts_types_name_patterns_and_predicates():
    by_type = tiny_gpt(keep_fp32=[nn.Embedding, "lm_head"])  # lm_head is tied to wte
    assert by_type.wpe.weight.dtype == torch.float32 and by_type.ln_f.weight.dtype == torch.bfloat16
    by_name = tiny_gpt(keep_fp32=["blocks.*.fc"])
    assert kept_fp32_modules(by_name) == ["blocks.0.fc", "blocks.1.fc"]
    assert by_name.blocks[1].fc.bias.dtype == torch.float32 and by_name.blocks[1].fc_proj.bias.dtype == torch.bfloat16
    by_pred = tiny_gpt(keep_fp32=[lambda name, m: name == "blocks.1"])
    assert all(p.dtype == torch.float32 for p in by_pred.blocks[1].parameters())
    assert all(p.dtype == torch.bfloat16 for p in by_pred.blocks[0].parameters())
    assert kept_fp32_modules(by_pred) == ["blocks.1"]  # outermost only: no nested casts
    assert by_pred(*batch(0))[0].dtype == torch.bfloat16
    everything = tiny_gpt(keep_fp32=())
    assert {p.dtype for p in everything.parameters()} == {torch.bfloat16}
    assert kept_fp32_modules(everything) == []


def test_float16_cast():
    model = tiny_gpt(dtype=torch.float16)
    assert model.blocks[0].fc.weight.dtype == torch.float16 and model.ln_f.weight.dtype == torch.float32


def test_batchnorm_running_stats_stay_fp32_and_the_counter_stays_int():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    leanopt.cast_model(net)
    bn = net[1]
    assert bn.running_mean.dtype == torch.float32 and bn.running_var.dtype == torch.float32
    assert bn.num_batches_tracked.dtype == torch.int64
    assert net[0].weight.dtype == torch.bfloat16
    out = net(torch.randn(2, 3, 8, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and int(bn.num_batches_tracked) == 1


def test_recasting_does_not_stack_hooks_and_can_change_the_choice():
    model = tiny_gpt()
    leanopt.cast_model(model)
    assert len(model.ln_f._forward_pre_hooks) == 1 and len(model.ln_f._forward_hooks) == 1
    leanopt.cast_model(model, keep_fp32=["lm_head", "wte"])  # tied: both or neither
    assert not model.ln_f._forward_pre_hooks and not model.ln_f._forward_hooks
    assert model.ln_f.weight.dtype == torch.bfloat16 and model.wte.weight.dtype == torch.float32
    assert kept_fp32_modules(model) == ["wte", "lm_head"]


def test_cast_model_survives_deepcopy_and_pickle():
    model = tiny_gpt()
    x, y = batch(0)
    ref = model(x, y)[1]
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(clone(x, y)[1], ref)
        assert kept_fp32_modules(clone) == kept_fp32_modules(model)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"dtype": torch.float32}, ValueError, "dtype must be torch.bfloat16 or torch.float16"),
        ({"keep_fp32": "ln_f"}, TypeError, "keep_fp32 must be a list or tuple"),
        ({"keep_fp32": [3]}, TypeError, r"keep_fp32\[0\]"),
        ({"keep_fp32": ["lm_head"]}, ValueError, r"parameter shared by \['lm_head.weight'\].*\['wte.weight'\]"),
        ({"keep_fp32": ["*"]}, ValueError, "matched the whole model"),
    ],
)
def test_bad_arguments_raise_and_leave_the_model_unchanged(kwargs, error, match):
    torch.manual_seed(0)
    model = GPT(CFG)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        leanopt.cast_model(model, **kwargs)
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert kept_fp32_modules(model) == [] and not model.ln_f._forward_pre_hooks


@pytest.mark.parametrize("cls", [leanopt.AdamW, leanopt.Adam, leanopt.SGD])
def test_mixed_groups_update_fp32_params_exactly_like_torch_optim(cls):
    """fp32 params in a group that also holds bf16 params get torch.optim's update, bit for bit."""
    torch_cls = {leanopt.AdamW: torch.optim.AdamW, leanopt.Adam: torch.optim.Adam, leanopt.SGD: torch.optim.SGD}[cls]
    model = tiny_gpt()
    kw = {"lr": 1e-2, "weight_decay": 0.1} | ({"momentum": 0.9} if cls is leanopt.SGD else {})
    opt = cls(model.parameters(), kernel="reference", **kw)  # torch.optim's single-tensor arithmetic
    fp32 = [p for p in model.parameters() if p.dtype == torch.float32]
    copies = [p.detach().clone().requires_grad_() for p in fp32]
    ref = torch_cls(copies, foreach=False, **kw)
    for s in range(3):
        model(*batch(s))[1].backward()
        for c, p in zip(copies, fp32, strict=True):
            c.grad = p.grad.clone()
        opt.step()
        ref.step()
        opt.zero_grad()
    for c, p in zip(copies, fp32, strict=True):
        assert torch.equal(bits(p), bits(c))
    bf16 = [p for p in model.parameters() if p.dtype == torch.bfloat16]
    assert all("remainder" in opt.state[p] for p in bf16)
    assert all("remainder" not in opt.state[p] for p in fp32)


def test_mixed_groups_state_dict_roundtrip_resumes_bit_exactly():
    """Trainer-style groups (decay / no decay), each mixing bf16 and fp32 params."""

    def build():
        model = tiny_gpt()
        in_decay = {n: p.dim() >= 2 or n.endswith("ln_f.weight") for n, p in model.named_parameters()}
        decay = [p for n, p in model.named_parameters() if in_decay[n]]
        rest = [p for n, p in model.named_parameters() if not in_decay[n]]
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
        assert all(len({p.dtype for p in g["params"]}) == 2 for g in groups)
        return model, leanopt.AdamW(groups, lr=1e-2)

    model, opt = build()
    train(model, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, 3, start=3)

    model2, opt2 = build()
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    train(model2, opt2, 3, start=3)
    for (n, p), p2 in zip(model.named_parameters(), model2.parameters(), strict=True):
        assert p2.dtype == p.dtype and torch.equal(bits(p), bits(p2)), n
        for key, value in opt.state[p].items():
            assert torch.equal(value, opt2.state[p2][key]), (n, key)


def test_loading_a_state_dict_from_a_differently_cast_model_is_refused_and_changes_nothing():
    model, opt = tiny_gpt(), None
    opt = leanopt.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, 1)
    other = tiny_gpt(keep_fp32=())  # LayerNorms in bf16 here
    other_opt = leanopt.AdamW(other.parameters(), lr=1e-2)
    train(other, other_opt, 1)
    before = {k: v.clone() for p in other.parameters() for k, v in other_opt.state[p].items()}
    with pytest.raises(ValueError, match=r"expected .*remainder|holds .* expected"):
        other_opt.load_state_dict(opt.state_dict())
    after = {k: v for p in other.parameters() for k, v in other_opt.state[p].items()}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_hugging_face_keep_in_fp32_modules_strict_is_always_kept():
    class Net(nn.Module):
        _keep_in_fp32_modules_strict = ["head"]

        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.body(x))

    net = leanopt.cast_model(Net(), keep_fp32=())
    assert net.head.weight.dtype == torch.float32 and net.body.weight.dtype == torch.bfloat16
    assert kept_fp32_modules(net) == ["head"]
    assert net(torch.randn(3, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16
