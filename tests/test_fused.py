"""The fused executor (leanopt.kernels.fused) against the eager reference.

Compiling takes seconds per (rule, formats, dtypes, rank) combination, so the compiled tests are few,
marked slow, and each covers several steps with changing hyper-parameters. Every test that needs a
device runs on CPU and, where available, on CUDA (the Triton path), with the same assertions.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import leanopt
from leanopt.formats.weights import WEIGHT_FORMATS
from leanopt.kernels import fused


@pytest.fixture(autouse=True)
def _inductor_path(monkeypatch):
    """These tests are about the torch.compile executor; on CPU the native kernels (tests/test_native.py)
    would take the updates first, so they are switched off here; so are the multi-tensor CUDA kernels
    that kernel="fused" otherwise picks on CUDA (tests/test_gpu_kernels.py)."""
    monkeypatch.setenv("LEANOPT_NATIVE", "0")
    monkeypatch.setenv("LEANOPT_GPU_KERNELS", "0")


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]
_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(_INT[t.element_size()])


def assert_same_bits(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, what
    diff = int((bits(a) != bits(b)).sum())
    assert diff == 0, f"{what}: {diff} of {a.numel()} elements differ in their bits"


def all_fp32_patterns(n: int = 1 << 18, seed: int = 0) -> torch.Tensor:
    """Random fp32 bit patterns (every class: normals, subnormals, zeros, infinities, NaNs)."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(-(2**31), 2**31 - 1, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    special = torch.tensor([0, -(2**31), 0x7F800000, -8388608, 0x7FC00000, -4194304, 0x7F800001, 1, 0x7F7FFFFF,
                            0x7F7F8000, 0x7F7F7FFF, -0x00808000], dtype=torch.int32)  # fmt: skip
    return torch.cat([raw, special]).view(torch.float32)


# ------------------------------------------------------------------------------------- no compiling


@pytest.mark.parametrize("name", sorted(fused.TRACEABLE_WEIGHT_CODECS))
def test_branch_free_weight_codecs_match_their_formats_bit_for_bit(name):
    """The traceable twins used inside compiled code encode and decode exactly like the formats."""
    fmt = WEIGHT_FORMATS[name]
    decode, encode = fused.weight_codec(fmt, torch.bfloat16)
    value = all_fp32_patterns()
    p_ref, p_twin = torch.empty(value.shape, dtype=torch.bfloat16), torch.empty(value.shape, dtype=torch.bfloat16)
    b_ref, b_twin = fmt.init_buffers(p_ref), fmt.init_buffers(p_twin)
    fmt.encode(value.clone(), p_ref, b_ref)
    encode(value.clone(), p_twin, b_twin)
    assert_same_bits(p_twin, p_ref, f"{name} weight")
    for key in fmt.buffers:
        assert_same_bits(b_twin[key], b_ref[key], f"{name} {key}")
    assert_same_bits(decode(p_ref, b_ref), fmt.decode(p_ref, b_ref), f"{name} decoded master")


def test_kernel_option_rejects_unknown_values_naming_the_argument():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"kernel must be one of \['auto', 'reference', 'fused'\]"):
        leanopt.AdamW([p], kernel="triton")


def test_every_builtin_rule_has_a_fused_form():
    for cls in (leanopt.SGD, leanopt.Adam, leanopt.AdamW, leanopt.Lion):
        assert fused.fused_form(cls.rule) is not None, cls.__name__


def test_auto_leaves_small_models_on_the_reference_path(monkeypatch):
    """kernel='auto' never compiles for param groups below FUSED_MIN_NUMEL (small models pay no compile)."""

    def boom(*args, **kwargs):
        raise AssertionError("fused path used for a small tensor")

    monkeypatch.setattr(fused, "fused_step", boom)
    p = torch.nn.Parameter(torch.randn(64, 64, dtype=torch.bfloat16))
    opt = leanopt.AdamW([p], lr=1e-2)
    p.grad = torch.randn_like(p)
    opt.step()
    assert float(opt.state[p]["step"]) == 1


