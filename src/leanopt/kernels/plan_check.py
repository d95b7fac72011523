"""The check that a kept whole-step plan still applies, as one C loop over the step's tensors.

A planned ``step()`` (kernels/step_plan.py on the CPU, kernels/gpu.py on CUDA) first checks everything
it relies on: the same param groups and parameters, each with or without a gradient as before, each
gradient a plain strided tensor of the planned dtype, shape, device and layout, each parameter at the
planned address in the planned layout, each state dict and state tensor the same object at the same
address (``step_plan._signature`` and ``step_plan._valid``). In Python that is ~20 attribute reads and
calls per tensor, most of a planned step's host time (``python benchmarks/gpu_host_overhead.py``,
``check_us_per_tensor``). Here the same reads run in one C function through CPython's C API: the same
torch getters and methods (``grad``, ``dtype``, ``shape``, ``data_ptr()``, ...) on the same objects in the
same order of decisions, without the interpreter between them. It also returns the live parameters and
writes the gradients' addresses, which both planned paths need next.

The C source declares the C-API functions it calls itself (no Python headers needed; all stable since
3.9 but ``_PyDict_GetItem_KnownHash``, CPython-internal, linked weakly: the state lookup by id) and is
built like the kernels (native.build, loaded with ``ctypes.PyDLL``, so the GIL is held). It is used on
CPython with a GIL where it builds; elsewhere (or with ``LEANOPT_PLAN_CHECK=python``) the Python check
runs. Both give the same answer: tests/test_step_plan.py runs every change a plan must refuse through
both. Any error inside (an attribute that raises) clears the error and answers "does not apply": the
general path then runs and raises or decides as it always does.
"""

from __future__ import annotations

import ctypes
import os
import sys
import sysconfig
from typing import Any

import torch
from torch import Tensor

from .. import distributed as _shards
from . import native as _native

