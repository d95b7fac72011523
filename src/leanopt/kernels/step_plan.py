"""Whole-step plans: a CPU ``step()`` that repeats the previous one costs one native call, not a Python
pass per tensor.

After a step in which every parameter's update ran in a native kernel (:func:`build`), the optimizer
keeps what that step prepared: each tensor's kernel, pointer array (only the gradient slot changes),
step counter and the weak references and addresses of its state tensors. The next ``step()``
(:func:`run`) checks in Python only what could have changed since (the same parameters have gradients,
each gradient's layout, dtype and shape, each state tensor the same object at the same address, each
group's hyper-parameters valid and giving the same kernel), fills the hyper-parameter arrays once per
group, and makes one native call (``lo_step_all``) that checks every gradient for NaN/inf, checks every
step counter, and only then writes the gradient addresses, advances the counters and runs every
update. Anything unexpected (a non-finite gradient, a counter changed from outside, a new state)
makes :func:`run` return False with nothing changed, and ``step()`` takes its general path, which
decides as it always does (skip, raise, rebuild) and makes a new plan.

The arithmetic is that of the general path: the same kernels on the same pointers with the same
hyper-parameter values (tests/test_step_plan.py compares bits). Measured on 500 tensors of 64x64:
``python benchmarks/kernels.py --workloads many-small --steps 10 --rounds 3``.
"""

from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import distributed as _shards
from ..formats import noise as _noise
from . import native as _native
from . import plan_check as _plan_check

