"""The paper's comparison: every method at the same parameter sparsity, through the same evaluation.

Each method is built (trained, or derived from Block Influence), saved as a router directory under
`workdir/<method>-<sparsity%>/` and evaluated; the evaluation result is cached next to it as
`eval-<key>.json` (the key covers tasks, limit, batch size, sequence length and the base weights). A second
run with the same workdir reuses both, so an interrupted table resumes where it stopped; a build whose folder
changed since (routers trained or edited into it) or no longer loads is built again.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..artifact import CONFIG_NAME, WEIGHTS_NAME, load_routers, save_routers
from ..config import FILES_KEY, SkipConfig
from ..errors import ArtifactError, ConfigError
from ..evaluation import evaluate
from ..evaluation import tasks as task_data
from ..evaluation.perplexity import check_context
from ..io import expand_user, file_sha256, same_place, write_json_atomic
from ..models.adapters import fingerprint
from ..models.loading import ALIASES, load_model
from ..models.routed import RoutedModel
from ..routing.calibrate import calibrate_threshold
from ..training import TrainConfig, train
from ..training.data import data_digest, load_data
from ..training.step import chunked
from ..training.trainer import FIT_SEQUENCES
from .dynamic import coupled, mod_d
from .registry import INFORMED_RANK, INFORMED_ROUTER, METHODS
from .static import random_routing, shortgpt, static_modules

# Written last: marks a finished build, keeps its wall time for reruns, and the settings it was built with.
BUILD_LOG = "build.json"
# The settings each kind of build reads (a change to any other reuses it): trained methods read the training
# recipe; Block Influence and random routing read only the calibration sequences (random routing: also its seed
# and, through its reference rates, the SkipGPT-RT build). Sampled ('self') data depends on the seed too.
TRAINED_SETTINGS = ("model", "dtype", "steps", "data", "seq_len", "batch_size", "alpha", "lr", "distill", "seed")
CALIBRATED_SETTINGS = ("model", "dtype", "data", "seq_len", "calibration_sequences")
CALIBRATED_METHODS = ("shortgpt", "static-modules", "random")
# How trained builds count sparsity when calibrating and reporting it: builds from before the routers' cost was
# charged are rebuilt (their thresholds met a gross target, their cached evaluations report one).
TRAINED_ACCOUNTING = "net of forecasters and routers"


@dataclass
class CompareSettings:
    """What `skipgpt compare` runs (its flags of the same names); the training options default to TrainConfig's."""

    model: str = TrainConfig.model
    dtype: str = TrainConfig.dtype  # the base model's, in training and evaluation; routers and LoRA stay fp32
    tasks: dict[str, str | None] = field(default_factory=dict)
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    steps: int = 100
    data: str = TrainConfig.data
    limit: int | None = None  # first N items of each multiple-choice task
    windows: int | None = None  # first N perplexity windows (None: limit)
    workdir: Path = Path("skipgpt-compare")
    seq_len: int = TrainConfig.seq_len
    batch_size: int = TrainConfig.batch_size
    eval_batch_size: int = 8
    eval_seq_len: int | None = None  # perplexity window (None: the evaluator's default)
    calibration_sequences: int = 8
    alpha: float = TrainConfig.alpha
    lr: float = TrainConfig.lr
    distill: float = TrainConfig.distill
    seed: int = TrainConfig.seed


def check_methods(methods: list[str]) -> list[str]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if not methods:
        raise ConfigError("--methods names no method")
    return list(dict.fromkeys(methods))


def artifact_dir(s: CompareSettings, method: str, sparsity: float) -> Path:
    """workdir/<method>-<percent>: "skipgpt-rt-25" for 0.25, "skipgpt-rt-25.4" for 0.254 (never rounded onto
    another target's build)."""
    return Path(s.workdir) / ("dense" if method == "dense" else f"{method}-{sparsity * 100:g}")


