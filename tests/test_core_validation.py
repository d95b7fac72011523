"""Bad input: a clear error naming the argument, and the optimizer and model left unchanged."""

import copy
import math

import pytest
import torch
from torch import nn

import leanopt


def snapshot(opt: torch.optim.Optimizer, params) -> dict:
    """Everything a failed call must leave alone: groups, states, weights and counters."""
    return {
        "groups": [
            {k: (list(v) if k == "params" else copy.deepcopy(v)) for k, v in g.items()} for g in opt.param_groups
        ],
        "state": {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params if p in opt.state},
        "weights": [p.detach().clone() for p in params],
        "skipped": getattr(opt, "nonfinite_skipped", None),
    }


def assert_same(before: dict, after: dict) -> None:
    assert len(before["groups"]) == len(after["groups"])
    for g0, g1 in zip(before["groups"], after["groups"], strict=True):
        assert g0.keys() == g1.keys()
        for k in g0:
            if k == "params":
                assert len(g0[k]) == len(g1[k]) and all(a is b for a, b in zip(g0[k], g1[k], strict=True))
            else:
                assert g0[k] == g1[k], k
    assert before["state"].keys() == after["state"].keys()
    for pid, st in before["state"].items():
        assert st.keys() == after["state"][pid].keys()
        for k, v in st.items():
            assert torch.equal(v, after["state"][pid][k]), k
    for w0, w1 in zip(before["weights"], after["weights"], strict=True):
        assert torch.equal(
            w0.view(torch.int16) if w0.element_size() == 2 else w0,
            w1.view(torch.int16) if w1.element_size() == 2 else w1,
        )
    assert before["skipped"] == after["skipped"]


def trained(cls=leanopt.AdamW, dtype=torch.bfloat16, **options):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)
    opt = cls(net.parameters(), lr=1e-2, **options)
    for _ in range(3):
        net(torch.randn(5, 4, dtype=dtype)).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return net, opt


@pytest.mark.parametrize(
    ("cls", "kwargs", "pattern"),
    [
        (leanopt.SGD, {"lr": -0.1}, r"Invalid lr: -0\.1"),
        (leanopt.AdamW, {"lr": float("nan")}, r"lr must be a finite number"),
        (leanopt.AdamW, {"lr": torch.tensor(0.1)}, r"lr must be a Python number"),
        (leanopt.Adam, {"betas": (1.0, 0.999)}, r"Invalid betas\[0\]: 1\.0; it must be < 1"),
        (leanopt.AdamW, {"betas": (0.9, -0.1)}, r"Invalid betas\[1\]: -0\.1; it must be >= 0"),
        (leanopt.Lion, {"betas": (0.9,)}, r"betas must be a tuple of 2 numbers in \[0, 1\)"),
        (leanopt.Adam, {"eps": -1e-8}, r"Invalid eps"),
        (leanopt.AdamW, {"weight_decay": -0.01}, r"Invalid weight_decay"),
        (leanopt.SGD, {"momentum": -0.5}, r"Invalid momentum"),
        (leanopt.SGD, {"nesterov": True}, r"nesterov=True requires momentum > 0"),
        (leanopt.AdamW, {"master": "fp8"}, r"master must be one of \['auto', 'exact'"),
        (leanopt.AdamW, {"states": "fp64"}, r"states must be one of \['fp32', 'bf16'"),
        (leanopt.AdamW, {"nonfinite": "drop"}, r"nonfinite must be one of \['skip', 'raise', 'ignore'\]"),
        (leanopt.AdamW, {"seed": 1.5}, r"seed must be an int or None"),
    ],
)
def test_bad_hyper_parameter_names_the_argument(cls, kwargs, pattern):
    p = nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=pattern):
        cls([p], **kwargs)


