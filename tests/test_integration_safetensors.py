"""safetensors export of master weights rebuilt from split bf16 weights, and import for more training."""

import json

import pytest
import torch

import leanopt
from leanopt.integrations import read_safetensors
from leanopt.models import GPT, GPTConfig

st = pytest.importorskip("safetensors.torch")

CFG = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view({torch.float32: torch.int32, torch.bfloat16: torch.int16}.get(t.dtype, t.dtype))


def build(seed: int = 0):
    torch.manual_seed(seed)
    model = leanopt.cast_model(GPT(CFG))
    return model, leanopt.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def train(model, opt, steps: int, start: int = 0) -> None:
    for s in range(start, start + steps):
        g = torch.Generator().manual_seed(s)
        x = torch.randint(0, CFG.vocab_size, (4, CFG.block_size), generator=g)
        model(x, torch.roll(x, -1, dims=1))[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.fixture(scope="module")
def trained():
    model, opt = build()
    train(model, opt, 3)
    return model, opt


def test_fp32_export_holds_the_exact_master_values(trained, tmp_path):
    model, opt = trained
    path = tmp_path / "w.safetensors"
    leanopt.save_safetensors(model, opt, path)
    raw = st.load_file(str(path))
    expected = leanopt.fp32_state_dict(model, opt)
    assert "lm_head.weight" not in raw  # tied to wte.weight: stored once
    assert set(raw) == set(expected) - {"lm_head.weight"}
    for key, value in raw.items():
        assert value.dtype == torch.float32 and torch.equal(bits(value), bits(expected[key])), key
    # The master values are more than the bf16 weights: the remainders are not all zero.
    w = model.blocks[0].fc.weight
    assert not torch.equal(bits(raw["blocks.0.fc.weight"]), bits(w.float()))


def test_bf16_export_is_the_fp32_export_rounded_to_nearest_even(trained, tmp_path):
    model, opt = trained
    leanopt.save_safetensors(model, opt, tmp_path / "a.safetensors", dtype=torch.float32)
    leanopt.save_safetensors(model, opt, tmp_path / "b.safetensors", dtype=torch.bfloat16)
    fp32, meta32 = read_safetensors(tmp_path / "a.safetensors")
    bf16, meta16 = read_safetensors(tmp_path / "b.safetensors")
    assert meta32["leanopt.dtype"] == "float32" and meta16["leanopt.dtype"] == "bfloat16"
    assert set(fp32) == set(bf16)
    for key in fp32:
        assert bf16[key].dtype == torch.bfloat16
        assert torch.equal(bits(bf16[key]), bits(fp32[key].to(torch.bfloat16))), key


def test_fp32_file_loaded_into_a_fresh_model_continues_training_bit_exactly(tmp_path):
    model, opt = build()
    train(model, opt, 3)
    path = tmp_path / "w.safetensors"
    leanopt.save_safetensors(model, opt, path, metadata={"step": "3"})
    model2, opt2 = build(seed=1)  # different initial weights
    meta = leanopt.load_safetensors(model2, opt2, path)
    assert meta["step"] == "3" and json.loads(meta["leanopt.aliases"]) == {"lm_head.weight": "wte.weight"}
    assert model2.lm_head.weight is model2.wte.weight  # tying kept
    for (n, p), p2 in zip(model.named_parameters(), model2.parameters(), strict=True):
        assert torch.equal(bits(p), bits(p2)), n
        assert torch.equal(bits(opt.master_value(p)), bits(opt2.master_value(p2))), n
    # Weights are exact; the Adam moments were not exported, so continue both from fresh moments.
    opt = leanopt.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    leanopt.load_safetensors(model, opt, path)
    train(model, opt, 2, start=3)
    train(model2, opt2, 2, start=3)
    for (n, p), p2 in zip(model.named_parameters(), model2.parameters(), strict=True):
        assert torch.equal(bits(opt.master_value(p)), bits(opt2.master_value(p2))), n


def test_bf16_file_loads_into_the_bf16_weights(trained, tmp_path):
    model, opt = trained
    path = tmp_path / "b.safetensors"
    leanopt.save_safetensors(model, opt, path, dtype=torch.bfloat16)
    model2, opt2 = build(seed=1)
    leanopt.load_safetensors(model2, opt2, path)
    file = st.load_file(str(path))
    for n, p in model2.named_parameters():
        key = "wte.weight" if n == "lm_head.weight" else n
        assert torch.equal(bits(opt2.master_value(p)), bits(file[key].float())), n


def test_strict_load_of_a_mismatched_file_raises_and_changes_nothing(trained, tmp_path):
    model, opt = trained
    path = tmp_path / "w.safetensors"
    sd = leanopt.fp32_state_dict(model, opt)
    del sd["lm_head.weight"], sd["ln_f.bias"]  # tied lm_head.weight is not missing: wte.weight is there
    st.save_file(sd, str(path))
    model2, opt2 = build(seed=1)
    before = {n: p.detach().clone() for n, p in model2.named_parameters()}
    with pytest.raises(KeyError, match=r"missing keys \['ln_f.bias'\]"):
        leanopt.load_safetensors(model2, opt2, path)
    assert all(torch.equal(p, before[n]) for n, p in model2.named_parameters())
    assert not opt2.state
    leanopt.load_safetensors(model2, opt2, path, strict=False)  # the rest loads
    assert torch.equal(bits(model2.ln_f.weight), bits(model.ln_f.weight))


def test_bad_arguments_are_refused(trained, tmp_path):
    model, opt = trained
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.bfloat16"):
        leanopt.save_safetensors(model, opt, tmp_path / "x.safetensors", dtype=torch.float16)
    with pytest.raises(TypeError, match="metadata must map str to str"):
        leanopt.save_safetensors(model, opt, tmp_path / "x.safetensors", metadata={"step": 3})
    with pytest.raises(TypeError, match="optimizer must be a leanopt optimizer"):
        leanopt.save_safetensors(model, torch.optim.SGD(model.parameters()), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
