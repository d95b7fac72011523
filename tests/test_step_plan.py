"""Whole-step plans (leanopt.kernels.step_plan): a repeated CPU step in one native call.

Every test runs two optimizers on equal copies of the same parameters: one as users get it, one whose
plan is dropped before each step (so every step takes the general, per-tensor path). Their weights and
states must agree bit for bit, whatever happens between steps; and the plan must actually be used when
nothing changed.
"""

from __future__ import annotations

import pytest
import torch

import leanopt
from leanopt.kernels import native, step_plan

pytestmark = pytest.mark.skipif(native.disabled_reason() is not None or native.compiler() is None,
                                reason="no C compiler")  # fmt: skip

_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32}
SHAPES = [(64, 64), (3, 70), (130,), (5, 96), (1,), (4, 12, 3, 3)]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(_INT[t.element_size()]).clone()


class Twin:
    """The same optimizer twice: ``planned`` as users get it, ``general`` without plans."""

    def __init__(self, make_opt, dtype=torch.bfloat16, shapes=SHAPES, seed=0):
        g = torch.Generator().manual_seed(seed)
        base = [(torch.randn(s, generator=g) * 0.5).to(dtype) for s in shapes]
        self.a = [torch.nn.Parameter(t.clone()) for t in base]
        self.b = [torch.nn.Parameter(t.clone()) for t in base]
        self.planned, self.general = make_opt(self.a), make_opt(self.b)
        self.gen = g
        self.dtype = dtype

    def grads(self, scale=1.0, skip=()):
        for i, (pa, pb) in enumerate(zip(self.a, self.b, strict=True)):
            if i in skip:
                pa.grad = pb.grad = None
                continue
            g = (torch.randn(pa.shape, generator=self.gen) * scale).to(self.dtype)
            pa.grad, pb.grad = g.clone(), g.clone()

    def step(self):
        self.general._step_plan = None
        out = []
        for opt in (self.planned, self.general):
            try:
                opt.step()
                out.append(None)
            except Exception as err:  # noqa: BLE001 - compared below
                out.append(err)
        assert type(out[0]) is type(out[1]), out
        if out[0] is not None:
            assert str(out[0]) == str(out[1])
            raise out[0]

    def assert_same(self):
        assert self.planned.nonfinite_skipped == self.general.nonfinite_skipped
        assert self.planned.last_skipped == self.general.last_skipped
        for pa, pb in zip(self.a, self.b, strict=True):
            assert torch.equal(bits(pa), bits(pb))
            sa, sb = self.planned.state.get(pa, {}), self.general.state.get(pb, {})
            assert sorted(sa) == sorted(sb)
            for k in sa:
                assert torch.equal(bits(sa[k]), bits(sb[k])), k


def count_general(monkeypatch):
    """Counts step()s that took the general path (it runs its launches through run_many)."""
    calls = []
    real = native.run_many
    monkeypatch.setattr(native, "run_many", lambda jobs: (calls.append(len(jobs)), real(jobs))[1])
    return calls


MODES = {
    "adamw exact/fp32": lambda ps: leanopt.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "adamw compact/int8": lambda ps: leanopt.AdamW(ps, lr=1e-2, master="compact", states="int8"),
    "adam exact/bf16 ignore": lambda ps: leanopt.Adam(ps, lr=1e-2, states="bf16", nonfinite="ignore"),
    "adamw compact/int4": lambda ps: leanopt.AdamW(ps, lr=1e-2, master="compact", states="int4"),
    "sgd nesterov": lambda ps: leanopt.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True),
    "lion kahan": lambda ps: leanopt.Lion(ps, lr=1e-3, master="kahan", weight_decay=0.1),
    "adamw stochastic/int8": lambda ps: leanopt.AdamW(ps, lr=1e-2, master="stochastic", states="int8", seed=5),
    "sgd stochastic": lambda ps: leanopt.SGD(ps, lr=1e-2, momentum=0.9, master="stochastic", seed=5),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_repeated_steps_use_the_plan_and_match_the_general_path_bit_for_bit(mode, monkeypatch):
    twin = Twin(MODES[mode])
    general = count_general(monkeypatch)
    for i in range(6):
        twin.grads(scale=10.0 ** -(i % 3))
        for opt in (twin.planned, twin.general):
            opt.param_groups[0]["lr"] *= 0.7  # a schedule: the plan still applies
        twin.step()
        twin.assert_same()
    # the general optimizer took the general path 6 times; the planned one only for its first step
    assert len(general) == 6 + 1
    assert twin.planned._step_plan is not None


