"""Gradient release's per-parameter plans (kernels/step_plan.py ``param_plan``/``run_param``): after a
hook's update ran in a native kernel, the next backward's hook repeats it in one native call.

Every test trains three equal copies of the same parameters: ``planned`` (release as users get it),
``general`` (release with its plans off, ``handle.plans = False``: every hook takes the general path)
and ``ordinary`` (no release: backward, then ``step()``). Weights, states and skip counts must agree bit
for bit whatever happens between steps, and the plans must actually be used when nothing changed.
"""

from __future__ import annotations

import io

import pytest
import torch

import leanopt
from leanopt.kernels import native, step_plan
from test_step_plan import MODES, _replace_state, _scenario, bits

pytestmark = pytest.mark.skipif(native.disabled_reason() is not None or native.compiler() is None,
                                reason="no C compiler")  # fmt: skip

SHAPES = [(64, 64), (3, 70), (130,), (5, 96), (1,), (4, 12, 3, 3), (300, 256)]  # the last: > SMALL_TENSOR


class Triplet:
    """One optimizer three times: released with plans, released without, and stepped ordinarily. A
    step's "gradient" of parameter i is ``targets[i]`` (loss = sum(p * target)), so all three get the
    same bits; a parameter whose target is None gets none."""

    names = ("planned", "general", "ordinary")

    def __init__(self, make_opt, dtype=torch.bfloat16, shapes=SHAPES, seed=0, layouts=None):
        self.gen = torch.Generator().manual_seed(seed)
        dtypes = dtype if isinstance(dtype, list) else [dtype] * len(shapes)
        base = [(torch.randn(s, generator=self.gen) * 0.5).to(d) for s, d in zip(shapes, dtypes, strict=True)]
        layouts = layouts or [torch.contiguous_format] * len(shapes)
        self.params = {
            n: [torch.nn.Parameter(t.clone().to(memory_format=f)) for t, f in zip(base, layouts, strict=True)]
            for n in self.names
        }
        self.opts = {n: make_opt(self.params[n]) for n in self.names}
        self.handles = {n: leanopt.release_gradients(self.opts[n]) for n in self.names[:2]}
        self.handles["general"].plans = False
        self.dtype = dtype

    def targets(self, scale=1.0, skip=()):
        return [None if i in skip else torch.randn(p.shape, generator=self.gen) * scale
                for i, p in enumerate(self.params["planned"])]  # fmt: skip

    def step(self, targets):
        errors = []
        for n in self.names:
            terms = [(p.float() * t).sum() for p, t in zip(self.params[n], targets, strict=True) if t is not None]
            try:
                if terms:  # else no gradient at all: step() changes nothing
                    torch.stack(terms).sum().backward()
                self.opts[n].step()
                errors.append(None)
            except Exception as err:  # noqa: BLE001 - compared below
                errors.append(err)
            self.opts[n].zero_grad()
        assert len({type(e) for e in errors}) == 1, errors
        if errors[0] is not None:
            assert len({str(e) for e in errors}) == 1, errors
            raise errors[0]

    def assert_same(self, against="ordinary"):
        ref = self.opts[against]
        for n in self.names[:2]:
            if n == against:
                continue
            opt = self.opts[n]
            assert (opt.nonfinite_skipped, opt.last_skipped) == (ref.nonfinite_skipped, ref.last_skipped), n
            for i, (p, q) in enumerate(zip(self.params[n], self.params[against], strict=True)):
                assert torch.equal(bits(p), bits(q)), f"{n}: weights of param {i}"
                sp, sq = opt.state.get(p, {}), ref.state.get(q, {})
                assert sorted(sp) == sorted(sq), f"{n}: state keys of param {i}"
                for k in sp:
                    assert torch.equal(bits(sp[k]), bits(sq[k])), f"{n}: state {k!r} of param {i}"


@pytest.fixture
def planned_runs(monkeypatch):
    """Counts the hooks that a plan ran (run_param returned True or False, not None)."""
    runs = []
    real = step_plan.run_param
    monkeypatch.setattr(step_plan, "run_param", lambda *a: (lambda r: (runs.append(r), r)[1])(real(*a)))
    return runs


