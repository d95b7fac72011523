"""The multi-tensor CUDA kernels (leanopt.kernels.gpu).

On a machine without a GPU the same generated source is compiled as C (``gpu.EMULATE``: each warp's
lanes run in a loop) and compared bit for bit with the native CPU kernels, through the optimizer: the
table of tensors, the binary search, partial groups, packed nibbles, per-tensor hyper-parameters and
step counts. The tests whose names contain ``cuda`` run the real kernels on a GPU (benchmarks/gpu_check.sh
runs them) against the native CPU kernels on the same inputs.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import re
import shutil
import subprocess
import time
import warnings
from array import array
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import leanopt
from leanopt.kernels import gpu, native

_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32}
SHAPES = [(7,), (5, 64), (3, 70), (4, 33), (2, 3, 40), (130,), (33, 1000), (6, 5, 3, 3), (0, 5)]
WEIGHTS = ["exact", "compact", "none", "kahan", "stochastic", "auto"]  # auto: fp32 params, the fp32 format
STATES = ["fp32", "bf16", "int8", "int4"]
CASES = {
    "adamw": (leanopt.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adam_l2_amsgrad": (leanopt.Adam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    "sgd_nesterov_wd": (leanopt.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "lion": (leanopt.Lion, dict(lr=1e-3, weight_decay=0.1)),
}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def emulate(monkeypatch):
    """CPU tensors with kernel="fused" take the CUDA kernels' path, their source compiled as C."""
    if native.compiler() is None:
        pytest.skip("needs a C compiler")
    monkeypatch.setattr(gpu, "EMULATE", True)
    monkeypatch.delenv("LEANOPT_GPU_KERNELS", raising=False)
    gpu.reset()
    yield
    gpu.reset()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().cpu().view(_INT[t.element_size()])


def train(kernel, cls, master, states, hyper, device="cpu", steps=4, shapes=SHAPES, seed=0, late=True):
    """Parameters of ``shapes`` in two param groups (other lr and betas in the second; with ``late``
    its first tensor gets gradients from step 2 on, so one launch holds different step counts),
    trained for ``steps`` with changing gradient scales and a learning-rate schedule."""
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float32 if master == "auto" else torch.bfloat16
    params = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.5).to(dtype).to(device)) for s in shapes]
    half = len(params) // 2
    second = {"params": params[half:], "lr": hyper["lr"] * 3}
    if cls in (leanopt.Adam, leanopt.AdamW):
        second["betas"] = (0.8, 0.95)
    opt = cls([{"params": params[:half]}, second], master=master, states=states, kernel=kernel, **hyper)
    grads = []
    for i in range(steps):
        for j, p in enumerate(params):
            if late and j == half and i < 2:
                p.grad = None
                continue
            gr = torch.randn(p.shape, generator=g) * 10.0 ** (-(i % 4))
            p.grad = gr.to(dtype).to(device)
            grads.append(p.grad)
        for k, group in enumerate(opt.param_groups):
            group["lr"] = (hyper["lr"] * (3 if k else 1)) * (1 + i) / steps  # a schedule: no rebuild
        opt.step()
    return params, opt


def snapshot(params, opt) -> list[tuple[str, torch.Tensor]]:
    out = []
    for i, p in enumerate(params):
        out.append((f"param {i}", p.detach()))
        out += [(f"param {i} {k}", v) for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)]
    return out


def assert_same(a, b, what: str) -> None:
    assert [k for k, _ in a] == [k for k, _ in b], what
    for (key, x), (_, y) in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what} {key}"
        diff = int((bits(x) != bits(y)).sum())
        assert diff == 0, f"{what} {key}: {diff} of {x.numel()} elements differ"


VARIANTS = [dict(hoist=False, warp_max=False), dict(hoist=True, warp_max=False), dict(hoist=False, warp_max=True),
            dict(groups=3), dict(table=True), dict(groups=4, table=True), dict(chunks=3),
            dict(chunks=2, hoist=False), dict(vec=True), dict(vec=True, chunks=2), dict(lanes=True),
            dict(lanes=True, vec=False)]  # fmt: skip


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()))
def test_every_code_shape_variant_gives_the_same_bits(emulate, monkeypatch, variant):
    """gpu.VARIANT changes only the code's shape (benchmarks/gpu_variants.py times the variants): the
    variants that are not the default give the native kernels' bits too (the default: the test below),
    with partial groups, rows whose groups a warp continues into the next row, several tensors and
    two step counts in one launch. On the CPU the warp reduction is the loop it replaces (its CUDA form:
    the CUDA tests, clang, NVRTC)."""
    for k, x in variant.items():
        monkeypatch.setitem(gpu.VARIANT, k, x)
    hyper = dict(lr=1e-2, weight_decay=0.1)
    combos = [
        ("exact", "fp32"),
        ("compact", "bf16"),
        ("stochastic", "int8"),
        ("kahan", "int4"),
        ("exact", "int8"),
        ("auto", "int8"),
    ]  # (the last: fp32 parameters, whose 8 weights a lane reads in two 16-byte accesses)
    for master, states in combos:
        ref = snapshot(*train("auto", leanopt.AdamW, master, states, hyper))
        gpu.reset()
        ours = snapshot(*train("fused", leanopt.AdamW, master, states, hyper))
        assert_same(ref, ours, f"{master}/{states} {variant}")
        assert gpu.compile_stats(), "the CUDA kernels' path did not run"
        for k in gpu.compile_stats():  # each kernel's source has the shape asked for
            source = gpu.generate(k.spec, k.nscalars)
            lanes = gpu.VARIANT["lanes"] and k.spec.grouped  # a lane per group: none of the warp's shapes
            assert ("H_p[k]" in source) == ((gpu.VARIANT["hoist"] or gpu.VARIANT["vec"]) and not k.spec.grouped)
            assert ("V_G[k]" in source) == ((gpu.VARIANT["vec"] and not k.spec.grouped) or lanes)
            assert ("__reduce_max_sync" in source) == (gpu.VARIANT["warp_max"] and k.spec.grouped and not lanes)
            assert ("T_q" in source) == (gpu.VARIANT["table"] and k.spec.grouped and not lanes)
            assert ("lo_max_bits" in source) == lanes
            assert k.groups_per_warp == (32 if gpu.VARIANT["lanes"] else gpu.VARIANT["groups"])
            assert k.chunks == gpu.VARIANT["chunks"]


@pytest.mark.parametrize("kernel,groups,shape", [("fused", 1, (3, 70)), ("fused", 4, (3, 70)), ("auto", 1, (3, 70)),
                                                 ("auto", 1, (3, 300)), ("fused", "lanes", (3, 70)),
                                                 ("fused", "lanes", (1, 70)), ("fused", "lanes", (5, 64))])  # fmt: skip
def test_grouped_kernels_write_nothing_past_a_tensors_states(emulate, monkeypatch, kernel, groups, shape):
    """A warp's groups past its tensor's last one (3 x 70: 9 groups, warps of 4 take 12) store no code
    or scale: the states are views into larger buffers here, and the bytes after them stay as they were.
    The same for the native CPU kernels (kernel="auto"; 300: blocks of 4 groups, a partial one), and for
    ``VARIANT["lanes"]`` (a lane per group: the lanes past the last group, the last 6 elements of a
    70-element row read and written one by one though aligned in 1 x 70, 5 x 64 in whole words)."""
    if groups == "lanes":
        monkeypatch.setitem(gpu.VARIANT, "lanes", True)
    else:
        monkeypatch.setitem(gpu.VARIANT, "groups", groups)
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape, generator=g).bfloat16())
    opt = leanopt.AdamW([p], lr=1e-2, master="compact", states="int8", kernel=kernel)
    p.grad = torch.randn(p.shape, generator=g).bfloat16()
    opt.step()
    tails = {}
    for key, t in list(opt.state[p].items()):
        if not (isinstance(t, torch.Tensor) and t.dim() > 0):
            continue
        big = torch.full((t.numel() + 64,), 0x5A, dtype=torch.uint8).view(t.dtype) if t.element_size() == 1 else \
            torch.full((t.numel() + 64,), 0x5A5A, dtype=torch.int16).view(t.dtype)  # fmt: skip
        big[: t.numel()] = t.reshape(-1)
        opt.state[p][key] = big[: t.numel()].view(t.shape)
        tails[key] = (big, big[t.numel() :].clone())
    assert {k.split(".")[-1] for k in tails} >= {"codes", "scales"}
    for _ in range(2):
        p.grad = torch.randn(p.shape, generator=g).bfloat16()
        opt.step()
    ran = gpu.compile_stats() if kernel == "fused" else native.compile_stats()
    assert any(k.calls for k in ran), "the kernels did not run"
    for key, (big, before) in tails.items():
        after = big[opt.state[p][key].numel() :]
        assert torch.equal(bits(after), bits(before)), f"{key}: bytes after the tensor were written"


@pytest.mark.parametrize("case", list(CASES))
def test_emulated_kernels_match_the_native_kernels_bit_for_bit(emulate, case):
    """Every weight and state format, partial groups (n = 33, 70, 1000), packed and unpacked int4,
    empty tensors, two param groups with their own hyper-parameters and step counts: the same bits as
    the native CPU kernels, with ONE launch per combination per step (not one per tensor)."""
    cls, hyper = CASES[case]
    checked = 0
    for master, states in itertools.product(WEIGHTS, STATES):
        if cls is leanopt.Lion and master == "auto":
            continue  # Lion keeps bf16/fp16 weights only
        ref = snapshot(*train("auto", cls, master, states, hyper))
        gpu.reset()
        ours = snapshot(*train("fused", cls, master, states, hyper))
        assert_same(ref, ours, f"{master}/{states}")
        kernels = gpu.compile_stats()
        assert kernels, f"{master}/{states}: the CUDA kernels' path did not run"
        # 4 steps; each kernel (combination) launched once per step, the late tensor from step 2 on
        assert all(k.launches == 4 for k in kernels), [(k.spec.form, k.launches) for k in kernels]
        updates = 4 * (len(SHAPES) - 2) + 2  # the empty tensor is not launched; the late one twice
        assert sum(k.tensors for k in kernels) == updates
        checked += 1
    assert checked >= 19