_SOURCE = r"""
#include <stddef.h>
#include <stdint.h>
typedef struct _object PyObject;
typedef ptrdiff_t Py_ssize_t;
/* CPython's C API (exported by the interpreter; stable since 3.9) */
extern PyObject *PyObject_GetAttr(PyObject *, PyObject *);
extern PyObject *PyObject_VectorcallMethod(PyObject *, PyObject *const *, size_t, PyObject *);
extern PyObject *PyObject_CallNoArgs(PyObject *);
extern int PyObject_RichCompareBool(PyObject *, PyObject *, int);
extern PyObject *PyObject_Type(PyObject *);
extern PyObject *PyDict_GetItemWithError(PyObject *, PyObject *);
extern PyObject *PyList_New(Py_ssize_t);
extern Py_ssize_t PyList_Size(PyObject *);
extern PyObject *PyList_GetItem(PyObject *, Py_ssize_t);
extern int PyList_SetItem(PyObject *, Py_ssize_t, PyObject *);
extern Py_ssize_t PySequence_Size(PyObject *);
extern PyObject *PySequence_GetItem(PyObject *, Py_ssize_t);
extern long long PyLong_AsLongLong(PyObject *);
extern void Py_IncRef(PyObject *);
extern void Py_DecRef(PyObject *);
extern void PyErr_Clear(void);
extern PyObject *PyErr_Occurred(void);
/* CPython-internal, exported by 3.10-3.12 at least; weak: NULL where an interpreter does not export it */
extern PyObject *_PyDict_GetItem_KnownHash(PyObject *, PyObject *, Py_ssize_t) __attribute__((weak));

enum { N_GRAD, N_LAYOUT, N_DTYPE, N_SHAPE, N_DATA_PTR, N_IS_CONTIGUOUS, N_STRIDE, N_GET_DEVICE, N_IS_CPU, N_PARAMS,
       N_LOCAL, N_MESH, N_PLACEMENTS, N_COUNT };
typedef struct {
  PyObject *names[N_COUNT];                    /* interned attribute names */
  PyObject *none, *true_, *tensor_type, *strided;
  int64_t ngroups; const int64_t *group_ids, *group_lens;
  int64_t nparams; const int64_t *param_ids; const int8_t *has_grad;  /* every parameter, in step order */
  int64_t nlive;                               /* the parameters with a gradient, in step order: */
  PyObject *const *shapes, *const *layouts, *const *dtypes;  /* layout: None (contiguous) or strides */
  const int64_t *param_ptrs, *state_ids, *ref_start;         /* refs ref_start[i] .. ref_start[i+1]-1 */
  PyObject *const *keys, *const *refs; const int64_t *ref_ptrs;  /* (state key, weakref, address) */
  int64_t device;                              /* get_device() of every gradient (-1: the CPU) */
  /* FSDP2 plans (mesh not NULL): every gradient a DTensor (dtensor_type) on meshes[i] with placements[i];
     the checks above then read the local tensors of gradients, parameters and states */
  PyObject *mesh, *dtensor_type; PyObject *const *meshes, *const *placements;
} lo_plan;

static PyObject *call0(const lo_plan *c, int name, PyObject *self) {
  return PyObject_VectorcallMethod(c->names[name], &self, 1, NULL); }
static long long address(const lo_plan *c, PyObject *t) {  /* t.data_ptr(), -1 on error */
  PyObject *r = call0(c, N_DATA_PTR, t);
  if (!r) return -1;
  const long long v = PyLong_AsLongLong(r);
  Py_DecRef(r);
  return v; }
static int attr_is(const lo_plan *c, int name, PyObject *t, PyObject *want) {  /* t.<name> is want */
  PyObject *r = PyObject_GetAttr(t, c->names[name]);
  if (!r) return 0;
  const int ok = r == want;
  Py_DecRef(r);
  return ok; }
static int same(PyObject *r, PyObject *want) {  /* r == want (r: a new reference or NULL, released) */
  if (!r) return 0;
  const int ok = PyObject_RichCompareBool(r, want, 2 /* Py_EQ */) == 1;
  Py_DecRef(r);
  return ok; }
static int laid_out(const lo_plan *c, PyObject *t, PyObject *layout) {  /* contiguous, or these strides */
  if (layout == c->none) {
    PyObject *r = call0(c, N_IS_CONTIGUOUS, t);
    if (!r) return 0;
    const int ok = r == c->true_;
    Py_DecRef(r);
    return ok;
  }
  return same(call0(c, N_STRIDE, t), layout); }
/* An FSDP2 plan's t._local_tensor (a new reference; NULL on error); t itself (a new reference) if it is
   not a DTensor or the plan is not FSDP2's */
static PyObject *local_of(const lo_plan *c, PyObject *t) {
  if (!c->mesh) { Py_IncRef(t); return t; }
  PyObject *type = PyObject_Type(t);
  const int dt = type == c->dtensor_type;
  Py_DecRef(type);
  if (!dt) { Py_IncRef(t); return t; }
  return PyObject_GetAttr(t, c->names[N_LOCAL]); }
/* The local gradient of an FSDP2 plan's DTensor gradient g (a new reference) if it is on the planned
   mesh with the planned placements, else NULL */
static PyObject *sharded_grad(const lo_plan *c, int64_t i, PyObject *g) {
  PyObject *type = PyObject_Type(g);
  const int dt = type == c->dtensor_type;
  Py_DecRef(type);
  if (!dt || !same(PyObject_GetAttr(g, c->names[N_MESH]), c->meshes[i])) return NULL;  /* (identity first) */
  if (!same(PyObject_GetAttr(g, c->names[N_PLACEMENTS]), c->placements[i])) return NULL;
  return PyObject_GetAttr(g, c->names[N_LOCAL]); }
static int grad_ok(const lo_plan *c, int64_t i, PyObject *g) {  /* step_plan._valid's gradient checks */
  PyObject *type = PyObject_Type(g);
  const int plain = type == c->tensor_type;
  Py_DecRef(type);
  if (!plain || !attr_is(c, N_LAYOUT, g, c->strided) || !attr_is(c, N_DTYPE, g, c->dtypes[i])) return 0;
  if (!same(PyObject_GetAttr(g, c->names[N_SHAPE]), c->shapes[i])) return 0;
  PyObject *d = call0(c, N_GET_DEVICE, g);
  if (!d) return 0;
  const long long device = PyLong_AsLongLong(d);
  Py_DecRef(d);
  if (device != c->device || (c->device == -1 && !attr_is(c, N_IS_CPU, g, c->true_))) return 0;
  return laid_out(c, g, c->layouts[i]); }
/* state.get(p), borrowed. A torch tensor's hash is its id (Tensor.__hash__, a Python function): the
   lookup with that hash skips calling it; where it finds nothing (no such function here, or a type
   that hashes otherwise) the usual lookup decides. */
static PyObject *state_of(PyObject *state, PyObject *p) {
  if (_PyDict_GetItem_KnownHash) {
    PyObject *st = _PyDict_GetItem_KnownHash(state, p, (Py_ssize_t)(intptr_t)p);
    if (st || PyErr_Occurred()) return st;
  }
  return PyDict_GetItemWithError(state, p); }
static int param_ok(const lo_plan *c, int64_t i, PyObject *p, PyObject *state) {  /* and its states */
  PyObject *rows = local_of(c, p);  /* FSDP2: the local tensor */
  if (!rows) return 0;
  const int laid = address(c, rows) == c->param_ptrs[i] && same(PyObject_GetAttr(rows, c->names[N_SHAPE]), c->shapes[i])
                   && laid_out(c, rows, c->layouts[i]);
  Py_DecRef(rows);
  if (!laid) return 0;
  PyObject *st = state_of(state, p);
  if (!st || (int64_t)(intptr_t)st != c->state_ids[i]) return 0;
  Py_IncRef(st);  /* held while torch's code runs (another thread could drop it from opt.state) */
  int ok = 1;
  for (int64_t r = c->ref_start[i]; ok && r < c->ref_start[i + 1]; r++) {
    PyObject *t = PyObject_CallNoArgs(c->refs[r]);  /* the weakref's tensor, or None */
    if (!t) { ok = 0; break; }
    PyObject *lt = PyDict_GetItemWithError(st, c->keys[r]) == t ? local_of(c, t) : NULL;
    ok = lt && address(c, lt) == c->ref_ptrs[r];
    if (lt) Py_DecRef(lt);
    Py_DecRef(t);
  }
  Py_DecRef(st);
  return ok; }

/* The live parameters (a new list) if nothing the plan relies on has changed, with their gradients'
   addresses in grad_ptrs; else None (any error cleared). */
PyObject *lo_plan_check(const lo_plan *c, PyObject *groups, PyObject *state, int64_t *grad_ptrs) {
  PyObject *live = NULL, *params = NULL, *p = NULL, *g = NULL;
  int64_t k = 0, i = 0;
  if (PyList_Size(groups) != c->ngroups) goto refuse;
  live = PyList_New(c->nlive);
  if (!live) goto refuse;
  for (int64_t gi = 0; gi < c->ngroups; gi++) {
    PyObject *group = PyList_GetItem(groups, gi);  /* borrowed: groups is not changed below */
    if (!group || (int64_t)(intptr_t)group != c->group_ids[gi]) goto refuse;
    params = PyDict_GetItemWithError(group, c->names[N_PARAMS]);  /* a list (or another sequence) */
    if (!params) goto refuse;
    Py_IncRef(params);  /* held while torch's code runs (it could replace the group's list) */
    const Py_ssize_t n = PySequence_Size(params);
    if (n != c->group_lens[gi]) goto refuse;
    for (Py_ssize_t j = 0; j < n; j++, k++) {
      p = PySequence_GetItem(params, j);  /* a new reference */
      if (!p || k >= c->nparams || (int64_t)(intptr_t)p != c->param_ids[k]) goto refuse;
      g = PyObject_GetAttr(p, c->names[N_GRAD]);
      if (!g || (g != c->none) != c->has_grad[k]) goto refuse;
      if (g != c->none) {
        if (c->mesh && i < c->nlive) {  /* FSDP2: the checks below read the local gradient */
          PyObject *rows = sharded_grad(c, i, g);
          if (!rows) goto refuse;
          Py_DecRef(g);
          g = rows;
        }
        if (i >= c->nlive || !grad_ok(c, i, g)) goto refuse;
        const long long ptr = address(c, g);
        if (ptr == -1 || !param_ok(c, i, p, state)) goto refuse;
        grad_ptrs[i] = ptr;
        PyList_SetItem(live, i++, p);  /* steals the reference */
        p = NULL;
      }
      Py_DecRef(g);
      g = NULL;
      if (p) { Py_DecRef(p); p = NULL; }
    }
    Py_DecRef(params);
    params = NULL;
  }
  if (k != c->nparams || i != c->nlive) goto refuse;
  return live;
refuse:
  if (g) Py_DecRef(g);
  if (p) Py_DecRef(p);
  if (params) Py_DecRef(params);
  if (live) Py_DecRef(live);
  PyErr_Clear();
  Py_IncRef(c->none);
  return c->none;
}

/* A CUDA plan's step counters (fp32 on the host): write == 0, whether each *counters[t] equals
   values[seg[t]]; write == 1, set each to that. */
int lo_counters(int64_t n, float *const *counters, const int32_t *seg, const float *values, int write) {
  if (write) {
    for (int64_t t = 0; t < n; t++) *counters[t] = values[seg[t]];
    return 1;
  }
  for (int64_t t = 0; t < n; t++) if (*counters[t] != values[seg[t]]) return 0;
  return 1;
}

/* dst[pos[k]] = src[idx[k]] for k < n: a CUDA plan's gradient addresses (the check's grad_ptrs) into the
   rows of its launch tables (kernels/gpu.py, _PlanTable) */
void lo_scatter64(int64_t n, const int64_t *idx, const int64_t *pos, const int64_t *src, int64_t *dst) {
  for (int64_t k = 0; k < n; k++) dst[pos[k]] = src[idx[k]];
}
"""

