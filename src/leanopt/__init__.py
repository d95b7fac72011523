"""leanopt: mixed-precision optimizers without an fp32 master copy of the weights."""

from .checkpoint import fp32_state_dict, load_fp32_state_dict
from .convert import from_torch, to_torch
from .integrations import cast_model, load_safetensors, save_safetensors
from .memory import MemoryReport, memory_report
from .optimizer import SGD, Adam, AdamW, LeanOptimizer, Lion
from .release import ReleaseHandle, release_gradients

__version__ = "0.3.0"

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "LeanOptimizer",
    "Lion",
    "MemoryReport",
    "cast_model",
    "fp32_state_dict",
    "load_fp32_state_dict",
    "memory_report",
    "load_safetensors",
    "save_safetensors",
    "ReleaseHandle",
    "release_gradients",
    "from_torch",
    "to_torch",
]
