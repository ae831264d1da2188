"""`skipgpt train`: router tuning (stage 1), LoRA recovery (stage 2) or the joint ablation."""

from __future__ import annotations

import argparse
import dataclasses

HELP = {
    "stage": "router: tune routers on the frozen model (stage 1). lora: LoRA under frozen routers from --routers "
             "(stage 2). joint: routers and LoRA together from step 0 (the paper's ablation)",
    "model": "hub name, HF folder, .gguf file or the embedded alias smollm2-135m",
    "data": "training text: a .txt/.jsonl/.parquet file (WikiText .tokens/.raw read as .txt) or a folder of them, "
            "a Hugging Face dataset name "
            "(needs network), or 'self' = sequences sampled from the dense model itself (cached in OUTPUT/cache)",
    "text_field": "field of .jsonl rows / column of .parquet files holding the text",
    "output": "directory receiving the router artifact, the PEFT adapter (OUTPUT/adapter, stages lora/joint), "
              "train_log.csv, train_config.yaml and the resumable checkpoint",
    "routers": "router directory to start from (required for --stage lora, where these routers stay frozen)",
    "target_sparsity": "fraction of the decoder to skip, in [0, 1), e.g. 0.25",
    "attention_sparsity": "also hold the attention skip rate at this value (an extra alpha * |A - realised| term), "
                          "so the MLPs make up the rest of --target-sparsity; unset = the routers choose the split",
    "accounting": "what sparsity counts: param = skipped decoder parameters per token (the paper's number), "
                  "module = skipped modules, flop = skipped FLOPs",
    "alpha": "weight of the sparsity regulariser alpha * |target - realised sparsity| (the paper: 8)",
    "steps": "optimizer steps of this stage (the temperature anneals over exactly these)",
    "seq_len": "tokens per packed training sequence",
    "batch_size": "sequences per micro-batch (per process)",
    "grad_accum": "micro-batches per optimizer step; losses are normalised over the whole step",
    "lr": "router learning rate (AdamW)",
    "lora_lr": "LoRA learning rate (AdamW)",
    "weight_decay": "AdamW weight decay",
    "schedule": "learning-rate schedule: constant, or cosine decay to zero after a linear warmup; auto = "
                "cosine (a constant router lr degrades late in long runs)",
    "warmup_ratio": "fraction of steps of linear warmup (default: 0 for router tuning, 0.1 when LoRA trains)",
    "temperature_start": "Gumbel-softmax temperature at the first step (annealed linearly)",
    "temperature_end": "Gumbel-softmax temperature at the last step",
    "noise_start": "scale of the Gumbel noise at the first step (annealed linearly; 1 = standard Gumbel-softmax)",
    "noise_end": "scale of the Gumbel noise at the last step: 0 ends training on the argmax decisions that "
                 "inference makes; 1 = the paper's constant noise",
    "distill": "0 = language-model loss, 1 = KL divergence from the frozen dense model's next-token "
               "distribution (costs one extra dense forward), in between = a mix",
    "threshold_gain": "stage lora: after every step move the inference threshold by GAIN * (realised - target "
                      "sparsity), so LoRA trains at the sparsity it is evaluated at (LoRA shifts what the frozen "
                      "routers read); 0 = fixed threshold",
    "router": "new routers: linear (the paper) or mlp (hidden -> hidden/4 -> 2, as the published code)",
    "router_input": "new routers: module = each router reads its module's input; layer = both read the layer input",
    "router_norm": "new routers: none = the paper's linear map of the hidden state, rms = normalise its input "
                   "first, channel = divide each input channel by its RMS on the training text (set once)",
    "execute_bias": "new routers: initial execute-logit margin, so training starts from the dense model",
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA scaling alpha",
    "lora_dropout": "LoRA dropout",
    "lora_targets": "comma-separated module names that get LoRA",
    "val_sequences": "packed sequences held out to calibrate the threshold and report held-out perplexity",
    "calibrate": "after training, shift the inference threshold so argmax routing meets the target on held-out "
                 "text (training under Gumbel noise skips more than argmax does)",
    "max_tokens": "read at most this many tokens of the data",
    "self_sequences": "with --data self: how many training sequences to sample from the model",
    "seed": "seed of data order, Gumbel noise and self-sampled data",
    "checkpoint_every": "write OUTPUT/checkpoint.safetensors every N steps (atomically); 0 = never",
    "resume": "continue from OUTPUT/checkpoint.safetensors if present (identical result to an uninterrupted run); "
              "every other option must match the run that wrote it, except --checkpoint-every, --progress, "
              "--report-to and --calibrate",
    "report_to": "also log to tensorboard or wandb (the CSV log is always written)",
    "mixed_precision": "accelerate mixed precision (no, bf16, fp16)",
    "dtype": "dtype the base model is loaded in (float32, bfloat16, float16)",
    "progress": "show the progress bar",
}
CHOICES = {"stage": ("router", "lora", "joint"), "accounting": ("param", "module", "flop"),
           "schedule": ("auto", "constant", "cosine"), "router": ("linear", "mlp"), "router_input": ("module", "layer"),
           "router_norm": ("none", "channel", "rms"), "report_to": ("none", "tensorboard", "wandb"),
           "mixed_precision": ("no", "bf16", "fp16")}


