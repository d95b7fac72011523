"""Shared test fixtures."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(filename: str):
    """A script of benchmarks/ as a module (``benchmarks/`` on the path while it loads: its
    ``from _results import ...``; registered in sys.modules: dataclasses look their module up)."""
    name = f"benchmark_{Path(filename).stem}"
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / filename)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture
def cuda_waits():
    """``cuda_waits(fn)``: run ``fn`` under torch's CUDA sync debug mode and return the warnings it
    raised about waiting for the GPU (one per wait)."""

    def run(fn):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        # one warning per wait; torch also warns that the debug mode itself is a prototype (not a wait)
        return [
            str(w.message)
            for w in caught
            if "synchroniz" in str(w.message).lower() and "prototype feature" not in str(w.message)
        ]

    return run


#: fp16 values where the weight formats' special cases live: zeros of both signs, subnormals, the largest
#: finite value and values that a step pushes past it (overflow to inf)
FP16_EDGES = [0.0, -0.0, 2.0**-24, -(2.0**-24), 3 * 2.0**-20, 6.1e-5, -6.1e-5, 65504.0, -65504.0, 65000.0, 1.0,
              -1.0, 1e-3, 0.3333, 2048.5, -7.0]  # fmt: skip


def fp16_edge_run(cls, **options) -> list[dict]:
    """Four steps of optimizer ``cls`` (``nonfinite="ignore"``, seed 7) on a (2, 64) fp16 weight made of
    FP16_EDGES, with fp16 gradients of scales 1e-7, 1e-3, 3e4 (overflows some weights) and 1 (with a NaN
    and an inf let through); the weight and each state tensor after every step. (Also run by
    tests/_asan_worker.py under the sanitizers.)"""
    p = torch.nn.Parameter(torch.tensor(FP16_EDGES).repeat(8)[:128].reshape(2, 64).to(torch.float16))
    opt = cls([p], nonfinite="ignore", seed=7, **options)
    g = torch.Generator().manual_seed(8)
    after = []
    for i, scale in enumerate((1e-7, 1e-3, 3e4, 1.0)):
        grad = torch.randn(2, 64, generator=g) * scale
        if i == 3:
            grad[0, 3], grad[1, 9] = float("nan"), float("inf")
        p.grad = grad.to(torch.float16)
        opt.step()
        state = {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
        after.append({"param": p.detach().clone(), **state})
    return after


@pytest.fixture
def fp16_edge_training():
    """``fp16_edge_training(cls, **options)``: :func:`fp16_edge_run`."""
    return fp16_edge_run
