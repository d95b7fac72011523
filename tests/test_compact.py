"""The "compact" weight format: 16-bit weight + int8 residual (formats/compact.py)."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import leanopt
from leanopt.formats.compact import (
    MAX_REL_ERROR,
    compact_join_bf16,
    compact_join_fp16,
    compact_split_bf16,
    compact_split_fp16,
)
from leanopt.formats.weights import WEIGHT_FORMATS

I32 = torch.int32


def spread_fp32(n: int, seed: int = 0, lo: float = -120.0, hi: float = 120.0) -> torch.Tensor:
    """Random fp32 values with random signs and exponents spread over [2**lo, 2**hi] (normal range)."""
    g = torch.Generator().manual_seed(seed)
    mant = 1 + torch.rand(n, generator=g, dtype=torch.float64)
    exp = torch.randint(int(lo), int(hi), (n,), generator=g).double()
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    return (sign * mant * torch.exp2(exp)).float()


def bf16_ulp(w: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 numbers at normal bf16 values ``w`` (as fp32)."""
    _, e = torch.frexp(w.float())
    return torch.ldexp(torch.ones_like(w, dtype=torch.float32), e - 8)


def test_compact_bf16_max_relative_error_is_2_pow_minus_16_and_is_reached():
    x = spread_fp32(400_000)
    hi, lo = compact_split_bf16(x)
    assert hi.dtype == torch.bfloat16 and lo.dtype == torch.int8
    kept = compact_join_bf16(hi, lo)
    rel = ((kept.double() - x.double()) / x.double()).abs()
    assert rel.max().item() <= MAX_REL_ERROR[torch.bfloat16] == 2.0**-16
    assert rel.max().item() > 0.9 * 2.0**-16  # the documented bound is tight, not loose


def test_compact_bf16_weight_is_the_nearest_bf16_to_the_kept_master():
    x = spread_fp32(200_000, seed=1)
    hi, lo = compact_split_bf16(x)
    kept = compact_join_bf16(hi, lo)
    dist = (hi.float().double() - kept.double()).abs()
    assert bool((dist <= bf16_ulp(hi).double() / 2).all())
    # Apart from exact ties (residual -128 = half an ULP), hi is what torch's own rounding gives.
    no_tie = lo != -128
    assert torch.equal(hi[no_tie].view(torch.int16), kept[no_tie].bfloat16().view(torch.int16))


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=-(2**23), max_value=2**23 - 1))
def test_values_with_16_significant_bits_roundtrip_bit_exactly(top24):
    bits = torch.tensor([top24 << 8], dtype=I32)
    x = bits.view(torch.float32)
    if torch.isnan(x).any():
        return
    hi, lo = compact_split_bf16(x)
    assert torch.equal(compact_join_bf16(hi, lo).view(I32), bits)


def test_compact_bf16_special_values():
    x = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 3.3895e38, -3.4028235e38, 1e-45, -1e-40, 2.0**-126, 1.0])
    hi, lo = compact_split_bf16(x)
    kept = compact_join_bf16(hi, lo)
    assert torch.equal(kept[:4].view(I32), x[:4].view(I32))  # signed zeros and infinities exactly
    assert kept[5].item() == float("-inf")  # beyond bf16/16-bit range rounds to infinity, as bf16 would
    assert (kept[6:8] - x[6:8]).abs().max().item() <= 2.0**-142  # subnormals: absolute bound
    nan_hi, nan_lo = compact_split_bf16(torch.tensor([float("nan"), -float("nan")]))
    assert torch.isnan(compact_join_bf16(nan_hi, nan_lo)).all() and int(nan_lo.abs().sum()) == 0


def test_compact_fp16_error_bounds_normal_subnormal_and_overflow():
    x = spread_fp32(300_000, seed=2, lo=-14, hi=15)
    w, r = compact_split_fp16(x)
    assert w.dtype == torch.float16 and r.dtype == torch.int8
    kept = compact_join_fp16(w, r)
    rel = ((kept.double() - x.double()) / x.double()).abs()
    assert rel.max().item() <= MAX_REL_ERROR[torch.float16] == 2.0**-18
    assert rel.max().item() > 2.0**-19  # far finer than fp16 alone (2**-11) and the bound is near-tight
    assert torch.equal(w, x.half())  # the fp16 weight is the fp16 value nearest to the fp32 value
    tiny = spread_fp32(10_000, seed=3, lo=-30, hi=-15)
    kept_tiny = compact_join_fp16(*compact_split_fp16(tiny))
    assert (kept_tiny - tiny).abs().max().item() <= 2.0**-32
    big = torch.tensor([1e5, -7e4, float("inf")])
    assert torch.isinf(compact_join_fp16(*compact_split_fp16(big))).all()