def add_parser(sub) -> argparse.ArgumentParser:
    from ..training.config import TrainConfig

    p = sub.add_parser(
        "train",
        help="tune routers to a target sparsity (stage 1), recover with LoRA (stage 2), or train both jointly",
        description="Train SkipGPT routers. Stage 1 (--stage router) freezes the model and tunes only the routers "
        "on LM (or distillation) loss + alpha*|target - sparsity|, then calibrates the inference threshold on "
        "held-out text. Stage 2 (--stage lora --routers DIR) trains LoRA under those frozen routers. Every option "
        "can also be set in --config FILE.yaml (keys = option names with underscores); flags given on the command "
        "line win over the file.",
        epilog="Examples:\n  skipgpt train --data self --target-sparsity 0.25 --steps 150 --output runs/rt25\n"
        "  skipgpt train --stage lora --routers runs/rt25 --data corpus.jsonl --steps 500 --output runs/rt25-lora\n"
        "Many GPUs (DDP; FSDP/DeepSpeed via an `accelerate config` file):\n"
        "  accelerate launch -m skipgpt train --model meta-llama/Llama-2-7b-hf --data corpus/ --seq-len 4096 ...\n"
        "  torchrun --nproc-per-node 8 -m skipgpt train ...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None, metavar="FILE.yaml", help="YAML or JSON file of options")
    defaults = TrainConfig.__dataclass_fields__
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = defaults[f.name].default
        if default is dataclasses.MISSING:
            default = defaults[f.name].default_factory()
        shown = ",".join(default) if isinstance(default, list) else default
        text = f"{HELP[f.name]} (default: {shown})"
        if isinstance(default, bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
            continue
        kind = {int: int, float: float}.get(type(default), str)
        if f.name in ("warmup_ratio", "attention_sparsity"):
            kind = float
        if f.name in ("max_tokens",):
            kind = int
        p.add_argument(flag, dest=f.name, type=kind, default=None, choices=CHOICES.get(f.name), help=text)
    return p


def config_from_args(args: argparse.Namespace):
    from ..training.config import TrainConfig

    explicit = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                if getattr(args, f.name, None) is not None}
    if args.config:
        return TrainConfig.load(args.config, overrides=explicit)
    return TrainConfig.from_dict(explicit, source="command line")


def run(args: argparse.Namespace) -> int:
    from ..io import write_json_atomic
    from ..training import train

    cfg = config_from_args(args)
    result = train(cfg)
    s = result.summary
    print(f"saved routers to {result.output_dir}" + (" (+ adapter/)" if cfg.trains_lora else ""))
    hs = s["held_out_sparsity"]
    print(f"held-out: {cfg.accounting} sparsity {hs[cfg.accounting]:.1%} (attention {hs['attention']:.1%}, "
          f"mlp {hs['mlp']:.1%}) at threshold {s['threshold']:+.3f}; perplexity {s['held_out_ppl']:.2f} "
          f"vs dense {s['held_out_dense_ppl']:.2f}; {s['tokens_per_s']:.0f} tokens/s")
    write_json_atomic(result.output_dir / "train_summary.json", s)
    return 0