def test_fp32_params_and_two_groups_with_different_step_counts(monkeypatch):
    def make(ps):
        return leanopt.AdamW([{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3, "betas": (0.8, 0.99)}], lr=1e-2)

    twin = Twin(make, dtype=torch.float32)
    twin.grads(skip=(0, 3))  # these two start one step later: 2 step counts per group
    twin.step()
    general = count_general(monkeypatch)
    for _ in range(3):
        twin.grads()
        twin.step()
        twin.assert_same()
    plan = twin.planned._step_plan
    assert len(plan.segments) == 4  # (group, step count) pairs
    assert len(general) == 3 + 1  # second step: the general path (gradients changed), then the plan


@pytest.mark.parametrize("where", [1, 5], ids=["small tensor", "large tensor"])
def test_non_finite_gradient_is_skipped_as_without_a_plan(where, monkeypatch):
    # (300, 256): above native.SMALL_TENSOR, checked and updated by all threads
    twin = Twin(MODES["adamw exact/fp32"], shapes=[*SHAPES, (300, 256)])
    for _ in range(2):
        twin.grads()
        twin.step()
    general = count_general(monkeypatch)
    twin.grads()
    for p in (twin.a[where], twin.b[where]):
        p.grad.view(-1)[-1] = float("nan")
    twin.step()
    twin.assert_same()
    assert twin.planned.last_skipped == [where] and twin.planned.nonfinite_skipped == 1
    assert len(general) == 1  # the planned optimizer skipped it in its native call
    twin.grads()
    twin.step()  # parameter 1's step count now differs from the others': still the same results
    twin.assert_same()


@pytest.mark.parametrize("mode", ["adamw exact/fp32", "adamw compact/int8", "adamw compact/int4"])
def test_the_next_tensors_check_during_an_update_skips_what_a_check_of_its_own_would(mode, monkeypatch):
    """Large tensors' gradients are checked for NaN/inf during the update before theirs (lo_step_side,
    int8/int4 kernels):
    a bad value at either end of a gradient, or in two large tensors in a row (the second then checked
    by itself), skips exactly the tensors the general path skips, with the same bits everywhere."""
    shapes = [(300, 256), (64, 64), (260, 256), (70,), (4, 256, 30, 3), (257, 300)]
    # above native.SMALL_TENSOR, updated largest first: 4, 5, 0, 2; 4 is stored channels_last (int8/int4: a
    # kernel by rows, which checks 5)
    big = [0, 2, 4, 5]
    twin = Twin(MODES[mode], shapes=shapes)
    last = (twin.a[4], twin.b[4])
    for p in last:
        p.data = p.data.contiguous(memory_format=torch.channels_last)

    def grads():
        twin.grads()
        for p in last:
            p.grad = p.grad.contiguous(memory_format=torch.channels_last)

    general = count_general(monkeypatch)
    cases = [{2: 0}, {2: -1}, {4: -1}, {2: -1, 4: 0}, {5: -1}, {5: 0}, {4: 0, 5: 0}, {0: 0}, {0: -1}, {5: 0, 0: -1}]
    for bad in [*cases, {}]:
        for _ in range(2):  # after a skip the step counts differ: one general step builds the plan again
            grads()
            twin.step()
            twin.assert_same()
        plan = twin.planned._step_plan
        assert plan is not None
        sides = [plan.fns[plan.count + t] for t in range(plan.count)]
        # int8/int4 (compute-bound kernels): each large tensor's kernel checks the next one's gradient;
        # exact/fp32 (flat, memory-bound): every check a pass of its own
        assert all(bool(sides[t]) == ("int" in mode) for t in big)
        grads()
        for where, at in bad.items():
            for p in (twin.a[where], twin.b[where]):
                flat = p.grad.as_strided((p.grad.numel(),), (1,))  # memory order: either end of the data
                flat[at] = float("nan") if at == 0 else float("-inf")
        before = len(general)
        twin.step()
        assert len(general) == before + 1  # the general twin only: the planned one ran its plan
        twin.assert_same()
        assert twin.planned.last_skipped == sorted(bad), bad