_NAMES = tuple(sys.intern(s) for s in ("grad", "layout", "dtype", "shape", "data_ptr", "is_contiguous", "stride",
                                       "get_device", "is_cpu", "params", "_local_tensor", "device_mesh",
                                       "placements"))  # fmt: skip
_P = ctypes.c_void_p


class _Plan(ctypes.Structure):
    _fields_ = [("names", _P * len(_NAMES)), ("none", _P), ("true_", _P), ("tensor_type", _P), ("strided", _P),
                ("ngroups", ctypes.c_int64), ("group_ids", _P), ("group_lens", _P),
                ("nparams", ctypes.c_int64), ("param_ids", _P), ("has_grad", _P),
                ("nlive", ctypes.c_int64), ("shapes", _P), ("layouts", _P), ("dtypes", _P),
                ("param_ptrs", _P), ("state_ids", _P), ("ref_start", _P),
                ("keys", _P), ("refs", _P), ("ref_ptrs", _P), ("device", ctypes.c_int64),
                ("mesh", _P), ("dtensor_type", _P), ("meshes", _P), ("placements", _P)]  # fmt: skip


def available() -> bool:
    """Whether this interpreter can run the C check: CPython with a GIL, not turned off by
    ``LEANOPT_PLAN_CHECK=python``."""
    if os.environ.get("LEANOPT_PLAN_CHECK", "c") == "python":
        return False
    return sys.implementation.name == "cpython" and not sysconfig.get_config_var("Py_GIL_DISABLED")


