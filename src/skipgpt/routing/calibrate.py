"""Calibrate the inference threshold so that argmax routing hits a target sparsity.

Under constant Gumbel noise (the paper's training) routers skip more than argmax does at evaluation;
one scalar shift of the skip/execute margin closes that gap without retraining. With the noise
annealed to zero (the default) the gap is small and the shift stays near zero, but the target is
still met on held-out text rather than on the training batches. Sparsity is monotone in the threshold
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
    batches: Iterable[dict[str, torch.Tensor]],
    target: float,
    accounting: str = "param",
    iterations: int = 14,
    tolerance: float = 0.002,
) -> float:
    """Set and return the threshold whose realised `accounting` sparsity on `batches` is closest to target."""
    check_sparsity(target)
    batches = list(batches)  # measured once per bisection step: a generator would be spent after the first
    if not batches:
        raise ValueError("calibration needs at least one batch of text")
    lo, hi = -30.0, 30.0  # higher threshold -> fewer skips
    original = routed.threshold
    best = (float("inf"), original)
    # Deterministic argmax decisions (no Gumbel sample), statistics on; they are cleared afterwards. A search
    # cut short (an error, Ctrl-C) leaves the caller's threshold, not a half-searched one.
    with routed.using(sample=False, track=True):
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
        except BaseException:
            best = (0.0, original)
            raise
        finally:
            routed.threshold = best[1]
            routed.reset_sparsity()
    return best[1]
