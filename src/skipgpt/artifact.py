"""Everything a run saves, in one directory, and the one way to load it back.

    DIR/skip_config.json        router design, calibrated threshold, base-model identity, and for a
                                baseline the policy it routes by (extra["routing"])
    DIR/routers.safetensors     router weights
    DIR/adapter/                the stage-2 LoRA adapter (PEFT, safetensors), when LoRA trained

The config records the identity of the base model (architecture, hidden size, layer count, weight
fingerprint), so routers are never silently applied to a model they were not trained on.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .config import SkipConfig
from .errors import ArtifactError, ConfigError
from .io import save_safetensors_atomic, write_text_atomic
from .models.adapters import find_layers, fingerprint, unwrap
from .models.routed import RoutedModel
from .routing import policies

CONFIG_NAME = "skip_config.json"
WEIGHTS_NAME = "routers.safetensors"
ADAPTER_DIR = "adapter"
LORA_ACTIONS = ("merge", "attach", "none")


def save_routers(routed: RoutedModel, directory: str | Path) -> Path:
    """Write the routers, their config and (if the model carries one) the LoRA adapter to `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(directory / WEIGHTS_NAME, routed.routers.state_dict(),
                            metadata={"format": "skipgpt-routers"})
    if hasattr(routed.model, "peft_config"):
        routed.model.save_pretrained(directory / ADAPTER_DIR, safe_serialization=True)
    # The config goes last: a directory with a config always has its weights.
    write_text_atomic(directory / CONFIG_NAME, routed.config.to_json() + "\n")
    return directory


def load_routers(model: nn.Module, directory: str | Path, check: bool = True, lora: str = "merge") -> RoutedModel:
    """The model exactly as a run saved it: `model` (an HF causal LM) routed by the routers in `directory`,
    with a baseline's policy restored and the stage-2 adapter in DIR/adapter applied.

    lora: "merge" folds the adapter into the base weights (fastest inference), "attach" keeps it as a
    PEFT adapter (routed.model becomes a PeftModel), "none" ignores it. check: refuse routers trained
    on another base model.
    """
    if lora not in LORA_ACTIONS:
        raise ConfigError(f"lora must be one of {LORA_ACTIONS}, got {lora!r}")
    directory = Path(directory)
    config = read_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.exists():
        raise ArtifactError(f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    if check:
        check_base(config, model, str(directory))
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{weights} is corrupt or truncated ({e})") from None
    routed = RoutedModel(model, config)
    try:
        _check_router_state(state, routed.routers.state_dict(), weights, config.router)
        routed.routers.load_state_dict(state)
        routed.force(policies.from_extra(routed, str(directory)))
        if lora != "none" and (directory / ADAPTER_DIR).exists():
            apply_adapter(routed, directory / ADAPTER_DIR, merge=lora == "merge")
    except ArtifactError:
        routed.unpatch()
        raise
    return routed


def load_adapter(model: nn.Module, directory: str | Path, merge: bool = True, trainable: bool = False) -> nn.Module:
    """`model` with the PEFT LoRA adapter in `directory`: merged into its weights, or as a PeftModel."""
    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise ArtifactError(f"{directory}: not a LoRA adapter folder (no adapter_config.json)")
    if not (directory / "adapter_model.safetensors").is_file():
        raise ArtifactError(f"{directory}: no adapter_model.safetensors (only safetensors adapters are read)")
    from peft import PeftModel  # seconds to import: only commands that meet an adapter pay for it

    try:
        peft = PeftModel.from_pretrained(model, str(directory), is_trainable=trainable)
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise ArtifactError(f"{directory}: cannot load the adapter ({str(e).splitlines()[0]})") from None
    return peft.merge_and_unload() if merge else peft


def apply_adapter(routed: RoutedModel, directory: str | Path, merge: bool = True) -> RoutedModel:
    """load_adapter on routed.model; the routed layers stay the modules the model runs."""
    routed.model = load_adapter(routed.model, directory, merge=merge)
    check_layers(routed)
    return routed


def check_layers(routed: RoutedModel) -> None:
    """The routed layer forward reads routed.layers: PEFT must have swapped only the projections inside
    attention and MLP, never the modules themselves."""
    for mine, live in zip(routed.layers, find_layers(routed.model)):
        if mine.layer is not live.layer or mine.attn is not live.attn or mine.mlp is not live.mlp:
            raise RuntimeError("PEFT replaced a decoder layer, attention or MLP module; routing would be stale")


def read_config(directory: str | Path) -> SkipConfig:
    directory = Path(directory)
    if not directory.exists():
        raise ArtifactError(f"router directory {directory} does not exist")
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is a file; expected a router directory holding {CONFIG_NAME}")
    path = directory / CONFIG_NAME
    if not path.exists():
        raise ArtifactError(f"{directory} has no {CONFIG_NAME}: not a skipgpt router directory")
    try:
        return SkipConfig.load(path)
    except ConfigError as e:
        raise ArtifactError(str(e)) from None
    except UnicodeDecodeError:
        raise ArtifactError(f"{path}: not a UTF-8 JSON file") from None


def check_base(config: SkipConfig, model: nn.Module, source: str) -> None:
    """Refuse routers trained for another base model, naming the first difference."""
    hf = unwrap(model).config
    want = config.base
    checks = [
        ("hidden size", want.hidden_size, hf.hidden_size),
        ("layer count", want.num_layers, getattr(hf, "num_hidden_layers", None)),
        ("model type", want.model_type, hf.model_type),
    ]
    for what, trained, given in checks:
        if trained and trained != given:
            raise ArtifactError(
                f"{source}: routers were trained for {want.name or want.architecture} ({what} {trained}), "
                f"but the model has {what} {given}"
            )
    if want.fingerprint:
        got = fingerprint(model)
        if got != want.fingerprint:
            raise ArtifactError(
                f"{source}: routers were trained on different weights ({want.name}, fingerprint "
                f"{want.fingerprint}) than the given model (fingerprint {got})"
            )


def _check_router_state(state: dict, expected: dict, weights: Path, router: str) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ArtifactError(f"{weights} does not match a {router} router for this model "
                            f"(missing {missing[:2]}, unexpected {unexpected[:2]})")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ArtifactError(f"{weights}: {key} has shape {tuple(value.shape)}, "
                                f"expected {tuple(expected[key].shape)}")
        if not torch.isfinite(value).all():
            raise ArtifactError(f"{weights}: {key} holds NaN or infinite values")
