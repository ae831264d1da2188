"""`skipgpt generate`: answer a prompt with trained routers (sparse execution), streamed, with its speed

Load MODEL and the routers in --routers (sparse mode: a module a token skips is not computed), send
--prompt as one user turn of the tokenizer's chat template (instruction-tuned models such as
SmolLM2-Instruct expect it; --raw-prompt sends the text as it is), stream the greedy reply (a repetition
penalty or sampling in the model's generation_config is not applied) token by
token, then print the decode speed in tokens/s (the new tokens after the first, prefill excluded) and
the prefill time (prompt forward to first new token). Without --routers the unmodified model
generates; with them, the realised sparsity of the routed generation follows. --compare-dense also
generates with the unmodified model (with a stage-2 folder: its LoRA merged, no routing) and prints its reply
and speed. Each model first runs a short untimed
warm-up. The two replies may differ in length (each ends at its own end-of-turn token), so their speeds
compare roughly; `skipgpt bench` times equal work.
"""

from __future__ import annotations

import argparse

from ..artifact import load_routers, read_config
from ..errors import ConfigError
from ..evaluation.perplexity import check_context
from ..inference.generate import generate, prompt_ids
from ..models.loading import load_model
from ..routing.sparsity import report
from .common import add_command, add_model_flags, add_routers, model_options, positive_int


def add_parser(sub) -> argparse.ArgumentParser:
    p = add_command(sub, __doc__, epilog=(
        "Example: skipgpt generate --model smollm2-135m --routers runs/demo/routers "
        "--prompt 'Why is the sky blue?' --max-new-tokens 64 --compare-dense"))
    add_model_flags(p, dtype_default=None, device="auto", threads=True)
    add_routers(p, "router directory from `skipgpt train` or `skipgpt demo` (default: the unmodified model)")
    p.add_argument("--prompt", required=True, help="the text to answer")
    p.add_argument("--raw-prompt", action="store_true",
                   help="send --prompt as it is, without the tokenizer's chat template (the text of a special "
                        "token, such as <|im_end|>, is that token)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64,
                   help="most tokens to generate; fewer if the model ends its reply (default %(default)s)")
    p.add_argument("--compare-dense", action="store_true",
                   help="also generate with the unmodified model and print both replies and speeds")
    return p


def run(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise ConfigError("--prompt is empty")
    try:  # bytes that are not UTF-8 arrive as lone surrogates, which the tokenizer refuses with a traceback
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError("--prompt is not valid UTF-8 text") from None
    if args.compare_dense and not args.routers:
        raise ConfigError("--compare-dense compares routed with dense generation: give --routers DIR")
    if args.routers:
        read_config(args.routers)  # a bad directory fails before the model loads
    model, tokenizer = load_model(args.model, **model_options(args))
    ids = prompt_ids(tokenizer, args.prompt, chat=not args.raw_prompt)
    check_context(model, ids.shape[1] + args.max_new_tokens,
                  f"the prompt's {ids.shape[1]} tokens + --max-new-tokens {args.max_new_tokens}")

    if not args.routers:
        _warm_up(model, tokenizer, ids)
        dense, _ = generate(model, tokenizer, ids, args.max_new_tokens, echo=True)
        print(dense.speed_line("dense"))
        return 0

    routed = load_routers(model, args.routers)
    routed.set_mode("sparse")
    if args.compare_dense:
        print("--- routed (sparse) ---")
    _warm_up(routed.model, tokenizer, ids)
    routed.reset_sparsity()
    sparse, streamer = generate(routed.model, tokenizer, ids, args.max_new_tokens, echo=True, meter=routed.meter)
    print(sparse.speed_line("routed"))
    _print_sparsity(routed, streamer.prompt_totals)
    if not args.compare_dense:
        return 0

    # load_routers merged a stage-2 adapter into the weights: the reference is then those weights, unrouted
    merged = routed.adapter is not None
    print("--- dense (LoRA merged, no routing) ---" if merged else "--- dense (unmodified model) ---")
    with routed.unrouted() as hf:
        _warm_up(hf, tokenizer, ids)
        dense, _ = generate(hf, tokenizer, ids, args.max_new_tokens, echo=True)
    print(dense.speed_line("dense"))
    agree = next((i for i, (a, b) in enumerate(zip(sparse.new_ids, dense.new_ids)) if a != b),
                 min(len(sparse.new_ids), len(dense.new_ids)))
    speedup = sparse.decode_tok_s / dense.decode_tok_s  # nan when a reply had a single token
    print(f"decode speedup routed/dense: {'n/a' if speedup != speedup else f'{speedup:.2f}x'}; the replies agree "
          f"on their first {agree} of {max(len(sparse.new_ids), len(dense.new_ids))} tokens")
    return 0


def _print_sparsity(routed, prompt_totals: dict | None) -> None:
    """Realised sparsity of the routed generation: all forwards, and the decode steps alone (the meter's
    totals minus those it had after the prompt), which are what decode speed depends on."""
    s = routed.sparsity()
    print(f"routed sparsity, prefill and decode: param {s.param:.1%}  attention {s.attention:.1%}  mlp {s.mlp:.1%}")
    totals = routed.meter.totals
    if prompt_totals is None or totals is None:
        return
    d = report({k: totals[k] - prompt_totals[k] for k in totals}, routed.costs)
    if d.tokens:
        print(f"routed sparsity, decode steps only: param {d.param:.1%}  attention {d.attention:.1%}  mlp {d.mlp:.1%}")


def _warm_up(model, tokenizer, ids) -> None:
    """One prefill and one decode step, untimed: first calls pay for allocations that later ones reuse."""
    generate(model, tokenizer, ids, 2)
