"""`skipgpt train`: tune routers to a target sparsity (stage 1), recover with LoRA (stage 2), or train both jointly

Train SkipGPT routers. Stage 1 (--stage router) freezes the model and tunes only the routers on LM (or
distillation) loss + alpha*|target - sparsity|, then calibrates the inference threshold on held-out text.
Stage 2 (--stage lora --routers DIR) trains LoRA under those frozen routers. Every option can also be set
in --config FILE.yaml (keys = option names with underscores); flags given on the command line win over
the file. The flags are TrainConfig's fields (skipgpt.training.config), help and choices included.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from accelerate import PartialState

from ..artifact import read_config
from ..config import SkipConfig
from ..errors import ConfigError
from ..io import check_output
from ..training import TrainConfig, train
from ..training.config import read_options
from ..training.trainer import ROUTER_DESIGN, SUMMARY_NAME, frozen_options
from .common import add_command, add_field_flag, inputs, user_path, write_results


def add_parser(sub) -> argparse.ArgumentParser:
    p = add_command(sub, __doc__, epilog=(
        "Examples:\n  skipgpt train --data self --target-sparsity 0.25 --steps 150 --output runs/rt25\n"
        "  skipgpt train --stage lora --routers runs/rt25 --data corpus.jsonl --steps 500 --output runs/rt25-lora\n"
        "Many GPUs (DDP; FSDP/DeepSpeed via an `accelerate config` file):\n"
        "  accelerate launch -m skipgpt train --model meta-llama/Llama-2-7b-hf --data corpus/ --seq-len 4096 ...\n"
        "  torchrun --nproc-per-node 8 -m skipgpt train ..."
    ))
    p.add_argument("--config", type=user_path, default=None, metavar="FILE.yaml", help="YAML or JSON file of options")
    for f in dataclasses.fields(TrainConfig):  # one flag per option; None = not given (the file or default wins)
        add_field_flag(p, TrainConfig, f.name, default=None)
    return p


def explicit_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line (a flag left out is None there)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
            if getattr(args, f.name, None) is not None}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    explicit = explicit_options(args)
    if args.config:
        return TrainConfig.load(args.config, overrides=explicit)
    return TrainConfig.from_dict(explicit, source="command line")


def given_options(args: argparse.Namespace) -> set[str]:
    """Names of the options the user set, as flags or in --config FILE (the others hold their defaults)."""
    names = set(explicit_options(args))
    if args.config:
        names |= {str(k).replace("-", "_") for k in read_options(args.config)}
    return names


def check_frozen_target(cfg: TrainConfig, given: set[str], routers: SkipConfig) -> None:
    """Routers loaded with --routers keep their design, and in stage lora their target and accounting (calibration,
    --threshold-gain and the summary use theirs): another value set by the user would be ignored without a word, so
    it is refused."""
    for name in frozen_options(cfg.stage):
        value, theirs = getattr(cfg, name), getattr(routers, name)
        if name in given and value != theirs:
            flag = "--" + name.replace("_", "-")
            instead = ("train new routers with it without --routers" if name in ROUTER_DESIGN
                       else "tune routers for it first with --stage router")
            raise ConfigError(f"the routers in {cfg.routers} keep their own {name} ({theirs!r}), not the "
                              f"{value!r} given: leave out {flag} (or give {theirs!r}), or {instead}")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    # before minutes of model loading; a run written inside a data folder would be read as data by the next
    check_output(cfg.output, folder=True, **inputs(cfg.data, routers=cfg.routers, model=cfg.model))
    if cfg.routers:
        skip = read_config(cfg.routers)
        check_frozen_target(cfg, given_options(args), skip)
    result = train(cfg)
    # Under torchrun every process gets here; one writer (or a rank could lose its temporary file to the clean-up
    # of another's save in the same folder), and one report.
    if not PartialState().is_main_process:
        return 0
    s = result.summary
    print(f"saved routers to {result.output_dir}" + (" (+ adapter/)" if cfg.trains_lora else ""))
    hs, accounting = s["held_out_sparsity"], s["accounting"]  # stage lora: the frozen routers', not the flag's
    print(f"held-out: {accounting} sparsity {hs[accounting]:.1%} (attention {hs['attention']:.1%}, "
          f"mlp {hs['mlp']:.1%}) at threshold {s['threshold']:+.3f}; perplexity {s['held_out_ppl']:.2f} "
          f"vs dense {s['held_out_dense_ppl']:.2f}; {s['tokens_per_s']:.0f} tokens/s")
    write_results(str(result.output_dir / SUMMARY_NAME), s)
    return 0