def test_non_finite_gradient_raises_with_nothing_changed():
    twin = Twin(lambda ps: leanopt.AdamW(ps, lr=1e-2, nonfinite="raise"))
    for _ in range(2):
        twin.grads()
        twin.step()
    before = [bits(p) for p in twin.a]
    twin.grads()
    for p in (twin.a[-1], twin.b[-1]):
        p.grad[0] = float("inf")
    with pytest.raises(FloatingPointError, match=f"parameter {len(SHAPES) - 1}"):
        twin.step()
    assert all(torch.equal(bits(p), b) for p, b in zip(twin.a, before, strict=True))
    twin.assert_same()


def _replace_state(opt, p, key, how):
    t = opt.state[p][key]
    if how == "new tensor":
        opt.state[p][key] = t.clone() * 0.5
    elif how == "new storage":
        t.data = t.clone() * 0.5  # same object, other memory
    elif how == "in place":
        t.mul_(0.5)
    elif how == "step count":
        t.fill_(100.0)


@pytest.mark.parametrize("how", ["new tensor", "new storage", "in place", "step count"])
def test_states_changed_between_steps_are_followed(how):
    twin = Twin(MODES["adamw exact/fp32"])
    for i in range(4):
        twin.grads()
        if i == 2:
            key = "step" if how == "step count" else "exp_avg"
            for opt, ps in ((twin.planned, twin.a), (twin.general, twin.b)):
                _replace_state(opt, ps[0], key, how)
        twin.step()
        twin.assert_same()


def test_gradients_that_change_shape_of_work_are_followed():
    twin = Twin(MODES["adamw compact/int8"])
    twin.grads()
    twin.step()
    twin.grads(skip=(2,))  # one parameter without a gradient
    twin.step()
    twin.assert_same()
    twin.grads()
    # A non-contiguous gradient (same values): that tensor takes the eager reference in both optimizers. A small
    # one (480 elements): ATen splits eager sqrt over threads from 2048 elements, and in the POSIX-threads build
    # one such call was seen to return other bits for half the elements (issue 5's notes), which is torch's
    # arithmetic, not the plan's.
    for ps in (twin.a, twin.b):
        ps[3].grad = ps[3].grad.t().contiguous().t()
        assert not ps[3].grad.is_contiguous()
    twin.step()
    twin.assert_same()
    twin.grads()
    twin.step()
    twin.assert_same()


def test_hyper_parameter_changes_rebuild_or_raise():
    twin = Twin(lambda ps: leanopt.SGD(ps, lr=1e-2, momentum=0.9))
    for _ in range(3):
        twin.grads()
        twin.step()
    for opt in (twin.planned, twin.general):
        opt.param_groups[0]["nesterov"] = True  # another kernel
    twin.grads()
    twin.step()
    twin.assert_same()
    before = [bits(p) for p in twin.a]
    for opt in (twin.planned, twin.general):
        opt.param_groups[0]["lr"] = -1.0
    twin.grads()
    with pytest.raises(ValueError, match="lr"):
        twin.step()
    assert all(torch.equal(bits(p), b) for p, b in zip(twin.a, before, strict=True))


