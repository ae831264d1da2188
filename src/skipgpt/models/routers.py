"""The small fp32 modules beside the HF model, and the Gumbel gates of training and sampled evaluation.

A Router maps a token to two logits (execute, skip); its Fold is the same inference decision as one
matrix-vector product. A Forecaster gives a skipped token a cheap stand-in for the module's output
(informed skipping). RoutedModel (skipgpt.models.routed) owns a RouterBank and, with a forecaster rank,
a ForecasterBank.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ROUTER_KINDS, SkipConfig
from ..errors import ConfigError
from ..routing.policies import EXECUTE, SKIP

# -- routers -----------------------------------------------------------------------------------------------


class Router(nn.Module):
    """Maps a token's hidden state to two logits, (execute, skip): linear (the paper) or a 2-layer MLP
    (hidden -> hidden/4 -> ReLU -> 2, the published code)."""

    def __init__(self, hidden_size: int, kind: str = "linear", execute_bias: float = 2.0):
        super().__init__()
        if kind not in ROUTER_KINDS:
            raise ConfigError(f"router kind must be one of {ROUTER_KINDS}, got {kind!r}")
        if kind == "linear":
            self.net = nn.Linear(hidden_size, 2)
            last = self.net
        else:
            inner = hidden_size // 4
            self.net = nn.Sequential(nn.Linear(hidden_size, inner), nn.ReLU(), nn.Linear(inner, 2))
            last = self.net[-1]
        self.linear = kind == "linear"
        # Zero weights + an execute bias: training starts at "execute everything" whatever the
        # scale of the hidden state (random weights on LLaMA outliers give near-random routing).
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(torch.tensor([execute_bias, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.net.weight if self.linear else self.net[0].weight
        # The model may sit on other devices (device_map) or in bf16; routers stay fp32.
        return self.net(x.to(weight.device, weight.dtype))

    def fold(self, threshold: float = 0.0) -> Fold:
        """The last layer's two rows folded into one skip-minus-execute vector and bias: an inference
        decision is then one matrix-vector product and a comparison with a ready tensor (measured 10 us
        against 17 for the two-logit linear on one token). RouterBank.folds() keeps them between weight
        changes."""
        last = self.net if self.linear else self.net[-1]
        with torch.no_grad():
            weight = (last.weight[SKIP] - last.weight[EXECUTE]).contiguous()
            bias = float(last.bias[SKIP] - last.bias[EXECUTE])
        # a 0-dim tensor: comparing with a Python float costs a scalar conversion on every call
        limit = torch.tensor(threshold - bias, dtype=weight.dtype, device=weight.device)
        return Fold(weight, bias, threshold, limit, None if self.linear else self.net[:-1])

    def margin(self, x: torch.Tensor, fold: Fold | None = None) -> torch.Tensor:
        """Skip logit minus execute logit (...,), without gradient; `fold`: this router's, if the caller has it."""
        return (fold or self.fold()).margin(x)

    def executes(self, x: torch.Tensor, threshold: float, fold: Fold | None = None) -> torch.Tensor:
        """Bool execute decision (...,): execute unless the skip logit beats the execute logit by more than
        `threshold` (the inference argmax, shifted by the calibrated threshold). A `fold` made for another
        threshold is not used."""
        if fold is None or fold.threshold != threshold:
            fold = self.fold(threshold)
        return fold.executes(x)


class Fold(NamedTuple):
    """A router's last layer as one skip-minus-execute row: execute while weight . features <= limit.
    Its methods are the whole inference decision, so a decode step pays one Python call per module."""

    weight: torch.Tensor  # (features,)
    bias: float
    threshold: float  # the threshold `limit` was made for
    limit: torch.Tensor  # 0-dim: threshold - bias
    hidden: nn.Module | None  # the layers before the last (MLP routers); None for a linear router

    def dot(self, x: torch.Tensor) -> torch.Tensor:
        """weight . features(x), (..., hidden) -> (...). One matmul: it runs more aten operators than an
        explicit reshape, mv and view, but it is one Python call instead of three: 8 us against 13 on one token."""
        w = self.weight
        # the checks cost less than a no-op .to() on every decision (routers stay fp32 beside a bf16 model)
        h = x if x.dtype is w.dtype and x.device == w.device else x.to(w.device, w.dtype)
        if self.hidden is not None:
            h = self.hidden(h)
        return h @ w

    def margin(self, x: torch.Tensor) -> torch.Tensor:
        return self.dot(x) + self.bias

    def executes(self, x: torch.Tensor) -> torch.Tensor:
        return self.dot(x) <= self.limit


