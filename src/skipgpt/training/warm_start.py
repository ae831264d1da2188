"""Warm start of the routers from dense-pass labels, before the Gumbel stage (`--warm-start N`).

A dense forward pass computes every module for every token, so each module's output y and its
forecaster's prediction f (0 for the paper's plain skip) are known: per module, the `target` share of
the real tokens with the smallest ||y - f||^2 (those the skip path gets most nearly right) are labelled
skip, the rest execute. The routers then take N Adam steps of cross-entropy on those labels. The base
model only runs forward: the routers read the dense pass's hidden states, so no gradient crosses it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..models.routed import RoutedModel
from ..routing.policies import EXECUTE, SKIP
from .forecast import capture


def skip_labels(error: torch.Tensor, real: torch.Tensor, share: float) -> torch.Tensor:
    """Bool (B, T): the `share` of the real tokens with the smallest error (B, T) are True (skip)."""
    n = int(round(share * int(real.sum())))
    skip = torch.zeros_like(real)
    if n == 0:
        return skip
    order = error.masked_fill(~real, float("inf")).flatten().argsort(stable=True)[:n]
    skip.view(-1)[order] = True
    return skip


@torch.no_grad()
def dense_labels(routed: RoutedModel, batch: dict[str, torch.Tensor], share: float
                 ) -> tuple[dict[tuple[int, str], torch.Tensor], dict[tuple[int, str], torch.Tensor], torch.Tensor]:
    """One dense pass over `batch`: ({(layer, kind): bool skip label (B, T)}, {(layer, kind): router input},
    real-token mask (B, T))."""
    router_inputs: dict[tuple[int, str], torch.Tensor] = {}

    def execute_and_record(layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        router_inputs[(layer, kind)] = x.detach()
        return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)

    with capture(routed) as (xn, y), routed.using(mode="masked", sample=False, track=False, policy=execute_and_record):
        routed(**batch, use_cache=False)
        real = routed.state.token_mask
        labels = {}
        for key, out in y.items():
            fc = None if routed.forecasters is None else routed.forecasters.get(*key)
            miss = out if fc is None else out - fc(xn[key])
            labels[key] = skip_labels(miss.float().pow(2).sum(-1), real, share)
    return labels, router_inputs, real


def warm_start(routed: RoutedModel, batches: Sequence[dict[str, torch.Tensor]], steps: int, target: float,
               lr: float) -> dict[str, float]:
    """Train the routers for `steps` steps on dense-pass labels at skip share `target` (see the module doc),
    cycling through `batches`; returns the real tokens read and the last step's agreement of the routers'
    argmax with the labels."""
    optimizer = torch.optim.Adam(routed.routers.parameters(), lr=lr)
    tokens, agree = 0, 0.0
    for step in range(steps):
        labels, router_inputs, real = dense_labels(routed, batches[step % len(batches)], target)
        tokens += int(real.sum())
        with torch.enable_grad():
            loss, hits = 0.0, 0.0
            for (layer, kind), skip in labels.items():
                logits = routed.routers.get(layer, kind)(router_inputs[(layer, kind)])[real]
                wanted = torch.where(skip[real], SKIP, EXECUTE)
                loss = loss + F.cross_entropy(logits.float(), wanted)
                hits += float((logits.argmax(-1) == wanted).float().mean())
            optimizer.zero_grad(set_to_none=True)
            (loss / len(labels)).backward()
            optimizer.step()
        agree = hits / len(labels)
    return {"tokens": tokens, "agreement": agree}
