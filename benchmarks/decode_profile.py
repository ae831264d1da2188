"""Where a decode step's time goes with trained routers: operator counts and a torch.profiler table.

    python benchmarks/decode_profile.py --routers runs/wt2-rt25 --batch-size 1 --threads 1 [--rounds 40]

Prefills a random prompt, warms up, then profiles --steps greedy decode steps of the unmodified HF model
(dense), masked routing and sparse routing, and prints per decode step: the number of aten operators
(deterministic, so it compares code versions on a noisy machine), those that routing adds or removes
against dense, and the operators with the most self CPU time. Speed itself is `skipgpt bench`'s job.

--rounds N adds a timing of overheads too small for the bench's rounds: each variant keeps its own cache,
and in each of N rounds the three decode --steps more tokens in turn (order rotated), so speed drifts of
the machine within seconds hit all three alike; printed: the median and quartiles of the per-round
dense/variant time ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch
from torch.profiler import profile

import skipgpt
from skipgpt.inference.bench import _decode, _prefill


def profile_decode(routed, variant: str, ids: torch.Tensor, steps: int):
    block = routed.unrouted() if variant == "dense" else routed.using(mode=variant)
    with block, torch.no_grad():
        token, cache = _prefill(routed.model, ids)
        token = _decode(routed.model, token, cache, 2)  # warm-up
        with profile() as prof:
            _decode(routed.model, token, cache, steps)
    return prof.key_averages()


def paired_decode(routed, ids: torch.Tensor, rounds: int, steps: int) -> dict[str, list[float]]:
    """Per-round decode seconds of every variant, interleaved round by round on persistent caches."""
    variants = ("dense", "masked", "sparse")
    block = {"dense": routed.unrouted, "masked": lambda: routed.using(mode="masked", track=False),
             "sparse": lambda: routed.using(mode="sparse", track=False)}
    state, seconds = {}, {v: [] for v in variants}
    with torch.no_grad():
        for v in variants:
            with block[v]():
                token, cache = _prefill(routed.model, ids)
                state[v] = (_decode(routed.model, token, cache, steps), cache)  # warm-up
        for r in range(rounds):
            for v in variants[r % 3:] + variants[:r % 3]:
                token, cache = state[v]
                with block[v]():
                    tic = time.perf_counter()
                    token = _decode(routed.model, token, cache, steps)
                    seconds[v].append(time.perf_counter() - tic)
                state[v] = (token, cache)
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--routers", required=True, help="router directory from `skipgpt train`")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128, help="prompt length")
    p.add_argument("--steps", type=int, default=8, help="decode steps profiled")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=12, help="operators listed by self CPU time")
    p.add_argument("--rounds", type=int, default=0, help="rounds of the interleaved decode timing (0: none)")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    model, tok = skipgpt.load_model(args.model, dtype="float32")
    routed = skipgpt.load_routers(model, args.routers)
    ids = torch.randint(0, len(tok), (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    counts = {}
    for variant in ("dense", "masked", "sparse"):
        events = profile_decode(routed, variant, ids, args.steps)
        counts[variant] = Counter({e.key: e.count / args.steps for e in events})
        total_ms = sum(e.self_cpu_time_total for e in events) / 1000 / args.steps
        print(f"{variant}: {sum(counts[variant].values()):.0f} aten ops, {total_ms:.1f} ms self CPU per step "
              "(under the profiler)")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
            print(f"    {e.key:<50} {e.self_cpu_time_total / 1000 / args.steps:8.2f} ms {e.count / args.steps:7.1f}x")
    for variant in ("masked", "sparse"):
        diff = {k: counts[variant][k] - counts["dense"].get(k, 0) for k in counts[variant] | counts["dense"]}
        top = sorted(((c, k) for k, c in diff.items() if abs(c) >= 1), key=lambda ck: -abs(ck[0]))[:10]
        print(f"{variant} - dense per step: " + ", ".join(f"{k.removeprefix('aten::')} {c:+.0f}" for c, k in top))
    if args.rounds:
        seconds = paired_decode(routed, ids, args.rounds, args.steps)
        print(f"interleaved decode, {args.rounds} rounds of {args.steps} steps: dense "
              f"{1000 * statistics.median(seconds['dense']) / args.steps:.2f} ms per step")
        for variant in ("masked", "sparse"):
            q = statistics.quantiles([d / t for d, t in zip(seconds["dense"], seconds[variant])], n=4)
            print(f"    {variant}: {q[1]:.3f}x dense (quartiles {q[0]:.3f}-{q[2]:.3f})")


if __name__ == "__main__":
    main()
