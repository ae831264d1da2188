"""Method names used by `skipgpt compare`, and restoring any saved baseline from its router directory.

Every baseline is saved with skipgpt.save_routers; routed.config.extra["routing"] names the variant
and holds what its policy needs (keep mask, skip rates, MoD thresholds), so load_baseline can rebuild
the exact model that was evaluated.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..artifact import load_routers
from ..errors import ArtifactError
from ..models.routed import RoutedModel
from ..routing import policies
from .dynamic import CoupledPolicy, ModPolicy

# name -> (what it is, whether it trains)
METHODS: dict[str, tuple[str, bool]] = {
    "dense": ("the unmodified model", False),
    "skipgpt-rt": ("SkipGPT router tuning (stage 1, base frozen)", True),
    "skipgpt-rt-lora": ("SkipGPT router tuning then LoRA with routers frozen (stage 2)", True),
    "shortgpt": ("ShortGPT: whole layers removed by Block Influence", False),
    "static-modules": ("attention/MLP modules removed by Block Influence", False),
    "random": ("random per-token routing at SkipGPT-RT's per-module skip rates", False),
    "mod-d": ("Mixture-of-Depths top-k routing, attention and MLP separately", True),
    "coupled": ("one router per layer skips attention and MLP together", True),
    "skipgpt-joint": ("routers and LoRA trained together from step 0", True),
}
DEFAULT_METHODS = list(METHODS)


def attach_policy(routed: RoutedModel, source: str = "routers") -> RoutedModel:
    """Re-create the policy named in routed.config.extra["routing"] (no-op for plain SkipGPT routers)."""
    extra = routed.config.extra
    kind = extra.get("routing", "skipgpt")
    try:
        if kind in ("shortgpt", "static-modules"):
            routed.force(policies.static(torch.tensor(extra["keep"], dtype=torch.bool)))
        elif kind == "random":
            routed.force(policies.random(torch.tensor(extra["skip_rates"]), int(extra.get("seed", 0))))
        elif kind == "mod-d":
            thresholds = extra.get("thresholds")
            thresholds = None if thresholds is None else torch.tensor(thresholds, dtype=torch.float64)
            routed.force(ModPolicy(routed, torch.tensor(extra["capacity"]), thresholds))
        elif kind == "coupled":
            routed.force(CoupledPolicy(routed))
        elif kind not in ("skipgpt", "dense"):
            raise ArtifactError(f"{source}: unknown routing variant {kind!r} in skip_config.json extra")
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{source}: routing variant {kind!r} is missing or has a bad field ({e})") from None
    return routed


def load_baseline(model, directory: str | Path, check: bool = True) -> RoutedModel:
    """load_routers plus the baseline's policy: the model exactly as it was saved."""
    return attach_policy(load_routers(model, directory, check=check), str(directory))
