"""Calibrate the inference threshold so that argmax routing hits a target sparsity.

Under constant Gumbel noise (the paper's training) routers skip more than argmax does at evaluation;
one scalar shift of the skip/execute margin closes that gap without retraining. With the noise
annealed to zero (the default) the gap is small and the shift stays near zero, but the target is
still met on held-out text rather than on the training batches. Sparsity is monotone in the threshold
up to the knock-on effect of earlier decisions on later hidden states, so bisection on real
forward passes (not a quantile of first-pass logits) lands on the target.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch

from ..config import ACCOUNTINGS, check_sparsity
from ..errors import ConfigError, DataError
from . import policies


@torch.no_grad()
def measure(routed, batches: Iterable[dict[str, torch.Tensor]], accounting: str = "param") -> float:
    routed.reset_sparsity()
    for batch in batches:
        routed(**batch)
    report = routed.sparsity()
    if report.tokens == 0:  # every sparsity reads 0: a calibration would stop at its first threshold, silently
        raise DataError("the calibration batches hold no real tokens (their attention masks are all padding)")
    return getattr(report, accounting)


FAR = 0.01  # a calibration that ends further from its target than this says so
BRACKET = 30.0  # the first search interval, +-; trained routers' margins reach the hundreds: it widens on demand
WIDEST = 1e7


@torch.no_grad()
def calibrate_threshold(
    routed,
    batches: Iterable[dict[str, torch.Tensor]],
    target: float,
    accounting: str = "param",
    iterations: int = 14,
    tolerance: float = 0.002,
) -> float:
    """Set and return the threshold whose realised `accounting` sparsity on `batches` is closest to target.

    Bisection over [-30, 30]; when every step went one way (the target lies past an end), the interval widens
    fourfold past that end until it holds the target, and the bisection runs again inside. A search that ends
    further than FAR (or the tolerance, if wider) from the target warns, naming the sparsity kept. The caller's
    statistics and meter are left as they were."""
    check_sparsity(target)
    if accounting not in ACCOUNTINGS:
        raise ConfigError(f"accounting must be one of {ACCOUNTINGS}, got {accounting!r}")
    if not policies.reads_threshold(routed.policy):
        raise ConfigError("the routing policy in force does not read the threshold: calibrating it would change "
                          "nothing but the saved threshold")
    batches = list(batches)  # measured once per bisection step: a generator would be spent after the first
    if not batches:
        raise ValueError("calibration needs at least one batch of text")
    original = routed.threshold
    best = (float("inf"), original, float("nan"))  # distance to the target, threshold, sparsity

    def at(threshold: float) -> float:
        nonlocal best
        routed.threshold = threshold
        s = measure(routed, batches, accounting)
        if abs(s - target) < best[0]:
            best = (abs(s - target), threshold, s)
        return s

    def bisect(lo: float, hi: float) -> tuple[float, float] | None:  # higher threshold -> fewer skips
        for _ in range(iterations):
            mid = (lo + hi) / 2
            s = at(mid)
            if abs(s - target) <= tolerance:
                return None
            lo, hi = (mid, hi) if s > target else (lo, mid)
        return lo, hi

    # Deterministic argmax decisions (no Gumbel sample), on a meter of its own. A search cut short (an error,
    # Ctrl-C) leaves the caller's threshold, not a half-searched one.
    with routed.using(sample=False), routed.measuring():
        try:
            bracket = bisect(-BRACKET, BRACKET)
            if bracket is not None and BRACKET in (bracket[1], -bracket[0]):  # every step went one way
                side = 1.0 if bracket[1] == BRACKET else -1.0  # +: still too many skips at +30; -: too few at -30
                inner, outer = side * BRACKET, side * 4 * BRACKET
                while abs(outer) <= WIDEST:
                    s = at(outer)
                    if abs(s - target) <= tolerance or (s > target) != (side > 0):  # met, or crossed
                        break
                    inner, outer = outer, 4 * outer
                if abs(outer) <= WIDEST and best[0] > tolerance:
                    bisect(min(inner, outer), max(inner, outer))
        except BaseException:
            best = (0.0, original, float("nan"))
            raise
        finally:
            routed.threshold = best[1]
    if best[0] > max(FAR, tolerance) and _main_rank():  # stacklevel 3: past torch.no_grad's wrapper, at the caller
        warnings.warn(f"calibration to {accounting} sparsity {target:.1%} ended at {best[2]:.1%} on the calibration "
                      f"text, the nearest of the thresholds tried (kept: {best[1]:+.3f})", stacklevel=3)
    return best[1]


def _main_rank() -> bool:
    """Whether this process speaks for the run: every rank calibrates on the same text under torchrun, and one
    warning is enough."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
