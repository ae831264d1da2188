"""Sparse execution: compute a module only for the tokens whose router says execute.

Same decisions and same outputs as the masked path (which runs every module and multiplies its
output by the gate), but skipped work is never done:
- MLP: the executing tokens of the whole batch are gathered into one (N, hidden) matrix, normed,
  sent through the MLP and scatter-added onto the residual stream; the others pass through.
- Attention: keys and values are projected for every token (a token that skips attention stays
  visible to later tokens, as in training, and goes into the KV cache); queries, the attention
  product and the output projection run only for executing tokens. For the attention product each
  batch row keeps its executing tokens in order, padded to the longest row with zero queries whose
  output is dropped (the projections see executing tokens only); every query keeps its true position
  for RoPE, and its row of the 4-D attention mask (causal, padding, sliding window) is gathered with it.
  Scaled-dot-product-attention with that explicit mask covers the batch, in blocks of QUERY_BLOCK
  gathered queries that each read only the keys up to their last position: one call with an explicit
  mask computes the whole causal square, which the dense model's is_causal kernel does not.
- Fast paths: when every token executes, the stock HF module runs on the full batch (no gather,
  no scatter, numerically the unmodified model); when none executes, nothing runs except the
  key/value projection needed for the cache. In decode (one token per row) a module saves work only
  when every row skips it: the weights are read once whatever the number of rows, so when rows
  disagree every row computes the module and the gate drops the idle rows' output (what masked
  mode does), which measured faster than gathering the executing rows. With batch 1 a skipped
  module costs nothing but its keys and values.

Attention that this plain-SDPA path cannot reproduce exactly (logit soft-capping, sandwich-norm
models such as Gemma 2, flash-attention's 2-D or absent masks), or whose weights the caller asked for
(output_attentions), runs dense and is gated, so results stay exact there and only the MLP saves compute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .adapters import LayerParts


def run_attention(parts: LayerParts, xn: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The layer's attention module on every token of its normalised input xn, its output norm included
    (what the gate multiplies)."""
    h = parts.attn(hidden_states=xn, **kwargs)[0]
    return parts.attn_out_norm(h) if parts.attn_out_norm is not None else h


def run_mlp(parts: LayerParts, xn: torch.Tensor) -> torch.Tensor:
    """The layer's MLP module on every row of its normalised input xn, its output norm included."""
    h = parts.mlp(xn)
    return parts.mlp_out_norm(h) if parts.mlp_out_norm is not None else h


def gated(x: torch.Tensor, out: torch.Tensor, g: torch.Tensor, forecast: torch.Tensor | None) -> torch.Tensor:
    """The masked update of the residual x by a module output `out` under gate g (B, T): x + out where the
    module executes, x (+ the forecast, informed skipping) where it is skipped. A bool decision without a
    forecast is one fused x + out * g (6.8 us against 12.0 for a select on one token, 3.2 for the dense
    model's plain add; exact, since a module's output on finite input is finite and times 0 adds nothing);
    with a forecast it selects; a float training gate mixes, so the straight-through gradient reaches the
    router."""
    if g.dtype == torch.bool:
        if forecast is None:
            return torch.addcmul(x, out, g.unsqueeze(-1))
        return torch.where(g.unsqueeze(-1), x + out, x + forecast)
    gf = g.unsqueeze(-1).to(x.dtype)
    y = x + out * gf
    return y if forecast is None else y + forecast * (1.0 - gf)


# -- MLP ---------------------------------------------------------------------------------------------------


def _count(execute: torch.Tensor) -> int:
    """Number of executing tokens (one host read; a single token needs no reduction). count_nonzero is 4
    operators where a sum of bools, which converts them to integers first, is 9."""
    return int(execute.item()) if execute.numel() == 1 else int(execute.count_nonzero())


def sparse_mlp(parts: LayerParts, x: torch.Tensor, execute: torch.Tensor) -> torch.Tensor:
    """x plus the MLP output of the tokens whose bool gate execute (B, T) is True; the others pass through."""
    count = _count(execute)
    if count == 0:
        return x
    if count == execute.numel():
        return x + run_mlp(parts, parts.mlp_norm(x))
    if x.shape[1] == 1:
        # Decode with rows that disagree: the weights are read once whatever the number of rows, so
        # computing every row and gating is cheaper than gathering and scattering a few.
        return gated(x, run_mlp(parts, parts.mlp_norm(x)), execute, None)
    flat = x.reshape(-1, x.shape[-1])
    rows = execute.reshape(-1).nonzero().squeeze(1)
    h = run_mlp(parts, parts.mlp_norm(flat.index_select(0, rows)))
    return flat.index_add(0, rows, h.to(flat.dtype)).view_as(x)


