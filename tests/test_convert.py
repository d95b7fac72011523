"""Conversion between leanopt and torch.optim state dicts (leanopt/convert.py)."""

import copy

import pytest
import torch
from torch import nn

import leanopt
from leanopt.convert import from_torch, to_torch

I32 = torch.int32


def make_net(dtype=torch.bfloat16, seed=0, conv=False):
    """An MLP on 40 inputs; ``conv``: its first layer a Conv1d whose (64, 8, 5) weight has int8/int4
    states in rows of 8 * 5 = 40 (formats/quantized.py ``rows_shape``)."""
    torch.manual_seed(seed)
    first = nn.Sequential(nn.Unflatten(1, (8, 5)), nn.Conv1d(8, 64, 5), nn.Flatten()) if conv else nn.Linear(40, 64)
    return nn.Sequential(first, nn.Tanh(), nn.Linear(64, 3)).to(dtype)


def train(net, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    dtype = next(net.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(16, 40, generator=g).to(dtype)
        net(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def snapshot(opt):
    """All optimizer state tensors as bit patterns, in parameter order."""
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            out.append({k: v.clone() for k, v in opt.state[p].items()})
    return out


def assert_same_state(a, b):
    assert len(a) == len(b)
    for sa, sb in zip(a, b, strict=True):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_exact_fp32_states_export_bit_for_bit_and_load_into_torch_adamw():
    net = make_net()
    opt = leanopt.AdamW(net.parameters(), lr=3e-3, master="exact", states="fp32")
    train(net, opt, 5)
    weights, optim_state = to_torch(net, opt)
    for (name, _), p in zip(net.named_parameters(), net.parameters(), strict=True):
        assert weights[name].dtype == torch.float32
        assert torch.equal(weights[name].view(I32), opt.master_value(p).view(I32))
    for i, p in enumerate(net.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(optim_state["state"][i][key].view(I32), opt.state[p][key].view(I32))
        assert optim_state["state"][i]["step"].item() == 5
    fp32 = make_net(torch.float32)
    fp32.load_state_dict(weights)
    torch_opt = torch.optim.AdamW(fp32.parameters())
    torch_opt.load_state_dict(optim_state)
    assert torch_opt.param_groups[0]["lr"] == 3e-3
    train(fp32, torch_opt, 1)  # loads and steps like any torch checkpoint


@pytest.mark.parametrize(
    "cls,master,states",
    [
        (leanopt.AdamW, "exact", "fp32"),
        (leanopt.AdamW, "compact", "int8"),
        (leanopt.AdamW, "compact", "int4"),
        (leanopt.Adam, "exact", "bf16"),
        (leanopt.SGD, "compact", "int8"),
    ],
)
@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_leanopt_to_torch_and_back_reproduces_every_bit(cls, master, states, conv):
    hyper = {"lr": 1e-2, "momentum": 0.9} if cls is leanopt.SGD else {"lr": 1e-2}
    net = make_net(conv=conv)
    opt = cls(net.parameters(), master=master, states=states, **hyper)
    train(net, opt, 4)
    weights, optim_state = to_torch(net, opt)

    if conv:  # torch's state holds the conv weight's states in its shape
        assert all(v.shape == net[0][1].weight.shape for k, v in optim_state["state"][0].items() if k != "step")
        quantised = any(k.endswith(".codes") for k in opt.state[net[0][1].weight])
        assert quantised is (states in ("int8", "int4"))
    net2 = make_net(seed=7, conv=conv)
    extra = {"momentum": 0.9} if cls is leanopt.SGD else {}
    opt2 = cls(net2.parameters(), master=master, states=states, lr=0.5, **extra)
    from_torch(net2, opt2, weights, optim_state)
    assert opt2.param_groups[0]["lr"] == 1e-2  # hyper-parameters come from the torch state dict
    for p, q in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(p.view(torch.int16), q.view(torch.int16))
    assert_same_state(snapshot(opt), snapshot(opt2))
    train(net, opt, 2, seed=5)
    train(net2, opt2, 2, seed=5)
    assert_same_state(snapshot(opt), snapshot(opt2))


def test_torch_adamw_into_leanopt_exact_keeps_every_fp32_bit():
    fp32 = make_net(torch.float32)
    torch_opt = torch.optim.AdamW(fp32.parameters(), lr=2e-3, betas=(0.8, 0.99), weight_decay=0.05)
    train(fp32, torch_opt, 6)
    weights, optim_state = fp32.state_dict(), torch_opt.state_dict()

    net = make_net()
    opt = leanopt.AdamW(net.parameters(), master="exact", states="fp32")
    from_torch(net, opt, weights, optim_state)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (2e-3, (0.8, 0.99), 0.05)
    for p, q in zip(fp32.parameters(), net.parameters(), strict=True):
        assert torch.equal(opt.master_value(q).view(I32), p.detach().view(I32))
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[q][key].view(I32), torch_opt.state[p][key].view(I32))
        assert opt.state[q]["step"].item() == 6
    back_weights, back_state = to_torch(net, opt)
    for k in weights:
        assert torch.equal(back_weights[k].view(I32), weights[k].view(I32))
    for i in optim_state["state"]:
        for key, value in optim_state["state"][i].items():
            assert torch.equal(back_state["state"][i][key], value), key


def test_torch_adamw_into_int8_states_is_close():
    fp32 = make_net(torch.float32)
    torch_opt = torch.optim.AdamW(fp32.parameters(), lr=2e-3)
    train(fp32, torch_opt, 6)
    net = make_net()
    opt = leanopt.AdamW(net.parameters(), master="compact", states="int8")
    from_torch(net, opt, fp32.state_dict(), torch_opt.state_dict())
    _, back = to_torch(net, opt)
    for i, p in enumerate(fp32.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            ref = torch_opt.state[p][key]
            got = back["state"][i][key]
            assert ((got - ref).norm() / ref.norm()).item() < 2e-2, key


def test_sgd_without_step_counter_round_trips_with_torch_sgd():
    fp32 = make_net(torch.float32)
    torch_opt = torch.optim.SGD(fp32.parameters(), lr=0.1, momentum=0.9)
    train(fp32, torch_opt, 3)
    net = make_net()
    opt = leanopt.SGD(net.parameters(), lr=0.1, momentum=0.9, master="exact")
    from_torch(net, opt, fp32.state_dict(), torch_opt.state_dict())
    _, back = to_torch(net, opt)
    assert set(back["state"][0]) == {"momentum_buffer", "step"}
    for i, p in enumerate(fp32.parameters()):
        assert torch.equal(back["state"][i]["momentum_buffer"], torch_opt.state[p]["momentum_buffer"])
    # The next step uses the buffer (not the first-step copy), as torch.optim.SGD does.
    train(fp32, torch_opt, 1, seed=9)
    train(net, opt, 1, seed=9)
    p, q = next(iter(fp32.parameters())), next(iter(net.parameters()))
    buf_ref = torch_opt.state[p]["momentum_buffer"]
    assert ((opt.state[q]["momentum_buffer"] - buf_ref).norm() / buf_ref.norm()).item() < 2e-2


def test_bad_inputs_raise_and_change_nothing():
    net = make_net()
    opt = leanopt.AdamW(net.parameters(), master="compact", states="int8")
    train(net, opt, 2)
    before_w = [p.detach().clone() for p in net.parameters()]
    before_s = snapshot(opt)
    weights, good = to_torch(net, opt)

    wrong_shape = copy.deepcopy(good)
    wrong_shape["state"][0]["exp_avg"] = torch.zeros(3)
    with pytest.raises(ValueError, match="exp_avg"):
        from_torch(net, opt, weights, wrong_shape)
    adam = copy.deepcopy(good)
    adam["param_groups"][0]["decoupled_weight_decay"] = False
    with pytest.raises(ValueError, match="torch.optim.Adam"):
        from_torch(net, opt, weights, adam)
    bad_lr = copy.deepcopy(good)
    bad_lr["param_groups"][0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        from_torch(net, opt, weights, bad_lr)
    bad_weights = dict(weights)
    bad_weights["0.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="0.weight"):
        from_torch(net, opt, bad_weights, good)
    with pytest.raises(ValueError, match="state_dict|torch.optim"):
        from_torch(net, opt, weights, {"state": {}})
    for p, w in zip(net.parameters(), before_w, strict=True):
        assert torch.equal(p, w)
    assert_same_state(before_s, snapshot(opt))

    lion = leanopt.Lion(net.parameters())
    with pytest.raises(ValueError, match="no torch.optim equivalent"):
        to_torch(net, lion)
    with pytest.raises(TypeError, match="leanopt optimizer"):
        to_torch(net, torch.optim.AdamW(net.parameters()))
