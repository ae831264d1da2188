"""Fit the forecasters of informed skipping in closed form, from forward passes only.

Each module's forecaster maps the module's normalised input to (an estimate of) its output. One masked
forward pass computes every module for every token, so the same passes give every module's inputs and
outputs; they are folded into the normal equations of a ridge regression with a bias,

    [X 1]^T [X 1] W = [X 1]^T Y,

and the rank-R forecaster is the reduced-rank solution: the ridge map projected onto the top R
principal directions of its own predictions (the best rank-R map in squared error on the fitted rows).

Which rows count decides what is learned. A forecaster is used only on the tokens its router skips, and
routers skip tokens whose module output is small, so a fit on every token predicts an average that is
wrong exactly there. `on_policy=True` fits only the tokens the current routers skip, under routed
execution with the forecasters in place; `on_policy=False` fits every real token (the start, before
the routers skip anything).

The trainer's forecaster phase is here too: fit_dense before router tuning, fit_and_tune after it (refit on
the skipped tokens, then tune_forecasters trains them on the loss, kept only if held-out text agrees).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from accelerate import Accelerator

from ..errors import DataError
from ..models.routed import Forecaster, RoutedModel
from ..routing.calibrate import calibrate_threshold
from ..routing.policies import KINDS
from .config import TrainConfig
from .data import PackedData
from .step import TrainingError, chunked, held_out_nll, learning_rate, ranks_mean, step_batches, step_gradients

FIT_SEQUENCES = 128  # training sequences a forecaster fit reads (forward passes only; 64 fitted worse)


class Moments:
    """Running [x 1]^T [x 1] and [x 1]^T y of one module, in float64 (x: `inputs` features, y: `outputs`
    features, as many as the inputs unless given)."""

    def __init__(self, inputs: int, outputs: int | None = None):
        self.xx = torch.zeros(inputs + 1, inputs + 1, dtype=torch.float64)
        self.xy = torch.zeros(inputs + 1, outputs or inputs, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        # The products are formed where the rows are and summed on the CPU: at hidden size 4,096 one CPU
        # core takes 1.6 s per 512 rows and module, hours for a 7B model's fit, which a GPU does in
        # milliseconds. MPS has no float64, so its rows come to the CPU first.
        if x.device.type == "mps":
            x, y = x.cpu(), y.cpu()
        x, y = x.double(), y.double()
        x1 = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        self.xx += (x1.T @ x1).cpu()
        self.xy += (x1.T @ y).cpu()
        self.rows += x.shape[0]


def solve(xx: torch.Tensor, xy: torch.Tensor, rank: int, ridge: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    """(down (R, d_in), up (d_out, R), bias (d_out,)) of the rank-R ridge fit from the moments of [x 1] and y.

    Reduced-rank regression with an intercept: the ridge map W of the centred data, projected onto the
    top-R principal directions V of its centred predictions; the bias (never penalised, never
    projected) puts the mean prediction on the mean output. ridge is relative to the mean input
    variance, so it means the same at any activation scale.
    """
    d = xx.shape[0] - 1  # input features; the last row and column are the constant 1
    n = xx[d, d]
    mx, my = xx[d, :d] / n, xy[d] / n
    cxx = xx[:d, :d] - n * torch.outer(mx, mx)
    cxy = xy[:d] - n * torch.outer(mx, my)
    penalty = ridge * float(cxx.diagonal().mean().clamp_min(1e-12))
    w = torch.linalg.solve(cxx + penalty * torch.eye(d, dtype=cxx.dtype), cxy)  # (d_in, d_out)
    v = torch.linalg.eigh(w.T @ cxx @ w).eigenvectors[:, -rank:]  # (d_out, R)
    down = (w @ v).T
    return down, v, my - mx @ w @ v @ v.T


@torch.no_grad()
def fit_forecasters(routed: RoutedModel, batches: Iterable[dict[str, torch.Tensor]], on_policy: bool,
                    ridge: float = 1e-2) -> dict[str, float]:
    """Fit every forecaster of `routed` on `batches` (see the module doc); returns the number of modules
    fitted, of (module, token) rows fitted, and of real tokens read.

    Runs in masked mode with argmax routing, so each module's true output is computed for every token.
    """
    bank = routed.forecasters
    if bank is None:
        raise ValueError("the routed model has no forecasters (forecaster_rank 0)")
    L, hidden = len(routed.layers), routed.config.base.hidden_size
    moments = {(i, k): Moments(hidden) for i in range(L) for k in KINDS}
    tokens = 0
    policy = routed.policy if on_policy else "execute"
    with capture(routed) as (inputs, outputs), routed.using(mode="masked", sample=False, track=False, policy=policy):
        for batch in batches:
            routed(**batch, use_cache=False)
            gates, real, _ = routed.state.stacked()
            tokens += int(real.sum())
            for (i, kind), m in moments.items():
                rows = real if not on_policy else real & (gates[i, KINDS.index(kind)] <= 0.5)
                m.add(inputs[(i, kind)][rows], outputs[(i, kind)][rows])
    fitted = 0
    for (i, kind), m in moments.items():
        if m.rows == 0:
            continue  # never skipped: keep the forecaster it has
        down, up, bias = solve(m.xx, m.xy, bank.get(i, kind).down.out_features, ridge)
        _load(bank.get(i, kind), down, up, bias)
        fitted += 1
    if tokens == 0:
        raise DataError("forecaster fitting got no real tokens to read")
    return {"modules": fitted, "rows": sum(m.rows for m in moments.values()), "tokens": tokens}


@contextmanager
def capture(routed: RoutedModel) -> Iterator[tuple[dict, dict]]:
    """({(layer, kind): normalised input}, {(layer, kind): output}) of every module in the forward passes run
    inside the block: the input is what the module (and its forecaster, when there is one) reads, the output
    what the gate multiplies (after the output norm on sandwich models)."""
    inputs: dict[tuple[int, str], torch.Tensor] = {}
    outputs: dict[tuple[int, str], torch.Tensor] = {}

    def keep(store, key):
        return lambda module, args, out: store.__setitem__(key, (out[0] if isinstance(out, tuple) else out).detach())

    hooks = []
    for i, parts in enumerate(routed.layers):
        starts = {"attn": parts.attn_norm, "mlp": parts.mlp_norm}
        ends = {"attn": parts.attn_out_norm or parts.attn, "mlp": parts.mlp_out_norm or parts.mlp}
        for kind in KINDS:
            hooks.append(starts[kind].register_forward_hook(keep(inputs, (i, kind))))
            hooks.append(ends[kind].register_forward_hook(keep(outputs, (i, kind))))
    try:
        yield inputs, outputs
    finally:
        for h in hooks:
            h.remove()


def _load(forecaster: Forecaster, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor) -> None:
    p = forecaster.down.weight
    forecaster.down.weight.copy_(down.to(p.device, p.dtype))
    forecaster.up.weight.copy_(up.to(p.device, p.dtype))
    forecaster.up.bias.copy_(bias.to(p.device, p.dtype))


# -- the trainer's forecaster phase -----------------------------------------------------------------------------


def trains_forecasters(routed: RoutedModel, cfg: TrainConfig) -> bool:
    """Whether this run has a forecaster phase: informed skipping, routers training, no forced policy."""
    return cfg.trains_routers and routed.forecasters is not None and routed.policy is None


def _fit_batches(data: PackedData, cfg: TrainConfig, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Training sequences for a forecaster fit: the first FIT_SEQUENCES of them, forward passes only."""
    return chunked(data.train[:FIT_SEQUENCES], cfg.batch_size, device)


