"""Lightning glue: ``LeanLightningModule``, a LightningModule that trains right with leanopt.

Without gradient release a leanopt optimizer needs nothing special: return it (and a scheduler) from
``configure_optimizers``; ``gradient_clip_val``, ``accumulate_grad_batches`` and checkpoints work as
with torch.optim. Subclassing ``LeanLightningModule`` instead of ``LightningModule`` adds:

- a check that Lightning's ``precision="bf16-true"``/``"16-true"`` (which casts every module) is not
  used on a model cast by ``leanopt.cast_model`` with fp32 modules (use the default "32-true": the
  model is already 16-bit where it should be);
- gradient release in automatic optimisation: turn it on in ``configure_optimizers`` with
  ``leanopt.release_gradients(opt, max_norm=...)``. Micro-batches before the last of an
  ``accumulate_grad_batches`` window run inside ``handle.accumulate()``, clipping is done by the handle
  (its ``max_norm`` must equal the Trainer's ``gradient_clip_val``; a mismatch raises), and the
  training closure runs before ``optimizer.step()`` so that deferred (exactly clipped) updates happen.

In manual optimisation (``automatic_optimization = False``) the module calls ``manual_backward`` itself;
with release use ``handle.accumulate()``/``handle.backward`` there as docs/release.md shows.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from .cast import kept_fp32_modules
from .common import release_handle, routed_backward

_CASTING_PRECISIONS = ("bf16-true", "16-true", "bf16", "16", "half")


class LeanLightningModule(pl.LightningModule):
    """A ``LightningModule`` that honours gradient release, clipping and accumulation with leanopt."""

    def _leanopt_handles(self) -> list[Any]:
        trainer = self._trainer
        if trainer is None:
            return []
        return [h for h in (release_handle(o) for o in trainer.optimizers) if h is not None]

    def on_fit_start(self) -> None:
        """Refuse Trainer settings that would be silently wrong with leanopt (ValueError names them)."""
        super().on_fit_start()
        trainer = self.trainer
        precision = str(trainer.precision)
        kept = kept_fp32_modules(self)
        if precision in _CASTING_PRECISIONS and kept:
            raise ValueError(
                f"Trainer(precision={precision!r}) casts every module to 16 bits, including the modules "
                f"leanopt.cast_model keeps in fp32 ({kept[:3]}...); use precision='32-true' (the default): "
                "the model is already 16-bit where it should be"
            )
        handles = self._leanopt_handles()
        if not handles:
            return
        if not self.automatic_optimization:
            return  # the module drives backward itself (see the module docstring)
        if precision in ("16-mixed", "16"):
            raise ValueError(
                "Trainer(precision='16-mixed') uses a GradScaler, which cannot drive gradient release; use "
                "'32-true' with a bf16 model (bf16 needs no loss scaling)"
            )
        clip_val = trainer.gradient_clip_val
        algorithm = getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm)
        for handle in handles:
            if clip_val is not None and clip_val > 0 and algorithm not in (None, "norm"):
                raise ValueError(
                    f"gradient_clip_algorithm={algorithm!r}: gradient release clips by norm only; use 'norm' or "
                    "per_param_max_norm in release_gradients"
                )
            want = float(clip_val) if clip_val else None
            have = None if handle.max_norm is None else float(handle.max_norm)
            if want != have:
                raise ValueError(
                    f"gradient release clips with max_norm={have} but Trainer(gradient_clip_val={clip_val}): "
                    "Lightning cannot clip released gradients; make them agree "
                    "(release_gradients(opt, max_norm=gradient_clip_val), or no clipping in both)"
                )
            if handle.accumulation == "states" and handle.micro_batches != trainer.accumulate_grad_batches:
                raise ValueError(
                    f"gradient release accumulates into states for micro_batches={handle.micro_batches} but "
                    f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}); make them agree"
                )
        if not hasattr(trainer.fit_loop, "_should_accumulate"):
            raise NotImplementedError(
                f"lightning {pl.__version__}: LeanLightningModule's release support needs fit_loop._should_accumulate"
            )

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        handles = self._leanopt_handles() if self.automatic_optimization else []
        if not handles:
            return super().backward(loss, *args, **kwargs)
        if len(handles) > 1:
            raise NotImplementedError("LeanLightningModule supports gradient release on one optimizer")
        handle = handles[0]
        last = not self.trainer.fit_loop._should_accumulate()
        parent = super().backward

        def run(value: Tensor, **kw: Any) -> None:
            parent(value, *args, **kw)

        routed_backward(run, loss, handle, last=last, **kwargs)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        if optimizer_closure is not None and release_handle(optimizer) is not None:
            # Backward (and the updates it releases) must finish before optimizer.step() closes the step.
            optimizer_closure()
            optimizer.step()
            return
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None
    ) -> None:
        if release_handle(optimizer) is not None:
            return  # the release handle clips (checked against gradient_clip_val in on_fit_start)
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
