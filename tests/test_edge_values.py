"""Random configurations at the edges of the number formats: every executor writes the same bytes.

Each case draws (seeded) a rule and its hyper-parameters (zero and huge learning rates, betas of 0 and
almost 1, tiny and large eps, momentum 1), a weight format, a state format, a shape with full and
partial groups, and weights and gradients mixing ordinary values of one scale with +-0, fp32
subnormals, values near the fp32 maximum (inf in fp16), huge and tiny magnitudes, and (in some
cases) NaN and +-inf, let through with ``nonfinite="ignore"``. Three steps each. Then bit for bit:

- the native kernels (AVX-512 where the CPU has it) against the same kernels built as portable C;
- the native kernels against the CUDA kernels' source run on the CPU (``gpu.EMULATE``);
- for SGD and Lion, whose kernels claim bit-identity with the reference, against the reference.

Every byte must match, with one exception: a NaN must be a NaN in the same place, but its sign and
payload may differ (x86 passes on the first NaN operand, and each executor orders operands its own
way; torch's CPU code writes 0xFFFF for every bf16 NaN and 0x7FFFFFFF from some of its fp32 kernels,
the kernels' bf16 conversion 0x7FC0). Integer tensors (remainders, residuals, codes) match exactly.
"""

from __future__ import annotations

import random

import pytest
import torch

import leanopt
from leanopt.kernels import gpu, native

_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32}
SHAPES = [(1,), (31,), (32,), (33,), (3, 64), (5, 65), (2, 127), (3, 129), (2, 3, 40), (6, 5, 3, 3), (16, 200)]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(_INT[t.element_size()])


def edge_values(shape, g: torch.Generator, dtype: torch.dtype, non_finite: bool, scale: float) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    base = torch.randn(n, generator=g, dtype=torch.float64)
    kind = torch.randint(0, 100, (n,), generator=g)
    wide = base * torch.pow(10.0, torch.randint(-45, 38, (n,), generator=g).double())
    x = torch.where(kind < 70, base * scale, wide)
    specials = {70: 0.0, 71: -0.0, 72: 1e-40, 73: 3.3e38, 74: 9.2e-41}
    if non_finite:
        specials.update({75: float("inf"), 76: float("nan")})
    for k, v in specials.items():
        x = torch.where(kind == k, torch.full_like(x, v) * (1 if k in (71, 76) else base.sign()), x)
    return x.float().to(dtype).reshape(shape)


def draw(rng: random.Random):
    rule = rng.choice(["adamw", "adam", "sgd", "lion"])
    hyper = dict(lr=rng.choice([0.0, 1e-8, 1e-3, 1e-1, 10.0, 1e30]), weight_decay=rng.choice([0.0, 0.01, 0.5]))
    if rule in ("adamw", "adam"):
        cls = leanopt.AdamW if rule == "adamw" else leanopt.Adam
        betas = (rng.choice([0.0, 0.5, 0.9, 0.999999]), rng.choice([0.0, 0.9, 0.999, 0.9999999]))
        hyper.update(betas=betas, eps=rng.choice([1e-30, 1e-8, 1.0]), amsgrad=rng.random() < 0.3)
        hyper.update(maximize=rng.random() < 0.2)
    elif rule == "sgd":
        cls, momentum = leanopt.SGD, rng.choice([0.0, 0.9, 1.0])
        nesterov = momentum > 0 and rng.random() < 0.5
        hyper.update(momentum=momentum, nesterov=nesterov, dampening=0.0 if nesterov else rng.choice([0.0, 0.3]),
                     maximize=rng.random() < 0.2)  # fmt: skip
    else:
        cls = leanopt.Lion
        hyper.update(betas=(rng.choice([0.0, 0.9, 0.99]), rng.choice([0.0, 0.99, 0.999])))
    masters = ["exact", "compact", "none", "kahan", "stochastic"] + (["auto"] if cls is not leanopt.Lion else [])
    master = rng.choice(masters)
    if master == "auto":
        dtype = torch.float32
    elif master == "exact":
        dtype = torch.bfloat16
    else:
        dtype = rng.choice([torch.bfloat16, torch.bfloat16, torch.float16])
    return cls, hyper, master, rng.choice(["fp32", "bf16", "int8", "int4"]), rng.choice(SHAPES), dtype


