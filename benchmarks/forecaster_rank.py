"""Choose the forecaster of informed skipping by measurement: its rank and whether a nonlinearity pays.

    python benchmarks/forecaster_rank.py --routers runs/bench30/skipgpt-informed-25 \
        --data ../shared/data/wikitext2/wiki.valid.tokens --test ../shared/data/wikitext2/wiki.test.raw

Rank: the trained routers of an informed run keep their weights while the forecasters are replaced by
rank-R ones and put through the trainer's own fitting (every token of dense passes, then twice on the
tokens the routers skip); the threshold is recalibrated to the run's net target on the held-out
sequences, so a larger forecaster pays for itself with more skipping. Printed per rank: net sparsity,
held-out and test perplexity. The routers were tuned beside rank-R0 forecasters (R0 = the run's), which
favours R0 slightly.

Nonlinearity: on the tokens the routers skip, the rows (normalised input, module output) of a few
modules (those skipped most) are collected from the fitting text and the held-out sequences; a rank-R linear map
and a rank-R bottleneck with a SiLU between its halves (the same parameters plus R) are trained by
Adam on the fitting rows, and their held-out R^2 is printed beside the closed-form linear fit.

Context (--context): attention is the module a forecaster of the token alone predicts worst. For the attention
modules skipped most, the closed-form rank-R fit is repeated with inputs a forecaster could read from the KV
cache added to the normalised input: the previous token's value vectors, and the causal mean of the value
vectors up to the token; held-out R^2 of each, and their row-weighted mean.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from skipgpt import RoutedModel, calibrate_threshold, load_model
from skipgpt.artifact import FORECASTERS_NAME, WEIGHTS_NAME, read_config
from skipgpt.evaluation.perplexity import perplexity, tokenize_text
from skipgpt.routing.policies import KINDS
from skipgpt.training.config import TrainConfig
from skipgpt.training.data import load_data
from skipgpt.training.forecast import Moments, capture, fit_forecasters, solve
from skipgpt.training.trainer import FIT_SEQUENCES, held_out_nll


def routed_with_rank(args, rank: int) -> tuple[RoutedModel, object]:
    model, tok = load_model(args.model, dtype=args.dtype)
    config = replace(read_config(args.routers), forecaster_rank=rank)
    routed = RoutedModel(model, config)
    routed.routers.load_state_dict(load_file(str(Path(args.routers) / WEIGHTS_NAME)))
    routed.routers.eval()
    routed.model.eval()
    return routed, tok


def batches(seqs: torch.Tensor, size: int = 2) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": seqs[i : i + size]} for i in range(0, len(seqs), size)]


def rank_row(args, rank: int, data, test_ids: torch.Tensor) -> dict:
    routed, _ = routed_with_rank(args, rank)
    fit = batches(data.train[: args.fit_sequences])
    with torch.no_grad():
        fit_forecasters(routed, fit, on_policy=False)
        for _ in range(2):
            fit_forecasters(routed, fit, on_policy=True)
    target, accounting = routed.config.target_sparsity, routed.config.accounting
    calibrate_threshold(routed, batches(data.val), target, accounting)
    routed.reset_sparsity()
    val_ppl = math.exp(held_out_nll(routed, data.val, 2))
    net = getattr(routed.sparsity(), accounting)
    with torch.no_grad(), routed.using(track=False):
        test = perplexity(routed, test_ids, 2048, limit=args.windows, batch_size=1)["ppl"]
    return {"rank": rank, "params": routed.forecasters.params_per_module(), "net": net, "val_ppl": val_ppl,
            "test_ppl": test}


def skipped_rows(routed: RoutedModel, seqs: torch.Tensor, modules: list[tuple[int, str]]):
    """{(layer, kind): (normalised inputs, outputs)} of the tokens the routers skip, in float32."""
    rows = {m: ([], []) for m in modules}
    with torch.no_grad(), capture(routed) as (inputs, outputs), routed.using(mode="masked", sample=False, track=False):
        for batch in batches(seqs):
            routed(**batch, use_cache=False)
            gates, real, _ = routed.state.stacked()
            for i, kind in modules:
                skip = real & (gates[i, KINDS.index(kind)] <= 0.5)
                rows[(i, kind)][0].append(inputs[(i, kind)][skip].float())
                rows[(i, kind)][1].append(outputs[(i, kind)][skip].float())
    return {m: (torch.cat(x), torch.cat(y)) for m, (x, y) in rows.items()}


def r2(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float(1 - ((pred - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())


def trained(x: torch.Tensor, y: torch.Tensor, rank: int, act: nn.Module, steps: int, lr: float) -> nn.Module:
    hidden = x.shape[1]
    net = nn.Sequential(nn.Linear(hidden, rank, bias=not isinstance(act, nn.Identity)), act, nn.Linear(rank, hidden))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    scale = y.std()  # fit in units of the output's spread, so one learning rate suits every module
    for _ in range(steps):
        opt.zero_grad()
        loss = ((net(x) - y) / scale).pow(2).mean()
        loss.backward()
        opt.step()
    return net


def nonlinearity(args, data) -> None:
    routed, _ = routed_with_rank(args, args.rank)
    routed.forecasters.load_state_dict(load_file(str(Path(args.routers) / FORECASTERS_NAME)))
    every = [(i, k) for i in range(len(routed.layers)) for k in KINDS]
    fit = skipped_rows(routed, data.train[: args.fit_sequences], every)
    # the modules skipped most, per kind: where a better forecaster would matter most
    modules = [m for k in KINDS for m in sorted((m for m in every if m[1] == k), key=lambda m: -len(fit[m][0]))
               [: args.modules]]
    held = skipped_rows(routed, data.val, modules)
    print(f"\nheld-out R^2 on skipped tokens, rank {args.rank} ({args.adam_steps} full-batch Adam steps)")
    print("| module | fit rows | held-out rows | closed-form linear | Adam linear | Adam SiLU bottleneck |")
    print("|---|---|---|---|---|---|")
    torch.manual_seed(0)
    for m in modules:
        (x, y), (hx, hy) = fit[m], held[m]
        if len(x) < 4 * args.rank or len(hx) == 0:
            print(f"| {m[0]} {m[1]} | {len(x)} | {len(hx)} | too few skipped rows | | |")
            continue
        mom = Moments(x.shape[1])
        mom.add(x, y)
        down, up, bias = solve(mom.xx, mom.xy, args.rank, 1e-2)
        closed = r2(hx @ down.float().T @ up.float().T + bias.float(), hy)
        cells = [closed]
        for act in (nn.Identity(), nn.SiLU()):
            net = trained(x, y, args.rank, act, args.adam_steps, args.adam_lr)
            with torch.no_grad():
                cells.append(r2(net(hx), hy))
        print(f"| {m[0]} {m[1]} | {len(x)} | {len(hx)} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")


def context_rows(routed: RoutedModel, seqs: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """{layer: rows [normalised input, previous token's values, causal mean of values, attention output]} of
    the tokens that skip the layer's attention, in float64."""
    values: dict[int, torch.Tensor] = {}
    hooks = [routed.layers[i].attn.v_proj.register_forward_hook(
        lambda module, args, out, i=i: values.__setitem__(i, out.detach())) for i in layers]
    rows: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    try:
        with torch.no_grad(), capture(routed) as (inputs, outputs), routed.using(mode="masked", sample=False,
                                                                                 track=False):
            for batch in batches(seqs):
                routed(**batch, use_cache=False)
                gates, real, _ = routed.state.stacked()
                for i in layers:
                    v = values[i].double()
                    prev = torch.cat([torch.zeros_like(v[:, :1]), v[:, :-1]], dim=1)
                    mean = v.cumsum(1) / torch.arange(1, v.shape[1] + 1, dtype=v.dtype).view(1, -1, 1)
                    skip = real & (gates[i, KINDS.index("attn")] <= 0.5)
                    whole = [inputs[(i, "attn")].double(), prev, mean, outputs[(i, "attn")].double()]
                    rows[i].append(torch.cat(whole, dim=-1)[skip])
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.cat(r) for i, r in rows.items()}


def context(args, data) -> None:
    routed, _ = routed_with_rank(args, args.rank)
    routed.forecasters.load_state_dict(load_file(str(Path(args.routers) / FORECASTERS_NAME)))
    hidden, kv = routed.config.base.hidden_size, routed.layers[0].attn.v_proj.out_features
    every = list(range(len(routed.layers)))
    counts = {i: len(r) for i, r in context_rows(routed, data.train[:8], every).items()}
    layers = sorted(every, key=lambda i: -counts[i])[: args.modules]
    fit, held = context_rows(routed, data.train[: args.fit_sequences], layers), context_rows(routed, data.val, layers)
    x, prev, mean = slice(0, hidden), slice(hidden, hidden + kv), slice(hidden + kv, hidden + 2 * kv)
    sets = {"x": [x], "+ previous token's values": [x, prev], "+ causal mean of values": [x, mean],
            "+ both": [x, prev, mean]}
    print(f"\nheld-out R^2 of attention forecasts on skipped tokens, closed-form rank {args.rank}")
    print("| layer | fit rows | held-out rows | " + " | ".join(sets) + " |")
    print("|---|---|---|" + "---|" * len(sets))
    total = {name: 0.0 for name in sets}
    for i in layers:
        f, h = fit[i], held[i]
        cells = []
        for name, parts in sets.items():
            fx, hx = torch.cat([f[:, p] for p in parts], 1), torch.cat([h[:, p] for p in parts], 1)
            mom = Moments(fx.shape[1], hidden)
            mom.add(fx, f[:, -hidden:])
            down, up, bias = solve(mom.xx, mom.xy, args.rank, 1e-2)
            cells.append(r2(hx @ down.T @ up.T + bias, h[:, -hidden:]))
            total[name] += cells[-1] * len(h)
        print(f"| {i} | {len(f)} | {len(h)} | " + " | ".join(f"{c:.3f}" for c in cells) + " |", flush=True)
    rows = sum(len(held[i]) for i in layers)
    print(f"| row-weighted | | {rows} | " + " | ".join(f"{t / rows:.3f}" for t in total.values()) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--routers", required=True, help="router directory of an informed run (forecaster_rank > 0)")
    p.add_argument("--data", required=True, help="the training text of that run")
    p.add_argument("--test", required=True, help="perplexity text (e.g. wiki.test.raw)")
    p.add_argument("--seq-len", type=int, default=512, help="the run's training sequence length")
    p.add_argument("--ranks", default="8,16,32,64,128")
    p.add_argument("--windows", type=int, default=10, help="test windows of 2048")
    p.add_argument("--rank", type=int, default=32, help="rank of the nonlinearity comparison (the run's)")
    p.add_argument("--modules", type=int, default=4, help="modules per kind in the nonlinearity comparison")
    p.add_argument("--adam-steps", type=int, default=300)
    p.add_argument("--adam-lr", type=float, default=3e-3)
    p.add_argument("--fit-sequences", type=int, default=FIT_SEQUENCES, help="training sequences of each rank's fits")
    p.add_argument("--skip-ranks", action="store_true", help="only the nonlinearity comparison")
    p.add_argument("--skip-nonlinearity", action="store_true", help="only the rank table")
    p.add_argument("--context", action="store_true", help="also the attention context-feature comparison")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    routed, tok = routed_with_rank(args, args.rank)
    cfg = TrainConfig(stage="router", data=args.data, seq_len=args.seq_len, batch_size=2)
    data = load_data(cfg, routed, tok, Path("unused"))  # a text file: nothing cached
    test_ids = tokenize_text(tok, Path(args.test).read_text(encoding="utf-8"))
    routed.unpatch()
    if not args.skip_ranks:
        print("| rank | params per module | net sparsity (held-out) | held-out PPL | test PPL |")
        print("|---|---|---|---|---|")
        for rank in (int(r) for r in args.ranks.split(",")):
            row = rank_row(args, rank, data, test_ids)
            print(f"| {row['rank']} | {row['params']:,} | {row['net']:.1%} | {row['val_ppl']:.2f} | "
                  f"{row['test_ppl']:.2f} |", flush=True)
    if not args.skip_nonlinearity:
        nonlinearity(args, data)
    if args.context:
        context(args, data)


if __name__ == "__main__":
    main()
