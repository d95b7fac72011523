"""torch.amp.GradScaler drives a leanopt optimizer as it drives torch.optim's fused AdamW: it hands over
its scale and inf flag (``grad_scale``, ``found_inf``) and the optimizer unscales in fp32 or skips the
step. fp16 models need it (torch refuses to unscale fp16 gradients in place)."""

from __future__ import annotations

import pytest
import torch

import leanopt


def _model(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(dtype)


def _batch(i):
    gen = torch.Generator().manual_seed(i)
    return torch.randn(8, 16, generator=gen)


@pytest.mark.parametrize("kernel", ["auto", "reference"])
def test_bf16_exact_master_moves_by_the_gradient_divided_by_the_scale_in_fp32(kernel):
    """SGD without momentum on exact master weights: after each scaled step the fp32 master equals
    master - lr * (scaled gradient in fp32 / scale), computed by torch in fp32."""
    model = _model(torch.bfloat16)
    lr = 0.5
    opt = leanopt.SGD(model.parameters(), lr=lr, kernel=kernel)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    for i in range(3):
        before = [opt.master_value(p) for p in model.parameters()]
        scaler.scale(model(_batch(i).bfloat16()).float().pow(2).mean() * 1e-6).backward()
        scale = scaler.get_scale()
        scaled = [p.grad.clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        for p, w, g in zip(model.parameters(), before, scaled, strict=True):
            expected = w.add(g.to(torch.float32) / scale, alpha=-lr)
            assert torch.equal(opt.master_value(p).view(torch.int32), expected.view(torch.int32))
        assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")  # GradScaler removes them


@pytest.mark.parametrize("kernel", ["auto", "reference"])
def test_fp16_steps_equal_steps_on_the_fp32_unscaled_gradient(kernel):
    """fp16 weights (master="kahan", the fp16 default) with AdamW: each scaled step gives the bits of a
    step on (scaled fp16 gradient in fp32) / scale, which keeps gradients an fp16 unscale would flush
    to zero (there are such here)."""
    model, twin = _model(torch.float16), _model(torch.float16)
    opt = leanopt.AdamW(model.parameters(), lr=1e-3, kernel=kernel)
    opt_twin = leanopt.AdamW(twin.parameters(), lr=1e-3, kernel=kernel)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    flushed = 0
    for i in range(3):
        scaler.scale(model(_batch(i).half()).float().pow(2).mean() * 1e-6).backward()
        scale = scaler.get_scale()
        unscaled = [p.grad.to(torch.float32) / scale for p in model.parameters()]
        flushed += sum(int(((g.half() == 0) & (g != 0)).sum()) for g in unscaled)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        for p, g in zip(twin.parameters(), unscaled, strict=True):
            assert opt_twin.update_param(p, opt_twin.param_groups[0], g)
    assert flushed > 0
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
        for k, v in opt.state[a].items():
            assert torch.equal(v, opt_twin.state[b][k]), k


def test_an_inf_anywhere_skips_the_whole_step_and_the_scale_drops():
    model = _model(torch.float16)
    opt = leanopt.AdamW(model.parameters(), lr=1e-3, nonfinite="raise")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for i in range(2):
        scaler.scale(model(_batch(i).half()).float().pow(2).mean()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    weights = [p.detach().clone() for p in model.parameters()]
    states = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    scaler.scale(model(_batch(9).half()).float().pow(2).mean()).backward()
    model[2].bias.grad[1] = float("inf")
    scaler.step(opt)  # no FloatingPointError: GradScaler's inf flag means "skip", not bad input
    scaler.update()
    assert scaler.get_scale() == 512.0
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    assert all(torch.equal(opt.state[model[0].weight][k], v) for k, v in states.items())
    assert int(opt.state[model[0].weight]["step"]) == 2 and opt.nonfinite_skipped == 0


def test_unscale_then_clip_then_step_with_bf16():
    """The documented GradScaler recipe with clipping (bf16 gradients may be unscaled in place; fp16
    ones cannot, by torch's rule): step then sees no scale and updates from the unscaled gradients."""
    model = _model(torch.bfloat16)
    twin = _model(torch.bfloat16)
    opt = leanopt.AdamW(model.parameters(), lr=1e-2)
    opt_twin = leanopt.AdamW(twin.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    for i in range(3):
        scaler.scale(model(_batch(i).bfloat16()).float().pow(2).mean()).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        unscaled = [p.grad.clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        for p, g in zip(twin.parameters(), unscaled, strict=True):
            p.grad = g
        opt_twin.step()
        opt_twin.zero_grad()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("unscale_first", [False, True])
def test_gradient_release_still_refuses_a_grad_scaler(unscale_first):
    model = _model(torch.bfloat16)
    opt = leanopt.AdamW(model.parameters(), lr=1e-3)
    leanopt.release_gradients(opt)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(_batch(0).bfloat16()).float().pow(2).mean()).backward()
    if unscale_first:  # the scaler then hands over no scale, only its inf flag
        scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="GradScaler"):
        scaler.step(opt)


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_a_scaled_step_does_not_check_the_gradients_again(nonfinite, monkeypatch):
    """GradScaler has just checked every gradient (found_inf is 0): leanopt's own NaN/inf check, a wait
    per tensor on CUDA, is not repeated."""
    from leanopt import distributed

    model = _model(torch.float16)
    opt = leanopt.AdamW(model.parameters(), lr=1e-3, nonfinite=nonfinite)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(_batch(0).half()).float().pow(2).mean()).backward()
    calls = []
    real = distributed.all_finite
    monkeypatch.setattr(distributed, "all_finite", lambda t: (calls.append(1), real(t))[1])
    scaler.step(opt)
    assert not calls and int(opt.state[model[0].weight]["step"]) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel", ["auto", "fused"])
def test_cuda_fp16_steps_equal_steps_on_the_fp32_unscaled_gradient(kernel):
    """On a GPU, both CUDA executors: GradScaler("cuda") steps give the bits of steps on the fp32 unscaled
    gradient, and an inf skips the step."""
    model, twin = _model(torch.float16).cuda(), _model(torch.float16).cuda()
    opt = leanopt.AdamW(model.parameters(), lr=1e-3, kernel=kernel)
    opt_twin = leanopt.AdamW(twin.parameters(), lr=1e-3, kernel=kernel)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16)
    for i in range(3):
        scaler.scale(model(_batch(i).half().cuda()).float().pow(2).mean()).backward()
        if i == 2:
            model[0].bias.grad[0] = float("inf")
        unscaled = [p.grad.to(torch.float32) / scaler.get_scale() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if i < 2:
            for p, g in zip(twin.parameters(), unscaled, strict=True):
                assert opt_twin.update_param(p, opt_twin.param_groups[0], g)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_fp32_parameters_keep_their_scaled_gradients():
    """As torch's fused AdamW: the optimizer unscales a copy, .grad is left as the scaler made it."""
    model = _model(torch.float32)
    twin = _model(torch.float32)
    opt = leanopt.AdamW(model.parameters(), lr=1e-2)
    opt_twin = leanopt.AdamW(twin.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    scaler.scale(model(_batch(0)).pow(2).mean()).backward()
    scaled = [p.grad.clone() for p in model.parameters()]
    scaler.step(opt)
    for p, g in zip(model.parameters(), scaled, strict=True):
        assert torch.equal(p.grad, g)
    for p, g in zip(twin.parameters(), scaled, strict=True):
        p.grad = g / 64.0
    opt_twin.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
