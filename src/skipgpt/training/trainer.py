"""The training loop for all three stages.

- router: the base is frozen (requires_grad off, so no weight gradient is computed or stored); only
  routers train, under straight-through hard Gumbel with a linearly annealed temperature, on
  LM (or distillation) loss + alpha * |target - realised sparsity|. With informed skipping the
  forecasters are fitted in closed form before (unless they come fitted, with --routers) and after,
  then tuned alone on the same loss with the routers frozen (forecast.py: fit_dense, fit_and_tune).
- lora:   routers frozen at their calibrated argmax decisions, LoRA trains on the LM/KD loss
  (optionally with the threshold steered back to the target after every step: threshold_gain).
- joint:  routers and LoRA from step 0 (the paper's unstable ablation).

Scaling out needs no code here: Accelerator handles device placement and DDP, so the same script
runs as `accelerate launch -m skipgpt train ...` (or `torchrun --nproc-per-node 8 -m skipgpt train ...`);
FSDP or DeepSpeed come from an `accelerate config` file. Each process draws its own micro-batches and
its own Gumbel noise, so N processes train exactly as one process accumulating N micro-batches.

The maths of one step is in step.py; this module runs the stages and writes the run folder.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..artifact import CONFIG_NAME, FORECASTERS_NAME, WEIGHTS_NAME, load_routers, read_config, save_routers
from ..config import SkipConfig
from ..errors import ConfigError
from ..evaluation.perplexity import check_context
from ..io import expand_user, write_text_atomic
from ..models.loading import load_model
from ..models.routed import RoutedModel
from ..routing.calibrate import calibrate_threshold
from .checkpoint import (
    CHECKPOINT_NAME,
    check_fresh_start,
    check_resume_base,
    check_resume_config,
    load_checkpoint,
    routers_digest,
    save_checkpoint,
)
from .config import TrainConfig
from .data import PackedData, data_files, load_data, micro_batches
from .forecast import FIT_SEQUENCES, fit_and_tune, fit_dense, fit_forecasters, trains_forecasters, tune_forecasters
from .lora import attach_lora, check_lora_targets, lora_parameters
from .step import (
    TrainingError,
    anneal,
    chunked,
    held_out_nll,
    learning_rate,
    micro_seed,
    ranks_mean,
    steer_threshold,
    step_batches,
    step_gradients,
)

# Callers (benchmarks, the demo, compare, docs/RESULTS.md) import the step maths and FIT_SEQUENCES from here.
__all__ = ["FIT_SEQUENCES", "LOG_FIELDS", "LOG_NAME", "TrainResult", "TrainingError", "anneal", "build_routed",
           "fit_forecasters", "held_out_nll", "learning_rate", "micro_batches", "micro_seed", "steer_threshold",
           "step_gradients", "train", "tune_forecasters"]

LOG_NAME = "train_log.csv"
RECORD_NAME = "train_config.yaml"  # the run's options, read back by --config
SUMMARY_NAME = "train_summary.json"  # written by the command line
CACHE_DIR = "cache"  # sampled text (--data self)
LOG_FIELDS = ("step", "loss", "lm_loss", "kd_loss", "reg", "sparsity", "attention", "mlp", "temperature", "noise",
              "lr", "threshold", "tokens_per_s")
# Baselines whose saved policy (routing/policies.py, from_extra) decides every token without asking the routers,
# so a loss under it has no gradient for them. MoD-D and coupled routing score tokens with the routers: they train.
FIXED_POLICIES = ("shortgpt", "static-modules", "random")
REPORTER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}  # what accelerate looks for
# TrainConfig's design of new routers: routers loaded with --routers keep their own.
ROUTER_DESIGN = ("router", "router_input", "forecaster_rank", "execute_bias")


@dataclass
class TrainResult:
    routed: Any
    output_dir: Path
    history: list[dict[str, float]]
    summary: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None


def build_routed(cfg: TrainConfig):
    """(routed, tokenizer) for cfg: the model, with routers loaded from cfg.routers or freshly initialised.

    A stage-2 adapter next to those routers is not loaded: this stage trains its own."""
    if cfg.stage == "lora" and not cfg.routers:
        raise ConfigError("stage 'lora' trains LoRA under frozen routers: pass the stage-1 router directory "
                          "with --routers DIR")
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype)
    if cfg.routers:
        routed = load_routers(model, cfg.routers, lora="none")
    else:
        routed = RoutedModel(model, cfg.skip_config(), name=cfg.model)
    # before the data is read or sampled: past the context the routers would learn on positions never seen
    check_context(routed.model, cfg.seq_len, f"training sequences of {cfg.seq_len} tokens")
    return routed, tokenizer


def frozen_options(stage: str) -> tuple[str, ...]:
    """The TrainConfig fields that routers loaded with --routers keep: their design, and in stage lora (routers
    frozen) their target and accounting too."""
    return ROUTER_DESIGN + (("target_sparsity", "accounting") if stage == "lora" else ())


def check_trains_routers(cfg: TrainConfig, routers: SkipConfig, source: str) -> None:
    """Refuse a stage that trains routers when `routers` is a baseline whose fixed policy never asks them (before:
    a RuntimeError from backward after loading the model and data). LoRA may train under such a policy."""
    variant = routers.extra.get("routing")
    if cfg.trains_routers and variant in FIXED_POLICIES:
        raise ConfigError(f"{source} is a {variant!r} baseline, whose fixed policy never asks its routers: stage "
                          f"{cfg.stage} cannot train them; use --stage lora to train LoRA under that policy, or "
                          f"start from SkipGPT routers")


def _setup_parameters(routed, cfg: TrainConfig) -> list[dict]:
    routed.freeze_base()
    for p in routed.routers.parameters():
        p.requires_grad_(cfg.trains_routers)
    if routed.forecasters is not None:  # fitted in closed form; training them with the routers measured worse
        routed.forecasters.requires_grad_(False)
    groups = []
    if cfg.trains_routers:
        groups.append({"params": list(routed.routers.parameters()), "lr": cfg.lr, "base_lr": cfg.lr})
    if cfg.trains_lora:
        if not hasattr(routed.model, "peft_config"):
            attach_lora(routed, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        lora = lora_parameters(routed)
        for p in lora:  # an adapter the caller attached was frozen with the base above; this stage trains it
            p.requires_grad_(True)
        groups.append({"params": lora, "lr": cfg.lora_lr, "base_lr": cfg.lora_lr})
    routed.routers.train(cfg.trains_routers)
    routed.model.train(cfg.trains_lora)  # LoRA dropout on; router tuning keeps the base deterministic
    return groups


def _has_accelerator() -> bool:
    probe = getattr(torch, "accelerator", None)
    return bool(probe.is_available()) if probe is not None else torch.cuda.is_available()


def _write_log(path: Path, history: list[dict[str, float]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(path, buf.getvalue())


def train(cfg: TrainConfig, routed=None, tokenizer=None, data: PackedData | None = None) -> TrainResult:
    """Run one stage as `cfg` says. Pass `routed` to train routers (or LoRA) of a model you built,
    e.g. under a custom gating policy; `data` skips loading text (then no tokenizer is needed)."""
    output = expand_user(cfg.output)
    ckpt = output / CHECKPOINT_NAME
    # Bad input fails here, before minutes of model loading and before anything is written to `output`.
    _check_run_files(output, cfg.data == "self" and data is None)
    if cfg.report_to != "none" and not any(importlib.util.find_spec(m) for m in REPORTER_MODULES[cfg.report_to]):
        # accelerate would drop the tracker with a warning lost among others, and log nothing
        raise ConfigError(f"--report-to {cfg.report_to} needs the {cfg.report_to} package, which is not installed")
    if cfg.routers and output.exists() and output.resolve() == expand_user(cfg.routers).resolve():
        raise ConfigError(f"output {cfg.output} is the routers folder this stage starts from; saving there would "
                          "replace them: give another output folder")
    if cfg.routers:
        frozen = read_config(cfg.routers)
        check_trains_routers(cfg, frozen, cfg.routers)
        # Loaded routers keep their design, and in stage lora their target and accounting; the run's record
        # (train_config.yaml, the checkpoint) says so, so a rerun from that file asks for what this run did.
        cfg = replace(cfg, **{name: getattr(frozen, name) for name in frozen_options(cfg.stage)})
    if routed is not None:  # a model the caller built keeps its design just the same, and the record says so
        cfg = replace(cfg, **{name: getattr(routed.config, name) for name in frozen_options(cfg.stage)})
    launched = int(os.environ.get("WORLD_SIZE", "1"))  # the process count, before accelerate starts
    if cfg.resume and ckpt.exists():
        check_resume_config(ckpt, cfg.to_dict(), world=launched)
    elif ckpt.exists():
        check_fresh_start(ckpt)
    routers_sha = routers_digest(cfg.routers) if cfg.routers else None  # what was loaded, for --resume to compare
    if data is None and cfg.data != "self":
        data_files(cfg.data)
    if routed is None:
        routed, tokenizer = build_routed(cfg)  # with its check of the sequence length
    else:  # a model the caller built: a baseline made in Python, say
        if data is None and tokenizer is None:
            raise ConfigError("train(cfg, routed=...) needs a tokenizer or pre-packed `data`")
        check_context(routed.model, cfg.seq_len, f"training sequences of {cfg.seq_len} tokens")
        check_trains_routers(cfg, routed.config, cfg.routers or "the routed model")
    if cfg.resume and ckpt.exists():  # the model option may name the same folder or hub name with other weights
        check_resume_base(ckpt, routed.config.base.fingerprint)
    if cfg.trains_lora and not hasattr(routed.model, "peft_config"):
        check_lora_targets(routed.model, cfg.lora_targets, cfg.lora_r)
    # Under torchrun on a machine without an accelerator, Accelerator() runs every process alone unless told
    # to use the CPU (then it joins them over gloo): each would train on its own shard and write its own result.
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=launched > 1 and not _has_accelerator(),
                              log_with=None if cfg.report_to == "none" else cfg.report_to, project_dir=str(output))
    if launched > 1 and accelerator.num_processes == 1:
        raise ConfigError(f"launched as {launched} processes but accelerate formed a group of "
                          f"{accelerator.num_processes}; check the launcher and `accelerate config`")
    main = accelerator.is_main_process
    routed.to(accelerator.device)
    torch.manual_seed(cfg.seed)
    if data is None:
        data = load_data(cfg, routed, tokenizer, output / CACHE_DIR)
    if cfg.trains_routers:
        routed.config.target_sparsity = cfg.target_sparsity
        routed.config.accounting = cfg.accounting
    # else (stage lora): the frozen routers keep the target and accounting they were tuned for
    if trains_forecasters(routed, cfg) and not any(p.any() for p in routed.forecasters.parameters()):
        # Unfitted forecasters start from a dense fit; fitted ones (loaded with --routers) stay what the routers
        # were trained and calibrated with, rather than go back to a fit the routers never saw.
        fit_dense(routed, data, cfg, accelerator.device)
    groups = _setup_parameters(routed, cfg)
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    wrapped, optimizer = accelerator.prepare(routed, optimizer)
    torch_optimizer = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper: the checkpointed state
    schedule, warmup = cfg.effective_schedule()
    world, rank = accelerator.num_processes, accelerator.process_index

    start, history, before = 0, [], (0.0, 0)  # seconds and tokens of the steps done before a resume
    torch.manual_seed(cfg.seed)
    if cfg.resume and ckpt.exists():
        meta = load_checkpoint(ckpt, routed, torch_optimizer)
        start, history = int(meta["step"]), list(meta.get("history", []))
        before = (float(meta.get("train_seconds", 0.0)), int(meta.get("tokens", 0)))
        if "threshold" in meta:  # steered during stage 2 (threshold_gain)
            routed.threshold = float(meta["threshold"])
        if main:
            print(f"resuming from {ckpt} at step {start}/{cfg.steps}")
    if cfg.report_to != "none":
        accelerator.init_trackers("skipgpt", config={k: str(v) for k, v in cfg.to_dict().items()})
    # This run's record (train_config.yaml, the log started afresh) replaces a folder's earlier one once a step has
    # succeeded: a run that fails at its first step (a NaN loss) leaves the earlier run's folder as it was.
    recorded = False

    def record() -> None:
        nonlocal recorded
        if main and not recorded:
            output.mkdir(parents=True, exist_ok=True)
            write_text_atomic(output / RECORD_NAME, cfg.to_yaml())
            _write_log(output / LOG_NAME, history)
        recorded = True

    ours = cfg.resume and ckpt.exists()  # the checkpoint on disk is this run's (resumed from, or saved below)
    bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and main), desc=f"train {cfg.stage}",
               dynamic_ncols=True)
    t_start, tokens_seen = time.perf_counter() - before[0], before[1]  # the summary covers the whole run
    for step in range(start, cfg.steps):
        tic = time.perf_counter()
        routed.temperature = anneal(step, cfg.steps, cfg.temperature_start, cfg.temperature_end)
        routed.noise = anneal(step, cfg.steps, cfg.noise_start, cfg.noise_end)
        for g in optimizer.param_groups:
            g["lr"] = learning_rate(step, cfg.steps, g["base_lr"], schedule, warmup)
        batches = step_batches(data.train, step, cfg, accelerator)
        optimizer.zero_grad(set_to_none=True)
        seeds = [micro_seed(cfg.seed, step, m * world + rank) for m in range(cfg.grad_accum)]
        stats = step_gradients(routed, batches, cfg, forward=wrapped, backward=accelerator.backward,
                               no_sync=lambda: accelerator.no_sync(wrapped), seeds=seeds)
        stats = ranks_mean(stats, accelerator)  # the log and summary show the whole step, not rank 0's shard
        if not math.isfinite(stats["loss"]):
            bar.close()
            kept = f"the last good checkpoint is {ckpt}" if ours else "no checkpoint of this run was written"
            raise TrainingError(f"loss became NaN/inf at step {step + 1}; stopped ({kept}). Lower --lr or "
                                f"--alpha, or check the data and --dtype")
        record()
        optimizer.step()
        if cfg.threshold_gain and routed.policy is None:
            steer_threshold(routed, cfg.threshold_gain,
                            reduce=lambda t: accelerator.reduce(t.to(accelerator.device), "mean").cpu())
        tokens = sum(b["input_ids"].numel() for b in batches) * world
        tokens_seen += tokens
        row = {"step": step + 1, **stats, "temperature": routed.temperature, "noise": routed.noise,
               "lr": optimizer.param_groups[0]["lr"], "threshold": routed.threshold,
               "tokens_per_s": tokens / max(time.perf_counter() - tic, 1e-9)}
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", lm=f"{row['lm_loss']:.3f}", attn=f"{row['attention']:.1%}",
                        mlp=f"{row['mlp']:.1%}", temp=f"{row['temperature']:.2f}", tok_s=f"{row['tokens_per_s']:.0f}")
        bar.update(1)
        if main:
            with open(output / LOG_NAME, "a", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, fieldnames=LOG_FIELDS, extrasaction="ignore").writerow(row)
            if cfg.report_to != "none":
                accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step + 1)
        done = step + 1
        if cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            accelerator.wait_for_everyone()
            if main:
                save_checkpoint(ckpt, routed, torch_optimizer, done,
                                {"history": history, "config": cfg.to_dict(), "threshold": routed.threshold,
                                 "data_sha256": data.digest, "train_seconds": time.perf_counter() - t_start,
                                 "tokens": tokens_seen, "world": world, "routers_sha256": routers_sha,
                                 "base_fingerprint": routed.config.base.fingerprint})
            ours = True
    bar.close()
    record()  # a resumed run with no steps left
    elapsed = time.perf_counter() - t_start
    summary = _finish(routed, cfg, data, history, elapsed, tokens_seen, accelerator)
    if main:
        save_routers(routed, output)  # with the adapter in output/adapter when LoRA trained
        _write_log(output / LOG_NAME, history)
    if cfg.report_to != "none":
        accelerator.end_training()
    return TrainResult(routed, output, history, summary, tokenizer)


def _check_run_files(output: Path, samples: bool) -> None:
    """Refuse, before the model loads, a run folder where something is in the way of a file the run writes (or of
    the folder that caches sampled text): it would fail after the model loaded and the first steps ran."""
    for name in (RECORD_NAME, LOG_NAME, CHECKPOINT_NAME, SUMMARY_NAME, CONFIG_NAME, WEIGHTS_NAME, FORECASTERS_NAME):
        if (output / name).is_dir():
            raise ConfigError(f"output {output} cannot hold the run: {output / name} is a folder")
    cache = output / CACHE_DIR
    if samples and cache.exists() and not cache.is_dir():
        raise ConfigError(f"output {output} cannot hold the sampled text: {cache} is a file")


def _finish(routed, cfg: TrainConfig, data: PackedData, history: list, elapsed: float, tokens: int,
            accelerator: Accelerator) -> dict:
    """Calibrate the argmax threshold on held-out text (after the forecaster phase, if the run has one), measure
    it, and record it in routed.config.extra."""
    val = chunked(data.val, cfg.batch_size, next(routed.model.parameters()).device)
    routed.routers.eval()  # argmax decisions and no LoRA dropout from here on, also in the model train() returns
    routed.model.eval()
    calibrated = fit_and_tune(routed, data, cfg, val, accelerator) if trains_forecasters(routed, cfg) else False
    if cfg.calibrate and routed.policy is None and not calibrated:
        # Recalibrate onto the routers' own target: LoRA shifts the hidden states the routers read.
        calibrate_threshold(routed, val, routed.config.target_sparsity, routed.config.accounting)
    routed.reset_sparsity()
    nll = held_out_nll(routed, data.val, cfg.batch_size)
    report = routed.sparsity()
    dense_nll = held_out_nll(routed, data.val, cfg.batch_size, dense=True)
    routed.reset_sparsity()
    summary = {
        "stage": cfg.stage, "steps": cfg.steps, "target_sparsity": routed.config.target_sparsity,
        "accounting": routed.config.accounting, "threshold": routed.threshold,
        "held_out_sparsity": {"param": report.param, "module": report.module, "flop": report.flop,
                              "attention": report.attention, "mlp": report.mlp},
        "held_out_ppl": math.exp(nll), "held_out_dense_ppl": math.exp(dense_nll),
        "held_out_tokens": int(data.val.numel()), "train_seconds": elapsed,
        "tokens_per_s": tokens / max(elapsed, 1e-9), "final_loss": history[-1]["loss"] if history else None,
        "data": data.source, "distill": cfg.distill, "alpha": cfg.alpha, "seq_len": cfg.seq_len,
        "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
    }
    if routed.forecasters is not None and cfg.trains_routers:
        summary["forecaster_steps"] = cfg.forecaster_steps
    routed.config.extra = {**routed.config.extra, f"train_{cfg.stage}": summary}
    return summary
