"""Where routed skipping loses on the tasks' own text, by token position, beside ShortGPT; and whether the first
tokens of a sequence (the attention sink every later token reads) should always execute.

    D=../shared/data
    python benchmarks/positions.py --routers runs/bench30/skipgpt-informed-25 --skip 500 --execute-first 1 \
        --snippets $D/wikitext2/wiki.test.raw \
        --task piqa=$D/piqa --task hellaswag=$D/hellaswag --task arc_easy=$D/arc_easy

Part 1: the extra NLL per token over dense, by position, on --items items of each task after the first --skip,
each item's context and right answer as one text (task_text.py), scored one item at a time: for the routers as
saved and for ShortGPT at the routers' target (Block Influence on the last 8 windows of 512 of --calibration);
with --snippets FILE, also on as many pieces of 80 tokens of that WikiText-2 text, each scored from a fresh start.
Part 2, with --execute-first N: the tasks scored (--limit items after the first --skip, masked mode) with the
routers as saved and with the first N tokens of every sequence executing every module, each with the sparsity
realised on the task. --skip 500 keeps to items docs/RESULTS.md's headline does not score (there --limit 500).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
import torch.nn.functional as F
from task_text import item_text

from skipgpt import load_model
from skipgpt.artifact import load_routers
from skipgpt.baselines.static import shortgpt
from skipgpt.evaluation.harness import SkipGPTLM, build_task, quiet_bars, run_task
from skipgpt.evaluation.perplexity import tokenize_text
from skipgpt.evaluation.tasks import load_perplexity_text, load_task, paper_metric
from skipgpt.models.routed import RoutedModel
from skipgpt.routing.policies import KIND_INDEX

SEQ = 512
SNIPPET = 80  # tokens per piece of --snippets text: about an item's length
EDGES = (1, 4, 8, 16, 32, 64)  # position buckets: [1, 4), [4, 8), ..., [64, end)


@torch.no_grad()
def nll_by_position(model, items: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean NLL of the tokens at each position bucket (a token's position: how many tokens precede it), and the
    number of tokens in each."""
    sums, counts = torch.zeros(len(EDGES)), torch.zeros(len(EDGES))
    for ids in items:
        nll = F.cross_entropy(model(ids).logits[0, :-1].float(), ids[0, 1:], reduction="none")
        bucket = torch.bucketize(torch.arange(1, ids.shape[1]), torch.tensor(EDGES), right=True) - 1
        sums.index_add_(0, bucket, nll)
        counts.index_add_(0, bucket, torch.ones_like(nll))
    return sums / counts.clamp_min(1), counts


