"""Everything a run saves, in one directory, and the one way to load it back.

    DIR/skip_config.json        router design, calibrated threshold, base-model identity, and for a
                                baseline the policy it routes by (extra["routing"])
    DIR/routers.safetensors     router weights
    DIR/forecasters.safetensors the forecasters of informed skipping (forecaster_rank > 0 in the config)
    DIR/adapter/                the stage-2 LoRA adapter (PEFT, safetensors), when LoRA trained

The config records the identity of the base model (architecture, hidden size, layer count, weight
fingerprint), so routers are never silently applied to a model they were not trained on, and lists every
other file of the directory with its sha256 ("files"), so a directory loads whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from .config import FILES_KEY, MAX_LORA_SCALE, SkipConfig
from .errors import ArtifactError, ConfigError
from .io import expand_user, file_sha256, fsync_dir, remove_temporaries, save_tensors, settle
from .models.adapters import find_layers, fingerprint, unwrap
from .models.routed import RoutedModel
from .routing import policies

CONFIG_NAME = "skip_config.json"
WEIGHTS_NAME = "routers.safetensors"
FORECASTERS_NAME = "forecasters.safetensors"
ADAPTER_DIR = "adapter"
LORA_ACTIONS = ("merge", "attach", "none")
SAVE_PREFIX = ".skipgpt-save-"  # the temporary folder a save writes into, inside the directory
# The names a save owns in its directory: one there that the config does not list is stale (a new save
# removes it, a load refuses it), since an unlisted DIR/adapter would otherwise be applied without a word.
PART_NAMES = frozenset({WEIGHTS_NAME, FORECASTERS_NAME, ADAPTER_DIR})
# The dtypes a save writes weights in; ints and bools would load cast (a bool weight becomes 1.0), float64 and
# float8 are not written by any save (and torch.isfinite does not take every float8).
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

Writer = Callable[[Path], None]  # writes one part (a file or a folder) at the path it is given


def save_routers(routed: RoutedModel, directory: str | Path) -> Path:
    """Write the routers, their config and (when the model has them) the forecasters and the LoRA adapter
    to `directory`, all or nothing (write_parts)."""
    got = _other_weights(routed.model, routed.config.base.fingerprint)
    if got is not None or routed.merged:  # (float16 weights are not fingerprinted: the routed model knows)
        why = f"fingerprint {got}, the config's {routed.config.base.fingerprint}" if got else "an adapter merged"
        raise ArtifactError(
            f"the model's weights are no longer the base these routers were trained on ({why}), e.g. a LoRA "
            f"adapter merged into them: saved, they would load onto the plain base and give other outputs. Save "
            f"before merging (load_routers(..., lora='attach') keeps an adapter separate, and saves it)")
    # One entry per part of the directory: its name and what writes it.
    routers = _finite(routed.routers.state_dict(), "router")
    parts: dict[str, Writer] = {WEIGHTS_NAME: tensors_writer(routers, "skipgpt-routers")}
    if routed.forecasters is not None:
        forecasters = _finite(routed.forecasters.state_dict(), "forecaster")
        parts[FORECASTERS_NAME] = tensors_writer(forecasters, "skipgpt-forecasters")
    if hasattr(routed.model, "peft_config"):
        parts[ADAPTER_DIR] = lambda path: routed.model.save_pretrained(path, safe_serialization=True)
    write_parts(Path(directory), parts, routed.config)
    return Path(directory)


def _finite(tensors: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """`tensors`, refused before anything is written when one holds NaN/inf: the loader refuses such a save."""
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ArtifactError(f"the {kind} weight {key} holds NaN or infinite values (training diverged?); "
                                f"nothing was saved")
    return tensors


def tensors_writer(tensors: dict[str, torch.Tensor], kind: str) -> Writer:
    return lambda path: save_tensors(tensors, path, metadata={"format": kind})


def write_parts(directory: Path, parts: dict[str, Writer], config: SkipConfig) -> None:
    """Write `parts` and the config (listing every file written, with its sha256) into `directory`.

    Everything is first written into a temporary folder inside `directory` (same file system, and a run
    folder keeps its checkpoint, logs and cache where they are). Then the old config is removed, the
    parts are moved into place and the new config comes last. A kill while writing leaves the previous
    save whole; a kill while moving leaves a directory without config, which does not load; the next
    save removes what a killed one left.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(SAVE_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    for name in (CONFIG_NAME, *parts):
        remove_temporaries(directory / name)  # of the per-file atomic writes of older versions
    tmp = Path(tempfile.mkdtemp(prefix=SAVE_PREFIX, dir=directory))
    try:
        for name, write in parts.items():
            write(tmp / name)
        files = {p.relative_to(tmp).as_posix(): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        text = json.dumps({**config.to_dict(), FILES_KEY: files}, indent=2, sort_keys=True) + "\n"
        (tmp / CONFIG_NAME).write_text(text, encoding="utf-8")
        settle(tmp)
        # Only the names a save owns, never what the old config lists: that file is input, and a name in it
        # such as "../x" or "/etc" would be removed outside the directory.
        stale = PART_NAMES - set(parts)
        (directory / CONFIG_NAME).unlink(missing_ok=True)  # from here to the last rename it does not load
        for name in sorted(stale):
            _remove(directory / name)
        for name in parts:
            if (directory / name).is_dir() or (tmp / name).is_dir():
                _remove(directory / name)  # a rename cannot replace a folder that holds files, nor a file by a folder
            os.replace(tmp / name, directory / name)
        os.replace(tmp / CONFIG_NAME, directory / CONFIG_NAME)
        fsync_dir(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove(path: Path) -> None:
    """Remove a file, a folder, or a link (never what it points to)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def load_routers(model: nn.Module, directory: str | Path, check: bool = True, lora: str = "merge") -> RoutedModel:
    """The model exactly as a run saved it: `model` (an HF causal LM) routed by the routers in `directory`,
    with a baseline's policy restored and the stage-2 adapter in DIR/adapter applied.

    lora: "merge" folds the adapter into the base weights (fastest inference; on a bf16/fp16 base the merged
    weights round otherwise than the run computed, so logits move slightly and a rare decision flips), "attach"
    keeps it as a PEFT adapter (routed.model becomes a PeftModel: exactly the run, in any dtype), "none" ignores
    it. check: refuse routers trained
    on another base model (check=False pairs them with `model`: its fingerprint is what a later save records).
    """
    if lora not in LORA_ACTIONS:
        raise ConfigError(f"lora must be one of {LORA_ACTIONS}, got {lora!r}")
    directory = expand_user(directory)
    config, files = _read(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.exists():
        raise ArtifactError(f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    if check:
        check_base(config, model, str(directory))
    elif config.base.fingerprint:
        config.base.fingerprint = fingerprint(model)
    state = _read_safetensors(weights)
    routed = RoutedModel(model, config)
    try:
        _check_router_state(state, routed.routers.state_dict(), weights, config.router)
        routed.routers.load_state_dict(state)
        if routed.forecasters is not None:
            path = directory / FORECASTERS_NAME
            if not path.exists():
                raise ArtifactError(f"{directory}: its config names rank-{config.forecaster_rank} forecasters but "
                                    f"{FORECASTERS_NAME} is missing")
            forecasters = _read_safetensors(path)
            _check_router_state(forecasters, routed.forecasters.state_dict(), path, "forecaster")
            routed.forecasters.load_state_dict(forecasters)
        routed.force(policies.from_extra(routed, str(directory)))
        if lora != "none" and has_adapter(directory, files):
            apply_adapter(routed, directory / ADAPTER_DIR, merge=lora == "merge")
    except BaseException:  # the caller's model as it was given, whatever went wrong
        routed.unpatch()
        raise
    return routed


def load_adapter(model: nn.Module, directory: str | Path, merge: bool = True, trainable: bool = False) -> nn.Module:
    """`model` with the PEFT LoRA adapter in `directory`: merged into its weights, or as a PeftModel."""
    directory = check_adapter(directory)
    weights = _check_lora_weights(model, directory, merge)
    from peft import PeftModel  # seconds to import: only commands that meet an adapter pay for it
    from peft.utils import get_peft_model_state_dict

    try:  # TypeError, AttributeError: a config field of the wrong type ("r": null, "lora_alpha": "x")
        with peft_quiet():
            peft = PeftModel.from_pretrained(model, str(directory), is_trainable=trainable)
    except (ValueError, OSError, KeyError, RuntimeError, TypeError, AttributeError) as e:
        raise ArtifactError(f"{directory}: cannot load the adapter ({str(e).splitlines()[0]})") from None
    # PEFT injects the modules its config names (target_modules, layers_to_transform, exclude_modules...) and
    # loads only the file's weights for those, silently: an edited config would apply the adapter in part.
    injected = {k for k in get_peft_model_state_dict(peft) if _is_lora_weight(k)}
    if injected != weights:
        peft.unload()  # the model as it was given
        unused, bare = sorted(weights - injected), sorted(injected - weights)
        what = f"{unused[0]} would not be applied" if unused else f"{bare[0]} is not in the file"
        raise ArtifactError(f"{directory}: its adapter_config.json applies LoRA to other modules than its weights "
                            f"adapt ({what}); an edited target_modules, layers_to_transform or exclude_modules?")
    return peft.merge_and_unload() if merge else peft


@contextmanager
def peft_quiet() -> Iterator[None]:
    """PEFT 0.21 reads the model's `is_gradient_checkpointing`, which transformers 5 deprecates with a FutureWarning
    on every adapter attached or loaded: noise for the user, about code neither of us runs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def check_adapter(directory: str | Path) -> Path:
    """`directory` if it looks like a PEFT LoRA adapter folder skipgpt reads, else ArtifactError."""
    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise ArtifactError(f"{directory}: not a LoRA adapter folder (no adapter_config.json)")
    if not (directory / "adapter_model.safetensors").is_file():
        raise ArtifactError(f"{directory}: no adapter_model.safetensors (only safetensors adapters are read)")
    config = _adapter_config(directory)
    kind = config.get("peft_type")
    if kind != "LORA":  # another PEFT method (prompt tuning, IA3...) has no LoRA weights to merge
        raise ArtifactError(f"{directory}: its peft_type is {kind!r}; skipgpt reads LoRA adapters only")
    if config.get("use_dora"):  # its magnitude vectors are not LoRA weights: PEFT would load without them
        raise ArtifactError(f"{directory}: a DoRA adapter (use_dora); skipgpt reads plain LoRA adapters only")
    # Fields PEFT reads without checking their type: a wrong one failed inside PEFT with a traceback, or after its
    # injection, leaving LoRA layers in the caller's model (a string modules_to_save is taken letter by letter).
    saved = config.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(t, str) for t in saved)):
        raise ArtifactError(f"{directory}: adapter_config.json's modules_to_save is {saved!r}, not a list of names")
    for pattern in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(pattern) or {}, dict):
            raise ArtifactError(f"{directory}: adapter_config.json's {pattern} is {config[pattern]!r}, not a map "
                                f"of module names to numbers")
    # The weights are checked for NaN; the scale alpha / r they are multiplied by must be a number too (a NaN or
    # 1e30 lora_alpha gave NaN or nonsense scores with exit status 0).
    for name, pattern, whole in (("r", "rank_pattern", True), ("lora_alpha", "alpha_pattern", False)):
        per_layer = config.get(pattern)
        bad = [v for v in (config.get(name), *(per_layer.values() if isinstance(per_layer, dict) else ()))
               if not _scale_number(v, whole)]
        if bad:
            raise ArtifactError(f"{directory}: adapter_config.json's {name} (or {pattern}) holds {bad[0]!r}, not a "
                                f"{'whole number' if whole else 'number'} in (0, {MAX_LORA_SCALE:g}]")
    return directory


