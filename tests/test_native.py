"""The native CPU kernels (leanopt.kernels.native) against the eager reference executor.

What holds (docs/kernels.md): SGD and Lion are bit-identical to the reference for every weight and
state format; Adam/AdamW states are bit-identical for fp32/bf16 states and the master is within one
fp32 ULP per step (torch's eager sqrt on CPU is MKL's, which is not always correctly rounded; the native
kernel's is, like torch's fused=True AdamW, which it matches bit for bit: tests/test_core_exactness.py).
"""

from __future__ import annotations

import ctypes
import itertools
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import leanopt
from leanopt.kernels import native

_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32}
SHAPES = [(7,), (5, 64), (3, 70), (4, 33), (2, 3, 40), (130,), (6, 5, 3, 3)]  # the last: a conv weight
WEIGHTS = ["exact", "compact", "none", "auto"]  # auto on fp32 params: the plain fp32 format
STATES = ["fp32", "bf16", "int8", "int4"]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(_INT[t.element_size()])


def run(kernel, cls, master, states, shape, hyper, steps=4, seed=0, dtype=None):
    """A parameter trained for ``steps`` with changing gradient scales and learning rates."""
    g = torch.Generator().manual_seed(seed)
    dtype = dtype or (torch.float32 if master == "auto" else torch.bfloat16)
    p = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.5).to(dtype))
    opt = cls([p], master=master, states=states, kernel=kernel, **hyper)
    for i in range(steps):
        p.grad = (torch.randn(shape, generator=g) * 10.0 ** (-(i % 4))).to(dtype)
        opt.param_groups[0]["lr"] = hyper["lr"] * (1 + i) / steps  # a schedule: no recompiles
        opt.step()
    return p, opt


def tensors(p, opt):
    return {"param": p.detach(), **{k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}}


