"""A few-minute router tuning on the embedded SmolLM2-135M with self-sampled text (no corpus needed)."""

from __future__ import annotations

from .config import TrainConfig
from .trainer import TrainResult, train


def quick_tune(
    target_sparsity: float = 0.25,
    steps: int = 120,
    seq_len: int = 128,
    batch_size: int = 2,
    sequences: int = 48,
    distill: float = 1.0,
    output: str = "skipgpt-demo",
    model: str = "smollm2-135m",
    progress: bool = True,
    seed: int = 0,
) -> TrainResult:
    """Tune routers to `target_sparsity` on `sequences` texts the dense model writes itself, then calibrate.

    Distillation (KL to the dense model) is the default because it beat the LM loss at 25% in the
    project's earlier SmolLM2 measurements (docs: method notes). Returns a TrainResult:
    `.routed` (ready for generate/eval, argmax routing), `.summary` (held-out sparsity and
    perplexity against dense), `.tokenizer`; the router artifact and CSV log are in `output`.
    """
    cfg = TrainConfig(stage="router", model=model, data="self", target_sparsity=target_sparsity, steps=steps,
                      seq_len=seq_len, batch_size=batch_size, self_sequences=sequences, distill=distill,
                      output=output, progress=progress, seed=seed, checkpoint_every=0, val_sequences=4)
    return train(cfg)
