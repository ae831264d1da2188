"""`skipgpt eval`: zero-shot accuracy (lm-evaluation-harness) and perplexity, with realised sparsity

Evaluate a model, with or without routers, as the SkipGPT paper does: multiple-choice tasks through
lm-evaluation-harness's stock prompts and acc/acc_norm scoring on local data, and WikiText-2/PTB
perplexity over non-overlapping windows. Reports the realised sparsity of every task (pads excluded),
prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse

from ..artifact import check_adapter, read_config
from ..io import check_output
from ..models.routed import RoutedModel
from .common import (
    add_command,
    add_model_flags,
    add_no_progress,
    add_output,
    add_routers,
    add_task_flags,
    inputs,
    int_at_least,
    model_options,
    parse_tasks,
    positive_int,
    user_path,
    write_results,
)

TASK_HELP = """\
tasks (NAME=PATH, repeat --task for each):
  boolq         dev.jsonl (question, title, passage, answer true/false)
  piqa          valid.jsonl with valid-labels.lst next to it
  hellaswag     hellaswag_val.jsonl, or llama.cpp's 6-lines-per-item hellaswag_val_full.txt
  winogrande    dev.jsonl (sentence with _, option1, option2, answer 1/2)
  arc_easy      ARC-Easy-Test.jsonl (question.stem, question.choices, answerKey)
  arc_challenge ARC-Challenge-Test.jsonl
  openbookqa    test.jsonl (same shape as ARC)
  wikitext2     wiki.test.raw, wiki.test.tokens or test.txt (perplexity)
  ptb           ptb.test.txt (perplexity)
PATH may be that file, a folder holding it, or a file/folder in the Hugging Face datasets layout
(.parquet/.jsonl/.json with the hub dataset's columns). NAME alone uses the hub dataset (needs network).

example:
  skipgpt eval --model smollm2-135m --routers out/routers \\
      --task piqa=data/piqa --task wikitext2=data/wikitext2/wiki.test.raw --limit 200 --output r.json
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = add_command(sub, __doc__, epilog=TASK_HELP)
    add_model_flags(p, device="cpu")
    add_routers(p, "router directory from `skipgpt train`; omit for the dense model")
    p.add_argument("--lora", type=user_path, default=None, help="LoRA adapter folder (PEFT, safetensors), merged into "
                   "the base after the routers are attached")
    p.add_argument("--mode", choices=["masked", "sparse"], default="masked",
                   help="masked: every module runs and a skipped one's output is dropped (replaced by its "
                   "forecast with informed skipping; training semantics); "
                   "sparse: skipped tokens are not computed. Same decisions, same scores (default %(default)s)")
    add_task_flags(p)
    p.add_argument("--batch-size", type=positive_int, default=1,
                   help="scoring requests, one per (item, choice), or perplexity windows per forward pass "
                        "(default %(default)s)")
    p.add_argument("--seq-len", type=int_at_least(2), default=None,
                   help="perplexity window length in tokens (default 2048, or the model's maximum if smaller)")
    add_output(p, "write the results JSON here")
    add_no_progress(p)
    return p


def run(args: argparse.Namespace) -> int:
    tasks = parse_tasks(args.task)
    if args.output:
        check_output(args.output, **inputs(*tasks.values(), routers=args.routers, lora=args.lora, model=args.model))
    if args.routers:
        read_config(args.routers)
    if args.lora:
        check_adapter(args.lora)
    options = model_options(args)
    # lm-evaluation-harness takes seconds to import: only when a model is evaluated
    from ..evaluation.harness import prepare_model
    from ..evaluation.runner import evaluate, markdown_table

    model, tokenizer = prepare_model(args.model, args.routers, args.lora, args.mode, options["dtype"],
                                     options["device"])
    # the adapter applied: --lora's, or the one the router directory holds (load_routers merged it)
    applied = model.adapter if isinstance(model, RoutedModel) else args.lora
    results = evaluate(
        model, tokenizer, tasks, limit=args.limit, batch_size=args.batch_size, seq_len=args.seq_len,
        progress=not args.no_progress, model_name=args.model, routers=args.routers,
        lora=None if applied is None else str(applied),
        windows=args.windows,
    )
    print(markdown_table(results))
    for name, row in results["tasks"].items():
        if "by_context" in row:
            parts = [f"{b['context'][0]}-{b['context'][1] - 1}: {b['ppl']:.2f}" for b in row["by_context"]]
            print(f"{name} perplexity by context length (tokens): " + ", ".join(parts))
    if args.output:
        write_results(args.output, results)
        print(f"wrote {args.output}")
    return 0