@pytest.mark.parametrize(
    ("cls", "typo", "accepted"),
    [
        (leanopt.AdamW, "weight_decy", "weight_decay"),
        (leanopt.Adam, "amsgard", "amsgrad"),
        (leanopt.SGD, "momentun", "nesterov"),
        (leanopt.Lion, "eps", "betas"),  # Lion has no eps: torch.optim.Adam's name, not a typo
        (leanopt.AdamW, "state", "states"),
    ],
)
def test_a_keyword_the_optimizer_does_not_have_is_refused_naming_it(cls, typo, accepted):
    """Before, any unknown keyword went into the param groups and was never read: a misspelt
    weight_decay trained with the default."""
    p = nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match=rf"{cls.__name__}\(\) got an unexpected keyword argument '{typo}'") as err:
        cls([p], lr=1e-3, **{typo: 0.1})
    assert accepted in str(err.value) and "kernel" in str(err.value)
    assert p.grad is None and float(p.detach().sum()) == 0.0


def test_torch_optims_implementation_switches_are_accepted_only_where_they_ask_for_nothing():
    p = nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    neutral = {"foreach": None, "fused": None, "capturable": False, "differentiable": False}
    opt = leanopt.AdamW([p], lr=1e-3, **neutral)  # torch.optim's defaults, as code passing them on has them
    assert not set(neutral) & set(opt.param_groups[0]) and not set(neutral) & set(opt.defaults)
    for name, value, pattern in [
        ("fused", True, "kernel='auto'"),
        ("fused", False, "kernel='reference'"),
        ("foreach", True, "no foreach"),
        ("foreach", False, "no foreach"),
        ("capturable", True, "CUDA graph"),
        ("capturable", 0, "CUDA graph"),
        ("differentiable", True, "not differentiable"),
        ("differentiable", None, "not differentiable"),
    ]:
        with pytest.raises(ValueError, match=rf"{name}={value!r} is not supported: .*{pattern}.*pass {name}="):
            leanopt.SGD([p], lr=1e-3, **{name: value})


def test_extra_keys_of_a_param_group_dict_stay_allowed_as_in_torch_optim(recwarn):
    """A param group may carry the user's own keys (a name, a layer index, what LR schedulers add), as
    torch.optim allows, without a warning."""
    p = nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    own = {"name": "head", "layer": 3, "initial_lr": 1e-3, "max_lr": 1e-2, "max_momentum": 0.9, "base_momentum": 0.8}
    opt = leanopt.SGD([{"params": [p], **own}], lr=1e-3, momentum=0.5)
    assert all(opt.param_groups[0][k] == v for k, v in own.items())
    assert not [w for w in recwarn if "param group key" in str(w.message)]


@pytest.mark.parametrize(("key", "meant"), [("state", "states"), ("weight_decy", "weight_decay"), ("beta", "betas")])
def test_a_param_group_key_close_to_a_hyper_parameter_is_warned_about(key, meant):
    p = nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    with pytest.warns(UserWarning, match=rf"param group key '{key}' is not one leanopt reads; did you mean '{meant}'"):
        opt = leanopt.AdamW([{"params": [p], key: 0.5}], lr=1e-3)
    assert opt.param_groups[0][key] == 0.5  # kept, as any key of the user's own


@pytest.mark.parametrize("key", ["kernel", "nonfinite", "seed"])
def test_an_optimizer_wide_option_in_a_param_group_is_refused(key):
    """It would be ignored there: kernel, nonfinite and seed are the optimizer's, not a group's."""
    p, q = (nn.Parameter(torch.zeros(3, dtype=torch.bfloat16)) for _ in range(2))
    with pytest.raises(ValueError, match=rf"{key} is an optimizer-wide option, not a param group's: pass it to AdamW"):
        leanopt.AdamW([{"params": [p], key: "reference"}], lr=1e-3)
    opt = leanopt.AdamW([p], lr=1e-3)
    before = snapshot(opt, [p])
    with pytest.raises(ValueError, match=rf"{key} is an optimizer-wide option"):
        opt.add_param_group({"params": [q], key: 0})
    assert_same(before, snapshot(opt, [p]))


