"""The eager reference executor: decode -> rule -> encode, one tensor at a time.

Readable and exact; the ground truth that faster executors are tested against.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ..formats import noise as _noise
from ..formats.states import StateFormat
from ..formats.weights import RandomBits, WeightFormat
from ..rules.base import Rule

#: Tensors larger than this many elements are updated a block of rows at a time, so the fp32 working
#: copies (decoded weight, gradient, states, the rule's temporaries) never exceed a few MiB whatever the
#: tensor's size. The rules are elementwise and formats keep whole rows, so the result is bit-identical.
CHUNK_ELEMENTS = 1 << 20


def reference_step(
    rule: Rule,
    weight_format: WeightFormat,
    state_format: StateFormat,
    param: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    group: dict[str, Any],
    random_bits: RandomBits | None = None,
) -> None:
    """One update of ``param`` from ``grad`` (any float dtype). ``state['step']`` is advanced."""
    specs = rule.states(group)
    state["step"] += 1
    step = float(state["step"])
    # stochastic rounding's bits (formats/noise.py) follow each element's index: a block of rows takes
    # its own, so the blocks round as the whole tensor would; other random_bits callables see it whole
    shiftable = random_bits is not None and hasattr(random_bits, "key_at")
    for p, g, st, first in _row_blocks(param, grad, state, random_bits is not None and not shiftable):
        bits = _Shifted(random_bits, step, param, first) if shiftable else random_bits
        g32 = g if g.dtype == torch.float32 else g.float()
        master = weight_format.decode(p, st)
        states32 = {s.name: state_format.decode(s.name, st, s.signed, shape=p.shape) for s in specs}
        rule.update(master, g32, states32, step, group)
        for s in specs:
            state_format.encode(s.name, states32[s.name], st, s.signed)
        weight_format.encode(master, p, st, bits)


class _Shifted:
    """Stochastic rounding's bits for a block of rows that starts ``first`` elements into ``param``."""

    def __init__(self, noise: Any, step: float, param: Tensor, first: int) -> None:
        self.key, self.base = noise.key_at(step), noise.base(param) + first

    def __call__(self, like: Tensor) -> Tensor:
        return _noise.bits(self.key, self.base, like.shape, like.device)


def _row_blocks(
    param: Tensor, grad: Tensor, state: dict[str, Any], whole: bool
) -> Iterator[tuple[Tensor, Tensor, dict[str, Any], int]]:
    """(param, grad, state, index of the block's first element) over blocks of rows (dim 0) of at most
    about CHUNK_ELEMENTS elements.

    Yields the whole tensor when it is small, 0-d, when ``whole`` (random bits that cannot be taken
    for a block), or when some state tensor does not follow the parameter's rows.
    """
    tensors = {k: v for k, v in state.items() if k != "step" and isinstance(v, Tensor)}
    rows = param.shape[0] if param.dim() else 0
    if (
        whole
        or param.numel() <= CHUNK_ELEMENTS
        or rows < 2
        or any(v.dim() == 0 or v.shape[0] != rows for v in tensors.values())
    ):
        yield param, grad, state, 0
        return
    step_rows = max(1, CHUNK_ELEMENTS // (param.numel() // rows))
    for start in range(0, rows, step_rows):
        block = slice(start, start + step_rows)
        yield param[block], grad[block], {k: v[block] for k, v in tensors.items()}, start * (param.numel() // rows)