def fit_dense(routed: RoutedModel, data: PackedData, cfg: TrainConfig, device: torch.device) -> None:
    """The start of informed skipping: fit on every token of dense passes (deterministic, so a resumed run fits
    the same); the routers then train with these forecasters in the skip path."""
    fit = fit_forecasters(routed, _fit_batches(data, cfg, device), on_policy=False)
    routed.config.extra["forecaster_fit_tokens"] = fit["tokens"]


def tune_forecasters(routed: RoutedModel, data: PackedData, cfg: TrainConfig, accelerator: Accelerator) -> int:
    """Train the forecasters alone for cfg.forecaster_steps steps on the stage's loss (no sparsity term: the
    routers are frozen at their argmax decisions, so only skipped tokens reach a forecaster's gradient);
    returns the training tokens read. The closed-form fit matches each module's output; this matches what
    the model downstream needs from it (the 25% headline build: held-out perplexity 37.01 -> 24.93)."""
    bank = routed.forecasters
    bank.float().requires_grad_(True)  # master weights in fp32 whatever the base dtype
    optimizer = torch.optim.AdamW(bank.parameters(), lr=cfg.forecaster_lr, weight_decay=0.0)
    loss_cfg = dataclasses.replace(cfg, alpha=0.0)
    world = accelerator.num_processes
    tokens = 0
    for step in range(cfg.forecaster_steps):
        for g in optimizer.param_groups:
            g["lr"] = learning_rate(step, cfg.forecaster_steps, cfg.forecaster_lr, "cosine", 0.0)
        # the steps after the router steps in the same data order: text the routers did not train on
        batches = step_batches(data.train, cfg.steps + step, cfg, accelerator)
        optimizer.zero_grad(set_to_none=False)
        # every rank sees a NaN on any rank and stops, rather than wait for it in the gradient reduce below
        loss = ranks_mean(step_gradients(routed, batches, loss_cfg), accelerator)["loss"]
        if not math.isfinite(loss):
            raise TrainingError(f"loss became NaN/inf at forecaster step {step + 1}; lower --forecaster-lr")
        if world > 1:  # the forecasters are outside the DDP wrapper: average their gradients by hand
            for p in bank.parameters():
                p.grad = accelerator.reduce(p.grad if p.grad is not None else torch.zeros_like(p), "mean")
        optimizer.step()
        tokens += sum(b["input_ids"].numel() for b in batches) * world
    bank.requires_grad_(False)
    routed.reset_sparsity()
    return tokens


