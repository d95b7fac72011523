"""The shared optimizer: param groups, state layout, validation, dispatch and state dicts.

Each public optimizer is a thin binding of an update rule (``leanopt.rules``) to this class.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from . import distributed as _shards
from .formats import noise as _noise
from .formats.states import STATE_FORMATS, StateFormat
from .formats.weights import MASTER_CHOICES, WeightFormat, resolve_weight_format
from .kernels import fused as _fused
from .kernels import gpu as _gpu
from .kernels import native as _native
from .kernels import step_plan as _step_plan
from .rules import AdamRule, AdamWRule, LionRule, Rule, SGDRule

NONFINITE_CHOICES = ("skip", "raise", "ignore")
STATE_DICT_VERSION = 1
#: torch.optim's switches between its own implementations, with the value that asks for none in
#: particular (accepted, for code that passes torch.optim's defaults on); leanopt picks its executor
#: with ``kernel=`` instead, so any other value is refused rather than silently ignored
TORCH_IMPLEMENTATION_FLAGS = {"foreach": None, "fused": None, "capturable": False, "differentiable": False}
_FLAG_ADVICE = {
    "foreach": "leanopt has no foreach/for-loop switch: kernel='auto' (default) runs its native or multi-tensor "
    "kernels, kernel='reference' torch's single-tensor arithmetic op for op",
    "fused": "kernel='auto' (default) already runs fused kernels (on CPU bit-identical to torch's fused=True AdamW); "
    "kernel='reference' runs torch's single-tensor arithmetic op for op",
    "capturable": "leanopt's steps cannot be captured in a CUDA graph (each step plans its launches on the host)",
    "differentiable": "leanopt's updates are not differentiable (they run outside autograd)",
}


def refuse_graph_capture(what: str) -> None:
    """Raise if the current CUDA stream is capturing a CUDA graph. A leanopt step reads its step counts,
    hyper-parameters and NaN/inf verdicts on the host and copies launch tables from reused pinned
    buffers: captured, a graph would replay the capture's values (a frozen step count and learning rate)
    or read buffers that later steps rewrote, silently. torch.optim refuses the same without
    ``capturable=True``. About 0.1 us when CUDA was never initialised (``torch.cuda.is_initialized``)."""
    if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"{what} was called while a CUDA graph is being captured; leanopt's optimizer steps cannot be "
            "captured (each step reads its step counts, learning rate and NaN/inf verdicts on the host, which "
            "a graph would replay frozen). Capture the forward and backward only and call optimizer.step() "
            "outside the graph (without gradient release), or use torch.optim with capturable=True. Nothing "
            "was changed."
        )


#: (master, states, dtype) -> (weight format, state format): formats() runs for every tensor on every step
_FORMATS: dict[tuple, tuple[WeightFormat, StateFormat]] = {}


class _StepUndo:
    """A deferred update's step count, for the verdicts read later (``gpu.read_verdicts``, which sets
    ``value`` back for each tensor left alone): the count is put back, or the state this step made for
    the parameter removed (a step that skips a tensor never creates its state)."""

    __slots__ = ("opt", "param", "state", "fresh")

    def __init__(self, opt: Any, param: Tensor, state: dict[str, Any], fresh: Any) -> None:
        self.opt, self.param, self.state, self.fresh = opt, param, state, fresh

    @property
    def value(self) -> float:
        return float(self.state["step"])

    @value.setter
    def value(self, before: float) -> None:
        if self.fresh is not None and self.opt.state.get(self.param) is self.state:
            del self.opt.state[self.param]
        else:
            self.state["step"].fill_(before)


class _Undos:
    """(param, :class:`_StepUndo`, step count before) of the k-th tensor a deferred FSDP2 step checked, made
    only when asked for (``gpu.read_verdicts`` asks for the tensors left alone)."""

    __slots__ = ("opt", "items")

    def __init__(self, opt: Any, items: list[tuple]) -> None:
        self.opt, self.items = opt, items  # (param, state, before, fresh, job)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> tuple:
        param, state, before, fresh, _ = self.items[k]
        return param, _StepUndo(self.opt, param, state, fresh), before


class LeanOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that keeps 16-bit weights without an fp32 master copy.

    Keyword options shared by every leanopt optimizer (settable per param group where marked):

    - ``master`` (per group): how 16-bit weights keep their precision. ``"auto"`` (default) picks
      ``"exact"`` for bf16 params and ``"kahan"`` for fp16 params. fp32 params are always updated in
      place like torch.optim.
    - ``states`` (per group): ``"fp32"`` (default) or ``"bf16"``.
    - ``nonfinite``: what to do with a gradient tensor holding NaN or inf: ``"skip"`` (default; that
      tensor's update is skipped, its weights and states stay as they were, and the skip is counted in
      ``nonfinite_skipped``), ``"raise"`` (FloatingPointError before any tensor is updated) or
      ``"ignore"`` (no check, as torch.optim: NaN/inf reach weights and states; saves one read of each
      gradient per step, about 2 of the 26 bytes per parameter of an exact/fp32 AdamW step).
    - ``seed``: seed of the stochastic-rounding noise (default: ``torch.initial_seed()``). The noise
      depends only on (seed, parameter index, step), never on the order tensors are updated in.
    - ``kernel``: the update executor. ``"auto"`` (default): on CPU every tensor is updated by a
      native kernel (``leanopt.kernels.native``: the rule's fused form generated as C, compiled once per
      combination with the system C compiler and cached on disk); on CUDA the multi-tensor CUDA kernels
      (``leanopt.kernels.gpu``: the native kernels' code compiled with NVRTC, one launch per combination
      per step); where those cannot build, param groups with at least 2**20 elements use
      ``torch.compile`` (Triton; ``leanopt.kernels.fused``) and smaller ones the eager reference.
      ``"fused"``: the same, but the compiled paths for every group they cover.
      ``"reference"``: always the eager
      reference (torch.optim's single-tensor arithmetic, op for op). Without a working compiler the
      compiled paths warn once and fall back. What each path reproduces bit for bit: docs/kernels.md.
    """

    rule: Rule
    _native_ready = False  # within step(): the native CPU kernels are on for this step
    _step_plan: Any = None  # the last step's plan, if it can be repeated in one native call
    _finite: dict[int, bool] = {}  # within step(): all_finite of its plain gradients, by id (never mutated)
    # set by gradient release (leanopt.release): with kernel="fused" on CUDA, update_param checks each
    # gradient for NaN/inf on the device and takes the verdicts later (_settle_verdicts), not one wait each
    _defer_verdicts = False
    # a planned CUDA step's NaN/inf verdicts (kernels/gpu.py), read when first needed: the skip counts
    # below, the next step(), state_dict() and load_state_dict() read them (_settle_step_verdicts)
    _step_verdicts: Any = None

    @property
    def nonfinite_skipped(self) -> int:
        """How many tensor updates were skipped for a non-finite gradient (``nonfinite="skip"``)."""
        self._settle_step_verdicts()
        return self._nonfinite_skipped

    @nonfinite_skipped.setter
    def nonfinite_skipped(self, value: int) -> None:
        self._nonfinite_skipped = value

    @property
    def last_skipped(self) -> list[int]:
        """Indices of the parameters skipped in the last step."""
        self._settle_step_verdicts()
        return self._last_skipped

    @last_skipped.setter
    def last_skipped(self, value: list[int]) -> None:
        self._last_skipped = value

    def _settle_step_verdicts(self) -> None:
        """Read the verdicts of the last planned CUDA step, if not yet read (a wait for their copy only):
        each tensor left alone for a NaN/inf gets its step count back and is counted as skipped."""
        pending = self._step_verdicts
        if pending is None:
            return
        self._step_verdicts = None
        bad = _gpu.read_verdicts(pending)
        for _, counter, before in bad:
            counter.value = before
        self._nonfinite_skipped += len(bad)
        self._last_skipped = [self.param_index(p) for p, _, _ in bad]

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        master: str = "auto",
        states: str = "fp32",
        nonfinite: str = "skip",
        seed: int | None = None,
        kernel: str = "auto",
        **hyper: Any,
    ) -> None:
        _fused.check_kernel(kernel)
        hyper = self._known_hyper(hyper)
        if nonfinite not in NONFINITE_CHOICES:
            raise ValueError(f"nonfinite must be one of {list(NONFINITE_CHOICES)}, got {nonfinite!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        self.nonfinite = nonfinite
        self.kernel = kernel
        self.seed = torch.initial_seed() if seed is None else seed
        self.nonfinite_skipped = 0
        self.last_skipped: list[int] = []
        self._index: dict[Tensor, int] | None = None
        #: (param index, device verdict, state, step before, the param if its state was made by that update)
        self._pending_verdicts: list[tuple] = []
        self._settled_skips: list[int] = []  # deferred updates found skipped, not yet taken
        defaults = {**hyper, "master": master, "states": states}
        super().__init__(params, defaults)

    @classmethod
    def _known_hyper(cls, hyper: dict[str, Any]) -> dict[str, Any]:
        """``hyper`` without torch.optim's implementation switches at their neutral values; raises for any
        other name that is not one of the rule's hyper-parameters (a misspelt ``weight_decay`` would
        otherwise sit unused in the param groups) and for an implementation switch that asks for
        something, naming it and what would be accepted. Called before anything is built."""
        known = []
        for name, value in hyper.items():
            if name in cls.rule.defaults:
                known.append(name)
            elif name == "decoupled_weight_decay" and isinstance(getattr(cls.rule, "decoupled", None), bool):
                if value is not cls.rule.decoupled:  # torch.optim.Adam's switch to AdamW's decay
                    other = "AdamW" if value else "Adam"
                    raise ValueError(
                        f"decoupled_weight_decay={value!r}: leanopt.{cls.__name__} has decoupled_weight_decay="
                        f"{cls.rule.decoupled} built in; use leanopt.{other}"
                    )
            elif name in TORCH_IMPLEMENTATION_FLAGS:
                neutral = TORCH_IMPLEMENTATION_FLAGS[name]
                if value is not neutral:  # None or False itself (not 0 or "")
                    advice = f"{_FLAG_ADVICE[name]}; pass {name}={neutral!r} or leave it out"
                    raise ValueError(f"{name}={value!r} is not supported: {advice}")
            else:
                accepted = [*cls.rule.defaults, "master", "states", "nonfinite", "seed", "kernel"]
                raise TypeError(
                    f"{cls.__name__}() got an unexpected keyword argument {name!r}; accepted: {', '.join(accepted)}"
                    f" (and torch.optim's {', '.join(f'{k}={v!r}' for k, v in TORCH_IMPLEMENTATION_FLAGS.items())})"
                )
        return {name: hyper[name] for name in known}

    def _patch_step_function(self) -> None:
        """torch.optim wraps ``step`` once per class (its step hooks and profiler label); leanopt then
        marks that wrapper for ``torch.compile`` to leave alone (``torch.compiler.disable``): a training
        step compiled with the optimizer inside gets one graph break at ``optimizer.step()`` and runs it
        as without compilation (same bits), instead of Dynamo tracing leanopt's Python (plans, checks,
        the native calls) into dozens of graphs (docs/kernels.md, "Under torch.compile")."""
        super()._patch_step_function()
        cls = self.__class__
        if not getattr(cls.step, "_leanopt_eager", False):
            step = torch.compiler.disable(cls.step)
            step.hooked = True  # torch's marker: do not wrap again
            step._leanopt_eager = True
            cls.step = step

    # ------------------------------------------------------------------- copy.deepcopy, pickle
    #: leanopt's own attributes that a copy keeps (torch.optim.Optimizer's pickling keeps only
    #: defaults, state and param_groups); plans, pending verdicts and caches are rebuilt
    _PICKLED = ("nonfinite", "kernel", "seed", "_nonfinite_skipped", "_last_skipped")

    def __getstate__(self) -> dict[str, Any]:
        self._settle_verdicts()  # what pending GPU verdicts decide belongs in the copy
        self._settle_step_verdicts()
        return {**super().__getstate__(), "leanopt": {k: copy.copy(getattr(self, k)) for k in self._PICKLED}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        extra = state.pop("leanopt", {})
        super().__setstate__(state)
        self.__dict__.update(extra)
        self._index = None
        self._pending_verdicts = []
        self._settled_skips = []

    # ----------------------------------------------------------------------------- validation

    def _check_group(self, group: dict[str, Any]) -> None:
        """Raise ValueError naming the offending argument; changes nothing."""
        if group["master"] not in MASTER_CHOICES:
            raise ValueError(f"master must be one of {list(MASTER_CHOICES)}, got {group['master']!r}")
        if group["states"] not in STATE_FORMATS:
            raise ValueError(f"states must be one of {list(STATE_FORMATS)}, got {group['states']!r}")
        self.rule.validate(group)

    def _check_group_keys(self, group: dict[str, Any]) -> None:
        """Keys of a param group dict that leanopt does not read stay allowed (a name, a layer index: as in
        torch.optim), but an optimizer-wide option set per group is an error (it would be ignored), a
        torch.optim implementation switch must be at its neutral value, and a key one letter or so away
        from a hyper-parameter (``"state"`` for ``"states"``) gets a warning naming the one it resembles."""
        read = [*self.rule.defaults, "master", "states"]
        for key in group:
            if key in read or key in ("params", "param_names"):
                continue
            if key in ("nonfinite", "seed", "kernel"):
                raise ValueError(f"{key} is an optimizer-wide option, not a param group's: pass it to "
                                 f"{type(self).__name__}(..., {key}=...); per group: {', '.join(read)}")  # fmt: skip
            adam_switch = key == "decoupled_weight_decay" and hasattr(self.rule, "decoupled")
            if key in TORCH_IMPLEMENTATION_FLAGS or adam_switch:
                self._known_hyper({key: group[key]})  # as the keyword: torch.optim's groups carry these
                continue
            near = difflib.get_close_matches(key, read, n=1, cutoff=0.85) if isinstance(key, str) else []
            if near:
                warnings.warn(
                    f"param group key {key!r} is not one leanopt reads; did you mean {near[0]!r}? (the group uses "
                    f"{near[0]}={group.get(near[0], self.defaults.get(near[0]))!r}; keys of your own are kept unread)",
                    stacklevel=3,
                )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        params = group.get("params")
        if isinstance(params, Tensor):
            params = [params]
        elif isinstance(params, set) or params is None:
            raise TypeError("params must be an ordered collection of tensors (a list), not a set or None")
        else:
            params = list(params)
        self._check_group_keys(group)
        for name, default in self.defaults.items():
            group.setdefault(name, default)
        self._check_group(group)
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(f"params[{i}] must be a torch.Tensor, got {type(p).__name__}")
            if p.dtype not in (torch.bfloat16, torch.float16, torch.float32):
                raise ValueError(
                    f"params[{i}] has dtype {p.dtype}; leanopt optimizes bfloat16, float16 and float32 "
                    "params (its arithmetic is fp32: use torch.optim for float64)"
                )
            resolve_weight_format(group["master"], p.dtype)
            _shards.check_param(p, f"params[{i}]", lambda shape, p=p: self._expected_layout(p, group, shape))
        group["params"] = params
        super().add_param_group(group)
        self._index = None

    # ----------------------------------------------------------------------------- layout

    def formats(self, param: Tensor, group: dict[str, Any]) -> tuple[WeightFormat, StateFormat]:
        """The (weight format, state format) a parameter uses in its group."""
        key = (group["master"], group["states"], param.dtype)
        found = _FORMATS.get(key) if isinstance(key[0], str) and isinstance(key[1], str) else None
        if found is None:  # raises for a master= that does not suit the dtype (nothing cached then)
            found = resolve_weight_format(group["master"], param.dtype), STATE_FORMATS[group["states"]]
            _FORMATS[key] = found
        return found

    def _init_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        tensors = self._new_state_tensors(param, group, self.rule.states(group), buffers=True)
        state = self.state[param]
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state.update(tensors)
        return state

    def _new_state_tensors(self, param: Tensor, group: dict[str, Any], specs, buffers: bool) -> dict[str, Tensor]:
        """Zeroed states (and the weight format's buffers) for ``param``, built from its local rows;
        for a DTensor (FSDP2) parameter they are then sharded like it (see leanopt.distributed)."""
        wfmt, sfmt = self.formats(param, group)
        rows = _shards.local(param).detach()
        tensors = dict(wfmt.init_buffers(rows)) if buffers else {}
        for spec in specs:
            tensors.update(sfmt.init(spec.name, rows, spec.signed))
        if _shards.is_dtensor(param):
            layout = self._expected_layout(param, group)
            tensors = _shards.shard_state(param, tensors, layout, f"parameter {self.param_index(param)}")
        return tensors

    def _expected_layout(
        self, param: Tensor, group: dict[str, Any], shape: tuple | None = None
    ) -> dict[str, tuple[torch.dtype, tuple]]:
        """State key -> (dtype, shape) that this parameter's state must hold (for a parameter of
        ``shape``; default: the parameter's whole shape, also for a DTensor)."""
        meta = torch.empty(param.shape if shape is None else shape, dtype=param.dtype, device="meta")
        wfmt, sfmt = self.formats(param, group)
        layout = {"step": (torch.float32, ())}
        tensors = dict(wfmt.init_buffers(meta))
        for spec in self.rule.states(group):
            tensors.update(sfmt.init(spec.name, meta, spec.signed))
        layout.update({k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()})
        return layout

    def param_index(self, param: Tensor) -> int:
        """Position of ``param`` in the optimizer, counting through all groups in order."""
        if self._index is None:
            self._index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        return self._index[param]

    def _random_bits(self, param: Tensor, state: dict[str, Any]) -> _noise.UpdateNoise:
        """Stochastic rounding's bits for this parameter's update (formats/noise.py): keyed by (seed,
        parameter index, step count after the update), indexed by each element's place in the whole
        tensor, so shards and executors round alike."""
        return _noise.UpdateNoise(self.seed, self.param_index(param), state, param)

    # ----------------------------------------------------------------------------- stepping

    def _group_of(self, param: Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return group
        raise KeyError("parameter is not managed by this optimizer")

    def update_param(self, param: Tensor, group: dict[str, Any], grad: Tensor | None = None) -> bool:
        """Update one parameter from ``grad`` (default ``param.grad``). Returns False if skipped.

        The building block of ``step``; gradient release calls it from backward hooks. Under release with
        ``kernel="fused"`` on CUDA the NaN/inf verdict is taken on the device and read at ``step()``: it
        returns True and a skip is counted then (docs/release.md).
        """
        refuse_graph_capture(f"{type(self).__name__}.update_param()")
        return self._update_param(param, group, grad, layout_checked=False)

    def _update_param(
        self, param: Tensor, group: dict[str, Any], grad: Tensor | None, layout_checked: bool,
        finite_checked: bool = False,
    ) -> bool:  # fmt: skip
        """``update_param``; ``layout_checked``: ``_check_grads`` has just checked this state's layout;
        ``finite_checked``: the caller has just found the gradient finite."""
        grad = param.grad if grad is None else grad
        if grad is None:
            return False
        # From step() in "raise" mode _check_grads has just checked every gradient. A sharded gradient
        # gets the same decision on every rank.
        checked = finite_checked or (layout_checked and self.nonfinite == "raise")
        known = self._finite.get(id(grad))  # within step(): from its batched check
        if self._defer_verdicts and self.nonfinite == "skip" and not checked and known is None:
            if self._update_checked_on_device(param, group, grad, layout_checked):
                return True
        if self.nonfinite != "ignore" and not checked and not (_shards.all_finite(grad) if known is None else known):
            if self.nonfinite == "raise":
                raise FloatingPointError(f"non-finite gradient for parameter {self.param_index(param)}")
            self.nonfinite_skipped += 1
            self.last_skipped.append(self.param_index(param))
            return False
        state = self.state_for(param, group, check_layout=not layout_checked)
        wfmt, sfmt = self.formats(param, group)
        random_bits = self._random_bits(param, state) if wfmt.needs_random else None
        where = f"parameter {self.param_index(param)}"
        with _shards.local_views(param, grad, state, where) as (p, g, st):  # FSDP2: this rank's rows
            _fused.dispatch_step(self.kernel, self.rule, wfmt, sfmt, p, g, st, group, random_bits, id(state))
        return True

    def _update_checked_on_device(
        self, param: Tensor, group: dict[str, Any], grad: Tensor, layout_checked: bool
    ) -> bool:  # fmt: skip
        """kernel="fused" on CUDA under gradient release: one launch checks the gradient for NaN/inf and a
        second updates the parameter only if it was clean, so the host never waits for the verdict here;
        :meth:`_settle_verdicts` reads the verdicts later (release: at ``optimizer.step()``) and undoes
        the step count of a skipped tensor. A DTensor (FSDP2) parameter is updated on its local rows, its
        verdict made the minimum over the ranks on the device (an all-reduce between the two launches)
        before the update reads it. False (nothing changed) when this path does not apply."""
        if not _gpu.wanted(self.kernel, grad.device):
            return False
        rows, g, reduce = param, grad, None
        if _shards.is_dtensor(param):
            if not _shards.is_dtensor(grad):
                return False  # the general path refuses it, naming the parameter
            rows, g = _shards.local(param), _shards.local_grad(param, grad, f"parameter {self.param_index(param)}")
            reduce = functools.partial(_shards.all_ranks_min, mesh=param.device_mesh)
        if not _gpu.can_check(g):
            return False
        fresh = param if not self.state.get(param) else None  # its state made now: gone again if skipped
        state = self.state_for(param, group, check_layout=not layout_checked)
        wfmt, sfmt = self.formats(param, group)
        random_bits = self._random_bits(param, state) if wfmt.needs_random else None
        before = float(state["step"])
        st = _shards.local_state(state) if reduce is not None else state
        job = _gpu.launch(self.rule, wfmt, sfmt, rows, g, st, group, None, random_bits, cache_key=id(state))
        if job is None:
            return False
        for _, verdict in _gpu.run_many([job], check=True, reduce=reduce):
            self._pending_verdicts.append((self.param_index(param), verdict, state, before, fresh))
        if not job.units:  # an empty tensor: nothing to check or launch
            verdict = None
            if reduce is not None:  # FSDP2, no rows here: this rank's verdict (1) must still meet the others'
                verdict = reduce(torch.ones(1, dtype=torch.int32, device=g.device))[0]
            self._pending_verdicts.append((self.param_index(param), verdict, state, before, fresh))
        return True

    def _settle_verdicts(self) -> None:
        """Read the device verdicts of the deferred updates (one transfer per device): a tensor whose
        gradient held a NaN or inf was left unchanged on the device; its step count is restored here
        (a state its update had just created is removed, as a step that skips it never creates one)
        and it is counted as skipped (taken by :meth:`_take_settled_skips`)."""
        pending, self._pending_verdicts = self._pending_verdicts, []
        by_device: dict[torch.device, list[tuple]] = {}
        for item in pending:
            if item[1] is not None:
                by_device.setdefault(item[1].device, []).append(item)
        for items in by_device.values():
            flags = torch.stack([item[1] for item in items]).tolist()
            for (index, _, state, before, fresh), ok in zip(items, flags, strict=True):
                if not ok:
                    if fresh is not None and self.state.get(fresh) is state:
                        del self.state[fresh]
                    else:
                        state["step"].fill_(before)
                    self._settled_skips.append(index)

    def _take_settled_skips(self) -> list[int]:
        """Settle the pending verdicts and return the indices of the parameters skipped since last asked."""
        self._settle_verdicts()
        out, self._settled_skips = self._settled_skips, []
        return out

    def _finite_flags(self, grads: list[Tensor]) -> dict[int, bool]:
        """all_finite of the step's plain gradients, by id (missing: ask per tensor): the CPU ones from
        one native call, the ones on each other device (CUDA) from one transfer to the host, not one
        synchronising ``bool()`` per tensor."""
        if self.nonfinite == "ignore":
            return {}
        plain = [g for g in grads if g.layout == torch.strided and not _shards.is_dtensor(g)]
        out: dict[int, bool] = {}
        kinds = (torch.float32, torch.bfloat16, torch.float16)
        # kernel="fused" on CUDA: one multi-tensor check kernel per device (kernels/gpu.py)
        by_kernel = {t for t in ("cpu", "cuda") if _gpu.wanted(self.kernel, torch.device(t))}
        on_cpu = [g for g in plain if g.device.type == "cpu" and "cpu" not in by_kernel and g.dtype in kinds
                  and _native.dense(g)]  # fmt: skip
        flags = _native.all_finite_many(on_cpu) if len(on_cpu) > 1 and self.kernel != "reference" else None
        if flags is not None:
            out.update((id(g), f) for g, f in zip(on_cpu, flags, strict=True))
        by_device: dict[torch.device, list[Tensor]] = {}
        for g in plain:
            if g.device.type != "cpu" or "cpu" in by_kernel:
                by_device.setdefault(g.device, []).append(g)
        for gs in by_device.values():
            found = _gpu.all_finite_many(gs) if gs[0].device.type in by_kernel else None
            if found is None and len(gs) > 1 and gs[0].device.type != "cpu":
                found = torch.stack([_shards.finite_flag(g) for g in gs]).tolist()
            if found is not None:
                out.update((id(g), bool(f)) for g, f in zip(gs, found, strict=True))
        return out

    def _native_job(self, param: Tensor, group: dict[str, Any], scalars: dict) -> Any:
        """For ``step()``: the parameter's update prepared as a native launch (its step count advanced;
        with ``kernel="fused"`` on CUDA a :class:`kernels.gpu.GpuLaunch`),
        False when it was dealt with here (a non-finite gradient skipped, or a tensor the kernels do not
        cover updated at once), None for tensors no native or CUDA kernel takes (``_update_param``
        runs them). A DTensor (FSDP2) parameter is launched on its local rows, with the other tensors
        (one native call, one CUDA launch per combination). The same decisions as ``_update_param``."""
        grad = param.grad
        on_gpu = _gpu.wanted(self.kernel, grad.device)  # kernel="fused" on CUDA: multi-tensor launches
        if self.kernel == "reference" or (grad.device.type != "cpu" and not on_gpu):
            return None
        if self.nonfinite == "skip":  # "raise": checked in _check_grads
            finite = self._finite.get(id(grad))
            if not (_shards.all_finite(grad) if finite is None else finite):
                self.nonfinite_skipped += 1
                self.last_skipped.append(self.param_index(param))
                return False
        state = self.state_for(param, group, check_layout=False)
        wfmt, sfmt = self.formats(param, group)
        random_bits = self._random_bits(param, state) if wfmt.needs_random else None
        rows, g, st = param, grad, state
        if _shards.is_dtensor(param):  # FSDP2: this rank's rows (the same storage), launched with the rest
            rows, g, st = _shards.local_parts(param, grad, state, f"parameter {self.param_index(param)}")
        key = id(state)  # the launch is prepared again only if the tensors in ``st`` changed
        if on_gpu:
            job = _gpu.launch(self.rule, wfmt, sfmt, rows, g, st, group, scalars, random_bits, cache_key=key)
        else:
            job = _native.launch(self.rule, wfmt, sfmt, rows, g, st, group, random_bits, scalars,
                                 ready=self._native_ready, cache_key=key)  # fmt: skip
        if job is None:  # not covered (format, layout, no compiler): the other executors, now
            self._update_param(param, group, None, layout_checked=True, finite_checked=True)
            return False
        return job

    def state_for(self, param: Tensor, group: dict[str, Any], check_layout: bool = True) -> dict[str, Any]:
        """The parameter's state, created on first use and completed when a hyper-parameter change
        needs a new state (e.g. momentum turned on); its layout is checked unless ``check_layout`` is
        False (the caller just did)."""
        state = self.state[param]
        if not state:
            return self._init_state(param, group)
        self._ensure_states(param, group, state, check_layout)
        return state

    def _ensure_states(
        self, param: Tensor, group: dict[str, Any], state: dict[str, Any], check_layout: bool = True
    ) -> None:
        """Add states a hyper-parameter change made necessary (e.g. momentum turned on)."""
        added = False
        specs = self.rule.states(group)
        complete = self.__dict__.setdefault("_states_complete", {})  # id(state) -> (specs, keys) seen complete
        if complete.get(id(state)) != (specs, tuple(state)):
            for spec in specs:
                if spec.name not in state and not any(k.startswith(spec.name + ".") for k in state):
                    state.update(self._new_state_tensors(param, group, (spec,), buffers=False))
                    added = True
            if len(complete) > 100_000:
                complete.clear()
            complete[id(state)] = (specs, tuple(state))
        if check_layout or added:
            self._check_state_layout(param, group, state)

    def _check_state_layout(self, param: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """Raise RuntimeError if ``param``'s existing state was made for other ``master=``/``states=``
        modes (keys or dtypes differ). A state the rule does not use now (momentum turned off) is fine."""
        specs = self.rule.states(group)
        key = (group["master"], group["states"], param.dtype, tuple(param.shape), specs)
        # The same state dict holding the same tensors as at its last check with the same modes: done.
        seen = self.__dict__.setdefault("_layout_seen", {})
        # (dtypes too: ``t.data = other`` keeps the tensor object but may change its dtype)
        mark = (key, tuple(state), tuple((id(v), getattr(v, "dtype", None)) for v in state.values()))
        if seen.get(id(state)) == mark:
            return
        wfmt, _ = self.formats(param, group)
        # Expected {name: {key: dtype}}, cached: this runs for every parameter on every step.
        cache = self.__dict__.setdefault("_layout_cache", {})
        if key not in cache:
            layout = self._expected_layout(param, group)
            cache[key] = {
                name: {k: d for k, (d, _) in layout.items() if k == name or k.startswith(name + ".")}
                for name in (*wfmt.buffers, *(s.name for s in specs))
            }
        for name, want in cache[key].items():
            have = {k: v.dtype for k, v in state.items() if k == name or k.startswith(name + ".")}
            if (have or name in wfmt.buffers) and have != want:
                raise RuntimeError(
                    f"parameter {self.param_index(param)}: its state holds {have or 'nothing'} for {name!r}, "
                    f"but master={group['master']!r}, states={group['states']!r} keep {want}; master= and "
                    "states= cannot change after the first step"
                )
        if len(seen) > 100_000:
            seen.clear()
        seen[id(state)] = mark

    def _check_grads(self) -> list[tuple[Tensor, dict[str, Any]]]:
        work = []
        for gi, group in enumerate(self.param_groups):
            try:
                self._check_group(group)
            except ValueError as err:
                raise ValueError(f"param_groups[{gi}]: {err}") from None
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(
                        f"parameter {self.param_index(p)} has a sparse gradient; leanopt optimizers accept "
                        "dense gradients only (use torch.optim.SparseAdam for sparse embeddings)"
                    )
                if _shards.is_dtensor(p) and not _shards.is_dtensor(p.grad):  # before any update is prepared
                    _shards.local_grad(p, p.grad, f"parameter {self.param_index(p)}")  # raises, naming it
                if p.grad.shape != p.shape:
                    raise ValueError(
                        f"parameter {self.param_index(p)}: gradient shape {tuple(p.grad.shape)} does not "
                        f"match the parameter's {tuple(p.shape)}"
                    )
                try:
                    self.formats(p, group)  # the group's master= may not suit this dtype
                except ValueError as err:
                    raise ValueError(f"param_groups[{gi}], parameter {self.param_index(p)}: {err}") from None
                if self.state.get(p):
                    self._check_state_layout(p, group, self.state[p])
                if self.nonfinite == "raise":
                    finite = self._finite.get(id(p.grad))
                    if not (_shards.all_finite(p.grad) if finite is None else finite):
                        raise FloatingPointError(f"non-finite gradient for parameter {self.param_index(p)}")
                work.append((p, group))
        return work

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update every parameter that has a gradient. Bad input raises before anything changes."""
        refuse_graph_capture(f"{type(self).__name__}.step()")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._native_ready = self.kernel != "reference" and _native.disabled_reason() is None
        self._settle_step_verdicts()  # the last planned CUDA step's, before anything reads step counts
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            self._scaled_step()  # called by torch.amp.GradScaler.step
            return loss
        # the same step as last time, every update native: one native call (kernels/step_plan.py)
        plan, self._step_plan = self._step_plan, None
        if isinstance(plan, _gpu.GpuStepPlan):  # kernel="fused" on CUDA: the launches of the last step
            skipped = _gpu.run_plan(plan, self)
        else:
            skipped = _step_plan.run(plan, self) if plan is not None and self._native_ready else None
        if skipped is not None:  # (a planned CUDA step's skips come later: _step_verdicts)
            self._last_skipped = skipped
            self._nonfinite_skipped += len(skipped)
            if not skipped:  # after a skip the step counts differ: the general path plans again
                self._step_plan = plan
            return loss
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if self.nonfinite == "skip" and self._sharded_on_device(grads) and self._step_sharded(self._check_grads()):
            return loss  # FSDP2 on CUDA: checked, all-reduced and updated on the device, the verdicts read later
        # plain gradients checked for NaN/inf together: one native call on CPU, one transfer per GPU
        self._finite = self._finite_flags(grads)
        try:
            # FSDP2: one all-reduce decides for every sharded gradient (none asked with nonfinite="ignore")
            with _shards.finite_checks(grads) if self.nonfinite != "ignore" else contextlib.nullcontext():
                work = self._check_grads()
                self.last_skipped = []
                jobs, gpu_jobs, scalars = [], [], {}
                for p, group in work:
                    job = self._native_job(p, group, scalars)
                    if job is None:  # not a plain CPU tensor: one update now
                        self._update_param(p, group, None, layout_checked=True)
                    elif isinstance(job, _gpu.GpuLaunch):
                        gpu_jobs.append(job)
                    elif job is not False:
                        jobs.append(job)
                _native.run_many(jobs)  # every prepared update in one native call
                _gpu.run_many(gpu_jobs)  # one launch per kernel and device
                if any(_shards.is_dtensor(p) for p, _ in work):  # FSDP2: planned, all on one mesh
                    mesh = getattr(work[0][0], "device_mesh", None)  # (the builds check every tensor's)
                    if mesh is not None and len(gpu_jobs) == len(work):
                        self._step_plan = _gpu.build_plan(self, work, gpu_jobs, mesh=mesh)
                    elif mesh is not None and self._native_ready and len(jobs) == len(work):
                        self._step_plan = _step_plan.build(self, work, jobs, mesh=mesh)
                elif self._native_ready and len(jobs) == len(work):
                    self._step_plan = _step_plan.build(self, work, jobs)
                elif len(gpu_jobs) == len(work):
                    self._step_plan = _gpu.build_plan(self, work, gpu_jobs)
        finally:
            self._finite = {}  # ids of this step's gradients: never reused
        return loss

    def _sharded_on_device(self, grads: list[Tensor]) -> bool:
        """Whether every gradient of this step is a DTensor (FSDP2) whose rows the multi-tensor CUDA
        kernels update (kernel "auto"/"fused" on CUDA; emulated on the CPU in tests)."""
        if not grads:
            return False
        device = None
        for g in grads:
            if not _shards.is_dtensor(g):
                return False
            if g.device != device:
                device = g.device
                if not _gpu.wanted(self.kernel, device):
                    return False
        return True

    def _step_sharded(self, work: list[tuple[Tensor, dict[str, Any]]]) -> bool:
        """An FSDP2 step on CUDA (``nonfinite="skip"``) without the host waiting: every update prepared on
        its local rows (step counts advanced), the local gradients checked for NaN/inf by one launch per
        device mesh, the verdicts all-reduced (minimum over the ranks) on the device, and the update
        kernels reading them there: a tensor whose gradient holds a NaN or inf in any rank's rows is left
        alone on every rank. The verdicts come back behind the check and are read when first needed
        (the next ``step()``, ``last_skipped``, a state dict: ``_settle_step_verdicts``), which puts a
        skipped tensor's step count back. Before (and for ``"raise"``) the host read the all-reduced
        verdicts before launching anything: one wait for the GPU per step. False, with nothing changed,
        when an update is not covered (the general path then runs)."""
        if not work:
            return False
        prepared: list[tuple[Tensor, dict[str, Any], float, Any, Any]] = []
        scalars: dict = {}
        for p, group in work:
            fresh = p if not self.state.get(p) else None
            state = self.state_for(p, group, check_layout=False)
            wfmt, sfmt = self.formats(p, group)
            before = float(state["step"])
            random_bits = self._random_bits(p, state) if wfmt.needs_random else None
            rows, g, st = _shards.local_parts(p, p.grad, state, f"parameter {self.param_index(p)}")
            job = _gpu.launch(self.rule, wfmt, sfmt, rows, g, st, group, scalars, random_bits, cache_key=id(state))
            prepared.append((p, state, before, fresh, job))
            if job is None:  # not covered: undo the step counts advanced so far (nothing has run yet)
                return self._undo_prepared(prepared)
        by_mesh: dict[Any, list[int]] = {}
        for k, (p, *_) in enumerate(prepared):
            by_mesh.setdefault(p.device_mesh, []).append(k)
        checks, positions, order = [], [0] * len(prepared), []
        for mesh, ks in by_mesh.items():  # the same meshes and tensors in the same order on every rank
            local = _gpu.finite_flags([prepared[k][4].keep[0] for k in ks])  # one launch, no wait
            if local is None:  # (a gradient it cannot read: on every rank alike, before any all-reduce)
                return self._undo_prepared(prepared)
            checks.append((mesh, local))
            for j, k in enumerate(ks):
                positions[k] = len(order) + j
            order += ks
        flags = [_shards.all_ranks_min(local, mesh) for mesh, local in checks]
        verdicts = flags[0] if len(flags) == 1 else torch.cat(flags)
        jobs = [item[4] for item in prepared]
        _gpu.run_many(jobs, verdicts=(verdicts, positions))
        self.last_skipped = []
        self._step_verdicts = _gpu._verdicts_later(verdicts, _Undos(self, [prepared[k] for k in order]))
        if len(by_mesh) == 1:  # the next step by a plan: the same launches, check and all-reduce
            self._step_plan = _gpu.build_plan(self, work, jobs, mesh=next(iter(by_mesh)))
        return True

    def _undo_prepared(self, prepared: list[tuple]) -> bool:
        """Put back the step counts (and remove the new states) of updates prepared but not run: False."""
        for param, state, before, fresh, _ in prepared:
            _StepUndo(self, param, state, fresh).value = before
        return False

    #: torch.amp.GradScaler hands this optimizer its scale and inf flag (``grad_scale``, ``found_inf``)
    #: instead of unscaling the gradients in place, which it refuses for fp16 ones: see _scaled_step
    _step_supports_amp_scaling = True

    def _scaled_step(self) -> None:
        """A step from ``torch.amp.GradScaler.step``: nothing changes when ``found_inf`` is set (the scaler
        then lowers its scale); otherwise each gradient is divided by ``grad_scale`` in fp32, one tensor at
        a time (an fp16 gradient keeps its low values, which an in-place fp16 unscale would flush), and
        updated as usual. With a power-of-two scale (GradScaler's) that division is exact."""
        scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        self.last_skipped = []
        if found_inf is not None and float(found_inf) != 0.0:  # one wait on CUDA, as GradScaler's own path
            return  # an inf or NaN somewhere: the whole step is skipped, as torch.optim's fused AdamW does
        checked = found_inf is not None  # the scaler has just found every gradient finite
        if checked:  # nonfinite="raise" need not look again
            self._finite = {id(p.grad): True for g in self.param_groups for p in g["params"] if p.grad is not None}
        try:
            work = self._check_grads()  # bad input raises before anything changes
        finally:
            self._finite = {}
        self._step_plan = None  # plans read .grad
        divisor = None if scale is None else float(scale)
        for p, group in work:
            grad = p.grad if divisor is None else p.grad.to(torch.float32, copy=True).div_(divisor)  # .grad untouched
            self._update_param(p, group, grad, layout_checked=True, finite_checked=checked)

    # ----------------------------------------------------------------------------- master values

    @torch.no_grad()
    def master_value(self, param: Tensor) -> Tensor:
        """A new fp32 tensor with the parameter's full-precision (master) value."""
        group = self._group_of(param)
        wfmt, _ = self.formats(param, group)
        rows = _shards.local(param)  # FSDP2: this rank's rows; the result is a DTensor placed like param
        state = _shards.local_state(self.state.get(param) or {}) or wfmt.init_buffers(rows.detach())
        value = wfmt.decode(rows, state)
        value = value.clone() if value.data_ptr() == rows.data_ptr() else value.float()
        return _shards.shard_like(param, value) if _shards.is_dtensor(param) else value

    @torch.no_grad()
    def set_master_value(self, param: Tensor, value: Tensor) -> None:
        """Set the parameter's master value from an fp32 tensor: the 16-bit weight becomes its
        nearest value and the format's extra bits keep the rest (before or after the first step)."""
        group = self._group_of(param)
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(
                f"value for parameter {self.param_index(param)} has shape {tuple(value.shape)}, "
                f"expected {tuple(param.shape)}"
            )
        state = self.state[param] or self._init_state(param, group)
        wfmt, _ = self.formats(param, group)
        rows, value = _shards.local(param), _shards.rows_of(param, value)  # FSDP2: this rank's rows
        wfmt.encode(value.to(device=rows.device, dtype=torch.float32), rows, _shards.local_state(state), None)

    # ----------------------------------------------------------------------------- state dicts

    def state_dict(self) -> dict[str, Any]:
        self._settle_verdicts()  # step counts of deferred updates found skipped are restored first
        self._settle_step_verdicts()
        sd = super().state_dict()
        sd["leanopt"] = {"version": STATE_DICT_VERSION, "nonfinite_skipped": self.nonfinite_skipped, "seed": self.seed}
        return sd

    @staticmethod
    def _same_master(key: str, saved: Any, group: dict[str, Any]) -> bool:
        """Whether a saved ``master=`` value keeps every param of ``group`` in the same format as the
        group's own (e.g. 'auto' and 'exact' for bf16 params)."""
        if key != "master" or saved not in MASTER_CHOICES:
            return False
        try:
            return all(
                resolve_weight_format(saved, p.dtype) is resolve_weight_format(group["master"], p.dtype)
                for p in group["params"]
            )
        except ValueError:
            return False

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by the same kind of optimizer in the same modes.

        Everything is checked first; on any mismatch (groups, shapes, dtypes, ``master=``/``states=``
        modes) a ValueError says what differs and the optimizer is left unchanged. Loaded tensors are
        copied, so the given dict is never modified by later steps. The stochastic-rounding ``seed`` and
        the ``nonfinite_skipped`` count are restored from the state dict too.
        """
        self._settle_step_verdicts()  # the last planned CUDA step's skips are counted first
        self._step_plan = None  # it refers to the states being replaced
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups' (from optimizer.state_dict())")
        seed = state_dict.get("leanopt", {}).get("seed", self.seed)  # stochastic rounding resumes its noise
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"state_dict['leanopt']['seed'] must be an int, got {seed!r}")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} param groups, this optimizer has {len(self.param_groups)}"
            )
        id_map: dict[Any, tuple[Tensor, dict[str, Any]]] = {}
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups, strict=True)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param group {gi}: state_dict has {len(saved['params'])} params, this optimizer has "
                    f"{len(group['params'])}"
                )
            for key in ("master", "states"):
                if key not in saved:
                    raise ValueError(
                        f"param group {gi} has no {key!r}: this state dict was not saved by a leanopt optimizer"
                    )
                if saved[key] != group[key] and not self._same_master(key, saved[key], group):
                    raise ValueError(
                        f"param group {gi}: state_dict was saved with {key}={saved[key]!r}, this optimizer "
                        f"uses {key}={group[key]!r}; build the optimizer with {key}={saved[key]!r}"
                    )
            merged = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            try:
                self._check_group(merged)
            except ValueError as err:
                raise ValueError(f"param group {gi} in state_dict: {err}") from None
            id_map.update({pid: (p, merged) for pid, p in zip(saved["params"], group["params"], strict=True)})
        new_state: dict[Tensor, dict[str, Any]] = defaultdict(dict)
        for pid, saved_state in state_dict["state"].items():
            if pid not in id_map:
                raise ValueError(f"state_dict has state for parameter {pid!r}, which no param group lists")
            p, group = id_map[pid]
            if not saved_state:
                continue
            layout = self._expected_layout(p, group)
            saved_state = self._upgrade_saved_state(p, group, saved_state)
            got = {k for k, v in saved_state.items()}
            if got != set(layout):
                raise ValueError(
                    f"parameter {pid}: state_dict holds {sorted(got)}, expected {sorted(layout)} for a "
                    f"{p.dtype} parameter with master={group['master']!r}, states={group['states']!r}"
                )
            for key, (dtype, shape) in layout.items():
                value = saved_state[key]
                if not isinstance(value, Tensor):
                    raise ValueError(f"parameter {pid}: state {key!r} must be a tensor, got {type(value).__name__}")
                if value.dtype != dtype or tuple(value.shape) != shape:
                    raise ValueError(
                        f"parameter {pid}: state {key!r} is {value.dtype} of shape {tuple(value.shape)}, "
                        f"expected {dtype} of shape {shape}"
                    )
            # private copies; for a DTensor (FSDP2) parameter, sharded like it
            new_state[p] = {
                k: _shards.state_value_for(p, v, layout[k][1], on_cpu=k == "step") for k, v in saved_state.items()
            }
            if not _shards.is_dtensor(p):
                for k, v in new_state[p].items():
                    # A state shaped like its parameter is laid out like it, as a new one is (a channels_last
                    # weight's states saved from a contiguous model, or the reverse, keep the native kernels;
                    # docs/kernels.md, "Dense layouts"). Quantised codes and scales stay as saved (contiguous).
                    if v.shape == p.shape and v.stride() != p.stride() and not k.endswith((".codes", ".scales")):
                        new_state[p][k] = torch.empty_like(p, dtype=v.dtype, device=v.device).copy_(v)
        # All checks passed: apply.
        for group, saved in zip(self.param_groups, saved_groups, strict=True):
            for key, value in saved.items():
                if key != "params":
                    group[key] = copy.deepcopy(value)
        self.state = new_state
        meta = state_dict.get("leanopt", {})
        self.nonfinite_skipped = int(meta.get("nonfinite_skipped", 0))
        self.seed = seed

    def _upgrade_saved_state(self, p: Tensor, group: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
        """``saved`` as the state format holds it now (``StateFormat.upgrade_saved``: int8/int4 quantise
        the fp32 conv-weight states leanopt 0.1.0 kept); the caller checks the result. Not for FSDP2."""
        if _shards.is_dtensor(p):
            return saved
        _, sfmt = self.formats(p, group)
        for spec in self.rule.states(group):
            saved = sfmt.upgrade_saved(spec.name, saved, p.detach(), spec.signed)
        return saved


def _binding(rule: Rule, doc: str) -> Callable[[type], type]:
    def decorate(cls: type) -> type:
        cls.rule = rule
        cls.__doc__ = doc + "\n\n" + (LeanOptimizer.__doc__ or "")
        return cls

    return decorate


@_binding(SGDRule(), "SGD with momentum, dampening, Nesterov and L2 weight decay, as torch.optim.SGD.")
class SGD(LeanOptimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(
            params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, **options,
        )  # fmt: skip


@_binding(AdamRule(), "Adam with L2 weight decay added to the gradient, as torch.optim.Adam.")
class Adam(LeanOptimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, **options,
        )  # fmt: skip


@_binding(AdamWRule(), "AdamW: Adam with decoupled weight decay, as torch.optim.AdamW.")
class AdamW(Adam):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, **options)


@_binding(LionRule(), "Lion (Chen et al. 2023) with decoupled weight decay; the paper's defaults.")
class Lion(LeanOptimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize, **options)
