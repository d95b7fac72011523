"""Move training state between leanopt and plain torch.optim (Adam, AdamW, SGD).

``to_torch`` turns a model + leanopt optimizer into an fp32 model state dict and a torch.optim state
dict (fp32 ``exp_avg``/``exp_avg_sq``/``momentum_buffer``, whatever leanopt's state formats are), ready
for ``torch.optim.AdamW(fp32_model.parameters()).load_state_dict(...)``. ``from_torch`` goes the other
way: fp32 weights become master values (bf16 weight + extra bits) and fp32 states are encoded in the
optimizer's state format (fp32, bf16, int8, int4). Parameters are matched by position, as
``torch.optim`` itself does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import fp32_state_dict, load_fp32_state_dict
from .optimizer import LeanOptimizer

#: leanopt rule name -> (torch.optim class, value of torch's ``decoupled_weight_decay`` if it has one)
TORCH_EQUIVALENTS: dict[str, tuple[type[torch.optim.Optimizer], bool | None]] = {
    "adam": (torch.optim.Adam, False),
    "adamw": (torch.optim.AdamW, True),
    "sgd": (torch.optim.SGD, None),
}


def _equivalent(optimizer: Any) -> tuple[type[torch.optim.Optimizer], bool | None]:
    if not isinstance(optimizer, LeanOptimizer):
        raise TypeError(f"optimizer must be a leanopt optimizer, got {type(optimizer).__name__}")
    name = optimizer.rule.name
    if name not in TORCH_EQUIVALENTS:
        raise ValueError(
            f"{type(optimizer).__name__} has no torch.optim equivalent; conversion supports "
            f"{sorted(TORCH_EQUIVALENTS)} (leanopt.Adam, leanopt.AdamW, leanopt.SGD)"
        )
    return TORCH_EQUIVALENTS[name]


def _hyper_keys(optimizer: LeanOptimizer, group: dict[str, Any]) -> list[str]:
    """The rule's hyper-parameters plus keys users or schedulers added (e.g. ``initial_lr``)."""
    own = set(optimizer.defaults) | {"params"}
    return list(optimizer.rule.defaults) + [k for k in group if k not in own]