@pytest.mark.parametrize("mode", list(MODES))
def test_hooks_repeat_their_updates_by_plan_with_the_general_paths_bits(mode, planned_runs):
    t = Triplet(MODES[mode])
    for i in range(5):
        for opt in t.opts.values():
            opt.param_groups[0]["lr"] *= 0.7  # a schedule: the plans still apply
        t.step(t.targets(scale=10.0 ** -(i % 3)))
        t.assert_same()
    # the first backward plans, the four after it run every hook by its plan
    assert planned_runs.count(True) == 4 * len(SHAPES) and len(planned_runs) == 4 * len(SHAPES)


@pytest.mark.parametrize("where", [1, 6], ids=["small tensor", "large tensor"])
def test_non_finite_gradient_is_skipped_by_the_plan_as_on_the_general_path(where, planned_runs):
    t = Triplet(MODES["adamw exact/fp32"])
    for _ in range(2):
        t.step(t.targets())
    targets = t.targets()
    targets[where][-1] = float("nan")
    t.step(targets)
    t.assert_same()
    assert t.opts["planned"].last_skipped == [where] and t.opts["planned"].nonfinite_skipped == 1
    assert planned_runs.count(False) == 1  # the plan skipped it, in its native call
    for _ in range(2):  # parameter `where` is a step behind the others now
        t.step(t.targets())
        t.assert_same()


def test_non_finite_gradient_under_raise_is_raised_by_the_general_path():
    t = Triplet(lambda ps: leanopt.AdamW(ps, lr=1e-2, nonfinite="raise"))
    for _ in range(2):
        t.step(t.targets())
    targets = t.targets()
    targets[0][0, 0] = float("inf")  # backward reaches parameter 0 last: the others are updated by then
    with pytest.raises(FloatingPointError, match="parameter 0"):
        t.step(targets)
    for n in t.names:
        t.opts[n].zero_grad()
    # released, the tensors updated earlier in that backward stay updated (docs/release.md), by plan or not
    t.assert_same(against="general")
    assert not torch.equal(bits(t.params["planned"][1]), bits(t.params["ordinary"][1]))


@pytest.mark.parametrize("path", ["native", "gpu"], ids=["native", "gpu kernels emulated"])
@pytest.mark.parametrize("how", ["new tensor", "new storage", "in place", "step count"])
def test_states_changed_between_steps_are_followed(how, path, request):
    """(On the CUDA kernels' path too, emulated: its hooks' plans, gpu.GpuParamPlan.)"""
    if path == "gpu":
        request.getfixturevalue("emulate")
    t = Triplet(_fused(MODES["adamw compact/int8"]) if path == "gpu" else MODES["adamw compact/int8"])
    for i in range(4):
        if i == 2:
            key = "step" if how == "step count" else "exp_avg.scales"
            for n in t.names:
                _replace_state(t.opts[n], t.params[n][0], key, how)
        t.step(t.targets())
        t.assert_same()


def test_a_state_given_storage_of_another_dtype_is_refused_by_every_path():
    t = Triplet(MODES["adamw compact/int8"])
    for _ in range(2):
        t.step(t.targets())
    for n in t.names:
        codes = t.opts[n].state[t.params[n][0]]["exp_avg.codes"]
        codes.data = codes.float()  # the same tensor object, now fp32
    with pytest.raises(RuntimeError, match="parameter 0: its state holds"):
        t.step(t.targets())


def test_load_state_dict_weights_replaced_and_group_changes_are_followed(planned_runs):
    t = Triplet(lambda ps: leanopt.SGD(ps, lr=1e-2, momentum=0.9))
    for _ in range(3):
        t.step(t.targets())
    saved = t.opts["ordinary"].state_dict()
    t.step(t.targets(skip=(2,)))  # one parameter without a gradient
    for n in t.names:
        buf = io.BytesIO()
        torch.save(saved, buf)
        buf.seek(0)
        t.opts[n].load_state_dict(torch.load(buf, weights_only=True))
        for p in t.params[n]:  # weights given new storage (same values)
            p.data = p.data.clone()
    t.step(t.targets())
    t.assert_same()
    for n in t.names:
        t.opts[n].param_groups[0]["nesterov"] = True  # another kernel
    t.step(t.targets())
    t.assert_same()
    runs = len(planned_runs)
    t.step(t.targets())
    t.assert_same()
    assert planned_runs[runs:] == [True] * len(SHAPES)  # planned again
    for n in t.names:
        t.opts[n].param_groups[0]["lr"] = -1.0
    before = [bits(p) for p in t.params["planned"]]
    with pytest.raises(ValueError, match="lr"):
        t.step(t.targets())
    assert all(torch.equal(bits(p), b) for p, b in zip(t.params["planned"], before, strict=True))


