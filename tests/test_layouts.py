"""Parameters in dense non-contiguous layouts (channels_last conv weights, a transposed matrix): the
elementwise native kernels (and the CUDA kernels' path, emulated) walk them in memory order when the
gradient and every state tensor share the parameter's strides, with the bits of the same parameter
stored contiguously; int8/int4 states grouped in logical order (a conv weight's rows) run the kernels
on contiguous copies, with the same bits; anything else (drawn noise, a gradient in another layout, a
layout that is not dense) keeps to the other executors, with their bits."""

from __future__ import annotations

import math

import pytest
import torch

import leanopt
from leanopt.formats.quantized import rows_shape
from leanopt.kernels import fused, gpu, native

pytestmark = pytest.mark.skipif(native.compiler() is None, reason="needs a C compiler")

MODES = {
    "adamw exact/fp32": lambda ps, **kw: leanopt.AdamW(ps, lr=1e-2, weight_decay=0.1, **kw),
    "adamw compact/int8": lambda ps, **kw: leanopt.AdamW(ps, lr=1e-2, master="compact", states="int8", **kw),
    "adam amsgrad none/bf16": lambda ps, **kw: leanopt.Adam(
        ps, lr=1e-2, amsgrad=True, master="none", states="bf16", **kw
    ),
    "sgd nesterov kahan": lambda ps, **kw: leanopt.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, master="kahan", **kw),
    "lion exact/fp32": lambda ps, **kw: leanopt.Lion(ps, lr=1e-3, weight_decay=0.1, **kw),
}


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.to(memory_format=torch.channels_last)


def _transposed(t: torch.Tensor) -> torch.Tensor:  # (a, b) stored as the transpose of a contiguous (b, a)
    return t.t().contiguous().t()


LAYOUTS = {
    "channels_last conv weight": ((64, 48, 3, 3), _channels_last),
    "channels_last_3d conv weight": ((16, 8, 3, 3, 3), lambda t: t.to(memory_format=torch.channels_last_3d)),
    "transposed matrix": ((40, 24), _transposed),
}


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def twin_run(mode: str, shape, layout, steps: int = 4, dtype=torch.bfloat16, grad_layout=None, **kw):
    """The same values trained as a contiguous parameter and in ``layout``; returns both (param, opt)."""
    gen = torch.Generator().manual_seed(0)
    value = (torch.randn(shape, generator=gen) * 0.5).to(dtype)
    a = torch.nn.Parameter(layout(value.clone()))
    b = torch.nn.Parameter(value.clone())
    assert not a.is_contiguous() and torch.equal(a, b)
    opt_a, opt_b = MODES[mode]([a], **kw), MODES[mode]([b], **kw)
    for step in range(steps):
        g = (torch.randn(shape, generator=gen) * 10.0 ** -(step % 3)).to(dtype)
        a.grad = (grad_layout or layout)(g.clone())
        b.grad = g.clone()
        opt_a.step()
        opt_b.step()
    return (a, opt_a), (b, opt_b)


