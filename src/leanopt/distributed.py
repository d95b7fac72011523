"""Distributed training: FSDP2 sharded parameters (DTensor), DDP, and distributed checkpoints (DCP).

FSDP2 (``torch.distributed.fsdp.fully_shard``) turns each parameter into a DTensor whose local tensor
holds this rank's dim-0 rows (chunks as ``torch.chunk``: possibly uneven, possibly empty). A leanopt
optimizer updates such a parameter on local tensors only: the parameter's local rows, the gradient's
local rows (FSDP2 has reduce-scattered it) and optimizer states built from the local rows. Every
format is elementwise along rows, so each element gets exactly the update it would get unsharded.

State tensors that follow the parameter's rows (remainders, residuals, moments, row-wise scales) are
kept as DTensors with the parameter's mesh and placements, so ``torch.distributed.checkpoint`` sees
them sharded like their parameter and can save on N ranks and load on M. Scalar states (``step``) are
plain tensors, equal on every rank. A state format whose tensors do not follow the rows is refused
with an error naming the parameter and the state.

The first half of this module is that adapter (``optimizer.py`` calls it; it imports nothing from
the optimizer). The second half is public help for users: :func:`sync_seed`,
:func:`save_checkpoint` and :func:`load_checkpoint`.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .kernels import native as _native

# ----------------------------------------------------------------------------------------- adapter


_DTENSOR: list[type] = []  # the DTensor class, once torch.distributed.tensor has been imported


def _dtensor_type() -> type | None:
    # A DTensor can only exist once torch.distributed.tensor was imported; don't import it ourselves
    # (it costs about a second) when nobody uses it. Asked several times per tensor per step: the class
    # is kept once found.
    if _DTENSOR:
        return _DTENSOR[0]
    cls = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    if cls is not None:
        _DTENSOR.append(cls)
    return cls


def is_dtensor(t: Any) -> bool:
    """True if ``t`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 parameter, its grad or state)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """This rank's local tensor of a DTensor (sharing its storage); any other tensor as it is."""
    return t._local_tensor if is_dtensor(t) else t  # FSDP2's own accessor; no autograd view


def _sharded_dims(param: Tensor) -> list[int]:
    from torch.distributed.tensor import Replicate, Shard

    dims = []
    for placement in param.placements:
        if isinstance(placement, Shard):
            dims.append(placement.dim)
        elif not isinstance(placement, Replicate):
            dims.append(-1)
    return dims


def check_param(param: Tensor, where: str, layout: Callable[[tuple], Mapping[str, tuple]]) -> None:
    """Raise ValueError if ``param`` is a DTensor that leanopt cannot update on its local rows.

    Supported: every mesh dimension ``Shard(0)`` or ``Replicate()`` (FSDP2 and HSDP defaults), with
    state formats whose tensors follow the rows. ``layout(shape)`` gives the optimizer state's
    key -> (dtype, shape) for a parameter of that shape.
    """
    if not is_dtensor(param):
        return
    dims = _sharded_dims(param)
    if any(d != 0 for d in dims):
        raise ValueError(
            f"{where} is a DTensor with placements {tuple(param.placements)}; leanopt updates DTensor "
            "parameters that are sharded on dim 0 (Shard(0)) or replicated (Replicate()), as FSDP2's "
            "fully_shard makes them; use fully_shard's default shard_placement_fn"
        )
    whole, rows = layout(tuple(param.shape)), layout(tuple(local(param).shape))
    for key, (_, shape) in whole.items():
        if len(shape) and not _follows_rows(param, shape, rows[key][1]):
            raise ValueError(_not_rows_message(param, where, key, shape, rows[key][1]))


def _not_rows_message(param: Tensor, where: str, key: str, whole: tuple, rows: tuple) -> str:
    return (
        f"{where} (shape {tuple(param.shape)}, local rows {tuple(local(param).shape)}): optimizer state "
        f"{key!r} has shape {tuple(whole)} for the whole tensor and {tuple(rows)} for this rank's rows, so "
        "it is not split by rows like the parameter; this state format cannot be used with FSDP2-sharded "
        "parameters (use another states=/master= for this group, or keep this parameter unsharded)"
    )


def row_range(param: Tensor) -> tuple[int, int]:
    """(first, end) global dim-0 rows held by this rank's shard of DTensor ``param``."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return offset[0], offset[0] + shape[0]


def _follows_rows(param: Tensor, global_shape: tuple, local_shape: tuple) -> bool:
    """Whether a state of these global/local shapes is split like ``param``'s rows."""
    if not _sharded_dims(param):  # replicated everywhere: every state is whole on every rank
        return tuple(global_shape) == tuple(local_shape)
    lp = local(param)
    return (
        len(global_shape) == len(local_shape) >= 1
        and tuple(global_shape[1:]) == tuple(local_shape[1:])
        and global_shape[0] == param.shape[0]
        and local_shape[0] == lp.shape[0]
    )


def _contiguous_stride(shape: tuple) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


def shard_like(param: Tensor, value: Tensor, global_shape: tuple | None = None) -> Tensor:
    """Wrap ``value`` (this rank's rows) as a DTensor placed like DTensor ``param``."""
    from torch.distributed.tensor import DTensor

    shape = tuple(param.shape if global_shape is None else global_shape)
    return DTensor.from_local(
        value, param.device_mesh, param.placements, run_check=False, shape=torch.Size(shape),
        stride=_contiguous_stride(shape),
    )  # fmt: skip


def shard_state(
    param: Tensor, tensors: Mapping[str, Tensor], layout: Mapping[str, tuple[torch.dtype, tuple]], where: str
) -> dict[str, Tensor]:
    """Wrap new state tensors built from ``param``'s local rows as DTensors placed like ``param``.

    ``layout`` maps each key to its (dtype, global shape). 0-dim tensors stay plain. Raises ValueError
    naming ``where`` and the key if a tensor does not follow the rows (then a dim-0 shard could not
    have the numerics of the whole tensor).
    """
    out: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if value.dim() == 0:
            out[key] = value
            continue
        global_shape = tuple(layout[key][1])
        if not _follows_rows(param, global_shape, tuple(value.shape)):
            raise ValueError(_not_rows_message(param, where, key, global_shape, tuple(value.shape)))
        out[key] = shard_like(param, value, global_shape)
    return out


def local_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """The state with each DTensor replaced by its local tensor (same storage)."""
    cls = _dtensor_type()
    if cls is None:
        return dict(state)
    return {k: v._local_tensor if isinstance(v, cls) else v for k, v in state.items()}  # (per tensor, per step)


def local_grad(param: Tensor, grad: Tensor, where: str) -> Tensor:
    """The local rows of ``grad`` for DTensor ``param`` (redistributed first if placed differently)."""
    if not is_dtensor(grad):
        raise TypeError(
            f"{where} is a DTensor (FSDP2) but its gradient is a plain {type(grad).__name__}; pass the "
            "DTensor gradient FSDP2 produces"
        )
    if grad.device_mesh != param.device_mesh or tuple(grad.placements) != tuple(param.placements):
        grad = grad.redistribute(param.device_mesh, param.placements)
    return local(grad)


def local_parts(
    param: Tensor, grad: Tensor, state: dict[str, Any], where: str
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """(param, grad, state) as this rank's local tensors (the same storage; the state a new dict of
    local views); plain tensors as they are. For updates that write in place (the kernels)."""
    if not is_dtensor(param):
        return param, grad, state
    return local(param), local_grad(param, grad, where), local_state(state)


@contextlib.contextmanager
def local_views(
    param: Tensor, grad: Tensor, state: dict[str, Any], where: str
) -> Iterator[tuple[Tensor, Tensor, dict[str, Any]]]:
    """(param, grad, state) as local tensors for one update; plain tensors pass through unchanged.

    In-place writes land in the DTensors' storage. A state entry the update replaced by a new tensor
    is wrapped and stored back when the block ends.
    """
    if not is_dtensor(param):
        yield param, grad, state
        return
    rows, grad_rows, views = local_parts(param, grad, state, where)
    before = dict(views)
    yield rows, grad_rows, views
    for key, value in views.items():
        if before.get(key) is not value:
            if not isinstance(value, Tensor) or value.dim() == 0:
                state[key] = value
            else:
                old = state.get(key)
                shape = tuple(old.shape) if is_dtensor(old) else None
                if shape is None or not _follows_rows(param, shape, tuple(value.shape)):
                    raise ValueError(f"{where}: the update replaced state {key!r} by a tensor of another shape")
                state[key] = shard_like(param, value, shape)


_finite_cache = threading.local()


def all_ranks_min(flags: Tensor, mesh: Any) -> Tensor:
    """``flags`` (changed in place, and returned): each entry's minimum over the ranks of ``mesh``."""
    import torch.distributed as dist

    for dim in range(mesh.ndim):
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=mesh.get_group(dim))
    return flags


def finite_flag(t: Tensor) -> Tensor:
    """0-d bool tensor: every element of the (local) tensor ``t`` is finite. One min/max reduction
    (NaN and inf propagate to the extremes), several times faster than ``isfinite(t).all()``."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    lo, hi = torch.aminmax(t)
    return torch.isfinite(lo) & torch.isfinite(hi)


def all_finite(t: Tensor) -> bool:
    """Whether every element of ``t`` is finite; for a DTensor, on every rank (one all-reduce, or none
    inside :func:`finite_checks`), so all ranks take the same decision for the whole tensor."""
    if not is_dtensor(t):
        fast = _native.all_finite(t)  # CPU: one native pass
        return bool(finite_flag(t)) if fast is None else fast
    cached = getattr(_finite_cache, "flags", {}).get(id(t))
    if cached is not None:
        return cached
    flag = finite_flag(local(t)).to(torch.int32).reshape(1)
    return bool(all_ranks_min(flag, t.device_mesh).item())


def _device_flags(rows: list[Tensor]) -> Tensor | None:
    """int32 flags (1: finite) of CUDA shards on one device from one launch of the multi-tensor CUDA
    kernels' NaN/inf check (kernels/gpu.py), where those kernels run; else None."""
    from .kernels import gpu

    device = rows[0].device
    if device.type != "cuda" or any(t.device != device for t in rows) or not gpu.wanted("auto", device):
        return None
    return gpu.finite_flags(rows)


@contextlib.contextmanager
def finite_checks(grads: list[Tensor]) -> Iterator[None]:
    """Within the block, :func:`all_finite` of these DTensor gradients answers from one all-reduce per
    device mesh made here (instead of one per tensor). Plain tensors are not involved."""
    by_mesh: dict[Any, list[Tensor]] = {}
    for g in grads:
        if is_dtensor(g):
            by_mesh.setdefault(g.device_mesh, []).append(g)
    flags: dict[int, bool] = {}
    for mesh, group in by_mesh.items():
        rows = [local(g) for g in group]
        found = _native.all_finite_many(rows)  # CPU shards: one native call (None: it cannot answer)
        local_flags = torch.tensor(found, dtype=torch.int32) if found is not None else _device_flags(rows)
        if local_flags is None:  # one reduction per shard, on its device (no wait before the all-reduce)
            local_flags = torch.stack([finite_flag(t) for t in rows]).to(torch.int32)
        for g, ok in zip(group, all_ranks_min(local_flags, mesh).tolist(), strict=True):
            flags[id(g)] = bool(ok)
    previous = getattr(_finite_cache, "flags", None)
    _finite_cache.flags = flags
    try:
        yield
    finally:
        _finite_cache.flags = previous if previous is not None else {}


def row_base(param: Tensor, like: Tensor) -> int:
    """The index, in the whole tensor ``param`` (row-major), of the first element of ``like``: 0 for a
    plain tensor; for a sharded one, ``like`` must be this rank's rows, and it is their first element's
    (stochastic rounding's bits are indexed so: formats/noise.py)."""
    if not is_dtensor(param) or not _sharded_dims(param):
        return 0
    if tuple(like.shape) != tuple(local(param).shape):
        raise ValueError(
            f"random bits asked for shape {tuple(like.shape)}, not the local rows {tuple(local(param).shape)} "
            "of a sharded parameter"
        )
    first, _ = row_range(param)
    return first * (param.numel() // param.shape[0] if param.shape[0] else 0)


# Collectives gather int16 (remainders) on no backend (gloo: "Invalid scalar type"; NCCL has no int16);
# a gather only copies bytes, so gather such tensors through a 2-byte float view of the same bits.
_GATHER_VIEWS = {torch.int16: torch.bfloat16, torch.uint16: torch.bfloat16}


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor of a DTensor on every rank (a collective), bit for bit, for every dtype leanopt
    stores (int16 included); any other tensor as it is."""
    if not is_dtensor(t):
        return t
    view = _GATHER_VIEWS.get(t.dtype)
    if view is None:
        return t.full_tensor()
    return shard_like(t, local(t).view(view), tuple(t.shape)).full_tensor().view(t.dtype)


def state_value_for(param: Tensor, value: Tensor, global_shape: tuple, on_cpu: bool = False) -> Tensor:
    """A private copy of a loaded state tensor, placed for ``param`` (on the CPU if ``on_cpu``).

    0-dim values stay plain tensors. For a DTensor ``param`` the value (a whole tensor, or a DTensor
    placed like ``param`` or otherwise) becomes a DTensor with this rank's rows; for a plain ``param``
    a DTensor value is gathered whole (a collective: call on every rank).
    """
    device = "cpu" if on_cpu else local(param).device
    if value.dim() == 0 or not is_dtensor(param):
        whole = full_tensor(value)
        return whole.to(device=device, copy=True)
    if is_dtensor(value) and value.device_mesh == param.device_mesh and value.placements == param.placements:
        rows = local(value)
    else:
        whole = full_tensor(value)
        if _sharded_dims(param):
            first, end = row_range(param)
            rows = whole[first:end] if whole.shape[0] == param.shape[0] else whole
        else:
            rows = whole
    rows = rows.to(device=device, copy=True)
    if not _follows_rows(param, global_shape, tuple(rows.shape)):
        raise ValueError(
            f"a loaded state of shape {tuple(global_shape)} does not follow the rows of a sharded parameter "
            f"of shape {tuple(param.shape)}"
        )
    return shard_like(param, rows, global_shape)


def rows_of(param: Tensor, value: Tensor) -> Tensor:
    """This rank's rows of ``value`` (a whole tensor shaped like ``param``, or a DTensor) for ``param``."""
    if not is_dtensor(param):
        return full_tensor(value)
    if is_dtensor(value):
        if value.device_mesh == param.device_mesh and value.placements == param.placements:
            return local(value)
        value = full_tensor(value)
    if not _sharded_dims(param):
        return value
    first, end = row_range(param)
    return value[first:end]


# ----------------------------------------------------------------------------------------- public


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def sync_seed(optimizer: torch.optim.Optimizer, group: Any = None) -> int:
    """Give every rank rank 0's stochastic-rounding seed (a collective; call on every rank).

    Needed for ``master="stochastic"`` under DDP unless every rank passed the same ``seed=``: the
    rounding noise depends on (seed, parameter, step), so replicas stay identical only with one seed.
    Under FSDP2 it makes a sharded run round exactly as a single process with that seed. Returns it.
    """
    import torch.distributed as dist

    if not hasattr(optimizer, "seed"):
        raise TypeError(f"optimizer must be a leanopt optimizer, got {type(optimizer).__name__}")
    seed = [optimizer.seed]
    dist.broadcast_object_list(seed, src=0, group=group)
    optimizer.seed = int(seed[0])
    return optimizer.seed


def save_checkpoint(
    checkpoint_id: str, model: nn.Module, optimizer: torch.optim.Optimizer, extra: Mapping[str, Any] | None = None
) -> None:
    """Save model and optimizer with ``torch.distributed.checkpoint`` (DCP) into directory ``checkpoint_id``.

    Works with plain, DDP and FSDP2 models on one or many ranks (call on every rank). Each sharded
    tensor is written once, by the rank holding it, so the checkpoint can be loaded on another number
    of ranks. ``extra`` (e.g. ``{"scheduler": sched.state_dict(), "step": 10}``) is saved alongside.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "extra": dict(extra or {})}
    if hasattr(optimizer, "nonfinite_skipped"):
        state["extra"]["leanopt_nonfinite_skipped"] = optimizer.nonfinite_skipped
    dcp.save(state, checkpoint_id=checkpoint_id, no_dist=not _distributed())


def load_checkpoint(
    checkpoint_id: str, model: nn.Module, optimizer: torch.optim.Optimizer, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (on any number of ranks) into ``model`` and
    ``optimizer``, built the same way (same optimizer class, ``master=`` and ``states=``).

    ``extra`` gives the entries of the saved ``extra`` to read, with values of the saved kind (a
    dict of the same structure for state dicts); the loaded values are returned.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    wanted = dict(extra or {})
    if hasattr(optimizer, "nonfinite_skipped"):
        wanted["leanopt_nonfinite_skipped"] = 0
    state = {"model": model_sd, "optim": optim_sd, "extra": wanted}
    dcp.load(state, checkpoint_id=checkpoint_id, no_dist=not _distributed())
    loaded = dict(state["extra"])
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if hasattr(optimizer, "nonfinite_skipped"):
        optimizer.nonfinite_skipped = int(loaded.pop("leanopt_nonfinite_skipped", 0))
    return loaded