# -- attention ---------------------------------------------------------------------------------------------


def supports_sparse_attention(parts: LayerParts, attention_mask) -> bool:
    """Whether the gathered-query SDPA path reproduces this layer's attention exactly."""
    attn = parts.attn
    config = getattr(attn, "config", None)
    if parts.sandwich or getattr(config, "attn_logit_softcapping", None) is not None:
        return False
    if not all(hasattr(attn, a) for a in ("layer_idx", "scaling", "head_dim")):
        return False
    if attention_mask is None:
        # Only SDPA's mask function drops the mask for plain causal attention aligned at the first key, which is
        # what _query_mask rebuilds; flash-attention drops it whenever nothing is padded, leaving the kernel to
        # align the causal mask with the last key (cached keys before the chunk) and to apply a sliding window.
        return getattr(config, "_attn_implementation", None) == "sdpa"
    # a 4-D mask broadcast over heads, as HF builds it
    return isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and attention_mask.shape[1] == 1


def _weights_asked(parts: LayerParts, kwargs: dict) -> bool:
    """Whether this forward records attention weights: HF's collector reads the call's output_attentions,
    else the model config's (from_pretrained(..., output_attentions=True) reaches no layer as a kwarg)."""
    asked = kwargs.get("output_attentions")
    if asked is None:
        asked = getattr(getattr(parts.attn, "config", None), "output_attentions", False)
    return bool(asked)


def sparse_attention(parts: LayerParts, x: torch.Tensor, execute: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """x plus the attention output of the tokens whose bool gate execute (B, T) is True; keys and values of
    all tokens."""
    batch, seq, _ = x.shape
    count = _count(execute)
    cache = kwargs.get("cache")
    mask = kwargs.get("attention_mask")
    if count == batch * seq:
        return x + run_attention(parts, parts.attn_norm(x), kwargs)
    if (seq == 1 and count > 0) or _weights_asked(parts, kwargs) or not supports_sparse_attention(parts, mask):
        # Decode with rows that disagree: the projections read the weights once for all rows, and the
        # attention product over the cache is per row anyway, so every row runs and the gate drops the
        # idle ones' output (exact, and no gather of queries, cos/sin and mask rows). Attention weights
        # asked for are recorded from the attention module itself, so it runs whole then too.
        return gated(x, run_attention(parts, parts.attn_norm(x), kwargs), execute, None)
    if count == 0 and cache is None:
        return x  # nobody queries this layer and nothing is cached: its keys are never read

    attn = parts.attn
    xn = parts.attn_norm(x)
    cos, sin = kwargs["position_embeddings"]
    k = _heads(attn.k_proj(xn), attn.head_dim, getattr(attn, "k_norm", None))
    v = _heads(attn.v_proj(xn), attn.head_dim, None)
    k = _rotate(k, cos, sin)
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx)
    if count == 0:
        return x

    rows, order, valid = _executing_positions(execute)
    # every gathered query's index in the flattened (batch * seq) grid: where its inputs come from and
    # where its output goes
    flat_index = order + (torch.arange(batch, device=x.device) if rows is None else rows)[:, None] * seq
    # Padding slots of the (B', n) query grid need no projections: only executing tokens go through q_proj
    # and o_proj, and a padding slot's query is zero (its attention output is computed and dropped).
    slots = None if valid is None else valid.reshape(-1).nonzero().squeeze(1)
    targets = flat_index.reshape(-1) if slots is None else flat_index.reshape(-1).index_select(0, slots)
    q = attn.q_proj(xn.reshape(-1, xn.shape[-1]).index_select(0, targets))
    if slots is not None:
        q = q.new_zeros(order.numel(), q.shape[-1]).index_copy_(0, slots, q)
    q = _heads(q.view(*order.shape, -1), attn.head_dim, getattr(attn, "q_norm", None))
    q = _rotate(q, _gather_tokens(cos, order, flat_index), _gather_tokens(sin, order, flat_index))
    if rows is not None:
        k, v = k[rows], v[rows]
    out = _causal_blocks(q, k, v, _query_mask(mask, order, flat_index, k.shape[2]), order, seq, attn.scaling)
    out = out.transpose(1, 2).reshape(order.numel(), -1)
    h = attn.o_proj(out if slots is None else out.index_select(0, slots))
    flat = x.reshape(-1, x.shape[-1])
    return flat.index_add(0, targets, h.to(flat.dtype)).view_as(x)


