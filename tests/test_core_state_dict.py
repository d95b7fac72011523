"""state_dict round trips resume bit-identically; mismatched state dicts fail and change nothing."""

import copy

import pytest
import torch
from torch import nn

import leanopt
from leanopt.models import Block, GPTConfig


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(dtype=torch.bfloat16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Block(GPTConfig(n_embd=16, n_head=2, block_size=8)), nn.Linear(16, 4)).to(dtype)


def train(model, opt, steps, start, sched=None):
    for step in range(start, start + steps):
        x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(step)).to(next(model.parameters()).dtype)
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same_training_state(m1, o1, m2, o2):
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(bits(p.detach()), bits(q.detach()))
        s1, s2 = o1.state[p], o2.state[q]
        assert s1.keys() == s2.keys()
        for k in s1:
            assert s1[k].dtype == s2[k].dtype and torch.equal(bits(s1[k]), bits(s2[k])), k
    for g1, g2 in zip(o1.param_groups, o2.param_groups, strict=True):
        assert {k: v for k, v in g1.items() if k != "params"} == {k: v for k, v in g2.items() if k != "params"}


CASES = [
    (leanopt.AdamW, dict(lr=1e-3), "exact", "fp32"),
    (leanopt.AdamW, dict(lr=1e-3), "exact", "bf16"),
    (leanopt.Adam, dict(lr=1e-3, amsgrad=True), "kahan", "fp32"),
    (leanopt.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True), "exact", "fp32"),
    (leanopt.Lion, dict(lr=1e-4), "stochastic", "fp32"),
    (leanopt.AdamW, dict(lr=1e-3), "none", "bf16"),
]


@pytest.mark.parametrize(("cls", "hyper", "master", "states"), CASES)
def test_state_dict_round_trip_through_a_file_resumes_bit_identically(tmp_path, cls, hyper, master, states):
    opts = dict(master=master, states=states, seed=5)
    # Uninterrupted run, with an LR scheduler so the group's lr changes too.
    m1 = make_model()
    o1 = cls(m1.parameters(), **hyper, **opts)
    s1 = torch.optim.lr_scheduler.StepLR(o1, step_size=3, gamma=0.5)
    train(m1, o1, 12, 0, s1)
    # Interrupted run: 5 steps, save to a real file, load into a fresh model and optimizer, continue.
    m2 = make_model()
    o2 = cls(m2.parameters(), **hyper, **opts)
    s2 = torch.optim.lr_scheduler.StepLR(o2, step_size=3, gamma=0.5)
    train(m2, o2, 5, 0, s2)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": m2.state_dict(), "opt": o2.state_dict(), "sched": s2.state_dict()}, path)
    del m2, o2, s2
    ckpt = torch.load(path, weights_only=True)
    m3 = make_model()
    m3.load_state_dict(ckpt["model"])
    o3 = cls(m3.parameters(), **hyper, **{**opts, "seed": 99})  # the saved seed wins
    s3 = torch.optim.lr_scheduler.StepLR(o3, step_size=3, gamma=0.5)
    o3.load_state_dict(ckpt["opt"])
    s3.load_state_dict(ckpt["sched"])
    train(m3, o3, 7, 5, s3)
    assert_same_training_state(m1, o1, m3, o3)
    if master == "exact":
        for p, q in zip(m1.parameters(), m3.parameters(), strict=True):
            assert torch.equal(bits(o1.master_value(p)), bits(o3.master_value(q)))


def test_loaded_state_is_a_copy():
    m = make_model()
    o = leanopt.AdamW(m.parameters())
    train(m, o, 2, 0)
    sd = copy.deepcopy(o.state_dict())
    saved = copy.deepcopy(sd)
    o.load_state_dict(sd)
    train(m, o, 2, 2)
    # The dict given to load_state_dict is not changed by later steps.
    for pid, st in saved["state"].items():
        for k, v in st.items():
            assert torch.equal(bits(v), bits(sd["state"][pid][k])), k
    assert saved["param_groups"] == sd["param_groups"]


def trained_optimizer(dtype=torch.bfloat16, **options):
    m = make_model(dtype)
    o = leanopt.AdamW(m.parameters(), lr=1e-3, **options)
    train(m, o, 2, 0)
    return m, o