_STEP_ALL_SOURCE = (
    _native.LO_SIDE_C
    + r"""
#include <stdlib.h>
typedef void (*lo_step_fn)(int64_t, int64_t, void **, const float *, int);
typedef void (*lo_side_fn)(int64_t, int64_t, void **, const float *, int, lo_side *);
typedef struct { int64_t size, t; } lo_big;
static int lo_larger_first(const void *a, const void *b) {
  const lo_big *x = (const lo_big *)a, *y = (const lo_big *)b;
  if (x->size != y->size) return x->size < y->size ? 1 : -1;
  return (x->t > y->t) - (x->t < y->t);
}
/* One optimizer step from a whole-step plan. First every step counter is compared with the value the
   plan expects (expect[seg[t]], seg[t]: tensor t's param group and step count): -1 if one differs. With
   check == 2 ("raise") every gradient is checked for NaN/inf first: -2 if one is not finite. Nothing has
   changed in either case. Then each tensor, with check == 1 ("skip"), is checked before its update:
   ok[t] = 0 and no change for a non-finite one; with check == 3 the verdicts are given in ok[] (an FSDP2
   step's, all-reduced over the ranks): a tensor whose ok[t] is 0 is left alone. Returns the number of
   tensors skipped. Large tensors
   one after the other, largest first, each split over the threads, the next one's gradient checked
   during the update before it where the kernel can (fns[count + t]: its lo_step_side, else 0): the
   check's loads then overlap that update's arithmetic instead of taking a pass of their own, and the
   one check that takes its own pass is the largest tensor's, so no update carries the check of a
   larger one; small ones one per thread. */
int lo_step_all(int64_t count, void **grads, const int64_t *sizes, const uint32_t *masks, int check,
                float **counters, const int32_t *seg, const float *expect, const int64_t *slot,
                void **fns, const int64_t *rows, const int64_t *ns, void ***ptrs, const float **scalars,
                int8_t *ok, int threads, int64_t small) {
  for (int64_t t = 0; t < count; t++) if (*counters[t] != expect[seg[t]]) return -1;
  if (check == 2) {
    lo_all_finite_many(count, grads, sizes, masks, ok, threads);
    for (int64_t t = 0; t < count; t++) if (!ok[t]) return -2;
  }
  int64_t skipped = 0, known = -1;  /* known: the tensor whose check ran during the previous update */
  int known_ok = 0;
  int64_t nl = 0;
  for (int64_t t = 0; t < count; t++) nl += rows[t] * ns[t] >= small;
  lo_big few[64], *order = nl <= 64 ? few : (lo_big *)malloc((size_t)nl * sizeof(lo_big));
  if (!order) return -1;  /* nothing changed: the general path takes this step */
  for (int64_t t = 0, k = 0; t < count; t++)
    if (rows[t] * ns[t] >= small) order[k++] = (lo_big){sizes[t], t};
  qsort(order, (size_t)nl, sizeof(lo_big), lo_larger_first);
  for (int64_t k = 0; k < nl; k++) {
    const int64_t t = order[k].t;
    if (check == 3) { /* the verdict given */ }
    else if (check != 1) ok[t] = 1;
    else if (known == t) ok[t] = (int8_t)known_ok;
    else ok[t] = (int8_t)lo_all_finite(grads[t], sizes[t], (masks[t] & 1u) ? 32 : 16, masks[t] & ~1u, threads);
    if (!ok[t]) { skipped++; continue; }
    ptrs[t][slot[t]] = grads[t];
    *counters[t] += 1.0f;
    const int64_t u = k + 1 < nl ? order[k + 1].t : -1;
    if (check == 1 && u >= 0 && fns[count + t]) {
      lo_side side = {grads[u], sizes[u], masks[u], 0, 0};
      ((lo_side_fn)fns[count + t])(rows[t], ns[t], ptrs[t], scalars[t], threads, &side);
      known = u;
      known_ok = !side.bad;
    } else {
      ((lo_step_fn)fns[t])(rows[t], ns[t], ptrs[t], scalars[t], threads);
    }
  }
  if (order != few) free(order);
  #pragma omp parallel for schedule(dynamic, 4) num_threads(threads) if(count > 8) reduction(+:skipped)
  for (int64_t t = 0; t < count; t++) {
    if (rows[t] * ns[t] >= small) continue;
    if (check != 3) ok[t] = check != 1 || lo_one(grads[t], sizes[t], masks[t]);
    if (!ok[t]) { skipped++; continue; }
    ptrs[t][slot[t]] = grads[t];
    *counters[t] += 1.0f;
    if (rows[t] * ns[t] > 0) ((lo_step_fn)fns[t])(rows[t], ns[t], ptrs[t], scalars[t], 1);
  }
  return (int)skipped;
}
/* lo_step_all of one tensor (gradient release's hooks), its 17 arguments packed in one array: one
   argument to convert per call instead of 17 (~3 us of ctypes) */
int lo_step_one(const int64_t *a) {
  return lo_step_all(a[0], (void **)a[1], (const int64_t *)a[2], (const uint32_t *)a[3], (int)a[4],
                     (float **)a[5], (const int32_t *)a[6], (const float *)a[7], (const int64_t *)a[8],
                     (void **)a[9], (const int64_t *)a[10], (const int64_t *)a[11], (void ***)a[12],
                     (const float **)a[13], (int8_t *)a[14], (int)a[15], a[16]);
}
"""
)

_CHECKS = {"ignore": 0, "skip": 1, "raise": 2}  # lo_step_all's check, per nonfinite mode
_FN: list[Any] = []


def _step_all() -> Any:
    """The compiled ``lo_step_all`` (None if it cannot be built)."""
    if not _FN:
        c = ctypes
        args = [c.c_int64, c.c_void_p, c.c_void_p, c.c_void_p, c.c_int, c.c_void_p, c.c_void_p, c.c_void_p,
                c.c_void_p, c.c_void_p, c.c_void_p, c.c_void_p, c.c_void_p, c.c_void_p, c.c_void_p, c.c_int,
                c.c_int64]  # fmt: skip
        source = _native._FINITE_SOURCE + _STEP_ALL_SOURCE
        try:
            every = _native.build(source, "lo_step_all", args, c.c_int).fn
            _FN.append((every, _native.build(source, "lo_step_one", [c.c_void_p], c.c_int).fn))
        except (_native.BuildError, OSError):
            _FN.append(None)
    return _FN[0] and _FN[0][0]