def test_compact_is_registered_and_uses_one_byte_of_master_per_param():
    assert "compact" in leanopt.optimizer.MASTER_CHOICES
    fmt = WEIGHT_FORMATS["compact"]
    p = torch.zeros(7, 5, dtype=torch.bfloat16)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in fmt.init_buffers(p).items()} == {"residual": (torch.int8, (7, 5))}
    net = nn.Linear(64, 32).bfloat16()
    opt = leanopt.AdamW(net.parameters(), master="compact")
    net(torch.randn(4, 64, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    report = leanopt.memory_report(opt)
    n = sum(p.numel() for p in net.parameters())
    assert report.by_category["master"] == n  # int8 residual: 1 byte per parameter
    assert report.by_category["weights"] == 2 * n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_set_master_value_keeps_fp32_weights_within_the_documented_error(dtype):
    lin = nn.Linear(128, 64).to(dtype)
    opt = leanopt.AdamW(lin.parameters(), master="compact")
    target = torch.randn(64, 128) * 0.02
    opt.set_master_value(lin.weight, target)
    got = opt.master_value(lin.weight)
    normal = target.abs() >= (2.0**-14 if dtype == torch.float16 else 2.0**-126)
    rel = ((got - target) / target).abs()[normal]
    assert rel.max().item() <= MAX_REL_ERROR[dtype]
    # The model computes with the nearest 16-bit value (up to exact ties of the kept value).
    no_tie = opt.state[lin.weight]["residual"] != -128
    assert torch.equal(lin.weight.data[no_tie], got[no_tie].to(dtype))
    assert no_tie.float().mean().item() > 0.99


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compact_keeps_updates_that_plain_16_bit_weights_lose(dtype):
    # SGD steps of 1e-4 on weights near 1: below half a bf16 / fp16 ULP, above compact's resolution.
    def run(master):
        p = nn.Parameter(torch.ones(256, dtype=dtype))
        opt = leanopt.SGD([p], lr=1e-4, master=master)
        for _ in range(50):
            p.grad = torch.ones_like(p)
            opt.step()
        return opt.master_value(p)

    expected = 1 - 50 * 1e-4
    assert torch.allclose(run("compact"), torch.full((256,), expected), rtol=0, atol=50 * 2.0**-16)
    assert torch.equal(run("none"), torch.ones(256))  # round to nearest loses every one of them


def test_compact_training_tracks_the_exact_master_closely():
    def run(master):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1)).bfloat16()
        opt = leanopt.AdamW(net.parameters(), lr=3e-3, master=master)
        x = torch.randn(128, 16).bfloat16()
        y = x[:, :4].sum(1, keepdim=True)
        for _ in range(30):
            loss = ((net(x) - y) ** 2).float().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        return loss.item(), [opt.master_value(p) for p in net.parameters()]

    loss_c, w_c = run("compact")
    loss_e, w_e = run("exact")
    loss_n, w_n = run("none")
    err = lambda ws: max(((a - b).norm() / b.norm()).item() for a, b in zip(ws, w_e, strict=True))  # noqa: E731
    assert err(w_c) < 1e-2
    assert err(w_c) < err(w_n) / 3  # compact is much closer to the exact master than plain bf16
    assert abs(loss_c - loss_e) / loss_e < 0.05


@pytest.mark.parametrize("states", ["int8", "int4"])
def test_compact_state_dict_resume_is_bit_identical(states):
    def make():
        torch.manual_seed(0)  # rows of 45 (odd: int4 one code per byte) and 64 (int4 packed)
        net = nn.Sequential(nn.Linear(45, 64), nn.Tanh(), nn.Linear(64, 1)).bfloat16()
        return net, leanopt.AdamW(net.parameters(), lr=1e-2, master="compact", states=states)

    x = torch.randn(32, 45).bfloat16()

    def steps(net, opt, k):
        for _ in range(k):
            net(x).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()

    net_a, opt_a = make()
    steps(net_a, opt_a, 10)
    saved_model = {k: v.clone() for k, v in net_a.state_dict().items()}
    saved_opt = copy.deepcopy(opt_a.state_dict())  # torch's state_dict holds live references
    steps(net_a, opt_a, 5)

    net_b, opt_b = make()
    net_b.load_state_dict(saved_model)
    opt_b.load_state_dict(saved_opt)
    steps(net_b, opt_b, 5)
    for pa, pb in zip(net_a.parameters(), net_b.parameters(), strict=True):
        assert torch.equal(pa.view(torch.int16), pb.view(torch.int16))
        for key, va in opt_a.state[pa].items():
            assert torch.equal(va, opt_b.state[pb][key]), key


def test_master_compact_rejects_a_state_dict_of_another_master_and_changes_nothing():
    net = nn.Linear(8, 4).bfloat16()
    exact = leanopt.AdamW(net.parameters(), master="exact")
    net(torch.randn(2, 8).bfloat16()).sum().backward()
    exact.step()
    compact = leanopt.AdamW(net.parameters(), master="compact")
    with pytest.raises(ValueError, match="master="):
        compact.load_state_dict(exact.state_dict())
    assert len(compact.state) == 0
