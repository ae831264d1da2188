"""Two-stage SkipGPT training: router tuning on a frozen model, then optional LoRA (or both jointly).

    from skipgpt.training import TrainConfig, train
    result = train(TrainConfig(stage="router", data="self", target_sparsity=0.25, steps=150))
    result.routed, result.summary   # routed model with a calibrated threshold, held-out numbers
"""

from .config import TrainConfig
from .lora import attach_lora, merge_lora
from .trainer import TrainingError, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingError", "attach_lora", "merge_lora", "train"]
