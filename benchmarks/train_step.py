"""Cost of one router-tuning step next to a dense forward and a dense training step of the same batch.

    python benchmarks/train_step.py                          # SmolLM2-135M, batch 2 x 256, CPU
    python benchmarks/train_step.py --device cuda --batch-size 8 --seq-len 1024

Three variants on the same token batch, interleaved so machine noise hits all of them:
  dense-forward   the unmodified HF model, forward only (no autograd graph)
  dense-train     the unmodified HF model, forward + backward of the LM loss with every weight trainable
  router-step     one skipgpt stage-1 optimizer step: routed forward (straight-through Gumbel), LM loss +
                  sparsity regulariser, backward into the routers only (base frozen), AdamW update
Prints the median seconds of --repeats timed rounds after a warm-up (the variants' order rotates every
round), tokens/s, and the median over rounds of each variant's time over the dense forward of its round.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import skipgpt
from skipgpt.cli.common import Parser, int_at_least, positive_int
from skipgpt.training import TrainConfig
from skipgpt.training.trainer import _setup_parameters, step_gradients


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch-size", type=positive_int, default=2)
    ap.add_argument("--seq-len", type=int_at_least(2), default=256)
    ap.add_argument("--repeats", type=positive_int, default=5)
    ap.add_argument("--threads", type=int_at_least(1, 1024), default=None,
                    help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, _ = skipgpt.load_model(args.model)
    model.to(args.device).train()  # dropout is 0 in these configs; train() as a fine-tuning loop would
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g).to(args.device)}
    tokens = args.batch_size * args.seq_len

    def dense_forward() -> None:
        with torch.no_grad():
            model(**batch)

    def dense_train() -> None:
        model.zero_grad(set_to_none=True)
        model(**batch, labels=batch["input_ids"]).loss.backward()

    # A second copy for skipgpt: RoutedModel patches its model in place, the dense variants keep theirs intact.
    routed_base, _ = skipgpt.load_model(args.model)
    routed = skipgpt.RoutedModel(routed_base.to(args.device), skipgpt.SkipConfig(target_sparsity=0.25))
    cfg = TrainConfig(model=args.model, batch_size=args.batch_size, seq_len=args.seq_len, progress=False)
    optimizer = torch.optim.AdamW(_setup_parameters(routed, cfg))  # base frozen, routers trainable
    routed.temperature = cfg.temperature_start

    def router_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        step_gradients(routed, [batch], cfg)
        optimizer.step()

    variants = {"dense-forward": dense_forward, "dense-train": dense_train, "router-step": router_step}
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.repeats + 1):  # round 0 warms up
        for name in names[round_ % 3:] + names[:round_ % 3]:  # the order rotates: no variant always runs first
            sync(args.device)
            tic = time.perf_counter()
            variants[name]()
            sync(args.device)
            if round_:
                times[name].append(time.perf_counter() - tic)

    print(f"{args.model}, batch {args.batch_size} x {args.seq_len} tokens, {args.device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'variant':<15}{'seconds':>10}{'tokens/s':>12}{'x forward':>12}")
    for name, ts in times.items():
        m = statistics.median(ts)
        # the median of per-round ratios: each against the dense forward of its own round
        ratio = statistics.median(t / f for t, f in zip(ts, times["dense-forward"]))
        print(f"{name:<15}{m:>10.3f}{tokens / m:>12.0f}{ratio:>12.2f}")

if __name__ == "__main__":
    main()