def test_torch_optims_param_groups_carry_over_where_their_meaning_is_kept():
    """torch.optim.AdamW's groups hold decoupled_weight_decay=True and its implementation switches at their
    defaults: leanopt.AdamW takes them; leanopt.Adam (L2 decay) refuses them rather than decaying otherwise."""
    p = nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    group = {**torch.optim.AdamW([nn.Parameter(torch.zeros(3))], lr=1e-3).param_groups[0], "params": [p]}
    assert group["decoupled_weight_decay"] is True
    leanopt.AdamW([group])
    with pytest.raises(ValueError, match=r"decoupled_weight_decay=True: leanopt.Adam has decoupled_weight_decay"
                                         r"=False built in; use leanopt.AdamW"):  # fmt: skip
        leanopt.Adam([group])
    with pytest.raises(ValueError, match=r"use leanopt.Adam$"):
        leanopt.AdamW([p], decoupled_weight_decay=False)
    with pytest.raises(ValueError, match=r"fused=True is not supported"):
        leanopt.AdamW([{**group, "fused": True}])


def test_non_floating_param_is_rejected():
    with pytest.raises(
        ValueError, match=r"params\[1\] has dtype torch.int64; leanopt optimizes bfloat16, float16 and float32"
    ):
        leanopt.SGD([torch.zeros(2, requires_grad=True), torch.zeros(2, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"params\[0\] has dtype torch.complex64"):
        leanopt.SGD([torch.zeros(2, dtype=torch.complex64)])
    # float64 would silently be updated with fp32 arithmetic: refused, pointing to torch.optim.
    with pytest.raises(ValueError, match=r"params\[0\] has dtype torch.float64; .*use torch.optim for float64"):
        leanopt.AdamW([torch.zeros(2, dtype=torch.float64, requires_grad=True)])
    with pytest.raises(TypeError, match=r"params\[0\] must be a torch.Tensor"):
        leanopt.SGD([[1.0, 2.0]])


def test_fp16_with_exact_is_rejected_naming_what_is_accepted():
    p = nn.Parameter(torch.zeros(3, dtype=torch.float16))
    with pytest.raises(
        ValueError, match=r"master='exact' does not support torch.float16.*\['none', 'stochastic', 'kahan'"
    ):
        leanopt.Adam([p], master="exact")


@pytest.mark.parametrize(
    ("group", "pattern"),
    [
        ({"lr": -1.0}, r"Invalid lr"),
        ({"betas": (0.9, 1.5)}, r"Invalid betas\[1\]"),
        ({"master": "exact", "dtype": torch.float16}, r"master='exact' does not support torch.float16"),
        ({"master": "bogus"}, r"master must be one of"),
        ({"states": "int2"}, r"states must be one of"),
        ({"dtype": torch.int32}, r"params\[0\] has dtype torch.int32"),
    ],
)
def test_add_param_group_with_bad_values_leaves_optimizer_unchanged(group, pattern):
    net, opt = trained()
    params = list(net.parameters())
    before = snapshot(opt, params)
    group = dict(group)
    dtype = group.pop("dtype", torch.bfloat16)
    new = torch.zeros(5, dtype=dtype, requires_grad=dtype.is_floating_point)
    with pytest.raises(ValueError, match=pattern):
        opt.add_param_group({"params": [new], **group})
    assert_same(before, snapshot(opt, params))
    assert len(opt.param_groups) == 1


def test_add_param_group_rejects_a_param_already_managed():
    net, opt = trained()
    before = snapshot(opt, list(net.parameters()))
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [net[0].weight]})
    assert_same(before, snapshot(opt, list(net.parameters())))


def test_add_param_group_with_good_values_trains_the_new_group():
    net, opt = trained()
    extra = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt.add_param_group({"params": [extra], "lr": 0.5, "master": "none"})
    extra.grad = torch.ones_like(extra)
    opt.step()
    assert opt.param_groups[1]["lr"] == 0.5 and "remainder" not in opt.state[extra]
    assert bool((extra.detach() < 1).all())


def test_sparse_gradient_is_rejected_before_anything_changes():
    emb = nn.Embedding(10, 4, sparse=True).bfloat16()
    lin = nn.Linear(4, 1).bfloat16()
    params = list(lin.parameters()) + list(emb.parameters())  # the dense ones come first
    opt = leanopt.AdamW(params)
    lin(emb(torch.tensor([1, 2, 3]))).float().sum().backward()
    assert emb.weight.grad.is_sparse
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"parameter 2 has a sparse gradient; .*dense gradients only"):
        opt.step()
    assert_same(before, snapshot(opt, params))
    assert not opt.state  # not even the dense params were touched


