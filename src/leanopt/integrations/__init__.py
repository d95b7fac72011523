"""Glue for where people train: model casting, safetensors export, Hugging Face and Lightning.

``cast``: torch only. ``export`` needs ``safetensors``; ``hf`` needs ``transformers``/``accelerate``;
``lightning`` needs ``lightning``. Those packages are imported only inside the submodules that use
them (``pip install 'leanopt[hf]'`` or ``'leanopt[lightning]'``).
"""

from .cast import DEFAULT_KEEP_FP32, cast_model, is_normalization, kept_fp32_modules
from .export import export_state_dict, load_safetensors, read_safetensors, save_safetensors

__all__ = [
    "DEFAULT_KEEP_FP32",
    "cast_model",
    "export_state_dict",
    "is_normalization",
    "kept_fp32_modules",
    "load_safetensors",
    "read_safetensors",
    "save_safetensors",
]