def test_a_non_finite_gradient_skips_that_tensor_only(emulate):
    params, opt = train("fused", leanopt.AdamW, "exact", "int8", dict(lr=1e-2), steps=1, late=False)
    before = [p.detach().clone() for p in params]
    state_before = {k: v.clone() for k, v in opt.state[params[1]].items()}
    for p in params:
        p.grad = torch.randn_like(p)
    params[1].grad.view(-1)[3] = float("nan")
    opt.step()
    assert opt.last_skipped == [1]
    assert torch.equal(bits(params[1]), bits(before[1]))
    for k, v in opt.state[params[1]].items():
        assert torch.equal(bits(v), bits(state_before[k])), k
    assert not torch.equal(bits(params[2]), bits(before[2]))


def test_gradient_release_runs_one_tensor_per_launch_with_the_same_bits(emulate):
    """update_param (what gradient release calls from backward hooks) uses the same kernels."""
    results = []
    for kernel in ("auto", "fused"):
        g = torch.Generator().manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(s, generator=g).bfloat16()) for s in [(4, 64), (9,), (3, 70)]]
        opt = leanopt.AdamW(params, lr=1e-2, master="compact", states="int4", kernel=kernel)
        for _ in range(3):
            for p in params:
                opt.update_param(p, opt.param_groups[0], torch.randn(p.shape, generator=g).bfloat16())
        results.append(snapshot(params, opt))
    assert_same(results[0], results[1], "release")
    assert sum(k.tensors for k in gpu.compile_stats()) == 9 and sum(k.launches for k in gpu.compile_stats()) == 9


def test_fp16_bit_conversions_are_exact_ieee(emulate):
    """The fp16 conversions of the native and CUDA kernels (their own bit code, native.F16_BITS: NVRTC
    has no _Float16, and gcc vectorises no loop over it), compiled as C: every one of the 65536 fp16
    patterns to fp32, and fp32 values around every fp16 rounding boundary, subnormals, overflow and
    random bits to fp16, against torch's conversions; NaNs bit for bit as F16C's (quiet, the payload's
    top bits: torch's vectorised conversions give the same)."""
    import ctypes

    source = (
        gpu._CUDA_PRELUDE
        + native.SHARED_HELPERS
        + native.F16_BITS
        + """
void conv(const uint16_t *h, float *f, int64_t n, const float *x, uint16_t *y, int64_t m) {
  for (int64_t i = 0; i < n; i++) f[i] = lo_h2f(h[i]);
  for (int64_t i = 0; i < m; i++) y[i] = lo_f2h(x[i]); }"""
    )
    fn = native.build(source, "conv", [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64] * 2).fn
    h = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    f = torch.empty(h.numel(), dtype=torch.float32)
    grid = torch.arange(0, 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    grid = grid[torch.isfinite(grid)]
    below = torch.nextafter(grid, torch.tensor(-float("inf")))
    mids = (grid[:-1].double() + grid[1:].double()) / 2  # exact ties in fp32 (fp16 values are sparse enough)
    g = torch.Generator().manual_seed(0)
    rand = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=g, dtype=torch.int64).to(torch.int32)
    x = torch.cat([grid, -grid, below, -below, mids.float(), -mids.float(), torch.nextafter(mids.float(),
                   torch.tensor(float("inf"))), torch.tensor([65504.0, 65519.996, 65520.0, 1e6, float("inf"),
                   -float("inf"), 2.0**-25, 2.0**-26, 3 * 2.0**-26, 1e-10]), rand.view(torch.float32)])  # fmt: skip
    y = torch.empty(x.numel(), dtype=torch.int16)
    fn(h.data_ptr(), f.data_ptr(), h.numel(), x.data_ptr(), y.data_ptr(), x.numel())
    want_f = h.view(torch.float16).float().view(torch.int32)
    nan = torch.isnan(h.view(torch.float16))  # 2046 patterns: quiet, sign and payload kept
    h32 = h.to(torch.int32)
    want_f[nan] = ((h32 & 0x8000) << 16 | 0x7FC00000 | (h32 & 0x3FF) << 13)[nan]
    assert int(nan.sum()) == 2046
    assert torch.equal(f.view(torch.int32), want_f)
    want_y = x.to(torch.float16).view(torch.int16).to(torch.int32)
    xb = x.view(torch.int32)
    nan = torch.isnan(x)
    want_y[nan] = ((xb >> 16) & 0x8000 | 0x7E00 | (xb >> 13) & 0x3FF)[nan]  # quiet, the payload's top bits
    assert int(nan.sum()) > 500
    bad = int((y.to(torch.int32) & 0xFFFF != want_y & 0xFFFF).sum())
    assert bad == 0, f"{bad} of {x.numel()} conversions differ"


@pytest.mark.parametrize("master", ["none", "kahan", "compact", "stochastic"])
def test_fp16_weights_at_the_edges_give_the_native_bits(emulate, master, fp16_edge_training):
    """fp16 weights and gradients (as bits on the CUDA path) where the formats' special cases live:
    zeros of both signs, subnormals, the largest finite value and overflow to inf, NaN/inf gradients
    let through; SGD with int8 states and AdamW with fp32 states, against the native CPU kernels."""
    for cls, hyper in [(leanopt.SGD, dict(lr=0.37, momentum=0.9, states="int8")), (leanopt.AdamW, dict(lr=1e-2))]:
        want = fp16_edge_training(cls, master=master, kernel="auto", **hyper)
        gpu.reset()
        got = fp16_edge_training(cls, master=master, kernel="fused", **hyper)
        assert sum(k.tensors for k in gpu.compile_stats()) == 4  # the CUDA kernels' code ran every step
        for step, (a, b) in enumerate(zip(want, got, strict=True)):
            assert_same(list(a.items()), list(b.items()), f"{cls.__name__} {master} step {step}")


def test_prepare_builds_the_kernels_before_the_first_step(emulate):
    params = [torch.nn.Parameter(torch.randn(s).bfloat16()) for s in [(4, 64), (9,), (2, 3, 40)]]
    opt = leanopt.AdamW(params, lr=1e-2, master="exact", states="int8", kernel="fused")
    weights = [p.detach().clone() for p in params]
    assert leanopt.kernels.prepare(opt) == 3
    built = {id(k) for k in gpu.compile_stats()}
    assert len(built) == 2  # grouped (2-D, 3-D) and flat (1-D)
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(params, weights, strict=True))  # nothing changed
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert {id(k) for k in gpu.compile_stats()} == built and all(k.launches == 1 for k in gpu.compile_stats())


def test_kernel_fused_is_needed_and_the_switch_turns_it_off(emulate, monkeypatch):
    for kernel, env in (("auto", "1"), ("fused", "0")):
        monkeypatch.setenv("LEANOPT_GPU_KERNELS", env)
        train(kernel, leanopt.AdamW, "exact", "fp32", dict(lr=1e-2), steps=1, shapes=[(4, 8), (3,)])
    assert gpu.compile_stats() == []


