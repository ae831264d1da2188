"""Routers: one before every attention and one before every MLP module.

A router maps a token's hidden state to two logits, (execute, skip). In training the decision is a
straight-through hard Gumbel-softmax sample; at inference it is a deterministic argmax, shifted by a
threshold that dials sparsity without retraining.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SkipConfig

EXECUTE, SKIP = 0, 1
KINDS = ("attn", "mlp")


class Router(nn.Module):
    def __init__(self, hidden_size: int, kind: str = "linear", norm: str = "none", execute_bias: float = 2.0):
        super().__init__()
        self.norm = norm
        if kind == "linear":
            self.net = nn.Linear(hidden_size, 2)
            last = self.net
        else:
            inner = hidden_size // 4
            self.net = nn.Sequential(nn.Linear(hidden_size, inner), nn.ReLU(), nn.Linear(inner, 2))
            last = self.net[-1]
        # Zero weights + an execute bias: training starts at "execute everything" whatever the
        # scale of the hidden state (random weights on LLaMA outliers give near-random routing).
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(torch.tensor([execute_bias, 0.0]))
        if norm == "channel":
            # Fixed per-channel divisor, set from calibration text by `calibrate_input_scale`. It is a
            # reparametrisation (w / scale is an ordinary linear router) that evens out the optimiser's
            # steps: with raw LLaMA hidden states one step on an outlier channel's weight moves the logit
            # thousands of times more than the same step on a typical channel's weight.
            self.register_buffer("input_scale", torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = next(self.parameters())
        x = x.to(weight.device, weight.dtype)  # the model may sit on other devices (device_map) or in bf16
        if self.norm == "rms":
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        elif self.norm == "channel":
            x = x / self.input_scale.to(x.dtype)
        return self.net(x)


class RouterBank(nn.Module):
    """All routers of a model, kept outside the base model so its state-dict keys stay stock."""

    def __init__(self, num_layers: int, hidden_size: int, config: SkipConfig):
        super().__init__()
        make = lambda: Router(hidden_size, config.router, config.router_norm, config.execute_bias)  # noqa: E731
        self.attn = nn.ModuleList(make() for _ in range(num_layers))
        self.mlp = nn.ModuleList(make() for _ in range(num_layers))

    def get(self, layer: int, kind: str) -> Router:
        return (self.attn if kind == "attn" else self.mlp)[layer]


def straight_through_gumbel(logits: torch.Tensor, temperature: float, noise: float = 1.0) -> torch.Tensor:
    """Execute gate in {0, 1} forward, softmax((logits + noise * g) / t) gradient backward.

    noise = 1 is the standard Gumbel-softmax; noise = 0 makes the forward decision the inference-time argmax
    while the gradient stays the tempered softmax's (a deterministic straight-through estimator).
    """
    u = torch.rand_like(logits, dtype=torch.float32).clamp_(1e-10, 1.0 - 1e-7)
    gumbel = -torch.log(-torch.log(u))
    soft = F.softmax((logits.float() + noise * gumbel) / temperature, dim=-1)[..., EXECUTE]
    hard = (soft > 0.5).to(soft.dtype)
    return hard - soft.detach() + soft


def sample_gate(logits: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Hard Gumbel sample without gradient (the published code's stochastic evaluation)."""
    u = torch.rand_like(logits, dtype=torch.float32).clamp_(1e-10, 1.0 - 1e-7)
    noisy = logits.float() - torch.log(-torch.log(u))
    return (noisy[..., SKIP] - noisy[..., EXECUTE] <= threshold).float()


def argmax_gate(logits: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    return (logits[..., SKIP].float() - logits[..., EXECUTE].float() <= threshold).float()


def anneal(step: int, total_steps: int, start: float, end: float) -> float:
    """Linear annealing from start to end over the stage (reaches `end` on the last step): the Gumbel
    temperature (5 -> 1) and the Gumbel noise scale follow it."""
    if total_steps <= 1:
        return end
    frac = min(max(step / (total_steps - 1), 0.0), 1.0)
    return start + (end - start) * frac
