"""Sparse execution: compute a module only for the tokens whose router says execute.

Same decisions and same outputs as the masked path (which runs every module and multiplies its
output by the gate), but skipped work is never done:
- MLP: the executing tokens of the whole batch are gathered into one (N, hidden) matrix, normed,
  sent through the MLP and scatter-added onto the residual stream; the others pass through.
- Attention: keys and values are projected for every token (a token that skips attention stays
  visible to later tokens, as in training, and goes into the KV cache); queries, the attention
  product and the output projection run only for executing tokens. Each batch row keeps its
  executing tokens in order, padded to the longest row; every query keeps its true position for
  RoPE, and its row of the 4-D attention mask (causal, padding, sliding window) is gathered with it.
  One scaled-dot-product-attention call with that explicit mask covers the batch: measured on CPU
  it costs about the same as the causal kernel per query row, while splitting queries into
  position chunks to shorten key ranges did not pay for the extra calls.
- Fast paths: when every token executes, the stock HF module runs on the full batch (no gather,
  no scatter, numerically the unmodified model); when none executes, nothing runs except the
  key/value projection needed for the cache. In decode (one token per row) only the rows that
  execute compute projections and MLP; the attention product runs over the cache of every row with
  a zero query for idle rows, because gathering the executing rows' cache would copy it each step.
  With batch 1 a skipped module costs nothing but its keys and values.

Attention that this plain-SDPA path cannot reproduce exactly (logit soft-capping, sandwich-norm
models such as Gemma 2, flash-attention's 2-D masks) runs dense and is gated, so results stay exact
there and only the MLP saves compute.
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


# -- MLP ---------------------------------------------------------------------------------------------------


def sparse_mlp(parts: LayerParts, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """x plus the MLP output of the tokens whose gate g (B, T) is 1; the others pass through."""
    execute = g > 0.5
    count = int(execute.sum())
    if count == 0:
        return x
    if count == execute.numel():
        return x + run_mlp(parts, parts.mlp_norm(x))
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
    return attention_mask is None or (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4)


def sparse_attention(parts: LayerParts, x: torch.Tensor, g: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """x plus the attention output of the tokens whose gate g (B, T) is 1; keys and values of all tokens."""
    execute = g > 0.5
    batch, seq, _ = x.shape
    per_row = execute.sum(dim=1)
    count = int(per_row.sum())
    cache = kwargs.get("cache")
    mask = kwargs.get("attention_mask")
    if count == batch * seq:
        return x + run_attention(parts, parts.attn_norm(x), kwargs)
    if not supports_sparse_attention(parts, mask):
        return x + run_attention(parts, parts.attn_norm(x), kwargs) * g.unsqueeze(-1).to(x.dtype)
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

    # Rows with at least one executing token; inside each, executing positions in order, padded
    # with non-executing positions (computed, then dropped) up to the longest row.
    rows = per_row.nonzero().squeeze(1)
    longest = int(per_row.max())
    order = torch.sort((~execute[rows]).to(torch.uint8), dim=1, stable=True).indices[:, :longest]
    valid = torch.arange(longest, device=x.device)[None, :] < per_row[rows][:, None]
    all_rows = rows.numel() == batch

    xq = _gather_tokens(xn if all_rows else xn[rows], order)
    q = _heads(attn.q_proj(xq), attn.head_dim, getattr(attn, "q_norm", None))
    q = _rotate(q, _gather_tokens(_rows(cos, rows, batch), order), _gather_tokens(_rows(sin, rows, batch), order))
    gqa = q.shape[1] != k.shape[1]
    if not all_rows and seq == 1:
        # Decode: copying the executing rows' cached keys would move more memory than letting the
        # idle rows attend with a zero query (one token each); their results are dropped.
        full = q.new_zeros(batch, *q.shape[1:]).index_copy_(0, rows, q)
        out = F.scaled_dot_product_attention(full, k, v, attn_mask=mask, scale=attn.scaling, enable_gqa=gqa)
        out = out.index_select(0, rows)
    else:
        if not all_rows:
            k, v = k[rows], v[rows]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=_query_mask(mask, rows, batch, order, seq, k.shape[2]),
            scale=attn.scaling, enable_gqa=gqa,
        )
    h = attn.o_proj(out.transpose(1, 2).reshape(rows.numel(), longest, -1))

    flat_index = (rows[:, None] * seq + order)
    if not bool(valid.all()):
        h, flat_index = h[valid], flat_index[valid]
    h = h.reshape(-1, h.shape[-1])
    flat = x.reshape(-1, x.shape[-1])
    return flat.index_add(0, flat_index.reshape(-1), h.to(flat.dtype)).view_as(x)


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


def _rows(t: torch.Tensor, rows: torch.Tensor, batch: int) -> torch.Tensor:
    """Select batch rows of a tensor whose batch dim may be broadcast (size 1)."""
    if t.shape[0] == 1:
        return t.expand(rows.numel(), *t.shape[1:])
    return t if rows.numel() == batch else t[rows]


def _gather_tokens(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """t (B', T, C) -> (B', n, C) at token positions order (B', n)."""
    return t.gather(1, order[:, :, None].expand(-1, -1, t.shape[-1]))


def _query_mask(mask, rows, batch: int, order: torch.Tensor, seq: int, keys: int) -> torch.Tensor | None:
    """Rows of the attention mask for the gathered queries, shape (B', 1, n, keys)."""
    if mask is None:
        if seq == 1:
            return None  # one new token sees every cached key
        # HF passes no mask only for plain causal attention aligned at the first key (SDPA's is_causal).
        return torch.arange(keys, device=order.device)[None, None, None, :] <= order[:, None, :, None]
    mask = _rows(mask, rows, batch)
    heads = mask.shape[1]
    index = order[:, None, :, None].expand(-1, heads, -1, mask.shape[-1])
    return mask.gather(2, index)