EXACT_CASES = {
    "sgd": (leanopt.SGD, dict(lr=1e-2)),
    "sgd_nesterov_wd": (leanopt.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "sgd_dampening_max": (leanopt.SGD, dict(lr=1e-2, momentum=0.8, dampening=0.3, maximize=True)),
    "lion": (leanopt.Lion, dict(lr=1e-3, weight_decay=0.1)),
}


@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_sgd_and_lion_are_bit_identical_to_the_reference_for_every_format(case):
    cls, hyper = EXACT_CASES[case]
    calls = sum(k.calls for k in native.compile_stats())
    checked = 0
    for master, states, shape in itertools.product(WEIGHTS, STATES, SHAPES):
        if cls is leanopt.Lion and master == "auto":
            continue  # Lion keeps bf16/fp16 weights only
        ref = tensors(*run("reference", cls, master, states, shape, hyper))
        nat = tensors(*run("auto", cls, master, states, shape, hyper))
        assert ref.keys() == nat.keys()
        for key in ref:
            diff = int((bits(ref[key]) != bits(nat[key])).sum())
            assert diff == 0, f"{master}/{states}{shape} {key}: {diff} elements differ"
        checked += 1
    assert checked >= 72
    assert sum(k.calls for k in native.compile_stats()) - calls >= 4 * checked  # the native path ran


ADAM_CASES = {
    "adamw": (leanopt.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adam_l2_amsgrad": (leanopt.Adam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    "adamw_maximize": (leanopt.AdamW, dict(lr=1e-2, maximize=True)),
}


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of fp32 ULPs (monotone integer mapping of the bit patterns)."""

    def key(x):
        i = x.view(torch.int32).to(torch.int64)
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)

    return (key(a) - key(b)).abs()


@pytest.mark.parametrize("case", list(ADAM_CASES))
@pytest.mark.parametrize("states", STATES)
def test_adam_one_step_states_match_and_master_within_one_ulp(case, states):
    """From the same state, one step: fp32/bf16 states and the first moment's codes and scales
    bit-identical, the second moment's codes within one code (its encode takes a square root), the master
    within 1 ULP + 2^-20 |update| (the reference's MKL sqrt is the only difference); a compact master
    within one unit of its format (2^-15 of its value, ~16 significant bits: an fp32 value 1 ULP off
    may round to the next compact value; seen on an AMD EPYC, 2026-11-30, not on Intel CPUs)."""
    cls, hyper = ADAM_CASES[case]
    for master, shape in itertools.product(["exact", "compact", "auto"], [(64, 96), (3, 70), (130,), (8, 16, 3, 3)]):
        p, opt = run("reference", cls, master, states, shape, hyper, steps=3)
        twin = torch.nn.Parameter(p.detach().clone())
        opt2 = cls([twin], master=master, states=states, kernel="auto", **hyper)
        opt2.load_state_dict(opt.state_dict())
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(p.dtype)
        p.grad, twin.grad = grad.clone(), grad.clone()
        before = opt.master_value(p).float().clone()
        opt.step()
        assert native.native_step(opt2.rule, *opt2.formats(twin, opt2.param_groups[0]), twin, twin.grad,
                                  opt2.state[twin], opt2.param_groups[0])  # fmt: skip
        a, b = opt.master_value(p).float(), opt2.master_value(twin).float()
        # one ULP of the master plus the last bits of the update (a 1-ULP sqrt moves the update by ~2^-23)
        ulp = torch.nextafter(a.abs(), torch.tensor(float("inf"))) - a.abs()
        if master == "compact":  # one step of the compact format (~16 significant bits)
            ulp = torch.maximum(ulp, a.abs() * 2.0**-15)
        bound = ulp.double() + 2.0**-20 * (a.double() - before.double()).abs()
        assert bool(((a.double() - b.double()).abs() <= bound).all()), f"{master}{shape}: master outside bound"
        d = ulp_distance(a, b)
        assert int((d > 0).sum()) <= max(2, p.numel() // 20)  # rare: only where MKL's sqrt rounds differently
        for key, ref in opt.state[p].items():
            if not isinstance(ref, torch.Tensor) or key in ("remainder", "residual", "step"):
                continue
            got = opt2.state[twin][key]
            quantised_second_moment = key.endswith((".codes", ".scales")) and not key.startswith("exp_avg.")
            if not quantised_second_moment:  # moments in fp32/bf16 and the first moment's codes and scales
                assert torch.equal(bits(ref), bits(got)), f"{master}{shape} {key}"
            elif key.endswith(".codes"):  # within one code (4-bit: per nibble)
                a, b = ref.to(torch.int32), got.to(torch.int32)
                if ref.dtype == torch.uint8:
                    a, b = torch.stack((a & 15, a >> 4)), torch.stack((b & 15, b >> 4))
                assert int((a - b).abs().max()) <= 1, key
            else:  # bf16 scales: within one bf16 rounding step
                assert torch.allclose(ref.float(), got.float(), rtol=2**-7, atol=0), key


def test_results_do_not_depend_on_the_thread_count():
    shape = (512, 1024)  # large enough that the kernels split the work
    results = []
    for threads in (1, 2, 3):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            results.append(tensors(*run("auto", leanopt.AdamW, "compact", "int8", shape, dict(lr=1e-2), steps=2)))
        finally:
            torch.set_num_threads(old)
    for other in results[1:]:
        for key in results[0]:
            assert torch.equal(bits(results[0][key]), bits(other[key])), key


def test_hyperparameter_and_step_changes_build_no_new_kernel():
    p, opt = run("auto", leanopt.AdamW, "exact", "fp32", (8, 40), dict(lr=1e-2), steps=2)
    before = len(native.compile_stats())
    for i in range(3):
        opt.param_groups[0].update(lr=0.1 / (i + 1), betas=(0.8 + 0.05 * i, 0.99), eps=10.0 ** -(6 + i),
                                   weight_decay=0.01 * (i + 1))  # fmt: skip
        p.grad = torch.randn_like(p)
        opt.step()
    assert len(native.compile_stats()) == before


def test_tensors_with_gaps_fall_back_to_the_reference():
    """A parameter that is not dense in memory (a strided view); dense non-contiguous ones (a transpose,
    channels_last) run natively: tests/test_layouts.py."""
    base = torch.randn(6, 16).bfloat16()
    p = torch.nn.Parameter(base[:, ::2])  # every other column: gaps between its elements
    q = torch.nn.Parameter(base[:, ::2].contiguous())
    for t in (p, q):
        t.grad = torch.ones_like(t)
    a = leanopt.AdamW([p], kernel="auto")
    b = leanopt.AdamW([q], kernel="reference")
    calls = sum(k.calls for k in native.compile_stats())
    a.step()
    b.step()
    assert sum(k.calls for k in native.compile_stats()) == calls  # not taken natively
    assert torch.equal(bits(p.detach().contiguous()), bits(q.detach()))
    assert not native.native_step(a.rule, *a.formats(p, a.param_groups[0]), p, p.grad, a.state[p], a.param_groups[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_all_finite_finds_every_kind_of_non_finite_value(dtype):
    x = torch.randn(300_001).to(dtype)
    assert native.all_finite(x) is True
    assert native.all_finite(x[:0].contiguous()) is True
    big = torch.finfo(dtype).max
    y = x.clone()
    y[[0, -1]] = big
    assert native.all_finite(y) is True
    for value in (float("nan"), float("inf"), -float("inf")):
        for where in (0, 150_000, 300_000):
            y = x.clone()
            y[where] = value
            assert native.all_finite(y) is False, (value, where)
    assert native.all_finite(x.double()) is None  # not covered: the caller uses torch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_all_finite_sees_every_stream_and_the_tail(dtype):
    """The check reads its range as 8 interleaved eighths plus a tail: a NaN or inf at the first and last
    element of each eighth and in the tail is found, for lengths below, at and above multiples of 8."""
    for n in (1, 7, 8, 9, 8 * 37 + 5, 100_003):
        x = torch.randn(n).to(dtype)
        assert native.all_finite(x) is True
        q = n // 8
        places = {0, n - 1, *(k * q for k in range(8)), *(k * q + q - 1 for k in range(8) if q), *range(8 * q, n)}
        for where in sorted(places):
            for value in (float("nan"), float("inf")):
                y = x.clone()
                y[where] = value
                assert native.all_finite(y) is False, (n, where, value)


def test_all_finite_many_answers_for_each_tensor_in_one_call():
    """step() checks every plain CPU gradient in one native call: small tensors side by side, large ones
    split; each tensor's answer is its own."""
    g = torch.Generator().manual_seed(2)
    tensors, want = [], []
    for i in range(40):
        dtype = (torch.bfloat16, torch.float16, torch.float32)[i % 3]
        n = (0, 1, 33, 5000, 300_001)[i % 5]
        t = torch.randn(n, generator=g).to(dtype)
        bad = n > 0 and i % 4 == 1
        if bad:
            t[(i * 7919) % n] = (float("nan"), float("inf"), -float("inf"))[i % 3]
        tensors.append(t)
        want.append(not bad)
    assert native.all_finite_many(tensors) == want
    assert native.all_finite_many(tensors + [torch.zeros(3, dtype=torch.float64)]) is None  # not covered
    assert native.all_finite_many([]) == []


def test_a_state_tensor_given_new_storage_is_followed(tmp_path):
    """The native path keeps each state's plan and pointer array between steps; a state tensor whose
    storage is replaced in place (``.data = ...``, what some wrappers do) or a new step tensor (a
    loaded checkpoint) must be seen, never written through a stale pointer: the same bits as the same
    steps without the replacement (the same values in new memory). (Compared with the native path
    itself, not the eager reference: their arithmetic may differ in a last bit on some CPUs.)"""
    results = []
    for replace in (False, True):
        p = torch.nn.Parameter(torch.randn(8, 64, generator=torch.Generator().manual_seed(4)).bfloat16())
        opt = leanopt.AdamW([p], lr=1e-2, states="int8", kernel="auto")
        for i in range(4):
            p.grad = torch.randn(8, 64, generator=torch.Generator().manual_seed(10 + i)).bfloat16()
            opt.step()
            st = opt.state[p]
            if i == 1 and replace:
                old = st["exp_avg.codes"]
                old.data = old.clone()  # same tensor object, new storage
                st["step"] = st["step"].clone()  # a new step tensor
        results.append(tensors(p, opt))
    for key in results[0]:
        assert torch.equal(bits(results[0][key]), bits(results[1][key])), key
    assert float(results[1]["step"]) == 4.0


def test_kernels_are_cached_on_disk_and_reloaded_without_compiling(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANOPT_CACHE_DIR", str(tmp_path))
    native.reset()
    try:
        run("auto", leanopt.SGD, "exact", "fp32", (4, 32), dict(lr=0.1, momentum=0.9), steps=1)
        first = native.compile_stats()
        assert len(first) == 1 and first[0].compile_seconds > 0
        assert len(list(tmp_path.glob("lo_*.so"))) == 3  # the step kernel, the finiteness check, the batch runner
        native.reset()
        run("auto", leanopt.SGD, "exact", "fp32", (4, 32), dict(lr=0.1, momentum=0.9), steps=1)
        assert [k.compile_seconds for k in native.compile_stats()] == [0.0]
    finally:
        native.reset()


def test_prepare_builds_every_kernel_before_the_first_step(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANOPT_CACHE_DIR", str(tmp_path))
    native.reset()
    try:
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 8)).bfloat16()
        opt = leanopt.AdamW(model.parameters(), master="compact", states="int8")
        weights = [p.detach().clone() for p in model.parameters()]
        assert leanopt.kernels.prepare(opt) == 4
        assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters(), strict=True))
        built = len(native.compile_stats())
        assert built == 2  # 2-D weights (int8 groups) and 1-D biases (fp32 states)
        model(torch.randn(3, 32).bfloat16()).sum().backward()
        opt.step()
        assert len(native.compile_stats()) == built
        # a channels_last conv weight's kernel (rows transposed in cache, its own per kernel area) too
        conv = torch.nn.Conv2d(8, 40, 3).bfloat16().to(memory_format=torch.channels_last)
        opt = leanopt.AdamW(conv.parameters(), master="compact", states="int8")
        assert leanopt.kernels.prepare(opt) == 2
        assert len(native.compile_stats()) == built + 1 and any(s.permuted == 9 for s in native._BY_SPEC)
        conv(torch.randn(2, 8, 6, 6).bfloat16().to(memory_format=torch.channels_last)).sum().backward()
        assert not conv.weight.grad.is_contiguous()
        opt.step()
        assert len(native.compile_stats()) == built + 1
    finally:
        native.reset()


def test_without_a_compiler_it_warns_once_and_uses_the_reference(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    native.reset()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = tensors(*run("auto", leanopt.AdamW, "exact", "bf16", (4, 40), dict(lr=1e-2), steps=3))
        ours = [w for w in caught if "native CPU kernels are not available" in str(w.message)]
        assert len(ours) == 1
        assert native.disabled_reason() is not None
    finally:
        native.reset()
    monkeypatch.setenv("LEANOPT_NATIVE", "0")  # the reference, and Inductor off: compare with the reference
    want = tensors(*run("reference", leanopt.AdamW, "exact", "bf16", (4, 40), dict(lr=1e-2), steps=3))
    for key in want:
        assert torch.equal(bits(want[key]), bits(got[key])), key


def test_a_compiler_error_is_reported_with_its_message(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANOPT_CACHE_DIR", str(tmp_path))
    with pytest.raises(native.BuildError, match="error"):
        native.build("this is not C;")


def test_a_fresh_process_uses_the_disk_cache(tmp_path):
    code = (
        "import torch, leanopt; from leanopt.kernels import native\n"
        "p = torch.nn.Parameter(torch.ones(4, 32, dtype=torch.bfloat16)); p.grad = torch.ones_like(p)\n"
        "leanopt.Lion([p]).step(); print(sum(k.compile_seconds for k in native.compile_stats()) > 0)\n"
    )
    env = {"LEANOPT_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
           for _ in range(2)]  # fmt: skip
    assert [o.stdout.strip() for o in out] == ["True", "False"]


def test_an_unwritable_cache_folder_falls_back_to_the_temp_folder(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")  # the cache path exists as a file: it cannot be created
    monkeypatch.setenv("LEANOPT_CACHE_DIR", str(blocked / "kernels"))
    native.reset()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning: the kernels were built
            run("auto", leanopt.SGD, "exact", "fp32", (4, 32), dict(lr=0.1, momentum=0.9), steps=1)
        assert native.disabled_reason() is None and len(native.compile_stats()) == 1
    finally:
        native.reset()


@pytest.mark.parametrize("case", ["sgd_nesterov_wd", "lion"])
@pytest.mark.parametrize("master,dtype", [("kahan", torch.bfloat16), ("kahan", torch.float16),
                                          ("none", torch.float16), ("stochastic", torch.bfloat16),
                                          ("compact", torch.float16), ("stochastic", torch.float16)])  # fmt: skip
def test_kahan_stochastic_and_fp16_weights_are_bit_identical_to_the_reference(case, master, dtype):
    cls, hyper = EXACT_CASES[case]
    calls = sum(k.calls for k in native.compile_stats())
    for states, shape in itertools.product(STATES, [(5, 64), (3, 70), (130,)]):
        ref = tensors(*run("reference", cls, master, states, shape, hyper, dtype=dtype))
        nat = tensors(*run("auto", cls, master, states, shape, hyper, dtype=dtype))
        for key in ref:
            diff = int((bits(ref[key]) != bits(nat[key])).sum())
            assert diff == 0, f"{master}/{states}{shape} {key}: {diff} elements differ"
    assert sum(k.calls for k in native.compile_stats()) - calls == 4 * len(STATES) * 3


@pytest.mark.parametrize("master", ["compact", "stochastic", "kahan", "none"])
def test_fp16_weights_at_the_edges_are_bit_identical_to_the_reference(master, fp16_edge_training):
    """fp16 weights where the formats' special cases live: zeros of both signs, fp16 subnormals, the
    largest finite value and steps past it (overflow to inf), and NaN/inf gradients let through."""
    calls = sum(k.calls for k in native.compile_stats())
    hyper = dict(lr=0.37, momentum=0.9, master=master, states="int8")
    want = fp16_edge_training(leanopt.SGD, kernel="reference", **hyper)
    got = fp16_edge_training(leanopt.SGD, kernel="auto", **hyper)
    for step, (a, b) in enumerate(zip(want, got, strict=True)):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(bits(a[key]), bits(b[key])), f"step {step}: {key}"
    assert bool(torch.isinf(got[-1]["param"].float()).any())  # the 3e4 step overflowed some weights
    assert sum(k.calls for k in native.compile_stats()) - calls == 4  # the native kernel ran every step


def test_a_kernel_that_fails_to_compile_falls_back_alone(tmp_path, monkeypatch):
    """A compiler error on one combination (here: fp16 weights) warns and sends only that combination
    to the other executors; the others stay native."""
    monkeypatch.setenv("LEANOPT_CACHE_DIR", str(tmp_path))
    native.reset()
    real = native.generate
    monkeypatch.setattr(native, "generate", lambda spec: "#error broken" if "lo_h2f" in spec.weight.load
                        else real(spec))  # fmt: skip
    try:
        with pytest.warns(RuntimeWarning, match="a native kernel failed to compile"):
            got = tensors(*run("auto", leanopt.Lion, "none", "fp32", (4, 40), dict(lr=1e-3), dtype=torch.float16))
        assert native.disabled_reason() is None
        run("auto", leanopt.Lion, "exact", "fp32", (4, 40), dict(lr=1e-3))
        assert [k.calls for k in native.compile_stats()] == [4]  # the bf16 one ran natively
    finally:
        native.reset()
    want = tensors(*run("reference", leanopt.Lion, "none", "fp32", (4, 40), dict(lr=1e-3), dtype=torch.float16))
    for key in want:
        assert torch.equal(bits(want[key]), bits(got[key])), key


@pytest.mark.parametrize("states,shape", [("int8", (6, 64)), ("int8", (3, 300)), ("int4", (6, 64)), ("int4", (5, 33))])
def test_every_storable_code_decodes_like_the_reference(states, shape):
    """Codes encode never writes (a zero nibble is code -8; any byte of an int8 state) still decode
    exactly as the format's formula says: the kernels' tables cover every storable value."""
    g = torch.Generator().manual_seed(3)
    results = []
    for kernel in ("reference", "auto"):
        p = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(1)).bfloat16())
        opt = leanopt.SGD([p], lr=0.1, momentum=0.9, states=states, kernel=kernel)
        p.grad = torch.ones_like(p)
        opt.step()
        st = opt.state[p]
        codes = st["momentum_buffer.codes"]
        g.manual_seed(3)
        # every byte value where there are at least 256 codes (-128 too: it has no opposite code)
        raw = (torch.randperm(codes.numel(), generator=g) % 256).to(torch.uint8).view(codes.shape)
        codes.copy_(raw.view(codes.dtype))
        st["momentum_buffer.scales"].copy_(torch.rand(st["momentum_buffer.scales"].shape, generator=g))
        p.grad = torch.full_like(p, 1e-3)
        opt.step()
        results.append(tensors(p, opt))
    for key in results[0]:
        assert torch.equal(bits(results[0][key]), bits(results[1][key])), key


def test_posix_threads_path_gives_the_same_bits(tmp_path, monkeypatch):
    """Compilers without OpenMP (zig cc, clang without libomp) build the kernels with POSIX threads;
    LEANOPT_OPENMP=0 forces that path with any compiler. Big enough for two threads."""
    shape = (1024, 1040)  # > 2**20 elements: the pthreads path splits it
    monkeypatch.setenv("LEANOPT_CACHE_DIR", str(tmp_path))
    results = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("LEANOPT_OPENMP", flag)
        native.reset()
        try:
            for states in ("fp32", "int8"):
                results[flag, states] = tensors(*run("auto", leanopt.AdamW, "compact", states, shape, dict(lr=1e-2),
                                                     steps=2))  # fmt: skip
            assert len(native.compile_stats()) == 2
        finally:
            native.reset()
    assert len(list(tmp_path.glob("lo_*.so"))) == 8  # 2 kernels, the check, the batch runner, per threading model
    for states in ("fp32", "int8"):
        for key in results["1", states]:
            assert torch.equal(bits(results["1", states][key]), bits(results["0", states][key])), (states, key)


def test_step_runs_many_tensors_in_one_batch_like_one_at_a_time():
    """step() prepares every covered tensor and runs them in one native call (small ones several at a
    time, one per thread); skipped tensors, fallbacks and results are as with one update at a time."""

    def make(kernel):
        torch.manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(16, 24).bfloat16()) for _ in range(40)]
        params += [
            torch.nn.Parameter(torch.randn(300, 300).bfloat16()),  # above SMALL_TENSOR
            torch.nn.Parameter(torch.randn(7, 9)[:, ::2]),
        ]  # fp32 and not dense in memory: the other path
        return params, leanopt.SGD(params, lr=0.05, momentum=0.9, states="int8", kernel=kernel)

    runs = []
    for kernel in ("reference", "auto"):
        params, opt = make(kernel)
        for step in range(3):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step * 100 + i)).to(p.dtype)
            params[3].grad[0, 0] = float("nan") if step == 1 else params[3].grad[0, 0]
            calls = sum(k.calls for k in native.compile_stats())
            opt.step()
            if kernel == "auto":
                assert sum(k.calls for k in native.compile_stats()) - calls == 41 - (step == 1)
                assert opt.last_skipped == ([3] if step == 1 else [])
        runs.append([tensors(p, opt) for p in params])
    for i, (a, b) in enumerate(zip(*runs, strict=True)):
        for key in a:
            assert torch.equal(bits(a[key]), bits(b[key])), (i, key)


