"""The reference executor updates big tensors a block of rows at a time: bit-identical to one pass."""

import pytest
import torch

import leanopt
from leanopt.formats.states import STATE_FORMATS
from leanopt.formats.weights import WEIGHT_FORMATS
from leanopt.kernels import reference

MASTERS = [m for m in WEIGHT_FORMATS if m != "fp32"]  # stochastic too: each block takes its rows' bits


def _run(monkeypatch, chunk, cls, master, states, steps=3):
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(37, 64).bfloat16())
    opt = cls([w], lr=1e-2, master=master, states=states, kernel="reference")
    for _ in range(steps):
        w.grad = torch.randn_like(w)
        opt.step()
    st = opt.state[w]
    return w.detach().clone(), {k: v.clone() for k, v in st.items()}


@pytest.mark.parametrize("states", list(STATE_FORMATS))
@pytest.mark.parametrize("master", MASTERS)
@pytest.mark.parametrize("cls", [leanopt.AdamW, leanopt.SGD, leanopt.Lion])
def test_row_blocks_are_bit_identical_to_one_pass(monkeypatch, cls, master, states):
    kwargs = {"momentum": 0.9} if cls is leanopt.SGD else {}
    cls_ = (lambda params, **kw: leanopt.SGD(params, **kw, **kwargs)) if kwargs else cls
    whole_w, whole_state = _run(monkeypatch, 1 << 30, cls_, master, states)
    block_w, block_state = _run(monkeypatch, 5 * 64, cls_, master, states)  # blocks of 5 rows, ragged last
    assert torch.equal(whole_w.view(torch.int16), block_w.view(torch.int16))
    assert whole_state.keys() == block_state.keys()
    for key, value in whole_state.items():
        other = block_state[key]
        assert value.dtype == other.dtype and torch.equal(value, other), key


def test_blocks_really_split_the_tensor(monkeypatch):
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 5 * 64)
    w = torch.zeros(37, 64)
    state = {"step": torch.tensor(0.0), "exp_avg": torch.zeros(37, 64)}
    blocks = list(reference._row_blocks(w, w, state, whole=False))
    assert [b[0].shape[0] for b in blocks] == [5] * 7 + [2]
    assert len(list(reference._row_blocks(w, w, state, whole=True))) == 1


def test_stochastic_rounding_is_updated_a_block_at_a_time(monkeypatch):
    """Its bits follow each element's index (formats/noise.py), so the blocks need no whole-tensor noise:
    the blocks are really used, and give one pass's bits (test above)."""
    sizes = []
    real = reference._row_blocks

    def spy(*args):
        for block in real(*args):
            sizes.append(block[0].shape[0])
            yield block

    monkeypatch.setattr(reference, "_row_blocks", spy)
    _run(monkeypatch, 5 * 64, leanopt.AdamW, "stochastic", "fp32", steps=1)
    assert sizes == [5] * 7 + [2]
