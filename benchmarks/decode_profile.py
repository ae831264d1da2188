"""Where a decode step's time goes with trained routers: operator counts and a torch.profiler table.

    python benchmarks/decode_profile.py --routers runs/rt25 --batch-size 1 --threads 1

Prefills a random prompt, warms up, then profiles --steps greedy decode steps of the unmodified HF model
(dense), masked routing and sparse routing, and prints per decode step: the number of aten operators
(deterministic, so it compares code versions on a noisy machine), those that routing adds or removes
against dense, and the operators with the most self CPU time. Speed itself is `skipgpt bench`'s job.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--routers", required=True, help="router directory from `skipgpt train`")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128, help="prompt length")
    p.add_argument("--steps", type=int, default=8, help="decode steps profiled")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=12, help="operators listed by self CPU time")
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


if __name__ == "__main__":
    main()
