"""Executors that run a rule with its weight and state formats."""

from .reference import reference_step

__all__ = ["reference_step"]
