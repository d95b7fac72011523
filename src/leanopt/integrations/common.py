"""Helpers shared by the framework integrations (torch only): find a release handle, route a backward."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from ..optimizer import LeanOptimizer
from ..release import ReleaseHandle


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer`` (``.optimizer``)."""
    seen = 0
    while not isinstance(optimizer, LeanOptimizer) and hasattr(optimizer, "optimizer") and seen < 8:
        optimizer = optimizer.optimizer
        seen += 1
    return optimizer


def release_handle(optimizer: Any) -> ReleaseHandle | None:
    """The active gradient-release handle of a (possibly wrapped) leanopt optimizer, or None."""
    handle = getattr(unwrap_optimizer(optimizer), "_leanopt_release", None)
    return handle if isinstance(handle, ReleaseHandle) and handle.active else None


class _DeferredLoss:
    """Stands in for a loss in ``ReleaseHandle.backward``: its ``backward`` runs another backward
    function (e.g. ``accelerator.backward``, which scales the loss for accumulation)."""

    def __init__(self, backward: Callable[..., Any], loss: Tensor, kwargs: Mapping[str, Any]) -> None:
        self._backward, self._loss, self._kwargs = backward, loss, dict(kwargs)

    def backward(self, **kwargs: Any) -> None:
        self._backward(self._loss, **{**self._kwargs, **kwargs})


def routed_backward(
    backward: Callable[..., Any], loss: Tensor, handle: ReleaseHandle, last: bool, **kwargs: Any
) -> None:
    """Run ``backward(loss, **kwargs)`` under release: inside ``handle.accumulate()`` unless ``last``
    (the last micro-batch of a step), else through ``handle.backward`` (measuring pass if needed)."""
    if not last:
        with handle.accumulate():
            backward(loss, **kwargs)
    else:
        # handle.backward adds the measuring pass when clip="exact" needs one.
        handle.backward(_DeferredLoss(backward, loss, kwargs))  # type: ignore[arg-type]
