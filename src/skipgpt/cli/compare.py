"""`skipgpt compare`: evaluate SkipGPT against ShortGPT, module removal, random, MoD-D, coupled and joint
at equal sparsity

Build every method at the requested parameter sparsity (training the trained ones for --steps each,
deriving the static ones from Block Influence), evaluate each with the same tasks as `skipgpt eval`, and
print the paper-style table: method, realised sparsity, each task, average, retention % of dense,
perplexity. Writes the rows as JSON (--output) and markdown (same name, .md).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ..baselines.compare import CompareSettings, check_methods, run_comparison
from ..baselines.registry import DEFAULT_METHODS
from ..baselines.table import markdown_table
from ..errors import ConfigError
from ..io import check_output, write_text_atomic
from ..training import TrainConfig
from .common import (
    add_command,
    add_field_flag,
    add_model_flags,
    add_output,
    add_task_flags,
    checked,
    inputs,
    int_at_least,
    parse_sparsity,
    parse_tasks,
    positive_int,
    user_path,
    write_results,
)
from .eval import TASK_HELP

METHOD_HELP = """\
methods (--methods, comma-separated; default: all):
  dense            the unmodified model (always evaluated: retention is relative to it)
  skipgpt-rt       SkipGPT router tuning, base frozen (trained, --steps)
  skipgpt-rt-lora  skipgpt-rt, then LoRA with routers frozen (trained, --steps more; builds skipgpt-rt)
  skipgpt-informed router tuning with a rank-32 forecaster standing in for every skipped module
                   (forward-only fits before and after the same --steps, then 200 steps tuning the
                   forecasters alone; fit_tokens and tune_tokens in build.json)
  skipgpt-informed-lora  skipgpt-informed, then LoRA with routers and forecasters frozen
  shortgpt         whole layers with the lowest Block Influence removed (static)
  static-modules   attention/MLP modules with the lowest Block Influence removed (static)
  random           per-token random skipping at skipgpt-rt's per-module rates (uniform if skipgpt-rt
                   has not been built at this sparsity: list it after skipgpt-rt)
  mod-d            Mixture-of-Depths top-k routing per module (trained, --steps); evaluated with
                   causal per-module score thresholds, since top-k over a sequence sees the future
  coupled          one router per layer skips attention and MLP together (trained, --steps)
  skipgpt-joint    routers and LoRA trained together from step 0 (trained, --steps)
Static baselines are matched in parameters: modules are removed by Block Influence while that
brings the removed-parameter ratio closer to the target; the realised ratio is reported.
Artifacts go to --workdir/<method>-<pct>/ and are reused (with their evaluations) when they were built
with the same model, --dtype and values of the settings they read (trained methods: the training options;
static ones: --data, --seq-len, --calibration-sequences, and --seed with --data self; random routing: also
--seed and the same SkipGPT-RT build), and when the folder still holds what was built (a build trained or
edited into since, or damaged, is built again); otherwise rebuilt.