def test_a_kernel_that_fails_to_build_warns_once_and_falls_back(emulate, monkeypatch):
    def broken(source, name="lo_emulate", arity=4):
        raise native.BuildError("cc failed: planted")

    monkeypatch.setattr(gpu, "_emulated", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = snapshot(*train("fused", leanopt.AdamW, "exact", "int8", dict(lr=1e-2), steps=2))
    ref = snapshot(*train("auto", leanopt.AdamW, "exact", "int8", dict(lr=1e-2), steps=2))
    assert_same(ref, ours, "fallback")
    msgs = [str(w.message) for w in caught if "multi-tensor CUDA kernels" in str(w.message)]
    assert len(msgs) == 1 and "planted" in msgs[0]


_CUDA_STUB = r"""
#define __global__
#define __device__
#define __forceinline__ inline
#define __noinline__
#define __shared__ static
#define __launch_bounds__(x)
#define __restrict__ __restrict
struct lo_dim3 { unsigned x, y, z; };
extern lo_dim3 blockIdx, threadIdx;
void __syncwarp();
unsigned __shfl_xor_sync(unsigned, unsigned, int);
unsigned __reduce_max_sync(unsigned, unsigned);
unsigned __ballot_sync(unsigned, int); int __clz(int); void __syncthreads();
float __uint_as_float(unsigned); unsigned __float_as_uint(float); float __int_as_float(int);
float fabsf(float); float sqrtf(float); float fmaf(float, float, float); float rintf(float);
float copysignf(float, float);
struct uint2 { unsigned x, y; }; struct uint4 { unsigned x, y, z, w; };  /* NVRTC's built-in vector types */
uint2 make_uint2(unsigned, unsigned); uint4 make_uint4(unsigned, unsigned, unsigned, unsigned);
uint4 __ldg(const uint4 *);
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.parametrize("states", [*STATES, "nan check"])
def test_the_cuda_source_is_valid_cplusplus_without_headers(tmp_path, states):
    """What NVRTC compiles: the ``__CUDACC__`` branch as C++, with no standard headers (NVRTC has
    none), CUDA's keywords and intrinsics declared by a stub. Catches C-only constructs and missing
    declarations on machines without a GPU."""
    if states == "nan check":
        source = gpu._finite_source()
    else:
        p = torch.nn.Parameter(torch.randn(4, 64).bfloat16())
        opt = leanopt.AdamW([p], lr=1e-2, master="kahan", states=states, amsgrad=True)
        state = opt._init_state(p, opt.param_groups[0])
        wfmt, sfmt = opt.formats(p, opt.param_groups[0])
        spec = native.plan(opt.rule, wfmt, sfmt, p, torch.bfloat16, state, opt.param_groups[0])[0]
        source = gpu.generate(spec, gpu.scalar_count(spec))
    (tmp_path / "stub.h").write_text(_CUDA_STUB)
    (tmp_path / "k.cu").write_text(source)
    cmd = ["g++", "-x", "c++", "-std=c++17", "-fsyntax-only", "-D__CUDACC__", "-include", str(tmp_path / "stub.h"),
           "-Werror=implicit-function-declaration", "-nostdinc", str(tmp_path / "k.cu")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[:3000]


_CLANG_CUDA_STUB = r"""
#define __global__ __attribute__((global))
#define __device__ __attribute__((device))
#define __shared__ __attribute__((shared))
#define __forceinline__ __inline__ __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...) __attribute__((launch_bounds(__VA_ARGS__)))
struct lo_dim3 { unsigned x, y, z; };
extern __device__ const lo_dim3 threadIdx, blockIdx;
extern "C" {
__device__ float fabsf(float); __device__ float sqrtf(float); __device__ float fmaf(float, float, float);
__device__ float rintf(float); __device__ float copysignf(float, float);
}
__device__ void __syncwarp(unsigned mask = 0xffffffffu);
__device__ unsigned __shfl_xor_sync(unsigned, unsigned, int);
__device__ unsigned __reduce_max_sync(unsigned, unsigned);
__device__ unsigned __ballot_sync(unsigned, int); __device__ int __clz(int); __device__ void __syncthreads();
__device__ float __uint_as_float(unsigned); __device__ unsigned __float_as_uint(float);
__device__ float __int_as_float(int);
struct uint2 { unsigned x, y; }; struct uint4 { unsigned x, y, z, w; };  /* NVRTC's built-in vector types */
__device__ uint2 make_uint2(unsigned, unsigned); __device__ uint4 make_uint4(unsigned, unsigned, unsigned, unsigned);
__device__ uint4 __ldg(const uint4 *);
"""


def test_every_cuda_source_passes_clangs_cuda_checks():
    """clang's own CUDA front end (libclang, device side for sm_90, no CUDA headers: a stub declares
    CUDA's keywords, built-ins and the math functions used): every generated kernel must be valid CUDA
    C++, with every function it calls usable on the device (a helper left without ``__device__`` is an
    error here, not under g++). What NVRTC may still reject is what clang and NVRTC disagree on."""
    cindex = pytest.importorskip("clang.cindex")
    try:
        index = cindex.Index.create()
    except Exception as err:  # noqa: BLE001 - libclang present but not loadable
        pytest.skip(f"libclang not loadable: {err}")
    args = ["-x", "cuda", "--cuda-device-only", "--cuda-gpu-arch=sm_90", "-nocudainc", "-nocudalib", "-std=c++17",
            "-D__CUDACC__", "-include", "/lo/stub.h"]  # fmt: skip
    sources = gpu.every_source()
    assert len(sources) >= 64
    for name, _, source in sources:
        tu = index.parse("/lo/k.cu", args=args, unsaved_files=[("/lo/k.cu", source), ("/lo/stub.h", _CLANG_CUDA_STUB)])
        errors = [f"line {d.location.line}: {d.spelling}" for d in tu.diagnostics if d.severity >= 3]
        assert not errors, f"{name}: {errors[:5]}"
    # the check itself: a helper without __device__ is refused
    bad = sources[1][2].replace("LO_FN uint16_t lo_bf16", "static inline uint16_t lo_bf16")
    tu = index.parse("/lo/k.cu", args=args, unsaved_files=[("/lo/k.cu", bad), ("/lo/stub.h", _CLANG_CUDA_STUB)])
    assert any(d.severity >= 3 for d in tu.diagnostics)


#: (kernel, arch) that ptxas compiles with a small spill under the default code shape (see below)
SPILL_EXEMPT = {("SGD/stochastic/int8", "sm_80"), ("SGD/stochastic/int4", "sm_80")}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_cuda_source_compiles_with_nvrtc_without_spills(arch):
    """NVIDIA's own compiler, as a step on a GPU runs it (``gpu.nvrtc_compile``: the runtime's options,
    CUBIN for A100 / H100-H200), from the ``nvidia-cuda-nvrtc`` wheel (the ``nvrtc`` extra; no GPU
    needed): every generated kernel compiles, its name is found, and ptxas reports no stack frame and
    no register spills, but for the two kernels of SPILL_EXEMPT on sm_80: with ``VARIANT["groups"] = 2``
    (the default since an H200 timed it, 2026-11-30) ptxas keeps SGD's stochastic int8/int4 kernels at 40
    registers there by spilling 8 bytes; that list must stay exact. A construct NVRTC refuses is an
    error with NVRTC's log."""
    nvrtc = gpu.find_nvrtc()
    if nvrtc is None:
        pytest.skip("no NVRTC library (pip install 'leanopt[nvrtc]', or set LEANOPT_NVRTC)")
    sources = gpu.every_source()
    assert len(sources) >= 64
    for label, name, source in sources:
        cubin, mangled, log = gpu.nvrtc_compile(nvrtc, source, name, arch, ("--ptxas-options=-v",))
        assert cubin[:4] == b"\x7fELF" and name in mangled, label
        usage = [line for line in log.splitlines() if "spill" in line]
        clean = all("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in u for u in usage)
        if (label, arch) in SPILL_EXEMPT and gpu.VARIANT["groups"] == 2:
            assert usage and not clean and all("8 bytes stack frame, 8 bytes spill stores" in u for u in usage), (
                f"{label} on {arch}: the exemption no longer matches: {log}"
            )
        else:
            assert usage and clean, f"{label} on {arch}: {log}"
    # the check itself: a helper left without __device__ (a host function called by the kernel) is refused
    bad = sources[1][2].replace("LO_FN uint16_t lo_bf16", "static inline uint16_t lo_bf16", 1)
    assert bad != sources[1][2]
    with pytest.raises(RuntimeError, match="NVRTC"):
        gpu.nvrtc_compile(nvrtc, bad, "lo_cuda", arch)


@pytest.mark.slow
@pytest.mark.parametrize("blocks,arch", [(0, "sm_80"), (0, "sm_90"), (2, "sm_90")])
def test_every_lanes_kernel_compiles_with_nvrtc(monkeypatch, arch, blocks):
    """``VARIANT["lanes"]`` (a lane per int8/int4 group, its states in registers; not the default: not
    yet timed on a GPU): every generated kernel compiles with NVRTC for A100 and H100/H200, its grouped
    kernels at the registers the variant implies. Without a cap ptxas keeps them below its 255, with
    one 4-byte spill (fp16 weights, stochastic rounding: ptxas stops at 128 there); ``blocks=2`` caps
    them at 128, spilling at most what AMSGrad's third state of 32 floats needs. The variant changes the
    grouped kernels' sources and no other (checked here): the others, the same as the default's, are
    compiled by the test above."""
    nvrtc = gpu.find_nvrtc()
    if nvrtc is None:
        pytest.skip("no NVRTC library (pip install 'leanopt[nvrtc]', or set LEANOPT_NVRTC)")
    default = {label: source for label, _, source in gpu.every_source()}
    monkeypatch.setitem(gpu.VARIANT, "lanes", True)
    monkeypatch.setitem(gpu.VARIANT, "blocks", blocks)
    sources = gpu.every_source()
    changed = [(label, name, source) for label, name, source in sources if source != default[label]]
    assert [s[0] for s in changed] == [s[0] for s in sources if "lo_max_bits" in s[2]], "not only the grouped"
    grouped = 0
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # NVRTC runs without the GIL: ~1.8x on 2 cores
        built = pool.map(lambda k: gpu.nvrtc_compile(nvrtc, k[2], k[1], arch, ("--ptxas-options=-v",)), changed)
        for (label, name, _), (cubin, mangled, log) in zip(changed, built, strict=True):
            assert cubin[:4] == b"\x7fELF" and name in mangled, label
            grouped += 1
            registers = int(re.search(r"Used (\d+) registers", log).group(1))
            spilled = int(re.search(r"(\d+) bytes spill stores", log).group(1))
            assert registers <= (128 if blocks else 255), (label, registers)
            assert spilled <= (4 if not blocks else 384), (label, spilled, log)
    assert grouped >= 30  # every rule x weight format with int8 and int4 states, and fp16 weights


@pytest.mark.parametrize("search", [0, 2])
def test_each_way_of_finding_a_blocks_tensor_compiles_with_nvrtc(monkeypatch, search):
    """``VARIANT["search"]`` 0 (the binary search of before, the fallback) and 2 (the block's first warp,
    shared): the CUDA lines they alone use compile for sm_90 (the default, 1, in the test above); on the
    CPU all three run the same search."""
    nvrtc = gpu.find_nvrtc()
    if nvrtc is None:
        pytest.skip("no NVRTC library (pip install 'leanopt[nvrtc]', or set LEANOPT_NVRTC)")
    monkeypatch.setitem(gpu.VARIANT, "search", search)
    assert f"#define LO_SEARCH {search}" in gpu._find()
    for label, name, source in [s for s in gpu.every_source() if s[0] in ("nan check", "AdamW/compact/int8")]:
        cubin, mangled, _ = gpu.nvrtc_compile(nvrtc, source, name, "sm_90")
        assert cubin[:4] == b"\x7fELF" and name in mangled, label


# ----------------------------------------------------------------------------------------- on a GPU


@CUDA
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_kernels_match_the_native_cpu_kernels_bit_for_bit(case):
    """The real kernels (NVRTC, one launch per combination) against the native CPU kernels."""
    if native.compiler() is None:
        pytest.skip("needs a C compiler for the native CPU kernels it is compared with")
    cls, hyper = CASES[case]
    gpu.reset()
    combos = list(itertools.product(WEIGHTS, STATES))
    if case != "adamw":  # the others: every weight format with fp32 states, every state format with exact
        combos = [(m, "fp32") for m in WEIGHTS] + [("exact", st) for st in STATES[1:]]
    for master, states in combos:
        if cls is leanopt.Lion and master == "auto":
            continue
        ref = snapshot(*train("auto", cls, master, states, hyper))
        before = {id(k): k.launches for k in gpu.compile_stats()}
        ours = snapshot(*train("fused", cls, master, states, hyper, device="cuda"))
        assert_same(ref, ours, f"cuda {master}/{states}")
        ran = [k for k in gpu.compile_stats() if k.launches > before.get(id(k), 0)]
        assert ran, f"{master}/{states}: the CUDA kernels did not run"


@CUDA
@pytest.mark.parametrize("search", [0, 1, 2])
def test_cuda_many_tensors_give_the_native_bits_with_each_search(monkeypatch, search):
    """70 tensors in one launch (the 32-way search takes two rounds for them, ballots on the GPU) with
    each ``VARIANT["search"]``: grouped and flat kernels and the NaN/inf check against the native CPU
    kernels, bit for bit, a NaN in one tensor skipping that tensor only."""
    if native.compiler() is None:
        pytest.skip("needs a C compiler for the native CPU kernels it is compared with")
    monkeypatch.setitem(gpu.VARIANT, "search", search)
    gpu.reset()
    shapes = [(k % 7 + 1, 32 * (k % 3 + 1)) if k % 2 else (k * 13 % 300 + 1,) for k in range(70)]
    for states in ("int8", "fp32"):
        ref = snapshot(*train("auto", leanopt.AdamW, "compact", states, dict(lr=1e-2), shapes=shapes))
        ours = snapshot(*train("fused", leanopt.AdamW, "compact", states, dict(lr=1e-2), device="cuda",
                               shapes=shapes))  # fmt: skip
        assert_same(ref, ours, f"search={search} {states}")
    grads = [torch.randn(int(n), device="cuda").bfloat16() for n in torch.randint(1, 5000, (90,)).tolist()]
    grads[77][-1] = float("nan")
    assert gpu.all_finite_many(grads) == [i != 77 for i in range(90)]
    gpu.reset()


@CUDA
@pytest.mark.parametrize("blocks", [0, 2])
def test_cuda_lanes_kernels_give_the_native_bits(monkeypatch, blocks):
    """``VARIANT["lanes"]`` on the GPU (a lane per int8/int4 group, its states in registers; ``blocks=2``:
    at most 128 registers, some spilled): each weight format with int8 or int4 states, AdamW with and
    without AMSGrad's third state, SGD with momentum, on shapes with rows of whole groups (aligned: 16-byte
    accesses) and ragged rows (element by element at their ends), against the native CPU kernels."""
    if native.compiler() is None:
        pytest.skip("needs a C compiler for the native CPU kernels it is compared with")
    monkeypatch.setitem(gpu.VARIANT, "lanes", True)
    monkeypatch.setitem(gpu.VARIANT, "blocks", blocks)
    gpu.reset()
    shapes = [(3, 70), (33, 1000), (4, 33), (64, 64), (130,), (1, 70)]
    formats = [
        ("exact", "int8"),
        ("compact", "int8"),
        ("compact", "int4"),
        ("kahan", "int4"),
        ("stochastic", "int8"),
        ("none", "int4"),
    ]  # (each a kernel of its own, compiled by NVRTC in the test's time)
    cases = [(leanopt.AdamW, master, states, dict(lr=1e-2, weight_decay=0.1)) for master, states in formats]
    cases += [(leanopt.AdamW, "compact", "int8", dict(lr=1e-2, amsgrad=True)),
              (leanopt.SGD, "compact", "int4", dict(lr=1e-2, momentum=0.9))]  # fmt: skip
    for cls, master, states, hyper in cases:
        ref = snapshot(*train("auto", cls, master, states, hyper, shapes=shapes))
        ours = snapshot(*train("fused", cls, master, states, hyper, device="cuda", shapes=shapes))
        assert_same(ref, ours, f"lanes blocks={blocks} {cls.__name__} {master}/{states}")
    assert any(k.spec.grouped and k.groups_per_warp == 32 for k in gpu.compile_stats())
    gpu.reset()


@CUDA
@pytest.mark.parametrize("nonfinite,most", [("ignore", 0), ("skip", 0), ("raise", 1)])
def test_cuda_step_is_one_launch_per_combination_and_waits_at_most_once(nonfinite, most, cuda_waits):
    """A planned CUDA step: one launch for 50 tensors; no wait for the GPU with nonfinite="ignore" or
    "skip" (its verdicts are copied back behind the check and read later), one with "raise"."""
    gpu.reset()
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 64, device="cuda").bfloat16()) for _ in range(50)]
    opt = leanopt.AdamW(params, lr=1e-3, master="compact", states="int8", kernel="fused", nonfinite=nonfinite)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    torch.cuda.synchronize()
    (kernel,) = gpu.compile_stats()
    launches = kernel.launches
    waits = cuda_waits(opt.step)
    assert kernel.launches == launches + 1 and isinstance(opt._step_plan, gpu.GpuStepPlan)
    assert len(waits) <= most, waits[:3]


