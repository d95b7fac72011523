"""Stochastic rounding's random bits (formats/noise.py): one definition, computed by torch ops (reference,
compiled path), in C by the native and CUDA kernels (scalar and AVX-512), in plain Python here; each
element's bits depend on (seed, parameter index, step) and its index in the whole tensor only."""

from __future__ import annotations

import math

import pytest
import torch

import leanopt
from leanopt.formats import noise
from leanopt.kernels import gpu, native
from leanopt.kernels.fused import dispatch_step

needs_cc = pytest.mark.skipif(native.disabled_reason() is not None or native.compiler() is None,
                              reason="no C compiler")  # fmt: skip


def bits_scalar(k: int, i: int) -> int:
    """One element's bits in plain Python: the definition, written a third way."""
    M = noise.MASK32

    def mix(x: int) -> int:
        x ^= x >> 16
        x = (x * noise.M1) & M
        x ^= x >> 15
        x = (x * noise.M2) & M
        return x ^ (x >> 16)

    return mix(mix((i & M) ^ (k & M)) ^ (i >> 32) ^ (k >> 32)) >> 16


@pytest.mark.parametrize("base", [0, 1000, (1 << 32) - 37, (1 << 33) + 5, (1 << 40) - 3])
@pytest.mark.parametrize("k", [noise.key(0, 0, 1), noise.key(7, 3, 5), 0xFFFF_FFFF_FFFF_FFFF])
def test_torch_bits_follow_the_definition(base, k):
    """The torch form (int64 arithmetic split so that no product overflows) against plain Python,
    with keys whose high bits are set and indices below, across and above 2**32."""
    got = noise.bits(k, base, (7, 11))
    assert got.dtype == torch.int32 and got.shape == (7, 11)
    assert got.flatten().tolist() == [bits_scalar(k, base + j) for j in range(77)]
    assert 0 <= int(got.min()) and int(got.max()) < 65536


def test_keys_differ_by_seed_index_and_step():
    keys = {noise.key(s, i, t) for s in (0, 1, 2**40) for i in range(4) for t in range(1, 5)}
    assert len(keys) == 3 * 4 * 4
    assert all(0 <= k < 2**64 for k in keys)


def test_bits_are_uniform_and_independent():
    """2**20 draws: the 256 high-byte buckets pass a chi-square test (p > 1e-4 for 255 degrees of freedom:
    below 347.9), every one of the 16 bits is set about half the time, and neighbouring elements, the
    same element at consecutive steps and in the next parameter are uncorrelated."""
    n = 1 << 20
    a = noise.bits(noise.key(3, 0, 1), 0, (n,))
    counts = torch.bincount((a >> 8).long(), minlength=256).double()
    chi2 = ((counts - n / 256) ** 2 / (n / 256)).sum().item()
    assert chi2 < 347.9, chi2
    for b in range(16):
        share = ((a >> b) & 1).double().mean().item()
        assert abs(share - 0.5) < 5 / math.sqrt(n), (b, share)
    u = (a.double() + 0.5) / 65536 - 0.5
    others = {
        "neighbour": torch.roll(u, 1),
        "next step": (noise.bits(noise.key(3, 0, 2), 0, (n,)).double() + 0.5) / 65536 - 0.5,
        "next parameter": (noise.bits(noise.key(3, 1, 1), 0, (n,)).double() + 0.5) / 65536 - 0.5,
        "next seed": (noise.bits(noise.key(4, 0, 1), 0, (n,)).double() + 0.5) / 65536 - 0.5,
    }
    for name, v in others.items():
        corr = ((u * v).mean() / (u.std() * v.std())).item()
        assert abs(corr) < 5 / math.sqrt(n), (name, corr)


class _Noise:
    """A stand-in for the optimizer's UpdateNoise with a chosen base index: what a shard far into a
    huge tensor computes."""

    def __init__(self, state, base):
        self.state, self._base = state, base

    def key_at(self, step):
        return noise.key(11, 2, int(step))

    def base(self, like):
        return self._base

    def __call__(self, like):
        return noise.bits(self.key_at(float(self.state["step"])), self._base, like.shape, like.device)