def fit_and_tune(routed: RoutedModel, data: PackedData, cfg: TrainConfig, val: list[dict[str, torch.Tensor]],
                 accelerator: Accelerator) -> bool:
    """After router tuning (routers in eval mode): refit the forecasters on the tokens the trained routers
    skip, then tune them on the loss; returns whether the threshold is settled for the forecasters kept
    (True when they were tuned; else the caller calibrates it). `val`: the held-out batches to calibrate on."""
    # Refit on the tokens the trained routers skip (where the forecasters are used), twice: the
    # refit moves the hidden states downstream routers read. Then calibrate with them in place.
    extra = routed.config.extra
    device = next(routed.model.parameters()).device
    for _ in range(2):
        fit = fit_forecasters(routed, _fit_batches(data, cfg, device), on_policy=True)
        extra["forecaster_fit_tokens"] = extra.get("forecaster_fit_tokens", 0) + fit["tokens"]
    if not cfg.forecaster_steps:
        return False
    # Tune them on the loss at the decisions they will serve: calibrate first, tune, calibrate again
    # (with --no-calibrate they serve the trained threshold: tuned and compared there).
    if cfg.calibrate:
        calibrate_threshold(routed, val, routed.config.target_sparsity, routed.config.accounting)
    fitted = {k: v.clone() for k, v in routed.forecasters.state_dict().items()}
    fitted_threshold, fitted_nll = routed.threshold, held_out_nll(routed, data.val, cfg.batch_size)
    extra["forecaster_tune_tokens"] = tune_forecasters(routed, data, cfg, accelerator)
    if cfg.calibrate:
        calibrate_threshold(routed, val, routed.config.target_sparsity, routed.config.accounting)
    tuned_nll = held_out_nll(routed, data.val, cfg.batch_size)
    # A guard, not a search: on a few thousand tokens tuning overfits (the demo's setting measured
    # held-out 85.90 tuned against 27.81 fitted), so it is kept only if held-out text agrees.
    kept = tuned_nll <= fitted_nll
    if not kept:
        routed.forecasters.load_state_dict(fitted)
        routed.threshold = fitted_threshold
        if accelerator.is_main_process:
            print(f"forecaster tuning raised held-out perplexity ({math.exp(fitted_nll):.2f} -> "
                  f"{math.exp(tuned_nll):.2f}): kept the fitted forecasters")
    extra["forecaster_tuning"] = {"held_out_ppl_fitted": math.exp(fitted_nll),
                                  "held_out_ppl_tuned": math.exp(tuned_nll), "kept": kept}
    return True  # both candidates calibrated, or neither (bisection from fixed bounds: repeatable)