def _step_one() -> Any:
    """The compiled ``lo_step_one`` (None if it cannot be built)."""
    return _step_all() and _FN[0][1]


@dataclass(slots=True)
class Segment:
    """Tensors of one param group whose step counters agree: one hyper-parameter array."""

    group: dict
    flags: tuple
    states: tuple
    formats: tuple  # (master, states) of the group
    expect: float  # the counters' value before the next step
    scalars: Any  # ctypes float array, refilled each step (its address is in the plan's scalars)


@dataclass(slots=True)
class _StepAllArrays:
    """The per-tensor ctypes arrays ``lo_step_all`` reads (whole-step and per-parameter plans)."""

    sizes: Any
    masks: Any
    counters: Any
    seg: Any
    expect: Any  # per segment: the step counters' value before the next step
    slot: Any
    fns: Any
    rows: Any
    ns: Any
    ptrs: Any
    scalars: Any
    ok: Any  # per tensor: its gradient was finite (written by the native call)


@dataclass(slots=True)
class StepPlan(_StepAllArrays):
    signature: tuple
    mode: tuple  # (kernel, nonfinite) of the optimizer
    form: Any
    segments: list[Segment]
    # per tensor, in step order
    state_ids: list[int]
    refs: list[tuple]
    param_ptrs: list[int]
    shapes: list[torch.Size]
    layouts: list  # None (contiguous) or the strides of a dense non-contiguous parameter (see _valid)
    grad_dtypes: list[torch.dtype]
    count: int  # tensors in the native call's arrays
    kernels: list  # kept alive: their code is what fns points to
    keep: list  # the pointer arrays (kept alive: ptrs holds their addresses)
    device_index: int = -1  # for _valid: every gradient on the CPU
    #: stochastic rounding: (pointer array, its key slot, parameter index, segment) per such tensor; the
    #: key of each update (formats/noise.py) is written there before the native call
    noise: list = field(default_factory=list)
    checker: Any = None  # plan_check.Checker (made at the first check), or False: the check in Python
    #: FSDP2 (as kernels.gpu.GpuStepPlan's): the mesh of every parameter (None: plain tensors), and per
    #: tensor the mesh and placements its gradient must have; the NaN/inf verdicts of the local gradients
    #: are all-reduced over the mesh before the native call, which then reads them (check 3)
    mesh: Any = None
    meshes: list = field(default_factory=list)
    placements: list = field(default_factory=list)


def _signature(groups: list[dict]) -> tuple[tuple, list[Tensor], list[Tensor]]:
    """What must match for a plan to apply, and the parameters with a gradient and their gradients, in
    step order."""
    params = [p for g in groups for p in g["params"]]
    grads = [p.grad for p in params]
    sig = (tuple(map(id, groups)), tuple(len(g["params"]) for g in groups), tuple(map(id, params)),
           tuple(g is None for g in grads))  # fmt: skip
    live = [p for p, g in zip(params, grads, strict=True) if g is not None]
    return sig, live, [g for g in grads if g is not None]


