"""Stage 2: LoRA through PEFT on the routed model (routers untouched).

PEFT swaps the targeted Linear modules *inside* the attention and MLP modules, so the decoder layers
keep their routed forward and `routed.layers` (which holds the attention/MLP modules, not their
projections) stays valid. The adapter is saved with the routers (skipgpt.save_routers writes
DIR/adapter) and restored by skipgpt.load_routers; `merge_lora` folds it into the weights.
"""

from __future__ import annotations

from torch import nn

from ..artifact import check_layers, input_embedding, peft_quiet
from ..errors import ConfigError


def check_lora_targets(model: nn.Module, targets: list[str] | tuple[str, ...], rank: int | None = None) -> None:
    """Every LoRA target must name Linear layers of `model`, none of them tied to the input embedding, each with
    both sides at least `rank` (checked before any data is read or written)."""
    linear: dict[str, list[nn.Linear]] = {}  # every Linear layer by its own name (q_proj: one per decoder layer)
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            linear.setdefault(n.rsplit(".", 1)[-1], []).append(m)
    missing = [t for t in targets if t not in linear]
    if missing:
        raise ConfigError(f"LoRA targets {missing} match no Linear layer of this model; choose from "
                          f"{', '.join(sorted(linear))} (--lora-targets q_proj,v_proj)")
    # Merging (eval, load_routers) writes the update into the shared weight, so the embedding would change too.
    tied = [t for t in targets if any(m.weight is input_embedding(model) for m in linear[t])]
    if tied:
        raise ConfigError(f"LoRA target {tied[0]} shares its weight with the input embedding of this model (tied "
                          f"word embeddings): merging its update would change the embedding too; leave it out of "
                          f"--lora-targets")
    if rank is not None:  # a rank past a layer's smaller side adds nothing a full update lacks, and its weights
        # (rank x hidden per layer) run out of memory well before the step: 1e8 asked for 230 GB on SmolLM2
        sides = {t: min(min(m.in_features, m.out_features) for m in linear[t]) for t in targets}
        target, side = min(sides.items(), key=lambda item: item[1])
        if rank > side:
            raise ConfigError(f"LoRA rank {rank} exceeds {target}'s smaller side ({side}); a LoRA update has rank "
                              f"at most min(in, out): give --lora-r {side} or less")


def attach_lora(routed, r: int = 16, alpha: int = 32, dropout: float = 0.1,
                targets: list[str] | tuple[str, ...] = ("q_proj", "v_proj", "gate_proj")) -> nn.Module:
    """Wrap routed.model in a PeftModel with fresh LoRA weights (only they require gradients)."""
    from peft import LoraConfig, get_peft_model  # seconds to import: only LoRA stages pay for it

    check_lora_targets(routed.model, targets, r)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                        bias="none", task_type="CAUSAL_LM")
    with peft_quiet():
        routed.model = get_peft_model(routed.model, config)
    check_layers(routed)
    return routed.model


def lora_parameters(routed) -> list[nn.Parameter]:
    return [p for n, p in routed.model.named_parameters() if "lora_" in n]


def merge_lora(routed):
    """Fold LoRA into the base weights (one plain HF model again, no adapter overhead); returns `routed`."""
    if not hasattr(routed.model, "merge_and_unload"):
        raise ConfigError("the routed model carries no LoRA adapter to merge")
    routed.model = routed.model.merge_and_unload()
    check_layers(routed)
    routed.merged = True
    return routed
