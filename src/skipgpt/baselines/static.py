"""Static baselines: ShortGPT layer removal, static module removal and random routing.

Each returns a RoutedModel whose decisions come from a policy instead of the routers, so the same
evaluation, sparsity accounting and sparse-inference path serve every method. Sparsity is matched
in parameter terms (the paper's): attention and MLP modules differ in size, so modules are removed
greedily in order of Block Influence and the prefix whose parameter ratio is closest to the target
wins; the realised ratio is recorded in routed.config.extra["realised_param_sparsity"].
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from ..config import SkipConfig, check_sparsity
from ..errors import ConfigError
from ..models.routed import RoutedModel
from ..routing import policies
from ..routing.sparsity import ModuleCosts
from .influence import block_influence

MODULE_KINDS = ("both", "attn", "mlp")


def _param_table(costs: ModuleCosts) -> torch.Tensor:
    return torch.stack([costs.attn_params, costs.mlp_params], dim=1)  # (L, 2)


def closest_prefix(order: list[list[tuple[int, int]]], params: torch.Tensor, target: float) -> torch.Tensor:
    """Drop groups of modules in `order` while it brings the parameter ratio closer to `target`.

    order: groups of (layer, kind) to remove together, least important first (a layer for ShortGPT,
    a single module for module removal). Returns the (L, 2) bool keep mask of the best prefix.
    """
    total = float(params.sum())
    keep = torch.ones(params.shape, dtype=torch.bool)
    best, best_gap, removed = keep.clone(), target, 0.0
    for group in order:
        for layer, kind in group:
            keep[layer, kind] = False
            removed += float(params[layer, kind])
        gap = abs(removed / total - target)
        if gap < best_gap:
            best, best_gap = keep.clone(), gap
        if removed / total > target:
            break
    return best


def removal_order(influence: dict[str, torch.Tensor], unit: str = "layer", kinds: str = "both"):
    """Groups of (layer, kind) from least to most influential."""
    if unit == "layer":
        layers = torch.argsort(influence["layer"]).tolist()
        return [[(i, 0), (i, 1)] for i in layers]
    if kinds not in MODULE_KINDS:
        raise ConfigError(f"kinds must be one of {MODULE_KINDS}, got {kinds!r}")
    bi = influence["module"].clone()
    if kinds != "both":
        bi[:, 1 if kinds == "attn" else 0] = float("inf")
    flat = torch.argsort(bi.reshape(-1)).tolist()
    return [[(f // 2, f % 2)] for f in flat if torch.isfinite(bi.reshape(-1)[f])]


@contextmanager
def routed_at(model, sparsity: float, config: SkipConfig | None = None) -> Iterator[RoutedModel]:
    """`model` as a RoutedModel (wrapped with `config`, the router design, unless it is one) whose config targets
    `sparsity`, a fraction in [0, 1), for the block that builds a baseline on it. Every baseline starts here. A
    wrapper made here is taken off again when the block fails, so a refused call leaves the caller's model as it
    was (routed, it could not be routed again)."""
    check_sparsity(sparsity)
    forecasts = (model.config if isinstance(model, RoutedModel) else config or SkipConfig()).forecaster_rank
    if forecasts:  # their sparsity is reckoned on whole modules; a forecaster's cost would make the meter's net
        raise ConfigError(f"baselines route without forecasters; this model has rank-{forecasts} forecasters "
                          f"(informed skipping): build the baseline on the plain model")
    owned = not isinstance(model, RoutedModel)
    routed = RoutedModel(model, config or SkipConfig()) if owned else model
    before = routed.config.target_sparsity
    try:
        routed.config.target_sparsity = sparsity
        yield routed
    except BaseException:
        if owned:
            routed.unpatch()
        else:
            routed.config.target_sparsity = before
        raise


def static_routed(model, keep: torch.Tensor, method: str, target: float, extra: dict | None = None) -> RoutedModel:
    """A RoutedModel that removes the modules where keep ((L, 2), bool or 0/1) is False, for every token."""
    with routed_at(model, target) as routed:
        keep = torch.as_tensor(keep)
        shape = (len(routed.layers), 2)
        if keep.shape != shape:
            raise ConfigError(f"keep must be a {shape} table of bools (or 0/1), got shape {tuple(keep.shape)}")
        if not ((keep == 0) | (keep == 1)).all():
            raise ConfigError("keep must hold bools (or 0/1); it holds other values")
        keep = keep.bool()
        params = _param_table(routed.costs)
        realised = float((params * (~keep)).sum() / params.sum())
        routed.config.extra.update(
            {"routing": method, "keep": keep.int().tolist(), "realised_param_sparsity": realised, **(extra or {})}
        )
        routed.force(policies.static(keep))
    return routed


def shortgpt(model, tokenizer=None, sparsity: float = 0.25, calibration_batches=None) -> RoutedModel:
    """ShortGPT: remove whole layers with the lowest Block Influence on the calibration batches.

    calibration_batches: texts (tokenised with `tokenizer`) or dicts with input_ids (and attention_mask).
    Returns a RoutedModel that skips the removed layers for every token; the realised parameter
    sparsity is in routed.config.extra["realised_param_sparsity"].
    """
    return _removed_by_influence(model, tokenizer, sparsity, calibration_batches, "layer", "both", "shortgpt")


def static_modules(
    model, tokenizer=None, sparsity: float = 0.25, calibration_batches=None, kinds: str = "both"
) -> RoutedModel:
    """Static module removal: drop attention and/or MLP modules with the lowest Block Influence."""
    return _removed_by_influence(model, tokenizer, sparsity, calibration_batches, "module", kinds, "static-modules")


def _removed_by_influence(model, tokenizer, sparsity: float, calibration_batches, unit: str, kinds: str,
                          method: str) -> RoutedModel:
    """The least influential groups of `unit` ("layer" or "module") removed, up to `sparsity` in parameters."""
    with routed_at(model, sparsity) as routed:
        bi = block_influence(routed, _need_batches(calibration_batches, tokenizer))
        keep = closest_prefix(removal_order(bi, unit, kinds), _param_table(routed.costs), sparsity)
        extra = {"kinds": kinds} if unit == "module" else {}  # layer removal takes both kinds of a layer
        return static_routed(routed, keep, method, sparsity, {**extra, "block_influence": bi[unit].tolist()})


def random_routing(model, sparsity: float = 0.25, skip_rates: torch.Tensor | None = None, seed: int = 0) -> RoutedModel:
    """Random per-token routing: module (layer, kind) skips each token with probability skip_rates[layer, kind].

    Without skip_rates every module skips at rate `sparsity`, which is `sparsity` in parameters too.
    Pass the per-module rates of a trained SkipGPT (report.per_layer_attention / per_layer_mlp) to
    copy its layer profile while randomising which tokens skip.
    """
    with routed_at(model, sparsity) as routed:
        L = len(routed.layers)
        if skip_rates is None:
            rates = torch.full((L, 2), float(sparsity))
        else:
            rates = torch.as_tensor(skip_rates, dtype=torch.float64)
        if rates.shape != (L, 2):
            raise ConfigError(f"skip_rates must be a ({L}, 2) table of probabilities, got shape {tuple(rates.shape)}")
        if not ((rates >= 0) & (rates <= 1)).all():  # written so that NaN fails too (saved, it would not load)
            raise ConfigError("skip_rates must be probabilities in [0, 1]; it holds other values or NaN")
        params = _param_table(routed.costs)
        routed.config.extra.update(
            {"routing": "random", "skip_rates": rates.tolist(), "seed": seed,
             "expected_param_sparsity": float((params * rates).sum() / params.sum())}
        )
        routed.force(policies.random(rates.float(), seed))
    return routed


def _need_batches(batches, tokenizer=None) -> list:
    """Calibration batches as dicts with input_ids; plain strings are tokenised one sequence each."""
    if isinstance(batches, (str, Mapping)):  # one text or one tokenised batch (list() would split it)
        batches = [batches]
    batches = [] if batches is None else list(batches)
    if not batches:
        raise ConfigError("static baselines need calibration_batches (texts, or dicts with input_ids) "
                          "to measure Block Influence")
    out = []
    for b in batches:
        if isinstance(b, str):
            if tokenizer is None:
                raise ConfigError("calibration texts need the tokenizer: pass it as the second argument")
            b = {"input_ids": tokenizer(b, return_tensors="pt")["input_ids"]}
        if not isinstance(b, Mapping) or "input_ids" not in b:  # a tokenizer's BatchEncoding is no dict
            raise ConfigError("each calibration batch must be a text or a dict with input_ids")
        ids, mask = b["input_ids"], b.get("attention_mask")
        # (an empty text tokenises to a float tensor of no ids: skipped by Block Influence)
        if not (isinstance(ids, torch.Tensor) and ids.dim() == 2 and (ids.numel() == 0 or not ids.is_floating_point())):
            raise ConfigError("calibration input_ids must be a (batch, tokens) tensor of token ids")
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.shape == ids.shape):
            raise ConfigError(f"a calibration attention_mask must have the shape of its input_ids {tuple(ids.shape)}")
        out.append(b)
    return out