def assert_same(a, opt_a, b, opt_b):
    assert torch.equal(bits(a), bits(b))
    sa, sb = opt_a.state[a], opt_b.state[b]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(bits(sa[k]), bits(sb[k])), k


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("mode", list(MODES))
def test_dense_layouts_run_natively_with_the_bits_of_a_contiguous_parameter(mode, layout, monkeypatch):
    shape, to_layout = LAYOUTS[layout]
    grouped = mode.endswith("int8") and rows_shape(shape) is not None  # int8 states grouped in logical rows
    calls = []
    real = fused.reference_step
    monkeypatch.setattr(fused, "reference_step", lambda *a, **k: (calls.append(a[3].shape), real(*a, **k))[1])
    (a, opt_a), (b, opt_b) = twin_run(mode, shape, to_layout)
    assert not calls, "a tensor took the reference executor"
    if grouped:  # a kernel that transposes each row in cache (the spec's S = kh*kw), the contiguous twin's bits
        assert opt_a.state[a]["exp_avg.codes"].is_contiguous()
        assert opt_a.state[a]["residual"].stride() == a.stride()  # the weight's own buffers keep its layout
        assert not a.is_contiguous() and a.stride() == to_layout(torch.empty(shape)).stride()
        assert math.prod(shape[2:]) in {spec.permuted for spec in native._BY_SPEC}
        assert isinstance(opt_a._step_plan, leanopt.kernels.step_plan.StepPlan)  # and planned, like the rest
        assert_same(a, opt_a, b, opt_b)
        # without those kernels: contiguous copies (fused._on_contiguous_twin), not planned, the same bits
        monkeypatch.setattr(native, "PERMUTED_ROWS", False)
        (a, opt_a), (b, opt_b) = twin_run(mode, shape, to_layout)
        assert opt_a._step_plan is None and not calls
        assert_same(a, opt_a, b, opt_b)
        return
    assert isinstance(opt_a._step_plan, leanopt.kernels.step_plan.StepPlan)  # later steps: the plan
    assert opt_a.state[a]["exp_avg" if "sgd" not in mode else "momentum_buffer"].stride() == a.stride()
    assert_same(a, opt_a, b, opt_b)


@pytest.mark.parametrize("states", ["fp32", "int8"])
@pytest.mark.parametrize("layout", ["channels_last conv weight", "transposed matrix"])
def test_through_the_cuda_kernels_path_emulated(layout, states, monkeypatch):
    """kernel="fused" with gpu.EMULATE: CPU tensors take the CUDA kernels' code (compiled as C); a dense
    layout runs there too, with the native kernels' bits on the contiguous twin (a channels_last conv
    weight with grouped int8 states: through contiguous copies, one launch per step, not planned)."""
    monkeypatch.setattr(gpu, "EMULATE", True)
    monkeypatch.delenv("LEANOPT_GPU_KERNELS", raising=False)
    gpu.reset()
    try:
        shape, to_layout = LAYOUTS[layout]
        gen = torch.Generator().manual_seed(3)
        value = (torch.randn(shape, generator=gen) * 0.5).bfloat16()
        a, b = torch.nn.Parameter(to_layout(value.clone())), torch.nn.Parameter(value.clone())
        opt_a = leanopt.AdamW([a], lr=1e-2, master="compact", states=states, kernel="fused")
        opt_b = leanopt.AdamW([b], lr=1e-2, master="compact", states=states)  # native CPU kernels
        for _ in range(3):
            g = torch.randn(shape, generator=gen).bfloat16()
            a.grad, b.grad = to_layout(g.clone()), g.clone()
            opt_a.step()
            opt_b.step()
        assert sum(k.tensors for k in gpu.compile_stats()) >= 3
        copies = states == "int8" and rows_shape(shape) is not None
        assert copies == ("exp_avg.codes" in opt_a.state[a])
        assert isinstance(opt_a._step_plan, gpu.GpuStepPlan) is not copies
        assert_same(a, opt_a, b, opt_b)
    finally:
        gpu.reset()


def test_a_gradient_in_another_layout_or_noise_keeps_to_the_reference():
    """SGD's native and reference bits agree, so the fallbacks can be compared with the native twin."""
    shape, to_layout = LAYOUTS["channels_last conv weight"]
    (a, opt_a), (b, opt_b) = twin_run("sgd nesterov kahan", shape, to_layout, grad_layout=lambda g: g)
    assert a.grad.is_contiguous() and not a.is_contiguous()
    assert opt_a._step_plan is None  # the reference ran
    assert_same(a, opt_a, b, opt_b)
    gen = torch.Generator().manual_seed(5)
    value = torch.randn(shape, generator=gen).bfloat16()
    outs = []
    for layout in (to_layout, lambda t: t):
        p = torch.nn.Parameter(layout(value.clone()))
        opt = leanopt.SGD([p], lr=1e-2, momentum=0.9, master="stochastic", seed=7)
        for _ in range(2):
            p.grad = layout(torch.ones(shape).bfloat16() * 1e-3)
            opt.step()
        outs.append(bits(p))
    assert torch.equal(outs[0], outs[1])  # the same noise per logical element


