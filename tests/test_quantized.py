"""8-bit / 4-bit state formats (formats/quantized.py): layout, accuracy, shard invariance, safety."""

import pytest
import torch
from torch import nn

import leanopt
from leanopt.formats.quantized import GROUP_SIZE, INT4, INT8, QuantizedStates, is_compressed, rows_shape
from leanopt.formats.states import STATE_FORMATS

FORMATS = [INT8, INT4]


def sample(shape, signed: bool, seed: int = 0, spread: float = 1.0) -> torch.Tensor:
    """Momentum-like (signed) or second-moment-like (>= 0) values with log-normal magnitudes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(spread * torch.randn(shape, generator=g))
    return x if signed else x.square()


def roundtrip(fmt, x, signed):
    stored = fmt.init("s", x, signed)
    fmt.encode("s", x.clone(), stored, signed)
    return fmt.decode("s", stored, signed, shape=x.shape), stored


def nmse(a, b):
    return ((a.double() - b.double()).square().sum() / b.double().square().sum()).item()


def test_registered_formats():
    assert STATE_FORMATS["int8"] is INT8 and STATE_FORMATS["int4"] is INT4


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(64, 96), (5, 45), (2, 3, 33), (4, 64)])
def test_layout_bytes_and_meta_init(fmt, signed, shape):
    real = fmt.init("exp_avg", torch.empty(shape), signed)
    meta = fmt.init("exp_avg", torch.empty(shape, device="meta"), signed)
    assert {k: (v.dtype, v.shape) for k, v in real.items()} == {k: (v.dtype, v.shape) for k, v in meta.items()}
    *lead, n = shape
    rows = 1
    for d in lead:
        rows *= d
    groups = -(-n // GROUP_SIZE)
    assert set(real) == {"exp_avg.codes", "exp_avg.scales"}
    assert real["exp_avg.scales"].dtype == torch.bfloat16
    assert tuple(real["exp_avg.scales"].shape) == (*lead, groups)
    code_bytes = real["exp_avg.codes"].untyped_storage().nbytes()
    if fmt is INT8 or n % 2:
        assert code_bytes == rows * n
    else:
        assert code_bytes == rows * n // 2  # two 4-bit codes per byte


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("shape", [(7,), (300,), (16, 31), (4, 1), (64, 3, 3, 3), (8, 1, 5, 5), (4, 31, 1)])
def test_small_tensors_stay_fp32_and_exact(fmt, shape):
    assert not is_compressed(shape)
    x = sample(shape, True)
    out, stored = roundtrip(fmt, x, True)
    assert set(stored) == {"s"} and stored["s"].dtype == torch.float32
    assert torch.equal(out.view(torch.int32), x.view(torch.int32))


@pytest.mark.parametrize(
    "shape, rows",
    [
        ((64, 96), (64, 96)),
        ((2, 3, 33), (2, 3, 33)),  # the last dim is long enough: groups along it, as always
        ((64, 48, 3, 3), (64, 432)),  # conv weight: each output channel's in * kh * kw weights are a row
        ((512, 2048, 1, 1), (512, 2048)),  # 1x1 conv
        ((16, 8, 3, 3, 3), (16, 216)),  # 3-D conv
        ((32, 16, 5), (32, 80)),  # Conv1d
        ((64, 3, 3, 3), None),  # a first conv layer: 27 weights per output channel, under 32
        ((100, 16), None),  # 2-D: only the last dim can be a row (dim-0 shards would cut a group)
        ((300,), None),
        ((0, 16, 3, 3), (0, 144)),
    ],
)
def test_rows_shape(shape, rows):
    assert rows_shape(shape) == rows
    assert is_compressed(shape) is (rows is not None)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(64, 48, 3, 3), (16, 8, 3, 3, 3), (6, 7, 5)])
def test_a_conv_weight_state_is_its_rows_state(fmt, signed, shape):
    """A conv weight's state is stored exactly as the state of the same values shaped (out, in*kh*kw),
    decodes back to the weight's shape, and decode -> encode keeps its bits."""
    x = sample(shape, signed, seed=4, spread=2.0)
    rows = rows_shape(shape)
    out, stored = roundtrip(fmt, x, signed)
    _, as_rows = roundtrip(fmt, x.reshape(rows), signed)
    assert stored.keys() == as_rows.keys() == {"s.codes", "s.scales"}
    for key in stored:
        assert torch.equal(stored[key], as_rows[key]), key
    assert tuple(stored["s.scales"].shape) == (shape[0], -(-rows[1] // GROUP_SIZE))
    assert out.shape == x.shape and nmse(out, x) < (1e-4 if fmt is INT8 else 2e-2)
    again = {k: v.clone() for k, v in stored.items()}
    fmt.encode("s", out.clone(), again, signed)
    for key in stored:
        assert torch.equal(again[key], stored[key]), key


@pytest.mark.parametrize(
    "fmt,signed,bound",
    [(INT8, True, 1e-4), (INT8, False, 1e-4), (INT4, True, 2e-2), (INT4, False, 5e-3)],
    ids=["int8-signed", "int8-unsigned", "int4-signed", "int4-unsigned"],
)
def test_quantisation_error_is_small(fmt, signed, bound):
    x = sample((256, 512), signed)
    out, _ = roundtrip(fmt, x, signed)
    assert nmse(out, x) < bound
    if signed:
        assert torch.equal(torch.sign(out[out != 0]), torch.sign(x[out != 0]))  # no sign flips


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("signed", [True, False])
def test_power_of_two_rescaling_gives_identical_codes_from_1e_minus_8_to_1e2(fmt, signed):
    # Precision does not depend on magnitude: scaled by 2**k (|values| from ~1e-8 to ~1e2, second
    # moments from ~1e-16 to ~1e4) the codes are bit-identical and the values scale exactly.
    x = sample((32, 128), signed)
    _, ref = roundtrip(fmt, x, signed)
    ref_out = fmt.decode("s", ref, signed)
    for k in range(-27, 7, 3):
        factor = 2.0**k if signed else 4.0**k
        out, stored = roundtrip(fmt, x * factor, signed)
        assert torch.equal(stored["s.codes"], ref["s.codes"]), k
        assert torch.equal(out, ref_out * factor), k


def test_fp16_scales_fail_where_bf16_scales_do_not():
    fp16 = QuantizedStates("int8-fp16-scales", 8, scale_dtype=torch.float16)
    x = sample((64, 256), True) * 1e-8  # fp16 scales are subnormal or zero here
    assert nmse(roundtrip(INT8, x, True)[0], x) < 1e-4
    assert nmse(roundtrip(fp16, x, True)[0], x) > 1e-2
    x = sample((64, 256), True)  # in fp16's normal range both agree
    assert nmse(roundtrip(fp16, x, True)[0], x) < 1e-4


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(12, 100), (9, 64), (6, 2, 45), (8, 16, 3, 3)])
def test_a_dim0_shard_quantises_exactly_like_the_whole_tensor(fmt, signed, shape):
    x = sample(shape, signed, seed=3, spread=2.0)
    _, whole = roundtrip(fmt, x, signed)
    for start, stop in [(0, 1), (1, 4), (3, shape[0])]:
        _, shard = roundtrip(fmt, x[start:stop], signed)
        for key in whole:
            assert torch.equal(shard[key], whole[key][start:stop]), (key, start, stop)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(0, 34), (0, 64), (3, 0, 40), (0, 16, 3, 3)])
