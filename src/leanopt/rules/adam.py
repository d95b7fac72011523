"""Adam and AdamW (torch.optim.Adam's single-tensor arithmetic, op for op)."""

from __future__ import annotations

import torch

from .base import Rule, StateSpec, check_betas, check_number


class AdamRule(Rule):
    name = "adam"
    decoupled = False
    defaults = {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "amsgrad": False,
        "maximize": False,
    }

    _STATES = (StateSpec("exp_avg"), StateSpec("exp_avg_sq", signed=False))
    _AMSGRAD_STATES = (*_STATES, StateSpec("max_exp_avg_sq", signed=False))

    def states(self, group):
        return self._AMSGRAD_STATES if group["amsgrad"] else self._STATES

    def validate(self, group):
        super().validate(group)
        check_number("eps", group["eps"], minimum=0.0)
        check_betas(group["betas"])

    def update(self, param, grad, state, step, group):
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        if group["maximize"]:
            grad = -grad
        if wd != 0:
            if self.decoupled:
                param.mul_(1 - lr * wd)
            else:
                grad = grad.add(param, alpha=wd)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        if group["amsgrad"]:
            torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
            denom = (state["max_exp_avg_sq"].sqrt() / bias_correction2_sqrt).add_(eps)
        else:
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)


class AdamWRule(AdamRule):
    name = "adamw"
    decoupled = True
    defaults = {**AdamRule.defaults, "weight_decay": 1e-2}