def test_failed_compile_warns_once_falls_back_and_changes_nothing_twice(monkeypatch):
    """Without a usable compiler: one RuntimeWarning, then reference results, bit for bit."""
    fused.reset()

    def no_compiler(*args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx")

        return fail

    monkeypatch.setattr(fused, "_make_pipeline", no_compiler)
    monkeypatch.setattr(fused, "_make_pair_pipeline", no_compiler)
    torch.manual_seed(0)
    p0 = torch.randn(8, 16, dtype=torch.bfloat16)
    grads = [torch.randn(8, 16, dtype=torch.bfloat16) for _ in range(3)]
    params = {}
    for kernel in ("reference", "fused"):
        p = params[kernel] = torch.nn.Parameter(p0.clone())
        opt = leanopt.AdamW([p], lr=1e-2, kernel=kernel)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for g in grads:
                p.grad = g.clone()
                opt.step()
        ours = [w for w in caught if "fused optimizer kernels are not available" in str(w.message)]
        assert len(ours) == (1 if kernel == "fused" else 0)
        assert float(opt.state[p]["step"]) == 3
    assert_same_bits(params["fused"], params["reference"], "weights after fallback")
    fused.reset()


# ------------------------------------------------------------------------------------- compiled


def _pair(cls, p0, grads, lr_schedule, device, **options):
    """Run reference and fused optimizers side by side; before each step the fused one is given the
    reference's state, so each step is compared from identical inputs. Yields per-step results."""
    p_ref = torch.nn.Parameter(p0.clone().to(device))
    p_fus = torch.nn.Parameter(p0.clone().to(device))
    ref = cls([p_ref], kernel="reference", seed=3, **options)
    fus = cls([p_fus], kernel="fused", seed=3, **options)
    for g, lr in zip(grads, lr_schedule, strict=True):
        for opt in (ref, fus):
            opt.param_groups[0]["lr"] = lr
        if ref.state.get(p_ref):
            p_fus.data.copy_(p_ref.data)
            fus.state[p_fus] = {k: v.clone() for k, v in ref.state[p_ref].items()}
        before = ref.master_value(p_ref)
        p_ref.grad, p_fus.grad = g.to(device).clone(), g.to(device).clone()
        ref.step()
        fus.step()
        yield before, (p_ref, ref), (p_fus, fus)


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_fused_sgd_and_lion_are_bit_identical_to_the_reference(device):
    """SGD (momentum, dampening, Nesterov, weight decay; fp32 and exact-split bf16) and Lion (bf16
    states): weights, remainders and states identical bit for bit, over steps with a changing LR."""
    torch.manual_seed(0)
    cases = [
        (leanopt.SGD, torch.float32, dict(momentum=0.9, nesterov=True, weight_decay=0.01)),
        (leanopt.SGD, torch.bfloat16, dict(momentum=0.9, dampening=0.1, weight_decay=0.01, master="exact")),
        (leanopt.Lion, torch.bfloat16, dict(weight_decay=0.1, states="bf16", betas=(0.9, 0.99))),
    ]
    for cls, dtype, options in cases:
        p0 = (torch.randn(37, 70) * 0.1).to(dtype)  # 2590 elements: not a multiple of any vector width
        grads = [torch.randn(37, 70).to(dtype) for _ in range(4)]
        for _, (p_ref, ref), (p_fus, fus) in _pair(cls, p0, grads, [0.1, 0.05, 0.02, 0.01], device, **options):
            assert_same_bits(p_fus, p_ref, f"{cls.__name__} {dtype} weight")
            for key, value in ref.state[p_ref].items():
                assert_same_bits(fus.state[p_fus][key], value, f"{cls.__name__} {dtype} state {key}")
            assert float(fus.state[p_fus]["step"]) == float(ref.state[p_ref]["step"])
        assert fused.compile_stats(), "no fused pipeline was compiled"


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_fused_adamw_exact_split_matches_reference_within_the_documented_bound(device):
    """AdamW, bf16 weights, exact split, fp32 states. Per step from identical inputs: both moments are
    bit-identical; the fp32 master differs by at most 1 ULP plus 2**-20 of the step's update (eager
    CPU ``torch.sqrt`` is not correctly rounded, the compiled one is). LR and step change every step
    without compiling again. On CUDA ``kernel="fused"`` runs the multi-tensor CUDA kernels, which
    follow the CPU reference bit for bit (test_gpu_kernels), while torch's eager CUDA kernels that the
    reference executor calls there contract multiply-adds differently (an H200 run: 1060 of 4288
    second moments differed in their last bits), so on CUDA the moments are compared within a few
    roundings of their terms' magnitudes instead."""
    torch.manual_seed(0)
    for shape in [(64, 67), (61, 67)]:  # even size: pair mode on CPU; odd: the generic kernel
        p0 = torch.randn(shape).bfloat16()
        grads = [torch.randn(shape).bfloat16() for _ in range(5)]
        lrs = [1e-2, 5e-3, 2e-3, 1e-3, 1e-2]
        graphs_after_first = None
        states_before = [torch.zeros(shape, device=device)] * 2
        for i, (before, (p_ref, ref), (p_fus, fus)) in enumerate(
            _pair(leanopt.AdamW, p0, grads, lrs, device, weight_decay=0.1, master="exact", states="fp32")
        ):
            if device == "cpu":
                for key in ("exp_avg", "exp_avg_sq"):
                    assert_same_bits(fus.state[p_fus][key], ref.state[p_ref][key], f"{shape} step {i} {key}")
            else:  # |difference| <= 2**-21 of the sum of the terms' magnitudes (a few roundings of fp32)
                g = grads[i].to(device).float()
                for key, prev, new in (("exp_avg", states_before[0], g), ("exp_avg_sq", states_before[1], g * g)):
                    ours, theirs = fus.state[p_fus][key], ref.state[p_ref][key]
                    bound = 2.0**-21 * (prev.abs() + new.abs())
                    assert bool(((ours - theirs).abs() <= bound).all()), f"{shape} step {i} {key} outside the bound"
            states_before = [ref.state[p_ref][k].clone() for k in ("exp_avg", "exp_avg_sq")]
            m_ref, m_fus = ref.master_value(p_ref), fus.master_value(p_fus)
            ulp = torch.nextafter(m_ref.abs(), torch.tensor(float("inf"), device=m_ref.device)) - m_ref.abs()
            bound = ulp + 2.0**-20 * (m_ref - before).abs()
            assert bool(((m_fus - m_ref).abs() <= bound).all()), f"{shape} step {i}: master outside the bound"
            if graphs_after_first is None:
                graphs_after_first = _unique_graphs()
        assert _unique_graphs() == graphs_after_first, "changing lr / step compiled a new kernel"


def test_grouped_int8_states_stay_on_the_reference_executor(monkeypatch):
    """int8/int4 states are not in FUSED_STATE_FORMATS (their compiled CPU kernel is slow, see
    docs/kernels.md), and OPT_IN_STATE_FORMATS offers them to kernel='fused' on CUDA only: on CPU
    even kernel='fused' never compiles them."""

    def boom(*args, **kwargs):
        raise AssertionError("fused path used for int8 states")

    monkeypatch.setattr(fused, "fused_step", boom)
    p = torch.nn.Parameter(torch.randn(4, 64, dtype=torch.bfloat16))
    opt = leanopt.AdamW([p], lr=1e-2, master="compact", states="int8", kernel="fused")
    p.grad = torch.randn_like(p)
    opt.step()
    assert float(opt.state[p]["step"]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("states", ["int8", "int4"])
def test_opt_in_compiled_grouped_states_match_the_reference(device, states, monkeypatch):
    """kernel="fused" compiles int8/int4 states too where OPT_IN_STATE_FORMATS allows (CUDA; here also
    CPU, with the native kernels set aside). Per step from identical inputs: the first moment's codes
    and scales bit-identical, the second moment's codes within one (its encode takes the square root,
    which eager CPU torch does not always round correctly) and scales identical, weights as the Adam
    bound allows; changing LR and step compiles nothing new. Without fused.COMPILE_OPTIONS
    (emulate_precision_casts) 7-12% of the codes were one apart."""
    if device == "cpu":
        monkeypatch.setitem(fused.OPT_IN_STATE_FORMATS, "cpu", {"int8", "int4"})
        monkeypatch.setattr(leanopt.kernels.native, "native_step", lambda *a, **k: False)
    used = []
    real = fused.fused_step
    monkeypatch.setattr(fused, "fused_step", lambda *a, **k: used.append(1) or real(*a, **k))
    torch.manual_seed(0)
    p0 = torch.randn(8, 96).bfloat16()
    grads = [torch.randn(8, 96).bfloat16() * 10.0**-i for i in range(3)]
    graphs = None
    pairs = _pair(leanopt.AdamW, p0, grads, [1e-2, 5e-3, 2e-3], device, master="compact", states=states)
    for i, (before, (p_ref, ref), (p_fus, fus)) in enumerate(pairs):
        for key, value in ref.state[p_ref].items():
            other = fus.state[p_fus][key]
            if key.startswith("exp_avg_sq") and key.endswith(".codes"):
                a, b = value.cpu(), other.cpu()
                if states == "int4":  # two codes per byte
                    a = torch.stack([a & 15, (a >> 4) & 15], -1)
                    b = torch.stack([b & 15, (b >> 4) & 15], -1)
                far = int(((a.int() - b.int()).abs() > 1).sum())
                assert far == 0, f"step {i} {key}: {far} codes more than one apart"
            elif key != "residual":
                assert_same_bits(other, value, f"step {i} {key}")
        m_ref, m_fus = ref.master_value(p_ref), fus.master_value(p_fus)
        ulp = torch.nextafter(m_ref.abs(), torch.tensor(float("inf"), device=m_ref.device)) - m_ref.abs()
        assert bool(((m_fus - m_ref).abs() <= ulp + 2.0**-20 * (m_ref - before).abs()).all()), f"step {i}: master"
        if graphs is None:
            graphs = _unique_graphs()
    assert used, "the compiled path was not used"
    assert _unique_graphs() == graphs, "changing lr / step compiled a new kernel"
    fused.reset()


def test_hyper_parameters_go_to_the_device_once_per_distinct_values():
    """fused.device_scalars: one device tensor per distinct (device, values), shared by every tensor
    of a group at one step (on CUDA each copy is then a pinned, non-blocking one instead of a
    stream-synchronising copy per tensor); values that differ only in a zero's sign stay apart."""
    fused.reset()
    cpu = torch.device("cpu")
    a = fused.device_scalars([1e-3, 0.9, -0.0], cpu)
    assert fused.device_scalars([1e-3, 0.9, -0.0], cpu) is a
    b = fused.device_scalars([1e-3, 0.9, 0.0], cpu)
    assert b is not a
    assert a.dtype == torch.float32 and a.view(torch.int32)[2].item() == -(2**31)  # -0.0 kept
    assert torch.equal(a, torch.tensor([1e-3, 0.9, 0.0], dtype=torch.float32))
    fused.reset()
    assert fused.device_scalars([1e-3, 0.9, -0.0], cpu) is not a


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "mode", ["exact/fp32@reference", "compact/int8@auto", "exact/fp32@fused", "compact/int8@fused"]
)
def test_a_cuda_step_synchronises_at_most_once_not_per_tensor(mode, cuda_waits):
    """On CUDA a step queues its work without waiting for the GPU per tensor: the NaN/inf verdicts of
    all gradients come back in one transfer, hyper-parameters go over in pinned, non-blocking copies,
    and the weight formats' NaN handling is branch-free there. torch's sync debug mode counts waits."""
    master, rest = mode.split("/")
    states, kernel = rest.split("@")
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 64, device="cuda").bfloat16()) for _ in range(20)]
    opt = leanopt.AdamW(params, lr=1e-3, master=master, states=states, kernel=kernel)
    for _ in range(2):  # the first step compiles and creates states
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    torch.cuda.synchronize()
    waits = cuda_waits(opt.step)
    assert len(waits) <= 1, waits[:3]
    assert float(opt.state[params[0]]["step"]) == 3


def test_step_counter_advances_like_torch_add():
    """fused._advance_step writes the fp32 step tensor through a C view: the same float32 + 1 as
    torch's in-place add (also where it rounds: 2**24 + 1 stays 2**24), a new tensor or new storage is
    followed, and a step that is not a plain fp32 CPU tensor takes torch's own add."""
    for start in (0.0, 5.0, 2.0**24 - 1, 2.0**24, 3.0e38):
        ours, theirs = {"step": torch.tensor(start)}, torch.tensor(start)
        for _ in range(3):
            value = fused._advance_step(ours)
            theirs += 1
            assert ours["step"].view(torch.int32).item() == theirs.view(torch.int32).item()
            assert value == theirs.item()
    state = {"step": torch.tensor(1.0)}
    fused._advance_step(state)
    state["step"] = torch.tensor(10.0)  # a new tensor (e.g. loaded)
    assert fused._advance_step(state) == 11.0
    state["step"].data = torch.tensor(20.0)  # same object, new storage
    assert fused._advance_step(state) == 21.0
    state = {"step": torch.tensor(1.0, dtype=torch.float64)}
    assert fused._advance_step(state) == 2.0 and state["step"].dtype == torch.float64