def test_tensors_with_no_rows_work(fmt, signed, shape):
    """An FSDP2 rank can hold no rows of a tensor."""
    x = torch.zeros(shape)
    out, stored = roundtrip(fmt, x, signed)
    assert out.shape == x.shape and all(v.numel() == 0 for v in stored.values())
    meta = fmt.init("s", x.to("meta"), signed)
    assert {k: (v.dtype, v.shape) for k, v in stored.items()} == {k: (v.dtype, v.shape) for k, v in meta.items()}


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("signed", [True, False])
def test_decode_then_encode_reproduces_the_stored_bits(fmt, signed):
    x = sample((40, 77), signed, spread=2.0)
    out, stored = roundtrip(fmt, x, signed)
    again = fmt.init("s", x, signed)
    fmt.encode("s", out.clone(), again, signed)
    for key in stored:
        assert torch.equal(again[key], stored[key]), key


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_second_moments_never_decode_to_zero_unless_the_group_is_zero(fmt):
    x = torch.full((4, 64), 1e-12)
    x[:, 0] = 1.0  # one large element per group
    x[2, 32:] = 0.0  # an all-zero group
    out, _ = roundtrip(fmt, x, False)
    assert bool((out[:, :32] > 0).all()) and bool((out[[0, 1, 3], 32:] > 0).all())
    assert bool((out[2, 32:] == 0).all())
    assert out[0, 0].item() == 1.0  # the group's largest element is kept exactly (bf16 scale)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_signed_zeros_stay_zero_and_the_group_max_is_kept(fmt):
    x = sample((8, 64), True)
    x[:, 5] = 0.0
    out, stored = roundtrip(fmt, x, True)
    assert bool((out[:, 5] == 0).all())
    top = x.view(8, 2, 32).abs().amax(-1)
    assert torch.equal(out.view(8, 2, 32).abs().amax(-1), top.bfloat16().float())