@pytest.mark.slow
@pytest.mark.parametrize("states", ["int8", "int4"])
def test_avx512_avx2_and_portable_grouped_code_give_the_same_bits(tmp_path, monkeypatch, states):
    """The int8/int4 kernels run full groups 16 elements per AVX-512 register where the compiler
    targets AVX-512, as pairs of AVX2 registers where it targets AVX2 + FMA + F16C only (built here with
    ``-march=x86-64-v3``), and portable C elsewhere (and for a row's partial last group everywhere). All
    give the same bits: every rule, every weight format with a vector form, full and partial groups,
    odd rows (one 4-bit code per byte), groups of zeros, a group with a huge and a tiny element, and
    NaN/inf gradients (one a NaN with a payload) let through (nonfinite="ignore")."""
    monkeypatch.setenv("LEANOPT_CACHE_DIR", str(tmp_path))
    cases = {
        "adamw": (leanopt.AdamW, dict(lr=1e-2, weight_decay=0.1, nonfinite="ignore")),
        "adam_amsgrad": (leanopt.Adam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True, nonfinite="ignore")),
        "lion": (leanopt.Lion, dict(lr=1e-3, weight_decay=0.1, nonfinite="ignore")),
        "sgd": (leanopt.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True, nonfinite="ignore")),
    }
    shapes = [(6, 96), (3, 70), (4, 33), (2, 3, 64), (3, 300)]  # 300: blocks of 4 full groups, 1 and a part

    def train(cls, hyper, master, shape):
        g = torch.Generator().manual_seed(5)
        dtype = torch.float32 if master == "auto" else torch.bfloat16
        p = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.5).to(dtype))
        opt = cls([p], master=master, states=states, kernel="auto", **hyper)
        for i in range(4):
            grad = torch.randn(shape, generator=g) * 10.0 ** (-(i % 3))
            # at every step: groups of zeros (states of scale 0: no element is the group's top); a huge and
            # a tiny gradient in one group (the tiny one's sqrt(v) / scale below 2^-126: code 0)
            grad.view(-1)[64:128] = 0.0
            if grad.numel() > 260:
                grad.view(-1)[256], grad.view(-1)[257] = 1e18, 1e-20
            if i == 2:  # one group meets a NaN and an inf: its scale and codes go non-finite alike
                grad.view(-1)[5], grad.view(-1)[40] = float("nan"), float("inf")
            p.grad = grad.to(dtype)
            if i == 3 and p.numel() > 190:  # last step: a NaN with a payload, alone in a group's second register
                p.grad.view(-1).view(torch.int16 if dtype == torch.bfloat16 else torch.int32)[180] = (
                    0x7F81 if dtype == torch.bfloat16 else 0x7F800001
                )
            opt.step()
        return tensors(p, opt)

    results = {}
    monkeypatch.setenv("LEANOPT_CFLAGS", "")
    native.reset()
    widths = {"": native.vector_width()}  # 16: AVX-512, 8: AVX2 (this CPU's own build), 1: portable C
    if widths[""] not in (8, 16):
        pytest.skip("this CPU or compiler has neither AVX-512 nor AVX2: only the portable code exists here")
    # The first moment's table lookup: by byte permutes where the CPU has AVX-512 VBMI (""), else by a
    # gather ("-DLO_NO_VBMI") or, on CPUs whose gathers are slow, by register permutes (LO_SLOW_GATHER);
    # LO_SCALE_EACH: each group's scale by itself instead of a block's 4 at once (benchmarks/int8_cost.py)
    # AVX2: the first moment's table entries computed (two divisions), or gathered (-DLO_AVX2_GATHER).
    # On a CPU with AVX2 but no AVX-512 (AMD Zen 2/3) the build without flags is the AVX2 one, and the
    # AVX-512 variants (VBMI, slow gathers, pairs) would compile the same code again: left out there.
    avx512 = widths[""] == 16
    avx2_ok = _cpu_has("avx2", "fma", "f16c") and _compiler_takes(AVX2, monkeypatch)
    avx2 = ((AVX2,) if avx512 else ()) + (AVX2 + " -DLO_AVX2_GATHER",) if avx2_ok else ()
    lookups = ("-DLO_NO_VBMI", "-DLO_NO_VBMI -DLO_SLOW_GATHER", "-DLO_SCALE_EACH") if avx512 else ("-DLO_SCALE_EACH",)
    # LO_NO_PAIRS: a group's weights and gradients register by register instead of by two-register
    # permutes (lv_load_compact2 & co), for every weight format
    every_format = ("", "-DLO_NO_VECTOR", "-DLO_NO_PAIRS") if avx512 else ("", "-DLO_NO_VECTOR")
    for flags in (*every_format, *lookups, *avx2):
        monkeypatch.setenv("LEANOPT_CFLAGS", flags)
        native.reset()
        try:
            widths[flags] = native.vector_width()
            calls = sum(k.calls for k in native.compile_stats())
            for name, (cls, hyper) in cases.items():
                every = ("exact", "compact", "none", "stochastic", "auto")
                for master in every if flags in every_format else ("compact", "stochastic"):
                    if cls is leanopt.Lion and master == "auto":
                        continue
                    for shape in shapes:
                        results[flags, name, master, shape] = train(cls, hyper, master, shape)
            assert sum(k.calls for k in native.compile_stats()) > calls  # the native kernels ran
        finally:
            native.reset()
    assert widths["-DLO_NO_VECTOR"] == 1
    assert all(widths[f] == 8 for f in avx2)  # the AVX2 code was compiled in
    compared = 0
    for (flags, *case), got in results.items():
        if flags == "-DLO_NO_VECTOR":
            continue
        want = results[("-DLO_NO_VECTOR", *case)]
        for key in want:
            same = torch.equal(bits(want[key]), bits(got[key]))
            assert same, f"{case} {key}: vector code ({flags or 'AVX-512'}) and portable code differ"
        compared += 1
    vector_builds = len(every_format) - 1  # each compared with the portable build
    assert (
        compared
        == vector_builds * (4 * len(shapes) * 5 - len(shapes)) + (len(lookups) + len(avx2)) * 4 * len(shapes) * 2
    )