def train(kernel: str, case, seed: int) -> dict[str, torch.Tensor]:
    """Three steps of ``case`` with ``kernel`` (see :func:`_run`)."""
    return _run(case, seed, kernel=kernel)


def assert_same(a: dict, b: dict, what: str) -> None:
    """Every byte the same, except that a NaN may have other sign and payload bits than the other's NaN."""
    assert a.keys() == b.keys(), what
    for key in a:
        x, y = a[key], b[key]
        assert x.shape == y.shape and x.dtype == y.dtype, f"{what} {key}"
        differ = bits(x) != bits(y)
        if x.is_floating_point():
            nan_x, nan_y = torch.isnan(x), torch.isnan(y)
            assert torch.equal(nan_x, nan_y), f"{what} {key}: NaN in different places"
            differ &= ~nan_x
        diff = int(differ.sum())
        assert diff == 0, f"{what} {key}: {diff} of {x.numel()} elements differ"


CASES = 40


@pytest.mark.slow
def test_random_edge_values_give_the_same_bytes_on_every_executor(tmp_path, monkeypatch):
    if native.compiler() is None:
        pytest.skip("needs a C compiler")
    monkeypatch.setenv("LEANOPT_CACHE_DIR", str(tmp_path))
    rng = random.Random(2026)
    cases = [draw(rng) for _ in range(CASES)]
    runs: dict[tuple[str, int], dict] = {}
    for flags in ("", "-DLO_NO_VECTOR"):
        monkeypatch.setenv("LEANOPT_CFLAGS", flags)
        native.reset()
        calls = sum(k.calls for k in native.compile_stats())
        for i, case in enumerate(cases):
            runs[flags, i] = train("auto", case, i)
        assert sum(k.calls for k in native.compile_stats()) - calls >= 3 * CASES  # the native kernels ran
    monkeypatch.delenv("LEANOPT_CFLAGS")
    native.reset()
    monkeypatch.setattr(gpu, "EMULATE", True)
    monkeypatch.delenv("LEANOPT_GPU_KERNELS", raising=False)
    gpu.reset()
    try:
        for i, case in enumerate(cases):
            runs["cuda", i] = train("fused", case, i)
        assert sum(k.launches for k in gpu.compile_stats()) >= 3 * CASES  # the CUDA kernels' path ran
    finally:
        gpu.reset()
    monkeypatch.setattr(gpu, "EMULATE", False)
    exact_rules = 0
    for i, case in enumerate(cases):
        what = f"case {i}: {case[0].__name__} {case[1:]}"
        assert_same(runs["", i], runs["-DLO_NO_VECTOR", i], f"{what}, portable C")
        assert_same(runs["", i], runs["cuda", i], f"{what}, CUDA kernels (emulated)")
        if case[0] in (leanopt.SGD, leanopt.Lion):
            assert_same(runs["", i], train("reference", case, i), f"{what}, reference")
            exact_rules += 1
    assert exact_rules >= 10