@pytest.mark.parametrize("states", ["int8", "int4"])
def test_channels_last_conv_weights_are_planned(states, planned_runs):
    shapes = [(8, 4, 3, 3), (6, 8, 3, 3), (6, 40)]
    layouts = [torch.channels_last, torch.channels_last, torch.contiguous_format]
    t = Triplet(lambda ps: leanopt.AdamW(ps, lr=1e-2, master="compact", states=states), shapes=shapes,
                layouts=layouts)  # fmt: skip
    for _ in range(4):
        t.step(t.targets())
        t.assert_same()
    assert not t.params["planned"][0].is_contiguous()
    assert planned_runs == [True] * (3 * len(shapes))


def test_what_a_plan_cannot_repeat_takes_the_general_path(planned_runs):
    """The eager reference (kernel="reference"): no plans, the same bits as without release."""
    t = Triplet(lambda ps: leanopt.AdamW(ps, lr=1e-2, kernel="reference"), shapes=SHAPES[:3])
    for _ in range(3):
        t.step(t.targets())
        t.assert_same()
    assert not planned_runs and not t.handles["planned"]._plans


@pytest.mark.parametrize("path", ["native", "gpu"], ids=["native", "gpu kernels emulated"])
def test_random_scenarios_give_the_same_bits_with_and_without_plans(path, planned_runs, request):
    """test_step_plan's 24 random optimizers and event sequences (LR and weight decay changes, tensors
    without a gradient, NaN, state_dict round trips, channels_last conv weights), each trained released
    with plans, released without, and ordinarily: every weight, state and skip count must match. Also
    on the CUDA kernels' path (emulated: kernel="fused"), whose hooks have their own plans."""
    if path == "gpu":
        request.getfixturevalue("emulate")
    for seed in range(24):
        cls, groups, events = _scenario(seed)
        g = torch.Generator().manual_seed(seed)
        shapes, layouts, per_group = [], [], []
        for chosen, cl, _dtype, hyper in groups:
            per_group.append((len(chosen), hyper))
            shapes += chosen
            layouts += [torch.channels_last if c else torch.contiguous_format for c in cl]
        dtypes = [dtype for chosen, _, dtype, _ in groups for _ in chosen]

        def make(ps, per_group=per_group, cls=cls):
            out, k = [], 0
            for count, hyper in per_group:
                out.append({"params": ps[k : k + count], **hyper})
                k += count
            return cls(out, kernel="fused" if path == "gpu" else "auto")

        t = Triplet(make, dtype=dtypes, shapes=shapes, seed=seed, layouts=layouts)
        for ev in events:
            for n in t.names:
                if "lr" in ev:
                    t.opts[n].param_groups[ev["lr"][0]]["lr"] = ev["lr"][1]
                if "wd" in ev:
                    t.opts[n].param_groups[ev["wd"][0]]["weight_decay"] = ev["wd"][1]
            targets = [torch.randn(s, generator=g) * 1e-2 for s in shapes]
            if "no grad" in ev:
                targets[int(ev["no grad"] * len(shapes))] = None
            if "nan" in ev and targets[int(ev["nan"] * len(shapes))] is not None:
                targets[int(ev["nan"] * len(shapes))].view(-1)[0] = float("nan")
            t.step(targets)
            if "reload" in ev:
                for n in t.names:
                    buf = io.BytesIO()
                    torch.save(t.opts[n].state_dict(), buf)
                    buf.seek(0)
                    t.opts[n].load_state_dict(torch.load(buf, weights_only=True))
            try:
                t.assert_same()
            except AssertionError as err:
                raise AssertionError(f"scenario {seed}: {err}") from None
    assert planned_runs.count(True) >= (100 if path == "native" else 60)  # the plans were used


