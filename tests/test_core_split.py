"""The exact split (bf16 high part + int16 remainder) is lossless and rounds to nearest.

The round-to-nearest reference here is written independently of the library: torch's own
``.to(torch.bfloat16)`` (round half to even), with the exact ties moved away from zero.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leanopt.formats.weights import join_fp32, split_fp32

INT32_MIN = -(2**31)


def bits_to_fp32(bits: torch.Tensor) -> torch.Tensor:
    """int64 bit patterns in [0, 2**32) -> fp32 values with those bits."""
    signed = torch.where(bits >= 2**31, bits - 2**32, bits)
    return signed.to(torch.int32).view(torch.float32)


def round_half_away_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16, round to nearest, ties away from zero (reference, not the library's trick)."""
    rne = x.to(torch.bfloat16)
    low = x.view(torch.int32) & 0xFFFF
    tie = (low == 0x8000) & torch.isfinite(x)
    toward_zero = rne.float().abs() < x.abs()
    # x lies exactly halfway between a = rne and b (the other neighbour): b = x + (x - a), exact in fp32.
    away = (x + (x - rne.float())).to(torch.bfloat16)
    return torch.where(tie & toward_zero, away, rne)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = torch.int16 if a.element_size() == 2 else torch.int32
    return a.dtype == b.dtype and torch.equal(a.view(view), b.view(view))


def test_reference_rounding_moves_only_ties_away_from_zero():
    # 1 + 2**-8 is halfway between bf16 1.0 and 1.0078125; RNE picks 1.0 (even), ties-away 1.0078125.
    x = torch.tensor([1 + 2**-8, -(1 + 2**-8), 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, 1.0])
    expect = torch.tensor([1 + 2**-7, -(1 + 2**-7), 1 + 2**-6, 1 + 2**-7, 1.0]).to(torch.bfloat16)
    assert same_bits(round_half_away_bf16(x), expect)
    # 1 + 3 * 2**-8 is a tie too, but RNE already goes away from zero (to the even 1 + 2**-6).
    assert x[2].to(torch.bfloat16).item() == 1 + 2**-6


@pytest.mark.parametrize("chunk", range(4))
def test_exact_split_roundtrips_every_high_half_with_many_low_halves(chunk):
    """All 65,536 high halves x 96 low halves (edges plus random): 6.3M patterns in 4 chunks."""
    gen = torch.Generator().manual_seed(chunk)
    edges = torch.tensor([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFE, 0xFFFF, 0x4000, 0xC000], dtype=torch.int64)
    lows = torch.cat([edges, torch.randint(0, 1 << 16, (87,), generator=gen, dtype=torch.int64)])
    highs = torch.arange(chunk * 16384, (chunk + 1) * 16384, dtype=torch.int64)
    bits = (highs[:, None] << 16 | lows[None, :]).reshape(-1)
    x = bits_to_fp32(bits)
    hi, rem = split_fp32(x)
    assert hi.dtype == torch.bfloat16 and rem.dtype == torch.int16
    back = join_fp32(hi, rem)
    nan = torch.isnan(x)
    # Every non-NaN pattern (finite, subnormal, +-0, +-inf) comes back bit for bit.
    assert torch.equal(back.view(torch.int32)[~nan], x.view(torch.int32)[~nan])
    # The high part is the value rounded to nearest (ties away from zero), not truncated.
    assert same_bits(hi[~nan], round_half_away_bf16(x[~nan]))
    # NaN (any payload) decodes to NaN of the same sign.
    assert bool(torch.isnan(back[nan]).all()) and bool(torch.isnan(hi[nan].float()).all())
    assert torch.equal(back[nan].view(torch.int32) < 0, x[nan].view(torch.int32) < 0)


def test_high_part_matches_torch_round_to_nearest_except_at_exact_ties():
    x = torch.randn(200_000) * torch.logspace(-30, 30, 200_000)
    x[:1000] = 1 + torch.arange(1000) * 2.0**-16  # includes some exact ties
    hi, _ = split_fp32(x)
    tie = (x.view(torch.int32) & 0xFFFF) == 0x8000
    assert int(tie.sum()) > 0
    assert same_bits(hi[~tie], x[~tie].to(torch.bfloat16))
    # At ties the magnitude goes up (away from zero), where RNE may go down.
    assert bool((hi[tie].float().abs() > x[tie].abs()).all())


def test_special_values_roundtrip():
    f32 = torch.finfo(torch.float32)
    specials = torch.tensor(
        [0.0, -0.0, math.inf, -math.inf, f32.max, -f32.max, f32.tiny, -f32.tiny, 1e-45, -1e-45, 2.0**-140,
         f32.max * 0.5, 3.3895313892515355e38, 3.3895314e38],
        dtype=torch.float32,
    )  # fmt: skip
    hi, rem = split_fp32(specials)
    assert torch.equal(join_fp32(hi, rem).view(torch.int32), specials.view(torch.int32))
    # +-0 keep their sign in the high part with a zero remainder; infinities likewise.
    assert hi.view(torch.int16)[:4].tolist() == [0x0000, -0x8000, 0x7F80, -0x0080]
    assert rem[:4].tolist() == [0, 0, 0, 0]
    # The largest finite fp32 values round to bf16 infinity (as round-to-nearest does), yet rebuild exactly.
    assert math.isinf(hi[4].item()) and math.isinf(hi[5].item())
    assert rem[4].item() < 0


def test_nan_splits_to_canonical_nan_with_zero_remainder():
    payloads = torch.tensor([0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0xFFC00000, 0xFF812345], dtype=torch.int64)
    x = bits_to_fp32(payloads)
    hi, rem = split_fp32(x)
    assert bool(torch.isnan(hi.float()).all()) and rem.tolist() == [0] * 5
    back = join_fp32(hi, rem)
    assert bool(torch.isnan(back).all())
    assert (back.view(torch.int32) < 0).tolist() == [False, False, False, True, True]


def test_split_rejects_other_dtypes():
    with pytest.raises(TypeError, match="float32"):
        split_fp32(torch.zeros(3, dtype=torch.float64))


def test_split_of_noncontiguous_view_is_exact():
    x = torch.randn(64, 32).t()
    hi, rem = split_fp32(x)
    assert torch.equal(join_fp32(hi, rem).view(torch.int32), x.view(torch.int32))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=2**32 - 1), min_size=1, max_size=64))
def test_split_roundtrip_property(patterns):
    x = bits_to_fp32(torch.tensor(patterns, dtype=torch.int64))
    hi, rem = split_fp32(x)
    back = join_fp32(hi, rem)
    nan = torch.isnan(x)
    assert torch.equal(back.view(torch.int32)[~nan], x.view(torch.int32)[~nan])
    assert bool(torch.isnan(back[nan]).all())
    assert same_bits(hi[~nan], round_half_away_bf16(x[~nan]))
    # |x - hi| is at most half a bf16 ULP: the remainder fits in [-2**15, 2**15).
    assert int(rem.min()) >= -(2**15) and int(rem.max()) < 2**15


@settings(max_examples=200, deadline=None)
@given(st.floats(width=32, allow_nan=False))
def test_split_roundtrip_property_on_floats(value):
    x = torch.tensor([value], dtype=torch.float32)
    hi, rem = split_fp32(x)
    assert torch.equal(join_fp32(hi, rem).view(torch.int32), x.view(torch.int32))
    nearest = round_half_away_bf16(x).float()
    assert hi.float().item() == nearest.item() or (math.isnan(hi.float().item()) and math.isnan(nearest.item()))
