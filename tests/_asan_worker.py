"""Run leanopt's C kernels under a sanitizer (started by tests/test_sanitizer.py in a process with gcc's
sanitizer runtime preloaded and ``LEANOPT_CFLAGS`` asking for it: every kernel this process builds is
instrumented). AddressSanitizer: every torch tensor is a separate heap block with poisoned bytes on both
sides, so a read or write past a tensor's end aborts the process with ASan's report. UndefinedBehaviorSanitizer:
signed overflow, shifts out of range, float-to-int conversions out of range and the like abort it.

``canary address`` / ``canary undefined``: a kernel built here writes one byte past a tensor / overflows
a signed int (the harness must catch it). ``kernels``: steps through the native CPU kernels (every weight
and state format, tails and partial groups, fp16 weights and fp32 gradients, a channels_last conv
weight's row kernel, a planned multi-tensor step, gradient release), the NaN/inf checks, and the CUDA
kernels' source run on the CPU (emulated); prints a JSON summary of what ran.
"""

from __future__ import annotations

import ctypes
import json
import sys

import torch

import leanopt
from conftest import fp16_edge_run  # tests/conftest.py (this script's folder is on the path)
from leanopt.kernels import gpu, native

SHAPES = [(1,), (17,), (33,), (5, 33), (3, 64), (2, 3, 40)]  # vector tails, partial groups, ragged rows


def canary(kind: str) -> None:
    """One byte written just past a 100-byte tensor's end (address), or a signed int overflowed (undefined)."""
    if kind == "address":
        source = "#include <stdint.h>\nvoid lo_oob(volatile char *p, int64_t n) { p[n] = 1; }\n"
        fn = native.build(source, "lo_oob", [ctypes.c_void_p, ctypes.c_int64]).fn
        t = torch.zeros(100, dtype=torch.uint8)
        fn(t.data_ptr(), 100)
    else:
        fn = native.build("int lo_ub(int x) { return x + 1; }\n", "lo_ub", [ctypes.c_int], ctypes.c_int).fn
        fn(2**31 - 1)
    print("the canary was not caught", flush=True)


def train(cls, master: str, states: str, shapes, steps: int = 3, dtype=torch.bfloat16, grad_dtype=None,
          kernel: str = "auto", **hyper) -> None:  # fmt: skip
    g = torch.Generator().manual_seed(len(shapes))
    params = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.5).to(dtype)) for s in shapes]
    opt = cls(params, master=master, states=states, kernel=kernel, **hyper)
    for p in params:
        if grad_dtype is not None:
            p.grad_dtype = grad_dtype  # torch >= 2.10 refuses a gradient of another dtype without it
    for i in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) * 10.0**-i).to(grad_dtype or dtype)
        if i == steps - 1:  # a non-finite gradient: the check must see its last element
            params[-1].grad.view(-1)[-1] = float("nan")
        opt.step()


def kernels() -> dict:
    adam = dict(lr=1e-2, weight_decay=0.1)
    runs = 0
    for master in ("exact", "compact"):
        for states in ("fp32", "bf16", "int8", "int4"):
            train(leanopt.AdamW, master, states, SHAPES, **adam)
            runs += 1
    for master, states in (("stochastic", "int8"), ("kahan", "int4"), ("none", "bf16")):
        train(leanopt.AdamW, master, states, SHAPES, **adam)
        runs += 1
    train(leanopt.AdamW, "auto", "int8", SHAPES, dtype=torch.float32, **adam)  # fp32 parameters
    train(leanopt.AdamW, "compact", "int8", SHAPES, dtype=torch.float16, **adam)  # fp16 weights
    train(leanopt.AdamW, "exact", "int4", SHAPES, grad_dtype=torch.float32, **adam)  # fp32 gradients
    train(leanopt.Adam, "compact", "int8", SHAPES, amsgrad=True, **adam)
    train(leanopt.SGD, "compact", "int4", SHAPES, lr=1e-2, momentum=0.9, nesterov=True)
    train(leanopt.Lion, "exact", "int8", SHAPES, lr=1e-3)
    runs += 6
    for master in ("none", "kahan", "compact", "stochastic"):
        # fp16 weights at the formats' edges: zeros, subnormals, 65504, overflow, NaN/inf gradients let through
        fp16_edge_run(leanopt.SGD, master=master, states="int8", lr=0.37, momentum=0.9)
        fp16_edge_run(leanopt.AdamW, master=master, lr=1e-2)
        runs += 2

    # a channels_last conv weight with grouped states: the kernel that transposes its rows
    conv = torch.nn.Conv2d(40, 24, 3).to(torch.bfloat16).to(memory_format=torch.channels_last)
    opt = leanopt.AdamW(conv.parameters(), lr=1e-2, master="compact", states="int8")
    for _ in range(3):
        conv(torch.randn(2, 40, 7, 7, dtype=torch.bfloat16).to(memory_format=torch.channels_last)).sum().backward()
        opt.step()
        opt.zero_grad()
    runs += 1

    # a model's many tensors in planned steps, then with gradient release
    model = torch.nn.Sequential(*[torch.nn.Linear(33 + k, 34 + k) for k in range(12)]).to(torch.bfloat16)
    opt = leanopt.AdamW(model.parameters(), lr=1e-3, master="compact", states="int8")
    x = torch.randn(3, 33, dtype=torch.bfloat16)
    for _ in range(4):
        model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    handle = leanopt.release_gradients(opt)
    for _ in range(3):
        model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    handle.remove()
    runs += 2

    # the NaN/inf checks: every length up to past a vector and a block, a bad value at the end
    finite = 0
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for n in [*range(0, 70), 1023, 1024, 1025, 4099]:
            ts = [torch.ones(n, dtype=dtype) for _ in range(3)]
            if n:
                ts[1][-1] = float("inf")
            assert native.all_finite_many(ts) == [True, n == 0, True]
            finite += 1

    # the CUDA kernels' source compiled as C and run on CPU tensors (kernel="fused" with gpu.EMULATE)
    gpu.EMULATE = True
    try:
        for master, states in (("exact", "fp32"), ("compact", "int8"), ("compact", "int4"), ("stochastic", "bf16")):
            train(leanopt.AdamW, master, states, [(0, 5), *SHAPES], kernel="fused", **adam)
            runs += 1
        fp16_edge_run(leanopt.SGD, master="stochastic", states="int8", kernel="fused", lr=0.37, momentum=0.9)
        fp16_edge_run(leanopt.AdamW, master="compact", kernel="fused", lr=1e-2)
        runs += 2
        for n in [*range(0, 40), gpu.CHECK_BYTES // 2 + 1, gpu.CHECK_BYTES + 3]:
            ts = [torch.ones(n, dtype=torch.bfloat16), torch.ones(n + 1, dtype=torch.float32)]
            if n:
                ts[0][-1] = float("nan")
            assert gpu.all_finite_many(ts) == [n == 0, True]
            finite += 1
        emulated = sum(k.launches for k in gpu.compile_stats())
    finally:
        gpu.EMULATE = False
    return {
        "optimizer_runs": runs,
        "native_kernels": len(native.compile_stats()),
        "native_calls": sum(k.calls for k in native.compile_stats()),
        "emulated_cuda_launches": emulated,
        "finite_checks": finite,
    }


if __name__ == "__main__":
    if sys.argv[1] == "canary":
        canary(sys.argv[2])
    else:
        print("RESULT " + json.dumps(kernels()), flush=True)
