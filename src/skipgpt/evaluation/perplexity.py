"""Perplexity as the pruning literature reports it (SparseGPT, LLM-Pruner, ShortGPT, SkipGPT).

The test split is joined into one text, tokenised once, and cut into non-overlapping windows of
`seq_len` tokens; the tail shorter than a window is dropped. Every window is scored on its own, so
the first token of a window has no context and is not predicted: a window scores seq_len - 1 tokens.
Perplexity is exp of the mean negative log-likelihood over all scored tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import DataError


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids (1-D) of the whole text, encoded once, with the tokenizer's own special tokens (a BOS at the
    start where the tokenizer adds one; SmolLM2's adds none), as the pruning literature's scripts do."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True).input_ids[0]
    return ids.long()


def max_length(model) -> int | None:
    """The model's maximum context, if its config says."""
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "model"):
        config = getattr(model.model, "config", None)
    return getattr(config, "max_position_embeddings", None)


def default_seq_len(model, wanted: int | None = None) -> int:
    """--seq-len, else 2048 capped by the model's maximum context."""
    if wanted:
        return int(wanted)
    limit = max_length(model)
    return min(2048, limit) if limit else 2048


@torch.no_grad()
def perplexity(
    model, input_ids: torch.Tensor, seq_len: int, limit: int | None = None, batch_size: int = 1, progress=None
) -> dict:
    """Token-level perplexity of `model` on non-overlapping windows of `input_ids` (a 1-D LongTensor).

    `model` is an HF causal LM or a RoutedModel (anything called with input_ids=(B, T) returning .logits).
    `limit` scores only the first `limit` windows. `progress`, if given, is called with the number of
    windows finished after each batch. Returns dict(ppl, nll, tokens, seq_len, windows), nll being the
    mean per scored token.
    """
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be 1-D, got shape {tuple(input_ids.shape)}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    windows = input_ids.numel() // seq_len
    if limit is not None:
        windows = min(windows, int(limit))
    if windows < 1:
        raise DataError(f"the text has {input_ids.numel()} tokens, fewer than one window of {seq_len}")
    device = next(model.parameters()).device
    chunks = input_ids[: windows * seq_len].view(windows, seq_len)
    total_nll = torch.zeros((), dtype=torch.float64)
    scored = 0
    for start in range(0, windows, batch_size):
        batch = chunks[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits
        # float32 log-softmax even for a half-precision model: the sum runs over the whole vocabulary.
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.double().cpu()
        scored += batch[:, 1:].numel()
        if progress is not None:
            progress(batch.shape[0])
    mean = float(total_nll) / scored
    return {"ppl": math.exp(mean), "nll": mean, "tokens": scored, "seq_len": int(seq_len), "windows": int(windows)}