_FN: list[Any] = []


def _function(name: str = "lo_plan_check") -> Any:
    """The compiled ``lo_plan_check``, ``lo_counters`` or ``lo_scatter64`` (None if they cannot be built or
    loaded here)."""
    if not _FN:
        c = ctypes
        try:
            check = _native.build(_SOURCE, "lo_plan_check", [_P, c.py_object, c.py_object, _P], c.py_object,
                                  python_api=True).fn  # fmt: skip
            counters = _native.build(_SOURCE, "lo_counters", [c.c_int64, _P, _P, _P, c.c_int], c.c_int,
                                     python_api=True).fn  # fmt: skip
            scatter = _native.build(_SOURCE, "lo_scatter64", [c.c_int64, _P, _P, _P, _P], None, python_api=True).fn
            _FN.append({"lo_plan_check": check, "lo_counters": counters, "lo_scatter64": scatter})
        except (_native.BuildError, OSError, AttributeError):
            _FN.append(None)
    return _FN[0] and _FN[0][name]


class Checker:
    """A plan's check in C: the plan's expectations as C arrays (built once per plan), and the Python
    objects whose addresses they hold, kept alive here."""

    def __init__(self, plan: Any, fn: Any) -> None:
        sig = plan.signature  # (group ids, group sizes, parameter ids, per parameter: no gradient)
        c, n = ctypes, len(plan.shapes)
        keys, refs, ptrs, start = [], [], [], [0]
        for row in plan.refs:
            for key, ref, ptr in row:
                keys.append(key)
                refs.append(ref)
                ptrs.append(ptr)
            start.append(len(keys))
        mesh = getattr(plan, "mesh", None)  # FSDP2: the mesh, the DTensor class, each gradient's placements
        dtensor = _shards._dtensor_type() if mesh is not None else None
        sharded = [list(getattr(plan, "meshes", [])), list(getattr(plan, "placements", []))]
        objects = [list(_NAMES), list(plan.shapes), list(plan.layouts), list(plan.grad_dtypes), keys, refs]
        self._keep = (objects, [None, True, Tensor, torch.strided, mesh, dtensor], sharded)
        arrays = [(_P * max(len(x), 1))(*map(id, x)) for x in [*objects, *sharded]]
        ints = [(c.c_int64 * max(len(x), 1))(*x) for x in (sig[0], sig[1], sig[2], plan.param_ptrs,
                                                           plan.state_ids, start, ptrs)]  # fmt: skip
        has_grad = (c.c_int8 * max(len(sig[3]), 1))(*[not none for none in sig[3]])
        self._arrays = (arrays, ints, has_grad)
        self.plan = _Plan(
            (_P * len(_NAMES))(*map(id, _NAMES)), id(None), id(True), id(Tensor), id(torch.strided),
            len(sig[0]), c.addressof(ints[0]), c.addressof(ints[1]),
            len(sig[2]), c.addressof(ints[2]), c.addressof(has_grad),
            n, *(c.addressof(a) for a in arrays[1:4]),
            c.addressof(ints[3]), c.addressof(ints[4]), c.addressof(ints[5]),
            c.addressof(arrays[4]), c.addressof(arrays[5]), c.addressof(ints[6]), plan.device_index,
            None if mesh is None else id(mesh), None if mesh is None else id(dtensor), c.addressof(arrays[6]),
            c.addressof(arrays[7]),
        )  # fmt: skip
        self.grad_ptrs = (c.c_int64 * max(n, 1))()
        self._fn = fn
        self._args = (c.byref(self.plan), self.grad_ptrs)
        views = getattr(plan, "counters", None)  # a CUDA plan: a C float over each step tensor
        if isinstance(views, list):
            self._counters = (_P * max(n, 1))(*map(c.addressof, views))
            self._seg = (c.c_int32 * max(n, 1))(*plan.seg_of)
            self._values = (c.c_float * max(len(plan.segments), 1))()

    def __call__(self, opt: Any) -> list[Tensor] | None:
        return self._fn(self._args[0], opt.param_groups, opt.state, self._args[1])

    def counters(self, values: list[float], write: bool) -> bool:
        self._values[: len(values)] = values
        return bool(_function("lo_counters")(len(self._seg), self._counters, self._seg, self._values, int(write)))