@CUDA
def test_cuda_next_step_waits_for_the_nan_check_not_for_the_updates(monkeypatch):
    """A planned step's verdicts are on the host as soon as its NaN/inf check has run: here each update
    kernel is held back ~1 s behind a sleep on the stream, and the verdicts' copy is done (and read by
    ``last_skipped``, as the next ``step()`` reads them) while the stream is still busy with it."""
    gpu.reset()
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(256, 256, device="cuda").bfloat16()) for _ in range(20)]
    opt = leanopt.AdamW(params, lr=1e-3, master="compact", states="int8", kernel="fused", nonfinite="skip")
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    torch.cuda.synchronize()
    assert isinstance(opt._step_plan, gpu.GpuStepPlan)
    for k in gpu.compile_stats():
        real = k.fn

        def slow(*args, real=real):
            torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU clock cycles before the update
            real(*args)

        monkeypatch.setattr(k, "fn", slow)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    event = opt._step_verdicts[0]
    start = time.monotonic()
    while not event.query() and time.monotonic() - start < 20:
        time.sleep(0.001)
    assert event.query(), "the verdicts' copy never finished"
    assert not torch.cuda.current_stream().query(), "the verdicts' copy waited for the update kernels"
    assert opt.last_skipped == [] and opt._step_verdicts is None
    assert not torch.cuda.current_stream().query(), "reading the verdicts waited for the update kernels"
    torch.cuda.synchronize()
    gpu.reset()


# ----------------------------------------------------------------------- whole steps and the NaN check


def test_the_nan_checks_flags_stay_on_the_device_for_fsdp2s_all_reduce(emulate):
    """gpu.finite_flags: the check's int32 verdicts (1: finite) as a tensor on the gradients' device,
    not read back (FSDP2 all-reduces them there: leanopt.distributed.finite_checks)."""
    grads = [torch.randn(5000).bfloat16(), torch.randn(7), torch.randn(9000).half(), torch.zeros(0)]
    grads[2][4321] = float("inf")
    flags = gpu.finite_flags(grads)
    assert flags.dtype == torch.int32 and flags.device == grads[0].device and flags.tolist() == [1, 1, 0, 1]
    assert gpu.finite_flags([torch.randn(4, 8)[:, ::2]]) is None  # gaps in memory: the caller checks per tensor
    assert leanopt.distributed._device_flags(grads) is None  # CPU shards: native.all_finite_many instead


@CUDA
def test_cuda_fsdp2_shard_flags_come_from_one_check_launch():
    grads = [torch.randn(5000, device="cuda").bfloat16(), torch.randn(7, device="cuda"), torch.zeros(0, device="cuda")]
    grads[1][3] = float("nan")
    gpu.reset()
    flags = leanopt.distributed._device_flags(grads)
    assert flags is not None and flags.device.type == "cuda" and flags.tolist() == [1, 0, 1]
    gpu.reset()


@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_multi_tensor_nan_check_finds_each_bad_value_where_it_is(emulate, monkeypatch, dtype, chunks):
    """One launch over many gradients: NaN, +inf and -inf at the first, a middle and the last element
    of tensors around the block size (gpu.CHECK_BYTES = 8192 bytes: 4096 bf16/fp16 or 2048 fp32
    values, or 3 x that for ``chunks=3``: then a value in a block's second or third chunk) and a
    thread's 16-byte loads (sizes that end inside one), next to clean and empty tensors; tensors whose
    address is not a multiple of 16 (views from the second element) are read element by element."""
    monkeypatch.setitem(gpu.VARIANT, "chunks", chunks)
    assert gpu.CHECK_BYTES == 8192
    sizes = [1, 5, 1023, 2047, 2049, 4095, 4096, 4097, 6144 + 1, 8192 + 3, 12288 + 9, 3 * 12288 + 2, 0]
    for value, where in itertools.product([float("nan"), float("inf"), float("-inf")], ["first", "mid", "last"]):
        for target in range(len(sizes) - 1):
            grads = [torch.randn(n).to(dtype) for n in sizes]
            n = sizes[target]
            grads[target][{"first": 0, "mid": n // 2, "last": n - 1}[where]] = value
            flags = gpu.all_finite_many(grads)
            assert flags == [i != target for i in range(len(sizes))], (value, where, n)
    assert gpu.all_finite_many([torch.randn(3000).to(dtype), torch.zeros(0, dtype=dtype)]) == [True, True]
    big = torch.full((5000,), 65504.0 if dtype == torch.float16 else 3.0e38, dtype=dtype)  # largest finite
    assert gpu.all_finite_many([big]) == [True]
    dense = torch.randn(4, 6).t()  # dense, not contiguous (a transpose): memory order is as good
    assert gpu.all_finite_many([dense]) == [True]
    dense[5, 3] = value
    assert gpu.all_finite_many([dense]) == [False]
    assert gpu.all_finite_many([torch.randn(4, 8)[:, ::2]]) is None  # gaps in memory: checked per tensor
    sizes = torch.randint(1, 3000, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    grads = [torch.randn(n).to(dtype) for n in sizes]
    for target in (0, 31, 32, 33, 150, 299):  # many tensors: the search for a block's tensor takes rounds
        grads[target][-1] = float("nan")
        assert gpu.all_finite_many(grads) == [i != target for i in range(300)], target
        grads[target][-1] = 0.0
    for n, where in itertools.product([7, 4100], [0, 3, -1]):  # misaligned: from the second element on
        grads = [torch.randn(n + 1).to(dtype)[1:], torch.randn(n).to(dtype)]
        assert grads[0].data_ptr() % 16 != 0
        assert gpu.all_finite_many(grads) == [True, True]
        grads[0][where] = float("nan")
        grads[1][where] = float("inf")
        assert gpu.all_finite_many(grads) == [False, False], (n, where)


def test_the_tensor_search_finds_the_last_row_at_or_before_a_block():
    """lo_find (every kernel's first step: which tensor a block belongs to), as the CPU runs it: the 32-way
    search's rounds against Python's bisect, on tables of 1 to 3000 rows with repeated first blocks (empty
    tensors) and rows spaced far apart, for blocks at, between and after the rows' first blocks."""
    import bisect
    import ctypes

    source = (
        gpu._CUDA_PRELUDE
        + gpu._find()
        + """
void lo_find_each(const int64_t *meta, int count, int stride, const int64_t *units, int n, int32_t *out) {
  for (int i = 0; i < n; i++) out[i] = lo_find(meta, count, units[i], stride);
}"""
    )
    c = ctypes
    fn = native.build(source, "lo_find_each", [c.c_void_p, c.c_int, c.c_int, c.c_void_p, c.c_int, c.c_void_p]).fn
    g = torch.Generator().manual_seed(0)
    for count in [1, 2, 31, 32, 33, 64, 100, 1023, 1024, 1025, 3000]:
        for stride in (4, 7):
            sizes = torch.randint(0, 5, (count,), generator=g)
            sizes[torch.rand(count, generator=g) < 0.1] = 0  # empty tensors: the next row starts there too
            sizes[torch.rand(count, generator=g) < 0.05] = 100_000
            first = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)[:-1]])
            meta = torch.zeros(count, stride, dtype=torch.int64)
            meta[:, 0] = first
            total = int(sizes.sum()) + 3
            units = torch.unique(torch.cat([first, first + 1, torch.randint(0, total, (500,), generator=g)]))
            out = torch.empty(len(units), dtype=torch.int32)
            fn(meta.data_ptr(), count, stride, units.data_ptr(), len(units), out.data_ptr())
            want = [bisect.bisect_right(first.tolist(), u) - 1 for u in units.tolist()]
            assert out.tolist() == want, (count, stride)


