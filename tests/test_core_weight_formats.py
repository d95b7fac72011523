"""What each master= weight format keeps of small updates, and the stochastic-rounding helpers."""

import pytest
import torch

import leanopt
from leanopt.formats.weights import (
    WEIGHT_FORMATS,
    _stochastic_round_generic,
    resolve_weight_format,
    stochastic_round_bf16,
)

BF16_ULP_AT_1 = 2.0**-7  # bf16 keeps 8 significant bits: the spacing in [1, 2)
FP16_ULP_AT_1 = 2.0**-10


def sgd_with_constant_gradient(master, n, steps, update, dtype=torch.bfloat16, start=1.0, seed=0):
    """Plain SGD (lr=1) moving ``n`` weights that start at ``start`` by ``update`` each step."""
    p = torch.nn.Parameter(torch.full((n,), start, dtype=dtype))
    opt = leanopt.SGD([p], lr=1.0, master=master, seed=seed)
    for _ in range(steps):
        p.grad = torch.full_like(p, -update)  # exactly representable in bf16/fp16
        opt.step()
    return p, opt


def test_none_loses_sub_half_ulp_updates_that_exact_keeps():
    update = 2.0**-9  # a quarter of a bf16 ULP at 1.0: round-to-nearest undoes every step
    steps = 100
    p, _ = sgd_with_constant_gradient("none", 4, steps, update)
    assert torch.equal(p.detach(), torch.ones(4, dtype=torch.bfloat16))  # all 100 updates lost
    q, opt = sgd_with_constant_gradient("exact", 4, steps, update)
    expected = torch.full((4,), 1.0 + steps * update)  # 1.1953125: exact in fp32 (and in bf16)
    assert torch.equal(opt.master_value(q).view(torch.int32), expected.view(torch.int32))
    assert torch.equal(q.detach().view(torch.int16), expected.bfloat16().view(torch.int16))


def test_exact_keeps_every_bit_of_updates_far_below_bf16_precision():
    update = 2.0**-20  # 1/8192 of a bf16 ULP; still 8 fp32 ULPs at 1.0
    q, opt = sgd_with_constant_gradient("exact", 3, 50, update)
    expected = torch.full((3,), 1.0 + 50 * update)
    assert torch.equal(opt.master_value(q).view(torch.int32), expected.view(torch.int32))
    assert torch.equal(q.detach(), torch.ones(3, dtype=torch.bfloat16))  # still rounds to 1.0


def test_stochastic_keeps_small_updates_in_expectation():
    n, steps = 20_000, 10
    update = 0.3 * BF16_ULP_AT_1
    p, _ = sgd_with_constant_gradient("stochastic", n, steps, update, seed=123)
    mean_error_ulps = (p.detach().double().mean().item() - (1.0 + steps * update)) / BF16_ULP_AT_1
    # Each step's rounding is unbiased with variance <= ulp**2 / 4, so after 10 steps one weight's error
    # has variance <= 10/4 ulp**2 and the mean of 20,000 independent weights has standard deviation
    # <= sqrt(10 / 4 / 20000) = 0.011 ulp. 0.07 ulp is over 6 standard deviations (a false failure has
    # probability < 1e-9), while "none" is off by the whole 3 ulps (checked above it loses all).
    assert abs(mean_error_ulps) < 0.07
    # The weights are spread over neighbouring bf16 values, not all on one.
    assert p.detach().unique().numel() >= 3


def test_stochastic_is_reproducible_with_a_seed_and_differs_with_another():
    update = 0.3 * BF16_ULP_AT_1
    a, _ = sgd_with_constant_gradient("stochastic", 1000, 5, update, seed=7)
    b, _ = sgd_with_constant_gradient("stochastic", 1000, 5, update, seed=7)
    c, _ = sgd_with_constant_gradient("stochastic", 1000, 5, update, seed=8)
    assert torch.equal(a.detach().view(torch.int16), b.detach().view(torch.int16))
    assert not torch.equal(a.detach(), c.detach())


def test_kahan_keeps_small_updates():
    update = 0.3 * BF16_ULP_AT_1
    steps = 100
    p, opt = sgd_with_constant_gradient("kahan", 8, steps, update)
    expected = 1.0 + steps * update
    # The bf16 compensation holds the rounding error to 8 significant bits (relative 2**-9 of at most
    # half an ulp) each step: after 100 steps within 100 * 2**-9 / 2 ulp = 0.1 ulp (measured: 0.078).
    err_ulps = (opt.master_value(p).double() - expected).abs().max().item() / BF16_ULP_AT_1
    assert err_ulps < 0.1
    assert (p.detach().float() - expected).abs().max().item() <= BF16_ULP_AT_1 / 2  # weight is nearest


