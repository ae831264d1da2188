"""Block Influence (ShortGPT): how much a block changes the residual stream it reads.

BI = 1 - cos(input residual, output residual), averaged over the real (non-pad) tokens of some
calibration sequences in a dense forward pass. A block whose output points where its input
already pointed is doing little and is the first candidate for removal.

Per module: attention's input is the layer input and its output the residual after attention;
the MLP's input is that residual and its output the layer output. Per layer: layer input to
layer output. The residual states are recorded through a RoutedModel policy that executes
everything, so every supported architecture (sandwich norms included) is measured the same way.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from ..errors import DataError
from ..models.routed import RoutedModel
from ..routing.policies import KIND_INDEX


class _Recorder:
    """Execute-all policy that keeps the residual stream entering every module."""

    def __init__(self, num_layers: int):
        self.inputs: list[list[torch.Tensor | None]] = [[None, None] for _ in range(num_layers)]

    def __call__(self, layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        self.inputs[layer][KIND_INDEX[kind]] = x.detach()
        return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)


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
    saved = (routed.policy, routed.mode, routed.config.router_input, routed.track)
    L = len(routed.layers)
    cos_module = torch.zeros(L, 2, dtype=torch.float64)
    cos_layer = torch.zeros(L, dtype=torch.float64)
    tokens = 0.0
    outputs: list[torch.Tensor] = []
    last = routed.layers[-1].layer

    def keep_output(module, args, output):
        outputs.append((output[0] if isinstance(output, tuple) else output).detach())

    hook = last.register_forward_hook(keep_output)
    try:
        # "module" input makes the MLP policy see the residual after attention, the state BI needs.
        routed.config.router_input = "module"
        routed.mode, routed.track = "masked", False
        for batch in batches:
            recorder = _Recorder(L)
            routed.policy = recorder
            outputs.clear()
            routed(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
            ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            mask = torch.ones_like(ids, dtype=torch.float64) if mask is None else mask.to(torch.float64)
            tokens += float(mask.sum())
            states = [s for pair in recorder.inputs for s in pair] + [outputs[-1]]  # 2L + 1 residual states
            for i in range(L):
                a_in, m_in, out = states[2 * i], states[2 * i + 1], states[2 * i + 2]
                cos_module[i, 0] += _cos_sum(a_in, m_in, mask)
                cos_module[i, 1] += _cos_sum(m_in, out, mask)
                cos_layer[i] += _cos_sum(a_in, out, mask)
    finally:
        hook.remove()
        routed.policy, routed.mode, routed.config.router_input, routed.track = saved
        if owned:
            routed.unpatch()
    if tokens == 0:
        raise DataError("Block Influence needs at least one calibration sequence with real tokens")
    return {"module": 1.0 - cos_module / tokens, "layer": 1.0 - cos_layer / tokens}