def test_load_state_dict_and_weights_replaced_are_followed():
    twin = Twin(MODES["adamw compact/int8"])
    for _ in range(3):
        twin.grads()
        twin.step()
    saved = twin.general.state_dict()
    twin.grads()
    twin.step()
    for opt in (twin.planned, twin.general):
        opt.load_state_dict(saved)
    assert twin.planned._step_plan is None
    for pa, pb in zip(twin.a, twin.b, strict=True):  # weights given new storage (same values)
        pa.data, pb.data = pa.data.clone(), pb.data.clone()
    twin.grads()
    twin.step()
    twin.assert_same()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_planned_with_each_updates_key(dtype, monkeypatch):
    """Its bits are computed in the kernels from each update's key (formats/noise.py), which the plan
    writes before its native call: the general path's bits, the optimizer's seed read at each step."""
    twin = Twin(lambda ps: leanopt.AdamW(ps, lr=1e-2, master="stochastic", seed=3), dtype=dtype)
    twin.grads()
    twin.step()
    general = count_general(monkeypatch)
    for i in range(4):
        if i == 2:
            twin.planned.seed = twin.general.seed = 4
        twin.grads(scale=1e-3)
        twin.step()
        twin.assert_same()
    assert len(general) == 4  # only the general optimizer's steps
    assert twin.planned._step_plan.noise


def test_the_native_call_skips_only_the_non_finite_tensor_and_declines_stale_plans():
    """lo_step_all itself: a tensor with NaN is left as it was while the others update; a plan whose step
    counts no longer match the states, or a NaN under nonfinite="raise", changes nothing (None)."""
    ps = [torch.nn.Parameter(torch.randn(4, 32).bfloat16()) for _ in range(2)]
    opt = leanopt.AdamW(ps, lr=1e-2)
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn(4, 32).bfloat16()
        opt.step()
    plan = opt._step_plan

    def snapshot():
        return [(bits(p), opt.state[p]["step"].item()) for p in ps]

    before = snapshot()
    ps[1].grad[3, 31] = float("nan")
    assert step_plan.run(plan, opt) == [1]
    after = snapshot()
    assert not torch.equal(after[0][0], before[0][0]) and after[0][1] == before[0][1] + 1
    assert torch.equal(after[1][0], before[1][0]) and after[1][1] == before[1][1]
    ps[1].grad[3, 31] = 0.0
    assert step_plan.run(plan, opt) is None  # parameter 1's count is behind the plan's now
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(snapshot(), after, strict=True))

    opt.step()  # the general path, which plans again
    opt.nonfinite = "raise"
    opt.step()
    plan = opt._step_plan
    before = snapshot()
    ps[0].grad[0, 0] = float("inf")
    assert step_plan.run(plan, opt) is None
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(snapshot(), before, strict=True))


@pytest.mark.parametrize(
    "case",
    [
        (torch.bfloat16, [(0, 32), (4, 64), (0,)], lambda ps: leanopt.AdamW(ps, lr=1e-2)),
        (torch.float16, [(4, 64), (3, 70)], lambda ps: leanopt.AdamW(ps, lr=1e-2, states="int8")),
        (torch.float16, [(4, 64), (3, 70)], lambda ps: leanopt.SGD(ps, lr=1e-2, momentum=0.9, master="compact")),
    ],
    ids=["empty tensors", "fp16 kahan int8", "fp16 compact"],
)
def test_empty_and_fp16_parameters(case):
    dtype, shapes, make = case
    twin = Twin(make, dtype=dtype, shapes=shapes)
    for _ in range(4):
        twin.grads()
        twin.step()
        twin.assert_same()
    assert twin.planned._step_plan is not None


