"""Gradient release: each parameter's update runs inside backward, as soon as its gradient is complete.

``handle = release_gradients(optimizer)`` registers a post-accumulate-grad hook on every parameter the
optimizer manages. The hook updates that parameter (``LeanOptimizer.update_param``: decode -> rule ->
encode) and frees its ``.grad`` at once, so a full set of gradients never exists. The training loop keeps
its shape: ``loss.backward(); optimizer.step(); optimizer.zero_grad()``. ``optimizer.step()`` closes the
step (bookkeeping, deferred work); ``zero_grad()`` is harmless; ``handle.remove()`` restores normal
behaviour. Updates are bit-identical to the same optimizer without release (see docs/release.md).

Built on top of the optimizer: this module knows the optimizer's public building blocks, never the other
way round. Under DDP, pass ``ddp=model``: updates then run in a DDP communication hook after each
bucket's all-reduce, from the averaged gradient.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from .kernels import step_plan as _step_plan
from .optimizer import LeanOptimizer, refuse_graph_capture
from .rules import AdamRule, LionRule, SGDRule

CLIP_MODES = ("exact", "previous")
#: Per-parameter plans: after a hook's update ran in a native CPU kernel, the next backward's hook for
#: that parameter repeats it with one native call and a few checks (kernels/step_plan.py ``run_param``)
#: instead of the general path; the same bits. ``LEANOPT_RELEASE_PLANS=0`` (or False here) turns them off.
PLANS = os.environ.get("LEANOPT_RELEASE_PLANS", "1") != "0"
ACCUMULATION_MODES = ("grad", "states")


# --------------------------------------------------------------------------------------- clipping maths
# The same arithmetic as torch.nn.utils.clip_grad_norm_ (get_total_norm + clip_grads_with_norm_), applied
# one tensor at a time, so that release with clipping is bit-identical to clip_grad_norm_ + step().


def _foreach_device(device: torch.device) -> bool:
    from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices

    return device.type in _get_foreach_kernels_supported_devices()


def tensor_norm(grad: Tensor, norm_type: float) -> Tensor:
    """The norm of one gradient, computed as torch.nn.utils.get_total_norm computes per-tensor norms."""
    if _foreach_device(grad.device):
        return torch._foreach_norm([grad], norm_type)[0]
    return torch.linalg.vector_norm(grad, norm_type)


def total_norm(norms: list[Tensor], norm_type: float) -> Tensor:
    """Combine per-tensor norms, given in parameter order, into the global norm as get_total_norm does.

    torch groups the gradients by (device, dtype) with its own grouping function and concatenates the
    groups' norms in that function's order, not the parameter order (torch 2.13 on CPU: the reverse of
    first appearance, so a bf16 model with fp32 LayerNorms gets its fp32 group first). The same function
    is applied here to the norms (each has its gradient's device and dtype), so the sum runs in the same
    order and gives the same bits.
    """
    if not norms:
        return torch.tensor(0.0)
    from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

    first = norms[0].device  # get_total_norm moves every norm to the first gradient's device
    grouped = _group_tensors_by_device_and_dtype([list(norms)], with_indices=True)
    ordered = [norms[i] for _, (_, indices) in grouped.items() for i in indices]
    return torch.linalg.vector_norm(torch.stack([n.to(first) for n in ordered]), norm_type)


def clip_(grad: Tensor, max_norm: float, norm: Tensor) -> None:
    """Scale ``grad`` in place by min(1, max_norm / (norm + 1e-6)), as clip_grads_with_norm_ does."""
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    grad.mul_(coef.to(grad.device))


def _is_dtensor(t: Tensor) -> bool:
    module = sys.modules.get("torch.distributed.tensor")
    cls = getattr(module, "DTensor", None)
    return cls is not None and isinstance(t, cls)


# --------------------------------------------------------------------------- accumulation into states
# Approximate accumulation (accumulation="states"): micro-batch gradients are folded into the optimizer
# states as they arrive, and the weights are updated once, on the last micro-batch, by the unchanged rule.
# A fold prepares the states so that the rule's own state update on the last micro-batch gradient gives
# (in real arithmetic) the state it would compute from the accumulated gradient G = sum of g_i:
#   first moments m <- b*m + (1-b)*G: exact in real arithmetic (the slot holds m + (1-b)/b * partial sum);
#   Adam's second moment needs G**2, which no fold can know: it is estimated by k * sum g_i**2
#   (exact when the micro-batch gradients agree, never smaller than G**2 by Cauchy-Schwarz);
#   Lion's update direction uses the last micro-batch only for its gradient term (its state is right).
# Each fold gets fp32 working states (name -> tensor), the micro-batch gradient (fp32, sign already
# flipped for maximize), the live group, k, whether this is the last micro-batch and the step count so far.
# It may return a gradient to hand to the rule instead of the last micro-batch's own.

Fold = Callable[[dict[str, Tensor], Tensor, dict[str, Any], int, bool, int], Tensor | None]


def _beta_ratio(beta: float, what: str) -> float:
    if beta <= 0:
        raise ValueError(f"accumulation='states' needs {what} > 0 (got {beta}); use accumulation='grad'")
    return (1 - beta) / beta


def _fold_adam(states, g, group, k, last, steps):
    c1 = _beta_ratio(group["betas"][0], "betas[0]")
    c2 = _beta_ratio(group["betas"][1], "betas[1]")
    if not last:
        states["exp_avg"].add_(g, alpha=c1)
        states["exp_avg_sq"].addcmul_(g, g, value=c2 * k)
    elif k > 1:
        states["exp_avg_sq"].addcmul_(g, g, value=c2 * (k - 1))
    return None


def _fold_lion(states, g, group, k, last, steps):
    if not last:
        states["exp_avg"].add_(g, alpha=_beta_ratio(group["betas"][1], "betas[1]"))
    return None


def _fold_sgd(states, g, group, k, last, steps):
    if group["momentum"] == 0:
        raise ValueError(
            "accumulation='states' needs a state to accumulate into; SGD without momentum has none: "
            "use accumulation='grad'"
        )
    buf = states["momentum_buffer"]
    if steps == 0:  # the rule copies the first gradient into the buffer: hand it the whole sum
        if not last:
            buf.add_(g)
            return None
        return buf + g
    if not last:
        buf.add_(g, alpha=(1 - group["dampening"]) / group["momentum"])
    return None


#: Rules that support accumulation="states" (subclasses included, e.g. AdamW).
STATE_FOLDS: dict[type, Fold] = {AdamRule: _fold_adam, LionRule: _fold_lion, SGDRule: _fold_sgd}


def _fold_for(optimizer: LeanOptimizer) -> Fold:
    for rule_type, fold in STATE_FOLDS.items():
        if isinstance(optimizer.rule, rule_type):
            return fold
    raise ValueError(
        f"accumulation='states' is not available for {type(optimizer).__name__}; "
        f"it supports {sorted(t.__name__ for t in STATE_FOLDS)}; use accumulation='grad'"
    )


# --------------------------------------------------------------------------------------------- handle


class ReleaseHandle:
    """Gradient release on one optimizer. Made by :func:`release_gradients`; see its docstring."""

    _eager = False  # _leave_to_eager has run

    def __init__(
        self,
        optimizer: LeanOptimizer,
        *,
        ddp: torch.nn.Module | None,
        max_norm: float | None,
        clip: str,
        norm_type: float,
        per_param_max_norm: float | None,
        accumulation: str,
        micro_batches: int | None,
    ) -> None:
        _leave_to_eager()
        self.optimizer = optimizer
        self.ddp = ddp
        self.max_norm = max_norm
        self.clip = clip
        self.norm_type = float(norm_type)
        self.per_param_max_norm = per_param_max_norm
        self.accumulation = accumulation
        self.micro_batches = micro_batches
        self._fold = _fold_for(optimizer) if accumulation == "states" else None
        #: global gradient norm of the last completed step (before clipping), a 0-dim tensor, or None
        self.last_norm: Tensor | None = None
        self._known_norm: Tensor | None = None  # norm used by clip="previous"
        self._exact_norm: Tensor | None = None  # norm measured by this step's measuring pass
        self._phase = "update"  # "update" | "accumulate" | "measure"
        self._micro = 0  # accumulating backwards in this step
        self._open = False  # a step's updates have begun and step() has not closed it yet
        self._deferred = False  # this step's updates wait for optimizer.step() (exact clip with accumulation)
        self._norms: dict[int, Tensor] = {}
        self._updated: set[int] = set()
        self._skipped: list[int] = []
        self._lock = threading.RLock()  # DDP callbacks may run on several gloo/NCCL threads
        self._active = True
        self._param_hooks: list[Any] = []
        self._hooked: set[int] = set()
        self._groups: dict[int, int] = {}
        self._poisoned: set[int] = set()
        #: the hooks repeat native updates by per-parameter plans (default: module-level PLANS)
        self.plans = PLANS
        self._plans: dict[int, Any] = {}  # param index -> step_plan.ParamPlan
        self._plan_cache: dict[Any, Any] = {}  # what every hook of one backward shares (run_param)
        self._sync_hooks()
        # kernel="fused" on CUDA: each hook's NaN/inf check runs on the device, its verdict is read at
        # optimizer.step() (_complete_step), so backward never waits for the GPU per tensor
        optimizer._defer_verdicts = True
        self._step_hooks = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]
        # GradScaler calls step(grad_scaler=...) / sets optimizer.grad_scale when this is set: we refuse.
        optimizer._step_supports_amp_scaling = True
        if ddp is not None:

            def comm_hook(state, bucket):  # no annotations: DDP checks them against dist.GradBucket
                return self._ddp_comm_hook(state, bucket)

            ddp.register_comm_hook(None, comm_hook)

    # ----------------------------------------------------------------------------- bookkeeping

    @property
    def active(self) -> bool:
        """False after :meth:`remove`."""
        return self._active

    def _params(self) -> list[Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _sync_hooks(self) -> None:
        """Map params to their group index; hook params added since (add_param_group)."""
        self._groups = {}
        for gi, group in enumerate(self.optimizer.param_groups):
            for p in group["params"]:
                self._groups[id(p)] = gi
                if self.ddp is None and p.requires_grad and id(p) not in self._hooked:
                    self._param_hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))
                    self._hooked.add(id(p))

    def _group(self, p: Tensor) -> dict[str, Any]:
        """The live param group of ``p`` (schedulers, edits and load_state_dict take effect)."""
        return self.optimizer.param_groups[self._groups[id(p)]]

    def _begin_step(self) -> None:
        """First hook of a step's updating backward: checks that must pass before any tensor changes."""
        if self._open:
            return
        for gi, group in enumerate(self.optimizer.param_groups):
            try:
                self.optimizer._check_group(group)
            except ValueError as err:
                raise ValueError(f"param_groups[{gi}]: {err}") from None
        if self.accumulation == "states" and self.micro_batches != self._micro + 1:
            raise ValueError(
                f"accumulation='states' was set up for micro_batches={self.micro_batches}, but this step had "
                f"{self._micro + 1}; run the first micro_batches-1 backwards inside handle.accumulate()"
            )
        if self.max_norm is not None and self.clip == "exact" and self._exact_norm is None and not self._deferred:
            raise RuntimeError(
                "clip='exact' needs this step's gradient norm before any update: call handle.backward(loss), "
                "or run loss.backward(retain_graph=True) inside handle.measure_norm() and then loss.backward()"
            )
        self._open = True
        self._plan_cache = {}  # the groups were just checked; they may have changed since the last step
        self.optimizer.last_skipped = []
        self._skipped = []
        self._updated = set()

    # ----------------------------------------------------------------------------- the hooks

    def _on_grad(self, p: Tensor) -> None:
        """Post-accumulate-grad hook of parameter ``p`` (not used under DDP)."""
        if self._active:
            refuse_graph_capture("a gradient release hook")
        if self._active and p.grad is not None and self._dispatch(p, p.grad):
            p.grad = None

    def _dispatch(self, p: Tensor, grad: Tensor) -> bool:
        """Handle one complete gradient; True when it may be freed now."""
        if self._phase == "accumulate":
            if self.accumulation == "states":
                self._fold_micro_batch(p, grad, last=False)
                return True
            return False  # accumulation="grad": autograd sums the next micro-batch into .grad (exact)
        if self._phase == "measure":
            self._measure(p, grad)
            return True
        clipping = self.max_norm is not None
        if clipping and (
            (self.clip == "exact" and (self.ddp is not None or (self._micro and self.accumulation == "grad")))
            or (self._known_norm is None and self.clip == "previous")
        ):
            # Exact clipping without a measuring pass: under DDP (its buckets hold the gradients anyway,
            # and a second backward of one forward is not all-reduced), with an accumulated gradient (its
            # buffer exists anyway), or on the first step of clip="previous" (no norm known yet). The
            # gradient is kept; optimizer.step() clips it exactly and updates (see _before_step).
            with self._lock:
                self._deferred = True
                self._begin_step()
            self._measure(p, grad)
            return False
        with self._lock:
            self._begin_step()
        self._update(p, grad)
        return True

    def _ddp_comm_hook(self, state: Any, bucket: Any) -> torch.futures.Future:
        """DDP communication hook: the default all-reduce (same arithmetic), then the bucket's updates."""
        import torch.distributed as dist

        group = getattr(self.ddp, "process_group", None) or dist.group.WORLD
        buffer = bucket.buffer()
        buffer.mul_(1.0 / dist.get_world_size(group))  # as DDP's built-in reducer: grad * (1 / world size)
        fut = dist.all_reduce(buffer, group=group, async_op=True).get_future()
        params, grads = bucket.parameters(), bucket.gradients()

        def after_all_reduce(f: torch.futures.Future) -> Tensor:
            reduced = f.value()[0]
            if self._active:
                with torch.no_grad():
                    for p, g in zip(params, grads, strict=True):
                        if id(p) not in self._groups:
                            continue
                        with self._lock:  # one update at a time: shared RNG, counters
                            self._dispatch(p, g)  # DDP then writes .grad; step() drops updated ones
            return reduced

        return fut.then(after_all_reduce)

    @torch.no_grad()
    def _measure(self, p: Tensor, grad: Tensor) -> None:
        if grad.is_sparse:
            raise ValueError(f"parameter {self.optimizer.param_index(p)} has a sparse gradient; release needs dense")
        if self.per_param_max_norm is not None:
            grad = grad.clone()
            clip_(grad, self.per_param_max_norm, tensor_norm(grad, self.norm_type))
        self._norms[self.optimizer.param_index(p)] = tensor_norm(grad, self.norm_type)

    def _update(self, p: Tensor, grad: Tensor) -> None:
        if torch.is_grad_enabled():  # (backward(create_graph=True)); torch.no_grad() costs ~2.5 us per hook
            with torch.no_grad():
                return self._update(p, grad)
        opt = self.optimizer
        index = opt.param_index(p)
        if grad.is_sparse:
            raise ValueError(f"parameter {index} has a sparse gradient; leanopt optimizers accept dense gradients only")
        if index in self._updated:
            raise RuntimeError(
                f"parameter {index} was already updated in this step: a second backward ran before "
                "optimizer.step(); run all but the last micro-batch's backward inside handle.accumulate()"
            )
        group = self._group(p)
        if self.per_param_max_norm is not None:
            clip_(grad, self.per_param_max_norm, tensor_norm(grad, self.norm_type))
        if self.max_norm is not None:
            if self.clip == "previous":
                self._norms[index] = tensor_norm(grad, self.norm_type)  # the next step's estimate
                clip_(grad, self.max_norm, self._known_norm)
            else:
                clip_(grad, self.max_norm, self._exact_norm)
        if self._fold is not None:
            self._fold_micro_batch(p, grad, last=True)
            return
        plan = self._plans.pop(index, None) if self.plans else None
        if plan is not None:
            done = _step_plan.run_param(plan, opt, p, grad, group, self._plan_cache)
            if done is not None:
                self._plans[index] = plan
                if done:
                    self._updated.add(index)
                else:
                    self._skip(index)
                return
        before = len(opt.last_skipped)
        if opt.update_param(p, group, grad):
            self._updated.add(index)
            plan = _step_plan.param_plan(opt, p, group, grad) if self.plans else None
            if plan is not None:
                self._plans[index] = plan
        elif len(opt.last_skipped) > before:
            self._skipped.append(index)

    @torch.no_grad()
    def _fold_micro_batch(self, p: Tensor, grad: Tensor, last: bool) -> None:
        """accumulation='states': fold a micro-batch gradient into the states; update on the last one."""
        opt = self.optimizer
        index = opt.param_index(p)
        group = self._group(p)
        if grad.is_sparse:
            raise ValueError(f"parameter {index} has a sparse gradient; release needs dense gradients")
        if opt.nonfinite != "ignore" and not bool(torch.isfinite(grad).all()):
            if opt.nonfinite == "raise":
                raise FloatingPointError(f"non-finite gradient for parameter {index}")
            self._poisoned.add(index)
            if last:
                self._skip(index)
            return
        if last and index in self._poisoned:
            self._skip(index)
            return
        state = opt.state_for(p, group)
        _, sfmt = opt.formats(p, group)
        specs = opt.rule.states(group)
        working = {s.name: sfmt.decode(s.name, state, s.signed, shape=p.shape) for s in specs}
        g32 = grad.float()
        signed = -g32 if group.get("maximize", False) else g32
        replacement = self._fold(working, signed, group, self.micro_batches, last, int(state["step"].item()))
        for s in specs:
            sfmt.encode(s.name, working[s.name], state, s.signed)
        if last:
            if replacement is not None and group.get("maximize", False):
                replacement = -replacement
            if opt.update_param(p, group, grad if replacement is None else replacement):
                self._updated.add(index)

    def _skip(self, index: int) -> None:
        self.optimizer.nonfinite_skipped += 1
        self.optimizer.last_skipped.append(index)
        self._skipped.append(index)

    # ----------------------------------------------------------------------------- step()

    def _before_step(self, optimizer: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Step pre-hook: run ``step(closure)``'s closure first, then finish the step's release work.

        ``args`` starts with the optimizer itself. torch runs pre-hooks before ``step`` calls the closure,
        but the closure's backward is what decides this step (deferred updates, their exact clipping, the
        norm): the closure is called here, and ``step`` gets back a closure that returns its result.
        """
        scaler_attrs = (getattr(optimizer, a, None) is not None for a in ("grad_scale", "found_inf"))
        if "grad_scaler" in kwargs or any(scaler_attrs):  # found_inf alone: after scaler.unscale_(optimizer)
            raise RuntimeError(
                "torch.amp.GradScaler cannot drive an optimizer with gradient release: its updates ran during "
                "backward, before the scaler could unscale the gradients or skip a step with inf/NaN. Train in "
                "bfloat16 (no loss scaling needed), or call handle.remove() and use GradScaler without release."
            )
        if not self._active:
            return None
        replaced: tuple[tuple, dict] | None = None
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is not None:
            with torch.enable_grad():
                result = closure()

            def done() -> Any:
                return result

            if "closure" in kwargs:
                replaced = (args, {**kwargs, "closure": done})
            else:
                replaced = ((args[0], done, *args[2:]), kwargs)
        self._complete_step()
        return replaced

    def _take_device_verdicts(self) -> None:
        """The NaN/inf verdicts of updates checked on the device (kernel="fused" on CUDA): a tensor whose
        gradient held one was left unchanged there; here it is counted as skipped."""
        for index in self.optimizer._take_settled_skips():
            self._updated.discard(index)
            self._skip(index)

    def _complete_step(self) -> None:
        """Before ``step`` updates from ``.grad``: clip deferred gradients, or drop already-applied ones."""
        self._take_device_verdicts()
        if self._deferred:
            params = [p for p in self._params() if p.grad is not None]
            if self.max_norm is not None:
                self._exact_norm = self._gathered_norm()
                with torch.no_grad():
                    for p in params:
                        if self.per_param_max_norm is not None:
                            clip_(p.grad, self.per_param_max_norm, tensor_norm(p.grad, self.norm_type))
                        clip_(p.grad, self.max_norm, self._exact_norm)
            # step() itself now updates these parameters from their (clipped) .grad, in the usual order.
        else:
            for p in self._params():  # DDP wrote the averaged grads of parameters already updated
                if p.grad is not None and self.optimizer.param_index(p) in self._updated:
                    p.grad = None

    def _after_step(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        if not self._active:
            return
        if self.max_norm is not None:
            if self.clip == "exact" or self._deferred:
                self.last_norm = self._exact_norm
            else:
                self.last_norm = self._gathered_norm() if self._norms else None
            if self.last_norm is not None and bool(torch.isfinite(self.last_norm)):
                self._known_norm = self.last_norm  # clip="previous" never adopts a non-finite norm
        self.optimizer.last_skipped = self._skipped + [i for i in self.optimizer.last_skipped if i not in self._skipped]
        self._reset()
        self._sync_hooks()

    def _reset(self) -> None:
        self._open = False
        self._deferred = False
        self._micro = 0
        self._norms = {}
        self._exact_norm = None
        self._updated = set()
        self._skipped = []
        self._poisoned = set()

    def _gathered_norm(self) -> Tensor:
        """The global norm from this step's per-tensor norms, combined in torch's order (see total_norm)."""
        return total_norm([self._norms[i] for i in sorted(self._norms)], self.norm_type)

    # ----------------------------------------------------------------------------- public API

    @contextlib.contextmanager
    def accumulate(self, enabled: bool = True) -> Iterator[None]:
        """Run the backward of a micro-batch that is not the last of its step inside this context.

        accumulation="grad" (default): the hooks leave ``.grad`` alone, autograd sums the micro-batch
        gradients into it exactly as without release, and the last backward (outside) updates from the
        sum: bit-identical to ordinary accumulation; ``.grad`` exists meanwhile (``memory_report`` shows
        it under "gradients"). accumulation="states": gradients are folded into the optimizer states and
        freed (approximate; see docs/release.md). Under DDP this also enters ``ddp.no_sync()``.
        """
        if not enabled:
            yield
            return
        if self._phase != "update":
            raise RuntimeError(f"handle.accumulate() cannot be nested in {self._phase!r}")
        if self._open:
            raise RuntimeError("handle.accumulate(): this step's updates already began; call optimizer.step() first")
        self._phase = "accumulate"
        try:
            with self.ddp.no_sync() if self.ddp is not None else contextlib.nullcontext():
                yield
            self._micro += 1
        finally:
            self._phase = "update"

    @contextlib.contextmanager
    def measure_norm(self) -> Iterator[None]:
        """The measuring pass of clip="exact": a backward inside only records gradient norms (frees them).

        Use ``loss.backward(retain_graph=True)`` inside, then ``loss.backward()`` outside to update.
        """
        if self.max_norm is None or self.clip != "exact":
            raise RuntimeError("handle.measure_norm() is for release_gradients(..., max_norm=..., clip='exact')")
        if self.ddp is not None:
            raise RuntimeError(
                "under DDP, clip='exact' clips in optimizer.step() from the all-reduced gradients (DDP's buckets "
                "hold them anyway); call loss.backward() (or handle.backward(loss)) once, no measuring pass"
            )
        if self._micro and self.accumulation == "grad":
            raise RuntimeError(
                "with accumulation='grad' the exact norm is measured from the accumulated .grad; run the last "
                "micro-batch's loss.backward() directly (or handle.backward(loss)), optimizer.step() clips it"
            )
        if self._phase != "update" or self._open:
            raise RuntimeError("handle.measure_norm() must start a step, outside accumulate()")
        self._phase = "measure"
        self._norms = {}
        try:
            yield
            self._exact_norm = self._gathered_norm()
        finally:
            self._phase = "update"
            self._norms = {}
            for p in self._params():  # DDP writes averaged grads after a measuring pass: drop them
                p.grad = None

    def backward(self, loss: Tensor) -> None:
        """``loss.backward()``, with the measuring pass first when clip="exact" needs one."""
        needs_pass = self.max_norm is not None and self.clip == "exact" and self._phase == "update"
        needs_pass = needs_pass and self.ddp is None
        if needs_pass and not (self._micro and self.accumulation == "grad"):
            with self.measure_norm():
                loss.backward(retain_graph=True)
        loss.backward()

    def remove(self) -> None:
        """Restore normal behaviour: hooks are removed, ``step()`` updates from ``.grad`` again.

        Under DDP the communication hook cannot be unregistered; it then does DDP's default all-reduce only.
        """
        if not self._active:
            return
        self._take_device_verdicts()
        self.optimizer._defer_verdicts = False
        for h in self._param_hooks + self._step_hooks:
            h.remove()
        self._param_hooks, self._step_hooks, self._hooked = [], [], set()
        self._plans = {}
        self.optimizer.__dict__.pop("_step_supports_amp_scaling", None)
        self.optimizer.__dict__.pop("_leanopt_release", None)
        self._active = False


def _leave_to_eager() -> None:
    """Mark the hook, ``backward`` and the DDP communication hook for ``torch.compile`` to leave alone
    (``torch.compiler.disable``): a compiled training step runs them as without compilation (docs/release.md).
    Done when the first handle is made, not at import: it loads torch._dynamo, which building the
    optimizer has loaded by then anyway (torch.optim.Optimizer.add_param_group does)."""
    if ReleaseHandle._eager:
        return
    for name in ("_on_grad", "_ddp_comm_hook", "backward"):
        setattr(ReleaseHandle, name, torch.compiler.disable(getattr(ReleaseHandle, name)))
    ReleaseHandle._eager = True


def release_gradients(
    optimizer: LeanOptimizer,
    *,
    ddp: torch.nn.Module | None = None,
    max_norm: float | None = None,
    clip: str = "exact",
    norm_type: float = 2.0,
    per_param_max_norm: float | None = None,
    accumulation: str = "grad",
    micro_batches: int | None = None,
) -> ReleaseHandle:
    """Update each parameter inside backward as soon as its gradient is complete, then free the gradient.

    - ``ddp``: the ``DistributedDataParallel`` module that wraps the model, when training with DDP; updates
      then use the all-reduced gradient (a DDP communication hook). Required under torch.distributed
      unless the parameters are FSDP2 DTensors.
    - ``max_norm``/``norm_type``: clip the global gradient norm as ``clip_grad_norm_`` does. ``clip="exact"``
      needs the norm before any update: ``handle.backward(loss)`` runs a measuring backward first (one
      extra backward pass). ``clip="previous"`` clips with the previous step's norm in a single pass (an
      approximation; its first step keeps the gradients and clips exactly in ``optimizer.step()``).
    - ``per_param_max_norm``: clip each tensor's own norm (before the global clip), exact in one pass.
    - ``accumulation``: what ``with handle.accumulate():`` does for micro-batches before the last one:
      ``"grad"`` (exact: ``.grad`` is kept and summed as without release) or ``"states"`` (folded into the
      optimizer states, no gradient buffer, approximate; needs ``micro_batches``).

    Returns a :class:`ReleaseHandle`; ``handle.remove()`` turns release off.
    """
    if not isinstance(optimizer, LeanOptimizer):
        raise TypeError(f"optimizer must be a leanopt optimizer, got {type(optimizer).__name__}")
    if getattr(optimizer, "_leanopt_release", None) is not None:
        raise RuntimeError("gradient release is already on for this optimizer; call handle.remove() first")
    if clip not in CLIP_MODES:
        raise ValueError(f"clip must be one of {list(CLIP_MODES)}, got {clip!r}")
    if accumulation not in ACCUMULATION_MODES:
        raise ValueError(f"accumulation must be one of {list(ACCUMULATION_MODES)}, got {accumulation!r}")
    for name, value in (("max_norm", max_norm), ("per_param_max_norm", per_param_max_norm)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise ValueError(f"{name} must be a positive number or None, got {value!r}")
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)) or not norm_type > 0:
        raise ValueError(f"norm_type must be a positive number or inf, got {norm_type!r}")
    if accumulation == "states":
        if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
            raise ValueError(f"accumulation='states' needs micro_batches= a positive int, got {micro_batches!r}")
        if ddp is not None:
            raise ValueError("accumulation='states' is not available with ddp=; use accumulation='grad'")
        if max_norm is not None or per_param_max_norm is not None:
            raise ValueError(
                "accumulation='states' cannot clip (max_norm/per_param_max_norm): the accumulated gradient "
                "never exists; use accumulation='grad' to clip"
            )
    elif micro_batches is not None:
        raise ValueError("micro_batches= is only used with accumulation='states'")
    if ddp is not None:
        from torch.nn.parallel import DistributedDataParallel

        if not isinstance(ddp, DistributedDataParallel):
            raise TypeError(f"ddp must be a torch.nn.parallel.DistributedDataParallel, got {type(ddp).__name__}")
        managed = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not managed <= {id(p) for p in ddp.parameters()}:
            raise ValueError("ddp: every parameter of the optimizer must belong to the DDP module")
    else:
        import torch.distributed as dist

        params = [p for g in optimizer.param_groups for p in g["params"]]
        if (
            dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
            and not any(_is_dtensor(p) for p in params)
        ):
            raise ValueError(
                "torch.distributed is initialized: release hooks would see each rank's local gradient. "
                "With DDP pass ddp=<the DistributedDataParallel module>; FSDP2 (DTensor) parameters need nothing"
            )
    handle = ReleaseHandle(
        optimizer, ddp=ddp, max_norm=max_norm, clip=clip, norm_type=norm_type,
        per_param_max_norm=per_param_max_norm, accumulation=accumulation, micro_batches=micro_batches,
    )  # fmt: skip
    optimizer._leanopt_release = handle
    return handle
