"""master="exact" with bf16 params reproduces fp32-master training bit for bit.

The reference is the standard mixed-precision recipe: fp32 master weights updated by torch.optim
from the same bf16 gradients, with the model computing with bf16(master rounded to nearest).
kernel="reference" (the eager executor) matches torch.optim's single-tensor path (foreach=False);
kernel="auto" (the native CPU kernels) matches torch.optim's fused=True path (the two torch paths
differ in the last bit of Adam's sqrt, torch's eager sqrt being MKL's). The exact split rounds ties
away from zero (see docs/core.md), so the reference rounds its master the same way, written here
independently of the library.
"""

import copy

import pytest
import torch
from torch import nn

import leanopt
from leanopt.kernels import native
from leanopt.models import Block, GPTConfig

KERNELS = ["reference", "auto"]


def torch_impl(kernel, lean_cls):
    """The torch.optim implementation a leanopt executor reproduces bit for bit (see module doc)."""
    if kernel == "auto" and lean_cls in (leanopt.Adam, leanopt.AdamW):
        return {"fused": True}
    return {"foreach": False}


#: elements per SIMD vector of torch's CPU kernels. torch's fused Adam updates the last numel % width
#: elements of a tensor in a scalar loop whose compiled code rounds differently in the last bit, so
#: the native kernel is compared with it on the other elements (the vector body) only.
SIMD_WIDTH = {"AVX512": 16, "AVX2": 8}.get(torch.backends.cpu.get_cpu_capability())


def compared(kernel, lean_cls, t):
    """Mask of the elements the bit comparison covers (see SIMD_WIDTH), or None for all of them."""
    if torch_impl(kernel, lean_cls) != {"fused": True}:
        return None
    if SIMD_WIDTH is None:
        pytest.skip("torch's fused AdamW has no vector path on this CPU")
    n = t.numel()
    return (torch.arange(n) < n - n % SIMD_WIDTH).reshape(t.shape)


def native_calls():
    return sum(k.calls for k in native.compile_stats())


