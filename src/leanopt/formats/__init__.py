"""Storage formats for weights and optimizer states (encode/decode pairs)."""

from .states import STATE_FORMATS, StateFormat
from .weights import MASTER_CHOICES, WEIGHT_FORMATS, WeightFormat, join_fp32, resolve_weight_format, split_fp32

__all__ = [
    "MASTER_CHOICES",
    "STATE_FORMATS",
    "WEIGHT_FORMATS",
    "StateFormat",
    "WeightFormat",
    "join_fp32",
    "resolve_weight_format",
    "split_fp32",
]
