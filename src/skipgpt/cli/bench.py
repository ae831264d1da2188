"""`skipgpt bench`: prefill and decode throughput of dense HF, masked and sparse routing."""

from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench",
        help="prefill/decode tokens per second: unmodified HF vs masked vs sparse routing",
        description=(
            "Time the same weights three ways, interleaved, medians over --repeats after one warm-up round: "
            "the unmodified HF model (dense), routing with every module computed and gated (masked), and "
            "routing that computes only the tokens that execute (sparse). Prefill is one forward over "
            "BATCH x SEQ_LEN random tokens with logits for every position; decode is DECODE_TOKENS greedy "
            "steps from its KV cache. 'speedup' is sparse/dense tokens per second; 'ideal_speedup' is the "
            "FLOP ratio of the whole forward (LM head included) given the modules actually skipped."
        ),
        epilog=(
            "Without --routers, every module skips --sparsity of the tokens at random (a stand-in for "
            "trained routers with the same parameter sparsity). With --routers and --sparsity, the routers' "
            "threshold is calibrated to that sparsity on the benchmark input first. Example: skipgpt bench "
            "--model smollm2-135m --sparsity 0.25 --seq-len 512 --batch-size 4 --output bench.json"
        ),
    )
    p.add_argument("--model", default="smollm2-135m",
                   help="hub name, HF folder, .gguf file or alias (default %(default)s)")
    p.add_argument("--routers", default=None, help="router directory from `skipgpt train` (default: random skipping)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction of parameters to skip, e.g. 0.25 (default: 0.25 without --routers, "
                        "the routers' own threshold with them)")
    p.add_argument("--seq-len", type=int, default=512, help="prompt length in tokens (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per batch (default %(default)s)")
    p.add_argument("--decode-tokens", type=int, default=32, help="greedy decode steps timed (default %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up; medians are reported "
                   "(default %(default)s)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--output", required=True, help="JSON file to write the results to")
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from ..baselines.registry import load_baseline
    from ..config import check_sparsity
    from ..errors import ConfigError
    from ..inference.bench import measure_speed
    from ..io import write_json_atomic
    from ..models.loading import load_model
    from ..models.routed import RoutedModel
    from ..routing.calibrate import calibrate_threshold

    for name in ("seq_len", "batch_size", "decode_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.sparsity is not None:
        check_sparsity(args.sparsity, "--sparsity")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")

    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    sparsity = args.sparsity
    if args.routers:
        routed = load_baseline(model, args.routers)
        if sparsity is not None and routed.policy is not None:
            raise ConfigError(f"--sparsity sets a router threshold, but {args.routers} is a "
                              f"{routed.config.extra.get('routing')} baseline with a fixed policy; drop --sparsity")
        if sparsity is not None:
            g = torch.Generator().manual_seed(1)
            ids = torch.randint(0, len(tokenizer), (args.batch_size, args.seq_len), generator=g).to(device)
            calibrate_threshold(routed, [{"input_ids": ids}], sparsity)
        sparsity = None  # the routers decide
    else:
        routed = RoutedModel(model, name=args.model)
        sparsity = 0.25 if sparsity is None else sparsity
    result = measure_speed(routed, tokenizer, args.seq_len, args.batch_size, args.decode_tokens, args.repeats,
                           sparsity=sparsity)
    result["model"] = args.model
    result["routers"] = args.routers
    write_json_atomic(args.output, result)
    pre, dec = result["prefill"], result["decode"]
    print(f"sparsity: param {result['sparsity']['param']:.1%}  attention {result['sparsity']['attention']:.1%}  "
          f"mlp {result['sparsity']['mlp']:.1%}  ({result['device']})")
    for phase, r in (("prefill", pre), ("decode", dec)):
        print(f"{phase:8s} tok/s  dense {r['dense_tok_s']:9.1f}  masked {r['masked_tok_s']:9.1f}  "
              f"sparse {r['sparse_tok_s']:9.1f}  speedup {r['speedup']:.3f}x  ideal {r['ideal_speedup']:.3f}x")
    print(f"wrote {args.output}")
    return 0
