"""Sparsity accounting: what fraction of the decoder a forward pass skipped.

Three ratios, all over non-pad tokens only:
- module: skipped module executions / all module executions (attention and MLP weigh the same);
- param:  skipped decoder parameters / all decoder parameters, averaged over tokens (the paper's);
- flop:   skipped FLOPs / all decoder FLOPs, under this project's semantics that a skipped attention
          still computes its keys and values (they stay visible to later tokens).
param and flop are net of what skipping adds: the routers, which run on every token when they decide (charged
per real token; 0.03% of SmolLM2's decoder for linear routers, 4.70% for MLP ones), and with forecasters
(informed skipping) a skipped module saves its own cost minus its forecaster's. So a model that skips nothing
has a slightly negative param and flop sparsity. The module ratio counts skip decisions.
Real tokens are those the attention mask marks: in batched generate(), a row that has finished goes on
receiving pad tokens under mask 1 (Hugging Face's convention), which are computed and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModuleCosts:
    """Per-layer costs, each a float64 tensor of shape (num_layers,)."""

    attn_params: torch.Tensor  # all attention weights, its input norm included
    mlp_params: torch.Tensor  # all MLP weights, its input norm included
    attn_flops: torch.Tensor  # per executing token: q and o projections (norms are elementwise: not counted)
    attn_kv_flops: torch.Tensor  # per token, always paid: k and v projections
    attn_ctx_flops: torch.Tensor  # per executing token and per visible key: QK^T and AV
    mlp_flops: torch.Tensor  # per executing token
    forecast_params: torch.Tensor  # per skipping token, of each module's forecaster (0 = plain skip)
    forecast_flops: torch.Tensor  # per skipping token
    attn_window: torch.Tensor  # most keys a token sees: the sliding window, inf where attention is global
    router_params: torch.Tensor  # per token whose routers decide: the layer's attention and MLP routers
    router_flops: torch.Tensor  # the same, 2 per parameter

    @property
    def num_layers(self) -> int:
        return self.attn_params.numel()

    def to(self, device: torch.device | str) -> ModuleCosts:
        return ModuleCosts(**{k: v.to(device) for k, v in self.__dict__.items()})


def skip_totals(
    gates: torch.Tensor, token_mask: torch.Tensor, context: torch.Tensor, costs: ModuleCosts, routers: float = 0.0
) -> dict[str, torch.Tensor]:
    """Sums behind every ratio for one forward pass (differentiable in `gates`).

    gates:      (L, 2, B, T) execute gates, index 0 attention, 1 MLP.
    token_mask: (B, T) 1 for real tokens, 0 for pads.
    context:    (B, T) number of real keys each token could attend to (its position + 1, less any padding before
                it); a sliding-window layer
                reads at most its window of them.
    routers:    the share of the routers' cost each real token paid (1: they made every decision; 0: a fixed or
                random policy did; see policies.router_share).
    """
    m = token_mask.to(gates.dtype)
    skip = (1.0 - gates) * m  # (L, 2, B, T)
    per_module = skip.sum(dim=(2, 3))  # (L, 2)
    c = costs.to(gates.device)
    dt = gates.dtype
    keys = torch.minimum(context.to(dt)[None], c.attn_window.to(dt)[:, None, None])  # (L, B, T)
    attn_tok = c.attn_flops.to(dt)[:, None, None] + c.attn_ctx_flops.to(dt)[:, None, None] * keys
    flop_total = (m * attn_tok).sum() + m.sum() * (c.attn_kv_flops + c.mlp_flops).sum().to(dt)
    fc_flops, fc_params = c.forecast_flops.to(dt), c.forecast_params.to(dt)
    flop_skipped = ((skip[:, 0] * (attn_tok - fc_flops[:, None, None])).sum()
                    + (skip[:, 1].sum(dim=(1, 2)) * (c.mlp_flops.to(dt) - fc_flops)).sum())
    param_skipped = ((per_module[:, 0] * (c.attn_params.to(dt) - fc_params)).sum()
                     + (per_module[:, 1] * (c.mlp_params.to(dt) - fc_params)).sum())
    routed_tokens = m.sum() * routers
    param_skipped = param_skipped - routed_tokens * c.router_params.sum().to(dt)
    flop_skipped = flop_skipped - routed_tokens * c.router_flops.sum().to(dt)
    return {
        "tokens": m.sum(),
        "skipped": per_module,
        "param_skipped": param_skipped,
        "flop_skipped": flop_skipped,
        "flop_total": flop_total,
    }


def ratios(totals: dict[str, torch.Tensor], costs: ModuleCosts) -> dict[str, torch.Tensor]:
    """Turn summed totals into ratios (still differentiable)."""
    tokens = totals["tokens"].clamp_min(1.0)
    L = costs.num_layers
    per_module = totals["skipped"] / tokens  # (L, 2) skip rate of each module
    total_params = (costs.attn_params + costs.mlp_params).sum().to(per_module.dtype)
    return {
        "module": per_module.mean(),
        "param": totals["param_skipped"] / (tokens * total_params),
        "flop": totals["flop_skipped"] / totals["flop_total"].clamp_min(1.0),
        "attention": per_module[:, 0].sum() / L,
        "mlp": per_module[:, 1].sum() / L,
        "per_module": per_module,
    }


@dataclass
class SparsityReport:
    """Realised sparsity over every token seen since the last reset."""

    param: float
    module: float
    flop: float
    attention: float
    mlp: float
    tokens: int
    per_layer_attention: list[float]
    per_layer_mlp: list[float]

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def short(self) -> dict[str, float]:
        return {"param": self.param, "attention": self.attention, "mlp": self.mlp}

    def __str__(self) -> str:
        return (
            f"param {self.param:.1%}  attention {self.attention:.1%}  mlp {self.mlp:.1%}  "
            f"(module {self.module:.1%}, flop {self.flop:.1%}, {self.tokens} tokens)"
        )


class SparsityMeter:
    """Accumulates skip totals over many forward passes (detached, float64).

    Decisions made without gradient are only queued by add() and summed when `totals` is read (or the
    queue is long), so a generation loop that never asks for statistics pays a list append per step.
    """

    MAX_PENDING = 256  # forward passes queued before they are summed

    def __init__(self, costs: ModuleCosts):
        self.costs = costs
        self.reset()

    def reset(self) -> None:
        self._totals: dict[str, torch.Tensor] | None = None
        self._pending: list = []

    @property
    def totals(self) -> dict[str, torch.Tensor] | None:
        """Summed totals of every pass since reset(); a new dict after each change, never mutated."""
        if self._pending:
            self._flush()
        return self._totals

    def add(self, state) -> None:
        """Count one forward pass from its ForwardState (gates, token mask, context)."""
        if any(g.requires_grad for pair in state.gates for g in pair):
            self._accumulate(state.totals(self.costs))  # training: do not keep the graph alive
            return
        self._pending.append(state)  # stacked when summed
        if len(self._pending) >= self.MAX_PENDING:
            self._flush()

    def _flush(self) -> None:
        # Passes with the same batch size and router share are summed as one: the totals are sums over tokens.
        pending = [(*state.stacked(), state.router_share) for state in self._pending]
        self._pending = []
        start = 0
        for end in range(1, len(pending) + 1):
            if end == len(pending) or (pending[end][0].shape[2], pending[end][3]) != (
                    pending[start][0].shape[2], pending[start][3]):
                group = pending[start:end]
                gates, mask, context = (torch.cat([p[i] for p in group], dim=-1) for i in range(3))
                self._accumulate(skip_totals(gates.double(), mask, context, self.costs, group[0][3]))
                start = end

    def _accumulate(self, totals: dict[str, torch.Tensor]) -> None:
        t = {k: v.detach().double().cpu() for k, v in totals.items()}
        if self._totals is None:
            self._totals = t
        else:
            self._totals = {k: self._totals[k] + t[k] for k in t}

    def report(self) -> SparsityReport:
        return report(self.totals, self.costs)


def report(totals: dict[str, torch.Tensor] | None, costs: ModuleCosts) -> SparsityReport:
    """Realised sparsity of summed totals (None or no tokens: all zero)."""
    if totals is None or float(totals["tokens"]) == 0:
        L = costs.num_layers
        return SparsityReport(0.0, 0.0, 0.0, 0.0, 0.0, 0, [0.0] * L, [0.0] * L)
    r = ratios({k: v.detach().double().cpu() for k, v in totals.items()}, costs.to("cpu"))
    pm = r["per_module"]
    return SparsityReport(
        param=float(r["param"]),
        module=float(r["module"]),
        flop=float(r["flop"]),
        attention=float(r["attention"]),
        mlp=float(r["mlp"]),
        tokens=int(totals["tokens"]),
        per_layer_attention=[float(x) for x in pm[:, 0]],
        per_layer_mlp=[float(x) for x in pm[:, 1]],
    )