@pytest.fixture
def emulate(monkeypatch):
    """CPU tensors with kernel="fused" take the CUDA kernels' path (kernels/gpu.py), compiled as C."""
    from leanopt.kernels import gpu

    monkeypatch.setattr(gpu, "EMULATE", True)
    monkeypatch.delenv("LEANOPT_GPU_KERNELS", raising=False)
    gpu.reset()
    yield gpu
    gpu.reset()


def _fused(make):
    """``make`` with kernel="fused": with ``emulate``, the CUDA kernels' path."""

    def build(ps):
        opt = make(ps)
        opt.kernel = "fused"
        return opt

    return build


@pytest.mark.parametrize("mode", list(MODES))
def test_gpu_path_hooks_repeat_their_updates_by_plan_with_the_general_paths_bits(mode, emulate, planned_runs):
    """The CUDA kernels' path (emulated): after a hook's update ran there, the next backward's hook
    repeats it by its plan (gpu.GpuParamPlan: the NaN/inf check's and the update's launches, the verdict
    read at step()); the same bits as released without plans and as stepped ordinarily. Stochastic
    rounding is not planned there (every hook takes the general path)."""
    t = Triplet(_fused(MODES[mode]))
    for i in range(5):
        for opt in t.opts.values():
            opt.param_groups[0]["lr"] *= 0.7  # a schedule: the plans still apply
        t.step(t.targets(scale=10.0 ** -(i % 3)))
        t.assert_same()
    plans = t.handles["planned"]._plans
    if "stochastic" in mode:
        assert planned_runs == [] and not plans
    else:
        assert planned_runs == [True] * (4 * len(SHAPES))
        assert len(plans) == len(SHAPES) and all(type(p) is emulate.GpuParamPlan for p in plans.values())


@pytest.mark.parametrize("where", [1, 6], ids=["small tensor", "large tensor"])
def test_gpu_path_plan_leaves_a_non_finite_gradients_tensor_alone(where, emulate, planned_runs):
    """A NaN reaching a planned hook on the CUDA kernels' path: its check launch and update launch are
    queued (no wait), the update leaves the tensor alone, step() reads the verdict, puts the step count
    back and counts the skip; the next backward plans that parameter again. As without plans."""
    t = Triplet(_fused(MODES["adamw compact/int8"]))
    for _ in range(2):
        t.step(t.targets())
    runs = len(planned_runs)
    targets = t.targets()
    targets[where][-1] = float("nan")
    t.step(targets)
    t.assert_same()
    assert planned_runs[runs:] == [True] * len(SHAPES)  # queued by the plans, the bad one too
    assert t.opts["planned"].last_skipped == [where] and t.opts["planned"].nonfinite_skipped == 1
    for _ in range(2):  # parameter `where` is a step behind the others now
        t.step(t.targets())
        t.assert_same()


@pytest.mark.parametrize("path", ["native", "gpu"], ids=["native", "gpu kernels emulated"])
def test_run_param_declines_what_its_plan_was_not_made_for(path, request):
    """run_param itself (the native plan, or gpu.GpuParamPlan on the CUDA kernels' path, emulated): a
    gradient of another layout, shape, dtype or device, another group, a parameter given new storage, a
    step count changed from outside (the GPU plan compares it; the native call, test_step_plan's): None,
    nothing changed; the plan's own case: True, updated."""
    gpu = request.getfixturevalue("emulate") if path == "gpu" else None
    p = torch.nn.Parameter(torch.randn(6, 40).bfloat16())
    opt = leanopt.AdamW([p], lr=1e-2, kernel="fused" if gpu else "auto")
    handle = leanopt.release_gradients(opt)
    for _ in range(2):
        (p.float() * torch.randn(6, 40)).sum().backward()
        opt.step()
    kind = gpu.GpuParamPlan if gpu else step_plan.ParamPlan
    plan = handle._plans[0]
    assert type(plan) is kind
    group = opt.param_groups[0]

    def snapshot():
        return [bits(p)] + [bits(v) for v in opt.state[p].values()]

    g = torch.randn(6, 40).bfloat16()
    before = snapshot()
    for grad, grp in (
        (torch.randn(40, 6).bfloat16().t(), group),  # not contiguous
        (torch.randn(240).bfloat16(), group),  # another shape
        (g.float(), group),  # another dtype
        (g.to("meta"), group),  # another device
        (g, {**group}),  # another group
    ):
        assert step_plan.run_param(plan, opt, p, grad, grp, {}) is None
        assert all(torch.equal(a, b) for a, b in zip(snapshot(), before, strict=True))
    if gpu:
        opt.state[p]["step"].fill_(7.0)  # changed from outside
        assert step_plan.run_param(plan, opt, p, g, group, {}) is None
        opt.state[p]["step"].fill_(2.0)
    p.data = p.data.clone()
    assert step_plan.run_param(plan, opt, p, g, group, {}) is None
    assert all(torch.equal(a, b) for a, b in zip(snapshot(), before, strict=True))
    assert step_plan.param_plan(opt, p, group, g) is None  # no update has run on the new storage yet
    assert opt.update_param(p, group, g)  # the general path
    plan = step_plan.param_plan(opt, p, group, g)
    assert type(plan) is kind
    assert step_plan.run_param(plan, opt, p, g, group, {}) is True
    opt._settle_verdicts()
    assert not torch.equal(bits(p), before[0]) and opt.state[p]["step"].item() == 4
    handle.remove()


