"""8-bit and 4-bit optimizer states: companded codes in groups of 32 with one bf16 scale per group.

Layout of a state ``name`` for a tensor, seen as ``(*lead, n)`` (:func:`rows_shape`): its own shape when
its last dimension has at least ``MIN_ROW`` (32) elements; otherwise, for a tensor of 3 or more dimensions
(conv weights ``(out, in, kh, kw)``), ``(shape[0], prod(shape[1:]))``: each slice along dim 0 is one row.

- Groups are ``GROUP_SIZE`` (32) consecutive elements of one row; the last group
  of a row is padded (in the computation only) when ``n`` is not a multiple of 32. A group never
  straddles two rows (nor two slices of dim 0), so a dim-0 shard (FSDP2) quantises exactly like the
  same rows of the whole tensor.
- ``name.scales``: bf16, shape ``(*lead, ceil(n / 32))``: the group's largest magnitude (of the
  companded quantity), rounded to nearest bf16 (for a group holding a NaN: the canonical NaN
  0x7FC0). bf16 has fp32's exponent range, so tiny states
  (gradients of 1e-8 and below) keep their precision where fp16 scales go subnormal and then zero.
  Codes are taken relative to the stored scale, and the group's largest element always gets the
  largest code, so decode -> encode reproduces the same codes and scales bit for bit.
- ``name.codes``: ``int8`` (one code per byte, shape ``(*lead, n)``) or, for 4-bit states with even
  ``n``, ``uint8`` with two codes per byte (shape ``(*lead, n // 2)``, low nibble first). 4-bit states
  with odd ``n`` keep one 4-bit code per int8 byte.

Companding (``signed`` comes from the rule's ``StateSpec``):

- signed states (momentum): ``x = m * (1 / scale)`` (one reciprocal per group) in [-1, 1], ``y = 2x / (1 + |x|)``, code
  ``round(y * Q)`` with ``Q = 127`` (int8) or ``7`` (int4); decoded ``x = y / (2 - |y|)``.
- unsigned states (second moments): ``s = sqrt(v)``, ``x = s * (1 / scale)`` in [0, 1], code
  ``clamp(round(x * L) - 1, 0, L - 1)`` with ``L = 256`` or ``16``; decoded ``s = (code + 1) / L * scale``,
  ``v = s**2``. The map has no zero level (as in Li et al. 2023, 4-bit optimizers): a second moment
  far below its group's largest decodes slightly too large (a smaller, safe Adam step), never as 0,
  which would turn ``m / (sqrt(v) + eps)`` into ``m / eps``. A group that is all zero stays zero.

Small tensors: a tensor with fewer than 2 dimensions, or whose rows are shorter than ``MIN_ROW`` (32),
keeps its states in fp32 under the key ``name`` (biases and norms: under 0.01 bytes/param on GPT-2
124M). The choice depends on the tensor's shape after dim 0 only, so sharding dim 0 never changes it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .states import StateFormat

GROUP_SIZE = 32
MIN_ROW = 32


def rows_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, ...] | None:
    """``(*lead, n)``: the shape whose last dimension the groups of a state of this shape run along, or
    None when the state stays fp32. The tensor's own shape when its last dim has at least MIN_ROW
    elements; else, with 3 or more dims, ``(shape[0], prod(shape[1:]))`` (conv weights: each output
    channel's ``in * kh * kw`` weights are one row); else None (fewer than 2 dims, or short rows)."""
    if len(shape) < 2:
        return None
    if shape[-1] >= MIN_ROW:
        return tuple(shape)
    if len(shape) >= 3:
        n = 1
        for d in shape[1:]:
            n *= d
        if n >= MIN_ROW:
            return (shape[0], n)
    return None


def is_compressed(shape: torch.Size | tuple[int, ...]) -> bool:
    """Whether a state of this shape is quantised (else it stays fp32): see :func:`rows_shape`."""
    return rows_shape(shape) is not None


class QuantizedStates(StateFormat):
    """Companded ``bits``-bit states (8 or 4) in row-aligned groups of 32 with one scale each.

    ``scale_dtype`` (bf16 by default) and ``compand`` are exposed for measurements (the NMSE sweep
    with fp16 scales, the companding ablation); the registered formats use the defaults.
    ``compand=False`` is plain linear quantisation: ``round(x * Q)`` for signed states and
    ``round(v / scale * (L - 1))`` (no square root, with a zero level) for unsigned ones.
    """

    def __init__(self, name: str, bits: int, scale_dtype: torch.dtype = torch.bfloat16, compand: bool = True) -> None:
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits!r}")
        self.name = name
        self.bits = bits
        self.scale_dtype = scale_dtype
        self.compand = compand
        self.q_signed = (1 << (bits - 1)) - 1  # 127 or 7
        self.levels = 1 << bits  # 256 or 16

    # ------------------------------------------------------------------ layout

    def _packed(self, n: int) -> bool:
        return self.bits == 4 and n % 2 == 0

    def keys(self, name: str) -> tuple[str, ...]:
        """Keys of a compressed state (a state below the size threshold is stored under ``name``)."""
        return (f"{name}.codes", f"{name}.scales")

    def init(self, name: str, like: Tensor, signed: bool) -> dict[str, Tensor]:
        """Zero state. Works on meta tensors (shapes depend on ``like.shape`` only)."""
        rows = rows_shape(like.shape)
        if rows is None:
            return {name: torch.zeros_like(like, dtype=torch.float32, memory_format=torch.preserve_format)}
        *lead, n = rows
        groups = -(-n // GROUP_SIZE)
        width = n // 2 if self._packed(n) else n
        return {
            f"{name}.codes": torch.zeros(
                (*lead, width), dtype=torch.uint8 if self._packed(n) else torch.int8, device=like.device
            ),
            f"{name}.scales": torch.zeros((*lead, groups), dtype=self.scale_dtype, device=like.device),
        }

    # ------------------------------------------------------------------ codes <-> values

    def _grouped(self, value: Tensor) -> Tensor:
        """(rows, groups, GROUP_SIZE) fp32 view of ``value`` (rows of the last dim), zero padded."""
        n = value.shape[-1]
        flat = value.reshape(-1, n)
        pad = (-n) % GROUP_SIZE
        if pad:
            flat = F.pad(flat, (0, pad))
        return flat.view(flat.shape[0], (n + pad) // GROUP_SIZE, GROUP_SIZE)  # explicit: rows may be 0

    def quantize(self, value: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
        """fp32 ``value`` (*lead, n) -> (int32 codes (*lead, n), scales (*lead, groups))."""
        *lead, n = value.shape
        if signed:
            g = self._grouped(value)
            mag = g.abs()
        else:
            g = self._grouped(value.clamp_min(0))
            g = g.sqrt() if self.compand else g
            mag = g
        top = mag.amax(dim=-1, keepdim=True)
        scale = top.to(self.scale_dtype)
        # A group holding a NaN gets the one canonical quiet NaN scale (torch's amax returns NaNs with
        # whatever bits its vector code makes; checkpoints and the native kernels see the same bytes).
        scale = torch.where(torch.isnan(scale), torch.full_like(scale, float("nan")), scale)
        s32 = scale.float()
        # One reciprocal per group and a product per element (not a division per element): the same
        # codes up to the last bit of x, and the fused CPU kernel computes exactly this.
        x = g * (1 / torch.where(s32 > 0, s32, torch.ones_like(s32)))
        is_top = (mag == top) & (top > 0)
        if signed:
            x = torch.where(is_top, torch.sign(g), x.clamp(-1.0, 1.0))
            y = 2 * x / (1 + x.abs()) if self.compand else x
            codes = torch.round(y * self.q_signed)
        else:
            x = torch.where(is_top, torch.ones_like(x), x.clamp(0.0, 1.0))
            if self.compand:
                codes = (torch.round(x * self.levels) - 1).clamp_(0, self.levels - 1)
            else:
                codes = torch.round(x * (self.levels - 1))
        # a NaN element: code 0 (its group's scale is NaN, so it decodes to NaN); converting NaN to an
        # integer is left undefined by C and C++ (x86 gives INT_MIN, ARM and CUDA 0: the same low byte)
        codes = torch.nan_to_num(codes, nan=0.0).to(torch.int32)
        codes = codes.reshape(-1, g.shape[1] * GROUP_SIZE)[:, :n].reshape(*lead, n)
        return codes, scale.reshape(*lead, g.shape[1])

    def dequantize(self, codes: Tensor, scales: Tensor, signed: bool) -> Tensor:
        """int codes (*lead, n) and scales (*lead, groups) -> fp32 values (*lead, n)."""
        *lead, n = codes.shape
        c = self._grouped(codes.float())
        s = scales.float().reshape(c.shape[0], c.shape[1], 1)
        if signed:
            y = c / self.q_signed
            x = y / (2 - y.abs()) if self.compand else y
            out = x * s
        elif self.compand:
            out = ((c + 1) / self.levels * s).square()
        else:
            out = c / (self.levels - 1) * s
        return out.reshape(-1, c.shape[1] * GROUP_SIZE)[:, :n].reshape(*lead, n)

    # ------------------------------------------------------------------ storage of codes

    def _offset(self, signed: bool) -> int:
        """Stored byte = code - offset: codes are kept centred in a signed byte or a nibble."""
        return 0 if signed else self.levels // 2

    def _store_codes(self, codes: Tensor, stored: Tensor, signed: bool) -> None:
        if stored.dtype == torch.int8:
            stored.copy_(codes - self._offset(signed))
            return
        nib = codes + (self.levels // 2 if signed else 0)  # 0..15
        pairs = nib.reshape(*nib.shape[:-1], nib.shape[-1] // 2, 2)
        stored.copy_((pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8))

    def _load_codes(self, stored: Tensor, signed: bool) -> Tensor:
        if stored.dtype == torch.int8:
            return stored.to(torch.int32) + self._offset(signed)
        b = stored.to(torch.int32)
        nib = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(*b.shape[:-1], 2 * b.shape[-1])
        return nib - (self.levels // 2 if signed else 0)

    # ------------------------------------------------------------------ StateFormat

    def upgrade_saved(self, name: str, saved: dict[str, Any], like: Tensor, signed: bool) -> dict[str, Any]:
        """leanopt 0.1.0 grouped along the last dim only, so a conv weight kept state ``name`` in fp32:
        such a state is quantised (the same bits as one more encode). Anything else is left as saved."""
        value = saved.get(name)
        if rows_shape(like.shape) is None or f"{name}.codes" in saved or f"{name}.scales" in saved:
            return saved
        if not isinstance(value, Tensor) or value.dtype != torch.float32 or value.shape != like.shape:
            return saved
        stored = self.init(name, like, signed)
        self.encode(name, value.detach().to(like.device).clone(), stored, signed)
        out = {k: v for k, v in saved.items() if k != name}
        out.update(stored)
        return out

    def decode(self, name: str, stored: dict[str, Tensor], signed: bool, shape: tuple | None = None) -> Tensor:
        """fp32 values of state ``name``, shaped ``shape`` (the tensor's; default: the codes' rows shape)."""
        if name in stored:
            return stored[name]
        codes = self._load_codes(stored[f"{name}.codes"], signed)
        value = self.dequantize(codes, stored[f"{name}.scales"], signed)
        return value if shape is None or tuple(value.shape) == tuple(shape) else value.view(shape)

    def encode(self, name: str, value: Tensor, stored: dict[str, Tensor], signed: bool) -> None:
        if name in stored:
            if value.data_ptr() != stored[name].data_ptr():
                stored[name].copy_(value)
            return
        rows = rows_shape(value.shape)  # value as (*lead, n) rows: a conv weight's state as (out, in*kh*kw)
        if rows is not None and rows != tuple(value.shape):
            value = value.reshape(rows)
        codes, scales = self.quantize(value, signed)
        self._store_codes(codes, stored[f"{name}.codes"], signed)
        stored[f"{name}.scales"].copy_(scales)


INT8 = QuantizedStates("int8", 8)
INT4 = QuantizedStates("int4", 4)