def build(opt: Any, work: list[tuple[Tensor, dict]], jobs: list, mesh: Any = None) -> StepPlan | None:
    """The plan of the step that has just run ``jobs`` for ``work`` (one launch per item, in order), or
    None when that step is not one a plan can repeat (a tensor updated elsewhere or skipped, a step
    counter that is not a plain fp32 tensor). ``mesh``: FSDP2, every parameter a DTensor on this device
    mesh whose gradient is placed like it (:func:`sharded`); ``jobs`` then update their local rows."""
    if not jobs or len(jobs) != len(work) or _step_all() is None:
        return None
    if any(j.counter is None for j in jobs):
        return None
    form = _native._fused_form()(opt.rule)
    if form is None:
        return None
    sig, _, grads = _signature(opt.param_groups)
    if len(grads) != len(jobs):
        return None
    params, meshes, placements, rows = [p for p, _ in work], [], [], [j.refs for j in jobs]
    if mesh is not None:
        parts = sharded(opt, work, grads, rows, mesh)
        if parts is None:
            return None
        params, grads, meshes, placements, rows = parts
    segments: list[Segment] = []
    index: dict[tuple[int, float], int] = {}
    seg_of = []
    for (_, group), job in zip(work, jobs, strict=True):
        value = job.counter[1].value  # after this step
        key = (id(group), value)
        if key not in index:
            index[key] = len(segments)
            floats = form.scalars(group, value)
            segments.append(Segment(group, form.flags(group), tuple(opt.rule.states(group)),
                                    (group["master"], group["states"]), value,
                                    (ctypes.c_float * len(floats))(*floats)))  # fmt: skip
        seg_of.append(index[key])
    count = len(jobs)
    specs = [_native._EXPONENT_MASKS.get(g.dtype) for g in grads]
    if any(sp is None for sp in specs):
        return None
    c = ctypes
    return StepPlan(
        signature=sig,
        mode=(opt.kernel, opt.nonfinite),
        form=form,
        segments=segments,
        state_ids=[id(opt.state.get(p)) for p, _ in work],
        refs=[(*row, ("step", j.counter[0], j.counter[2])) for row, j in zip(rows, jobs, strict=True)],  # + step
        param_ptrs=[p.data_ptr() for p in params],
        shapes=[p.shape for p in params],
        layouts=layouts([(p, None) for p in params]),
        grad_dtypes=[g.dtype for g in grads],
        count=count,
        sizes=(c.c_int64 * count)(*[g.numel() for g in grads]),
        masks=(c.c_uint32 * count)(*[sp[1] | (sp[0] == 32) for sp in specs]),  # type: ignore[index]
        counters=(c.c_void_p * count)(*[j.counter[2] for j in jobs]),
        seg=(c.c_int32 * count)(*seg_of),
        expect=(c.c_float * len(segments))(*[s.expect for s in segments]),
        slot=(c.c_int64 * count)(*[j.slot for j in jobs]),
        # lo_step, then lo_step_side (0: none) of each tensor's kernel
        fns=(c.c_void_p * (2 * count))(
            *[c.cast(j.kernel.fn, c.c_void_p).value for j in jobs], *[j.kernel.side or None for j in jobs]
        ),  # fmt: skip
        rows=(c.c_int64 * count)(*[j.rows for j in jobs]),
        ns=(c.c_int64 * count)(*[j.n for j in jobs]),
        ptrs=(c.c_void_p * count)(*[c.addressof(j.ptrs) for j in jobs]),
        scalars=(c.c_void_p * count)(*[c.addressof(segments[s].scalars) for s in seg_of]),
        ok=(c.c_int8 * count)(),
        kernels=[j.kernel for j in jobs],
        keep=[j.ptrs for j in jobs],
        noise=[
            (j.ptrs, len(j.ptrs) - 2, opt.param_index(p), seg_of[t])
            for t, ((p, _), j) in enumerate(zip(work, jobs, strict=True))
            if j.random
        ],  # fmt: skip
        mesh=mesh,
        meshes=meshes,
        placements=placements,
    )


def sharded(
    opt: Any, work: list[tuple[Tensor, dict]], grads: list[Tensor], refs: list[tuple], mesh: Any
) -> tuple | None:
    """An FSDP2 plan's view of its step (CPU and CUDA plans): (the parameters' local tensors, the
    gradients' local tensors, each parameter's mesh and placements, ``refs`` rows rewritten to the state
    DTensors), or None when not every parameter and gradient is a DTensor on a mesh equal to ``mesh``
    with its gradient placed like it. ``refs``: per parameter, the (state key, weakref, address) of the
    local state tensors its kernel reads; the plan's check reads the state dict's DTensors, so their
    weak references are kept instead, at the same (local) addresses."""
    params = [p for p, _ in work]
    if not all(_shards.is_dtensor(t) and t.device_mesh == mesh for t in params + grads):
        return None
    meshes, placements = [p.device_mesh for p in params], [p.placements for p in params]
    if any(g.placements != pl for g, pl in zip(grads, placements, strict=True)):
        return None
    rows = []
    for p, row in zip(params, refs, strict=True):
        state = opt.state[p]
        row = tuple((k, weakref.ref(state[k]), ptr) for k, _, ptr in row)
        if any(_shards.local(r()).data_ptr() != ptr for _, r, ptr in row):
            return None
        rows.append(row)
    return [_shards.local(p) for p in params], [_shards.local(g) for g in grads], meshes, placements, rows