class Spy:
    """Counts planned steps (gpu.run_plan returning [])."""

    def __init__(self, monkeypatch):
        self.planned = 0
        real = gpu.run_plan

        def run_plan(plan, opt):
            out = real(plan, opt)
            self.planned += out == []
            return out

        monkeypatch.setattr(gpu, "run_plan", run_plan)


@pytest.mark.parametrize("master", ["compact", "stochastic"])  # stochastic: each update's key in the table
def test_planned_steps_give_the_native_bits_with_one_launch_per_kernel(emulate, monkeypatch, master):
    spy = Spy(monkeypatch)
    shapes = [(5, 64), (7,), (3, 70), (33, 1000), (4, 33)]
    ref = snapshot(*train("auto", leanopt.AdamW, master, "int8", dict(lr=1e-2), steps=6, shapes=shapes,
                          late=False))  # fmt: skip
    ours = snapshot(*train("fused", leanopt.AdamW, master, "int8", dict(lr=1e-2), steps=6, shapes=shapes,
                           late=False))  # fmt: skip
    assert_same(ref, ours, "planned")
    assert spy.planned == 5  # every step after the first
    kernels = gpu.compile_stats()
    assert sorted(k.launches for k in kernels) == [6, 6]  # grouped (2-D) and flat (1-D): once per step
    assert sum(k.tensors for k in kernels) == 6 * len(shapes)


@pytest.mark.parametrize("nonfinite,check", [("ignore", "c"), ("skip", "c"), ("skip", "python")])
def test_a_planned_step_refills_one_device_table_made_at_its_first_run(emulate, monkeypatch, nonfinite, check):
    """A plan's launch tables live in one host image and one device tensor, made with its views at the
    plan's first run; each step writes what changes into the image and copies it over (before: every
    part and a new device table and a view per part each step): later planned steps allocate neither and
    still give the native bits as lr, weight decay, step counts and stochastic rounding keys change.
    The gradients' addresses go in by a C scatter after the plan's check in C, else (``check="python"``,
    the check in Python) one by one."""
    monkeypatch.setenv("LEANOPT_PLAN_CHECK", check)
    spy = Spy(monkeypatch)
    tables = []

    def schedule(i, params, opt):  # and the table the last step used (the fused run's, from its second on)
        opt.param_groups[0]["lr"] = 1e-2 / (1 + i)
        opt.param_groups[0]["weight_decay"] = 0.01 * (1 + i)
        if opt.kernel == "fused" and i >= 2:
            table = opt._step_plan.table
            tables.append((id(opt._step_plan), id(table), table.table.data_ptr(),
                           [v.data_ptr() for v in table.views], ctypes.addressof(table.image)))  # fmt: skip

    runs = native_and_gpu("stochastic", "int8", 9, 7, schedule, nonfinite=nonfinite)
    assert_same(snapshot(*runs[0]), snapshot(*runs[1]), f"refilled table {nonfinite}")
    assert spy.planned == 6 and len(tables) == 5
    assert all(t == tables[0] for t in tables), "a planned step made a new device table"
    opt = runs[1][1]
    assert bool(opt._step_plan.checker) is (check == "c")


@CUDA
def test_cuda_planned_steps_on_another_stream_give_the_same_bits():
    """A plan's device table is refilled on the current stream; when a step runs on another stream than
    the last one, that stream first waits for the old one and the table is recorded as in use by it (so
    the caching allocator does not hand it out while the new stream may still read it). Steps alternate
    between the default stream and a side stream, each stream busy (a sleep) ahead of the step queued on
    it, as a program that orders its streams (new.wait_stream(old)) does: same bits as unplanned steps."""
    gpu.reset()
    main, side = torch.cuda.current_stream(), torch.cuda.Stream()
    runs = []
    for planned in (False, True):
        g = torch.Generator().manual_seed(2)
        params = [torch.nn.Parameter(torch.randn(s, generator=g).bfloat16().cuda()) for s in [(64, 256), (300,)]]
        opt = leanopt.AdamW(params, lr=1e-2, master="compact", states="int8", kernel="fused")
        grads = [[torch.randn(p.shape, generator=g).bfloat16().cuda() for p in params] for _ in range(6)]
        torch.cuda.synchronize()
        old = main
        for i in range(6):
            stream = side if i % 2 else main
            stream.wait_stream(old)
            with torch.cuda.stream(stream):
                torch.cuda._sleep(20_000_000)  # the step's work waits behind this on its stream
                for p, gr in zip(params, grads[i], strict=True):
                    p.grad = gr
                opt.param_groups[0]["lr"] = 1e-2 / (1 + i)
                if not planned:
                    opt._step_plan = None
                opt.step()
            old = stream
            if planned and i >= 1:
                assert isinstance(opt._step_plan, gpu.GpuStepPlan) and opt._step_plan.table is not None
        main.wait_stream(old)
        torch.cuda.synchronize()
        runs.append([(k, v.cpu()) for k, v in snapshot(params, opt)])
    assert_same(runs[0], runs[1], "planned steps across streams")
    gpu.reset()


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_a_nan_in_a_planned_step_is_handled_by_the_general_path(emulate, monkeypatch, nonfinite):
    """skip: the planned step checks on the device and leaves that tensor alone, the verdicts are read
    when first needed (here: last_skipped); raise: it waits for them and the general path raises."""
    spy = Spy(monkeypatch)
    results, counts = [], []
    for kernel in ("auto", "fused"):
        g = torch.Generator().manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(s, generator=g).bfloat16()) for s in [(4, 64), (9,), (3, 70)]]
        opt = leanopt.AdamW(params, lr=1e-2, master="exact", states="int4", kernel=kernel, nonfinite=nonfinite)
        for i in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).bfloat16()
            if i == 2:
                params[2].grad[1, 7] = float("inf")
                before = snapshot(params, opt)
                before = [(k, v.clone()) for k, v in before]
            if i == 2 and nonfinite == "raise":
                with pytest.raises(FloatingPointError, match="parameter 2"):
                    opt.step()
                assert_same(before, snapshot(params, opt), "raise changed something")
                continue
            planned = spy.planned
            opt.step()
            if i == 2:
                if kernel == "fused" and nonfinite == "skip":
                    assert spy.planned == planned + 1 and opt._step_verdicts is not None  # not read yet
                assert opt.last_skipped == [2] and opt._step_verdicts is None
        results.append(snapshot(params, opt))
        counts.append(opt.nonfinite_skipped)
    assert_same(results[0], results[1], nonfinite)
    assert counts == ([1, 1] if nonfinite == "skip" else [0, 0])
    assert spy.planned >= 1


def test_a_planned_step_checks_with_the_kernel_its_table_was_made_for(emulate, monkeypatch):
    """The NaN/inf check's table maps blocks to gradients for one block size (``VARIANT["chunks"]``
    x gpu.CHECK_BYTES bytes); a plan made under ``chunks=4`` keeps checking 4 x 4096 bf16 values a block
    after the setting changes (else only the first 4096 of each block would be read)."""
    monkeypatch.setitem(gpu.VARIANT, "chunks", 4)
    g = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).bfloat16()) for s in [(6000,), (5, 64)]]
    opt = leanopt.AdamW(params, lr=1e-2, master="exact", states="fp32", kernel="fused")
    for step in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).bfloat16()
        if step == 2:
            monkeypatch.setitem(gpu.VARIANT, "chunks", 1)
            params[0].grad[5000] = float("nan")  # in the first block of 4 x 4096, not in its first 4096
            before = params[0].detach().clone()
        opt.step()
    assert isinstance(opt._step_plan, gpu.GpuStepPlan) and opt._step_plan.finite[4] == 4
    assert opt.last_skipped == [0]
    assert torch.equal(bits(params[0]), bits(before))