def check_targets(s: CompareSettings, sparsities: list[float]) -> None:
    """Refuse targets whose builds would share a folder (0.25 and 0.2500001 both print as 25)."""
    seen: dict[str, float] = {}
    for sparsity in sparsities:
        name = artifact_dir(s, "<method>", sparsity).name  # every method names its folder after the target alike
        if name in seen:
            raise ConfigError(f"sparsity targets {seen[name]} and {sparsity} would share the build folders {name}; "
                              "give targets that differ within six significant digits of their percentage")
        seen[name] = sparsity


def _train_config(s: CompareSettings, stage: str, sparsity: float, output: Path, routers: Path | None = None):
    return TrainConfig(stage=stage, model=s.model, data=s.data, output=str(output), target_sparsity=sparsity,
                       steps=s.steps, seq_len=s.seq_len, batch_size=s.batch_size, alpha=s.alpha, lr=s.lr,
                       distill=s.distill, seed=s.seed, routers=None if routers is None else str(routers),
                       dtype=s.dtype, progress=False, checkpoint_every=0)


class Builder:
    """Builds (or reloads) each method's model; holds the shared training data and calibration batches."""

    def __init__(self, s: CompareSettings, log: Callable[[str], None] = print):
        self.s = s
        self.log = log
        self._data = None
        # A build depends on the data's content and the base weights, not only on their names: both are settings.
        # Hashed here, so a missing --data fails before the dense evaluation (dense alone reads no data).
        self.data_sha256 = data_digest(s.data) if any(m != "dense" for m in s.methods) else None
        self.fingerprint: str | None = None  # the base model's, from the first model built

    def settings(self, method: str, sparsity: float) -> dict:
        """What a build of `method` depends on; informed methods add their fixed recipe and random routing the
        SkipGPT-RT build whose rates it copies, so a build made under another one is rebuilt rather than reused."""
        if method in CALIBRATED_METHODS:
            seeded = method == "random" or self.s.data == "self"
            keys = CALIBRATED_SETTINGS + (("seed",) if seeded else ())
        else:
            keys = TRAINED_SETTINGS
        settings = {k: spelled(getattr(self.s, k)) if k in PATH_SETTINGS else str(getattr(self.s, k)) for k in keys}
        settings.update(data_sha256=self.data_sha256, base_fingerprint=self.fingerprint)
        if method not in CALIBRATED_METHODS:
            settings["sparsity"] = TRAINED_ACCOUNTING
        if method == "random":
            rt = self._current("skipgpt-rt", sparsity)
            settings["reference"] = "uniform" if rt is None else _routers_digest(rt)
        if method.startswith("skipgpt-informed"):
            cfg = _train_config(self.s, "router", 0.25, Path(self.s.workdir))
            settings["informed"] = (f"rank {INFORMED_RANK}, {INFORMED_ROUTER} routers, {FIT_SEQUENCES} fit sequences, "
                                    f"{cfg.forecaster_steps} forecaster steps at lr {cfg.forecaster_lr:g}")
        return settings

    def fresh(self):
        return load_model(self.s.model, dtype=self.s.dtype)

    def data(self, routed, tokenizer):
        if self._data is None:
            cfg = _train_config(self.s, "router", 0.25, Path(self.s.workdir))
            self._data = load_data(cfg, routed, tokenizer, Path(self.s.workdir) / "cache")
        return self._data

    def calibration(self, routed, tokenizer) -> list[dict[str, torch.Tensor]]:
        d = self.data(routed, tokenizer)
        seqs = d.train[: self.s.calibration_sequences]
        return chunked(seqs, 2, seqs.device)

    def build(self, method: str, sparsity: float):
        """(model or RoutedModel ready to evaluate, tokenizer, seconds spent building it now)."""

        out = artifact_dir(self.s, method, sparsity)
        model, tok = self.fresh()
        self.fingerprint = self.fingerprint or fingerprint(model)
        if method == "dense":
            return model, tok, 0.0
        log = self._finished(method, sparsity)
        if self._current(method, sparsity):
            try:
                routed = load_routers(model, out)
                self.log(f"  reusing {out}")
                return routed, tok, float(log.get("seconds", 0.0))
            except ArtifactError as e:  # the workdir is compare's own cache: a damaged build is built again
                self.log(f"  {out} cannot be loaded ({e}); rebuilding")
                model, tok = self.fresh()  # load_routers may have failed after routing this one
        elif log is not None:
            self.log(f"  {out} was built with other settings ({log.get('settings')}); rebuilding")
        # The old build's log goes first: a rebuild cut short after its save must not pass for the old settings.
        (out / BUILD_LOG).unlink(missing_ok=True)
        for stale in out.glob("eval-*.json"):  # evaluations of an older build of this method
            stale.unlink()
        tic = time.perf_counter()
        if method in ("shortgpt", "static-modules"):
            routed = RoutedModel(model, name=self.s.model)
            build = shortgpt if method == "shortgpt" else static_modules
            build(routed, tok, sparsity, self.calibration(routed, tok))
            save_routers(routed, out)
        elif method == "random":
            routed = random_routing(RoutedModel(model, name=self.s.model), sparsity,
                                    self._reference_rates(sparsity), seed=self.s.seed)
            save_routers(routed, out)
        elif method in ("skipgpt-rt", "skipgpt-joint", "skipgpt-informed"):
            stage = "joint" if method == "skipgpt-joint" else "router"
            informed = method == "skipgpt-informed"
            config = SkipConfig(forecaster_rank=min(INFORMED_RANK, model.config.hidden_size),
                                router=INFORMED_ROUTER) if informed else SkipConfig()
            routed = RoutedModel(model, config, name=self.s.model)
            data = self.data(routed, tok)
            routed = train(_train_config(self.s, stage, sparsity, out), routed=routed, tokenizer=tok, data=data).routed
        elif method in ("skipgpt-rt-lora", "skipgpt-informed-lora"):
            first = method.removesuffix("-lora")
            rt = artifact_dir(self.s, first, sparsity)
            self.build(first, sparsity)  # reused when current; a stage 1 of other settings is rebuilt first
            tic = time.perf_counter()  # this row's build is the LoRA stage; stage 1's time is in its own log
            routed = load_routers(model, rt)
            data = self.data(routed, tok)
            cfg = _train_config(self.s, "lora", sparsity, out, routers=rt)
            routed = train(cfg, routed=routed, tokenizer=tok, data=data).routed
        elif method in ("mod-d", "coupled"):
            routed = self._train_policy(method, model, tok, sparsity, out)
        else:  # pragma: no cover - check_methods guards this
            raise ConfigError(f"unknown method {method}")
        seconds = time.perf_counter() - tic
        # forward-only forecaster fitting and forecaster tuning read training text too: their tokens go on record
        # (a LoRA stage does neither: the counts its routers carry are stage 1's, in stage 1's own log)
        extra = routed.config.extra if isinstance(routed, RoutedModel) and not method.endswith("-lora") else {}
        write_json_atomic(out / BUILD_LOG, {"method": method, "sparsity": sparsity, "seconds": seconds,
                                            "settings": self.settings(method, sparsity),
                                            "config_sha256": file_sha256(out / CONFIG_NAME),
                                            "fit_tokens": int(extra.get("forecaster_fit_tokens", 0)),
                                            "tune_tokens": int(extra.get("forecaster_tune_tokens", 0))})
        return routed, tok, seconds

    def _train_policy(self, method: str, model, tok, sparsity: float, out: Path):
        routed = (mod_d if method == "mod-d" else coupled)(model, sparsity)
        data = self.data(routed, tok)
        train(_train_config(self.s, "router", sparsity, out), routed=routed, tokenizer=tok, data=data)
        val = chunked(data.val, 2, next(routed.model.parameters()).device)  # where train() left the model
        if method == "mod-d":
            routed.policy.calibrate(val)  # causal thresholds for evaluation and decode
        else:
            calibrate_threshold(routed, val, sparsity, "param")
        routed.config.extra.pop("train_router", None)  # measured before calibration: misleading
        save_routers(routed, out)
        return routed

    def _reference_rates(self, sparsity: float):
        """Per-module skip rates of SkipGPT-RT at this sparsity on the calibration text, if it was built."""

        rt = self._current("skipgpt-rt", sparsity)
        if rt is None:
            self.log(f"  random: no current {artifact_dir(self.s, 'skipgpt-rt', sparsity)}, using a uniform skip "
                     f"rate of {sparsity:.0%} for every module")
            return None
        model, tok = self.fresh()
        routed = load_routers(model, rt)
        routed.reset_sparsity()
        with torch.no_grad():
            for batch in self.calibration(routed, tok):
                routed(**batch)
        rep = routed.sparsity()
        return torch.tensor([rep.per_layer_attention, rep.per_layer_mlp], dtype=torch.float64).T

    def _finished(self, method: str, sparsity: float) -> dict | None:
        """The build log of `method`'s folder at this sparsity if that build finished (its config is there)."""
        out = artifact_dir(self.s, method, sparsity)
        log = _read_build_log(out / BUILD_LOG)
        return log if log is not None and (out / CONFIG_NAME).exists() else None

    def _current(self, method: str, sparsity: float) -> Path | None:
        """The folder of `method`'s build at this sparsity if it finished with the current settings."""
        log = self._finished(method, sparsity)
        folder = artifact_dir(self.s, method, sparsity)
        saved = dict(log.get("settings") or {}) if log is not None else {}
        # Only the settings this build reads are compared: logs that recorded more (older versions) stay current, and
        # so do logs that spelled a path another way (their content digests are compared beside them).
        current = (log is not None and log.get("sparsity") == sparsity  # not another target printed alike
                   and all(_same(k, saved.get(k, "<absent>"), v) for k, v in self.settings(method, sparsity).items())
                   and log.get("config_sha256") in (None, file_sha256(folder / CONFIG_NAME)))
        # (the config lists its files' sha256: a folder trained or edited into since the build is not this build;
        # logs from before the digest was recorded are taken as they are)
        return folder if current else None