def _scenario(seed: int):
    """A random optimizer (1-3 param groups, each its own weight and state formats, dtype, 1-4 tensors,
    some conv weights channels_last) and six steps of random events: a group's LR or weight decay
    changed, a tensor without a gradient, a NaN in one gradient, a state_dict round trip."""
    import random

    rng = random.Random(seed)
    cls = rng.choice([leanopt.AdamW, leanopt.Adam, leanopt.SGD, leanopt.Lion])
    shapes = [(7,), (33,), (4, 64), (3, 70), (2, 3, 40), (6, 5, 3, 3), (16, 40)]
    groups = []
    for _ in range(rng.randint(1, 3)):
        master = rng.choice(["exact", "compact", "none", "kahan", "stochastic"])
        hyper = {
            "lr": rng.choice([1e-3, 1e-2]),
            "master": master,
            "states": rng.choice(["fp32", "bf16", "int8", "int4"]),
        }
        if cls is leanopt.SGD:
            hyper["momentum"] = rng.choice([0.0, 0.9])
        dtype = torch.bfloat16 if master == "exact" else rng.choice([torch.bfloat16, torch.float16])
        chosen = [rng.choice(shapes) for _ in range(rng.randint(1, 4))]
        layouts = [len(s) == 4 and rng.random() < 0.3 for s in chosen]
        groups.append((chosen, layouts, dtype, hyper))
    events = []
    for _ in range(6):
        ev = {}
        if rng.random() < 0.3:
            ev["lr"] = (rng.randrange(len(groups)), rng.choice([1e-4, 3e-3]))
        if rng.random() < 0.2:
            ev["wd"] = (rng.randrange(len(groups)), rng.choice([0.0, 0.1]))
        if rng.random() < 0.3:
            ev["no grad"] = rng.random()
        if rng.random() < 0.15:
            ev["nan"] = rng.random()
        if rng.random() < 0.15:
            ev["reload"] = True
        events.append(ev)
    return cls, groups, events


def _run_scenario(seed: int, planned: bool) -> tuple[dict[str, torch.Tensor], int, int]:
    import io

    cls, groups, events = _scenario(seed)
    g = torch.Generator().manual_seed(seed)
    params, param_groups = [], []
    for chosen, layouts, dtype, hyper in groups:
        ps = []
        for shape, cl in zip(chosen, layouts, strict=True):
            w = (torch.randn(shape, generator=g) * 0.5).to(dtype)
            ps.append(torch.nn.Parameter(w.to(memory_format=torch.channels_last) if cl else w))
        params += ps
        param_groups.append({"params": ps, **hyper})
    opt = cls(param_groups)
    plans = 0
    for ev in events:
        if "lr" in ev:
            opt.param_groups[ev["lr"][0]]["lr"] = ev["lr"][1]
        if "wd" in ev:
            opt.param_groups[ev["wd"][0]]["weight_decay"] = ev["wd"][1]
        for i, p in enumerate(params):
            if "no grad" in ev and i == int(ev["no grad"] * len(params)):
                p.grad = None
                continue
            grad = (torch.randn(p.shape, generator=g) * 1e-2).to(p.dtype)
            if "nan" in ev and i == int(ev["nan"] * len(params)):
                grad.view(-1)[0] = float("nan")
            p.grad = grad if p.is_contiguous() else grad.to(memory_format=torch.channels_last)
        if not planned:
            opt._step_plan = None  # every step takes the general path
        plans += opt._step_plan is not None
        opt.step()
        if "reload" in ev:
            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            buf.seek(0)
            opt.load_state_dict(torch.load(buf, weights_only=True))
    out = {}
    for i, p in enumerate(params):
        out[f"param {i}"] = p.detach().contiguous()
        out.update({f"param {i} {k}": v.contiguous() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)})
    return out, opt.nonfinite_skipped, plans


@pytest.mark.slow
def test_random_scenarios_give_the_same_bits_planned_and_unplanned():
    """Whole-step plans change no bit: 24 random optimizers and event sequences (see ``_scenario``) run
    once as usual (later steps from the kept plan, when it still holds) and once with the plan dropped
    before every step; every weight, state and skip count must match."""
    planned_steps = 0
    for seed in range(24):
        a, skipped_a, plans = _run_scenario(seed, planned=True)
        b, skipped_b, _ = _run_scenario(seed, planned=False)
        assert a.keys() == b.keys() and skipped_a == skipped_b, seed
        for key in a:
            assert torch.equal(bits(a[key]), bits(b[key])), f"scenario {seed}: {key}"
        planned_steps += plans
    assert planned_steps >= 40  # the plans were used


KEEP: list = []