def test_a_planned_skip_step_copies_its_verdicts_between_the_check_and_the_updates(emulate, monkeypatch):
    """The next ``step()`` reads this step's NaN/inf verdicts (they decide the step counts), so their
    copy is queued right behind the check kernel, ahead of the update kernels: on CUDA's one stream,
    waiting for it does not wait for the updates (the CUDA test below measures that on a GPU)."""
    g = torch.Generator().manual_seed(4)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).bfloat16()) for s in [(5, 64), (9,), (3, 70)]]
    opt = leanopt.AdamW(params, lr=1e-2, master="compact", states="int8", kernel="fused")
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).bfloat16()
        opt.step()
    assert isinstance(opt._step_plan, gpu.GpuStepPlan)
    order = []

    def spy(name, real):
        return lambda *a: (order.append(name), real(*a))[1]

    for k in gpu.compile_stats():
        monkeypatch.setattr(k, "fn", spy("update", k.fn))
    key = (torch.device("cpu"), gpu.VARIANT["chunks"])
    monkeypatch.setitem(gpu._FINITE, key, spy("check", gpu._FINITE[key]))
    monkeypatch.setattr(gpu, "_verdicts_later", spy("verdicts", gpu._verdicts_later))
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).bfloat16()
    opt.step()
    assert order == ["check", "verdicts", "update", "update"]
    assert opt.last_skipped == [] and opt._step_verdicts is None


def native_and_gpu(master, states, seed, steps, before_step, **options):
    """Two AdamW runs on (4, 64) and (9,) bf16 tensors, one with the native kernels (kernel="auto"), one
    through the CUDA kernels' code (kernel="fused", emulated): the same gradients, and
    ``before_step(i, params, opt)`` before each step i; ``options``: more of AdamW's arguments. Returns
    [(params, opt)] for both."""
    runs = []
    for kernel in ("auto", "fused"):
        g = torch.Generator().manual_seed(seed)
        params = [torch.nn.Parameter(torch.randn(s, generator=g).bfloat16()) for s in [(4, 64), (9,)]]
        opt = leanopt.AdamW(params, lr=1e-2, master=master, states=states, kernel=kernel, **options)
        for i in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).bfloat16()
            before_step(i, params, opt)
            opt.step()
        runs.append((params, opt))
    return runs


def test_planned_step_verdicts_are_counted_even_if_never_read_before_the_next_step(emulate):
    def poison(i, params, opt):  # last_skipped and nonfinite_skipped are not looked at in between
        if i in (2, 3):
            params[i - 2].grad.view(-1)[-1] = float("nan")

    runs = native_and_gpu("compact", "int8", 8, 5, poison)
    # a checkpoint reads them too: the step counts it holds are the settled ones
    assert float(runs[1][1].state_dict()["state"][0]["step"]) == 4.0
    assert_same(snapshot(*runs[0]), snapshot(*runs[1]), "never read")
    assert [(o.nonfinite_skipped, o.last_skipped) for _, o in runs] == [(2, []), (2, [])]


def test_a_step_count_changed_from_outside_is_followed(emulate, monkeypatch):
    spy = Spy(monkeypatch)

    def resume(i, params, opt):
        if i == 2:
            opt.state[params[0]]["step"] += 10  # e.g. a user resuming a schedule

    runs = native_and_gpu("exact", "fp32", 6, 4, resume)
    assert_same(snapshot(*runs[0]), snapshot(*runs[1]), "step count")
    assert float(runs[1][1].state[runs[1][0][0]]["step"]) == 14.0
    assert spy.planned >= 1


# ---------------------------------------------------------------------------------- gradient release


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(40, 70), torch.nn.Tanh(), torch.nn.Linear(70, 33)).bfloat16()


def _release_run(kernel, release, states, poison_at=1, steps=4, device="cpu", plans=None):
    """``steps`` steps; at ``poison_at`` the first layer's weight gradient holds a NaN. ``plans``: a list
    that gets the types of the release hooks' plans at the end."""
    model = _net().to(device)
    opt = leanopt.AdamW(model.parameters(), lr=1e-2, master="exact", states=states, kernel=kernel)
    handle = leanopt.release_gradients(opt) if release else None
    g = torch.Generator().manual_seed(9)
    skipped = []
    for i in range(steps):
        x = torch.randn(8, 40, generator=g).bfloat16().to(device)
        hook = model[0].weight.register_hook(lambda grad: grad * float("nan")) if i == poison_at else None
        model(x).float().pow(2).mean().backward()
        if hook is not None:
            hook.remove()
        opt.step()
        opt.zero_grad()
        skipped.append(list(opt.last_skipped))
    if handle is not None:
        if plans is not None:
            plans += [type(p) for p in handle._plans.values()]
        handle.remove()
    return model, opt, skipped


@pytest.mark.parametrize("states", ["fp32", "int8"])
def test_release_checks_nan_on_the_device_and_settles_at_step(emulate, monkeypatch, states):
    """Gradient release with kernel="fused" on the CUDA path: no host-side NaN/inf check per tensor
    during backward (each hook queues a check launch and an update launch that leaves a bad tensor
    alone); optimizer.step() reads the verdicts. Same bits, skips and counts as an ordinary native step."""
    import leanopt.distributed as shards

    ref_model, ref_opt, ref_skipped = _release_run("auto", False, states)
    calls = []
    real = shards.all_finite
    monkeypatch.setattr(shards, "all_finite", lambda t: calls.append(1) or real(t))
    model, opt, skipped = _release_run("fused", True, states)
    assert calls == []  # no per-tensor verdict on the host
    assert skipped == ref_skipped and skipped[1] == [0]
    assert opt.nonfinite_skipped == ref_opt.nonfinite_skipped == 1
    ref = snapshot(list(ref_model.parameters()), ref_opt)
    ours = snapshot(list(model.parameters()), opt)
    assert_same(ref, ours, f"release {states}")
    # every update was queued, the poisoned one too: the kernel left it alone on the device
    assert sum(k.tensors for k in gpu.compile_stats()) == 4 * 4


def test_release_nan_at_a_first_update_leaves_no_state(emulate):
    """A NaN in a parameter's first released update on the CUDA path: its state was made for the queued
    launches; step() reads the verdict and removes that state again, as an ordinary step never makes
    one for a skipped tensor (so a state_dict taken then is the same); later steps give the same bits."""
    ref_model, ref_opt, ref_skipped = _release_run("auto", False, "int8", poison_at=0, steps=1)
    model, opt, skipped = _release_run("fused", True, "int8", poison_at=0, steps=1)
    assert skipped == ref_skipped == [[0]]
    assert model[0].weight not in opt.state and ref_model[0].weight not in ref_opt.state
    assert opt.state_dict()["state"].keys() == ref_opt.state_dict()["state"].keys()
    ref_model, ref_opt, _ = _release_run("auto", False, "int8", poison_at=0, steps=3)
    model, opt, _ = _release_run("fused", True, "int8", poison_at=0, steps=3)
    assert float(opt.state[model[0].weight]["step"]) == 2
    assert_same(snapshot(list(ref_model.parameters()), ref_opt), snapshot(list(model.parameters()), opt), "after")


@CUDA
@pytest.mark.parametrize("states", ["fp32", "int8"])
def test_cuda_release_plans_give_the_bits_of_ordinary_steps(states):
    """On a GPU, gradient release's hook plans (gpu.GpuParamPlan: a launch table kept on the device,
    refilled through a pinned non-blocking copy per hook) give the bits, skips and counts of ordinary
    steps: 5 steps, a NaN at the third (the emulated tests check the same on the CPU)."""
    ref_model, ref_opt, ref_skipped = _release_run("auto", False, states, poison_at=2, steps=5, device="cuda")
    plans: list = []
    model, opt, skipped = _release_run("auto", True, states, poison_at=2, steps=5, device="cuda", plans=plans)
    assert plans and all(p is gpu.GpuParamPlan for p in plans), plans
    assert skipped == ref_skipped and skipped[2] == [0]
    assert opt.nonfinite_skipped == ref_opt.nonfinite_skipped == 1
    ref = snapshot(list(ref_model.parameters()), ref_opt)
    ours = snapshot(list(model.parameters()), opt)
    assert_same([(k, v.cpu()) for k, v in ref], [(k, v.cpu()) for k, v in ours], f"release plans {states}")


@CUDA
def test_cuda_release_never_waits_in_backward_and_once_at_step(cuda_waits):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)]).cuda().bfloat16()
    opt = leanopt.AdamW(model.parameters(), lr=1e-3, master="compact", states="int8", kernel="fused")
    handle = leanopt.release_gradients(opt)
    x = torch.randn(32, 256, device="cuda").bfloat16()
    for _ in range(2):
        model(x).float().pow(2).mean().backward()
        opt.step()
    torch.cuda.synchronize()
    waits = {"backward": cuda_waits(lambda: model(x).float().pow(2).mean().backward()), "step": cuda_waits(opt.step)}
    handle.remove()
    assert not waits["backward"], waits["backward"][:3]
    assert len(waits["step"]) <= 1, waits["step"][:3]
    assert float(opt.state[model[0].weight]["step"]) == 3 and opt.last_skipped == []


@CUDA
def test_cuda_kernels_build_without_the_cuda_toolkit(monkeypatch):
    """Where torch.cuda._compile_kernel cannot find the CUDA toolkit (it adds its include folder), the
    kernels are built by NVRTC directly (they include no header): same bits as the native CPU kernels."""
    if native.compiler() is None:
        pytest.skip("needs a C compiler for the native CPU kernels it is compared with")

    def no_toolkit(*args, **kwargs):
        raise OSError("CUDA_HOME environment variable is not set (planted)")

    monkeypatch.setattr(torch.cuda, "_compile_kernel", no_toolkit)
    gpu.reset()
    for states in ("fp32", "int4"):
        ref = snapshot(*train("auto", leanopt.AdamW, "compact", states, dict(lr=1e-2)))
        ours = snapshot(*train("fused", leanopt.AdamW, "compact", states, dict(lr=1e-2), device="cuda"))
        assert_same(ref, ours, f"direct NVRTC {states}")
    assert gpu.compile_stats() and all(k.launches for k in gpu.compile_stats())


