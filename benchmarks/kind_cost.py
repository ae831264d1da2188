"""What each module kind's skipping costs the zero-shot tasks: a router directory's decisions for attention only,
for MLPs only, or with the attention skip rate set apart from the MLPs'.

    python benchmarks/kind_cost.py --routers runs/seed2/skipgpt-informed-25 --route attn \
        --task piqa=../shared/data/piqa --task hellaswag=../shared/data/hellaswag --limit 500

--route attn (or mlp) keeps the routers' decisions for that kind at the saved threshold and executes every module
of the other kind. --attention-rate R routes both, with one threshold per kind: the attention threshold skips a
fraction R of attention modules and the MLP threshold then brings the parameter sparsity back to the directory's
target, both calibrated on --calibration-windows windows of 512 tokens of --calibration text. Tasks are scored as
`skipgpt eval` scores them (masked mode) and every row reports the sparsity realised on the task itself.
"""

from __future__ import annotations

import argparse

import torch

from skipgpt import load_model
from skipgpt.artifact import load_routers
from skipgpt.evaluation.perplexity import tokenize_text
from skipgpt.evaluation.runner import evaluate
from skipgpt.evaluation.tasks import load_perplexity_text
from skipgpt.routing.calibrate import measure
from skipgpt.routing.policies import KINDS

SEQ = 512


def bisect(routed, thresholds: dict[str, float], kind: str, batches, value, goal: float) -> float:
    """Set thresholds[kind] so that value(report) on `batches` is closest to goal (a higher threshold skips less)."""
    lo, hi = -30.0, 30.0
    best = (float("inf"), thresholds[kind])
    for _ in range(14):
        thresholds[kind] = (lo + hi) / 2
        with routed.using(track=True):
            measure(routed, batches)
            got = value(routed.sparsity())
        best = min(best, (abs(got - goal), thresholds[kind]))
        lo, hi = (thresholds[kind], hi) if got > goal else (lo, thresholds[kind])
    thresholds[kind] = best[1]
    return best[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--routers", required=True, help="router directory (from `skipgpt train` or compare)")
    p.add_argument("--task", action="append", required=True, metavar="NAME=PATH", help="as `skipgpt eval --task`")
    p.add_argument("--limit", type=int, default=500, help="first N items of each task")
    p.add_argument("--route", choices=KINDS, help="route this kind only; every module of the other kind executes")
    p.add_argument("--attention-rate", type=float, help="route both at this attention skip rate (see above)")
    p.add_argument("--calibration", default="../shared/data/wikitext2/wiki.valid.tokens",
                   help="text for --attention-rate's thresholds (WikiText-2 format)")
    p.add_argument("--calibration-windows", type=int, default=8, help="the last N windows of 512 of that text")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if (args.route is None) == (args.attention_rate is None):
        p.error("give one of --route KIND or --attention-rate R")
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype=args.dtype)
    routed = load_routers(model, args.routers)
    saved = routed.threshold
    # a kind that is not routed gets an infinite threshold: every margin is below it, so every module executes
    thresholds = {kind: saved if args.route in (None, kind) else float("inf") for kind in KINDS}

    def policy(layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        return routed.routers.get(layer, kind).executes(x, thresholds[kind])

    policy.router_share = 1.0  # both kinds' routers run, the unrouted kind's deciding nothing: net sparsity pays
    routed.force(policy)
    if args.attention_rate is not None:
        ids = tokenize_text(tok, load_perplexity_text("wikitext2", args.calibration))
        held = ids[: ids.numel() // SEQ * SEQ].view(-1, SEQ)[-args.calibration_windows:]
        batches = [{"input_ids": w[None]} for w in held]
        bisect(routed, thresholds, "attn", batches, lambda r: r.attention, args.attention_rate)
        bisect(routed, thresholds, "mlp", batches, lambda r: r.param, routed.config.target_sparsity)
    tasks = dict(t.split("=", 1) if "=" in t else (t, None) for t in args.task)
    result = evaluate(routed, tok, tasks, limit=args.limit, batch_size=args.batch_size, progress=False)
    shown = {k: f"{v:+.3f}" for k, v in thresholds.items()}
    print(f"{args.routers}: thresholds {shown} (saved {saved:+.3f})")
    print("| task | score | param sparsity | attention | MLP |")
    print("|---|---|---|---|---|")
    for name, row in result["tasks"].items():
        s = row["sparsity"]
        score = row.get(row.get("metric", ""), row.get("ppl"))
        print(f"| {name} | {score:.3f} | {s['param']:.1%} | {s['attention']:.1%} | {s['mlp']:.1%} |")
    if result["average_acc"] is not None:
        print(f"average accuracy {result['average_acc']:.3f}")


if __name__ == "__main__":
    main()
