"""Cast a model for training without a master copy, keeping chosen modules in fp32.

``cast_model`` stores every floating-point parameter and buffer in 16 bits except those of the kept
modules, which stay (or become) fp32. A kept module computes in fp32: its floating inputs are cast to
fp32 on the way in and its floating outputs back to the model's 16-bit dtype on the way out, so the
16-bit layers around it see the dtype they expect. A leanopt optimizer built afterwards updates the
16-bit parameters with a master format (exact split for bf16) and the fp32 ones in place, like
torch.optim, all in the same param groups.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)
# Class names of normalisation layers that do not subclass torch's (LlamaRMSNorm, T5LayerNorm, ...).
_NORM_NAME = re.compile(r"(Norm|RMSNorm|LayerNorm|BatchNorm|GroupNorm)(\d[dD])?$")

KeepRule = type | str | Callable[[str, nn.Module], bool]
"""A module type, a name pattern (fnmatch on the module's qualified name), or a predicate."""


def is_normalization(name: str, module: nn.Module) -> bool:
    """True for normalisation layers: torch's (BatchNorm, InstanceNorm, LayerNorm, GroupNorm,
    LocalResponseNorm, RMSNorm) and any module whose class name ends in ``Norm`` (``LlamaRMSNorm``,
    ``T5LayerNorm``, ...)."""
    return isinstance(module, _NORM_TYPES) or bool(_NORM_NAME.search(type(module).__name__))


DEFAULT_KEEP_FP32: tuple[KeepRule, ...] = (is_normalization,)
"""``cast_model``'s default: keep normalisation layers in fp32 (see docs/integrations/cast_model.md)."""

_ALLOWED_DTYPES = (torch.bfloat16, torch.float16)
_KEPT_ATTR = "_leanopt_keep_fp32"


class _CastFloats:
    """Casts every floating-point tensor in a (nested) structure to one dtype. Picklable."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def cast(self, value: Any) -> Any:
        if isinstance(value, Tensor):
            return value.to(self.dtype) if value.is_floating_point() and value.dtype != self.dtype else value
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return tuple(self.cast(v) for v in value)
        if isinstance(value, list):
            return [self.cast(v) for v in value]
        if isinstance(value, dict) and type(value) is dict:
            return {k: self.cast(v) for k, v in value.items()}
        return value


class _CastInputs(_CastFloats):
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return self.cast(args), self.cast(kwargs)


class _CastOutputs(_CastFloats):
    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        return self.cast(output)


def _matcher(keep_fp32: Iterable[KeepRule]) -> Callable[[str, nn.Module], bool]:
    rules = list(keep_fp32)
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (str, type)) or callable(rule)):
            raise TypeError(
                f"keep_fp32[{i}] must be a module type, a name pattern (str) or a predicate "
                f"(name, module) -> bool, got {type(rule).__name__}"
            )

    def match(name: str, module: nn.Module) -> bool:
        for rule in rules:
            if isinstance(rule, str):
                if fnmatch.fnmatchcase(name, rule):
                    return True
            elif isinstance(rule, type):
                if isinstance(module, rule):
                    return True
            elif rule(name, module):
                return True
        return False

    return match


def _hf_strict_fp32(model: nn.Module) -> set[str]:
    """Hugging Face models list modules that must stay fp32 under bf16 in ``_keep_in_fp32_modules_strict``."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
    return names


def kept_fp32_modules(model: nn.Module) -> list[str]:
    """Qualified names of the modules ``cast_model`` keeps in fp32 (outermost ones only)."""
    return [name for name, m in model.named_modules() if getattr(m, _KEPT_ATTR, False)]


@torch.no_grad()
def cast_model(
    model: nn.Module,
    dtype: torch.dtype = torch.bfloat16,
    keep_fp32: Iterable[KeepRule] = DEFAULT_KEEP_FP32,
) -> nn.Module:
    """Cast ``model`` in place to ``dtype`` (bf16 or fp16), keeping the ``keep_fp32`` modules in fp32.

    ``keep_fp32`` holds module types, fnmatch patterns on qualified module names (``"lm_head"``,
    ``"*.ln_*"``) and predicates ``(name, module) -> bool``; a matching module and everything inside
    it stays fp32 and computes in fp32 (inputs cast to fp32, outputs cast back to ``dtype``). The
    default keeps normalisation layers; ``keep_fp32=()`` casts everything. Modules a Hugging Face
    model lists in ``_keep_in_fp32_modules_strict`` are always kept. Parameters keep their identity
    (only their data changes), but build the optimizer after casting. Returns ``model``.
    Calling it again re-casts from the current values with the new settings.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if dtype not in _ALLOWED_DTYPES:
        raise ValueError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype!r}")
    if isinstance(keep_fp32, (str, type)) or not isinstance(keep_fp32, Iterable):
        raise TypeError(
            "keep_fp32 must be a list or tuple of module types, name patterns and predicates "
            f"(e.g. [nn.LayerNorm, 'lm_head']), got {keep_fp32!r}"
        )
    match = _matcher(keep_fp32)
    hf_strict = _hf_strict_fp32(model)

    # Decide everything before changing anything.
    kept_roots: list[str] = []
    kept: set[str] = set()
    for name, module in model.named_modules():
        parent_kept = any(name.startswith(root + ".") for root in kept_roots)
        if parent_kept:
            kept.add(name)
        elif match(name, module) or (hf_strict and hf_strict.intersection(name.split("."))):
            kept_roots.append(name)
            kept.add(name)
    if "" in kept:
        raise ValueError(f"keep_fp32 matched the whole model; nothing would be cast to {dtype}")
    owners: dict[int, list[tuple[str, bool]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((f"{name}.{pname}" if name else pname, name in kept))
    for entries in owners.values():
        if len({k for _, k in entries}) > 1:
            fp32 = [n for n, k in entries if k]
            low = [n for n, k in entries if not k]
            raise ValueError(
                f"keep_fp32: parameter shared by {fp32} (kept in fp32) and {low} (cast to {dtype}); "
                "keep both modules in fp32 or neither (tied weights must have one dtype)"
            )

    # Apply: remove hooks from an earlier call, cast tensors, install hooks on the kept roots.
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, h in hooks.items() if isinstance(h, _CastFloats)]:
                del hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
        if hasattr(module, _KEPT_ATTR):
            delattr(module, _KEPT_ATTR)
    done: set[int] = set()
    for name, module in model.named_modules():
        target = torch.float32 if name in kept else dtype
        for p in module.parameters(recurse=False):
            if id(p) not in done and p.is_floating_point():
                p.data = p.data.to(target)
                done.add(id(p))
        for bname, b in module.named_buffers(recurse=False):
            if b.is_floating_point() and b.dtype != target:
                setattr(module, bname, b.to(target))
    for name in kept_roots:
        module = model.get_submodule(name)
        module.register_forward_pre_hook(_CastInputs(torch.float32), with_kwargs=True)
        module.register_forward_hook(_CastOutputs(dtype))
        setattr(module, _KEPT_ATTR, True)
    return model