def _executing_positions(execute: torch.Tensor):
    """Which tokens a gathered attention call queries: (rows, order, valid).

    rows:  the batch rows with at least one executing token (None: all of them);
    order: (B', n) positions per row, its executing ones in order, padded with non-executing positions
           (computed, then dropped) up to the longest row;
    valid: (B', n) which entries of order execute (None: all, no padding).
    One row, the chat case, needs none of the per-row bookkeeping."""
    if execute.shape[0] == 1:
        return None, execute.nonzero()[:, 1].unsqueeze(0), None
    per_row = execute.sum(dim=1)
    rows = per_row.nonzero().squeeze(1)
    longest = int(per_row.max())
    order = torch.sort((~execute[rows]).to(torch.uint8), dim=1, stable=True).indices[:, :longest]
    valid = torch.arange(longest, device=execute.device)[None, :] < per_row[rows][:, None]
    return (None if rows.numel() == execute.shape[0] else rows), order, (None if bool(valid.all()) else valid)


QUERY_BLOCK = 128  # gathered queries per attention call in prefill


def _causal_blocks(q, k, v, mask, order: torch.Tensor, seq: int, scale: float) -> torch.Tensor:
    """Attention of gathered queries in blocks of QUERY_BLOCK columns, each over only the keys up to its
    last position: the explicit mask keeps SDPA from skipping the causal upper triangle the way the dense
    model's is_causal does, so one call would pay for the whole square. Keys past a query's position are
    masked anyway (causal LM), so dropping them is exact."""
    gqa = q.shape[1] != k.shape[1]
    n = q.shape[2]
    if n < 2 * QUERY_BLOCK:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    past = k.shape[2] - seq
    # furthest position among the first j + 1 gathered columns of every row (padding columns included)
    reach = order.max(dim=0).values.cummax(dim=0).values
    starts = list(range(0, n, QUERY_BLOCK))
    ends = [min(start + QUERY_BLOCK, n) for start in starts]
    keys = (reach[torch.tensor(ends) - 1] + past + 1).tolist()
    outs = []
    for start, end, key in zip(starts, ends, keys):
        block_mask = None if mask is None else mask[:, :, start:end, :key]
        outs.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :key], v[:, :, :key],
                                                   attn_mask=block_mask, scale=scale, enable_gqa=gqa))
    return torch.cat(outs, dim=2)


def _heads(projected: torch.Tensor, head_dim: int, norm) -> torch.Tensor:
    """(B, T, heads*d) -> (B, heads, T, d), with the per-head q/k norm of Qwen3-style models."""
    h = projected.view(*projected.shape[:-1], -1, head_dim)
    if norm is not None:
        h = norm(h)
    return h.transpose(1, 2)


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as LLaMA-family models apply it (rotate-half convention), cos/sin of shape (B, T, d)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = t.shape[-1] // 2
    rotated = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
    return t * cos + rotated * sin


def _gather_tokens(t: torch.Tensor, order: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    """t (B, T, C), or (1, T, C) shared by every row -> (B', n, C) at the gathered queries. One index_select
    of whole rows: 120 us for 450 of 512 rows of 576, where gather with an index expanded over C took 660."""
    index = order if t.shape[0] == 1 else flat_index
    return t.reshape(-1, t.shape[-1]).index_select(0, index.reshape(-1)).view(*order.shape, t.shape[-1])


def _query_mask(mask, order: torch.Tensor, flat_index: torch.Tensor, keys: int) -> torch.Tensor | None:
    """Rows of the attention mask (B or 1, 1, T, keys) for the gathered queries, shape (B', 1, n, keys)."""
    if mask is None:
        # HF passes no mask only for plain causal attention aligned at the first key (SDPA's is_causal).
        return torch.arange(keys, device=order.device)[None, None, None, :] <= order[:, None, :, None]
    return _gather_tokens(mask[:, 0], order, flat_index).unsqueeze(1)