@torch.no_grad()
def to_torch(model: nn.Module, optimizer: LeanOptimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(fp32 model state dict, torch.optim state dict) holding the same training state.

    Weights are the full master values; states are decoded to fp32. Load them with
    ``fp32_model.load_state_dict(weights)`` and ``torch.optim.AdamW(fp32_model.parameters(), ...)
    .load_state_dict(optim_state)`` (Adam / SGD for leanopt.Adam / SGD). Nothing is modified.
    """
    torch_cls, _ = _equivalent(optimizer)
    weights = fp32_state_dict(model, optimizer)
    stand_ins: list[list[Tensor]] = []
    groups = []
    for group in optimizer.param_groups:
        params = [optimizer.master_value(p) for p in group["params"]]
        stand_ins.append(params)
        groups.append({"params": params, **{k: group[k] for k in _hyper_keys(optimizer, group)}})
    torch_opt = torch_cls(groups)
    for group, params in zip(optimizer.param_groups, stand_ins, strict=True):
        _, sfmt = optimizer.formats(group["params"][0], group) if group["params"] else (None, None)
        for p, stand_in in zip(group["params"], params, strict=True):
            state = optimizer.state.get(p)
            if not state:
                continue
            # torch.optim.SGD keeps no step count; it ignores (and keeps) this one.
            out: dict[str, Any] = {"step": state["step"].detach().to(torch.float32).clone()}
            for spec in optimizer.rule.states(group):
                out[spec.name] = sfmt.decode(spec.name, state, spec.signed, shape=p.shape).detach().float().clone()
            torch_opt.state[stand_in] = out
    return weights, torch_opt.state_dict()


def _check_torch_state(
    optimizer: LeanOptimizer, optim_state: Mapping[str, Any], decoupled: bool | None
) -> list[dict[str, Any]]:
    """Validate a torch.optim state dict against ``optimizer``; returns the merged groups."""
    if not isinstance(optim_state, Mapping) or "state" not in optim_state or "param_groups" not in optim_state:
        raise ValueError("optim_state must be a torch.optim state dict with 'state' and 'param_groups'")
    saved_groups = optim_state["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"optim_state has {len(saved_groups)} param groups, this optimizer has {len(optimizer.param_groups)}"
        )
    merged_groups = []
    known = set()
    for gi, (group, saved) in enumerate(zip(optimizer.param_groups, saved_groups, strict=True)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"param group {gi}: optim_state has {len(saved['params'])} params, this optimizer has "
                f"{len(group['params'])}"
            )
        if decoupled is not None and "decoupled_weight_decay" in saved and saved["decoupled_weight_decay"] != decoupled:
            want = "AdamW" if saved["decoupled_weight_decay"] else "Adam"
            raise ValueError(
                f"param group {gi}: optim_state comes from torch.optim.{want} (decoupled_weight_decay="
                f"{saved['decoupled_weight_decay']}); load it into leanopt.{want}"
            )
        merged = {**group, **{k: saved[k] for k in optimizer.rule.defaults if k in saved}}
        try:
            optimizer._check_group(merged)
        except ValueError as err:
            raise ValueError(f"param group {gi} in optim_state: {err}") from None
        merged_groups.append(merged)
        for pid, p in zip(saved["params"], group["params"], strict=True):
            known.add(pid)
            saved_state = optim_state["state"].get(pid)
            if not saved_state:
                continue
            for spec in optimizer.rule.states(merged):
                value = saved_state.get(spec.name)
                if not isinstance(value, Tensor):
                    raise ValueError(
                        f"parameter {pid}: optim_state has no tensor {spec.name!r} (holds {sorted(saved_state)})"
                    )
                if tuple(value.shape) != tuple(p.shape) or not value.is_floating_point():
                    raise ValueError(
                        f"parameter {pid}: state {spec.name!r} is {value.dtype} of shape {tuple(value.shape)}, "
                        f"expected a floating-point tensor of shape {tuple(p.shape)}"
                    )
    unknown = sorted(set(optim_state["state"]) - known, key=str)
    if unknown:
        raise ValueError(f"optim_state has state for parameters {unknown}, which no param group lists")
    return merged_groups


@torch.no_grad()
def from_torch(
    model: nn.Module,
    optimizer: LeanOptimizer,
    weights: Mapping[str, Tensor],
    optim_state: Mapping[str, Any],
    strict: bool = True,
) -> None:
    """Load fp32 weights and a torch.optim (Adam/AdamW/SGD) state dict into a model + leanopt optimizer.

    Master values are set from ``weights`` (see ``load_fp32_state_dict``); each fp32 state is encoded
    in the optimizer's state format; hyper-parameters (lr, betas, ...) are taken from ``optim_state``.
    Parameters without state in ``optim_state`` start fresh (zero states, step 0). Everything is
    checked first: on error a ValueError/KeyError names the problem and nothing is changed.
    """
    _, decoupled = _equivalent(optimizer)
    merged_groups = _check_torch_state(optimizer, optim_state, decoupled)
    load_fp32_state_dict(model, optimizer, weights, strict=strict)  # checks, then sets master values
    for group, merged, saved in zip(optimizer.param_groups, merged_groups, optim_state["param_groups"], strict=True):
        for key in optimizer.rule.defaults:
            group[key] = merged[key]
        for pid, p in zip(saved["params"], group["params"], strict=True):
            saved_state = optim_state["state"].get(pid) or {}
            _, sfmt = optimizer.formats(p, group)
            state = optimizer.state[p] or optimizer._init_state(p, group)
            for key in [k for k in state if k != "step" and k not in optimizer.formats(p, group)[0].buffers]:
                del state[key]  # drop old states (their layout may differ); rebuilt below
            if "step" in saved_state:
                step = float(saved_state["step"])
            else:  # torch.optim.SGD keeps no step: a momentum buffer means "not the first step"
                step = 1.0 if saved_state else 0.0
            state["step"] = torch.tensor(step, dtype=torch.float32)
            for spec in optimizer.rule.states(group):
                state.update(sfmt.init(spec.name, p.detach(), spec.signed))
                if spec.name in saved_state:
                    value = saved_state[spec.name].to(device=p.device, dtype=torch.float32)
                    sfmt.encode(spec.name, value.clone(), state, spec.signed)