def first_tokens_execute(routed: RoutedModel, n: int) -> None:
    """Route by the saved routers, except that the first n positions of every sequence execute every module."""
    folds = routed.routers.folds(routed.threshold)

    def policy(layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        g = folds[layer][KIND_INDEX[kind]].executes(x)
        context = routed.state.context  # keys each token sees: its position + 1, padding accounted for
        first = context <= n if context is not None else torch.arange(x.shape[1], device=x.device)[None] < n
        return g | first.to(g.device)

    policy.router_share = 1.0  # the routers still decide every token
    routed.force(policy)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--routers", required=True, help="router directory (from `skipgpt train` or compare); an adapter "
                   "in it is not applied, so that dense, the routers and ShortGPT share the base weights")
    p.add_argument("--task", action="append", required=True, metavar="NAME=PATH", help="as `skipgpt eval --task`")
    p.add_argument("--skip", type=int, default=500, help="leave out each task's first N items")
    p.add_argument("--items", type=int, default=200, help="items per task whose text part 1 scores")
    p.add_argument("--limit", type=int, default=500, help="items per task part 2 scores")
    p.add_argument("--execute-first", type=int, default=0, help="part 2: the first N tokens always execute (0: none)")
    p.add_argument("--calibration", default="../shared/data/wikitext2/wiki.valid.tokens",
                   help="text for ShortGPT's Block Influence (WikiText-2 format)")
    p.add_argument("--snippets", help="also score pieces of 80 tokens of this WikiText-2 file (wiki.test.raw)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype=args.dtype)
    tasks = {name: load_task(name, path) for name, path in (t.split("=", 1) for t in args.task)}
    texts = [item_text(name, d) for name, data in tasks.items() for d in data.docs[args.skip : args.skip + args.items]]
    groups = {"task text": [tok(t, return_tensors="pt").input_ids for t in texts]}
    if args.snippets:
        # as many pieces of the running text as there are items, each SNIPPET tokens from a fresh start
        ids = tokenize_text(tok, load_perplexity_text("wikitext2", args.snippets))
        stride = max(SNIPPET, (ids.numel() - SNIPPET) // len(texts))
        groups["WikiText snippets"] = [ids[i : i + SNIPPET][None] for i in range(0, stride * len(texts), stride)]

    dense, counts = {}, {}
    for group, items in groups.items():
        dense[group], counts[group] = nll_by_position(model, items)
    routed = load_routers(model, args.routers, lora="none")
    rows, skipped = {}, {}
    with routed.using(mode="masked"):
        for group, items in groups.items():
            with routed.measuring():
                rows[group, "routers"] = nll_by_position(routed.model, items)[0] - dense[group]
                skipped[group] = routed.sparsity().param
    routed.unpatch()  # the layers take ShortGPT's routing for a while
    ids = tokenize_text(tok, load_perplexity_text("wikitext2", args.calibration))
    windows = [{"input_ids": w[None]} for w in ids[: ids.numel() // SEQ * SEQ].view(-1, SEQ)[-8:]]
    static = shortgpt(RoutedModel(model), tok, routed.config.target_sparsity, windows)
    for group, items in groups.items():
        rows[group, "ShortGPT"] = nll_by_position(static.model, items)[0] - dense[group]
    static.unpatch()
    routed.patch()
    heads = [f"{a}-{b - 1}" for a, b in zip(EDGES, EDGES[1:])] + [f"{EDGES[-1]}+"]
    print(f"extra NLL per token over dense by position ({args.routers}; ShortGPT at "
          f"{static.config.extra['realised_param_sparsity']:.1%}); {len(texts)} items' text:")
    print("| text | | " + " | ".join(heads) + " |\n|---|---|" + "---|" * len(heads))
    for group in groups:
        print(f"| {group} | tokens | " + " | ".join(f"{int(c)}" for c in counts[group]) + " |")
        print(f"| {group} | dense NLL | " + " | ".join(f"{v:.2f}" for v in dense[group]) + " |")
        for who in ("routers", "ShortGPT"):
            print(f"| {group} | {who} | " + " | ".join(f"{v:+.2f}" for v in rows[group, who]) + " |")
        print(f"| {group} | routers skip | {skipped[group]:.1%} of parameters |" + " |" * (len(heads) - 1))
    if not args.execute_first:
        return

    lm = SkipGPTLM(routed, tokenizer=tok, batch_size=8)
    scored = {name: replace(data, docs=data.docs[args.skip:args.skip + args.limit]) for name, data in tasks.items()}
    print(f"\n| routing | {' | '.join(tasks)} | average |\n|---|" + "---|" * (len(tasks) + 1))
    for label in ("as saved", f"first {args.execute_first} execute"):
        if label != "as saved":
            first_tokens_execute(routed, args.execute_first)
        cells, scores = [], []
        for name, data in scored.items():
            with routed.measuring(), quiet_bars():
                scores.append(run_task(lm, build_task(data))[paper_metric(name)])
                cells.append(f"{scores[-1]:.1%} at {routed.sparsity().param:.1%}")
        print(f"| {label} | {' | '.join(cells)} | {sum(scores) / len(scores):.1%} |")


if __name__ == "__main__":
    main()