def test_stochastic_round_bf16_picks_a_neighbour_with_the_right_probability():
    x = torch.tensor([1.0 + 0.25 * BF16_ULP_AT_1, -(1.0 + 0.75 * BF16_ULP_AT_1), 3.0, 0.0])
    n = 65536
    values = x.repeat(n, 1)
    # Every possible random draw once: the frequencies are exact, not statistical.
    r = torch.arange(n, dtype=torch.int32)[:, None].expand(n, 4).contiguous()
    out = stochastic_round_bf16(values, r).float()
    up = (out[:, 0] == 1.0 + BF16_ULP_AT_1).sum().item()
    assert up == n // 4 and set(out[:, 0].tolist()) == {1.0, 1.0 + BF16_ULP_AT_1}
    away = (out[:, 1] == -(1.0 + BF16_ULP_AT_1)).sum().item()
    assert away == 3 * n // 4 and set(out[:, 1].tolist()) == {-1.0, -(1.0 + BF16_ULP_AT_1)}
    assert set(out[:, 2].tolist()) == {3.0} and set(out[:, 3].tolist()) == {0.0}  # exact values stay


def test_stochastic_round_bf16_keeps_nan_and_inf():
    x = torch.tensor([float("nan"), float("inf"), -float("inf")])
    for r in (0, 0xFFFF):
        out = stochastic_round_bf16(x, torch.full((3,), r, dtype=torch.int32)).float()
        assert out[0].isnan() and out[1].item() == float("inf") and out[2].item() == -float("inf")


def stochastic_fp16(values: torch.Tensor) -> torch.Tensor:
    """Encode fp32 ``values`` into an fp16 param with every 16-bit random draw once per value."""
    n = 65536
    fmt = WEIGHT_FORMATS["stochastic"]
    p = torch.zeros(n, values.numel(), dtype=torch.float16)
    r = torch.arange(n, dtype=torch.int32)[:, None].expand(n, values.numel()).contiguous()
    fmt.encode(values.repeat(n, 1), p, {}, lambda like: r)
    return p


@pytest.mark.parametrize(
    "value",
    [1.0 + 0.25 * FP16_ULP_AT_1, -(1.0 + 0.625 * FP16_ULP_AT_1), 3e-6, 1e-7, -2.5e-8, 1.5, 0.0, 65000.0],
)
def test_stochastic_fp16_is_unbiased_and_picks_neighbours(value):
    x = torch.tensor([value])
    out = stochastic_fp16(x)[:, 0]
    # Only the two fp16 neighbours of the value (one if it is exact) appear.
    lo = x.to(torch.float16)
    neighbours = {lo.item(), torch.nextafter(lo, torch.tensor([-torch.inf], dtype=torch.float16)).item(),
                  torch.nextafter(lo, torch.tensor([torch.inf], dtype=torch.float16)).item()}  # fmt: skip
    assert set(out.float().tolist()) <= neighbours
    # Over all 65,536 draws the mean is the value to within 2**-16 of an fp16 ulp (exact for normals).
    ulp = torch.nextafter(lo.abs(), torch.tensor([torch.inf], dtype=torch.float16)).float() - lo.abs().float()
    mean = out.double().mean().item()
    assert abs(mean - x.double().item()) <= ulp.item() * 2.0**-16 + 1e-12 * abs(value)


def test_stochastic_fp16_overflows_like_round_to_nearest():
    out = stochastic_fp16(torch.tensor([70000.0, -1e6, 65504.0, float("inf"), float("nan")]))
    assert bool(torch.isinf(out[:, 0]).all()) and bool((out[:, 0] > 0).all())
    assert bool(torch.isinf(out[:, 1]).all()) and bool((out[:, 1] < 0).all())
    assert set(out[:, 2].float().tolist()) == {65504.0}
    assert bool(torch.isinf(out[:, 3]).all()) and bool(torch.isnan(out[:, 4]).all())


def test_fp16_params_default_to_kahan_and_refuse_exact():
    assert resolve_weight_format("auto", torch.float16).name == "kahan"
    assert resolve_weight_format("auto", torch.bfloat16).name == "exact"
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"master='exact' does not support torch.float16.*'kahan'"):
        leanopt.AdamW([p], master="exact")
    opt = leanopt.SGD([p], lr=1.0)
    p.grad = torch.full_like(p, -0.25 * FP16_ULP_AT_1)
    opt.step()
    assert "compensation" in opt.state[p] and opt.state[p]["compensation"].dtype == torch.float16
    # The sub-ulp update is kept in the compensation: the master moved by exactly a quarter ulp.
    assert torch.equal(opt.master_value(p), torch.full((4,), 1.0 + 0.25 * FP16_ULP_AT_1))


