"""Resumable training state in one safetensors file (no pickle): trainable parameters, AdamW moments,
the global torch RNG and, in the JSON metadata, the step, optimizer hyper-parameters and history.

Restoring all of it and drawing the data of step k as a pure function of k makes a resumed run
reproduce an uninterrupted one bit for bit (CPU, fp32, same thread count).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..errors import ArtifactError, ConfigError
from ..io import save_safetensors_atomic
from .data import data_digest

CHECKPOINT_NAME = "checkpoint.safetensors"
# Options that do not change what a resumed run computes; every other option must match the checkpoint's,
# or the resumed steps would silently follow another recipe (other data order, schedule, loss...).
RESUME_MAY_CHANGE = frozenset({"resume", "progress", "report_to", "checkpoint_every", "output", "calibrate"})
# Options naming local files: the same file under another spelling (relative, absolute, ~) is the same option.
PATH_OPTIONS = frozenset({"data", "model", "routers"})


def trainable(routed) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters by stable name: routers first, then whatever of the model trains (LoRA)."""
    named = {f"routers.{n}": p for n, p in routed.routers.named_parameters() if p.requires_grad}
    named.update({f"model.{n}": p for n, p in routed.model.named_parameters() if p.requires_grad})
    return named


def save_checkpoint(path: Path, routed, optimizer: torch.optim.Optimizer, step: int, extra: dict[str, Any]) -> None:
    tensors = {f"param.{n}": p.detach() for n, p in trainable(routed).items()}
    state = optimizer.state_dict()
    for index, slots in state["state"].items():
        for key, value in slots.items():
            tensors[f"opt.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng.torch"] = torch.get_rng_state()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    meta = {"step": step, "param_groups": groups, **extra}
    save_safetensors_atomic(path, tensors, metadata={"format": "skipgpt-train-state", "state": json.dumps(meta)})


def read_metadata(path: Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint (step, config, history) without loading its tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["state"])
    except (SafetensorError, OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: not a readable skipgpt checkpoint ({e})") from None


def check_resume_config(path: Path, config: dict[str, Any]) -> None:
    """Refuse to resume from `path` with a config other than the one that wrote it (naming what differs), or
    with training data whose content changed since (the resumed steps would train on other text)."""
    meta = read_metadata(path)
    saved = meta.get("config")
    if not isinstance(saved, dict):
        return  # written without its config: nothing to compare against
    digest = meta.get("data_sha256")  # then the data's content is compared below, wherever it lies now
    may_differ = RESUME_MAY_CHANGE | ({"data"} if digest else set())
    differ = [f"{k} {saved[k]!r} -> {config[k]!r}" for k in sorted(set(saved) & set(config))
              if k not in may_differ and saved[k] != config[k]
              and not (k in PATH_OPTIONS and _same_file(saved[k], config[k]))]
    if differ:
        raise ConfigError(f"{path}: cannot --resume, the options differ from the run that wrote this checkpoint "
                          f"({'; '.join(differ)}); rerun with the original options or use another --output")
    if digest and data_digest(config["data"]) != digest:
        raise ConfigError(f"{path}: cannot --resume, the content of the training data {config['data']} changed "
                          f"since this checkpoint; restore the original data, or start afresh with another --output")


def _same_file(a: Any, b: Any) -> bool:
    """Two spellings of one existing file or folder."""
    if not (isinstance(a, str) and isinstance(b, str)):
        return False
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def load_checkpoint(path: Path, routed, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore parameters, optimizer and RNG in place; return the JSON metadata (step, history, ...)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: not a readable skipgpt checkpoint ({e})") from None
    params = trainable(routed)
    saved = {k[len("param."):] for k in tensors if k.startswith("param.")}
    if saved != set(params):
        raise ArtifactError(f"{path}: checkpoint holds other trainable parameters than this run "
                            f"(different --stage or model?); delete it or use another --output")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param.{name}"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, slot = key.split(".", 2)
            state.setdefault(int(index), {})[slot] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    return meta