def test_the_host_time_benchmarks_run_on_the_emulated_gpu_path(emulate, monkeypatch):
    """benchmarks/release_overhead.py --path cuda-emulated and benchmarks/gpu_host_overhead.py (their
    figures are in the docs): a tiny run of each gives every mode's row, the planned checks both ways."""
    from conftest import load_benchmark

    release = load_benchmark("release_overhead.py")
    monkeypatch.setattr(release, "workload", lambda name, device="cpu": _tiny_mlp())
    row = release.run("mlp", iters=1, rounds=1, warmup=0, path="cuda-emulated")
    assert row["path"] == "cuda-emulated" and row["parameters"] == 8
    assert set(row["per_param_us"]) == {"no release", "release", "release, no plans"}
    emulate.reset()
    host = load_benchmark("gpu_host_overhead.py")
    row = host.measure("cpu", 6, "int8", "skip", 2, True)
    assert row["planned"] and row["check_us_per_tensor"] > 0 and row["check_us_per_tensor_python"] > 0


def test_the_host_parts_benchmark_runs_on_the_emulated_gpu_path(tmp_path):
    """benchmarks/gpu_host_parts.py (its figures from an H200 are in benchmarks/results/gpu-2026-11-30-host):
    a tiny emulated run writes each mode's host and step time, the release hooks' cost, a profile and the
    profiler's host-side events per planned step."""
    import json
    import subprocess
    import sys

    from conftest import BENCHMARKS

    out = tmp_path / "parts.json"
    subprocess.run([sys.executable, str(BENCHMARKS / "gpu_host_parts.py"), "--steps", "2", "--release-rounds", "1",
                    "--reps", "2", "--out", str(out)], check=True, capture_output=True, timeout=300)  # fmt: skip
    doc = json.loads(out.read_text())
    assert [r["mode"] for r in doc["rows"]] == ["torch-fused", "exact/fp32", "exact/fp32:ignore", "compact/int8"]
    assert all(r["host_ms"] > 0 and r["step_ms"] >= r["host_ms"] and r["pipelined_ms"] > 0 for r in doc["rows"])
    assert all(0 < r["host_cpu_ms"] for r in doc["rows"])
    assert set(doc["release"]["per_param_us"]) == {"no release", "release", "release, no plans"}
    assert "run_plan" in doc["profile"]
    # the profiler's host-side events of planned steps (on a GPU the CUDA runtime and driver calls among them)
    events = doc["host_events"]
    assert events and all(e["calls_per_step"] > 0 and e["self_cpu_us_per_step"] > 0 for e in events)
    assert [e["self_cpu_us_per_step"] for e in events] == sorted((e["self_cpu_us_per_step"] for e in events),
                                                                 reverse=True)  # fmt: skip


def _tiny_mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)]).bfloat16()
    x = torch.randn(2, 8).bfloat16()
    return model, lambda: model(x).float().square().mean()
