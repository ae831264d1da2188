"""`skipgpt analyze`: plot per-layer / per-position skip rates and a token x layer decision map

Run MODEL with the routers in --routers over the text in --text (argmax routing, consecutive windows of
--seq-len tokens) and write four PNG figures, each with the CSV it is drawn from, into --output:
per_layer_skip (attention vs MLP skip rate per layer), skip_vs_position (skip rate against token
position), decision_heatmap (executed/skipped per token and layer for the start of the text) and
module_sparsity (overall attention, MLP and parameter sparsity). Baselines saved by `skipgpt compare`
(MoD-D, coupled, static) work too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..artifact import load_routers, read_config
from ..errors import DataError
from ..evaluation.perplexity import default_seq_len
from ..evaluation.tasks import read_text
from ..io import check_output
from ..models.loading import load_model
from .common import (
    add_command,
    add_model_flags,
    add_output,
    add_routers,
    inputs,
    int_at_least,
    positive_int,
    user_path,
)


def add_parser(sub) -> argparse.ArgumentParser:
    p = add_command(sub, __doc__,
                    epilog="example: skipgpt analyze --model smollm2-135m --routers runs/rt25 --text book.txt "
                    "--output figs/")
    add_model_flags(p, dtype=False, note="must be the model the routers were trained on")
    add_routers(p, "router directory (skip_config.json + routers.safetensors), e.g. the --output of `skipgpt train`; "
                "a LoRA adapter inside it is loaded too", required=True)
    p.add_argument("--text", type=user_path, required=True,
                   help="UTF-8 text file to route (a few thousand tokens is plenty)")
    add_output(p, "directory for the PNG and CSV files (created if missing)", required=True)
    p.add_argument("--seq-len", type=int_at_least(2), help="tokens per window (default 256, or the model's maximum "
                   "context if shorter)")
    p.add_argument("--max-windows", type=positive_int, default=16, help="at most this many windows of the text "
                   "(default %(default)s)")
    p.add_argument("--heatmap-tokens", type=positive_int, default=48, help="tokens shown in the decision heatmap "
                   "(default %(default)s)")
    return p


def run(args: argparse.Namespace) -> int:
    check_output(args.output, folder=True, **inputs(text=args.text, routers=args.routers, model=args.model))
    read_config(args.routers)
    path = Path(args.text)
    if path.is_dir():
        raise DataError(f"text file {path} is a folder; give one text file")
    if not path.exists():
        raise DataError(f"text file {path} does not exist")
    if not path.is_file():  # /dev/null, a pipe: nothing to route, or a read that never ends
        raise DataError(f"text file {path} is not a regular file")
    text = read_text(path)
    from ..analysis.figures import write_analysis  # matplotlib: imported when a command draws, not at start-up

    model, tokenizer = load_model(args.model)
    routed = load_routers(model, args.routers)
    paths = write_analysis(routed, tokenizer, text, args.output, seq_len=default_seq_len(model, args.seq_len, 256),
                           max_windows=args.max_windows, heatmap_tokens=args.heatmap_tokens)
    for path in paths:
        print(path)
    return 0
