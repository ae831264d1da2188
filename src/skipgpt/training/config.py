"""TrainConfig: every option of `skipgpt train`, as one dataclass that round-trips to JSON and YAML.

Each field's metadata holds its help text (and, for the string options, its choices); the command line
builds one flag per field from them (skipgpt.cli.common.add_field_flag)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import (
    ACCOUNTINGS,
    DTYPES,
    MAX_LORA_SCALE,
    ROUTER_INPUTS,
    ROUTER_KINDS,
    SkipConfig,
    check_sparsity,
    finite_number,
    shown,
    whole_number,
)
from ..errors import ConfigError
from ..io import expand_user

STAGES = ("router", "lora", "joint")
SCHEDULES = ("auto", "constant", "cosine")
REPORTERS = ("none", "tensorboard", "wandb")
PRECISIONS = ("no", "bf16", "fp16")
# Options that earlier versions had (and wrote into train_config.yaml): why each went (docs/RESULTS.md has the finding).
RETIRED = {"forecaster_distill": "KL tuning of the forecasters did not lift accuracy"}
SEED_LIMIT = 2**32  # micro_seed multiplies the seed by about 4e9: a larger one overflows torch's 64-bit seeds


# What each field annotation accepts (a YAML file can hold anything); inf and NaN are no option's value.
FIELD_TYPES = {
    "int": ("a whole number", whole_number),
    "float": ("a finite number", finite_number),
    "str": ("a string", lambda v: isinstance(v, str)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "list[str]": ("a list of names", lambda v: isinstance(v, str)
                  or isinstance(v, list) and all(isinstance(t, str) for t in v)),
}


@dataclass
class TrainConfig:
    """Options of one training run (stage 1 router tuning, stage 2 LoRA, or the joint ablation).

    Learning rates: `lr` is the router learning rate (stage "router" and the routers of "joint");
    `lora_lr` the LoRA learning rate (stage "lora" and the LoRA of "joint"). schedule "auto" is
    cosine decay for router tuning (no warmup) and cosine with 10% warmup when LoRA trains. A
    constant router lr degrades late in long runs (docs/RESULTS.md, "What did not help").
    distill: 0 trains on the language-model loss, 1 on the KL divergence from the frozen dense
    model's next-token distribution, values in between mix the two.
    noise_start / noise_end: scale of the Gumbel noise in the straight-through gates, annealed linearly
    like the temperature. The default 1 -> 0 explores early and ends on the deterministic argmax
    decisions that inference makes; the paper's constant noise is noise_end = 1, which trains routers
    for noisy decisions they never make at inference (docs/RESULTS.md, "What did not help").
    threshold_gain (stage lora): LoRA shifts the hidden states the frozen routers read, so their argmax
    sparsity drifts during stage 2 and the final recalibration then changes the decisions LoRA adapted
    to. A gain > 0 moves the threshold after every step by gain * (realised - target sparsity of the
    step's batch), so LoRA trains on the sparsity it is evaluated at. 0 keeps the threshold fixed.
    """

    stage: str = field(default="router", metadata={"choices": STAGES, "help": (
        "router: tune routers on the frozen model (stage 1). lora: LoRA under frozen routers from --routers "
        "(stage 2). joint: routers and LoRA together from step 0 (the paper's ablation)")})
    model: str = field(default="smollm2-135m", metadata={
        "help": "hub name, HF folder, .gguf file or the embedded alias smollm2-135m"})
    data: str = field(default="self", metadata={"help": (
        "training text: a .txt/.jsonl/.parquet file (WikiText .tokens/.raw read as .txt) or a folder of them "
        "(hidden files and folders skipped, copies refused), "
        "a Hugging Face dataset name (needs network), or 'self' = sequences sampled from the dense model itself "
        "(cached in OUTPUT/cache)")})
    text_field: str = field(default="text", metadata={
        "help": "field of .jsonl rows / column of .parquet files holding the text"})
    output: str = field(default="skipgpt-run", metadata={"help": (
        "directory receiving the router artifact, the PEFT adapter (OUTPUT/adapter, stages lora/joint), "
        "train_log.csv, train_config.yaml, train_summary.json, the resumable checkpoint and, with --data self, "
        "the sampled text (OUTPUT/cache)")})
    routers: str | None = field(default=None, metadata={
        "help": "router directory to start from (required for --stage lora, where these routers stay frozen)"})
    target_sparsity: float = field(default=0.25, metadata={
        "help": "fraction of the decoder to skip, in [0, 1), e.g. 0.25"})
    accounting: str = field(default="param", metadata={"choices": ACCOUNTINGS, "help": (
        "what sparsity counts: param = skipped decoder parameters per token (the paper's number), "
        "module = skipped modules, flop = skipped FLOPs")})
    alpha: float = field(default=8.0, metadata={
        "help": "weight of the sparsity regulariser alpha * |target - realised sparsity| (the paper: 8), "
                "a token-weighted mean over sequences (micro-batches then add up exactly)"})
    steps: int = field(default=150, metadata={
        "help": "optimizer steps of this stage (the temperature anneals over exactly these)"})
    seq_len: int = field(default=256, metadata={"help": "tokens per packed training sequence"})
    batch_size: int = field(default=2, metadata={"help": "sequences per micro-batch (per process)"})
    grad_accum: int = field(default=1, metadata={
        "help": "micro-batches per optimizer step; losses are normalised over the whole step"})
    lr: float = field(default=2e-3, metadata={"help": "router learning rate (AdamW)"})
    lora_lr: float = field(default=2e-4, metadata={"help": "LoRA learning rate (AdamW)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    schedule: str = field(default="auto", metadata={"choices": SCHEDULES, "help": (
        "learning-rate schedule: constant, or cosine decay to zero after a linear warmup; auto = "
        "cosine (a constant router lr degrades late in long runs)")})
    warmup_ratio: float | None = field(default=None, metadata={
        "help": "fraction of steps of linear warmup (default: 0 for router tuning, 0.1 when LoRA trains)"})
    temperature_start: float = field(default=5.0, metadata={
        "help": "Gumbel-softmax temperature at the first step (annealed linearly)"})
    temperature_end: float = field(default=1.0, metadata={"help": "Gumbel-softmax temperature at the last step"})
    noise_start: float = field(default=1.0, metadata={
        "help": "scale of the Gumbel noise at the first step (annealed linearly; 1 = standard Gumbel-softmax)"})
    noise_end: float = field(default=0.0, metadata={"help": (
        "scale of the Gumbel noise at the last step: 0 ends training on the argmax decisions that "
        "inference makes; 1 = the paper's constant noise")})
    distill: float = field(default=0.0, metadata={"help": (
        "0 = language-model loss, 1 = KL divergence from the frozen dense model's next-token "
        "distribution (costs one extra dense forward), in between = a mix")})
    threshold_gain: float = field(default=0.0, metadata={"help": (
        "stage lora: after every step move the inference threshold by GAIN * (realised - target "
        "sparsity), so LoRA trains at the sparsity it is evaluated at (LoRA shifts what the frozen "
        "routers read); 0 = fixed threshold")})
    router: str = field(default="linear", metadata={"choices": ROUTER_KINDS, "help": (
        "new routers: linear (the paper) or mlp (hidden -> hidden/4 -> 2, as the published code)")})
    router_input: str = field(default="module", metadata={"choices": ROUTER_INPUTS, "help": (
        "new routers: module = each router reads its module's input; layer = both read the layer input")})
    forecaster_rank: int = field(default=0, metadata={"help": (
        "new routers: 0 = the paper's plain skip; R > 0 = informed skipping, a rank-R forecaster per module "
        "stands in for it when skipped (fitted in closed form before and after router tuning)")})
    forecaster_steps: int = field(default=200, metadata={"help": (
        "informed skipping: after router tuning, train the forecasters for N steps on the training loss, "
        "routers frozen at their calibrated decisions and the base frozen; 0 = keep the closed-form fit")})
    forecaster_lr: float = field(default=5e-4, metadata={"help": "peak learning rate of those forecaster steps"})
    execute_bias: float = field(default=2.0, metadata={
        "help": "new routers: initial execute-logit margin, so training starts from the dense model"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha"})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout"})
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj", "gate_proj"], metadata={
        "help": "comma-separated module names that get LoRA"})
    val_sequences: int = field(default=8, metadata={
        "help": "packed sequences held out to calibrate the threshold and report held-out perplexity"})
    calibrate: bool = field(default=True, metadata={"help": (
        "after training, shift the inference threshold so argmax routing meets the target on held-out "
        "text (training under Gumbel noise skips more than argmax does)")})
    max_tokens: int | None = field(default=None, metadata={"help": "read at most this many tokens of the data"})
    self_sequences: int = field(default=64, metadata={
        "help": "with --data self: how many training sequences to sample from the model"})
    seed: int = field(default=0, metadata={"help": "seed of data order, Gumbel noise and self-sampled data"})
    checkpoint_every: int = field(default=50, metadata={
        "help": "write OUTPUT/checkpoint.safetensors every N steps (atomically); 0 = never"})
    resume: bool = field(default=False, metadata={"help": (
        "continue from OUTPUT/checkpoint.safetensors if present (identical result to an uninterrupted run); "
        "every other option must match the run that wrote it, except --checkpoint-every, --progress, "
        "--report-to, --calibrate, --forecaster-steps and --forecaster-lr, and so must the number of processes")})
    report_to: str = field(default="none", metadata={"choices": REPORTERS, "help": (
        "also log to tensorboard or wandb (the CSV log is always written)")})
    mixed_precision: str = field(default="no", metadata={"choices": PRECISIONS, "help": (
        "accelerate mixed precision (no, bf16, fp16)")})
    dtype: str = field(default="float32", metadata={"choices": DTYPES, "help": (
        "dtype the base model is loaded in")})
    progress: bool = field(default=True, metadata={"help": "show the progress bar"})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def choice(name: str, options: tuple) -> None:
            if getattr(self, name) not in options:
                raise ConfigError(f"{name} must be one of {options}, got {shown(getattr(self, name))}")

        check_sparsity(self.target_sparsity)  # first: its own message, for NaN too
        for f in dataclasses.fields(self):  # every value of its annotated type (None where the annotation allows)
            value, kind = getattr(self, f.name), str(f.type).removesuffix(" | None")
            what, ok = FIELD_TYPES.get(kind, ("", lambda v: True))
            if not ok(value) and not (value is None and kind != str(f.type)):
                # YAML reads an unquoted no/off/yes/on as a boolean (mixed_precision: no)
                hint = " (quote it in a YAML file)" if isinstance(value, bool) and kind == "str" else ""
                raise ConfigError(f"{f.name} must be {what}, got {shown(value)}{hint}")
        for f in dataclasses.fields(self):  # stage, accounting, schedule, router, ...: the choices in the metadata
            if "choices" in f.metadata:
                choice(f.name, f.metadata["choices"])
        for name in ("steps", "seq_len", "batch_size", "grad_accum", "val_sequences", "lora_r", "lora_alpha",
                     "self_sequences"):  # lora_alpha 0 would train nothing, a negative one flip LoRA's sign
            value = getattr(self, name)
            if value < 1:  # (whole numbers: checked with the types above)
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("lora_r", "lora_alpha"):  # an adapter the loaders would refuse (its scale is no real one)
            if getattr(self, name) > MAX_LORA_SCALE:
                raise ConfigError(f"{name} must be at most {MAX_LORA_SCALE:g}, got {getattr(self, name)}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ConfigError(f"seed must be a whole number in [0, 2**32), got {self.seed}")
        if self.seq_len < 2:
            raise ConfigError("seq_len must be at least 2 (one token predicts the next)")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be a positive integer (or unset: all the data), got {self.max_tokens}")
        if self.max_tokens is not None and self.data == "self":
            raise ConfigError("max_tokens reads part of a text; sampled data ('self') is sized by self_sequences")
        # an unset shell variable ($OUT, $R): an empty output would write into the working folder, empty routers
        # would start from fresh ones without a word
        if not self.output.strip():
            raise ConfigError("output is empty: name the folder the run writes")
        if self.routers is not None and not self.routers.strip():
            raise ConfigError("routers is empty: name a router folder, or leave the option out for new routers")
        rank = self.forecaster_rank
        if rank < 0:  # (a whole number: checked with the types above)
            raise ConfigError(f"forecaster_rank must be a whole number >= 0 (0 = plain skip), got {rank!r}")
        if self.forecaster_steps < 0:  # (a whole number: checked with the types above)
            raise ConfigError(f"forecaster_steps must be >= 0 (0 = closed-form fit only), got {self.forecaster_steps}")
        for name in ("alpha", "lr", "lora_lr", "forecaster_lr", "weight_decay", "threshold_gain"):
            value = getattr(self, name)
            if value < 0:  # (finite numbers: checked with the types above)
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
        # "q_proj, v_proj" from the command line, or a YAML list: blanks and spaces are slips either way
        targets = self.lora_targets.split(",") if isinstance(self.lora_targets, str) else self.lora_targets
        self.lora_targets = [t.strip() for t in targets if t.strip()]
        if not self.lora_targets:
            raise ConfigError("lora_targets must name at least one module (e.g. q_proj)")

    # -- derived ---------------------------------------------------------------------------------------------

    @property
    def trains_routers(self) -> bool:
        return self.stage in ("router", "joint")

    @property
    def trains_lora(self) -> bool:
        return self.stage in ("lora", "joint")

    def skip_config(self) -> SkipConfig:
        """The router design of fresh routers (routers loaded with --routers keep their own)."""
        return SkipConfig(router=self.router, router_input=self.router_input, execute_bias=self.execute_bias,
                          target_sparsity=self.target_sparsity, accounting=self.accounting,
                          forecaster_rank=self.forecaster_rank)

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
        odd = [k for k in data if not isinstance(k, str)]
        if odd:  # YAML reads an unquoted on/off/yes/no as true/false
            raise ConfigError(f"{source}: option names must be text, got {shown(odd[0])} (quote it)")
        fields = {f.name: str(f.type).removesuffix(" | None") for f in dataclasses.fields(cls)}
        data = {k.replace("-", "_"): v for k, v in data.items()}
        for name, why in RETIRED.items():  # train_config.yaml of earlier versions write them: null reads as absent
            if name in data and data.pop(name) is not None:
                raise ConfigError(f"{source}: option {name} was removed ({why}); drop it")
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f"{source}: unknown options {unknown}")
        for name, value in data.items():  # YAML 1.1 reads 5e-4 (no dot) as text: a number field takes it
            if fields[name] == "float" and isinstance(value, str):
                with contextlib.suppress(ValueError):
                    data[name] = float(value)
        try:
            return cls(**data)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Read a .yaml/.yml/.json file; `overrides` (e.g. explicit CLI flags) win over the file."""
        data = read_options(path)
        data.update(overrides or {})
        return cls.from_dict(data, source=str(path))


def read_options(path: str | Path) -> dict[Any, Any]:
    """The options of a .yaml/.yml/.json file as written (TrainConfig.from_dict checks names and values)."""
    path = expand_user(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if not path.is_file():  # a folder, or a FIFO whose read would block
        raise ConfigError(f"config file {path} is not a regular file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file (expected YAML or JSON options)") from None
    try:
        data = json.loads(text, object_pairs_hook=_unique) if path.suffix == ".json" else _yaml_options(text)
    except Exception as e:  # noqa: BLE001 - any parser error is a bad file
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({first})") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values")
    # seq-len and seq_len are one option: both in a file, the one read last won (over an explicit flag, too)
    twice = _twice([k.replace("-", "_") if isinstance(k, str) else k for k in data])
    if twice is not None:
        raise ConfigError(f"{path}: option {shown(twice)} is given twice")
    return dict(data)


def _twice(keys: list) -> Any:
    """The first key of `keys` that is there twice, or None."""
    return next((k for k in keys if keys.count(k) > 1), None)


def _unique(pairs: list[tuple[Any, Any]]) -> dict:
    """A JSON object whose keys all differ (json.loads keeps the last of two, silently)."""
    twice = _twice([k for k, _ in pairs])
    if twice is not None:
        raise ValueError(f"key {twice!r} given twice")
    return dict(pairs)


def _yaml_options(text: str) -> Any:
    """yaml.safe_load, refusing a mapping that gives one key twice (safe_load keeps the last, silently)."""
    import yaml  # only runs that read a config file pay for it

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            twice = _twice([k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)])
            if twice is not None:
                raise yaml.constructor.ConstructorError(None, None, f"key {twice!r} given twice", node.start_mark)
            return super().construct_mapping(node, deep)

    return yaml.load(text, Loader=UniqueKeys)  # noqa: S506 - a SafeLoader: no Python object is built
