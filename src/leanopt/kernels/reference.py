"""The eager reference executor: decode -> rule -> encode, one tensor at a time.

Readable and exact; the ground truth that faster executors are tested against.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..formats.states import StateFormat
from ..formats.weights import RandomBits, WeightFormat
from ..rules.base import Rule


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
    g32 = grad if grad.dtype == torch.float32 else grad.float()
    master = weight_format.decode(param, state)
    states32 = {s.name: state_format.decode(s.name, state, s.signed) for s in specs}
    state["step"] += 1
    rule.update(master, g32, states32, float(state["step"]), group)
    for s in specs:
        state_format.encode(s.name, states32[s.name], state, s.signed)
    weight_format.encode(master, param, state, random_bits)