class _FakeNvrtc:
    """NVRTC's C API as _nvrtc_direct calls it, recorded (no GPU here): a compile error with its log, or
    a CUBIN handed to the module loader."""

    def __init__(self, fail: bool):
        self.fail, self.calls, self.options = fail, [], []

    def __getattr__(self, name):
        def call(*args):
            self.calls.append(name)
            if name == "nvrtcCompileProgram":
                self.options = [args[2][i] for i in range(args[1])]
                return 6 if self.fail else 0
            if name in ("nvrtcGetProgramLogSize", "nvrtcGetCUBINSize"):
                args[1]._obj.value = 16
            if name == "nvrtcGetProgramLog":
                args[1].value = b"planted error"
            if name == "nvrtcGetCUBIN":
                args[1].raw = b"CUBIN-bytes-here"
            if name == "nvrtcGetErrorString":  # returns the name (restype c_char_p)
                return b"NVRTC_ERROR_COMPILATION" if args[0] == 6 else b"?"
            return 0

        return call


@pytest.mark.parametrize("fail", [False, True])
def test_direct_nvrtc_call_sequence(monkeypatch, fail):
    from torch.cuda import _utils

    fake, loaded = _FakeNvrtc(fail), []
    monkeypatch.setattr(_utils, "_get_gpu_rtc_library", lambda: fake)
    monkeypatch.setattr(_utils, "_cuda_load_module", lambda cubin, names: loaded.append(cubin) or {names[0]: "k"})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    if fail:
        with pytest.raises(RuntimeError, match="(?s)NVRTC_ERROR_COMPILATION.*planted error"):
            gpu._nvrtc_direct(gpu._finite_source(), "lo_cuda_finite")
    else:
        assert gpu._nvrtc_direct(gpu._finite_source(), "lo_cuda_finite") == "k"
        assert loaded == [b"CUBIN-bytes-here"]
    assert fake.options == [b"--gpu-architecture=sm_90", b"--fmad=false"]
    assert fake.calls[0] == "nvrtcCreateProgram" and fake.calls[-1] == "nvrtcDestroyProgram"


