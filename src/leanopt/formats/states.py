"""State formats: how an optimizer state tensor (momentum, second moment, ...) is kept between steps.

A state named ``name`` is stored as one or more tensors in the parameter's optimizer state, under keys
``name`` or ``name + "." + part``. ``decode`` returns an fp32 working tensor the rule may change in
place, shaped like the parameter (``shape``: a format that keeps a state in another shape, as int8/int4
keep a conv weight's state as rows, returns it viewed as ``shape``); ``encode`` writes it back.
``signed`` tells whether the state can be negative (momentum) or is never negative (second moments);
compressed formats may use it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class StateFormat:
    name: str = ""

    def init(self, name: str, like: Tensor, signed: bool) -> dict[str, Tensor]:
        """Stored tensors for a zero-initialised state shaped like ``like``."""
        raise NotImplementedError

    def decode(self, name: str, stored: dict[str, Tensor], signed: bool, shape: tuple | None = None) -> Tensor:
        raise NotImplementedError

    def encode(self, name: str, value: Tensor, stored: dict[str, Tensor], signed: bool) -> None:
        raise NotImplementedError

    def keys(self, name: str) -> tuple[str, ...]:
        """The state-dict keys this format stores for state ``name``."""
        return (name,)

    def upgrade_saved(self, name: str, saved: dict[str, Any], like: Tensor, signed: bool) -> dict[str, Any]:
        """``saved`` (one parameter's saved state, not modified) with state ``name`` as this format
        stores it now, when an older leanopt stored it otherwise; else ``saved`` itself."""
        return saved


class Float32States(StateFormat):
    """fp32 states, updated in place: 4 bytes per element, the same as torch.optim."""

    name = "fp32"

    def init(self, name, like, signed):
        return {name: torch.zeros_like(like, dtype=torch.float32, memory_format=torch.preserve_format)}

    def decode(self, name, stored, signed, shape=None):
        return stored[name]

    def encode(self, name, value, stored, signed):
        if value.data_ptr() != stored[name].data_ptr():
            stored[name].copy_(value)


class BFloat16States(StateFormat):
    """bf16 states, rounded to nearest on each write: 2 bytes per element."""

    name = "bf16"

    def init(self, name, like, signed):
        return {name: torch.zeros_like(like, dtype=torch.bfloat16, memory_format=torch.preserve_format)}

    def decode(self, name, stored, signed, shape=None):
        return stored[name].float()

    def encode(self, name, value, stored, signed):
        stored[name].copy_(value)


STATE_FORMATS: dict[str, StateFormat] = {f.name: f for f in (Float32States(), BFloat16States())}


# Formats in their own modules register here (they import this module, so this comes last).
from .quantized import INT4, INT8  # noqa: E402

STATE_FORMATS.update({INT8.name: INT8, INT4.name: INT4})
