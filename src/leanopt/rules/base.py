"""The contract every update rule follows.

A rule is the maths of one optimizer for one tensor, on fp32 values only: it receives the fp32 master
value ``param``, the fp32 gradient ``grad`` (read only), its fp32 states by name, the step number
(1 on the first update) and the param group (hyper-parameters by torch.optim's names). It updates
``param`` and the states in place; they are working copies owned by the caller. A rule knows nothing
of storage formats, dtypes, hooks, distributed training or checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor


@dataclass(frozen=True)
class StateSpec:
    """One state tensor of a rule. ``signed=False`` promises the state is never negative."""

    name: str
    signed: bool = True


class Rule:
    name: str = ""
    #: hyper-parameters with their defaults, in the order of the public optimizer's signature
    defaults: dict[str, Any] = {}

    def states(self, group: dict[str, Any]) -> tuple[StateSpec, ...]:
        return ()

    def validate(self, group: dict[str, Any]) -> None:
        """Raise ValueError naming the hyper-parameter that is out of range."""
        check_number("lr", group["lr"], minimum=0.0)
        if "weight_decay" in group:
            check_number("weight_decay", group["weight_decay"], minimum=0.0)

    def update(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], step: float, group: dict[str, Any]) -> None:
        raise NotImplementedError


def check_number(name: str, value: Any, minimum: float | None = None, below: float | None = None) -> None:
    """Check a scalar hyper-parameter: a finite real number >= minimum and < below."""
    if isinstance(value, Tensor):
        raise ValueError(f"{name} must be a Python number, got a Tensor; pass float({name}) instead")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"Invalid {name}: {value!r}; it must be >= {minimum}")
    if below is not None and value >= below:
        raise ValueError(f"Invalid {name}: {value!r}; it must be < {below}")


def check_betas(betas: Any, count: int = 2) -> None:
    """Betas: a tuple of ``count`` numbers, each in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != count:
        raise ValueError(f"betas must be a tuple of {count} numbers in [0, 1), got {betas!r}")
    for i, beta in enumerate(betas):
        check_number(f"betas[{i}]", beta, minimum=0.0, below=1.0)
