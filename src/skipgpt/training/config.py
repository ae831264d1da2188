"""TrainConfig: every option of `skipgpt train`, as one dataclass that round-trips to JSON and YAML."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ACCOUNTINGS, ROUTER_INPUTS, ROUTER_KINDS, ROUTER_NORMS, check_sparsity
from ..errors import ConfigError

STAGES = ("router", "lora", "joint")
SCHEDULES = ("auto", "constant", "cosine")
REPORTERS = ("none", "tensorboard", "wandb")
PRECISIONS = ("no", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Options of one training run (stage 1 router tuning, stage 2 LoRA, or the joint ablation).

    Learning rates: `lr` is the router learning rate (stage "router" and the routers of "joint");
    `lora_lr` the LoRA learning rate (stage "lora" and the LoRA of "joint"). schedule "auto" is
    cosine decay for router tuning (no warmup) and cosine with 10% warmup when LoRA trains. A
    constant router lr degrades late in long runs (docs/RESULTS.md, "Training on WikiText-2").
    distill: 0 trains on the language-model loss, 1 on the KL divergence from the frozen dense
    model's next-token distribution, values in between mix the two.
    noise_start / noise_end: scale of the Gumbel noise in the straight-through gates, annealed linearly
    like the temperature. The default 1 -> 0 explores early and ends on the deterministic argmax
    decisions that inference makes; the paper's constant noise is noise_end = 1, which trains routers
    for noisy decisions they never make at inference (docs/RESULTS.md, "Gumbel noise").
    threshold_gain (stage lora): LoRA shifts the hidden states the frozen routers read, so their argmax
    sparsity drifts during stage 2 and the final recalibration then changes the decisions LoRA adapted
    to. A gain > 0 moves the threshold after every step by gain * (realised - target sparsity of the
    step's batch), so LoRA trains on the sparsity it is evaluated at. 0 keeps the threshold fixed.
    attention_sparsity: None lets the routers split target_sparsity between attention and MLP as the
    loss prefers (the paper). A value adds a second term alpha * |attention_sparsity - realised
    attention skip rate|, so the MLPs make up the rest of the target. On SmolLM2-135M holding attention
    at 10% did worse than the routers' own split (docs/RESULTS.md, "Holding attention down").
    """

    stage: str = "router"
    model: str = "smollm2-135m"
    data: str = "self"
    text_field: str = "text"
    output: str = "skipgpt-run"
    routers: str | None = None
    target_sparsity: float = 0.25
    attention_sparsity: float | None = None
    accounting: str = "param"
    alpha: float = 8.0
    steps: int = 150
    seq_len: int = 256
    batch_size: int = 2
    grad_accum: int = 1
    lr: float = 2e-3
    lora_lr: float = 2e-4
    weight_decay: float = 0.0
    schedule: str = "auto"
    warmup_ratio: float | None = None
    temperature_start: float = 5.0
    temperature_end: float = 1.0
    noise_start: float = 1.0
    noise_end: float = 0.0
    distill: float = 0.0
    threshold_gain: float = 0.0
    router: str = "linear"
    router_input: str = "module"
    router_norm: str = "none"
    execute_bias: float = 2.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj", "gate_proj"])
    val_sequences: int = 8
    calibrate: bool = True
    max_tokens: int | None = None
    self_sequences: int = 64
    seed: int = 0
    checkpoint_every: int = 50
    resume: bool = False
    report_to: str = "none"
    mixed_precision: str = "no"
    dtype: str = "float32"
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def choice(name: str, options: tuple) -> None:
            if getattr(self, name) not in options:
                raise ConfigError(f"{name} must be one of {options}, got {getattr(self, name)!r}")

        choice("stage", STAGES)
        choice("accounting", ACCOUNTINGS)
        choice("schedule", SCHEDULES)
        choice("router", ROUTER_KINDS)
        choice("router_input", ROUTER_INPUTS)
        choice("router_norm", ROUTER_NORMS)
        choice("report_to", REPORTERS)
        choice("mixed_precision", PRECISIONS)
        check_sparsity(self.target_sparsity)
        if self.attention_sparsity is not None:
            a = self.attention_sparsity
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a < 1.0:
                raise ConfigError(f"attention_sparsity must be in [0, 1) (the attention skip rate), got {a!r}")
            if not self.trains_routers:
                raise ConfigError("attention_sparsity shapes router tuning; stage 'lora' keeps the routers frozen")
            if self.accounting == "flop":  # the attention share of FLOPs depends on the context length
                raise ConfigError("attention_sparsity needs accounting param or module")
        for name in ("steps", "seq_len", "batch_size", "grad_accum", "val_sequences", "lora_r", "self_sequences"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.seq_len < 2:
            raise ConfigError("seq_len must be at least 2 (one token predicts the next)")
        for name in ("alpha", "lr", "lora_lr", "weight_decay", "threshold_gain"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value != value or value < 0:
                raise ConfigError(f"{name} must be a non-negative number, got {value!r}")
        if not 0.0 <= self.distill <= 1.0:
            raise ConfigError(f"distill must be in [0, 1] (0 = LM loss, 1 = KL to the dense model), got {self.distill}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.warmup_ratio is not None and not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.temperature_start <= 0 or self.temperature_end <= 0:
            raise ConfigError("Gumbel temperatures must be positive")
        if self.noise_start < 0 or self.noise_end < 0:
            raise ConfigError("Gumbel noise scales must be >= 0 (1 = standard Gumbel-softmax, 0 = no noise)")
        if self.threshold_gain and self.stage != "lora":
            raise ConfigError("threshold_gain applies to stage 'lora' (frozen routers); when routers train, the "
                              "regulariser holds the sparsity")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0 (0 = never), got {self.checkpoint_every}")
        if isinstance(self.lora_targets, str):
            self.lora_targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        if not self.lora_targets:
            raise ConfigError("lora_targets must name at least one module (e.g. q_proj)")

    # -- derived ---------------------------------------------------------------------------------------------

    @property
    def trains_routers(self) -> bool:
        return self.stage in ("router", "joint")

    @property
    def trains_lora(self) -> bool:
        return self.stage in ("lora", "joint")

    def effective_schedule(self) -> tuple[str, float]:
        """(schedule, warmup ratio) after resolving "auto"."""
        sched = "cosine" if self.schedule == "auto" else self.schedule
        warmup = self.warmup_ratio if self.warmup_ratio is not None else (0.1 if self.trains_lora else 0.0)
        return sched, warmup

    # -- serialisation ---------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of option names to values")
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown options {unknown}")
        try:
            return cls(**data)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Read a .yaml/.yml/.json file; `overrides` (e.g. explicit CLI flags) win over the file."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as e:  # noqa: BLE001 - any parser error is a bad file
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({first})") from None
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of option names to values")
        data = dict(data)
        data.update(overrides or {})
        return cls.from_dict(data, source=str(path))