def layouts(work: list[tuple[Tensor, dict]]) -> list:
    """Per parameter: None if contiguous, else its strides (what the plan's kernels were built for)."""
    return [None if p.is_contiguous() else p.stride() for p, _ in work]


def _valid(plan: Any, opt: Any, params: list[Tensor], grads: list[Tensor]) -> bool:
    """Whether nothing the plan relies on has changed (only reads). Also for kernels.gpu.GpuStepPlan;
    for an FSDP2 one (``plan.mesh``) each gradient must be a DTensor on that mesh with the planned
    placements, and the checks below read the local tensors of gradients, parameters and states."""
    mesh = getattr(plan, "mesh", None)
    local, owners = _shards.local, params  # owners: the parameters the state is kept under
    if mesh is not None:
        dtensor = _shards._dtensor_type()
        for g, m, placements in zip(grads, plan.meshes, plan.placements, strict=True):
            if type(g) is not dtensor or g.device_mesh != m or g.placements != placements:
                return False
        grads = [g._local_tensor for g in grads]
        params = [p._local_tensor for p in params]
    strided = torch.strided
    # layouts: None, contiguous; else the strides of a dense non-contiguous parameter (channels_last),
    # which its gradient must have too (native.same_layout)
    for g, dtype, shape, layout in zip(grads, plan.grad_dtypes, plan.shapes, plan.layouts, strict=True):
        if type(g) is not Tensor or g.layout is not strided or g.dtype is not dtype or g.shape != shape:
            return False
        if g.get_device() != plan.device_index or (plan.device_index == -1 and not g.is_cpu):  # (meta: -1 too)
            return False
        if not (g.is_contiguous() if layout is None else g.stride() == layout):
            return False
    state = opt.state
    for i, p in enumerate(params):
        if p.data_ptr() != plan.param_ptrs[i] or p.shape != plan.shapes[i]:
            return False
        if not (p.is_contiguous() if plan.layouts[i] is None else p.stride() == plan.layouts[i]):
            return False
        st = state.get(owners[i])
        if id(st) != plan.state_ids[i]:
            return False
        for k, ref, ptr in plan.refs[i]:
            t = ref()
            if t is None or st.get(k) is not t or (t if mesh is None else local(t)).data_ptr() != ptr:
                return False
    return _valid_groups(plan, opt)


def _valid_groups(plan: Any, opt: Any) -> bool:
    """The part of :func:`_valid` per param group: hyper-parameters valid, the same formats and flags."""
    for seg in plan.segments:
        group = seg.group
        try:
            opt._check_group(group)
        except ValueError:
            return False  # the general path raises it, naming the group
        if (group["master"], group["states"]) != seg.formats or tuple(opt.rule.states(group)) != seg.states:
            return False
        if plan.form.flags(group) != seg.flags:
            return False
    return True