#: compiler flags of a build for CPUs with AVX2, FMA and F16C but no AVX-512 (after -march=native)
AVX2 = "-march=x86-64-v3"


def _compiler_takes(flags: str, monkeypatch) -> bool:
    """Whether the C compiler builds a trivial library with these extra flags (zig's cc, say, spells
    the AVX2 target x86_64_v3): then a failure to build the kernels with them is the kernels' fault."""
    monkeypatch.setenv("LEANOPT_CFLAGS", flags)
    try:
        native.build("int lo_probe_flags(void) { return 7; }\n", "lo_probe_flags", argtypes=[], restype=ctypes.c_int)
        return True
    except native.BuildError:
        return False
    finally:
        monkeypatch.delenv("LEANOPT_CFLAGS")


def _cpu_has(*flags: str) -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return all(f in line.split() for f in flags)


@pytest.mark.parametrize("text,slow", [("Mitigation: Microcode", True), ("Not affected", False),
                                       ("Vulnerable", False), (None, False)])  # fmt: skip
def test_slow_gathers_are_detected_from_the_kernel_report(tmp_path, monkeypatch, text, slow):
    """CPUs with the Gather Data Sampling microcode mitigation run gathers several times slower: the
    int8 kernels are then built with LO_SLOW_GATHER (register permutes; same bits, tested above)."""
    report = tmp_path / "gather_data_sampling"
    if text is not None:
        report.write_text(text + "\n")
    monkeypatch.setattr(native, "_GDS", report)
    monkeypatch.setattr(native, "_SLOW_GATHER", [])
    assert native.slow_gather() is slow
