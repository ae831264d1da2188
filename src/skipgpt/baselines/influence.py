"""Block Influence (ShortGPT): how much a block changes the residual stream it reads.

BI = 1 - cos(input residual, output residual), averaged over the real (non-pad) tokens of some
calibration sequences in a dense forward pass. A block whose output points where its input
already pointed is doing little and is the first candidate for removal.

Per module: attention's input is the layer input and its output the residual after attention;
the MLP's input is that residual and its output the layer output. Per layer: layer input to
layer output. The residual states are read where each module's input norm reads them, with every
module executing, so every supported architecture (sandwich norms included) is measured the same way.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from ..errors import DataError
from ..models.routed import RoutedModel


def _cos_sum(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    cos = F.cosine_similarity(a.double(), b.double(), dim=-1)  # (B, T)
    return float((cos * mask).sum())


@torch.no_grad()
def block_influence(model, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Block Influence of every module and every layer of `model` (HF causal LM or RoutedModel).

    Returns {"module": (L, 2) float64 tensor, index 0 attention, 1 MLP; "layer": (L,) tensor}.
    """
    owned = not isinstance(model, RoutedModel)
    routed = RoutedModel(model) if owned else model
    L = len(routed.layers)
    cos_module = torch.zeros(L, 2, dtype=torch.float64)
    cos_layer = torch.zeros(L, dtype=torch.float64)
    tokens = 0.0
    # The residual stream entering each module is what its input norm reads: the layer input for
    # attention, the residual after attention for the MLP; the last layer's output closes the list.
    states: list[torch.Tensor] = []

    def keep_input(module, args):
        states.append(args[0].detach())

    def keep_output(module, args, output):
        states.append((output[0] if isinstance(output, tuple) else output).detach())

    hooks = [h for parts in routed.layers for h in (parts.attn_norm.register_forward_pre_hook(keep_input),
                                                     parts.mlp_norm.register_forward_pre_hook(keep_input))]
    hooks.append(routed.layers[-1].layer.register_forward_hook(keep_output))
    try:
        with routed.using(policy="execute", mode="masked", track=False):
            for batch in batches:
                if batch["input_ids"].shape[-1] == 0:  # an empty text: nothing to measure (and HF fails on it)
                    continue
                states.clear()
                routed(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
                ids = batch["input_ids"]
                mask = batch.get("attention_mask")
                mask = torch.ones_like(ids, dtype=torch.float64) if mask is None else mask.to(torch.float64)
                tokens += float(mask.sum())
                for i in range(L):  # 2L + 1 residual states
                    a_in, m_in, out = states[2 * i], states[2 * i + 1], states[2 * i + 2]
                    cos_module[i, 0] += _cos_sum(a_in, m_in, mask)
                    cos_module[i, 1] += _cos_sum(m_in, out, mask)
                    cos_layer[i] += _cos_sum(a_in, out, mask)
    finally:
        for h in hooks:
            h.remove()
        if owned:
            routed.unpatch()
    if tokens == 0:
        raise DataError("Block Influence needs at least one calibration sequence with real tokens")
    return {"module": 1.0 - cos_module / tokens, "layer": 1.0 - cos_layer / tokens}
