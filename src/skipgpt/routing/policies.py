"""Forced routing: decisions that do not come from the routers (tests, baselines, ablations).

A policy is a callable (layer, kind, x) -> execute mask of shape x.shape[:-1], kind "attn" or "mlp".
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Policy = Callable[[int, str, torch.Tensor], torch.Tensor]
KIND_INDEX = {"attn": 0, "mlp": 1}


def execute_all(layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
    return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)


def skip_all(layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
    return torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)


def from_masks(masks: torch.Tensor) -> Policy:
    """Fixed decisions: a (num_layers, 2, batch, seq) bool tensor, index 0 attention, 1 MLP."""

    def policy(layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        m = masks[layer, KIND_INDEX[kind]]
        if m.shape != x.shape[:-1]:
            raise ValueError(f"mask for layer {layer} {kind} has shape {tuple(m.shape)}, input {tuple(x.shape[:-1])}")
        return m.to(x.device, torch.bool)

    return policy


def static(keep: torch.Tensor) -> Policy:
    """The same decision for every token: keep is a (num_layers, 2) bool tensor (module removal)."""

    def policy(layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        return torch.full(x.shape[:-1], bool(keep[layer, KIND_INDEX[kind]]), dtype=torch.bool, device=x.device)

    return policy


def random(skip_rates: torch.Tensor, seed: int = 0) -> Policy:
    """Each token skips module (layer, kind) with probability skip_rates[layer, kind], independently."""
    generator = torch.Generator().manual_seed(seed)

    def policy(layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        u = torch.rand(x.shape[:-1], generator=generator)
        return (u >= float(skip_rates[layer, KIND_INDEX[kind]])).to(x.device)

    return policy
