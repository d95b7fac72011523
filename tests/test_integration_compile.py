"""torch.compile around a training step that calls a leanopt optimizer: Dynamo breaks the graph at
``optimizer.step()`` and runs it as it runs without compilation (``LeanOptimizer._patch_step_function``
marks torch's step wrapper with ``torch.compiler.disable``), so the results are the eager bits and no
graph holds leanopt's own code."""

from __future__ import annotations

import os

import pytest
import torch

import leanopt

PACKAGE = os.path.dirname(leanopt.__file__)


def _train(compiled: bool, make_opt, steps: int = 4):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).bfloat16()
    opt = make_opt(model.parameters())
    if isinstance(opt, tuple):  # (optimizer, "release"): updates inside backward
        opt = opt[0]
        leanopt.release_gradients(opt)
    graphs: list[torch.fx.GraphModule] = []

    def record(gm, example_inputs):  # a backend that keeps the graphs and runs them as they are
        graphs.append(gm)
        return gm.forward

    def train_step(x):
        loss = model(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    fn = torch.compile(train_step, backend=record) if compiled else train_step
    gen = torch.Generator().manual_seed(1)
    losses = [float(fn(torch.randn(8, 16, generator=gen).bfloat16())) for _ in range(steps)]
    return model, opt, graphs, losses


MAKERS = {
    "adamw exact/fp32": lambda ps: leanopt.AdamW(ps, lr=1e-2),
    "adamw compact/int8": lambda ps: leanopt.AdamW(ps, lr=1e-2, master="compact", states="int8"),
    "lion compact/int4": lambda ps: leanopt.Lion(ps, lr=1e-3, master="compact", states="int4"),
    "adamw compact/int8 + release": lambda ps: (leanopt.AdamW(ps, lr=1e-2, master="compact", states="int8"), "release"),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_a_compiled_training_step_runs_the_optimizer_eagerly_with_the_same_bits(name):
    torch._dynamo.reset()
    try:
        model_c, opt_c, graphs, losses_c = _train(True, MAKERS[name])
        model_e, opt_e, _, losses_e = _train(False, MAKERS[name])
    finally:
        torch._dynamo.reset()
    assert graphs, "torch.compile captured nothing: the test would show nothing"
    traced = [
        node.meta.get("stack_trace", "") for gm in graphs for node in gm.graph.nodes
        if PACKAGE in node.meta.get("stack_trace", "")
    ]  # fmt: skip
    assert not traced, f"Dynamo traced leanopt's code into a graph:\n{traced[0]}"
    assert losses_c == losses_e
    for a, b in zip(model_c.parameters(), model_e.parameters(), strict=True):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert len(opt_c.state) == len(opt_e.state) > 0
    for sa, sb in zip(opt_c.state.values(), opt_e.state.values(), strict=True):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


def test_the_step_wrapper_keeps_torch_hooks_and_is_applied_once():
    ps = [torch.nn.Parameter(torch.randn(4, 32).bfloat16())]
    opt = leanopt.AdamW(ps, lr=1e-2)
    first = type(opt).step
    leanopt.AdamW([torch.nn.Parameter(torch.randn(4, 32).bfloat16())])
    assert type(opt).step is first and first._leanopt_eager and first.hooked
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    ps[0].grad = torch.ones_like(ps[0])
    opt.step()
    assert calls == ["pre", "post"] and int(opt.state[ps[0]]["step"]) == 1


@pytest.mark.parametrize("mode", ["clip exact (handle.backward)", "accumulate states"])
def test_gradient_release_modes_inside_a_compiled_step(mode):
    """handle.backward (measuring pass + update pass) and handle.accumulate() called from the compiled
    function: the eager bits, nothing of leanopt in a graph."""

    def run(compiled: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).bfloat16()
        opt = leanopt.AdamW(model.parameters(), lr=1e-2, master="compact", states="int8")
        if mode.startswith("clip"):
            handle = leanopt.release_gradients(opt, max_norm=0.05)
        else:
            handle = leanopt.release_gradients(opt, accumulation="states", micro_batches=2)
        graphs: list[torch.fx.GraphModule] = []

        def record(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        def train_step(x1, x2):
            if mode.startswith("clip"):
                handle.backward(model(x1).float().pow(2).mean())
            else:
                with handle.accumulate():
                    model(x1).float().pow(2).mean().backward()
                model(x2).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()

        fn = torch.compile(train_step, backend=record) if compiled else train_step
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            fn(torch.randn(8, 16, generator=gen).bfloat16(), torch.randn(8, 16, generator=gen).bfloat16())
        return [p.detach().clone() for p in model.parameters()], graphs, handle

    torch._dynamo.reset()
    try:
        compiled, graphs, handle = run(True)
        eager, _, _ = run(False)
    finally:
        torch._dynamo.reset()
    # (with handle.accumulate() Dynamo, on torch 2.13, compiles no graph at all: the step runs eagerly)
    assert graphs or mode.startswith("accumulate")
    assert not [n for gm in graphs for n in gm.graph.nodes if PACKAGE in n.meta.get("stack_trace", "")]
    if mode.startswith("clip"):
        assert handle.last_norm is not None and float(handle.last_norm) > 0.05  # the clip was active
    for a, b in zip(compiled, eager, strict=True):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_import_leaves_torch_dynamo_unloaded():
    """Marking leanopt's functions for torch.compile loads torch._dynamo (about 1.5 s): that happens when
    an optimizer or release handle is made (torch.optim loads it there anyway), never at import."""
    import subprocess
    import sys

    code = "import sys, leanopt; sys.exit(3 if 'torch._dynamo' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