def check(plan: Any, opt: Any) -> tuple[list[Tensor], Any] | None:
    """(the parameters with a gradient, their gradients' addresses: a list or a C int64 array) when
    nothing ``plan`` relies on has changed (``step_plan._valid``, its group checks included), else None.
    In C (:class:`Checker`, kept on the plan) where it runs, else in Python."""
    from . import step_plan

    checker = plan.checker
    if checker is None:
        fn = _function() if available() else None
        checker = plan.checker = Checker(plan, fn) if fn is not None else False
    if checker:
        params = checker(opt)
        if params is None or not step_plan._valid_groups(plan, opt):
            return None
        return params, checker.grad_ptrs
    sig, params, grads = step_plan._signature(opt.param_groups)
    if sig != plan.signature or not step_plan._valid(plan, opt, params, grads):
        return None
    if getattr(plan, "mesh", None) is not None:  # FSDP2: the kernels read the local gradients
        grads = [g._local_tensor for g in grads]
    return params, list(map(Tensor.data_ptr, grads))


def counters_at(plan: Any, values: list[float]) -> bool:
    """Whether each step counter of the CUDA plan ``plan`` (after a :func:`check` that passed) equals
    ``values[s]`` of its segment s."""
    if plan.checker:
        return plan.checker.counters(values, False)
    return all(c.value == values[s] for c, s in zip(plan.counters, plan.seg_of, strict=True))


def set_counters(plan: Any, values: list[float]) -> None:
    """Set each step counter of the CUDA plan ``plan`` to ``values[s]`` of its segment s."""
    if plan.checker:
        plan.checker.counters(values, True)
        return
    for c, s in zip(plan.counters, plan.seg_of, strict=True):
        c.value = values[s]
