"""`skipgpt demo`: tune, evaluate, benchmark and plot SkipGPT routers on the embedded model (a few minutes)

End-to-end demo on the embedded SmolLM2-135M, offline: tune routers to --sparsity on text the dense model
writes itself, calibrate the argmax threshold, compare held-out perplexity with the dense model and with
ShortGPT at the same parameter sparsity, measure sparse-vs-dense speed, and draw what the routers learned.
Everything is written under --output; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from ..baselines.static import shortgpt
from ..inference.bench import measure_speed_batches
from ..io import check_output
from ..models.routed import RoutedModel
from ..training import TrainConfig, train
from ..training.data import load_data
from ..training.trainer import build_routed, held_out_nll
from .common import (
    add_command,
    add_model_flags,
    add_no_progress,
    add_output,
    inputs,
    int_at_least,
    positive_int,
    sparsity,
    write_results,
)

SUMMARY = "summary.json"


def add_parser(sub) -> argparse.ArgumentParser:
    p = add_command(sub, __doc__)
    add_model_flags(p, dtype=False, note="the model to route")
    p.add_argument("--sparsity", type=sparsity, default=0.25, help="target parameter sparsity (default %(default)s)")
    p.add_argument("--steps", type=positive_int, default=120, help="router-tuning steps (default %(default)s)")
    p.add_argument("--seq-len", type=int_at_least(2), default=128,
                   help="training sequence length (default %(default)s)")
    p.add_argument("--sequences", type=positive_int, default=48,
                   help="self-generated training sequences (default %(default)s)")
    # On the demo's few thousand self-generated tokens informed skipping lost (docs/RESULTS.md), so the
    # demo runs the paper's plain skip unless asked.
    p.add_argument("--forecaster-rank", type=int_at_least(0), default=0,
                   help="informed skipping: a rank-R forecaster stands in for each skipped module; 0 = the "
                        "paper's plain skip (default %(default)s)")
    p.add_argument("--distill", type=float, default=1.0,
                   help="0 = LM loss, 1 = KL to the dense model, between = mix (default %(default)s)")
    add_output(p, "output folder", default="runs/demo")
    add_no_progress(p)
    return p


def _ppl(routed, sequences, batch_size: int = 4) -> float:
    return math.exp(held_out_nll(routed, sequences, batch_size))


def run(args: argparse.Namespace) -> int:
    from ..analysis.figures import write_analysis  # matplotlib: imported when a command draws, not at start-up

    t0 = time.perf_counter()
    out = check_output(args.output, folder=True, **inputs(model=args.model))
    summary_path = check_output(out / SUMMARY, flag="--output's")  # in the way of the last write: found first
    figures_dir = check_output(out / "analysis", folder=True, flag="--output's")
    cfg = TrainConfig(stage="router", model=args.model, data="self", target_sparsity=args.sparsity,
                      steps=args.steps, seq_len=args.seq_len, batch_size=2, self_sequences=args.sequences,
                      val_sequences=8, distill=args.distill, forecaster_rank=args.forecaster_rank,
                      output=str(out / "routers"),
                      progress=not args.no_progress, checkpoint_every=0)

    print(f"[1/5] loading {args.model} and sampling {args.sequences + 8} sequences of {args.seq_len} tokens from it")
    routed, tokenizer = build_routed(cfg)
    data = load_data(cfg, routed, tokenizer, out / "cache")
    print(f"      {time.perf_counter() - t0:.0f} s")

    print(f"[2/5] tuning routers to {args.sparsity:.0%} parameter sparsity ({args.steps} steps, base frozen)")
    # The summary marks a finished demo: an earlier one's goes before its routers are replaced, so a run cut short
    # never leaves new routers beside a summary of old ones.
    summary_path.unlink(missing_ok=True)
    result = train(cfg, routed=routed, tokenizer=tokenizer, data=data)
    s = result.summary
    sp = s["held_out_sparsity"]
    print(f"      {s['train_seconds']:.0f} s, {s['tokens_per_s']:.0f} tokens/s; "
          f"calibrated threshold {s['threshold']:+.3f}")

    print("[3/5] held-out perplexity (text the model has not trained on)")
    dense_ppl, skip_ppl = s["held_out_dense_ppl"], s["held_out_ppl"]
    with routed.unrouted() as hf:  # ShortGPT routes the same HF model with a static policy of its own
        static = RoutedModel(hf)
        try:  # unpatched whatever happens: else routing `hf` again on the way out would fail and hide the error
            shortgpt(static, tokenizer, args.sparsity, [{"input_ids": data.train[:8]}])
            static.reset_sparsity()
            short_ppl = _ppl(static, data.val)
            short_sp = static.sparsity()
        finally:
            static.unpatch()
    rows = [
        ("dense", 0.0, 0.0, 0.0, dense_ppl),
        ("SkipGPT-RT" + (f" + rank-{args.forecaster_rank} forecasters" if args.forecaster_rank else ""),
         sp["param"], sp["attention"], sp["mlp"], skip_ppl),
        ("ShortGPT", short_sp.param, short_sp.attention, short_sp.mlp, short_ppl),
    ]
    print("      | method | param sparsity | attention | MLP | held-out PPL |")
    print("      |---|---|---|---|---|")
    for name, p, a, m, ppl in rows:
        print(f"      | {name} | {p:.1%} | {a:.1%} | {m:.1%} | {ppl:.2f} |")

    print("[4/5] speed: unmodified HF model vs masked vs sparse execution (prompt 256 tokens, 16 decode steps, "
          "batch 4 and batch 1)")
    torch.manual_seed(0)
    speed = measure_speed_batches(routed, tokenizer, seq_len=256, batch_size=4, decode_tokens=16, repeats=3)
    pre, dec, one = speed["prefill"], speed["decode"], speed["batch_1"]["decode"]

    def spread(p: dict) -> str:  # with 3 rounds the quartiles are the slowest and the fastest round
        return f"rounds {p['speedup_quartiles'][0]:.2f}-{p['speedup_quartiles'][1]:.2f}"

    print(f"      prefill, batch 4: dense {pre['dense_tok_s']:.0f} tok/s, sparse {pre['sparse_tok_s']:.0f} tok/s -> "
          f"{pre['speedup']:.2f}x (median of paired rounds, {spread(pre)}; ideal {pre['ideal_speedup']:.2f}x "
          "from FLOPs skipped)")
    print(f"      decode,  batch 4: dense {dec['dense_tok_s']:.1f} tok/s, sparse {dec['sparse_tok_s']:.1f} tok/s -> "
          f"{dec['speedup']:.2f}x ({spread(dec)}; ideal {dec['ideal_speedup']:.2f}x)")
    # One sequence is what a chat user sees: a module its token skips is not computed at all.
    print(f"      decode,  batch 1: dense {one['dense_tok_s']:.1f} tok/s, sparse {one['sparse_tok_s']:.1f} tok/s -> "
          f"{one['speedup']:.2f}x ({spread(one)}; ideal {one['ideal_speedup']:.2f}x)")

    print("[5/5] analysis figures of the trained routers")
    text = tokenizer.decode(data.val.reshape(-1).tolist())
    figures = write_analysis(routed, tokenizer, text, figures_dir, seq_len=args.seq_len, max_windows=8)
    for f in figures:
        if f.suffix == ".png":
            print(f"      {f}")

    summary = {
        "model": args.model, "target_sparsity": args.sparsity, "training": s,
        "comparison": [{"method": n, "sparsity": {"param": p, "attention": a, "mlp": m}, "held_out_ppl": v}
                       for n, p, a, m, v in rows],
        "speed": speed, "figures": [str(f) for f in figures], "wall_seconds": time.perf_counter() - t0,
    }
    write_results(str(summary_path), summary)  # printed if the write fails: minutes of work are not lost
    print(f"done in {summary['wall_seconds']:.0f} s; routers in {out / 'routers'}, summary in {summary_path}")
    return 0
