"""safetensors export and import of the full-precision weights rebuilt from split 16-bit weights.

A leanopt model's bf16 parameters hold only the high half of each weight; the rest lives in the
optimizer (the exact split's int16 remainder). ``save_safetensors`` writes the weights rebuilt from
both (``leanopt.fp32_state_dict``) as fp32, or rounded to nearest-even bf16; ``load_safetensors``
reads such a file (or any safetensors file with the model's keys) back into a model and its
optimizer, setting the low bits too (``leanopt.load_fp32_state_dict``), so training goes on exactly.
Requires the ``safetensors`` package (``pip install leanopt[hf]``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..checkpoint import fp32_state_dict, load_fp32_state_dict
from ..optimizer import LeanOptimizer

EXPORT_DTYPES = (torch.float32, torch.bfloat16)
_ALIASES_KEY = "leanopt.aliases"


def _require_safetensors():
    try:
        import safetensors.torch as st
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "leanopt's safetensors export needs the safetensors package: pip install 'leanopt[hf]'"
        ) from err
    return st


def _tied_aliases(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """Alias key -> first key, for state-dict entries that are the same parameter or buffer (tied weights)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    for key in keys:
        t = tensors.get(key)
        if t is None:
            continue
        if id(t) in first:
            aliases[key] = first[id(t)]
        else:
            first[id(t)] = key
    return aliases


def export_state_dict(
    model: nn.Module, optimizer: LeanOptimizer, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """The model's state dict with full-precision weights, as ``dtype`` (fp32 or bf16).

    fp32: exactly ``leanopt.fp32_state_dict`` (master values). bf16: those values rounded to
    nearest-even, i.e. what ``.to(torch.bfloat16)`` of the fp32 export gives. Non-float entries are
    kept as they are.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype!r}")
    sd = fp32_state_dict(model, optimizer)
    if dtype != torch.float32:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return sd


def save_safetensors(
    model: nn.Module,
    optimizer: LeanOptimizer,
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write the model's full-precision weights (master values) to a safetensors file.

    ``dtype`` is torch.float32 (bit-exact masters) or torch.bfloat16 (rounded to nearest-even).
    Tied weights are written once; the file's metadata records the other names (``leanopt.aliases``)
    and ``load_safetensors`` restores them. ``metadata`` (str -> str) is added to the file's header.
    """
    st = _require_safetensors()
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("metadata must map str to str (safetensors stores text metadata only)")
    sd = export_state_dict(model, optimizer, dtype)
    aliases = _tied_aliases(model, list(sd))
    tensors = {k: v.contiguous() for k, v in sd.items() if k not in aliases}
    meta = {"format": "pt", "leanopt.dtype": str(dtype).removeprefix("torch.")}
    if aliases:
        meta[_ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
    meta.update(metadata or {})
    st.save_file(tensors, os.fspath(path), metadata=meta)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a safetensors file into (state dict with tied names restored, metadata)."""
    st = _require_safetensors()
    from safetensors import safe_open

    path = os.fspath(path)
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata() or {})
    sd = st.load_file(path)
    for alias, key in json.loads(meta.get(_ALIASES_KEY, "{}")).items():
        if key in sd:
            sd[alias] = sd[key]
    return sd, meta


def load_safetensors(
    model: nn.Module, optimizer: LeanOptimizer, path: str | os.PathLike, strict: bool = True
) -> dict[str, str]:
    """Load a safetensors file of weights (fp32, bf16 or other floats) into ``model`` and ``optimizer``.

    Managed parameters get their master values from the file (the 16-bit weight is the nearest value
    and the optimizer keeps the low bits), so a model saved in fp32 continues bit-exactly. With
    ``strict``, missing or unexpected keys raise KeyError; nothing is changed on error. A tied weight
    stored under only one of its names counts for all of them. Returns the file's metadata.
    """
    if not isinstance(optimizer, LeanOptimizer):
        raise TypeError(f"optimizer must be a leanopt optimizer, got {type(optimizer).__name__}")
    sd, meta = read_safetensors(path)
    # Files written by other tools (save_pretrained, safetensors.torch.save_model) store tied weights
    # under one of their names only: fill in the model's other names.
    for alias, key in _tied_aliases(model, list(model.state_dict())).items():
        if alias not in sd and key in sd:
            sd[alias] = sd[key]
        elif key not in sd and alias in sd:
            sd[key] = sd[alias]
    load_fp32_state_dict(model, optimizer, sd, strict=strict)
    return meta