STEPS = 100


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster and immune to a busy machine's thread contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def round_half_away_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16, round to nearest, ties away from zero: torch's RNE with exact ties moved."""
    rne = x.to(torch.bfloat16)
    tie = ((x.view(torch.int32) & 0xFFFF) == 0x8000) & torch.isfinite(x)
    toward_zero = rne.float().abs() < x.abs()
    away = (x + (x - rne.float())).to(torch.bfloat16)  # the other neighbour, exact in fp32
    return torch.where(tie & toward_zero, away, rne)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.element_size() == 4 else t.view(torch.int16)


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str, mask: torch.Tensor | None = None) -> None:
    assert a.dtype == b.dtype, f"{what}: {a.dtype} vs {b.dtype}"
    if mask is not None:
        assert int(mask.sum()) > 0 or a.numel() < 16, what
        a, b = a[mask], b[mask]
    if not torch.equal(bits(a), bits(b)):
        n = int((bits(a) != bits(b)).sum())
        raise AssertionError(f"{what}: {n} of {a.numel()} elements differ in their bits")


def make_mlp() -> tuple[nn.Module, callable]:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(12, 48), nn.GELU(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 3))
    x = torch.randn(32, 12)
    y = torch.randn(32, 3)

    def loss_fn(model, step):
        xb = x.roll(step, 0).bfloat16()
        return ((model(xb).float() - y) ** 2).mean()

    return net, loss_fn


def make_block() -> tuple[nn.Module, callable]:
    torch.manual_seed(2)
    cfg = GPTConfig(n_embd=32, n_head=4, block_size=16)
    net = Block(cfg)
    x = torch.randn(4, 16, 32)
    target = torch.randn(4, 16, 32)

    def loss_fn(model, step):
        xb = (x * (1 + 0.01 * step)).bfloat16()
        return ((model(xb).float() - target) ** 2).mean()

    return net, loss_fn


NETWORKS = {"mlp": make_mlp, "block": make_block}

# (leanopt class, torch class, hyper-parameters); lrs chosen so many updates are below half a bf16 ULP.
CASES = {
    "sgd_momentum": (leanopt.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "sgd_nesterov": (leanopt.SGD, torch.optim.SGD, dict(lr=0.02, momentum=0.9, nesterov=True)),
    "sgd_dampening": (leanopt.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.5, dampening=0.3)),
    "adam": (leanopt.Adam, torch.optim.Adam, dict(lr=3e-4, weight_decay=1e-2)),
    "adam_amsgrad": (leanopt.Adam, torch.optim.Adam, dict(lr=1e-4, amsgrad=True)),
    "adamw": (leanopt.AdamW, torch.optim.AdamW, dict(lr=1e-4, betas=(0.8, 0.99), weight_decay=0.1)),
}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("net_name", list(NETWORKS))
@pytest.mark.parametrize("case", list(CASES))
def test_exact_bf16_matches_fp32_master_recipe_bit_for_bit(net_name, case, kernel):
    lean_cls, torch_cls, hyper = CASES[case]
    net, loss_fn = NETWORKS[net_name]()
    model = copy.deepcopy(net).bfloat16()
    params = list(model.parameters())
    opt = lean_cls(params, master="exact", kernel=kernel, **hyper)
    # Reference: fp32 masters (starting from the bf16 weights), updated by torch.optim.
    masters = [p.detach().float().clone().requires_grad_(True) for p in params]
    ref = torch_cls(masters, **torch_impl(kernel, lean_cls), **hyper)
    calls = native_calls()
    small_updates = 0
    for step in range(STEPS):
        for p, m in zip(params, masters, strict=True):  # the model computes with bf16(round-to-nearest(master))
            assert_bits_equal(p.detach(), round_half_away_bf16(m.detach()), f"step {step} weight",
                              compared(kernel, lean_cls, p))  # fmt: skip
        loss = loss_fn(model, step)
        loss.backward()
        before = [p.detach().clone() for p in params]
        for p, m in zip(params, masters, strict=True):
            m.grad = p.grad.float()  # the same bf16 gradients
        opt.step()
        ref.step()
        opt.zero_grad()
        small_updates += sum(
            int(((p.detach() == b) & (m.grad != 0)).sum()) for p, b, m in zip(params, before, masters, strict=True)
        )
    for i, (p, m) in enumerate(zip(params, masters, strict=True)):
        mask = compared(kernel, lean_cls, p)
        assert_bits_equal(opt.master_value(p), m.detach(), f"param {i} master", mask)
        assert_bits_equal(p.detach(), round_half_away_bf16(m.detach()), f"param {i} weight", mask)
        lean_state, ref_state = opt.state[p], ref.state[m]
        for key, value in ref_state.items():
            assert_bits_equal(lean_state[key], value, f"param {i} state {key}", None if key == "step" else mask)
    # The run exercised the low bits: many updates left the bf16 weight unchanged.
    assert small_updates > 0
    # and the executor under test ran (every tensor, every step, for the native kernels)
    assert native_calls() - calls == (STEPS * len(params) if kernel == "auto" else 0)


def lion_reference_step(param, grad, exp_avg, lr, betas, weight_decay):
    """Lion (Chen et al. 2023, Algorithm 2) with decoupled weight decay, plainly in fp32.

    The interpolations use torch's fused ``add(..., alpha=)`` form, as the Lion authors' PyTorch
    code does; ``a + alpha * b`` written as two ops rounds differently in the last bit.
    """
    beta1, beta2 = betas
    update = exp_avg.clone().mul_(beta1).add(grad, alpha=1 - beta1).sign_()
    param.mul_(1 - lr * weight_decay)
    param.add_(update, alpha=-lr)
    exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)


@pytest.mark.parametrize("net_name", list(NETWORKS))
def test_lion_exact_matches_plain_reference_bit_for_bit(net_name):
    hyper = dict(lr=3e-5, betas=(0.9, 0.99), weight_decay=0.1)
    net, loss_fn = NETWORKS[net_name]()
    model = copy.deepcopy(net).bfloat16()
    params = list(model.parameters())
    opt = leanopt.Lion(params, master="exact", **hyper)
    masters = [p.detach().float().clone() for p in params]
    avgs = [torch.zeros_like(m) for m in masters]
    for step in range(STEPS):
        loss_fn(model, step).backward()
        for p, m, a in zip(params, masters, avgs, strict=True):
            lion_reference_step(m, p.grad.float(), a, **hyper)
        opt.step()
        opt.zero_grad()
        for i, (p, m) in enumerate(zip(params, masters, strict=True)):
            assert_bits_equal(p.detach(), round_half_away_bf16(m), f"step {step} param {i} weight")
    for i, (p, m, a) in enumerate(zip(params, masters, avgs, strict=True)):
        assert_bits_equal(opt.master_value(p), m, f"param {i} master")
        assert_bits_equal(opt.state[p]["exp_avg"], a, f"param {i} exp_avg")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", ["sgd_momentum", "sgd_nesterov", "adam", "adam_amsgrad", "adamw"])
def test_fp32_params_are_bit_identical_to_torch_optim(case, kernel):
    lean_cls, torch_cls, hyper = CASES[case]
    net, loss_fn = make_block()
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    opt = lean_cls(a.parameters(), kernel=kernel, **hyper)
    ref = torch_cls(b.parameters(), **torch_impl(kernel, lean_cls), **hyper)
    for step in range(30):
        for model, o in ((a, opt), (b, ref)):
            x = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(step))
            (model(x) ** 2).mean().backward()
            o.step()
            o.zero_grad()
    for i, (p, q) in enumerate(zip(a.parameters(), b.parameters(), strict=True)):
        assert p.dtype == torch.float32
        mask = compared(kernel, lean_cls, p)
        assert_bits_equal(p.detach(), q.detach(), f"param {i}", mask)
        for key, value in ref.state[q].items():
            assert_bits_equal(opt.state[p][key], value, f"param {i} state {key}", None if key == "step" else mask)
    assert "remainder" not in opt.state[next(a.parameters())]  # fp32 params need no extra bits