def _sgd_against_the_reference(seed: int):
    """A channels_last weight under SGD with momentum (kernel="auto") and its contiguous twin under the
    reference executor, whose bits SGD's native kernels share."""
    shape, to_layout = LAYOUTS["channels_last conv weight"]
    gen = torch.Generator().manual_seed(seed)
    value = torch.randn(shape, generator=gen).bfloat16()
    a, b = torch.nn.Parameter(to_layout(value.clone())), torch.nn.Parameter(value.clone())
    opt_a = leanopt.SGD([a], lr=1e-2, momentum=0.9)
    opt_b = leanopt.SGD([b], lr=1e-2, momentum=0.9, kernel="reference")
    return shape, to_layout, gen, (a, opt_a), (b, opt_b)


def test_a_plan_follows_layout_changes_between_steps():
    shape, to_layout, gen, (a, opt_a), (b, opt_b) = _sgd_against_the_reference(1)
    for step in range(6):
        g = torch.randn(shape, generator=gen).bfloat16()
        b.grad = g.clone()
        a.grad = g.clone() if step == 3 else to_layout(g.clone())  # step 3: a contiguous gradient
        if step == 4:
            a.data = a.data.contiguous()  # the weight itself changes layout
        opt_a.step()
        opt_b.step()
        assert torch.equal(bits(a), bits(b)), step


def test_non_finite_gradient_in_a_dense_layout_is_skipped():
    shape, to_layout = LAYOUTS["channels_last conv weight"]
    p = torch.nn.Parameter(to_layout(torch.randn(shape).bfloat16()))
    opt = leanopt.AdamW([p], lr=1e-2)
    for step in range(3):
        g = torch.randn(shape).bfloat16()
        if step == 2:
            g[5, 7, 2, 1] = float("nan")
        p.grad = to_layout(g)
        before = bits(p).clone()
        opt.step()
    assert opt.nonfinite_skipped == 1 and torch.equal(bits(p), before)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: torch.zeros(4, 5), True),
        (lambda: torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last), True),
        (lambda: torch.zeros(2, 3, 4, 5, 6).to(memory_format=torch.channels_last_3d), True),
        (lambda: torch.zeros(5, 4).t(), True),
        (lambda: torch.zeros(4, 6)[:, ::2], False),  # gaps
        (lambda: torch.zeros(4, 6)[:, 1:], False),
        (lambda: torch.zeros(1, 5).expand(3, 5), False),  # overlapping (stride 0)
        (lambda: torch.zeros(1, 5).as_strided((1, 5), (99, 1)), True),  # a size-1 dim's stride is free
        (lambda: torch.zeros(0, 3).t(), True),
    ],
)
def test_dense(make, expected):
    assert native.dense(make()) is expected


def test_a_state_in_another_layout_keeps_to_the_reference():
    """A state tensor whose strides are not the parameter's (say, made contiguous by hand or loaded so):
    the flat kernel would pair the wrong elements, so that tensor takes the reference."""
    shape, to_layout, gen, (a, opt_a), (b, opt_b) = _sgd_against_the_reference(2)
    for step in range(4):
        g = torch.randn(shape, generator=gen).bfloat16()
        a.grad, b.grad = to_layout(g.clone()), g.clone()
        if step == 2:
            opt_a.state[a]["momentum_buffer"] = opt_a.state[a]["momentum_buffer"].contiguous()
        opt_a.step()
        opt_b.step()
        assert torch.equal(bits(a), bits(b)), step
        assert torch.equal(bits(opt_a.state[a]["momentum_buffer"]), bits(opt_b.state[b]["momentum_buffer"]))