def snapshot(opt):
    return (
        [{k: (list(v) if k == "params" else copy.deepcopy(v)) for k, v in g.items()} for g in opt.param_groups],
        {p: {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()},
        opt.nonfinite_skipped,
    )


def assert_unchanged(opt, snap):
    groups, state, skipped = snap
    assert len(opt.param_groups) == len(groups)
    for g, g0 in zip(opt.param_groups, groups, strict=True):
        assert g.keys() == g0.keys()
        for k in g:
            assert (
                (all(a is b for a, b in zip(g[k], g0[k], strict=True)) and len(g[k]) == len(g0[k]))
                if k == "params"
                else g[k] == g0[k]
            )
    assert set(opt.state) == set(state)
    for p, st in state.items():
        assert opt.state[p].keys() == st.keys()
        for k, v in st.items():
            assert torch.equal(bits(opt.state[p][k]), bits(v))
    assert opt.nonfinite_skipped == skipped


def _other_shape():
    torch.manual_seed(0)
    m = nn.Sequential(Block(GPTConfig(n_embd=16, n_head=2, block_size=8)), nn.Linear(16, 5)).bfloat16()
    o = leanopt.AdamW(m.parameters(), lr=1e-3)
    train_x = torch.randn(2, 8, 16).bfloat16()
    m(train_x).float().pow(2).mean().backward()
    o.step()
    return o.state_dict()


def _edited(edit):
    def make():
        _, o = trained_optimizer()
        sd = copy.deepcopy(o.state_dict())
        edit(sd)
        return sd

    return make


def _set_state(pid, key, convert):
    return _edited(lambda sd: sd["state"][pid].update({key: convert(sd["state"][pid][key])}))


def _saved_by(**kwargs):
    return lambda: trained_optimizer(**kwargs)[1].state_dict()


MISMATCHES = {
    "shape": (
        _other_shape,
        r"state 'remainder' is torch.int16 of shape \(5, 16\), expected torch.int16 of shape \(4, 16\)",
    ),
    "fp32 model": (
        _saved_by(dtype=torch.float32),
        r"holds \['exp_avg', 'exp_avg_sq', 'step'\], expected \['exp_avg', 'exp_avg_sq', 'remainder', 'step'\]",
    ),
    "master mode": (_saved_by(master="kahan"), r"saved with master='kahan', this optimizer uses master='auto'"),
    "states mode": (_saved_by(states="bf16"), r"saved with states='bf16', this optimizer uses states='fp32'"),
    "state dtype": (
        _set_state(3, "exp_avg_sq", torch.Tensor.double),
        r"parameter 3: state 'exp_avg_sq' is torch.float64",
    ),
    "remainder dtype": (_set_state(0, "remainder", torch.Tensor.int), r"parameter 0: state 'remainder' is torch.int32"),
    "group count": (
        _edited(lambda sd: sd["param_groups"].append(copy.deepcopy(sd["param_groups"][0]))),
        r"state_dict has 2 param groups, this optimizer has 1",
    ),
    "param count": (
        _edited(lambda sd: sd["param_groups"][0]["params"].pop()),
        r"param group 0: state_dict has \d+ params, this optimizer has \d+",
    ),
    "bad lr": (_edited(lambda sd: sd["param_groups"][0].update(lr=-1.0)), r"param group 0 in state_dict: Invalid lr"),
    "torch.optim": (
        lambda: torch.optim.AdamW(make_model().parameters()).state_dict(),
        r"param group 0 has no 'master'",
    ),
    "not a dict": (lambda: [1, 2], r"state_dict must be a dict with 'state' and 'param_groups'"),
    "bad seed": (
        _edited(lambda sd: sd["leanopt"].update(seed="x")),
        r"state_dict\['leanopt'\]\['seed'\] must be an int",
    ),
}


@pytest.mark.parametrize("kind", list(MISMATCHES))
def test_mismatched_state_dict_raises_and_leaves_optimizer_unchanged(kind):
    make_sd, pattern = MISMATCHES[kind]
    sd = make_sd()
    _, opt = trained_optimizer()
    snap = snapshot(opt)
    with pytest.raises(ValueError, match=pattern):
        opt.load_state_dict(sd)
    assert_unchanged(opt, snap)


def test_auto_and_exact_are_the_same_mode_for_bf16():
    _, saved = trained_optimizer(master="exact")
    m, o = trained_optimizer()  # master="auto": exact for bf16 params
    o.load_state_dict(saved.state_dict())
    assert o.param_groups[0]["master"] == "exact"
    train(m, o, 1, 2)


def test_state_dict_is_plain_tensors_and_python_values():
    _, o = trained_optimizer()
    sd = o.state_dict()
    assert sd["leanopt"]["version"] == 1 and sd["leanopt"]["seed"] == o.seed
    st = sd["state"][0]
    assert st["remainder"].dtype == torch.int16 and st["exp_avg"].dtype == torch.float32
    assert sd["param_groups"][0]["master"] == "auto" and sd["param_groups"][0]["states"] == "fp32"


def test_a_deepcopied_or_pickled_optimizer_keeps_its_modes_and_continues_identically():
    """torch.optim.Optimizer pickles only defaults, state and param_groups; leanopt's own settings
    (nonfinite, kernel, seed, skip count) must survive copy.deepcopy and torch.save of the optimizer."""
    import copy
    import io

    torch.manual_seed(0)
    model = torch.nn.Linear(40, 6).bfloat16()
    opt = leanopt.AdamW(model.parameters(), lr=1e-2, master="stochastic", states="int8", nonfinite="skip",
                        seed=11)  # fmt: skip
    for _ in range(2):
        model(torch.randn(3, 40).bfloat16()).float().sum().backward()
        opt.step()
        opt.zero_grad()
    model.weight.grad = torch.full_like(model.weight, float("nan"))
    opt.step()
    opt.zero_grad()  # (torch.save keeps no .grad)
    pair = copy.deepcopy((model, opt))
    buf = io.BytesIO()
    torch.save((model, opt), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    copies = [pair, loaded]
    for _, o in copies:
        assert (o.nonfinite, o.kernel, o.seed, o.nonfinite_skipped, o.last_skipped) == ("skip", "auto", 11, 1, [0])
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        x = torch.randn(3, 40, generator=g).bfloat16()
        for m, o in [(model, opt), *copies]:
            m(x).float().sum().backward()
            o.step()
            o.zero_grad()
    for m, o in copies:
        for a, b in zip(model.parameters(), m.parameters(), strict=True):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16))
        for a, b in zip(opt.state.values(), o.state.values(), strict=True):
            for k in a:
                assert torch.equal(a[k], b[k]), k