def test_auto_and_fused_take_the_cuda_kernels_on_cuda_and_only_fused_is_emulated(monkeypatch):
    """kernel="auto" on CUDA runs the multi-tensor CUDA kernels (the H200 run of
    benchmarks/results/gpu-2026-11-29 measured them far ahead of the per-tensor compiled and eager
    paths), as "fused" does; "reference" never; LEANOPT_GPU_KERNELS=0 turns them off; on the CPU
    only "fused" with EMULATE (tests) takes them, "auto" stays on the native CPU kernels."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("LEANOPT_GPU_KERNELS", raising=False)
    assert gpu.wanted("auto", cuda) and gpu.wanted("fused", cuda)
    assert not gpu.wanted("reference", cuda)
    monkeypatch.setattr(gpu, "EMULATE", True)
    assert gpu.wanted("fused", cpu)
    assert not gpu.wanted("auto", cpu) and not gpu.wanted("reference", cpu)
    monkeypatch.setattr(gpu, "EMULATE", False)
    assert not gpu.wanted("fused", cpu)
    monkeypatch.setenv("LEANOPT_GPU_KERNELS", "0")
    assert not gpu.wanted("auto", cuda) and not gpu.wanted("fused", cuda)


@pytest.mark.parametrize("offset", [0, 1, 3])
def test_vector_loads_go_element_by_element_where_a_tensor_is_not_aligned(emulate, monkeypatch, offset):
    """``VARIANT["vec"]`` reads and writes a thread's 4 elements in one access only where every array
    is aligned for it; parameters that are views starting ``offset`` elements into a buffer (as a
    flattened or split model's are) take the element-by-element path, with the native kernels' bits."""
    monkeypatch.setitem(gpu.VARIANT, "vec", True)

    def run(kernel):
        torch.manual_seed(0)
        buf = torch.randn(offset + 4 * 1030 + 7).bfloat16()
        params = [torch.nn.Parameter(buf[offset : offset + 4 * 1030].view(4, 1030)),
                  torch.nn.Parameter(torch.randn(257).bfloat16())]  # fmt: skip
        opt = leanopt.AdamW(params, lr=1e-2, master="compact", states="fp32", kernel=kernel)
        for i in range(3):
            for p in params:
                p.grad = torch.randn(p.shape).bfloat16() * 10.0**-i
            opt.step()
        return [p.detach().clone() for p in params] + [t for p in params for t in opt.state[p].values()]

    gpu.reset()
    ours, ref = run("fused"), run("auto")
    assert gpu.compile_stats(), "the CUDA kernels' path did not run"
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(bits(a), bits(b))


def test_the_variant_can_be_set_from_the_environment_and_bad_values_are_named():
    """LEANOPT_GPU_VARIANT sets gpu.VARIANT at import (a fresh interpreter: the kernels it builds are
    the variant's); a bad key or value raises an error naming the variable and what is accepted."""
    import sys

    assert gpu.parse_variant("chunks=4, vec=1,table=0") == {"chunks": 4, "vec": True, "table": False}
    assert gpu.parse_variant("") == {}
    for bad, needle in [("speed=2", "KEY one of"), ("vec", "KEY=VALUE"), ("vec=2", "vec='2'"),
                        ("chunks=0", "[1, 64]"), ("groups=x", "groups='x'")]:  # fmt: skip
        with pytest.raises(ValueError, match="LEANOPT_GPU_VARIANT") as err:
            gpu.parse_variant(bad)
        assert needle in str(err.value), (bad, str(err.value))
    code = "from leanopt.kernels import gpu; print(gpu.VARIANT['chunks'], gpu.VARIANT['vec'], gpu.VARIANT['hoist'])"
    env = {**os.environ, "LEANOPT_GPU_VARIANT": "chunks=4,vec=1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["4", "True", "True"]


class _FakeEvent:
    """A CUDA event's part the pinned pool uses: recorded on a stream, done when the test says so."""

    def __init__(self) -> None:
        self.done, self.records = False, []

    def record(self, stream=None) -> None:
        self.done = False
        self.records.append(stream)

    def query(self) -> bool:
        return self.done


def test_the_pinned_pool_reuses_a_buffer_only_after_its_copy_has_run():
    """gpu._PinnedPool: a buffer handed back behind a copy (a stream given) is not handed out again until
    the event recorded behind that copy is done; one handed back after its contents were read (no
    stream) is free at once; sizes are rounded up to a power of two (at least MIN); at most LIMIT idle
    buffers are kept. A buffer reused while its copy still reads it would send the next launch's table
    in place of this one's: wrong pointers on the device."""
    made: list[int] = []

    def alloc(size: int) -> torch.Tensor:
        made.append(size)
        return torch.empty(size, dtype=torch.uint8)

    pool = gpu._PinnedPool(alloc, _FakeEvent)
    a, ev = pool.take(100)
    assert ev is None and made == [pool.MIN] and a.numel() == pool.MIN
    pool.put(a, ev, stream="s0")
    ((_, _, waits),) = pool.idle
    assert waits
    b, ev_b = pool.take(100)  # a's copy has not run: a new buffer
    assert b.data_ptr() != a.data_ptr() and len(made) == 2
    pool.idle[0][1].done = True  # a's copy ran
    c, ev_c = pool.take(200)
    assert c.data_ptr() == a.data_ptr() and ev_c.records == ["s0"] and len(made) == 2
    pool.put(c, ev_c, stream="s1")
    assert ev_c.records == ["s0", "s1"] and not ev_c.done  # recorded again: busy until this copy ran
    assert pool.take(10)[0].data_ptr() not in (a.data_ptr(), b.data_ptr())
    pool.put(b, ev_b, stream=None)  # read back and done with: free now, no event needed
    assert pool.take(50)[0].data_ptr() == b.data_ptr()
    big, _ = pool.take(5000)
    assert big.numel() == 8192 and made[-1] == 8192
    pool.put(big, None, None)
    assert pool.take(4097)[0].data_ptr() == big.data_ptr()  # big enough: reused
    for _ in range(pool.LIMIT + 5):
        pool.put(torch.empty(pool.MIN, dtype=torch.uint8), None, None)
    assert len(pool.idle) == pool.LIMIT
    # the GPU behind: every idle buffer busy; a take asks QUERIES events (oldest first), not all of them
    queried = []

    class Counted(_FakeEvent):
        def query(self) -> bool:
            queried.append(self)
            return self.done

    busy = gpu._PinnedPool(alloc, Counted)
    for _ in range(10):
        buf, ev = busy.take(64)
        busy.put(buf, ev, stream="s")
    queried.clear()
    fresh, _ = busy.take(64)
    assert len(queried) == busy.QUERIES and all(b.data_ptr() != fresh.data_ptr() for b, _, _ in busy.idle)
    oldest, event, _ = busy.idle[0]
    event.done = True  # the oldest copy ran: it is found at the first question
    queried.clear()
    assert busy.take(64)[0].data_ptr() == oldest.data_ptr() and len(queried) == 1


def test_every_copy_of_the_cuda_path_takes_its_pinned_buffer_from_the_pool(monkeypatch):
    """A launch table's copy to a CUDA device (gpu._to_device) takes its pinned buffer from the device's
    pool and puts it back with the stream of the copy: checked by the calls the pool sees (the CUDA
    branch with the copy itself replaced: no GPU here; the release plans' and the verdicts' copies run
    only on a GPU: the CUDA tests)."""
    calls = []

    class Pool(gpu._PinnedPool):
        def take(self, nbytes):
            calls.append(("take", nbytes))
            return torch.empty(max(nbytes, 8), dtype=torch.uint8), None

        def put(self, buf, event, stream):
            calls.append(("put", stream))

    pool = Pool(new_event=_FakeEvent)
    monkeypatch.setattr(gpu, "_pinned", lambda device: pool)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "stream")
    device = torch.device("cuda", 0)
    real_to = torch.Tensor.to
    monkeypatch.setattr(
        torch.Tensor, "to", lambda self, *a, **k: self if a and a[0] == device else real_to(self, *a, **k)
    )
    views = gpu._to_device([array("q", [1, 2, 3]), array("f", [0.5])], device)
    assert calls == [("take", 32), ("put", "stream")]
    assert views[0].tolist() == [1, 2, 3] and views[1].tolist() == [0.5]


@CUDA
def test_cuda_launches_go_to_the_driver_not_through_torchs_kernel_wrapper(monkeypatch):
    """Each launch calls the driver's cuLaunchKernel, looked up once (gpu._driver_launch): torch's kernel
    wrapper (its __call__ opens the driver library, looks the function up and builds a Stream every time:
    ~30 us a launch on an H200 against ~10) is never called, and the bits are the native CPU kernels'."""
    if native.compiler() is None:
        pytest.skip("needs a C compiler for the native CPU kernels it is compared with")
    from torch.cuda import _utils

    def wrapper_called(*args, **kwargs):
        raise AssertionError("torch's kernel wrapper launched a kernel")

    gpu.reset()
    ref = snapshot(*train("auto", leanopt.AdamW, "compact", "int8", dict(lr=1e-2)))
    monkeypatch.setattr(_utils._CudaKernel, "__call__", wrapper_called)
    ours = snapshot(*train("fused", leanopt.AdamW, "compact", "int8", dict(lr=1e-2), device="cuda"))
    assert_same(ref, ours, "driver launches")
    assert gpu.compile_stats() and all(k.launches for k in gpu.compile_stats())


def _fsdp2_one_rank(tmp_path, device: str, waits, native_kernels: bool = False) -> None:
    """FSDP2 on one rank (gloo on the CPU with the kernels emulated or the native CPU kernels, or nccl on
    a GPU): a step checks the shards, all-reduces the verdicts and updates (on the device without the
    host waiting: ``optimizer._step_sharded``), with the same bits as the same parameters stepped
    unsharded; an inf in one gradient skips that tensor in both, counted when the verdicts are read.
    The second layer's weight (700 x 96) is above native.SMALL_TENSOR: the native plan's large-tensor
    loop skips it."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from leanopt.kernels import step_plan

    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    if device == "cuda":
        if not dist.is_nccl_available():
            pytest.skip("needs nccl")
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{tmp_path}/pg", rank=0,
                            world_size=1)  # fmt: skip
    module, name = (step_plan, "run") if native_kernels else (gpu, "run_plan")
    run_plan = getattr(module, name)
    try:
        models = []
        for _ in range(2):
            torch.manual_seed(0)
            layers = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 700))
            models.append(layers.to(device).bfloat16())
        plain, sharded = models
        assert sharded[1].weight.numel() >= native.SMALL_TENSOR
        for layer in sharded:
            fully_shard(layer)
        fully_shard(sharded)
        kernel = "auto" if native_kernels else "fused"
        opts = [leanopt.AdamW(m.parameters(), lr=1e-2, master="compact", states="int8", kernel=kernel)
                for m in models]  # fmt: skip
        gen = torch.Generator().manual_seed(1)
        stepped, planned = [], []
        original = opts[1]._step_sharded
        opts[1]._step_sharded = lambda work: stepped.append(step) or original(work)

        def counted(plan, opt):
            ran = run_plan(plan, opt)
            if ran is not None and opt is opts[1]:
                planned.append(step)
            return ran

        setattr(module, name, counted)
        for step in range(4):
            grads = [torch.randn(p.shape, generator=gen).bfloat16().to(device) for p in plain.parameters()]
            if step == 2:
                grads[2][5, 7] = float("inf")
            for p, g in zip(plain.parameters(), grads, strict=True):
                p.grad = g.clone()
            for p, g in zip(sharded.parameters(), grads, strict=True):
                p.grad = p.detach().clone()  # a DTensor placed like its parameter
                p.grad._local_tensor.copy_(g)  # one rank: its rows are the whole tensor
            opts[0].step()
            assert not waits(opts[1].step)
            assert (opts[1]._step_verdicts is not None) is not native_kernels  # queued, not read (CUDA path)
            assert opts[1].last_skipped == opts[0].last_skipped == ([2] if step == 2 else []), step
        # the first step and the one after the skip (its step counts differ from the plan's) prepare each
        # update; the others repeat the step before from its plan (FSDP2 plans: kernels/gpu.py, or
        # kernels/step_plan.py for the native kernels), the skip of step 2 included (its check all-reduced
        # and read by the updates)
        assert planned == [1, 2] and stepped == ([] if native_kernels else [0, 3]), (stepped, planned)
        for a, b in zip(plain.parameters(), sharded.parameters(), strict=True):
            assert torch.equal(bits(a), bits(b.detach()._local_tensor))
        assert opts[1].nonfinite_skipped == opts[0].nonfinite_skipped == 1
    finally:
        setattr(module, name, run_plan)
        dist.destroy_process_group()


def test_an_fsdp2_step_on_one_rank_through_the_gpu_kernels_emulated_gives_the_unsharded_bits(emulate, tmp_path):
    _fsdp2_one_rank(tmp_path, "cpu", lambda fn: fn())


def test_an_fsdp2_step_on_one_rank_through_the_native_kernels_gives_the_unsharded_bits(tmp_path):
    if native.compiler() is None:
        pytest.skip("needs a C compiler")
    _fsdp2_one_rank(tmp_path, "cpu", lambda fn: fn(), native_kernels=True)


SHARDED_CHANGES = ["gradient placed otherwise", "gradient on another mesh", "gradient a plain tensor",
                   "gradient rows not contiguous", "gradient rows another dtype", "weights' rows replaced",
                   "state DTensor replaced", "state rows replaced"]  # fmt: skip


def _change_sharded(what: str, opt, p) -> None:
    """One change an FSDP2 plan relies on, made to parameter ``p`` (one rank: its rows are the whole)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate

    g = p.grad
    if what == "gradient placed otherwise":
        p.grad = g.redistribute(g.device_mesh, [Replicate()])
    elif what == "gradient on another mesh":
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("other",))
        p.grad = DTensor.from_local(g._local_tensor, mesh, g.placements, run_check=False)
    elif what == "gradient a plain tensor":
        p.grad = g._local_tensor
    elif what == "gradient rows not contiguous":
        rows = g._local_tensor.t().contiguous().t()
        p.grad = DTensor.from_local(rows, g.device_mesh, g.placements, run_check=False)
    elif what == "gradient rows another dtype":
        g._local_tensor = g._local_tensor.float()  # (.grad's setter refuses a DTensor of another dtype)
    elif what == "weights' rows replaced":
        p._local_tensor = p._local_tensor.clone()
    elif what == "state DTensor replaced":
        key = next(k for k, v in opt.state[p].items() if v.dim())
        KEEP.append(opt.state[p][key])  # the old one stays alive (else its weak reference dies)
        opt.state[p][key] = DTensor.from_local(opt.state[p][key]._local_tensor, g.device_mesh, g.placements,
                                               run_check=False)  # fmt: skip
    elif what == "state rows replaced":
        key = next(k for k, v in opt.state[p].items() if v.dim())
        KEEP.append(opt.state[p][key]._local_tensor)
        opt.state[p][key]._local_tensor = opt.state[p][key]._local_tensor.clone()
    else:
        raise AssertionError(what)


KEEP: list = []


@pytest.mark.parametrize("path", ["cuda-emulated", "native"])
@pytest.mark.parametrize("impl", ["C", "Python"])
def test_both_plan_checks_refuse_each_change_an_fsdp2_plan_relies_on(emulate, tmp_path, impl, path, monkeypatch):
    """An FSDP2 step's plan (one rank, gloo; the CUDA kernels' plan, kernels/gpu.py, with the kernels
    emulated, and the native CPU kernels' plan, kernels/step_plan.py) checks DTensor gradients' mesh and
    placements and reads local tensors: plan_check.check gives the parameters and their local gradients'
    addresses, a new gradient DTensor placed alike is followed, and each change in SHARDED_CHANGES is
    refused (the general path then decides), by the C check and by the Python one."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from leanopt.kernels import plan_check, step_plan

    native_path = path == "native"
    monkeypatch.setattr(gpu, "EMULATE", not native_path)

    if impl == "C" and (not plan_check.available() or plan_check._function() is None):
        pytest.skip("the C check does not build here")
    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        for what in [None, *SHARDED_CHANGES]:
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Linear(24, 8)).bfloat16()
            for layer in model:
                fully_shard(layer)
            fully_shard(model)
            opt = leanopt.AdamW(model.parameters(), lr=1e-2, master="compact", states="int8",
                                kernel="auto" if native_path else "fused")  # fmt: skip
            for _ in range(2):
                for p in model.parameters():
                    p.grad = p.detach().clone()  # a new DTensor placed like its parameter
                    p.grad._local_tensor.normal_()
                opt.step()
            plan, params = opt._step_plan, list(model.parameters())
            kind = step_plan.StepPlan if native_path else gpu.GpuStepPlan
            assert isinstance(plan, kind) and plan.mesh is not None, what
            plan.checker = None if impl == "C" else False  # None: made at the next check
            checked = plan_check.check(plan, opt)
            assert checked is not None and all(a is b for a, b in zip(checked[0], params, strict=True)), what
            assert list(checked[1])[: len(params)] == [p.grad._local_tensor.data_ptr() for p in params]
            assert (plan.checker is False) is (impl == "Python")
            if what is None:
                continue
            _change_sharded(what, opt, params[2])
            assert plan_check.check(plan, opt) is None, what
    finally:
        dist.destroy_process_group()
        KEEP.clear()


@CUDA
def test_cuda_fsdp2_step_queues_check_all_reduce_and_updates_without_waiting(tmp_path, cuda_waits):
    """On a GPU (nccl, one rank): the FSDP2 step waits for nothing (torch's sync debug mode counts no wait)."""
    if native.compiler() is None:
        pytest.skip("needs a C compiler")
    _fsdp2_one_rank(tmp_path, "cuda", cuda_waits)
