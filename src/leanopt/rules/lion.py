"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), decoupled weight decay."""

from __future__ import annotations

from .base import Rule, StateSpec, check_betas


class LionRule(Rule):
    name = "lion"
    defaults = {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0, "maximize": False}

    _STATES = (StateSpec("exp_avg"),)

    def states(self, group):
        return self._STATES

    def validate(self, group):
        super().validate(group)
        check_betas(group["betas"])

    def update(self, param, grad, state, step, group):
        lr, wd = group["lr"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        if group["maximize"]:
            grad = -grad
        exp_avg = state["exp_avg"]
        direction = exp_avg.mul(beta1).add_(grad, alpha=1 - beta1).sign_()
        if wd != 0:
            param.mul_(1 - lr * wd)
        param.add_(direction, alpha=-lr)
        exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)
