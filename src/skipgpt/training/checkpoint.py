"""Resumable training state in one safetensors file (no pickle): trainable parameters, AdamW moments,
the global torch RNG and, in the JSON metadata, the step, optimizer hyper-parameters and history.

Restoring all of it and drawing the data of step k as a pure function of k makes a resumed run
reproduce an uninterrupted one bit for bit (CPU, fp32, same thread count).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..artifact import CONFIG_NAME, FORECASTERS_NAME, WEIGHTS_NAME
from ..config import finite_number, whole_number
from ..errors import ArtifactError, ConfigError
from ..io import expand_user, file_sha256, same_place, save_safetensors_atomic
from .data import data_digest

CHECKPOINT_NAME = "checkpoint.safetensors"
RNG_KEY = "rng.torch"
# Options that do not change what a resumed run computes; every other option must match the checkpoint's,
# or the resumed steps would silently follow another recipe (other data order, schedule, loss...).
# The forecaster options act only after the last router step, past every checkpoint (so the NaN error's advice,
# a lower --forecaster-lr, can be followed with --resume).
RESUME_MAY_CHANGE = frozenset({"resume", "progress", "report_to", "checkpoint_every", "output", "calibrate",
                               "forecaster_steps", "forecaster_lr"})
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
    tensors[RNG_KEY] = torch.get_rng_state()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    meta = {"step": step, "param_groups": groups, **extra}
    save_safetensors_atomic(path, tensors, metadata={"format": "skipgpt-train-state", "state": json.dumps(meta)})


def read_metadata(path: Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint (step, config, history) without loading its tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["state"])
    except (SafetensorError, OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: not a readable skipgpt checkpoint ({e})") from None
    if not isinstance(meta, dict):  # callers read it with .get
        raise ArtifactError(f"{path}: not a readable skipgpt checkpoint (its metadata is not a JSON object)")
    return meta


def routers_digest(folder: str) -> str:
    """sha256 of what a run reads from its --routers folder: config, routers and forecasters (a missing
    file counts as missing). The stage-2 adapter beside them is not loaded, so it is not part of it."""
    root = expand_user(folder)
    h = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME, FORECASTERS_NAME):
        f = root / name
        h.update(f"{name}\0{file_sha256(f) if f.is_file() else '-'}\n".encode())
    return h.hexdigest()


def check_fresh_start(path: Path) -> None:
    """Refuse a run without --resume into a folder whose checkpoint `path` belongs to an unfinished run (steps
    left, or the final save not done): the new run would overwrite its log at once and the checkpoint at its
    first save. An unreadable file is no run anyone could resume."""
    try:
        meta = read_metadata(path)
    except ArtifactError:
        return
    config = meta.get("config")
    step, steps = meta.get("step"), config.get("steps") if isinstance(config, dict) else None
    if whole_number(step) and whole_number(steps) and step >= steps and (path.parent / CONFIG_NAME).exists():
        return  # a finished run: a new one replaces its results, as a run into any used folder does
    where = f" (step {step} of {steps})" if whole_number(step) and whole_number(steps) else ""
    raise ConfigError(f"output {path.parent} holds a checkpoint of an unfinished run{where}: pass --resume to "
                      f"continue it, or choose another --output")


def check_resume_config(path: Path, config: dict[str, Any], world: int = 1) -> None:
    """Refuse to resume from `path` with a config other than the one that wrote it (naming what differs), on
    another number of processes `world` (each step reads world x batch sequences: the resumed steps would
    skip or repeat data), or with training data or --routers whose content changed since."""
    meta = read_metadata(path)
    saved = meta.get("config")
    if not isinstance(saved, dict):
        return  # written without its config: nothing to compare against
    digest = meta.get("data_sha256")  # then the data's content is compared below, wherever it lies now
    may_differ = RESUME_MAY_CHANGE | ({"data"} if digest else set())
    differ = [f"{k} {saved[k]!r} -> {config[k]!r}" for k in sorted(set(saved) & set(config))
              if k not in may_differ and saved[k] != config[k]
              and not (k in PATH_OPTIONS and same_place(saved[k], config[k]))]
    if differ:
        raise ConfigError(f"{path}: cannot --resume, the options differ from the run that wrote this checkpoint "
                          f"({'; '.join(differ)}); rerun with the original options or use another --output")
    if digest and data_digest(config["data"]) != digest:
        raise ConfigError(f"{path}: cannot --resume, the content of the training data {config['data']} changed "
                          f"since this checkpoint; restore the original data, or start afresh with another --output")
    saved_world = meta.get("world")  # absent: written before the count was recorded, by how many is unknown
    if saved_world is not None and saved_world != world:
        raise ConfigError(f"{path}: cannot --resume on {world} process(es), this checkpoint was written by "
                          f"{saved_world} (the data of each step depends on the count); launch {saved_world}, "
                          f"or start afresh with another --output")
    routers = meta.get("routers_sha256")
    if routers and config.get("routers") and routers_digest(config["routers"]) != routers:
        raise ConfigError(f"{path}: cannot --resume, the routers in {config['routers']} changed since this "
                          f"checkpoint; restore them, or start afresh with another --output")


def check_resume_base(path: Path, fingerprint: str) -> None:
    """Refuse to resume onto a base model whose weights (`fingerprint`, models/adapters.py) differ from those the
    run that wrote `path` trained on. Checkpoints written before the fingerprint was recorded are not checked, as
    for the process count: refusing them would strand every interrupted run of an older version."""
    saved = read_metadata(path).get("base_fingerprint")
    if saved is not None and saved != fingerprint:
        raise ConfigError(f"{path}: cannot --resume, the model has other weights (fingerprint {fingerprint}) than "
                          f"the run that wrote this checkpoint (fingerprint {saved}); resume with the original "
                          f"model, or start afresh with another --output")


def load_checkpoint(path: Path, routed, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore parameters, optimizer and RNG in place; return the JSON metadata (step, history, ...).

    Every tensor and the metadata are checked against this run's parameters and optimizer first: a file edited,
    damaged or written by another run fails in one line (ArtifactError), not with a traceback mid-restore or
    mid-run, nor by resuming from state that copy_ broadcast, load_state_dict cast, or that holds NaN."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    except (SafetensorError, OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: not a readable skipgpt checkpoint ({e})") from None
    params = trainable(routed)
    saved = {k[len("param."):] for k in tensors if k.startswith("param.")}
    if saved != set(params):
        raise ArtifactError(f"{path}: checkpoint holds other trainable parameters than this run "
                            f"(different --stage or model?); delete it or use another --output")
    for name, p in params.items():
        _check_tensor(path, f"param.{name}", tensors[f"param.{name}"], p)
    _check_meta(path, meta)
    state = _optimizer_state(path, tensors, meta["param_groups"], optimizer)
    rng = tensors.get(RNG_KEY)
    if rng is None or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        raise _unusable(path, f"{RNG_KEY} is missing or not a CPU generator state")
    try:  # what the checks cannot see (the generator's own fields); torch refuses before it changes anything
        torch.set_rng_state(rng)
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise _unusable(path, (str(e).splitlines() or [type(e).__name__])[0]) from None
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param.{name}"])
    return meta


def _unusable(path: Path, what: str) -> ArtifactError:
    return ArtifactError(f"{path}: not a checkpoint this run can resume from ({what}); "
                         f"delete it or use another --output")


def _check_tensor(path: Path, key: str, value: torch.Tensor, like: torch.Tensor) -> None:
    """`value` must be able to replace `like` as it is: copy_ would broadcast a smaller shape and cast a dtype."""
    if value.shape != like.shape or value.dtype != like.dtype:
        raise _unusable(path, f"{key} is {_describe(value)}, this run's is {_describe(like)}")
    if not torch.isfinite(value).all():
        raise _unusable(path, f"{key} holds NaN or infinite values")


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}"


def _optimizer_state(path: Path, tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]],
                     optimizer: torch.optim.Optimizer) -> dict[int, dict[str, torch.Tensor]]:
    """The checkpoint's optimizer state, each slot checked against the live parameter it will belong to
    (load_state_dict maps the saved ids to this optimizer's parameters in order, and casts what it gets)."""
    live = optimizer.param_groups
    if len(groups) != len(live):
        raise _unusable(path, f"{len(groups)} optimizer parameter groups, this run has {len(live)}")
    owner: dict[int, tuple[torch.Tensor, dict[str, Any]]] = {}  # saved id -> (live parameter, its live group)
    for g, h in zip(groups, live):
        ids = g.get("params")
        if not isinstance(ids, list) or len(ids) != len(h["params"]) or not all(whole_number(i) for i in ids):
            raise _unusable(path, "a parameter group lists other parameters than this run's")
        owner.update({i: (p, h) for i, p in zip(ids, h["params"])})
        for key, want in h.items():  # load_state_dict takes the saved values over this run's
            got = g.get(key)
            if key == "params":
                continue
            if isinstance(want, (tuple, list)):  # betas
                ok = isinstance(got, list) and len(got) == len(want) and all(finite_number(x) for x in got)
            elif finite_number(want):  # lr, base_lr (the trainer's schedule reads it), eps, weight_decay
                ok = finite_number(got)
            else:  # flags: another amsgrad, maximize... would change the update or want moments the file lacks
                ok = key not in g or got == want
            if not ok:
                raise _unusable(path, f"optimizer {key} is {got!r}, this run's is {want!r}")
    if len(owner) != sum(len(h["params"]) for h in live):
        raise _unusable(path, "param_groups lists a parameter id twice")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("param.") or key == RNG_KEY:
            continue
        index, _, slot = key.removeprefix("opt.").partition(".")
        if not key.startswith("opt.") or not index.isdigit() or int(index) not in owner or not slot:
            raise _unusable(path, f"unexpected tensor {key}")
        if slot == "step":
            if value.dim() != 0 or not value.is_floating_point() or not 0 <= float(value) < math.inf:
                raise _unusable(path, f"{key} is not a step count")
        else:
            _check_tensor(path, key, value, owner[int(index)][0])
        state.setdefault(int(index), {})[slot] = value
    if isinstance(optimizer, torch.optim.Adam):  # AdamW too: a missing moment would be a KeyError mid-run
        for index, slots in state.items():
            want = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if owner[index][1].get("amsgrad") else set())
            if set(slots) != want:
                raise _unusable(path, f"the optimizer state of parameter {index} holds {sorted(slots)}, "
                                      f"AdamW keeps {sorted(want)}")
    return state


def _check_meta(path: Path, meta: Any) -> None:
    """The JSON metadata that the trainer reads back: wrong types fail here, not mid-run."""
    if not isinstance(meta, dict):
        raise _unusable(path, "its metadata is not a JSON object")
    step = meta.get("step")
    if not whole_number(step) or step < 0:
        raise _unusable(path, f"step {step!r} is not a whole number >= 0")
    config = meta.get("config")
    steps = config.get("steps") if isinstance(config, dict) else None
    if whole_number(steps) and step > steps:
        raise _unusable(path, f"step {step} is past the run's {steps} steps")
    groups = meta.get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise _unusable(path, "param_groups is missing or not a list of objects")
    history = meta.get("history", [])
    if not isinstance(history, list) or not all(isinstance(r, dict) and finite_number(r.get("loss")) for r in history):
        raise _unusable(path, "history is not a list of logged steps")
    for key, check in (("train_seconds", finite_number), ("tokens", whole_number), ("threshold", finite_number)):
        if key in meta and not check(meta[key]):
            kind = "whole" if check is whole_number else "finite"
            raise _unusable(path, f"{key} {meta[key]!r} is not a {kind} number")
