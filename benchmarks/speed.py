"""Speed of sparse execution: unmodified HF vs skipgpt masked vs skipgpt sparse, side by side.

    python benchmarks/speed.py                      # CPU: SmolLM2-135M and a reduced-depth LLaMA-2-7B shape
    python benchmarks/speed.py --device cuda        # GPU: the full 32-layer LLaMA-2-7B shape in bf16
    python benchmarks/speed.py --routers runs/demo/routers   # trained SmolLM2 routers instead of random skipping
    python benchmarks/speed.py --device cuda --models llama7b --llama-batches 1,8   # what benchmarks/gpu.sh runs

For each model and each sparsity (0%, 25%, 40% of parameters) it prints prefill and decode tokens/s of
the three variants, the sparse/dense speedup, the ideal speedup from the FLOPs actually skipped (whole
forward, LM head included), the share of the ideal time saving realised, and peak memory. Without
trained routers every module skips the given fraction of tokens at random. Medians of --repeats
timed rounds after a warm-up; the variants are interleaved so machine noise hits all of them.
"""

from __future__ import annotations

import sys

import torch

import skipgpt
from skipgpt.cli.common import Parser, checked, int_at_least, positive_int, user_path
from skipgpt.cli.compare import parse_sparsities
from skipgpt.errors import ConfigError
from skipgpt.inference.bench import measure_speed
from skipgpt.io import check_output, write_json_atomic

MODELS = ("smollm2", "llama7b", "smollm2-b1")

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)


def llama7b_shaped(layers: int, dtype: torch.dtype, device: str):
    """LLaMA-2-7B dimensions with random weights (only the shapes matter for speed)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**LLAMA2_7B, num_hidden_layers=layers)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), config.vocab_size


def saving_share(speedup: float, ideal: float) -> float:
    """Share of the ideal time saving realised: (1 - 1/speedup) / (1 - 1/ideal)."""
    ideal_saving = 1 - 1 / ideal
    return float("nan") if ideal_saving <= 0 else (1 - 1 / speedup) / ideal_saving


def row(name: str, shape: str, sparsity: str, phase: str, r: dict) -> str:
    p = r[phase]
    share = saving_share(p["speedup"], p["ideal_speedup"])
    mem = r["peak_memory_mib"]
    realised = r["decode_sparsity" if phase == "decode" else "sparsity"]["param"]  # the phase's own tokens
    return (f"| {name} | {shape} | {sparsity} | {realised:.1%} | {phase} | {p['dense_tok_s']:.1f} | "
            f"{p['masked_tok_s']:.1f} | {p['sparse_tok_s']:.1f} | {p['speedup']:.3f} | {p['ideal_speedup']:.3f} | "
            f"{'-' if share != share else f'{share:.0%}'} | {mem['dense']:.0f}/{mem['sparse']:.0f} |")


HEADER = ("| model | shape | target | param sparsity | phase | dense tok/s | masked tok/s | sparse tok/s | "
          "speedup | ideal | saving realised | peak MiB dense/sparse |\n" + "|---" * 12 + "|")


def listed(parse):
    """argparse type: a comma-separated list of `parse`'s values."""
    def parse_list(text: str) -> list:
        return [parse(part) for part in text.split(",")]
    return parse_list


def model_list(text: str) -> list[str]:
    names = text.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ConfigError(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda: bf16, full 7B depth)")
    ap.add_argument("--sparsities", type=checked(parse_sparsities), default="0,0.25,0.4",
                    help="comma-separated parameter sparsities")
    ap.add_argument("--repeats", type=positive_int, default=3, help="timed rounds after warm-up (medians)")
    ap.add_argument("--threads", type=int_at_least(1, 1024), default=None, help="torch CPU threads")
    ap.add_argument("--routers", type=user_path, default=None,
                    help="trained SmolLM2 routers (threshold calibrated per sparsity)")
    ap.add_argument("--models", type=checked(model_list), default="smollm2,llama7b",
                    help=f"which of {','.join(MODELS)} to run")
    ap.add_argument("--llama-layers", type=positive_int, default=None,
                    help="depth of the 7B shape (default 4 on cpu, 32 on cuda)")
    ap.add_argument("--llama-batches", type=listed(positive_int), default=None,
                    help="comma-separated batch sizes of the 7B shape (default 4 on cuda, 1 on cpu)")
    ap.add_argument("--llama-seq-len", type=positive_int, default=None, help="prompt length of the 7B shape "
                    "(default 512 on cuda, 256 on cpu)")
    ap.add_argument("--output", type=user_path, default=None, help="also write all results as JSON here (after "
                    "every measurement, so a run cut short keeps what it measured)")
    args = ap.parse_args(argv)
    if args.output:
        try:
            check_output(args.output)
        except ConfigError as e:
            ap.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        ap.error(f"--device {args.device}, but this torch sees no CUDA device")  # before building 7B parameters
    dtype = torch.bfloat16 if cuda else torch.float32
    sparsities, models = args.sparsities, args.models
    results = []
    lines = [HEADER]

    def bench(name, routed, vocab, seq, batch, decode, phases):
        for s in sparsities:
            use = s
            if args.routers and name.startswith("SmolLM2"):  # the trained routers decide (threshold calibrated)
                g = torch.Generator().manual_seed(1)
                ids = torch.randint(0, vocab, (batch, seq), generator=g).to(args.device)
                skipgpt.calibrate_threshold(routed, [{"input_ids": ids}], s)
                use = None
            r = measure_speed(routed, vocab, seq, batch, decode, args.repeats, sparsity=use)
            r.update(model=name, target=s)
            results.append(r)
            if args.output:
                write_json_atomic(args.output, results)  # whole or not at all: gpu.sh may stop the run
            for phase in phases:
                lines.append(row(name, f"b{batch} s{seq}", f"{s:.0%}", phase, r))
                print(lines[-1], flush=True)

    print(HEADER, flush=True)
    if "smollm2" in models or "smollm2-b1" in models:
        model, tok = skipgpt.load_model("smollm2-135m", dtype=dtype, device=args.device)
        routed = skipgpt.load_routers(model, args.routers) if args.routers else skipgpt.RoutedModel(model)
        if "smollm2" in models:
            bench("SmolLM2-135M", routed, len(tok), 512, 4, 32, ("prefill", "decode"))
        if "smollm2-b1" in models:  # decode of one sequence: a skipped module is skipped outright
            bench("SmolLM2-135M", routed, len(tok), 128, 1, 64, ("decode",))
        routed.unpatch()
        del model, routed
    if "llama7b" in models:
        layers = args.llama_layers or (32 if cuda else 4)
        model, vocab = llama7b_shaped(layers, dtype, args.device)
        routed = skipgpt.RoutedModel(model)
        seq = args.llama_seq_len or (512 if cuda else 256)
        for batch in args.llama_batches or ([4] if cuda else [1]):
            bench(f"LLaMA-2-7B shape, {layers} layers", routed, vocab, seq, batch, 16, ("prefill", "decode"))
    device = results[0]["device"] if results else args.device
    print(f"\ndevice: {device}; dtype {dtype}; repeats {args.repeats}; torch threads {torch.get_num_threads()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
