"""Loss terms, written as sums so gradient accumulation can normalise them over the whole step.

The objective of one optimizer step over sequences b with n_b real tokens is

    (1 - distill) * sum(NLL) / N  +  distill * sum(KL(dense || routed)) / N
      + alpha * sum_b n_b * |target - sparsity_b| / sum_b n_b
      [ + alpha * sum_b n_b * |attention_target - attention_b| / sum_b n_b ]

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


def sequence_sparsity(routed, *accountings: str) -> tuple[torch.Tensor, ...]:
    """Differentiable realised sparsity of each sequence of the last forward, one (B,) tensor per
    accounting asked for, then the (B,) real-token counts.

    An accounting is param, module or flop, or attention / mlp for the skip rate of one module kind.
    Reads the gates whatever produced them (routers or a policy with float gates), so the
    regulariser trains whichever parameters the gates depend on.
    """
    gates, mask, context = routed.last_forward()
    values, counts = [[] for _ in accountings], []
    for b in range(gates.shape[2]):
        totals = skip_totals(gates[:, :, b : b + 1], mask[b : b + 1], context[b : b + 1], routed.costs)
        r = ratios(totals, routed.costs)
        for column, accounting in zip(values, accountings):
            column.append(r[accounting])
        counts.append(totals["tokens"])
    return (*(torch.stack(column) for column in values), torch.stack(counts))


def regulariser_sum(routed, accounting: str, target: float, attention_target: float | None = None) -> torch.Tensor:
    """sum_b n_b * |target - sparsity_b| for the last forward (divide by the step's real-token count).

    With `attention_target`, also sum_b n_b * |attention_target - attention skip rate_b|.
    """
    if attention_target is None:
        values, counts = sequence_sparsity(routed, accounting)
        return (counts * (target - values).abs()).sum()
    values, attention, counts = sequence_sparsity(routed, accounting, "attention")
    return (counts * ((target - values).abs() + (attention_target - attention).abs())).sum()
