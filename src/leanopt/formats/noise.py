"""Stochastic rounding's random bits: a counter-based hash, computed where they are used.

The 16 random bits of the element at row-major (logical) index ``i`` of a whole, unsharded tensor, in
one update keyed by ``key = (k0, k1)`` (from the optimizer's seed, the parameter's index and its step
count: :func:`key`), are::

    h = mix32(mix32((i mod 2**32) ^ k0) ^ (i >> 32) ^ k1)        bits = h >> 16

with ``mix32`` Chris Wellons' "lowbias32" integer hash (xor-shift, multiply, xor-shift, multiply,
xor-shift; all arithmetic mod 2**32). Nothing is drawn or stored: the native and CUDA kernels compute
each element's bits in registers (``lo_noise`` in kernels/native.py), the eager reference and the
compiled path compute the same bits with torch integer ops (:func:`bits`), and a shard of a tensor
(FSDP2) computes only its own rows' bits from their global index, so every executor and every mesh
rounds alike, bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
MASK64 = (1 << 64) - 1
M1, M2 = 0x7FEB352D, 0x846CA68B  # lowbias32's multipliers

#: the same in C (scalar; native and CUDA kernels): ``lo_noise(key, i)``, ``key = k0 | k1 << 32``
C_SOURCE = r"""
LO_FN uint32_t lo_mix32(uint32_t x) {
  x ^= x >> 16; x *= 0x7FEB352Du; x ^= x >> 15; x *= 0x846CA68Bu; x ^= x >> 16; return x; }
/* stochastic rounding's 16 random bits of element i (formats/noise.py) */
LO_FN int32_t lo_noise(uint64_t key, uint64_t i) {
  return (int32_t)(lo_mix32(lo_mix32((uint32_t)i ^ (uint32_t)key) ^ (uint32_t)(i >> 32) ^ (uint32_t)(key >> 32))
                   >> 16); }
"""


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def key(seed: int, index: int, step: int) -> int:
    """The 64-bit key ``k0 | k1 << 32`` of one update: the optimizer's ``seed``, the parameter's
    ``index`` in the optimizer and its step count after the update (so each update rounds anew)."""
    return _splitmix64(_splitmix64(_splitmix64(seed & MASK64) ^ (index & MASK64)) ^ (step & MASK64))


def _mul32(x: Tensor, m: int) -> Tensor:
    """(x * m) mod 2**32 for int64 ``x`` in [0, 2**32), without overflowing int64: the low 16 bits of
    x times m, plus the high 16 bits times m's low 16 bits, shifted (the rest is a multiple of 2**32)."""
    return ((x & 0xFFFF) * m + (((x >> 16) * (m & 0xFFFF)) << 16)) & MASK32


def _mix32(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, M1)
    x = x ^ (x >> 15)
    x = _mul32(x, M2)
    return x ^ (x >> 16)


def _hash(i: Tensor, k0: int | Tensor, k1: int | Tensor) -> Tensor:
    """The bits of int64 indices ``i`` under the key halves ``k0``, ``k1`` (ints or int64 tensors)."""
    h = _mix32((i & MASK32) ^ k0)
    return (_mix32(h ^ (i >> 32) ^ k1) >> 16).to(torch.int32)


#: elements per block of :func:`bits`: its int64 temporaries stay a few tens of MiB whatever the tensor
CHUNK = 1 << 22


def bits(k: int, base: int, shape: tuple | torch.Size, device: torch.device | str = "cpu") -> Tensor:
    """int32 random bits in [0, 65536) shaped ``shape``: element ``j`` (row-major) is the element at
    global index ``base + j`` of the update keyed ``k``. Computed in blocks of :data:`CHUNK` elements,
    so the only tensor of the full size is the int32 result."""
    numel = 1
    for s in shape:
        numel *= s
    out = torch.empty(numel, dtype=torch.int32, device=device)
    for start in range(0, numel, CHUNK):
        end = min(numel, start + CHUNK)
        i = torch.arange(base + start, base + end, dtype=torch.int64, device=device)
        out[start:end] = _hash(i, k & MASK32, k >> 32)
    return out.reshape(shape)


def key_tensor(k: int, base: int, device: torch.device) -> Tensor:
    """(k0, k1, base) as an int64 tensor on ``device``: what :func:`bits_from` reads (the compiled path
    takes it as an input, so a new key each step compiles nothing)."""
    host = torch.tensor([k & MASK32, k >> 32, base], dtype=torch.int64)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)


def bits_from(keys: Tensor, shape: tuple | torch.Size) -> Tensor:
    """:func:`bits` with the key and base in the tensor ``keys`` (:func:`key_tensor`), in one expression
    that ``torch.compile`` fuses into the kernel using the bits: no tensor of them is made there."""
    numel = 1
    for s in shape:
        numel *= s
    i = torch.arange(numel, dtype=torch.int64, device=keys.device) + keys[2]
    return _hash(i, keys[0], keys[1]).reshape(shape)


class UpdateNoise:
    """The ``random_bits`` of one parameter's update (formats/weights.py ``RandomBits``): called on a
    tensor shaped like the parameter, or like this rank's rows of a sharded one, it gives that tensor's
    bits; the kernels ask for :meth:`key_at` and :meth:`base` instead and compute the bits themselves.
    The key is read when asked (the step count has advanced by then)."""

    __slots__ = ("seed", "index", "state", "param")

    def __init__(self, seed: int, index: int, state: dict, param: Tensor) -> None:
        self.seed, self.index, self.state, self.param = seed, index, state, param

    def key_at(self, step: float) -> int:
        """The key of the update that brings the step count to ``step``."""
        return key(self.seed, self.index, int(step))

    def base(self, like: Tensor) -> int:
        """The global index of ``like``'s first element: 0, or the first of this rank's rows."""
        from ..distributed import row_base

        return row_base(self.param, like)

    def __call__(self, like: Tensor) -> Tensor:
        return bits(self.key_at(float(self.state["step"])), self.base(like), like.shape, like.device)