def _change(what: str, opt, params: list, grads: list) -> tuple[list, list]:
    """``params`` and ``grads`` (or the optimizer's state) with one thing changed that a plan relies on."""
    p0, g0 = params[0], grads[0]
    grads, params = list(grads), list(params)
    if what == "gradient not contiguous":
        grads[0] = g0.t().contiguous().t()
    elif what == "gradient dtype":
        grads[0] = g0.float()
    elif what == "gradient shape":
        grads[0] = g0.reshape(-1)
    elif what == "gradient on meta":
        grads[0] = g0.to("meta")
    elif what == "gradient a subclass":
        grads[0] = torch.nn.Parameter(g0.clone())
    elif what == "weights new storage":
        p0.data = p0.data.clone()
    elif what == "state dict copied":
        opt.state[p0] = dict(opt.state[p0])
    elif what == "state tensor replaced":
        key = next(k for k in opt.state[p0] if k != "step")
        opt.state[p0][key] = opt.state[p0][key].clone()
    elif what == "state storage replaced":
        key = next(k for k in opt.state[p0] if k != "step")
        t = opt.state[p0][key]
        t.data = t.data.clone()
    elif what == "state tensor an alias":  # same memory, another tensor object
        key = next(k for k in opt.state[p0] if k != "step")
        KEEP.append(opt.state[p0][key])  # the old object stays alive (else its weak reference dies)
        opt.state[p0][key] = opt.state[p0][key].detach()
    elif what == "state tensor gone":
        key = next(k for k in opt.state[p0] if k != "step")
        del opt.state[p0][key]
    return params, grads


CHANGES = ["gradient not contiguous", "gradient dtype", "gradient shape", "gradient on meta", "gradient a subclass",
           "weights new storage", "state dict copied", "state tensor replaced", "state storage replaced",
           "state tensor an alias", "state tensor gone"]  # fmt: skip


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "with a channels_last weight"])
@pytest.mark.parametrize("what", CHANGES)
def test_the_plan_check_refuses_each_change_it_relies_on(what, channels_last):
    """step_plan._valid (whole-step plans, CPU and CUDA) on a plan that applies, then with one change:
    refused, with contiguous parameters and with a channels_last weight (checked by its strides)."""
    shapes = [(6, 40), (33,), (4, 12, 3, 3)]
    twin = Twin(MODES["adamw compact/int8"], shapes=shapes)
    if channels_last:
        for p in twin.a:
            if p.dim() == 4:
                p.data = p.data.to(memory_format=torch.channels_last)
    for _ in range(2):
        twin.grads()
        for p in twin.a:
            if p.grad is not None and not p.is_contiguous():
                p.grad = p.grad.to(memory_format=torch.channels_last)
        twin.planned.step()
    plan = twin.planned._step_plan
    assert plan is not None and any(lay is not None for lay in plan.layouts) is channels_last
    _, params, grads = step_plan._signature(twin.planned.param_groups)
    assert step_plan._valid(plan, twin.planned, params, grads)
    params, grads = _change(what, twin.planned, params, grads)
    assert not step_plan._valid(plan, twin.planned, params, grads), what


def _change_live(what: str, opt, params: list) -> None:
    """One change a plan relies on, made to the optimizer and its parameters themselves (as the C check
    reads them: ``p.grad`` of each parameter of ``opt.param_groups``, ``opt.state``)."""
    p0, p1 = params[0], params[1]
    g0 = p0.grad
    if what == "gradient not contiguous":
        p0.grad = g0.t().contiguous().t()
    elif what == "gradient dtype":
        p0.grad.data = g0.float()  # .data bypasses the .grad setter's dtype check
    elif what == "gradient shape":
        p0.grad.data = g0.reshape(-1)
    elif what == "gradient a subclass":
        p0.grad = torch.nn.Parameter(g0.clone())
    elif what == "gradient on another device":  # the plan's device faked: its gradients are on the CPU
        pass
    elif what == "a gradient gone":
        p1.grad = None
    elif what == "a gradient moved":  # to the parameter that had none, of the same shape
        params[3].grad, p1.grad = p1.grad, None
    elif what == "weights transposed":  # the same memory and shape, not contiguous
        p0.data = p0.data.t()
    elif what == "parameters reordered":
        ps = opt.param_groups[0]["params"]
        ps[0], ps[1] = ps[1], ps[0]
    elif what == "a parameter more":
        opt.param_groups[0]["params"].append(torch.nn.Parameter(torch.zeros(3, dtype=p0.dtype)))
    elif what == "a param group more":
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3, dtype=p0.dtype))]})
    elif what == "params a tuple":
        opt.param_groups[0]["params"] = tuple(opt.param_groups[0]["params"])
    else:
        _change(what, opt, params, [p.grad for p in params])