example:
  skipgpt compare --model smollm2-135m --sparsity 0.25,0.4 --data text/book.txt --steps 100 \\
      --task piqa=data/piqa --task wikitext2=data/wikitext2/wiki.test.raw --limit 200 --output cmp.json
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = add_command(sub, __doc__, epilog=METHOD_HELP + "\n" + TASK_HELP)
    add_model_flags(p, dtype_note="in training and evaluation alike; routers and LoRA train in fp32 either way. "
                    "bfloat16 is about 3.5x faster on recent CPUs and moves perplexity by a few percent")
    p.add_argument("--sparsity", type=checked(parse_sparsities), default="0.25", help="target parameter sparsity "
                   "as a fraction; several comma-separated give one table block each (default %(default)s)")
    add_task_flags(p)
    p.add_argument("--methods", default=None, help="comma-separated subset of the methods below (default: all)")
    p.add_argument("--steps", type=positive_int, default=CompareSettings.steps,
                   help="training steps of each trained method (default %(default)s)")
    # The training options --data to --distill are TrainConfig's (defaults included); only --data is read
    # differently here: for calibration too, and cached under --workdir.
    add_field_flag(p, TrainConfig, "data", help="training and calibration text: a .txt/.jsonl/.parquet file or "
                   "folder, a hub dataset, or 'self' (sampled from the dense model)")
    add_field_flag(p, TrainConfig, "seq_len", type=positive_int)
    add_field_flag(p, TrainConfig, "batch_size", type=positive_int)
    p.add_argument("--eval-batch-size", type=positive_int, default=CompareSettings.eval_batch_size,
                   help="evaluation batch (default %(default)s)")
    p.add_argument("--eval-seq-len", type=int_at_least(2), default=None, help="perplexity window in tokens "
                   "(default: the evaluator's, 2048 or the model's maximum)")
    p.add_argument("--calibration-sequences", type=positive_int, default=CompareSettings.calibration_sequences,
                   help="training sequences used for Block Influence and random-routing rates (default %(default)s)")
    for name in ("alpha", "lr", "distill"):
        add_field_flag(p, TrainConfig, name)
    add_field_flag(p, TrainConfig, "seed", note="a build made with another seed is rebuilt; run-to-run spread "
                   "comes from tables that differ only in it")
    p.add_argument("--workdir", type=user_path, default=None, help="where artifacts and cached evaluations go "
                   "(default: next to --output, named after it with _artifacts)")
    add_output(p, "results JSON (a list of rows); the table also goes to .md and a bar chart of retention and "
               "perplexity to .png", required=True)
    return p


def parse_sparsities(text: str) -> list[float]:
    """"0.25,0.4" -> [0.25, 0.4]; ConfigError for a part that is not a fraction in [0, 1), or one given twice
    (its rows would appear twice in the table)."""
    values = [parse_sparsity(part) for part in text.split(",")]
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise ConfigError(f"--sparsity lists {', '.join(f'{v:g}' for v in twice)} more than once")
    return values


def run(args: argparse.Namespace) -> int:
    tasks = parse_tasks(args.task)
    names = DEFAULT_METHODS if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    methods = check_methods(names)
    output = Path(args.output)
    if output.suffix in (".md", ".png"):  # the table and the chart are written beside the JSON under these
        raise ConfigError(f"--output {output}: give the JSON's name (e.g. {output.with_suffix('.json')}); the "
                          "table and the chart are written beside it as .md and .png")
    workdir = Path(args.workdir) if args.workdir else output.with_name(output.stem + "_artifacts")
    reads = inputs(*tasks.values(), args.data, model=args.model)
    check_output(output, **reads)
    for side in (output.with_suffix(".md"), output.with_suffix(".png")):  # same parent: only a folder is in the way
        if side.is_dir():
            raise ConfigError(f"--output {output}: {side} is a folder, and the table and the chart are written "
                              "beside the JSON under its name with .md and .png; choose another --output")
        check_output(side, **reads)  # (a task file named like the table, say)
    check_output(workdir, folder=True, flag="--workdir", **reads)
    if workdir.resolve() in {p.resolve() for p in (output, output.with_suffix(".md"), output.with_suffix(".png"))}:
        raise ConfigError(f"--workdir {workdir} is where the results are written (--output {output}, with .md and "
                          ".png beside it); choose another --workdir")
    read = {"tasks": tasks, "methods": methods, "workdir": workdir}  # every other setting is the flag of its name
    settings = CompareSettings(**read, **{f.name: getattr(args, f.name) for f in dataclasses.fields(CompareSettings)
                                          if f.name not in read})
    rows = run_comparison(settings, args.sparsity, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    table = markdown_table(rows)
    print(table)
    write_results(str(output), rows)
    write_text_atomic(output.with_suffix(".md"), table)
    written = [output, output.with_suffix(".md")]
    if any(r["method"] != "dense" for r in rows):
        from ..baselines.figure import comparison_figure  # matplotlib: only when there is a figure to draw

        written.append(comparison_figure(rows, output.with_suffix(".png"),
                                         f"{args.model}: every method at equal parameter sparsity"))
    else:  # a chart from an earlier run under this name would show methods these results do not have
        output.with_suffix(".png").unlink(missing_ok=True)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
