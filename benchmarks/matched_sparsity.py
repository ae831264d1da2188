"""Perplexity at the target sparsity on the test text itself, and why a calibrated threshold can miss it.

    python benchmarks/matched_sparsity.py --routers runs/bench32/skipgpt-informed-40 \
        --test ../shared/data/wikitext2/wiki.test.raw --also ../shared/data/wikitext2/wiki.test.tokens

A router directory's threshold was calibrated on held-out sequences of its training text; on other text
the routers may skip more or less. This script scores the first --windows windows of --test (read and
windowed as `skipgpt eval` does) at the saved threshold, then recalibrates the threshold onto the run's own
target on --calibration-windows windows of --test that are never scored (those after the scored ones) and
scores again: the perplexity at the matched net sparsity. --also prints the realised sparsity of the saved
threshold on the same windows of another file (for WikiText-2: the `.tokens` release, the training text's
format), which separates a change of text format from a change of content.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from skipgpt import calibrate_threshold, load_model
from skipgpt.artifact import load_routers
from skipgpt.evaluation.perplexity import perplexity, tokenize_text
from skipgpt.evaluation.tasks import PPL_TASKS, load_perplexity_text


def windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def scored(routed, ids: torch.Tensor, args) -> tuple[float, object]:
    """(perplexity, sparsity report) over the first --windows windows of ids."""
    routed.reset_sparsity()
    with torch.no_grad():
        ppl = perplexity(routed, ids, args.seq_len, limit=args.windows)["ppl"]
    report = routed.sparsity()
    routed.reset_sparsity()
    return ppl, report


def row(name: str, threshold: float, ppl: float | None, report) -> str:
    cell = "" if ppl is None else f"{ppl:.2f}"
    return (f"| {name} | {threshold:+.3f} | {cell} | {report.param:.1%} | {report.attention:.1%} | "
            f"{report.mlp:.1%} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--routers", required=True, help="router directory (from `skipgpt train` or compare)")
    p.add_argument("--test", required=True, help="perplexity text, e.g. wiki.test.raw")
    p.add_argument("--task", default="wikitext2", choices=PPL_TASKS, help="how --test is read (as `skipgpt eval`)")
    p.add_argument("--also", help="another file whose sparsity at the saved threshold is printed")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--windows", type=int, default=40, help="scored windows (the first ones)")
    p.add_argument("--calibration-windows", type=int, default=4, help="unscored windows after them")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype=args.dtype)
    routed = load_routers(model, args.routers)
    ids = tokenize_text(tok, load_perplexity_text(args.task, args.test))
    held = windows(ids, args.seq_len)[args.windows : args.windows + args.calibration_windows]
    if len(held) < args.calibration_windows:
        raise SystemExit(f"{args.test} has too few windows of {args.seq_len} for {args.windows} scored and "
                         f"{args.calibration_windows} calibration windows")
    target, accounting = routed.config.target_sparsity, routed.config.accounting
    print(f"{args.routers}: target {target:.0%} {accounting} sparsity, scored: first {args.windows} windows of "
          f"{args.seq_len} of {Path(args.test).name}")
    print("| threshold | value | test PPL | param sparsity | attention | MLP |")
    print("|---|---|---|---|---|---|")
    saved = routed.threshold
    ppl, report = scored(routed, ids, args)
    print(row("saved (calibrated on the training text)", saved, ppl, report), flush=True)
    if args.also:
        other = tokenize_text(tok, load_perplexity_text(args.task, args.also))
        _, report = scored(routed, other, args)
        print(row(f"saved, on {Path(args.also).name}", saved, None, report), flush=True)
    batches = [{"input_ids": w[None]} for w in held]
    matched = calibrate_threshold(routed, batches, target, accounting)
    ppl, report = scored(routed, ids, args)
    print(row(f"recalibrated on {len(held)} unscored windows", matched, ppl, report))


if __name__ == "__main__":
    main()
