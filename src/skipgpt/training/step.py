"""The maths of one training step: schedules, per-micro-batch seeds, the micro-batches themselves, the
gradients of one optimizer step, the stage-2 threshold controller, and held-out NLL.

Both the router/LoRA loop (trainer.py) and forecaster tuning (forecast.py) run their steps with these."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from accelerate import Accelerator

from ..errors import SkipGPTError
from ..evaluation.perplexity import perplexity
from ..models.routed import RoutedModel
from . import loss as L
from .config import TrainConfig
from .data import micro_batches


class TrainingError(SkipGPTError):
    """Training cannot go on (e.g. the loss became NaN); the last good checkpoint is kept."""


def learning_rate(step: int, total: int, base: float, schedule: str, warmup: float) -> float:
    """Constant, or linear warmup over `warmup` of the steps then cosine decay to zero."""
    warm = int(round(warmup * total))
    if step < warm:
        return base * (step + 1) / warm
    if schedule == "constant":
        return base
    progress = (step - warm) / max(1, total - warm)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def anneal(step: int, total_steps: int, start: float, end: float) -> float:
    """Linear annealing from start to end over the stage (reaches `end` on the last step): the Gumbel
    temperature (5 -> 1) and the Gumbel noise scale follow it."""
    if total_steps <= 1:
        return end
    frac = min(max(step / (total_steps - 1), 0.0), 1.0)
    return start + (end - start) * frac


def micro_seed(seed: int, step: int, micro: int) -> int:
    """The RNG seed of global micro-batch `micro` of step `step`.

    Seeding each micro-batch by its global position (micro * world + rank) gives every process its own
    Gumbel noise (the same seed everywhere would draw identical noise on every rank) and makes N processes
    draw exactly the noise that one process accumulating N micro-batches draws.
    """
    return (seed * 1_000_003 + step) * 4_099 + micro


def step_batches(train: torch.Tensor, step: int, cfg: TrainConfig,
                 accelerator: Accelerator) -> list[dict[str, torch.Tensor]]:
    """This process's micro-batches of optimizer step `step`, on its device."""
    return [{"input_ids": ids.to(accelerator.device)} for ids in micro_batches(
        train, step, cfg.batch_size, cfg.grad_accum, cfg.seed, accelerator.process_index, accelerator.num_processes)]


def ranks_mean(stats: dict[str, float], accelerator: Accelerator) -> dict[str, float]:
    """A step's statistics averaged over the processes (the ranks' token counts match), so every rank logs the
    whole step and sees a NaN that any rank saw."""
    if accelerator.num_processes == 1:
        return stats
    values = torch.tensor(list(stats.values()), dtype=torch.float64, device=accelerator.device)
    return dict(zip(stats, accelerator.reduce(values, "mean").cpu().tolist()))


def chunked(sequences: torch.Tensor, batch_size: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """`sequences` (N, T) in order, as batches of `batch_size` on `device` (forward passes only)."""
    return [{"input_ids": sequences[i : i + batch_size].to(device)} for i in range(0, len(sequences), batch_size)]


def step_gradients(routed: RoutedModel, batches: list[dict[str, torch.Tensor]], cfg: TrainConfig,
                   forward: Callable | None = None, backward: Callable[[torch.Tensor], None] | None = None,
                   no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
                   seeds: list[int] | None = None) -> dict[str, float]:
    """Forward/backward every micro-batch of one optimizer step; gradients equal those of one big batch, but for
    the Gumbel noise, which each micro-batch draws from its own seed.

    `seeds`: one RNG seed per micro-batch, set before its forward (see micro_seed).
    """
    forward = forward or routed
    backward = backward or (lambda t: t.backward())
    alpha = cfg.alpha if cfg.trains_routers else 0.0
    n_pred = sum(float(L.target_mask(b).sum()) for b in batches)
    n_real = sum(float(L.token_mask(b).sum()) for b in batches)
    stats = {"loss": 0.0, "lm_loss": 0.0, "kd_loss": 0.0, "reg": 0.0}
    routed.reset_sparsity()
    for i, batch in enumerate(batches):
        dense = _dense_logits(routed, batch) if cfg.distill > 0 else None
        sync = no_sync() if (no_sync is not None and i < len(batches) - 1) else contextlib.nullcontext()
        if seeds is not None:
            torch.manual_seed(seeds[i])
        with sync:
            logits = forward(**batch).logits
            nll = L.nll_sum(logits, batch) / n_pred
            kd = L.kd_sum(logits, dense, batch) / n_pred if dense is not None else torch.zeros_like(nll)
            reg = L.regulariser_sum(routed, cfg.accounting, cfg.target_sparsity) / n_real
            total = (1.0 - cfg.distill) * nll + cfg.distill * kd + alpha * reg
            # A NaN goes on into the stats rather than returning early: under DDP every rank must take part in
            # the same gradient all-reduce and the stats' mean, and the caller stops every rank on that mean.
            backward(total)
        for key, value in (("loss", total), ("lm_loss", nll), ("kd_loss", kd), ("reg", reg)):
            stats[key] += float(value.detach())
    report = routed.sparsity()
    stats.update(sparsity=getattr(report, cfg.accounting), attention=report.attention, mlp=report.mlp)
    return stats


def steer_threshold(routed: RoutedModel, gain: float,
                    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Move the argmax threshold by gain * (realised - target) of the last step's batches; return the new one.

    A higher threshold executes more, so the step shrinks the error; `reduce` averages the realised
    sparsity over processes so that every rank keeps the same threshold.
    """
    realised = torch.tensor(getattr(routed.sparsity(), routed.config.accounting), dtype=torch.float64)
    if reduce is not None:
        realised = reduce(realised)
    routed.threshold = routed.threshold + gain * (float(realised) - routed.config.target_sparsity)
    return routed.threshold


@contextlib.contextmanager
def _dense(routed):
    """The frozen dense model: every module executes and no LoRA is applied."""
    disable = getattr(routed.model, "disable_adapter", None)
    with routed.using(policy="execute", track=False), (disable() if callable(disable) else contextlib.nullcontext()):
        yield


@torch.no_grad()
def _dense_logits(routed, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with _dense(routed):
        return routed(**batch).logits


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """`module` in eval mode for the block, then back in the mode it had."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@torch.no_grad()
def held_out_nll(routed: RoutedModel, sequences: torch.Tensor, batch_size: int, dense: bool = False) -> float:
    """Mean next-token NLL over `sequences` (N, T) with argmax routing (or the dense base model, no LoRA).

    Each packed sequence is one perplexity window, so this is the evaluation's perplexity function.
    """
    # Only the base model's mode matters here (LoRA dropout): without gradients the routers decide by argmax
    # whatever theirs is (RoutedModel.training_routers).
    with _eval_mode(routed.model), _dense(routed) if dense else contextlib.nullcontext():
        result = perplexity(routed, sequences.reshape(-1), seq_len=sequences.shape[1], batch_size=batch_size)
    return result["nll"]