def run(plan: StepPlan, opt: Any) -> list[int] | None:
    """One ``step()`` of ``opt`` by ``plan``: the indices of the parameters skipped for a non-finite
    gradient (``nonfinite="skip"``; the plan no longer applies after a skip), or None, with nothing
    changed, when the plan does not apply or the native call declined (a step counter changed from
    outside, a non-finite gradient under ``nonfinite="raise"``): then the general path runs."""
    if (opt.kernel, opt.nonfinite) != plan.mode:
        return None
    checked = _plan_check.check(plan, opt)
    if checked is None:
        return None
    params, grad_ptrs = checked
    fn = _step_all()
    steps = []
    for s, seg in enumerate(plan.segments):
        step = ctypes.c_float(seg.expect + 1.0).value  # float32 + 1, as the counters advance
        seg.scalars[:] = plan.form.scalars(seg.group, step)
        plan.expect[s] = seg.expect
        steps.append(step)
    gptrs = grad_ptrs if isinstance(grad_ptrs, ctypes.Array) else (ctypes.c_void_p * plan.count)(*grad_ptrs)
    for ptrs, slot, index, s in plan.noise:  # stochastic rounding: this update's key
        ptrs[slot] = _noise.key(opt.seed, index, int(steps[s]))
    check = _CHECKS[opt.nonfinite]
    if plan.mesh is not None and check:  # FSDP2: every rank's verdicts first, then the call reads them
        check = _sharded_verdicts(plan, opt, params, gptrs)
        if check is None:
            return None
    rc = fn(plan.count, gptrs, plan.sizes, plan.masks, check, plan.counters, plan.seg, plan.expect, plan.slot,
            plan.fns, plan.rows, plan.ns, plan.ptrs, plan.scalars, plan.ok, torch.get_num_threads(),
            _native.SMALL_TENSOR)  # fmt: skip
    if rc < 0:
        return None
    for seg, step in zip(plan.segments, steps, strict=True):
        seg.expect = step
    for kernel in plan.kernels:
        kernel.calls += 1
    if rc == 0:
        return []
    return [opt.param_index(p) for p, ok in zip(params, plan.ok, strict=True) if not ok]


def _sharded_verdicts(plan: StepPlan, opt: Any, params: list[Tensor], gptrs: Any) -> int | None:
    """An FSDP2 plan's NaN/inf verdicts, into ``plan.ok``: each local gradient checked (one native call),
    the int32 flags all-reduced over the mesh (the minimum: a NaN or inf in any rank's rows), as the
    general path's ``distributed.finite_checks`` does with the same tensors in the same order, so that
    ranks on either path make the same collective. Returns ``lo_step_all``'s check for given verdicts
    (3), or None before any all-reduce when the plan cannot go on (a step counter changed from outside,
    no native check): the general path then makes that all-reduce. With ``nonfinite="raise"`` a bad
    verdict raises here, nothing changed (falling back would all-reduce a second time)."""
    fn, counters = _native.finite_many_fn(), _plan_check._function("lo_counters")
    if fn is None or counters is None or not counters(plan.count, plan.counters, plan.seg, plan.expect, 0):
        return None
    fn(plan.count, gptrs, plan.sizes, plan.masks, plan.ok, torch.get_num_threads())
    flags = _shards.all_ranks_min(torch.frombuffer(plan.ok, dtype=torch.int8).to(torch.int32), plan.mesh)
    if opt.nonfinite == "raise" and not bool(flags.all()):
        bad = int((flags == 0).nonzero()[0])
        raise FloatingPointError(f"non-finite gradient for parameter {opt.param_index(params[bad])}")
    plan.ok[:] = flags.tolist()
    return 3


# ---------------------------------------------------------------------------------------------------
# One parameter's plan: gradient release's hooks (release.py) update one parameter at a time, each
# through the general path's ~50 us of Python (checks, state, formats, dispatch) before its kernel.
# After a hook's update ran in a native kernel, its plan repeats it: the checks of :func:`_valid` for
# that one tensor, its param group's formats and flags once per backward (the hooks' ``cache``), and
# ``lo_step_all`` with a count of one (NaN/inf check, step counter check and advance, the kernel).


