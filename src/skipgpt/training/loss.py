"""Loss terms, written as sums so gradient accumulation can normalise them over the whole step.

The objective of one optimizer step over sequences b with n_b real tokens is

    (1 - distill) * sum(NLL) / N  +  distill * sum(KL(dense || routed)) / N
      + alpha * sum_b n_b * |target - sparsity_b| / sum_b n_b

where N counts predicted tokens and sparsity_b is sequence b's realised sparsity under the chosen
accounting. Every term is a sum over sequences divided by a step-wide count, so k micro-batches
give exactly the gradient of one k-times larger batch. The regulariser is per sequence (not per
batch) for the same reason: |target - mean| does not split into micro-batches, a mean of
|target - sparsity_b| does; with one sequence per device, as long-context router tuning runs, the
two coincide.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..routing.policies import reads_threshold
from ..routing.sparsity import ratios, skip_totals


def token_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    mask = batch.get("attention_mask")
    return torch.ones_like(batch["input_ids"], dtype=torch.bool) if mask is None else mask.bool()


def target_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T-1): which next-token predictions count (both the context and the target are real tokens)."""
    m = token_mask(batch)
    return m[:, 1:] & m[:, :-1]


def nll_sum(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token negative log-likelihood over real tokens."""
    mask = target_mask(batch)
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    return (nll * mask).sum()


def kd_sum(logits: torch.Tensor, dense_logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed KL(dense || routed) of the next-token distributions over the same positions as nll_sum."""
    mask = target_mask(batch)
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    logq = F.log_softmax(dense_logits[:, :-1].float(), dim=-1)
    kl = (logq.exp() * (logq - logp)).sum(-1)
    return (kl * mask).sum()


def sequence_sparsity(routed, accounting: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable realised sparsity (B,) of each sequence of the last forward, and its real-token counts (B,).

    Reads the gates whatever produced them (routers or a policy with float gates), so the
    regulariser trains whichever parameters the gates depend on. Net of the routers' own cost (a constant in the
    gates: it moves the target by their share, so trained routers land near the net sparsity calibration then
    meets) where a threshold sets the rate; not under MoD-D's fixed capacity, where it moved the scores instead
    (a tiny model's MoD-D then skipped 2% of tokens, not 25%).
    """
    gates, mask, context = routed.state.stacked()
    share = routed.state.router_share if reads_threshold(routed.policy) else 0.0
    values, counts = [], []
    for b in range(gates.shape[2]):
        totals = skip_totals(gates[:, :, b : b + 1], mask[b : b + 1], context[b : b + 1], routed.costs, share)
        values.append(ratios(totals, routed.costs)[accounting])
        counts.append(totals["tokens"])
    return torch.stack(values), torch.stack(counts)


def regulariser_sum(routed, accounting: str, target: float) -> torch.Tensor:
    """sum_b n_b * |target - sparsity_b| for the last forward (divide by the step's real-token count)."""
    values, counts = sequence_sparsity(routed, accounting)
    return (counts * (target - values).abs()).sum()