PATH_SETTINGS = ("model", "data")


def spelled(name) -> str:
    """One spelling of a model or data path, however it was given (relative, absolute, with ~ or through a
    link): the resolved absolute path when it exists; an alias, a hub name or 'self' as given."""
    name = str(name)
    path = expand_user(name)
    return str(path.resolve()) if name not in ALIASES and name != "self" and path.exists() else name


def _same(key: str, saved: str, current: str) -> bool:
    return saved == current or (key in PATH_SETTINGS and same_place(saved, current))


def _routers_digest(folder: Path) -> str:
    """The sha256 of a saved build's router weights, as its config lists it."""
    try:
        return str(json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))[FILES_KEY][WEIGHTS_NAME])
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable"


def _read_build_log(path: Path) -> dict | None:
    try:
        log = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return log if isinstance(log, dict) else None


def _task_digest(name: str, path: str | None) -> str | None:
    """sha256 of what task `name` reads from `path` (its items, or its perplexity text); None for the hub."""
    if path is None:
        return None
    content = task_data.load_perplexity_text(name, path) if name in task_data.PPL_TASKS else \
        task_data.load_task(name, path).docs
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def eval_key(s: CompareSettings, base_fingerprint: str) -> str:
    """A cached evaluation is reused only for the same tasks (their content, not only their paths), settings and
    base weights (the dense folder has no build log to go stale with its model's)."""
    tasks = sorted((k, str(v) if v is None else spelled(v), _task_digest(k, v)) for k, v in s.tasks.items())
    spec = [tasks, s.limit, s.eval_batch_size, s.eval_seq_len, s.dtype, spelled(s.model), base_fingerprint]
    if s.windows is not None:  # keeps the keys of evaluations cached before --windows existed
        spec.append(s.windows)
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:10]