@dataclass(slots=True)
class ParamPlan(_StepAllArrays):
    mode: tuple  # (kernel, nonfinite) of the optimizer
    form: Any
    group_id: int
    group_key: tuple  # (formats, states, flags) of the group when planned
    state_id: int
    refs: tuple  # (state key, weakref, address) of every state tensor, the step tensor last
    param_ptr: int
    shape: torch.Size
    layout: Any  # None (contiguous) or the parameter's strides
    grad_dtype: torch.dtype
    kernel: Any  # native.Kernel: its code is what fns points to
    keep: Any  # the pointer array (fns' kernel reads it; the general path shares it: native._PLANS)
    grads: Any  # lo_step_all's arrays here have one element each
    packed: Any = None  # lo_step_one's argument: the 17 arguments of lo_step_all (CHECK, THREADS per call)
    noise: tuple | None = None  # stochastic rounding: (key slot in ``keep``, parameter index)


CHECK, THREADS = 4, 15  # the places in ParamPlan.packed that change per call


def _group_key(opt: Any, form: Any, group: dict) -> tuple:
    return (group["master"], group["states"]), tuple(opt.rule.states(group)), form.flags(group)


def param_plan(opt: Any, param: Tensor, group: dict, grad: Tensor) -> Any:
    """The plan of the update of ``param`` from ``grad`` that has just run, or None when it did not run
    in a native kernel a plan can repeat (another executor, a sharded or non-CPU tensor, a step counter
    that is not a plain fp32 tensor). Only reads."""
    from .. import distributed as _shards
    from . import gpu as _gpu

    if opt.kernel == "reference":
        return None
    if _gpu.wanted(opt.kernel, param.device):  # the CUDA kernels' path: its own plan
        return None if _shards.is_dtensor(param) else _gpu.param_plan(opt, param, group, grad)
    if param.device.type != "cpu":
        return None
    if _shards.is_dtensor(param) or type(grad) is not Tensor or _step_all() is None:
        return None
    spec = _native._EXPONENT_MASKS.get(grad.dtype)
    form = _native._fused_form()(opt.rule)
    state = opt.state.get(param)
    cached = _native._PLANS.get(id(state)) if state is not None else None
    if spec is None or form is None or cached is None:
        return None
    check, kspec, kernel, refs, ptrs, counter = cached
    if counter is None or counter[0]() is not state.get("step"):
        return None
    wfmt, sfmt = opt.formats(param, group)
    now = (opt.rule, wfmt, sfmt, form.flags(group), grad.dtype, param.dtype, param.shape, param.data_ptr(),
           param.stride(), param.device)  # fmt: skip
    if check != now or not _native.same_tensors(refs, state):
        return None  # the native plan cached for this state is not this update's
    rows, n = _native.kernel_rows(param.shape)
    c = ctypes
    plan = ParamPlan(
        mode=(opt.kernel, opt.nonfinite),
        form=form,
        group_id=id(group),
        group_key=_group_key(opt, form, group),
        state_id=id(state),
        refs=(*refs, ("step", counter[0], counter[2])),
        param_ptr=param.data_ptr(),
        shape=param.shape,
        layout=None if param.is_contiguous() else param.stride(),
        grad_dtype=grad.dtype,
        kernel=kernel,
        keep=ptrs,
        grads=(c.c_void_p * 1)(),
        sizes=(c.c_int64 * 1)(grad.numel()),
        masks=(c.c_uint32 * 1)(spec[1] | (spec[0] == 32)),
        counters=(c.c_void_p * 1)(counter[2]),
        seg=(c.c_int32 * 1)(0),
        expect=(c.c_float * 1)(counter[1].value),
        slot=(c.c_int64 * 1)(len(kspec.weight.ctypes_)),
        fns=(c.c_void_p * 2)(c.cast(kernel.fn, c.c_void_p).value, None),  # no next tensor: no side check
        rows=(c.c_int64 * 1)(rows),
        ns=(c.c_int64 * 1)(n),
        ptrs=(c.c_void_p * 1)(c.addressof(ptrs)),
        scalars=(c.c_void_p * 1)(),
        ok=(c.c_int8 * 1)(),
        noise=(len(ptrs) - 2, opt.param_index(param)) if kspec.weight.random else None,
    )
    arrays = (plan.grads, plan.sizes, plan.masks, 0, plan.counters, plan.seg, plan.expect, plan.slot, plan.fns,
              plan.rows, plan.ns, plan.ptrs, plan.scalars, plan.ok)  # fmt: skip
    plan.packed = (c.c_int64 * 17)(1, *(a if isinstance(a, int) else c.addressof(a) for a in arrays), 0,
                                   _native.SMALL_TENSOR)  # fmt: skip
    return plan