LIVE_CHANGES = [c for c in CHANGES if c != "gradient on meta"] + [
    "gradient on another device", "a gradient gone", "a gradient moved", "weights transposed",
    "parameters reordered", "a parameter more",
    "a param group more", "params a tuple"]  # fmt: skip
ACCEPTED = {"params a tuple"}  # not a change: the same parameters


@pytest.mark.parametrize("impl", ["C", "Python"])
@pytest.mark.parametrize("what", LIVE_CHANGES)
def test_both_plan_checks_refuse_each_change_made_to_the_optimizer(what, impl, monkeypatch):
    """plan_check.check (the C loop where it builds, else step_plan._valid in Python) on a plan that
    applies: the live parameters and their gradients' addresses; after one change: None (a group's
    parameters as a tuple is no change). Each implementation alone (the other cannot answer for it)."""
    from leanopt.kernels import plan_check

    if impl == "C" and (not plan_check.available() or plan_check._function() is None):
        pytest.skip("the C check does not build here")
    shapes = [(8, 8), (33,), (4, 12, 3, 3), (33,)]
    twin = Twin(MODES["adamw compact/int8"], shapes=shapes)
    for _ in range(2):
        twin.grads(skip=(3,))  # the last parameter has no gradient
        twin.planned.step()
    opt = twin.planned
    plan = opt._step_plan
    assert plan is not None and plan.checker is not None  # the second step was planned
    plan.checker = None if impl == "C" else False  # None: made at the next check
    live = twin.a[:3]
    checked = plan_check.check(plan, opt)
    assert checked is not None
    assert checked[0] == live and all(a is b for a, b in zip(checked[0], live, strict=True))
    assert list(checked[1])[:3] == [p.grad.data_ptr() for p in live]
    assert (plan.checker is False) is (impl == "Python")
    if what == "gradient on another device":
        plan.device_index = 0
        plan.checker = None if impl == "C" else False  # made again, for device 0
    _change_live(what, opt, twin.a)
    if what in ACCEPTED:
        assert plan_check.check(plan, opt)[0] == live
    else:
        assert plan_check.check(plan, opt) is None, what


def test_the_c_check_can_be_turned_off(monkeypatch):
    """LEANOPT_PLAN_CHECK=python: plans check in Python (and still apply)."""
    monkeypatch.setenv("LEANOPT_PLAN_CHECK", "python")
    twin = Twin(MODES["adamw exact/fp32"])
    for _ in range(3):
        twin.grads()
        twin.step()
    assert twin.planned._step_plan is not None and twin.planned._step_plan.checker is False
    twin.assert_same()


class _OwnHash(torch.nn.Parameter):
    """A parameter type that hashes otherwise than by id (torch's own tensors hash by id)."""

    def __hash__(self) -> int:
        return hash(("own", id(self)))


def test_the_c_check_finds_the_states_of_parameters_that_hash_otherwise():
    """The C check looks a parameter's state up with its id as the hash (what Tensor.__hash__ gives,
    without calling it); a parameter type whose hash differs is found by the ordinary lookup."""
    from leanopt.kernels import plan_check

    if not plan_check.available() or plan_check._function() is None:
        pytest.skip("the C check does not build here")
    params = [_OwnHash(torch.randn(8, 8).bfloat16()) for _ in range(3)]
    assert hash(params[0]) != id(params[0])
    opt = leanopt.AdamW(params, lr=1e-2)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(8, 8).bfloat16()
        opt.step()
    plan = opt._step_plan
    assert plan is not None and plan.checker
    checked = plan_check.check(plan, opt)
    assert checked is not None and checked[0] == params
