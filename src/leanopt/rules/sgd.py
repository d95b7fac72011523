"""SGD with momentum, dampening, Nesterov and L2 weight decay (torch.optim.SGD's arithmetic)."""

from __future__ import annotations

from .base import Rule, StateSpec, check_number


class SGDRule(Rule):
    name = "sgd"
    defaults = {
        "lr": 1e-3,
        "momentum": 0.0,
        "dampening": 0.0,
        "weight_decay": 0.0,
        "nesterov": False,
        "maximize": False,
    }

    _STATES = (StateSpec("momentum_buffer"),)

    def states(self, group):
        return self._STATES if group["momentum"] != 0 else ()

    def validate(self, group):
        super().validate(group)
        check_number("momentum", group["momentum"], minimum=0.0)
        check_number("dampening", group["dampening"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("nesterov=True requires momentum > 0 and dampening = 0")

    def update(self, param, grad, state, step, group):
        lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
        if group["maximize"]:
            grad = -grad
        if wd != 0:
            grad = grad.add(param, alpha=wd)
        if momentum != 0:
            buf = state["momentum_buffer"]
            if step == 1:
                buf.copy_(grad)
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
            grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
        param.add_(grad, alpha=-lr)
