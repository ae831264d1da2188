"""Dynamic baselines built on the same routers: MoD-D top-k capacity routing and coupled routing.

The policies themselves (skipgpt.routing.policies.ModPolicy, CoupledPolicy) live beside the other
policies, so a saved baseline loads without this module; here they are set up for training.
"""

from __future__ import annotations

import torch

from ..config import SkipConfig
from ..errors import ConfigError
from ..models.routed import RoutedModel
from ..routing.policies import CoupledPolicy, ModPolicy
from .static import routed_at


def mod_d(model, sparsity: float = 0.25, config: SkipConfig | None = None,
          thresholds: torch.Tensor | None = None) -> RoutedModel:
    """A RoutedModel with MoD-D routing at capacity 1 - sparsity for every module (train it, then calibrate).

    Every module executing the same fraction of tokens makes the parameter sparsity equal `sparsity`; `config`
    is the router design when `model` is a plain HF model.
    """
    with routed_at(model, sparsity, config) as routed:
        L = len(routed.layers)
        if thresholds is not None:  # the policy indexes a tensor at every forward: a list or a bad table fails here
            thresholds = torch.as_tensor(thresholds, dtype=torch.float64)
            if thresholds.shape != (L, 2):
                raise ConfigError(f"thresholds must be a ({L}, 2) table of scores, got shape {tuple(thresholds.shape)}")
            if not torch.isfinite(thresholds).all():
                raise ConfigError("thresholds must be finite scores; the table holds NaN or infinite values")
        capacity = torch.full((L, 2), 1.0 - sparsity, dtype=torch.float64)
        policy = ModPolicy(routed, capacity, thresholds)
        routed.config.extra.update({"routing": "mod-d", "capacity": capacity.tolist()})
        if thresholds is not None:
            routed.config.extra["thresholds"] = thresholds.tolist()
        routed.force(policy)
    return routed


def coupled(model, sparsity: float = 0.25, config: SkipConfig | None = None) -> RoutedModel:
    """A RoutedModel whose layer-level router skips attention and MLP together (train it like SkipGPT)."""
    with routed_at(model, sparsity, config) as routed:
        routed.config.extra["routing"] = "coupled"
        routed.force(CoupledPolicy(routed))
    return routed
