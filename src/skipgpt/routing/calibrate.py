"""Calibrate the inference threshold so that argmax routing hits a target sparsity.

Under constant Gumbel noise (the paper's training) routers skip more than argmax does at evaluation;
one scalar shift of the skip/execute margin closes that gap without retraining. With the noise
annealed to zero (the default) the gap is small and the shift stays near zero, but the target is
still met on held-out text rather than on the training batches. Sparsity is monotone in the threshold
up to the knock-on effect of earlier decisions on later hidden states, so bisection on real
forward passes (not a quantile of first-pass logits) lands on the target.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

from ..config import check_sparsity


@contextlib.contextmanager
def argmax_routing(routed) -> Iterator[None]:
    """Deterministic argmax routing (routers in eval mode, no Gumbel sample) for the block; restores both
    and clears the sparsity statistics the calibration passes left behind."""
    was_training, saved_sample = routed.routers.training, routed.sample
    routed.routers.eval()
    routed.sample = False
    try:
        yield
    finally:
        routed.sample = saved_sample
        routed.routers.train(was_training)
        routed.reset_sparsity()


@torch.no_grad()
def measure(routed, batches: Iterable[dict[str, torch.Tensor]], accounting: str = "param") -> float:
    routed.reset_sparsity()
    for batch in batches:
        routed(**batch)
    return getattr(routed.sparsity(), accounting)


@torch.no_grad()
def calibrate_threshold(
    routed,
    batches: list[dict[str, torch.Tensor]],
    target: float,
    accounting: str = "param",
    iterations: int = 14,
    tolerance: float = 0.002,
) -> float:
    """Set and return the threshold whose realised `accounting` sparsity on `batches` is closest to target."""
    check_sparsity(target)
    if not batches:
        raise ValueError("calibration needs at least one batch of text")
    lo, hi = -30.0, 30.0  # higher threshold -> fewer skips
    best = (float("inf"), routed.threshold)
    with argmax_routing(routed):
        try:
            for _ in range(iterations):
                mid = (lo + hi) / 2
                routed.threshold = mid
                s = measure(routed, batches, accounting)
                if abs(s - target) < best[0]:
                    best = (abs(s - target), mid)
                if abs(s - target) <= tolerance:
                    break
                if s > target:
                    lo = mid
                else:
                    hi = mid
        finally:
            routed.threshold = best[1]
    return best[1]


@torch.no_grad()
def calibrate_input_scale(routed, batches: list[dict[str, torch.Tensor]], floor: float = 1e-2,
                          overwrite: bool = False) -> int:
    """Set every "channel"-normalised router's input_scale to the RMS of each input channel on `batches`.

    Runs before router tuning, while fresh routers still execute every module, so the scales are those
    of the dense model's hidden states. Pads (attention_mask 0) are left out.
    Routers whose scale is no longer all ones are left alone unless `overwrite`. Returns the number set.
    """
    # Scales already set (loaded or trained routers) belong to their weights: keep them unless told otherwise.
    routers = [r for r in routed.routers.modules()
               if hasattr(r, "input_scale") and (overwrite or bool((r.input_scale == 1).all()))]
    if not routers:
        return 0
    if not batches:
        raise ValueError("input-scale calibration needs at least one batch of text")
    sums = {id(r): torch.zeros_like(r.input_scale, dtype=torch.float64) for r in routers}
    counts = dict.fromkeys(sums, 0)

    def hook(module, args):
        x, mask = args[0].detach().to(torch.float64), routed.token_mask
        x = x[mask.to(x.device)] if mask is not None and mask.shape == x.shape[:-1] else x.reshape(-1, x.shape[-1])
        sums[id(module)] += x.pow(2).sum(0).to(sums[id(module)].device)
        counts[id(module)] += x.shape[0]

    handles = [r.register_forward_pre_hook(hook) for r in routers]
    saved_threshold = routed.threshold
    with argmax_routing(routed):
        routed.threshold = 0.0
        try:
            for r in routers:
                r.input_scale.fill_(1.0)
            for batch in batches:
                routed(**batch)
        finally:
            for h in handles:
                h.remove()
            routed.threshold = saved_threshold
    for r in routers:
        rms = (sums[id(r)] / max(counts[id(r)], 1)).sqrt().clamp_min(floor)
        r.input_scale.copy_(rms.to(r.input_scale.dtype))
    return len(routers)
