"""Update rules: one pure fp32 function per optimizer."""

from .adam import AdamRule, AdamWRule
from .base import Rule, StateSpec
from .lion import LionRule
from .sgd import SGDRule

__all__ = ["AdamRule", "AdamWRule", "LionRule", "Rule", "SGDRule", "StateSpec"]
