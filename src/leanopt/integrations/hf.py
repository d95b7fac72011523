"""Hugging Face glue: ``LeanTrainer`` (transformers.Trainer) and ``release_backward`` (Accelerate loops).

Without gradient release a leanopt optimizer is an ordinary ``torch.optim.Optimizer``: pass it to
``transformers.Trainer(optimizers=(opt, scheduler))`` or ``optimizer_cls_and_kwargs=(leanopt.AdamW, {...})``,
or to ``accelerator.prepare``; checkpoints, resume, accumulation and clipping work as with torch.optim.

With gradient release (``leanopt.release_gradients``) the updates run inside backward and the gradients
are freed, so the Trainer's own clipping and accumulation would act on gradients that no longer exist.
``LeanTrainer`` routes them through the release handle instead (``max_grad_norm`` becomes the handle's
``max_norm``; micro-batches before the last run inside ``handle.accumulate()``) and refuses settings it
cannot honour (fp16 loss scaling, multi-process training) with a message saying what to change.
In an Accelerate loop, call ``release_backward(accelerator, loss, handle)`` instead of
``accelerator.backward(loss)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import transformers
from torch import Tensor

from ..optimizer import AdamW, LeanOptimizer
from ..release import ReleaseHandle, release_gradients
from .common import release_handle, routed_backward, unwrap_optimizer

#: release_gradients options LeanTrainer(release={...}) accepts; max_norm comes from args.max_grad_norm.
RELEASE_OPTIONS = ("clip", "norm_type", "per_param_max_norm", "accumulation", "micro_batches")


def release_backward(accelerator: Any, loss: Tensor, handle: ReleaseHandle | None = None, **kwargs: Any) -> None:
    """``accelerator.backward(loss)`` for an optimizer with gradient release.

    Inside ``accelerator.accumulate(model)``, micro-batches that do not sync gradients run in
    ``handle.accumulate()``; the last one updates (with the measuring pass that exact clipping needs).
    Clip with ``release_gradients(opt, max_norm=...)``, not ``accelerator.clip_grad_norm_`` (the
    gradients are gone by then). ``handle`` defaults to the release handle of the prepared optimizer.
    """
    if handle is None:
        handles = [h for h in (release_handle(o) for o in getattr(accelerator, "_optimizers", [])) if h is not None]
        if len(handles) != 1:
            raise ValueError(
                f"handle: pass the ReleaseHandle explicitly (found {len(handles)} optimizers with release "
                "among those accelerator.prepare() saw)"
            )
        handle = handles[0]
    if not isinstance(handle, ReleaseHandle):
        raise TypeError(f"handle must be a leanopt ReleaseHandle, got {type(handle).__name__}")
    routed_backward(accelerator.backward, loss, handle, last=bool(accelerator.sync_gradients), **kwargs)


def _has_trainer_hooks() -> bool:
    return all(hasattr(transformers.Trainer, name) for name in ("_clip_grad_norm", "_get_grad_norm", "training_step"))


class LeanTrainer(transformers.Trainer):
    """``transformers.Trainer`` with leanopt defaults and gradient-release support.

    - No optimizer given: builds ``leanopt.AdamW`` from the TrainingArguments (learning_rate,
      adam_beta1/2, adam_epsilon, weight_decay with the Trainer's no-decay groups for biases and norms)
      and the Trainer's own LR scheduler.
    - ``release=True`` (or a dict of release options: clip, norm_type, per_param_max_norm, accumulation,
      micro_batches): turns on gradient release for the optimizer. ``args.max_grad_norm`` (> 0) is
      clipped by the handle (clip="exact" by default: one extra backward per step for the norm; pass
      ``release={"clip": "previous"}`` for one pass, or set max_grad_norm=0 not to clip);
      ``args.gradient_accumulation_steps`` is honoured through ``handle.accumulate()``.
    - An optimizer that already has release on is used as it is, after checking that its handle
      matches the arguments (a mismatch raises ValueError; nothing is silently ignored).
    """

    def __init__(self, *args: Any, release: bool | Mapping[str, Any] = False, **kwargs: Any) -> None:
        if not isinstance(release, (bool, Mapping)):
            raise TypeError(f"release must be a bool or a dict of release options, got {type(release).__name__}")
        if isinstance(release, Mapping):
            unknown = sorted(set(release) - set(RELEASE_OPTIONS))
            if unknown:
                hint = " (clipping comes from TrainingArguments.max_grad_norm)" if "max_norm" in unknown else ""
                raise ValueError(f"release: unknown options {unknown}{hint}; accepted: {list(RELEASE_OPTIONS)}")
        self._release_options: dict[str, Any] | None = (
            dict(release) if isinstance(release, Mapping) else ({} if release else None)
        )
        optimizers = kwargs.get("optimizers", (None, None))
        if optimizers[0] is None and kwargs.get("optimizer_cls_and_kwargs") is None:
            kwargs["optimizer_cls_and_kwargs"] = (AdamW, {})  # filled from args in create_optimizer
        super().__init__(*args, **kwargs)
        if self.optimizer is not None:
            self._check_release(self.optimizer)

    # ----------------------------------------------------------------------------- set-up

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        if self.optimizer is None and self.optimizer_cls_and_kwargs is not None:
            cls, kw = self.optimizer_cls_and_kwargs
            if cls is AdamW and not kw:
                a = self.args
                kw = {"lr": a.learning_rate, "betas": (a.adam_beta1, a.adam_beta2), "eps": a.adam_epsilon}
                self.optimizer_cls_and_kwargs = (cls, kw)
        optimizer = super().create_optimizer(model)
        self._check_release(optimizer)
        return optimizer

    def _check_release(self, optimizer: Any) -> None:
        """Turn release on when asked; check an existing handle against the arguments."""
        inner = unwrap_optimizer(optimizer)
        handle = release_handle(optimizer)
        if handle is None and self._release_options is None:
            return
        if not isinstance(inner, LeanOptimizer):
            raise TypeError(f"release=True needs a leanopt optimizer, got {type(inner).__name__}")
        if not _has_trainer_hooks():
            raise NotImplementedError(
                f"transformers {transformers.__version__}: LeanTrainer's release support needs Trainer."
                "_clip_grad_norm/_get_grad_norm/training_step; use release=False with this version"
            )
        args = self.args
        if args.fp16:
            raise ValueError(
                "TrainingArguments(fp16=True) uses a GradScaler, which cannot drive gradient release (updates run "
                "before it could unscale or skip); train the bf16 model with fp16=False (bf16 needs no loss scaling)"
            )
        if args.world_size > 1:
            raise NotImplementedError(
                "LeanTrainer with gradient release runs in one process for now; use release=False with several "
                "processes, or write the loop with leanopt.release_gradients(opt, ddp=model)"
            )
        want_norm = float(args.max_grad_norm) if args.max_grad_norm and args.max_grad_norm > 0 else None
        if handle is None:
            opts = dict(self._release_options or {})
            if opts.get("accumulation") == "states" and "micro_batches" not in opts:
                opts["micro_batches"] = args.gradient_accumulation_steps
            handle = release_gradients(inner, max_norm=want_norm, **opts)
        have_norm = None if handle.max_norm is None else float(handle.max_norm)
        if have_norm != want_norm:
            raise ValueError(
                f"gradient release clips with max_norm={have_norm} but TrainingArguments.max_grad_norm="
                f"{args.max_grad_norm}: the Trainer cannot clip released gradients; make them agree "
                "(release_gradients(opt, max_norm=args.max_grad_norm), or max_grad_norm=0 for no clipping)"
            )
        if handle.accumulation == "states" and handle.micro_batches != args.gradient_accumulation_steps:
            raise ValueError(
                f"gradient release accumulates into states for micro_batches={handle.micro_batches} but "
                f"gradient_accumulation_steps={args.gradient_accumulation_steps}; make them agree"
            )
        self._leanopt_handle = handle

    @property
    def release_handle(self) -> ReleaseHandle | None:
        """The gradient-release handle in use, or None."""
        return release_handle(self.optimizer) if self.optimizer is not None else None

    # ----------------------------------------------------------------------------- the loop

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Tensor:
        handle = self.release_handle
        if handle is None:
            return super().training_step(model, inputs, num_items_in_batch)
        accelerator = self.accelerator
        original = accelerator.backward
        last = bool(accelerator.sync_gradients)

        def backward(loss: Tensor, **kwargs: Any) -> None:
            routed_backward(original, loss, handle, last=last, **kwargs)

        accelerator.backward = backward  # instance attribute: shadows the method for this step only
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            del accelerator.backward

    def _clip_grad_norm(self, model: Any) -> Any:
        if self.release_handle is not None:
            return None  # the release handle clipped (or clips in optimizer.step()) with max_grad_norm
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        if self.release_handle is not None:
            return None  # logged from handle.last_norm after the step (see log)
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        handle = self.release_handle
        if handle is not None and handle.last_norm is not None and "loss" in logs and "grad_norm" not in logs:
            logs["grad_norm"] = float(handle.last_norm)
        super().log(logs, *args, **kwargs)