def evaluate_method(s: CompareSettings, model, tokenizer, cache: Path) -> tuple[dict, float]:
    """The evaluator's result for one method and the seconds it took (from `cache` when present)."""
    if cache.exists():
        try:
            saved = json.loads(cache.read_text(encoding="utf-8"))
            if _readable(saved["result"], s.tasks):
                return saved["result"], float(saved["seconds"])
        except (ValueError, KeyError, TypeError):
            pass  # a cache, not user data: evaluate again (also when the table could not read its result)

    tic = time.perf_counter()
    result = evaluate(model, tokenizer, dict(s.tasks), limit=s.limit, batch_size=s.eval_batch_size,
                      seq_len=s.eval_seq_len, progress=False, model_name=s.model, windows=s.windows)
    seconds = time.perf_counter() - tic
    write_json_atomic(cache, {"result": result, "seconds": seconds})
    return result, seconds


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _readable(result, tasks: dict) -> bool:
    """Whether a cached result holds what the table reads: every task asked for, with its perplexity or its
    accuracy as a number, and an average that is a number or absent."""
    if not isinstance(result, dict) or not isinstance(result.get("tasks"), dict):
        return False
    if result.get("average_acc") is not None and not _number(result["average_acc"]):
        return False
    for name in tasks:
        metrics = result["tasks"].get(name)
        keys = ("ppl",) if name in task_data.PPL_TASKS else (task_data.paper_metric(name), "acc")
        if not isinstance(metrics, dict) or not any(_number(metrics.get(k)) for k in keys):
            return False
    return True


