"""Executors that run a rule with its weight and state formats."""

from .native import prepare
from .reference import reference_step

__all__ = ["prepare", "reference_step"]
