"""fp32 weights in and out: fp32_state_dict / load_fp32_state_dict keep every master bit."""

import copy

import pytest
import torch
from torch import nn

import leanopt


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.element_size() == 4 else t.view(torch.int16)


class Net(nn.Module):
    """Two linears with tied weights, a LayerNorm, a buffer and a frozen (unmanaged) parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 8)
        self.tied = nn.Linear(16, 8)
        self.tied.weight = self.out.weight
        self.frozen = nn.Parameter(torch.randn(3), requires_grad=False)
        self.register_buffer("count", torch.tensor(7))
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x):
        h = self.norm(torch.tanh(self.inp(x)))
        return self.out(h) + self.tied(h)


def fp32_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    sd = Net().state_dict()
    # Values with all 32 bits busy (not bf16-representable).
    out = {k: (v + 1e-4 * torch.randn_like(v) if v.is_floating_point() else v) for k, v in sd.items()}
    out["tied.weight"] = out["out.weight"]  # one tensor under two names
    return out


def bf16_model_and_optimizer(**options):
    torch.manual_seed(1)
    model = Net().bfloat16()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, leanopt.AdamW(params, lr=1e-3, **options)


def test_load_fp32_sets_master_bits_before_the_first_step():
    weights = fp32_weights()
    model, opt = bf16_model_and_optimizer()
    leanopt.load_fp32_state_dict(model, opt, weights)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(bits(opt.master_value(p)), bits(weights[name])), name
            # The model computes with the nearest bf16 value.
            assert (p.float() - weights[name]).abs().le(p.float().abs() * 2**-8).all(), name  # half a bf16 ulp
    # The frozen parameter and the buffers are copied, cast to the model's dtypes.
    assert torch.equal(model.frozen, weights["frozen"].bfloat16())
    assert model.count.item() == 7 and model.scale.dtype == torch.bfloat16
    # A plain bf16 copy would lose the low bits: the test would notice.
    assert any(not torch.equal(p.float(), weights[n]) for n, p in model.named_parameters())


def test_fp32_state_dict_round_trip_after_training_is_bit_exact():
    model, opt = bf16_model_and_optimizer()
    x = torch.randn(4, 8).bfloat16()
    for _ in range(5):
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    exported = leanopt.fp32_state_dict(model, opt)
    assert set(exported) == set(model.state_dict())
    assert all(v.dtype == torch.float32 for v in exported.values() if v.is_floating_point())
    assert exported["count"].dtype == torch.int64
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(bits(exported[name]), bits(opt.master_value(p))), name
    assert torch.equal(exported["tied.weight"], exported["out.weight"])
    # Exported values are copies: training on does not change them.
    snapshot = {k: v.clone() for k, v in exported.items()}
    model(x).float().pow(2).mean().backward()
    opt.step()
    assert all(torch.equal(snapshot[k], exported[k]) for k in exported)
    # Import into a fresh bf16 model and optimizer: master values identical bit for bit.
    model2, opt2 = bf16_model_and_optimizer()
    leanopt.load_fp32_state_dict(model2, opt2, snapshot)
    again = leanopt.fp32_state_dict(model2, opt2)
    assert all(torch.equal(bits(again[k]), bits(v)) for k, v in snapshot.items() if v.is_floating_point())


def test_fp32_model_round_trip_is_plain_copy():
    torch.manual_seed(0)
    model = Net()
    opt = leanopt.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    exported = leanopt.fp32_state_dict(model, opt)
    for k, v in model.state_dict().items():
        assert torch.equal(exported[k], v) and exported[k].data_ptr() != v.data_ptr()


@pytest.mark.parametrize("master", ["kahan", "none", "stochastic"])
def test_load_fp32_into_other_formats_keeps_what_the_format_can(master):
    weights = fp32_weights()
    model, opt = bf16_model_and_optimizer(master=master)
    leanopt.load_fp32_state_dict(model, opt, weights)
    for name, p in model.named_parameters():
        if p.requires_grad:
            got = opt.master_value(p)
            # The 16-bit weight is the nearest value (ties to even for these formats).
            assert torch.equal(bits(p.detach()), bits(weights[name].bfloat16())), name
            if master == "kahan":  # weight + bf16 compensation: ~16 significant bits
                assert (got - weights[name]).abs().le(weights[name].abs() * (2**-16 + 2**-23)).all(), name


def test_load_then_train_continues_from_the_fp32_values():
    """Loading then stepping equals training from the fp32 master (exact format). The eager executor,
    whose arithmetic is torch.optim's single-tensor path (foreach=False) by design: the native kernels
    match torch's fused=True path instead, and the two torch paths differ in the last bit of a few
    elements on some CPUs (4 of this test's elements on an AMD EPYC with AVX-512, 2026-11-30)."""
    weights = fp32_weights()
    model, opt = bf16_model_and_optimizer(kernel="reference")
    leanopt.load_fp32_state_dict(model, opt, weights)
    ref = {n: weights[n].clone().requires_grad_(True) for n, p in model.named_parameters() if p.requires_grad}
    ref_opt = torch.optim.AdamW(list(ref.values()), lr=1e-3, foreach=False)
    x = torch.randn(4, 8).bfloat16()
    for _ in range(3):
        model(x).float().pow(2).mean().backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                ref[n].grad = p.grad.float()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(bits(opt.master_value(p)), bits(ref[n].detach())), n


def test_bad_fp32_state_dict_raises_and_changes_nothing():
    model, opt = bf16_model_and_optimizer()
    before = copy.deepcopy(model.state_dict())
    weights = fp32_weights()
    bad_shape = dict(weights, **{"inp.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"inp.weight: shape \(3, 3\) in state_dict, \(16, 8\) in the model"):
        leanopt.load_fp32_state_dict(model, opt, bad_shape)
    missing = {k: v for k, v in weights.items() if k != "norm.bias"}
    with pytest.raises(KeyError, match=r"missing keys \['norm.bias'\]"):
        leanopt.load_fp32_state_dict(model, opt, missing)
    untied = dict(weights, **{"tied.weight": weights["out.weight"] + 1e-3})
    with pytest.raises(ValueError, match=r"tied.weight and out.weight are one tied parameter but get different"):
        leanopt.load_fp32_state_dict(model, opt, untied)
    with pytest.raises(TypeError, match="optimizer must be a leanopt optimizer"):
        leanopt.load_fp32_state_dict(model, torch.optim.SGD(model.parameters(), lr=0.1), weights)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(opt.state.values())
    # Non-strict loading ignores unknown keys and loads the rest.
    leanopt.load_fp32_state_dict(model, opt, {**missing, "extra": torch.zeros(1)}, strict=False)
    assert torch.equal(bits(opt.master_value(model.inp.weight)), bits(weights["inp.weight"]))
