"""Where a prefill or a decode step's time goes with trained routers: operator counts and a torch.profiler table.

    python benchmarks/op_profile.py --routers runs/rt25 --batch-size 1 --threads 1                   # decode
    python benchmarks/op_profile.py --routers runs/rt25 --phase prefill --seq-len 512 --steps 1      # prefill

Profiles the unmodified HF model (dense), masked routing and sparse routing on a random prompt, after a
warm-up: --steps greedy decode steps from the prefilled prompt, or --steps prefills of it. Prints per step:
the number of aten operators (deterministic, so it compares code versions on a noisy machine), the share of
self CPU time in matmuls, in attention and in everything else, those operators that routing adds or removes
against dense, and the operators with the most self CPU time. Speed itself is `skipgpt bench`'s job.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from torch.profiler import profile

import skipgpt
from skipgpt.inference.bench import _decode, _prefill

MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::mv", "aten::addmv_"}


def profile_steps(routed, variant: str, phase: str, ids: torch.Tensor, steps: int):
    block = routed.unrouted() if variant == "dense" else routed.using(mode=variant)
    with block, torch.no_grad():
        token, cache = _prefill(routed.model, ids)  # warm-up
        if phase == "prefill":
            with profile() as prof:
                for _ in range(steps):
                    _prefill(routed.model, ids)
        else:
            token = _decode(routed.model, token, cache, 2)
            with profile() as prof:
                _decode(routed.model, token, cache, steps)
    return prof.key_averages()


def _shares(events) -> str:
    total = sum(e.self_cpu_time_total for e in events)
    mm = sum(e.self_cpu_time_total for e in events if e.key in MATMULS)
    attn = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key)
    return f"matmul {mm / total:.0%}, attention {attn / total:.0%}, other {(total - mm - attn) / total:.0%}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--routers", required=True, help="router directory from `skipgpt train`")
    p.add_argument("--phase", choices=("decode", "prefill"), default="decode")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128, help="prompt length")
    p.add_argument("--steps", type=int, default=8, help="decode steps (or prefills) profiled")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=12, help="operators listed by self CPU time")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    model, tok = skipgpt.load_model(args.model, dtype="float32")
    routed = skipgpt.load_routers(model, args.routers)
    ids = torch.randint(0, len(tok), (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    counts = {}
    for variant in ("dense", "masked", "sparse"):
        events = profile_steps(routed, variant, args.phase, ids, args.steps)
        counts[variant] = Counter({e.key: e.count / args.steps for e in events})
        total_ms = sum(e.self_cpu_time_total for e in events) / 1000 / args.steps
        print(f"{variant}: {sum(counts[variant].values()):.0f} aten ops, {total_ms:.1f} ms self CPU per step "
              f"(under the profiler; {_shares(events)})")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
            print(f"    {e.key:<50} {e.self_cpu_time_total / 1000 / args.steps:8.2f} ms {e.count / args.steps:7.1f}x")
    for variant in ("masked", "sparse"):
        diff = {k: counts[variant][k] - counts["dense"].get(k, 0) for k in counts[variant] | counts["dense"]}
        top = sorted(((c, k) for k, c in diff.items() if abs(c) >= 1), key=lambda ck: -abs(ck[0]))[:10]
        print(f"{variant} - dense per step: " + ", ".join(f"{k.removeprefix('aten::')} {c:+.0f}" for c, k in top))


if __name__ == "__main__":
    main()
