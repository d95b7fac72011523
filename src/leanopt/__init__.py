"""leanopt: mixed-precision optimizers without an fp32 master copy of the weights."""

from .checkpoint import fp32_state_dict, load_fp32_state_dict
from .memory import MemoryReport, memory_report
from .optimizer import SGD, Adam, AdamW, LeanOptimizer, Lion

__version__ = "0.1.0"

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "LeanOptimizer",
    "Lion",
    "MemoryReport",
    "fp32_state_dict",
    "load_fp32_state_dict",
    "memory_report",
]