def adam_update_error(fmt_m, fmt_v, steps=40):
    """Max relative error of Adam's update direction m / (sqrt(v) + eps) over ``steps`` steps when m
    is stored in ``fmt_m`` and v in ``fmt_v``, for gradients whose typical magnitude varies by about
    e**(+-1) between neighbouring elements."""
    g = torch.Generator().manual_seed(0)
    scale = torch.exp(0.5 * torch.randn(64, 256, generator=g))
    m32 = torch.zeros(64, 256)
    v32 = torch.zeros(64, 256)
    stored = {**fmt_m.init("m", m32, True), **fmt_v.init("v", v32, False)}
    errs = []
    for _ in range(steps):
        grad = scale * (torch.randn(64, 256, generator=g) + 0.5)
        m32.lerp_(grad, 0.1)
        v32.mul_(0.999).addcmul_(grad, grad, value=0.001)
        m = fmt_m.decode("m", stored, True).lerp_(grad, 0.1)
        v = fmt_v.decode("v", stored, False).mul_(0.999).addcmul_(grad, grad, value=0.001)
        fmt_m.encode("m", m, stored, True)
        fmt_v.encode("v", v, stored, False)
        ref = m32 / (v32.sqrt() + 1e-8)
        got = fmt_m.decode("m", stored, True) / (fmt_v.decode("v", stored, False).sqrt() + 1e-8)
        errs.append(((got - ref).norm() / ref.norm()).item())
    return max(errs)


def test_companding_guard_int8_second_moments_without_it_do_clearly_worse():
    linear = QuantizedStates("int8-linear", 8, compand=False)  # v / max, with a zero level
    with_companding = adam_update_error(INT8, INT8)
    without = adam_update_error(INT8, linear)  # the same momentum format; only v differs
    assert with_companding < 0.15
    assert without > 100 * with_companding  # small v decode to 0: m / eps blows up


@pytest.mark.parametrize("cls", [leanopt.AdamW, leanopt.Adam, leanopt.Lion, leanopt.SGD])
@pytest.mark.parametrize("states", ["int8", "int4"])
def test_every_optimizer_with_states_trains_with_quantised_states(cls, states):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 1)).bfloat16()
    x = torch.randn(128, 32).bfloat16()
    y = x[:, :8].sum(1, keepdim=True) * 0.3
    hyper = {"lr": 1e-3} if cls is leanopt.Lion else {"lr": 1e-2}
    if cls is leanopt.SGD:
        hyper = {"lr": 0.05, "momentum": 0.9}
    opt = cls(net.parameters(), master="compact", states=states, **hyper)
    first = None
    for _ in range(40):
        loss = ((net(x) - y) ** 2).float().mean()
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.7 * first
    state = opt.state[net[0].weight]
    assert any(k.endswith(".codes") for k in state)
    assert not any(v.dtype == torch.float32 for v in state.values() if v.dim())