def _scale_number(value, whole: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (whole and not isinstance(value, int)):
        return False
    return 0 < value <= MAX_LORA_SCALE  # (NaN fails both comparisons)


def _adapter_config(directory: Path) -> dict:
    path = directory / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # not UTF-8, not JSON, or an integer past Python's 4,300-digit limit
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    return config


def _is_lora_weight(key: str) -> bool:
    return key.endswith((".lora_A.weight", ".lora_B.weight"))


def input_embedding(model: nn.Module) -> torch.Tensor:
    """The input embedding's weight, which a tied lm_head shares."""
    return unwrap(model).get_input_embeddings().weight


def _check_lora_weights(model: nn.Module, directory: Path, merge: bool) -> set[str]:
    """Each LoRA weight of the adapter against the Linear layer it adapts, before PEFT injects anything (a load
    that fails after the injection leaves LoRA layers in the caller's model); and no NaN, which would load.
    Returns the names of the LoRA A and B weights."""
    path = directory / "adapter_model.safetensors"
    config = _adapter_config(directory)
    rank = None if config.get("rank_pattern") else config.get("r")  # a pattern gives some layers other ranks
    base = unwrap(model)
    weights, ranks = set(), {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no items(); one tensor in memory at a time
                value = f.get_tensor(key)
                _check_weight(path, key, value)
                if not _is_lora_weight(key):
                    continue  # another PEFT weight (a DoRA magnitude...): PEFT checks it
                weights.add(key)
                name, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
                try:
                    layer = base.get_submodule(name)
                except AttributeError:
                    raise ArtifactError(f"{path}: {key} adapts {name or key}, which this model does not have "
                                        f"(an adapter for another model?)") from None
                layer = getattr(layer, "base_layer", layer)  # a layer PEFT already wraps
                if not isinstance(layer, nn.Linear):
                    raise ArtifactError(f"{path}: {key} adapts {name}, which is not a Linear layer")
                if merge and layer.weight is input_embedding(base):  # a tied lm_head
                    raise ArtifactError(f"{path}: {key} adapts {name}, whose weight is also the input embedding "
                                        f"(tied): merged, the update would change the embedding too; attach it "
                                        f"instead (load_routers(..., lora='attach'))")
                if value.dim() != 2:
                    raise ArtifactError(f"{path}: {key} has shape {tuple(value.shape)}, not a matrix")
                # without one r for all, a module's rank is its A's, and its B must agree
                r = rank or ranks.setdefault(name, value.shape[0 if part == "A.weight" else -1])
                want = (r, layer.in_features) if part == "A.weight" else (layer.out_features, r)
                if tuple(value.shape) != want:
                    raise ArtifactError(f"{path}: {key} has shape {tuple(value.shape)}, this model needs {want} "
                                        f"(an adapter for another model?)")
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path} is corrupt or truncated ({e})") from None
    return weights


def apply_adapter(routed: RoutedModel, directory: str | Path, merge: bool = True) -> RoutedModel:
    """load_adapter on routed.model; the routed layers stay the modules the model runs."""
    _check_saved_modules(routed, check_adapter(directory))
    routed.model = load_adapter(routed.model, directory, merge=merge)
    check_layers(routed)
    routed.adapter, routed.merged = Path(directory), routed.merged or merge
    return routed


def _check_saved_modules(routed: RoutedModel, directory: Path) -> None:
    """Refuse, before PEFT changes the model, an adapter whose modules_to_save wraps a module routing runs
    itself (a decoder layer, its attention or MLP): the routed forward would run the stale one. Others (an
    lm_head saved whole for added tokens) are PEFT's business."""
    saved = _adapter_config(directory).get("modules_to_save") or []
    routed_ids = {id(m) for parts in routed.layers for m in (parts.layer, parts.attn, parts.mlp)}
    hits = [name for name, module in routed.model.named_modules() if id(module) in routed_ids
            and any(name == t or name.endswith("." + t) for t in saved if isinstance(t, str))]
    if hits:
        raise ArtifactError(f"{directory}: its adapter saves {hits[0]} whole (modules_to_save), a module routing "
                            "runs itself; skipgpt applies LoRA on the Linear projections only")


def check_layers(routed: RoutedModel) -> None:
    """The routed layer forward reads routed.layers: PEFT must have swapped only the projections inside
    attention and MLP, never the modules themselves."""
    for mine, live in zip(routed.layers, find_layers(routed.model)):
        if mine.layer is not live.layer or mine.attn is not live.attn or mine.mlp is not live.mlp:
            raise ArtifactError("the adapter replaces a whole decoder layer, attention or MLP module "
                                "(modules_to_save?), which routing runs itself; skipgpt applies LoRA on the Linear "
                                "projections only")


def read_config(directory: str | Path) -> SkipConfig:
    """The config of a router directory, once every file it lists is there and unchanged (ArtifactError
    otherwise): commands call it to refuse a bad --routers before loading a model."""
    return _read(expand_user(directory))[0]


def has_adapter(directory: Path, files: dict[str, str] | None) -> bool:
    """Whether the save wrote a stage-2 adapter (older configs, without a file list: DIR/adapter exists)."""
    if files is None:
        return (directory / ADAPTER_DIR).exists()
    return any(name.startswith(ADAPTER_DIR + "/") for name in files)


def _read(directory: Path) -> tuple[SkipConfig, dict[str, str] | None]:
    if not directory.exists():
        raise ArtifactError(f"router directory {directory} does not exist")
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is a file; expected a router directory holding {CONFIG_NAME}")
    path = directory / CONFIG_NAME
    if path.exists() and not path.is_file():
        raise ArtifactError(f"{path} is not a regular file")
    if not path.exists():
        if (directory / WEIGHTS_NAME).exists() or any(directory.glob(SAVE_PREFIX + "*")):
            raise ArtifactError(f"{directory} is incomplete (no {CONFIG_NAME}: its save was interrupted); "
                                f"save or train again")
        raise ArtifactError(f"{directory} has no {CONFIG_NAME}: not a skipgpt router directory")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ArtifactError(f"{path}: not a UTF-8 JSON file") from None
    except ValueError as e:  # JSONDecodeError, or an integer past Python's 4,300-digit limit
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    files = data.pop(FILES_KEY, None) if isinstance(data, dict) else None
    try:
        config = SkipConfig.from_dict(data, source=str(path))
    except ConfigError as e:
        raise ArtifactError(str(e)) from None
    _check_files(directory, files)
    return config, files


def _check_files(directory: Path, files) -> None:
    """Every file the config lists is there with the sha256 it was saved with."""
    if files is None:
        return  # saved before configs listed their files
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise ArtifactError(f"{directory / CONFIG_NAME}: '{FILES_KEY}' must map file names to sha256 digests")
    for name, digest in files.items():
        path = directory / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ArtifactError(f"{directory / CONFIG_NAME}: '{FILES_KEY}' names {name}, outside the directory")
        if not path.is_file():
            raise ArtifactError(f"{directory} is incomplete: {name} is missing, though its {CONFIG_NAME} lists it; "
                                f"save or train again")
        if file_sha256(path) != digest:
            raise ArtifactError(f"{path} is not the file {CONFIG_NAME} was saved with (corrupt or truncated, "
                                f"or written by another save); save or train again")
    listed = {name.split("/")[0] for name in files}
    for name in sorted(PART_NAMES - listed):
        if (directory / name).exists():
            raise ArtifactError(f"{directory / name} is not among the files its {CONFIG_NAME} lists (added after "
                                f"the save, or left by an interrupted one); move it out (an adapter can be given "
                                f"with --lora) or save again")


def check_base(config: SkipConfig, model: nn.Module, source: str) -> None:
    """Refuse routers trained for another base model, naming the first difference."""
    hf = unwrap(model).config
    want = config.base
    checks = [  # (the layer count last, and only counted when asked: an unsupported model has no layers to count)
        ("model type", want.model_type, lambda: hf.model_type),
        ("hidden size", want.hidden_size, lambda: hf.hidden_size),
        ("layer count", want.num_layers, lambda: len(find_layers(model))),  # as save counts (a pruned config lags)
    ]
    for what, trained, count in checks:
        given = count() if trained else None
        if trained and trained != given:
            raise ArtifactError(
                f"{source}: routers were trained for {want.name or want.architecture!r} ({what} {trained!r}), "
                f"but the model has {what} {given!r}"
            )
    got = _other_weights(model, want.fingerprint)
    if got is not None:
        raise ArtifactError(
            f"{source}: routers were trained on different weights ({repr(want.name) + ', ' if want.name else ''}"
            f"fingerprint {want.fingerprint}) than the given model (fingerprint {got}; resized token embeddings "
            f"count as different; from Python, load_routers(..., check=False) pairs them anyway)"
        )
    if want.fingerprint and _float16(model):
        warnings.warn(f"{source}: the weights were not compared with those the routers were trained on (float16 "
                      f"rounding moves them across the bfloat16 values the fingerprint samples); only the "
                      f"architecture, hidden size and layer count were checked", stacklevel=3)


def _float16(model: nn.Module) -> bool:
    """float16 weights, whose rounding changes the bfloat16 values the fingerprint samples: not comparable."""
    return next(unwrap(model).parameters()).dtype == torch.float16


def _other_weights(model: nn.Module, expected: str) -> str | None:
    """The fingerprint of `model`'s base weights when it is not `expected` (None: the same, or not comparable:
    no fingerprint recorded, or float16 weights)."""
    if not expected or _float16(model):
        return None
    got = fingerprint(model)
    return None if got == expected else got


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{path} is corrupt or truncated ({e})") from None


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
        _check_weight(weights, key, value)


def _check_weight(path: Path, key: str, value: torch.Tensor) -> None:
    """A saved weight must be a float the saves write, and finite (NaN would load and spread to every output)."""
    if value.dtype not in WEIGHT_DTYPES:
        raise ArtifactError(f"{path}: {key} is {str(value.dtype).removeprefix('torch.')}, not a float weight")
    if not torch.isfinite(value).all():
        raise ArtifactError(f"{path}: {key} holds NaN or infinite values")
