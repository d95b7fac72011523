"""Weights in and out: fp32 state dicts rebuilt from (or written into) split 16-bit weights."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .optimizer import LeanOptimizer


def _param_names(model: nn.Module) -> dict[str, Tensor]:
    return dict(model.named_parameters(remove_duplicate=False))


def _managed(optimizer: LeanOptimizer) -> set[int]:
    return {id(p) for g in optimizer.param_groups for p in g["params"]}


@torch.no_grad()
def fp32_state_dict(model: nn.Module, optimizer: LeanOptimizer) -> dict[str, Tensor]:
    """``model.state_dict()`` with every floating-point entry in fp32; the parameters the optimizer
    manages carry their full master value (bf16 weight + remainder), not just the 16-bit weight."""
    if not isinstance(optimizer, LeanOptimizer):
        raise TypeError(f"optimizer must be a leanopt optimizer, got {type(optimizer).__name__}")
    names = _param_names(model)
    managed = _managed(optimizer)
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        param = names.get(key)
        if param is not None and id(param) in managed:
            out[key] = optimizer.master_value(param)
        elif value.is_floating_point():
            out[key] = value.float().clone()
        else:
            out[key] = value.clone()
    return out


@torch.no_grad()
def load_fp32_state_dict(
    model: nn.Module, optimizer: LeanOptimizer, state_dict: Mapping[str, Tensor], strict: bool = True
) -> None:
    """Load fp32 (or any float) weights into a 16-bit model and its leanopt optimizer.

    Each managed parameter's master value is set from the given weights, so the 16-bit weight is the
    nearest 16-bit value and the optimizer's extra bits hold the rest: nothing is lost even before the
    first step. Other parameters and buffers are copied (cast to their dtype). With ``strict``, missing
    or unexpected keys raise; shape mismatches always raise. Nothing is changed when an error is raised.
    """
    if not isinstance(optimizer, LeanOptimizer):
        raise TypeError(f"optimizer must be a leanopt optimizer, got {type(optimizer).__name__}")
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if strict and (missing or unexpected):
        raise KeyError(f"state_dict does not match the model: missing keys {missing}, unexpected keys {unexpected}")
    for key, value in state_dict.items():
        if key in own and tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"{key}: shape {tuple(value.shape)} in state_dict, {tuple(own[key].shape)} in the model")
    names = _param_names(model)
    managed = _managed(optimizer)
    first_key: dict[int, str] = {}  # a tied parameter (several names) must get one value
    for key, value in state_dict.items():
        param = names.get(key)
        if param is None or id(param) not in managed:
            continue
        other = first_key.setdefault(id(param), key)
        if other != key and not torch.equal(
            value.float().view(torch.int32), state_dict[other].float().view(torch.int32)
        ):
            raise ValueError(f"{key} and {other} are one tied parameter but get different values in state_dict")
    for key, value in state_dict.items():
        if key not in own:
            continue
        param = names.get(key)
        if param is not None and id(param) in managed:
            optimizer.set_master_value(param, value.float())
        else:
            own[key].copy_(value)
