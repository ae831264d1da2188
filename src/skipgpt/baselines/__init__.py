"""Baselines at matched parameter sparsity, each a RoutedModel so evaluation and speed tools accept it.

    from skipgpt.baselines import shortgpt
    short = shortgpt(model, tokenizer, 0.25, calibration_batches)   # ShortGPT layer removal
"""

from .dynamic import coupled, mod_d
from .influence import block_influence
from .registry import DEFAULT_METHODS, METHODS
from .static import closest_prefix, random_routing, removal_order, shortgpt, static_modules, static_routed

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "block_influence",
    "closest_prefix",
    "coupled",
    "mod_d",
    "random_routing",
    "removal_order",
    "shortgpt",
    "static_modules",
    "static_routed",
]
