"""`skipgpt bench`: prefill/decode tokens per second: unmodified HF vs masked vs sparse routing

Time the same weights three ways, interleaved (order rotated), medians over --repeats after one warm-up round: the
unmodified HF model (dense), routing with every module computed and gated (masked), and routing that
computes only the tokens that execute (sparse). Prefill is one forward over BATCH x SEQ_LEN random tokens
keeping the last position's logits, as generate() does; decode is DECODE_TOKENS greedy steps from its KV
cache. 'speedup' is the median over rounds of dense time / sparse time within a round (so it need not equal
the ratio of the median tokens/s printed beside it), printed with the quartiles of those ratios
('speedup_quartiles'; with 3 rounds or fewer, their range); 'ideal_speedup' is the FLOP ratio of the whole
forward (LM head included, where logits are kept) given the modules actually skipped. Every run measures
--batch-size sequences and also one sequence (what a single chat user sees): the JSON keeps the batch-N
results at its top level and puts batch 1's under "batch_1".
"""

from __future__ import annotations

import argparse

from ..artifact import load_routers, read_config
from ..errors import ConfigError
from ..evaluation.perplexity import check_context
from ..inference.bench import measure_speed_batches, random_ids
from ..io import check_output
from ..models.loading import load_model
from ..models.routed import RoutedModel
from ..routing.calibrate import calibrate_threshold
from ..routing.policies import reads_threshold
from .common import (
    add_command,
    add_model_flags,
    add_output,
    add_routers,
    inputs,
    int_at_least,
    model_options,
    positive_int,
    sparsity,
    write_results,
)


def add_parser(sub) -> argparse.ArgumentParser:
    p = add_command(sub, __doc__, epilog=(
        "Without --routers, every module skips --sparsity of the tokens at random (a stand-in for trained "
        "routers with the same parameter sparsity). With --routers and --sparsity, the routers' threshold is "
        "first calibrated to that sparsity on a random input drawn like the benchmark's but with another seed, "
        "so the sparsity measured may differ a little from the target. Example: skipgpt bench --model smollm2-135m "
        "--sparsity 0.25 --seq-len 512 --batch-size 4 --output bench.json"))
    add_model_flags(p, dtype_default=None, device="auto", threads=True)
    add_routers(p, "router directory from `skipgpt train` (default: random skipping)")
    p.add_argument("--sparsity", type=sparsity, default=None,
                   help="fraction of parameters to skip, e.g. 0.25 (default: 0.25 without --routers, "
                        "the routers' own threshold with them)")
    p.add_argument("--seq-len", type=positive_int, default=512, help="prompt length in tokens (default %(default)s)")
    # (bounded: an absurd batch would fail in torch with a traceback, in randint's size or the allocator)
    p.add_argument("--batch-size", type=int_at_least(1, 65536), default=4,
                   help="sequences per batch; batch 1 is always measured too (default %(default)s)")
    p.add_argument("--decode-tokens", type=positive_int, default=32,
                   help="greedy decode steps timed (default %(default)s)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed rounds after the warm-up; medians are "
                   "reported (default %(default)s)")
    add_output(p, "JSON file to write the results to", required=True)
    return p


def run(args: argparse.Namespace) -> int:
    check_output(args.output, **inputs(routers=args.routers, model=args.model))
    if args.routers:
        read_config(args.routers)
    options = model_options(args)
    model, tokenizer = load_model(args.model, **options)
    routed = load_routers(model, args.routers) if args.routers else RoutedModel(model, name=args.model)
    check_context(model, args.seq_len + args.decode_tokens,
                  f"--seq-len {args.seq_len} + --decode-tokens {args.decode_tokens}")
    target = args.sparsity
    if args.routers:
        if target is not None and not reads_threshold(routed.policy):
            raise ConfigError(f"--sparsity sets a router threshold, but {args.routers} is a "
                              f"{routed.config.extra.get('routing')} baseline with a fixed policy; drop --sparsity")
        if target is not None:
            ids = random_ids(model, tokenizer, args.batch_size, args.seq_len, seed=1)
            calibrate_threshold(routed, [{"input_ids": ids}], target)
        target = None  # the routers decide
    else:
        target = 0.25 if target is None else target
    result = measure_speed_batches(routed, tokenizer, batch_size=args.batch_size, seq_len=args.seq_len,
                                   decode_tokens=args.decode_tokens, repeats=args.repeats, sparsity=target)
    result["model"] = args.model
    result["routers"] = args.routers
    result["target_sparsity"] = args.sparsity if args.routers else target  # exact: "routing" prints it rounded
    write_results(args.output, result)
    print(f"{result['device']}, {result['dtype']}, prompt {args.seq_len} tokens, {args.decode_tokens} decode steps")
    spread = "quartiles" if args.repeats > 3 else "range"  # (three rounds or fewer have no quartiles to speak of)
    batches = [(args.batch_size, result)] + ([(1, result["batch_1"])] if args.batch_size != 1 else [])
    for batch, r in batches:
        pre, dec = r["sparsity"], r["decode_sparsity"]
        print(f"batch {batch}: param sparsity prefill {pre['param']:.1%} (attention {pre['attention']:.1%}, "
              f"mlp {pre['mlp']:.1%}), decode {dec['param']:.1%}")
        for phase in ("prefill", "decode"):
            p = r[phase]
            print(f"  {phase:8s} tok/s  dense {p['dense_tok_s']:9.1f}  masked {p['masked_tok_s']:9.1f}  "
                  f"sparse {p['sparse_tok_s']:9.1f}  speedup {p['speedup']:.3f}x  ideal {p['ideal_speedup']:.3f}x  "
                  f"{spread} {p['speedup_quartiles'][0]:.3f}-{p['speedup_quartiles'][1]:.3f}")
    print(f"wrote {args.output}")
    return 0