def test_hyper_parameter_made_bad_after_construction_fails_before_any_update():
    net, opt = trained()
    params = list(net.parameters())
    opt.param_groups[0]["lr"] = -1.0
    net(torch.randn(5, 4, dtype=torch.bfloat16)).float().sum().backward()
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: Invalid lr"):
        opt.step()
    assert_same(before, snapshot(opt, params))


def test_master_changed_to_one_the_dtype_lacks_fails_before_any_update():
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(3, dtype=torch.bfloat16))
    b = nn.Parameter(torch.randn(3, dtype=torch.float16))
    opt = leanopt.SGD([{"params": [a]}, {"params": [b], "master": "kahan"}], lr=0.1)
    opt.param_groups[1]["master"] = "exact"  # fp16 cannot be exact
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    before = snapshot(opt, [a, b])
    with pytest.raises(ValueError, match=r"master='exact' does not support torch.float16"):
        opt.step()
    assert_same(before, snapshot(opt, [a, b]))


def test_master_changed_after_first_step_fails_before_any_update():
    net, opt = trained()
    params = list(net.parameters())
    opt.param_groups[0]["master"] = "kahan"  # the state holds a remainder, not a compensation
    net(torch.randn(5, 4, dtype=torch.bfloat16)).float().sum().backward()
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"parameter 0: .*'compensation'.*cannot change after the first step"):
        opt.step()
    assert_same(before, snapshot(opt, params))


def test_states_changed_after_first_step_fails_before_any_update():
    net, opt = trained()
    params = list(net.parameters())
    opt.param_groups[0]["states"] = "bf16"  # the fp32 states were made for states='fp32'
    net(torch.randn(5, 4, dtype=torch.bfloat16)).float().sum().backward()
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"parameter 0: .*'exp_avg'.*cannot change after the first step"):
        opt.step()
    assert_same(before, snapshot(opt, params))


def test_momentum_turned_on_and_off_mid_training_is_allowed():
    p = nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    opt = leanopt.SGD([p], lr=0.1)
    for momentum in (0.0, 0.9, 0.0):
        opt.param_groups[0]["momentum"] = momentum
        p.grad = torch.ones_like(p)
        opt.step()
    assert "momentum_buffer" in opt.state[p]
    assert opt.state[p]["step"].item() == 3


# ---------------------------------------------------------------------------------- non-finite gradients


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("master", ["exact", "stochastic", "kahan", "none"])
def test_nonfinite_gradient_skips_that_tensor_and_counts_it(bad, master):
    net, opt = trained(master=master)
    params = list(net.parameters())
    net(torch.randn(5, 4, dtype=torch.bfloat16)).float().pow(2).mean().backward()
    params[1].grad[0] = bad
    before = snapshot(opt, params)
    opt.step()
    after = snapshot(opt, params)
    assert opt.nonfinite_skipped == 1 and opt.last_skipped == [1]
    # The skipped tensor: weight, master bits and states exactly as before.
    assert torch.equal(after["weights"][1].view(torch.int16), before["weights"][1].view(torch.int16))
    for k, v in before["state"][id(params[1])].items():
        assert torch.equal(v, after["state"][id(params[1])][k]), k
    # The others were updated.
    for i in (0, 2, 3):
        assert not torch.equal(after["weights"][i], before["weights"][i])
        assert after["state"][id(params[i])]["step"].item() == 4
    # The skip is per step: the next clean step clears last_skipped, the counter keeps the total.
    opt.zero_grad()
    net(torch.randn(5, 4, dtype=torch.bfloat16)).float().pow(2).mean().backward()
    opt.step()
    assert opt.last_skipped == [] and opt.nonfinite_skipped == 1
    assert all(bool(torch.isfinite(p).all()) for p in params)


def test_nonfinite_raise_changes_nothing():
    net, opt = trained(nonfinite="raise")
    params = list(net.parameters())
    net(torch.randn(5, 4, dtype=torch.bfloat16)).float().pow(2).mean().backward()
    params[3].grad[0] = float("nan")  # the last tensor: the others must not be updated first
    before = snapshot(opt, params)
    with pytest.raises(FloatingPointError, match="non-finite gradient for parameter 3"):
        opt.step()
    assert_same(before, snapshot(opt, params))