@pytest.mark.parametrize("direction", ["contiguous -> channels_last", "channels_last -> contiguous"])
def test_a_checkpoint_loads_in_the_parameter_layout(direction, monkeypatch):
    """States saved from a model in one layout and loaded into the other are laid out like the new
    parameter (as new states are), so the native kernels keep running; training continues with the
    bits of the model that never changed layout."""
    shape, to_layout = LAYOUTS["channels_last conv weight"]
    plain = torch.Tensor.contiguous
    src_layout, dst_layout = (plain, to_layout) if direction.startswith("contiguous") else (to_layout, plain)
    gen = torch.Generator().manual_seed(4)
    value = torch.randn(shape, generator=gen).bfloat16()
    src = torch.nn.Parameter(src_layout(value.clone()))
    opt_src = MODES["adamw exact/fp32"]([src])
    grads = [torch.randn(shape, generator=gen).bfloat16() for _ in range(5)]
    for g in grads[:2]:
        src.grad = src_layout(g.clone())
        opt_src.step()
    saved = opt_src.state_dict()
    dst = torch.nn.Parameter(dst_layout(src.detach().clone()))
    opt_dst = MODES["adamw exact/fp32"]([dst])
    opt_dst.load_state_dict(saved)
    for k in ("remainder", "exp_avg", "exp_avg_sq"):
        assert opt_dst.state[dst][k].stride() == dst.stride(), k
        assert torch.equal(bits(opt_dst.state[dst][k]), bits(opt_src.state[src][k])), k
    calls = []
    real = fused.reference_step
    monkeypatch.setattr(fused, "reference_step", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    for g in grads[2:]:
        src.grad, dst.grad = src_layout(g.clone()), dst_layout(g.clone())
        opt_src.step()
        opt_dst.step()
    assert not calls
    assert_same(dst, opt_dst, src, opt_src)


@pytest.mark.parametrize("mode", ["adamw exact/fp32", "sgd nesterov kahan", "adam amsgrad none/bf16"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_fp16_and_fp32_parameters_in_channels_last(mode, dtype, monkeypatch):
    shape, to_layout = LAYOUTS["channels_last conv weight"]
    calls = []
    real = fused.reference_step
    monkeypatch.setattr(fused, "reference_step", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    (a, opt_a), (b, opt_b) = twin_run(mode, shape, to_layout, dtype=dtype)
    assert not calls
    assert_same(a, opt_a, b, opt_b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["exact/fp32", "compact/int8"])
def test_cuda_kernels_walk_a_channels_last_weight_like_the_native_ones(mode):
    """On a GPU: kernel="fused" (the CUDA kernels) on a channels_last weight gives the native CPU kernels'
    bits on the same weight stored contiguously."""
    master, states = mode.split("/")
    shape, to_layout = LAYOUTS["channels_last conv weight"]
    gen = torch.Generator().manual_seed(6)
    value = (torch.randn(shape, generator=gen) * 0.5).bfloat16()
    a = torch.nn.Parameter(to_layout(value.clone().cuda()))
    b = torch.nn.Parameter(value.clone())
    opt_a = leanopt.AdamW([a], lr=1e-2, master=master, states=states, kernel="fused")
    opt_b = leanopt.AdamW([b], lr=1e-2, master=master, states=states)
    for _ in range(3):
        g = torch.randn(shape, generator=gen).bfloat16()
        a.grad, b.grad = to_layout(g.clone().cuda()), g.clone()
        opt_a.step()
        opt_b.step()
    assert sum(k.tensors for k in gpu.compile_stats() if k.device.type == "cuda") >= 3
    assert torch.equal(bits(a.cpu()), bits(b))
    for k, v in opt_a.state[a].items():
        assert torch.equal(bits(v.cpu()), bits(opt_b.state[b][k])), k


@pytest.mark.parametrize("flags", ["", "-DLO_NO_VECTOR"], ids=["vector", "portable"])
def test_native_channels_last_transpose_moves_torch_contiguous_bytes(flags, tmp_path, monkeypatch):
    """``native.to_logical`` / ``from_logical`` (the copies a channels_last weight with grouped int8/int4
    states is updated through): byte for byte ``t.contiguous()`` and ``dst.copy_(src)``, for 1-, 2- and
    4-byte elements, kernel areas S = kh*kw below and above the vector path's 32, channel counts L below,
    at and past the vector width (tails), channels_last_3d; the AVX-512 blocks and the portable C."""
    if native.compiler() is None:
        pytest.skip("needs a C compiler")
    monkeypatch.setenv("LEANOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LEANOPT_CFLAGS", flags)
    native.reset()
    try:
        g = torch.Generator().manual_seed(0)
        shapes = [(3, 70, 3, 3), (2, 64, 1, 3), (2, 5, 7, 7), (2, 33, 5, 5), (3, 16, 3, 3), (2, 130, 2, 2),
                  (4, 40, 2, 3, 3), (2, 17, 1, 1, 33)]  # fmt: skip
        dtypes = [torch.int8, torch.bfloat16, torch.float16, torch.float32]
        widths = set()
        for shape in shapes:
            fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
            for dtype in dtypes:
                x = (torch.randn(shape, generator=g) * 100).to(dtype).to(memory_format=fmt)
                dims = native.row_transpose_dims(x)
                assert dims == (shape[0], x.numel() // (shape[0] * shape[1]), shape[1]), shape
                y = native.to_logical(x)
                assert y is not None and y.is_contiguous() and torch.equal(y.view(-1), x.contiguous().view(-1))
                back = torch.empty_like(x)
                assert native.from_logical(back, y) and back.stride() == x.stride()
                assert torch.equal(back, x), (shape, dtype)
                out = torch.empty(shape, dtype=dtype)
                widths.add(native._transpose_fn()(x.data_ptr(), out.data_ptr(), *dims, x.element_size(), 1, 1))
                assert torch.equal(out, y)
        if flags:
            assert widths == {1}
        elif native.vector_width() == 16:
            assert widths == {1, 16, 32}  # S > 32 or L below the width: element by element
        # other layouts: not this transpose (torch copies them)
        assert native.row_transpose_dims(torch.zeros(4, 64, 3, 3)) is None  # contiguous
        assert native.row_transpose_dims(torch.zeros(64, 40).t()) is None  # a transposed matrix
        assert native.row_transpose_dims(torch.zeros(4, 3, 5, 64).permute(0, 3, 2, 1)) is None  # H, W swapped
        assert native.to_logical(torch.zeros(4, 64, 3, 3).permute(0, 1, 3, 2)) is None
    finally:
        native.reset()


@pytest.mark.slow
@pytest.mark.parametrize("flags", ["-DLO_NO_VECTOR", "-march=x86-64-v3"], ids=["portable", "avx2"])
def test_row_transposing_kernels_of_other_builds(flags, tmp_path, monkeypatch):
    """The channels_last row-transposing int8/int4 kernels built as portable C and for AVX2 CPUs (element
    by element transposes there): a contiguous twin's bits, 3x3 and 7x7 kernels, partial groups."""
    from test_native import _compiler_takes, _cpu_has

    monkeypatch.setenv("LEANOPT_CACHE_DIR", str(tmp_path))
    if not _compiler_takes(flags, monkeypatch):
        pytest.skip(f"the C compiler does not take {flags}")
    if "x86-64-v3" in flags and not _cpu_has("avx2", "fma", "f16c"):
        pytest.skip("this CPU does not run AVX2 code")
    monkeypatch.setenv("LEANOPT_CFLAGS", flags)
    native.reset()
    try:
        for mode in ("adamw compact/int8", "sgd nesterov kahan"):
            for shape in ((40, 24, 3, 3), (6, 5, 7, 7)):
                kw = {"states": "int4"} if mode.startswith("sgd") else {}
                (a, opt_a), (b, opt_b) = twin_run(mode, shape, _channels_last, **kw)
                assert_same(a, opt_a, b, opt_b)
        assert {9, 49} <= {spec.permuted for spec in native._BY_SPEC}
    finally:
        native.reset()