def applies(plan: Any, opt: Any, param: Tensor, grad: Tensor, group: dict, cache: dict, device: Any = None) -> Any:
    """The checks a per-parameter plan (ParamPlan, or gpu.GpuParamPlan with its ``device``; None: the
    CPU) makes before it runs: the parameter's state if nothing the plan relies on has changed (the
    gradient's type, layout, dtype, shape and device; the parameter's storage, shape and layout; its
    state dict and state tensors; its group and the group's formats and flags, once per backward in
    ``cache``), else None. Only reads."""
    if (opt.kernel, opt.nonfinite) != plan.mode or id(group) != plan.group_id:
        return None
    g = grad
    if type(g) is not Tensor or g.layout is not torch.strided or g.dtype is not plan.grad_dtype:
        return None
    if g.shape != plan.shape or not (g.is_cpu if device is None else g.device == device):
        return None
    layout = plan.layout
    if not (g.is_contiguous() if layout is None else g.stride() == layout):
        return None
    if param.data_ptr() != plan.param_ptr or param.shape != plan.shape:
        return None
    if not (param.is_contiguous() if layout is None else param.stride() == layout):
        return None
    state = opt.state.get(param)
    if id(state) != plan.state_id or not _native.same_tensors(plan.refs, state):
        return None
    key = cache.get(plan.group_id)
    if key is None:
        key = cache[plan.group_id] = _group_key(opt, plan.form, group)
    return state if key == plan.group_key else None


def run_param(plan: ParamPlan, opt: Any, param: Tensor, grad: Tensor, group: dict, cache: dict) -> bool | None:
    """Update ``param`` from ``grad`` by its ``plan``: True when updated, False when skipped for a
    non-finite gradient (``nonfinite="skip"``: nothing changed, as on the general path), None (nothing
    changed) when the plan does not apply or the native call declined (a step counter changed from
    outside, a non-finite gradient under "raise"): then the general path runs. ``cache`` holds what is
    the same for every hook of one backward (the groups' formats and flags, hyper-parameter arrays);
    the caller empties it when a backward begins, after checking every group's hyper-parameters. A plan
    of the CUDA kernels' path (gpu.GpuParamPlan) runs there."""
    if type(plan) is not ParamPlan:
        from . import gpu as _gpu

        return _gpu.run_param(plan, opt, param, grad, group, cache)
    if applies(plan, opt, param, grad, group, cache) is None:
        return None
    step = ctypes.c_float(plan.expect[0] + 1.0).value  # float32 + 1, as the counter advances
    values = cache.get((plan.group_id, step))
    if values is None:
        floats = plan.form.scalars(group, step)
        values = cache[plan.group_id, step] = (ctypes.c_float * len(floats))(*floats)
    plan.scalars[0] = ctypes.addressof(values)
    plan.grads[0] = grad.data_ptr()
    if plan.noise is not None:  # stochastic rounding: this update's key (formats/noise.py)
        plan.keep[plan.noise[0]] = _noise.key(opt.seed, plan.noise[1], int(step))
    packed = plan.packed
    packed[CHECK] = _CHECKS[opt.nonfinite]
    packed[THREADS] = torch.get_num_threads()
    rc = _step_one()(packed)
    if rc < 0:
        return None
    if rc:
        return False
    plan.expect[0] = step
    plan.kernel.calls += 1
    return True
