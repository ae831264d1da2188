"""`skipgpt analyze`: figures of what trained routers do, and the CSV behind each figure."""

from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "analyze",
        help="plot per-layer / per-position skip rates and a token x layer decision map",
        description="Run MODEL with the routers in --routers over the text in --text (argmax routing, "
        "consecutive windows of --seq-len tokens) and write four PNG figures, each with the CSV it is "
        "drawn from, into --output: per_layer_skip (attention vs MLP skip rate per layer), "
        "skip_vs_position (skip rate against token position), decision_heatmap (executed/skipped "
        "per token and layer for the start of the text) and module_sparsity (overall attention, MLP "
        "and parameter sparsity). Baselines saved by `skipgpt compare` (MoD-D, coupled, static) work too.",
        epilog="example: skipgpt analyze --model smollm2-135m --routers runs/rt25 --text book.txt --output figs/",
    )
    p.add_argument("--model", default="smollm2-135m", help="hub name, HF folder, .gguf file or alias "
                   "(default %(default)s); must be the model the routers were trained on")
    p.add_argument("--routers", required=True, help="router directory (skip_config.json + routers.safetensors), "
                   "e.g. the --output of `skipgpt train`; a LoRA adapter inside it is loaded too")
    p.add_argument("--text", required=True, help="UTF-8 text file to route (a few thousand tokens is plenty)")
    p.add_argument("--output", required=True, help="directory for the PNG and CSV files (created if missing)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default %(default)s)")
    p.add_argument("--max-windows", type=int, default=16, help="at most this many windows of the text "
                   "(default %(default)s)")
    p.add_argument("--heatmap-tokens", type=int, default=48, help="tokens shown in the decision heatmap "
                   "(default %(default)s)")
    return p


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..baselines.registry import attach_policy
    from ..errors import ConfigError, DataError
    from ..evaluation.tasks import read_text
    from ..models.loading import load_model
    from ..training.lora import load_trained

    if args.seq_len < 2 or args.max_windows < 1 or args.heatmap_tokens < 1:
        raise ConfigError("--seq-len must be >= 2, --max-windows and --heatmap-tokens >= 1")
    path = Path(args.text)
    if not path.is_file():
        raise DataError(f"text file {path} does not exist")
    text = read_text(path)
    from ..analysis.figures import write_analysis

    model, tokenizer = load_model(args.model)
    routed = attach_policy(load_trained(model, args.routers), args.routers)
    paths = write_analysis(routed, tokenizer, text, args.output, seq_len=args.seq_len,
                           max_windows=args.max_windows, heatmap_tokens=args.heatmap_tokens)
    for path in paths:
        print(path)
    return 0