def _update(kernel, dtype, states, base, shape=(5, 96)):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape).to(dtype))
    opt = leanopt.AdamW([p], lr=1e-2, master="stochastic", states=states, kernel=kernel)
    group = opt.param_groups[0]
    for s in range(3):
        p.grad = (torch.randn(shape, generator=torch.Generator().manual_seed(s)) * 0.1).to(dtype)
        state = opt.state_for(p, group)
        wfmt, sfmt = opt.formats(p, group)
        used = dispatch_step(kernel, opt.rule, wfmt, sfmt, p, p.grad, state, group, _Noise(state, base))
    return p.detach().clone(), used


@needs_cc
@pytest.mark.parametrize("base", [0, (1 << 32) - 100, (1 << 32) + 3], ids=["0", "across 2**32", "above 2**32"])
@pytest.mark.parametrize("states", ["fp32", "int8"], ids=["flat", "grouped (AVX-512 noise)"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernels_compute_the_reference_bits_at_any_base(dtype, states, base, monkeypatch):
    """The native kernels (scalar, auto-vectorised and AVX-512 noise; 16 lanes that cross a multiple of
    2**32 included) and the CUDA kernels' code compiled as C give the eager reference's weights."""
    ref, used = _update("reference", dtype, states, base)
    assert used == "reference"
    got, used = _update("auto", dtype, states, base)
    assert used == "native"
    assert torch.equal(got.view(torch.int16), ref.view(torch.int16))
    monkeypatch.setattr(gpu, "EMULATE", True)
    monkeypatch.delenv("LEANOPT_GPU_KERNELS", raising=False)
    gpu.reset()
    try:
        got, used = _update("fused", dtype, states, base)
    finally:
        gpu.reset()
    assert used == "gpu"
    assert torch.equal(got.view(torch.int16), ref.view(torch.int16))


@needs_cc
def test_stochastic_updates_hold_no_noise_tensor(monkeypatch):
    """The native kernels compute the bits in registers: no tensor of them is ever made (the eager
    reference does make one, per block of rows)."""
    calls = []
    real = noise.bits

    def spy(k, base, shape, device="cpu"):
        calls.append(tuple(shape))
        return real(k, base, shape, device)

    monkeypatch.setattr(noise, "bits", spy)
    p = torch.nn.Parameter(torch.randn(64, 64).bfloat16())
    opt = leanopt.AdamW([p], lr=1e-2, master="stochastic", states="int8")
    for _ in range(2):
        p.grad = torch.randn(64, 64).bfloat16()
        opt.step()
    assert calls == []
    opt.kernel = "reference"
    p.grad = torch.randn(64, 64).bfloat16()
    opt.step()
    assert calls == [(64, 64)]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_compiled_path_computes_the_bits_in_its_kernel_without_recompiling(dtype):
    """kernel="fused" through torch.compile (the CUDA default for groups of 2**20 elements; here
    Inductor's C++): the key and base go in as a tensor and the bits are computed inside the compiled
    kernel, the reference's bits at a base across 2**32, and a new key each step compiles nothing.
    (SGD: bit-identical on this path; Adam's master is within 1 ULP there, docs/kernels.md.)"""
    from torch._dynamo.utils import counters

    from leanopt.kernels import fused

    base = (1 << 32) - 1000
    out = {}
    for path in ("reference", "compiled"):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(37, 70).to(dtype))
        opt = leanopt.SGD([p], lr=1e-2, momentum=0.9, master="stochastic")
        group = opt.param_groups[0]
        for s in range(4):
            p.grad = torch.randn(37, 70, generator=torch.Generator().manual_seed(s)).to(dtype)
            state = opt.state_for(p, group)
            wfmt, sfmt = opt.formats(p, group)
            if path == "reference":
                dispatch_step("reference", opt.rule, wfmt, sfmt, p, p.grad, state, group, _Noise(state, base))
                continue
            assert fused.fused_step(opt.rule, wfmt, sfmt, p, p.grad, state, group, _Noise(state, base))
            if s == 1:
                graphs = counters["stats"]["unique_graphs"]
        out[path] = p.detach().view(torch.int16).clone()
    assert counters["stats"]["unique_graphs"] == graphs  # steps 3 and 4 compiled nothing
    assert torch.equal(out["compiled"], out["reference"])