@pytest.mark.parametrize("master", ["kahan", "stochastic", "none"])
def test_fp16_formats_train_without_nan(master):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).half()
    x = torch.randn(32, 8).half()
    opt = leanopt.AdamW(net.parameters(), lr=1e-2, master=master)
    for _ in range(30):
        loss = (net(x).float() ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(p.dtype == torch.float16 and bool(torch.isfinite(p).all()) for p in net.parameters())
    assert loss.item() < 0.05


def test_kahan_fp16_precision_is_bounded():
    """fp16 Kahan stores fp16 weight + fp16 rounding error: relative error <= 2**-21 where the error is
    an fp16 normal (|w| >= ~0.06), growing toward fp16's subnormal step 2**-24 below that."""
    fmt = WEIGHT_FORMATS["kahan"]
    x = torch.rand(100_000, dtype=torch.float64).mul(6).sub(5).exp2().float()  # 2**-5 .. 2**1
    x = x * torch.where(torch.rand(x.shape) < 0.5, -1.0, 1.0)
    p = torch.zeros_like(x, dtype=torch.float16)
    buffers = fmt.init_buffers(p)
    fmt.encode(x, p, buffers)
    err = (fmt.decode(p, buffers).double() - x.double()).abs()
    rel = err / x.double().abs()
    big = x.abs() >= 2.0**-4  # error (<= half ulp = |w| * 2**-11) stays an fp16 normal: 11 more bits
    assert rel[big].max().item() <= 2.0**-21 + 2.0**-24  # + the fp32 rounding of weight + compensation
    assert err[~big].max().item() <= 2.0**-25 + 2.0**-29  # half the fp16 subnormal step (+ fp32 rounding)
    # Far better than the fp16 weight alone (relative error up to 2**-11).
    assert rel.max().item() < 2.0**-16


def _nextafter_fp16_rounding(value, random_bits):
    """The fp16 stochastic rounding as first written, with torch.nextafter (the oracle below)."""
    down = value.to(torch.float16)
    too_big = down.float().abs() > value.abs()
    toward_zero = torch.where(too_big, torch.nextafter(down, torch.zeros_like(down)), down)
    away = torch.nextafter(toward_zero, torch.where(value < 0, -torch.inf, torch.inf).to(torch.float16))
    lo_f, hi_f = toward_zero.float(), away.float()
    span = (hi_f - lo_f).abs()
    below = torch.nextafter(toward_zero, torch.zeros_like(toward_zero)).float()
    span = torch.where(torch.isinf(hi_f), (lo_f - below).abs(), span)
    frac = (value - lo_f).abs() / span
    out = torch.where(random_bits.float() / 65536.0 < frac, away, toward_zero)
    return torch.where(torch.isfinite(value), out, value.to(torch.float16))


def _fp16_rounding_cases():
    g = torch.Generator().manual_seed(0)
    every = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    wide = torch.randn(100_000, generator=g) * torch.pow(10.0, torch.randint(-9, 6, (100_000,), generator=g).float())
    edges = torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 7e4, -1e6, 6e-8, -6e-8, 2.9e-8, -2.9e-8, 1e-9])
    values = torch.cat([every, every * (1 + 2**-12), -every * (1 - 2**-13), wide, edges])
    values = values[torch.isfinite(values)]  # (NaN and inf are passed through: tested above)
    return values, torch.randint(0, 65536, values.shape, generator=g, dtype=torch.int32)


def test_fp16_stochastic_rounding_on_bit_patterns_equals_the_nextafter_form():
    """The format finds an fp16 value's neighbours on its bit patterns; on every fp16 value, values just
    off them, 100,000 values over 15 decades and the edges it gives the nextafter form's bits."""
    values, r = _fp16_rounding_cases()
    want = _nextafter_fp16_rounding(values, r)
    got = _stochastic_round_generic(values, torch.float16, lambda like: r)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.slow
def test_fp16_stochastic_rounding_compiles_to_the_same_bits():
    """Under torch.compile (the compiled path: the CUDA default for large groups). The nextafter form
    compiled by Inductor never rounded away from zero; here the mean of 65,536 roundings of 1 + 0.3 ulp
    must be that value."""
    compiled = torch.compile(lambda v, r: _stochastic_round_generic(v, torch.float16, lambda like: r),
                             options={"emulate_precision_casts": True})  # fmt: skip
    values, r = _fp16_rounding_cases()
    want = _stochastic_round_generic(values, torch.float16, lambda like: r)
    assert torch.equal(compiled(values, r).view(torch.int16), want.view(torch.int16))
    v = torch.full((65536,), 1.0 + 0.3 * 2**-10)
    mean = compiled(v, torch.arange(65536, dtype=torch.int32)).double().mean().item()
    assert mean == pytest.approx(v[0].item(), abs=2**-10 * 2**-16)