class RouterBank(nn.Module):
    """All routers of a model, kept outside the base model so its state-dict keys stay stock."""

    def __init__(self, num_layers: int, hidden_size: int, config: SkipConfig):
        super().__init__()
        self.attn = nn.ModuleList(Router(hidden_size, config.router, config.execute_bias) for _ in range(num_layers))
        self.mlp = nn.ModuleList(Router(hidden_size, config.router, config.execute_bias) for _ in range(num_layers))
        self._folds: list[list[Fold]] = []
        self._folds_key: tuple | None = None  # the weights' storage and version, and the threshold
        # Every submodule's parameter dict (updated in place by a reassignment): walking the module tree
        # on every forward pass measured 0.6 ms per decode step.
        self._parameter_dicts = [m._parameters for m in self.modules() if m._parameters]
        self._routers = (*self.attn, *self.mlp)

    def get(self, layer: int, kind: str) -> Router:
        return (self.attn if kind == "attn" else self.mlp)[layer]

    def params_per_module(self) -> int:
        """What one router costs a token at inference, where its last layer runs folded into one row (Fold):
        every module's router has the same shape."""
        router = self.attn[0]
        last = router.net if router.linear else router.net[-1]
        return sum(p.numel() for p in router.parameters()) - (last.out_features - 1) * (last.in_features + 1)

    def train(self, mode: bool = True) -> RouterBank:
        self._folds_key = None  # rebuild the folds: weights may have changed without a version bump
        return super().train(mode)

    def folds(self, threshold: float = 0.0) -> list[list[Fold]]:
        """Every router's fold for `threshold`, [layer][kind], rebuilt only when a weight changed (an
        optimizer step, a load, an in-place edit, a reassignment of a weight or of a whole router) or the
        threshold did since the last call; read once per inference forward pass. An edit through `.data`,
        or a fused optimizer step, bypasses the version counter this keys on, and a layer replaced inside a
        router is not among the parameters it watches: such changes are picked up at the next train() /
        eval() switch."""
        routers = (*self.attn, *self.mlp)
        if routers != self._routers:  # a router module replaced: its parameters are other objects
            self._routers = routers
            self._parameter_dicts = [m._parameters for m in self.modules() if m._parameters]
        key = (threshold, *((p.data_ptr(), p._version) for d in self._parameter_dicts for p in d.values()))
        if self._folds_key != key:
            self._folds = [[a.fold(threshold), m.fold(threshold)] for a, m in zip(self.attn, self.mlp)]
            self._folds_key = key
        return self._folds


# -- forecasters (informed skipping) -----------------------------------------------------------------------


class Forecaster(nn.Module):
    """Predicts a module's output from its normalised input through a rank-R bottleneck: a skipped token
    gets x + forecast instead of x. Zero-initialised, so an unfitted forecaster is the plain skip."""

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, xn: torch.Tensor) -> torch.Tensor:
        w = self.down.weight
        return self.up(self.down(xn.to(w.device, w.dtype))).to(xn.device, xn.dtype)


class ForecasterBank(nn.Module):
    """One forecaster per attention and per MLP module."""

    def __init__(self, num_layers: int, hidden_size: int, rank: int):
        super().__init__()
        if rank > hidden_size:
            raise ConfigError(f"forecaster_rank {rank} is above the hidden size {hidden_size}; a full-rank map "
                              f"has rank {hidden_size}")
        self.attn = nn.ModuleList(Forecaster(hidden_size, rank) for _ in range(num_layers))
        self.mlp = nn.ModuleList(Forecaster(hidden_size, rank) for _ in range(num_layers))

    def get(self, layer: int, kind: str) -> Forecaster:
        return (self.attn if kind == "attn" else self.mlp)[layer]

    def params_per_module(self) -> int:
        return sum(p.numel() for p in self.attn[0].parameters())


# -- Gumbel gates ------------------------------------------------------------------------------------------


def _gumbel(like: torch.Tensor) -> torch.Tensor:
    u = torch.rand_like(like, dtype=torch.float32).clamp_(1e-10, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


def straight_through_gumbel(logits: torch.Tensor, temperature: float, noise: float = 1.0) -> torch.Tensor:
    """Execute gate in {0, 1} forward, softmax((logits + noise * g) / t) gradient backward.

    noise = 1 is the standard Gumbel-softmax; noise = 0 makes the forward decision the inference-time argmax
    while the gradient stays the tempered softmax's (a deterministic straight-through estimator).
    """
    soft = F.softmax((logits.float() + noise * _gumbel(logits)) / temperature, dim=-1)[..., EXECUTE]
    hard = (soft >= 0.5).to(soft.dtype)  # a tie executes, as the inference decision (margin <= threshold) does
    return hard - soft.detach() + soft


def sample_gate(margin: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Hard Gumbel sample without gradient (the published code's stochastic evaluation), as a bool execute
    gate, from the skip-minus-execute margin."""
    noise = _gumbel(margin.unsqueeze(-1).expand(*margin.shape, 2))
    return margin.float() + noise[..., SKIP] - noise[..., EXECUTE] <= threshold
