"""Perplexity as the pruning literature reports it (SparseGPT, LLM-Pruner, ShortGPT, SkipGPT).

The test split is joined into one text, tokenised once, and cut into non-overlapping windows of
`seq_len` tokens; the tail shorter than a window is dropped. Every window is scored on its own, so
the first token of a window has no context and is not predicted: a window scores seq_len - 1 tokens.
Perplexity is exp of the mean negative log-likelihood over all scored tokens.

The result also splits the same tokens by how much context they had (1-3, 4-15, 16-63, ... tokens, powers of
4): a model that loses long-range ability shows it there, while the single number mixes it with the
window length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError


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


def check_context(model, positions: int, what: str) -> None:
    """ConfigError unless `positions` fit the model's maximum context (none known: no check). Past it the
    positions leave the range the model was trained on: wrong numbers, silently, or memory runs out."""
    limit = max_length(model)
    if limit and positions > limit:
        raise ConfigError(f"{what} exceed the model's maximum context of {limit} tokens")


def default_seq_len(model, wanted: int | None = None, default: int = 2048) -> int:
    """The window length: `wanted` (refused past the model's maximum context), else `default` capped by it."""
    if wanted is not None:  # 0 is a mistake to refuse, not "the default"
        if wanted < 2:
            raise ConfigError(f"windows of {wanted} tokens score nothing; give at least 2 (a window scores all "
                              "its tokens but the first)")
        check_context(model, wanted, f"windows of {wanted} tokens")
        return int(wanted)
    limit = max_length(model)
    return min(default, limit) if limit else default


def context_buckets(seq_len: int) -> list[tuple[int, int]]:
    """Half-open ranges [lo, hi) of context length (tokens before the predicted one): powers of 4 up to the
    window, so 2,048-token windows give [1, 4), [4, 16), ..., [1024, 2048)."""
    edges = [1]
    while edges[-1] * 4 < seq_len:
        edges.append(edges[-1] * 4)
    edges.append(seq_len)
    return list(zip(edges[:-1], edges[1:]))


def check_one_window(input_ids: torch.Tensor, seq_len: int, what: str = "the text") -> None:
    """DataError unless the ids fill at least one window of seq_len tokens."""
    if input_ids.numel() < seq_len:
        raise DataError(f"{what} has {input_ids.numel()} tokens, fewer than one window of {seq_len}")


@torch.no_grad()
def perplexity(
    model, input_ids: torch.Tensor, seq_len: int, limit: int | None = None, batch_size: int = 1, progress=None
) -> dict:
    """Token-level perplexity of `model` on non-overlapping windows of `input_ids` (a 1-D LongTensor).

    `model` is an HF causal LM or a RoutedModel (anything called with input_ids=(B, T) returning .logits).
    `limit` scores only the first `limit` windows. `progress`, if given, is called with the number of
    windows finished after each batch. Returns dict(ppl, nll, tokens, seq_len, windows, by_context), nll
    being the mean per scored token and by_context a list of dict(context=[lo, hi), ppl, nll, tokens) over
    `context_buckets(seq_len)`.
    """
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be 1-D, got shape {tuple(input_ids.shape)}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    windows = input_ids.numel() // seq_len
    if limit is not None:
        windows = min(windows, int(limit))
    if windows < 1:
        check_one_window(input_ids, seq_len)
        raise ValueError(f"limit must be at least 1 window, got {limit}")
    device = next(model.parameters()).device
    chunks = input_ids[: windows * seq_len].view(windows, seq_len)
    buckets = context_buckets(seq_len)
    # Target t of a window (t >= 1) is predicted from t tokens of context.
    bucket_of = torch.bucketize(torch.arange(1, seq_len), torch.tensor([hi for _, hi in buckets[:-1]]), right=True)
    sums = torch.zeros(len(buckets), dtype=torch.float64)
    for start in range(0, windows, batch_size):
        batch = chunks[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits
        # float32 log-softmax even for a half-precision model: the sum runs over the whole vocabulary.
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="none"
        )
        per_target = nll.view(batch.shape[0], seq_len - 1).double().sum(0).cpu()
        sums.index_add_(0, bucket_of, per_target)
        if progress is not None:
            progress(batch.shape[0])
    counts = torch.bincount(bucket_of, minlength=len(buckets)) * windows
    scored = int(counts.sum())
    mean = float(sums.sum()) / scored
    by_context = [
        {"context": [lo, hi], "ppl": math.exp(float(s) / int(n)), "nll": float(s) / int(n), "tokens": int(n)}
        for (lo, hi), s, n in zip(buckets, sums, counts)
    ]
    return {"ppl": math.exp(mean), "nll": mean, "tokens": scored, "seq_len": int(seq_len), "windows": int(windows),
            "by_context": by_context}
