"""Policies: routing decisions that do not come from the plain router argmax (tests, baselines, ablations).

A policy is a callable (layer, kind, x) -> execute mask of shape x.shape[:-1], kind "attn" or "mlp". One
that calls the routers itself says how much of their cost a token pays in a `router_share` attribute.
Baselines save what their policy needs in the artifact's config (`extra["routing"]` names the variant),
and `from_extra` rebuilds it, so a loaded baseline decides exactly as the saved one did.

MoD-D (Mixture-of-Depths with attention and MLP routed separately): each module's router gives a
score per token (execute logit - skip logit); the top-k tokens of each sequence execute, with
k = capacity x real tokens. The forward gate is exactly 0/1 and the gradient reaches the router
through sigmoid(score) (straight-through). Top-k is non-causal (a token's decision depends on later
tokens' scores), so it is used while the routers train and, before calibration, for the trainer's
held-out loss; once calibrated a token executes iff its score reaches a per-module threshold set on
text, module by module in forward order. A saved MoD-D baseline without thresholds is refused.

Coupled: the attention router of a layer decides attention and MLP together (the ablation of
SkipGPT's module decoupling).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import ArtifactError, ConfigError

Policy = Callable[[int, str, torch.Tensor], torch.Tensor]
EXECUTE, SKIP = 0, 1  # router logit columns
KINDS = ("attn", "mlp")  # index 0 attention, 1 MLP in every (L, 2, ...) tensor
KIND_INDEX = {kind: i for i, kind in enumerate(KINDS)}


def execute_all(layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
    return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)


def skip_all(layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
    return torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)


def _per_module(table: torch.Tensor, name: str, dims: int) -> None:
    """Refuse a table that is not (num_layers, 2, ...) with `dims` dimensions, when the policy is made."""
    if not isinstance(table, torch.Tensor) or table.dim() != dims or table.shape[1] != 2:
        shape = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        extra = ", batch, seq" if dims == 4 else ""
        raise ConfigError(f"{name} must be a (num_layers, 2{extra}) tensor (attention, MLP), got {shape}")


def _layer_row(table: torch.Tensor, layer: int, name: str) -> torch.Tensor:
    if layer >= table.shape[0]:
        raise ConfigError(f"{name} covers {table.shape[0]} layers; the model has more (layer {layer} asked)")
    return table[layer]


def from_masks(masks: torch.Tensor) -> Policy:
    """Fixed decisions: a (num_layers, 2, batch, seq) bool tensor, index 0 attention, 1 MLP (copied: the sparsity
    meter keeps the decisions of past passes, so a caller refilling the tensor must not change them)."""
    _per_module(masks, "the decision mask", 4)
    masks = masks.to(torch.bool, copy=True)

    def policy(layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        m = _layer_row(masks, layer, "the decision mask")[KIND_INDEX[kind]]
        if m.shape != x.shape[:-1]:
            raise ValueError(f"mask for layer {layer} {kind} has shape {tuple(m.shape)}, input {tuple(x.shape[:-1])}")
        return m.to(x.device)

    return policy


def static(keep: torch.Tensor) -> Policy:
    """The same decision for every token: keep is a (num_layers, 2) bool tensor (module removal)."""
    _per_module(keep, "keep", 2)

    def policy(layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        keeps = bool(_layer_row(keep, layer, "keep")[KIND_INDEX[kind]])
        return torch.full(x.shape[:-1], keeps, dtype=torch.bool, device=x.device)

    return policy


def random(skip_rates: torch.Tensor, seed: int = 0) -> Policy:
    """Each token skips module (layer, kind) with probability skip_rates[layer, kind], independently."""
    _per_module(skip_rates, "skip_rates", 2)
    generator = torch.Generator().manual_seed(seed)

    def policy(layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        u = torch.rand(x.shape[:-1], generator=generator)
        return (u >= float(_layer_row(skip_rates, layer, "skip_rates")[KIND_INDEX[kind]])).to(x.device)

    return policy


class ModPolicy:
    """Top-k capacity routing per module while the routers train; a causal score threshold at inference."""

    def __init__(self, routed, capacity: torch.Tensor, thresholds: torch.Tensor | None = None):
        self.routed = routed
        self.capacity = capacity.double()  # (L, 2) fraction of tokens that execute
        self.thresholds = thresholds  # (L, 2) score thresholds for causal inference
        self._calibrating = False

    def score(self, layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        logits = self.routed.routers.get(layer, kind)(x).float()
        return logits[..., EXECUTE] - logits[..., SKIP]

    def __call__(self, layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        k_index = KIND_INDEX[kind]
        s = self.score(layer, kind, x)  # (B, T)
        if self._calibrating:
            real = self.routed.token_mask
            seen = s.detach()[real] if real is not None and real.shape == s.shape else s.detach().reshape(-1)
            self.thresholds[layer, k_index] = torch.quantile(seen.double(), 1.0 - float(self.capacity[layer, k_index]))
        training = self.routed.training_routers
        if (training or self.thresholds is None) and s.shape[-1] > 1:
            hard = self._topk(s, float(self.capacity[layer, k_index]))
        else:
            t = 0.0 if self.thresholds is None else float(self.thresholds[layer, k_index])
            hard = (s >= t).float()  # the lowest score executes at capacity 1 (the quantile is that score)
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
        if len({"attention_mask" in b for b in batches}) != 1:
            raise ConfigError("MoD-D calibration batches must all have an attention_mask, or none")
        joined = {k: torch.cat([b[k] for b in batches]) for k in ("input_ids", "attention_mask") if k in batches[0]}
        if "attention_mask" in joined and not joined["attention_mask"].any():
            raise ConfigError("MoD-D calibration batches hold only padding: no token to calibrate on")
        self.thresholds = torch.zeros(self.capacity.shape[0], 2, dtype=torch.float64)
        self._calibrating = True
        try:
            with self.routed.using(sample=False, track=False):
                self.routed(**joined, use_cache=False)
        finally:
            self._calibrating = False
        self.routed.config.extra["thresholds"] = self.thresholds.tolist()
        return self.thresholds


class CoupledPolicy:
    """The attention router's decision is used for the MLP of the same layer as well."""

    def __init__(self, routed):
        self.routed = routed
        self.last: dict[int, torch.Tensor] = {}

    def __call__(self, layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        if kind == "mlp" and layer in self.last:
            return self.last.pop(layer)
        g = self.routed.decide(self.routed.routers.attn[layer], x)
        self.last[layer] = g
        return g


def router_share(policy: Policy | None) -> float:
    """How much of the routers' cost a token pays under `policy`: all of it when the routers decide (no policy,
    MoD-D's scores), the attention routers' half when the coupled variant reuses their decision for the MLP, none
    under a fixed or random policy, which runs no router; a policy of your own says so in `router_share`."""
    share = getattr(policy, "router_share", None)
    if share is not None:
        return float(share)
    if policy is None or isinstance(policy, ModPolicy):
        return 1.0
    return 0.5 if isinstance(policy, CoupledPolicy) else 0.0


def reads_threshold(policy: Policy | None) -> bool:
    """Whether decisions under `policy` move with the routers' threshold (so calibrating it sets the sparsity):
    the routers' own argmax and the coupled variant do; fixed, random and MoD-D policies do not."""
    return policy is None or isinstance(policy, CoupledPolicy)


def from_extra(routed, source: str = "routers") -> Policy | None:
    """The policy a saved artifact's config.extra["routing"] names (None for plain SkipGPT routers)."""
    extra = routed.config.extra
    kind = extra.get("routing", "skipgpt")

    def per_module(name: str, dtype: torch.dtype = torch.float32, fraction: bool = False) -> torch.Tensor:
        """extra[name] as the (layers, 2) table of one value per attention and MLP module: finite, in [0, 1]
        for a fraction, 0/1 for a bool (read as numbers first: a cast to bool would take NaN or 0.5 as true)."""
        table = torch.tensor(extra[name], dtype=torch.float64)
        if table.shape != (len(routed.layers), 2):
            raise ValueError(f"{name} has shape {tuple(table.shape)}, the model needs ({len(routed.layers)}, 2)")
        if not torch.isfinite(table).all():
            raise ValueError(f"{name} holds NaN or infinite values")
        if fraction and not ((table >= 0) & (table <= 1)).all():
            raise ValueError(f"{name} holds values outside [0, 1]")
        if dtype == torch.bool and not ((table == 0) | (table == 1)).all():
            raise ValueError(f"{name} holds values other than true and false")
        return table.to(dtype)

    if kind == "mod-d" and extra.get("thresholds") is None:  # uncalibrated, it would route on top-k: later tokens
        raise ArtifactError(f"{source}: a MoD-D baseline saved before its thresholds were calibrated (its top-k "
                            "routing reads later tokens); calibrate it and save again")
    try:
        if kind in ("shortgpt", "static-modules"):
            return static(per_module("keep", torch.bool))
        if kind == "random":
            return random(per_module("skip_rates", fraction=True), int(extra.get("seed", 0)))
        if kind == "mod-d":
            return ModPolicy(routed, per_module("capacity", fraction=True), per_module("thresholds", torch.float64))
        if kind == "coupled":
            return CoupledPolicy(routed)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{source}: routing variant {kind!r} is missing or has a bad field ({e})") from None
    if kind not in ("skipgpt", "dense"):
        raise ArtifactError(f"{source}: unknown routing variant {kind!r} in skip_config.json extra")
    return None
