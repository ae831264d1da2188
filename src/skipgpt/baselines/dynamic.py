"""Dynamic baselines built on the same routers: MoD-D top-k capacity routing and coupled routing.

MoD-D (Mixture-of-Depths with attention and MLP routed separately): each module's router gives a
score per token (execute logit - skip logit); the top-k tokens of each sequence execute, with
k = capacity x real tokens and capacity = 1 - skip rate. The forward gate is exactly 0/1 and the
gradient reaches the router through sigmoid(score) (straight-through), so the sparsity accounting
counts whole modules. Top-k is non-causal: a token's decision depends on the scores of later
tokens, which a left-to-right decoder cannot know. So top-k is used only while the routers train;
at inference (routers.eval(), and always in one-token decode steps) a token executes iff its score
exceeds a per-module threshold: the skip-rate quantile of that module's scores on calibration text,
set module by module in forward order on the states the causal rule itself produces upstream.
policy.topk_at_eval = True restores the non-causal rule for analysis.

Coupled: one router per layer (the attention router) decides attention and MLP together, the
ablation of SkipGPT's module decoupling. It trains and calibrates exactly like SkipGPT routers.
"""

from __future__ import annotations

import torch

from ..config import SkipConfig, check_sparsity
from ..errors import ConfigError
from ..models.routed import RoutedModel
from ..routing.calibrate import argmax_routing
from ..routing.router import EXECUTE, SKIP


def _routed(model, sparsity: float, config: SkipConfig | None) -> RoutedModel:
    if isinstance(model, RoutedModel):
        return model
    return RoutedModel(model, config or SkipConfig(target_sparsity=sparsity))


class ModPolicy:
    """Top-k capacity routing per module; a causal score threshold at inference."""

    def __init__(self, routed: RoutedModel, capacity: torch.Tensor, thresholds: torch.Tensor | None = None):
        self.routed = routed
        self.capacity = capacity.double()  # (L, 2) fraction of tokens that execute
        self.thresholds = thresholds  # (L, 2) score thresholds for causal inference
        self.topk_at_eval = False
        self._calibrating = False

    def score(self, layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        logits = self.routed.routers.get(layer, kind)(x).float()
        return logits[..., EXECUTE] - logits[..., SKIP]

    def __call__(self, layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        k_index = 0 if kind == "attn" else 1
        s = self.score(layer, kind, x)  # (B, T)
        if self._calibrating:
            real = self.routed.token_mask
            seen = s.detach()[real] if real is not None and real.shape == s.shape else s.detach().reshape(-1)
            self.thresholds[layer, k_index] = torch.quantile(seen.double(), 1.0 - float(self.capacity[layer, k_index]))
        training = self.routed.routers.training and torch.is_grad_enabled()
        if (training or self.topk_at_eval or self.thresholds is None) and s.shape[-1] > 1:
            hard = self._topk(s, float(self.capacity[layer, k_index]))
        else:
            t = 0.0 if self.thresholds is None else float(self.thresholds[layer, k_index])
            hard = (s > t).float()
        soft = torch.sigmoid(s)
        return hard + soft - soft.detach() if training else hard

    def _topk(self, s: torch.Tensor, capacity: float) -> torch.Tensor:
        real = self.routed.token_mask
        if real is None or real.shape != s.shape:
            real = torch.ones_like(s, dtype=torch.bool)
        masked = s.masked_fill(~real, float("-inf"))
        k = torch.clamp(torch.round(real.sum(-1).double() * capacity), min=1).long()  # (B,) per sequence
        rank = torch.argsort(torch.argsort(masked, dim=-1, descending=True), dim=-1)
        return ((rank < k[:, None]) & real).float()

    @torch.no_grad()
    def calibrate(self, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Thresholds at which the causal rule executes `capacity` of the calibration tokens, per module.

        All batches run as one forward pass, so each module's threshold is set from all calibration
        tokens before the next module runs: every module is calibrated on the states that the causal
        rule, with the thresholds already set upstream, produces. (Quantiles of scores recorded under
        top-k routing miss the target: top-k produces other states than inference does.)
        """
        if not batches:
            raise ConfigError("MoD-D calibration needs at least one batch of text")
        lengths = {b["input_ids"].shape[-1] for b in batches}
        if len(lengths) != 1:
            raise ConfigError(f"MoD-D calibration batches must share one sequence length, got {sorted(lengths)}")
        joined = {k: torch.cat([b[k] for b in batches]) for k in ("input_ids", "attention_mask") if k in batches[0]}
        self.thresholds = torch.zeros(self.capacity.shape[0], 2, dtype=torch.float64)
        self._calibrating, topk = True, self.topk_at_eval
        self.topk_at_eval = False
        with argmax_routing(self.routed):
            try:
                self.routed(**joined, use_cache=False)
            finally:
                self._calibrating, self.topk_at_eval = False, topk
        self.routed.config.extra["thresholds"] = self.thresholds.tolist()
        return self.thresholds


def mod_d(model, sparsity: float = 0.25, config: SkipConfig | None = None,
          thresholds: torch.Tensor | None = None) -> RoutedModel:
    """A RoutedModel with MoD-D routing at capacity 1 - sparsity for every module (train it, then calibrate).

    Every module executing the same fraction of tokens makes the parameter sparsity equal `sparsity`.
    """
    check_sparsity(sparsity)
    routed = _routed(model, sparsity, config)
    capacity = torch.full((len(routed.layers), 2), 1.0 - sparsity, dtype=torch.float64)
    policy = ModPolicy(routed, capacity, thresholds)
    routed.config.target_sparsity = sparsity
    routed.config.extra.update({"routing": "mod-d", "capacity": capacity.tolist()})
    if thresholds is not None:
        routed.config.extra["thresholds"] = torch.as_tensor(thresholds).tolist()
    routed.force(policy)
    return routed


class CoupledPolicy:
    """The attention router's decision is used for the MLP of the same layer as well."""

    def __init__(self, routed: RoutedModel):
        self.routed = routed
        self.last: dict[int, torch.Tensor] = {}

    def __call__(self, layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        if kind == "mlp" and layer in self.last:
            return self.last.pop(layer)
        g = self.routed.decide(self.routed.routers.attn[layer](x))
        self.last[layer] = g
        return g


def coupled(model, sparsity: float = 0.25, config: SkipConfig | None = None) -> RoutedModel:
    """A RoutedModel whose layer-level router skips attention and MLP together (train it like SkipGPT)."""
    check_sparsity(sparsity)
    routed = _routed(model, sparsity, config)
    routed.config.target_sparsity = sparsity
    routed.config.extra["routing"] = "coupled"
    routed.force(CoupledPolicy(routed))
    return routed