def _conv_run(states: str, steps: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(16, 8, 3), nn.Tanh(), nn.Conv2d(8, 4, 1)).bfloat16()
    opt = leanopt.AdamW(net.parameters(), lr=1e-2, master="compact", states=states)
    x = torch.randn(4, 16, 6, 6).bfloat16()
    for _ in range(steps):
        net(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    return net, opt, x


@pytest.mark.parametrize("states", ["int8", "int4"])
def test_conv_weights_get_quantised_states(states):
    """Conv2d weights (16*3*3 = 144 weights per output channel) keep int8/int4 states, not fp32; the
    1x1 conv's rows (8) and the biases stay fp32."""
    net, opt, _ = _conv_run(states)
    fmt = STATE_FORMATS[states]
    big = opt.state[net[0].weight]
    assert {k: (v.dtype, tuple(v.shape)) for k, v in big.items() if k.startswith("exp_avg.")} == {
        "exp_avg.codes": (torch.int8 if states == "int8" else torch.uint8, (8, 144 if states == "int8" else 72)),
        "exp_avg.scales": (torch.bfloat16, (8, 5)),
    }
    held = sum(v.untyped_storage().nbytes() for k, v in big.items() if k.startswith("exp_avg"))
    assert held == 2 * (8 * 144 * fmt.bits // 8 + 8 * 5 * 2)  # codes + bf16 scales, both moments
    assert opt.state[net[2].weight]["exp_avg"].dtype == torch.float32  # (4, 8, 1, 1): rows of 8
    assert opt.state[net[0].bias]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("states", ["int8", "int4"])
def test_a_state_dict_with_fp32_conv_states_from_before_loads_quantised(states):
    """leanopt 0.1.0 kept a conv weight's states in fp32 (its last dim is under 32). Such a state dict
    loads: each of those states is encoded as one more step's encode would (the same bits), the rest
    loads as saved, the given dict is not modified, and training goes on."""
    net, opt, x = _conv_run(states)
    fmt = STATE_FORMATS[states]
    saved = opt.state_dict()
    w = saved["state"][0]
    old = {"exp_avg": (torch.randn(8, 16, 3, 3), True), "exp_avg_sq": (torch.rand(8, 16, 3, 3) * 1e-3, False)}
    for name, (value, _) in old.items():
        del w[f"{name}.codes"], w[f"{name}.scales"]
        w[name] = value.clone()
    net2, opt2, _ = _conv_run(states, steps=0, seed=1)
    opt2.load_state_dict(saved)
    got = opt2.state[net2[0].weight]
    for name, (value, signed) in old.items():
        want = fmt.init(name, net2[0].weight, signed)
        fmt.encode(name, value.clone(), want, signed)
        for key in want:
            assert torch.equal(got[key], want[key]), key
        assert torch.equal(w[name], value)  # the given dict keeps its fp32 state
    assert torch.equal(got["residual"], opt.state[net[0].weight]["residual"])
    assert torch.equal(opt2.state[net2[0].bias]["exp_avg"], opt.state[net[0].bias]["exp_avg"])
    net2.load_state_dict(net.state_dict())
    net2(x).float().square().mean().backward()
    opt2.step()
    assert all(bool(torch.isfinite(p).all()) for p in net2.parameters())


def test_a_state_dict_with_a_misshapen_fp32_conv_state_is_refused_and_changes_nothing():
    net, opt, _ = _conv_run("int8")
    saved = opt.state_dict()
    w = saved["state"][0]
    del w["exp_avg.codes"], w["exp_avg.scales"]
    w["exp_avg"] = torch.zeros(8, 16, 9)  # not the weight's shape
    before = {k: v.clone() for k, v in opt.state[net[0].weight].items()}
    with pytest.raises(ValueError, match=r"parameter 0: state_dict holds .*exp_avg'.*expected .*exp_avg\.codes"):
        opt.load_state_dict(saved)
    for k, v in opt.state[net[0].weight].items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("signed", [True, False])
def test_a_nan_element_gets_code_zero_and_decodes_to_nan(fmt, signed):
    """A NaN element (a NaN gradient let through with nonfinite="ignore") gets code 0, explicitly: C and
    C++ leave converting NaN to an integer undefined (x86 gives INT_MIN, ARM and CUDA 0). Its group's
    scale is the canonical NaN, so the whole group decodes to NaN; the other groups are untouched."""
    x = sample((2, 64), signed, seed=3)
    x[0, 5] = float("nan")
    codes, scales = fmt.quantize(x, signed)
    assert int(codes[0, 5]) == 0
    assert scales.dtype == torch.bfloat16 and int(scales[0, 0].view(torch.int16)) == 0x7FC0
    assert not torch.isnan(scales[0, 1:]).any() and not torch.isnan(scales[1]).any()
    got, _ = roundtrip(fmt, x, signed)
    assert torch.isnan(got[0, :GROUP_SIZE]).all() and not torch.isnan(got[0, GROUP_SIZE:]).any()
    assert not torch.isnan(got[1]).any()
