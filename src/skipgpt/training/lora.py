"""Stage 2: LoRA through PEFT on the routed model (routers untouched).

PEFT swaps the targeted Linear modules *inside* the attention and MLP modules, so the decoder layers
keep their routed forward and `routed.layers` (which holds the attention/MLP modules, not their
projections) stays valid. The adapter is a standard PEFT directory: `PeftModel.from_pretrained`
or `load_adapter` below restores it, `merge_lora` folds it into the weights for inference.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import ArtifactError, ConfigError
from ..models.adapters import find_layers

ADAPTER_DIR = "adapter"


def _check_layers(routed) -> None:
    """The routed layer forward reads routed.layers: they must still be the modules the model runs."""
    for mine, live in zip(routed.layers, find_layers(routed.model)):
        if mine.layer is not live.layer or mine.attn is not live.attn or mine.mlp is not live.mlp:
            raise RuntimeError("PEFT replaced a decoder layer, attention or MLP module; routing would be stale")


def check_lora_targets(model: nn.Module, targets: list[str] | tuple[str, ...]) -> None:
    """Every LoRA target must name Linear layers of `model` (checked before any data is read or written)."""
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    missing = [t for t in targets if t not in linear]
    if missing:
        raise ConfigError(f"LoRA targets {missing} match no Linear layer of this model; choose from "
                          f"{', '.join(linear)} (--lora-targets q_proj,v_proj)")


def attach_lora(routed, r: int = 16, alpha: int = 32, dropout: float = 0.1,
                targets: list[str] | tuple[str, ...] = ("q_proj", "v_proj", "gate_proj")) -> nn.Module:
    """Wrap routed.model in a PeftModel with fresh LoRA weights (only they require gradients)."""
    from peft import LoraConfig, get_peft_model

    check_lora_targets(routed.model, targets)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                        bias="none", task_type="CAUSAL_LM")
    routed.model = get_peft_model(routed.model, config)
    _check_layers(routed)
    return routed.model


def lora_parameters(routed) -> list[nn.Parameter]:
    return [p for n, p in routed.model.named_parameters() if "lora_" in n]


def save_adapter(routed, directory: str | Path) -> Path:
    directory = Path(directory)
    if not hasattr(routed.model, "peft_config"):
        raise ConfigError("the routed model carries no LoRA adapter to save")
    routed.model.save_pretrained(directory, safe_serialization=True)
    return directory


def load_adapter(routed, directory: str | Path, trainable: bool = False):
    """Attach the PEFT adapter saved in `directory` to routed.model (in place); returns `routed`."""
    from peft import PeftModel

    directory = Path(directory)
    if not (directory / "adapter_config.json").exists():
        raise ArtifactError(f"{directory} is not a PEFT adapter directory (no adapter_config.json)")
    try:
        routed.model = PeftModel.from_pretrained(routed.model, directory, is_trainable=trainable)
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise ArtifactError(f"{directory}: cannot load the adapter ({str(e).splitlines()[0]})") from None
    _check_layers(routed)
    return routed


def merge_lora(routed):
    """Fold LoRA into the base weights (one plain HF model again, no adapter overhead); returns `routed`."""
    if not hasattr(routed.model, "merge_and_unload"):
        raise ConfigError("the routed model carries no LoRA adapter to merge")
    routed.model = routed.model.merge_and_unload()
    _check_layers(routed)
    return routed


def load_trained(model: nn.Module, directory: str | Path, merge: bool = False):
    """Base model + a `skipgpt train` output directory -> RoutedModel with its routers (and adapter, if any)."""
    from ..artifact import load_routers

    directory = Path(directory)
    routed = load_routers(model, directory)
    if (directory / ADAPTER_DIR).exists():
        load_adapter(routed, directory / ADAPTER_DIR)
        if merge:
            merge_lora(routed)
    return routed
