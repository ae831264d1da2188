"""Method names used by `skipgpt compare`.

Every baseline is saved with skipgpt.save_routers; routed.config.extra["routing"] names the variant
and holds what its policy needs (keep mask, skip rates, MoD thresholds), so skipgpt.load_routers
rebuilds the exact model that was evaluated.
"""

from __future__ import annotations

# name -> (what it is, whether it trains)
METHODS: dict[str, tuple[str, bool]] = {
    "dense": ("the unmodified model", False),
    "skipgpt-rt": ("SkipGPT router tuning (stage 1, base frozen)", True),
    "skipgpt-rt-lora": ("SkipGPT router tuning then LoRA with routers frozen (stage 2)", True),
    "skipgpt-informed": ("router tuning (MLP routers) with a forecaster standing in for every skipped module", True),
    "skipgpt-informed-lora": ("skipgpt-informed, then LoRA with routers and forecasters frozen", True),
    "shortgpt": ("ShortGPT: whole layers removed by Block Influence", False),
    "static-modules": ("attention/MLP modules removed by Block Influence", False),
    "random": ("random per-token routing at SkipGPT-RT's per-module skip rates", False),
    "mod-d": ("Mixture-of-Depths top-k routing, attention and MLP separately", True),
    "coupled": ("one router per layer skips attention and MLP together", True),
    "skipgpt-joint": ("routers and LoRA trained together from step 0", True),
}
DEFAULT_METHODS = list(METHODS)
INFORMED_RANK = 32  # forecaster rank of skipgpt-informed (capped at the hidden size): 8-128 measured, 32 ~ 64
# router kind of skipgpt-informed: at equal net sparsity level with linear routers at 25%, ahead at 40% (36.8% net
# against 33.4% at the same perplexity; docs/RESULTS.md), their 4.70% of the decoder per token included
INFORMED_ROUTER = "mlp"