def test_nonfinite_ignore_checks_nothing_like_torch_optim():
    """nonfinite="ignore": no check; the NaN reaches the weights exactly as in torch.optim."""
    for kernel in ("auto", "reference"):
        p = nn.Parameter(torch.ones(40, dtype=torch.bfloat16))
        opt = leanopt.AdamW([p], nonfinite="ignore", kernel=kernel)
        p.grad = torch.ones(40, dtype=torch.bfloat16)
        p.grad[7] = math.nan
        opt.step()
        assert opt.nonfinite_skipped == 0 and opt.last_skipped == []
        assert torch.isnan(p[7]) and bool(torch.isfinite(p[:7]).all()) and bool(torch.isfinite(p[8:]).all())


def test_nonfinite_gradient_on_first_step_creates_no_state():
    p = nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    opt = leanopt.Adam([p])
    p.grad = torch.tensor([1.0, math.nan, 0.0], dtype=torch.bfloat16)
    opt.step()
    assert opt.nonfinite_skipped == 1 and not opt.state.get(p)
    assert torch.equal(p.detach(), torch.ones(3, dtype=torch.bfloat16))


def test_nonfinite_skip_count_survives_state_dict_round_trip():
    net, opt = trained()
    params = list(net.parameters())
    params[0].grad = torch.full_like(params[0], math.inf)
    opt.step()
    sd = opt.state_dict()
    _, fresh = trained()
    fresh.load_state_dict(sd)
    assert fresh.nonfinite_skipped == 1


def _capturing(monkeypatch) -> None:
    """As if the current CUDA stream were capturing a graph (the two calls the guard makes)."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


@pytest.mark.parametrize("path", ["step", "update_param", "release hook", "planned step"])
def test_a_step_during_cuda_graph_capture_is_refused_and_changes_nothing(monkeypatch, path):
    """torch.optim refuses a captured step without capturable=True; leanopt's steps read step counts,
    the learning rate and NaN/inf verdicts on the host, so a graph would replay them frozen: refused with
    a clear error at every entry (step(), update_param(), a gradient release hook, and a step that would
    run the plan of the step before), before anything changes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 40), nn.Tanh(), nn.Linear(40, 4)).bfloat16()
    params = list(model.parameters())
    opt = leanopt.AdamW(params, lr=1e-2, master="compact", states="int8")
    x = torch.randn(16, 8, dtype=torch.bfloat16)
    handle = leanopt.release_gradients(opt) if path == "release hook" else None
    for _ in range(2):  # states exist; a CPU step plan is kept from the second
        model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    if path != "release hook":
        model(x).float().square().mean().backward()
    before = snapshot(opt, params)
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    _capturing(monkeypatch)
    with pytest.raises(RuntimeError, match=r"while a CUDA graph is being captured.*Nothing was changed"):
        if path in ("step", "planned step"):
            if path == "step":
                opt._step_plan = None
            opt.step()
        elif path == "update_param":
            opt.update_param(params[0], opt.param_groups[0])
        else:
            model(x).float().square().mean().backward()
    assert_same(before, snapshot(opt, params))
    if path != "release hook":
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads, strict=True))
    monkeypatch.undo()
    if handle is not None:
        handle.remove()
    opt.zero_grad()
    model(x).float().square().mean().backward()
    opt.step()  # and the next step outside a capture runs
    assert not torch.equal(before["weights"][0], params[0].detach())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_capture_of_a_step_is_refused_on_the_gpu():
    """On a GPU: optimizer.step() inside torch.cuda.graph raises leanopt's error, and the weights are the
    ones before (the multi-tensor CUDA kernels' planned step included)."""
    p = nn.Parameter(torch.randn(64, 64, device="cuda", dtype=torch.bfloat16))
    opt = leanopt.AdamW([p], lr=1e-2)
    for _ in range(2):
        p.grad = torch.randn_like(p)
        opt.step()
    p.grad = torch.randn_like(p)
    torch.cuda.synchronize()
    weights = p.detach().clone()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="while a CUDA graph is being captured"):
        with torch.cuda.graph(graph):
            opt.step()
    torch.cuda.synchronize()
    assert torch.equal(p.detach(), weights)