def make_row(method: str, sparsity: float, result: dict, dense_average: float | None) -> dict:
    tasks, sparsities = {}, []
    for name, metrics in result.get("tasks", {}).items():
        tasks[name] = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if isinstance(metrics.get("sparsity"), dict):
            sparsities.append(metrics["sparsity"])
    if sparsities:  # mean over tasks of the evaluator's realised sparsity
        realised = {k: sum(float(sp.get(k, 0.0)) for sp in sparsities) / len(sparsities)
                    for k in ("param", "attention", "mlp")}
    else:
        realised = {"param": 0.0, "attention": 0.0, "mlp": 0.0}
    average = result.get("average_acc")
    retention = None
    if average is not None and dense_average:
        retention = 100.0 * float(average) / float(dense_average)
    return {"method": method, "target_sparsity": 0.0 if method == "dense" else sparsity, "sparsity": realised,
            "tasks": tasks, "average_acc": average, "retention": retention}


def run_comparison(s: CompareSettings, sparsities: list[float], log: Callable[[str], None] = print) -> list[dict]:
    """Build and evaluate every method at every sparsity; returns the table rows (dense first per sparsity)."""
    methods = check_methods(s.methods)
    check_targets(s, sparsities)
    _train_config(s, "router", 0.25, Path(s.workdir))  # bad training settings fail before the dense evaluation
    builder = Builder(s, log)
    rows: list[dict] = []
    # Retention needs the dense average whether or not dense is listed.
    model, tok, _ = builder.build("dense", 0.0)
    if any(m != "dense" for m in methods):  # past the context, training and Block Influence give wrong numbers
        check_context(model, s.seq_len, f"training sequences of {s.seq_len} tokens")
        if s.data != "self":  # text too short to train on fails here, not after the dense evaluation
            builder.data(model, tok)  # ('self' samples from a routed model: it is made with the first build)
    key = eval_key(s, builder.fingerprint)
    log("dense: evaluating")
    dense_result, seconds = evaluate_method(s, model, tok, artifact_dir(s, "dense", 0.0) / f"eval-{key}.json")
    dense_average = dense_result.get("average_acc")
    dense_row = make_row("dense", 0.0, dense_result, dense_average)
    dense_row["seconds"] = {"build": 0.0, "eval": round(seconds, 1)}
    for sparsity in sparsities:
        if "dense" in methods:
            rows.append(dict(dense_row))
        for method in methods:
            if method == "dense":
                continue
            log(f"{method} at {sparsity:.0%}: building")
            model, tok, built = builder.build(method, sparsity)
            log(f"{method} at {sparsity:.0%}: evaluating")
            cache = artifact_dir(s, method, sparsity) / f"eval-{key}.json"
            result, seconds = evaluate_method(s, model, tok, cache)
            row = make_row(method, sparsity, result, dense_average)
            row["seconds"] = {"build": round(built, 1), "eval": round(seconds, 1)}
            rows.append(row)
    return rows
