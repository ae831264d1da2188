"""Router artifacts: a directory with `skip_config.json` and `routers.safetensors`.

The config records the router design, the calibrated threshold and the identity of the base model
(architecture, hidden size, layer count, weight fingerprint), so routers are never silently
applied to a model they were not trained on.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import SkipConfig
from .errors import ArtifactError, ConfigError
from .io import save_safetensors_atomic, write_text_atomic
from .models.adapters import fingerprint, unwrap
from .models.routed import RoutedModel

CONFIG_NAME = "skip_config.json"
WEIGHTS_NAME = "routers.safetensors"


def save_routers(routed: RoutedModel, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = routed.routers.state_dict()
    save_safetensors_atomic(directory / WEIGHTS_NAME, state, metadata={"format": "skipgpt-routers"})
    # The config goes last: a directory with a config always has its weights.
    write_text_atomic(directory / CONFIG_NAME, routed.config.to_json() + "\n")
    return directory


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


def check_base(config: SkipConfig, model: torch.nn.Module, source: str) -> None:
    """Refuse routers trained for another base model, naming the first difference."""
    hf = unwrap(model).config
    want = config.base
    layers = getattr(hf, "num_hidden_layers", None)
    checks = [
        ("hidden size", want.hidden_size, hf.hidden_size),
        ("layer count", want.num_layers, layers),
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
                f"{want.fingerprint}) than the given model (fingerprint {got}); pass --no-check-base to force"
            )


def load_routers(model: torch.nn.Module, directory: str | Path, check: bool = True) -> RoutedModel:
    """Attach the routers saved in `directory` to `model` (an HF causal LM, optionally PEFT-wrapped)."""
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
    expected = routed.routers.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        routed.unpatch()
        raise ArtifactError(
            f"{weights} does not match a {config.router} router for this model "
            f"(missing {missing[:2]}, unexpected {unexpected[:2]})"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            routed.unpatch()
            want = tuple(expected[key].shape)
            raise ArtifactError(f"{weights}: {key} has shape {tuple(value.shape)}, expected {want}")
        if not torch.isfinite(value).all():
            routed.unpatch()
            raise ArtifactError(f"{weights}: {key} holds NaN or infinite values")
    routed.routers.load_state_dict(state)
    return routed