def _run(
    case, seed: int, kernel: str = "auto", resume_at: int | None = None, release: bool = False
) -> dict[str, torch.Tensor]:
    """``case``'s weight trained for three steps on edge values drawn from ``seed``, optionally resumed
    from a saved checkpoint after ``resume_at`` steps (a new parameter and optimizer,
    ``torch.save``/``torch.load``), or with gradient release (the gradients come out of backward:
    ``d sum(p * c) / dp = c``)."""
    import io

    cls, hyper, master, states, shape, dtype = case
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 ** [-30, -8, -3, 0, 2, 10, 30][seed % 7]
    weight = edge_values(shape, g, dtype, seed % 3 == 0, scale)
    grads = [edge_values(shape, g, dtype, seed % 2 == 0, scale) for _ in range(3)]
    p = torch.nn.Parameter(weight)
    opt = cls([p], master=master, states=states, kernel=kernel, nonfinite="ignore", **hyper)
    handle = leanopt.release_gradients(opt) if release else None
    for i, grad in enumerate(grads):
        if i == resume_at:
            buf = io.BytesIO()
            torch.save({"weight": p.detach(), "optimizer": opt.state_dict()}, buf)
            buf.seek(0)
            saved = torch.load(buf, weights_only=True)
            p = torch.nn.Parameter(saved["weight"])
            opt = cls([p], master=master, states=states, kernel=kernel, nonfinite="ignore", **hyper)
            opt.load_state_dict(saved["optimizer"])
        if release:
            (p * grad).sum().backward()
        else:
            p.grad = grad
        opt.step()
    if handle is not None:
        handle.remove()
    state = {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
    return {"param": p.detach().clone(), **state}


@pytest.mark.slow
def test_resume_and_release_at_the_edges_give_the_same_bytes():
    """The same random edge cases: resuming from a checkpoint after the first step keeps every byte,
    NaN payloads included; gradient release gives the same bytes as a plain step (NaN sign and payload
    aside: autograd's bf16 product writes its own NaN bits into the gradient)."""
    rng = random.Random(7)
    cases = [draw(rng) for _ in range(24)]
    for i, case in enumerate(cases):
        what = f"case {i}: {case[0].__name__} {case[1:]}"
        plain = _run(case, i)
        resumed = _run(case, i, resume_at=1)
        assert plain.keys() == resumed.keys(), what
        for key in plain:
            assert torch.equal(bits(plain[key]), bits(resumed[key])), f"{what}, resumed: {key}"
        assert_same(plain, _run(case, i, release=True), f"{what}, released")


@pytest.mark.slow
def test_channels_last_conv_weights_at_the_edges_give_a_contiguous_weights_bytes():
    """Random edge cases on conv weights stored channels_last (the row-transposing kernels of grouped
    int8/int4 states, the flat kernels' memory-order walk otherwise, the reference for stochastic
    rounding with flat states): every byte of a contiguous twin, NaN sign and payload aside (where the
    two take different executors)."""
    rng = random.Random(11)
    shapes = [(6, 5, 3, 3), (4, 40, 3, 3), (3, 33, 1, 3), (2, 3, 7, 7), (2, 64, 2, 2)]
    checked = 0
    for i in range(24):
        cls, hyper, master, states, _, dtype = draw(rng)
        shape = rng.choice(shapes)
        if i % 2 == 0:  # every other case with grouped states
            states = ("int8", "int4")[i // 2 % 2]
        g = torch.Generator().manual_seed(i)
        scale = 10.0 ** [-30, -8, -3, 0, 2, 10, 30][i % 7]
        weight = edge_values(shape, g, dtype, i % 3 == 0, scale)
        grads = [edge_values(shape, g, dtype, i % 2 == 0, scale) for _ in range(3)]
        out = []
        for layout in (torch.contiguous_format, torch.channels_last):
            p = torch.nn.Parameter(weight.clone().to(memory_format=layout))
            opt = cls([p], master=master, states=states, nonfinite="ignore", **hyper)
            for grad in grads:
                p.grad = grad.clone().to(memory_format=layout)
                opt.step()
            state = {k: v.contiguous() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
            out.append({"param": p.detach().contiguous(), **state})
        assert_same(out[0], out[1], f"case {i}: {cls.__name__} {hyper} {master} {states} {shape} {dtype}")
        checked += states in ("int8", "int4")
    assert checked >= 12
