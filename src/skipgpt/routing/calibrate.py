"""Calibrate the inference threshold so that argmax routing hits a target sparsity.

Training sees Gumbel noise, which skips more than argmax does at evaluation; one scalar shift of
the skip/execute margin closes that gap without retraining. Sparsity is monotone in the threshold
up to the knock-on effect of earlier decisions on later hidden states, so bisection on real
forward passes (not a quantile of first-pass logits) lands on the target.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..config import check_sparsity


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
    was_training = routed.routers.training
    routed.routers.eval()
    saved_sample = routed.sample
    routed.sample = False
    lo, hi = -30.0, 30.0  # higher threshold -> fewer skips
    best = (float("inf"), routed.threshold)
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
        routed.sample = saved_sample
        routed.routers.train(was_training)
        routed.reset_sparsity()
    return best[1]
