"""Dataclass configs that round-trip to JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

FORMAT_VERSION = 1

ROUTER_KINDS = ("linear", "mlp")
ROUTER_INPUTS = ("module", "layer")
ACCOUNTINGS = ("param", "module", "flop")
DTYPES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")  # names load_model takes for the base model
FORECASTERS = ("linear",)
MAX_LORA_SCALE = 1e6  # a LoRA rank or alpha beyond this is no adapter anyone trains: train and the loaders refuse it
# skip_config.json also lists the files of its run directory (written and checked by skipgpt.artifact).
FILES_KEY = "files"


@dataclass
class BaseModelInfo:
    """Identity of the base model a set of routers was trained on."""

    name: str = ""
    architecture: str = ""
    model_type: str = ""
    hidden_size: int = 0
    num_layers: int = 0
    fingerprint: str = ""


@dataclass
class SkipConfig:
    """How routers are built and used.

    router:        "linear" (the paper: hidden -> 2 logits) or "mlp" (hidden -> hidden/4 -> ReLU -> 2,
                   as the published code).
    router_input:  "module": each router reads its module's own input (attention: the layer input;
                   MLP: the residual after attention). "layer": both read the layer input, so both
                   decisions are known at the start of the layer.
    execute_bias:  initial logit margin for "execute", so training starts from the dense model.
    threshold:     inference-time shift: a module is skipped when skip_logit - execute_logit > threshold.
    forecaster_rank: 0 is the paper's plain skip (a skipped module adds nothing). R > 0 gives every
                   module a rank-R forecaster of its output from its normalised input, and a skipped
                   token gets x + forecast instead of x (informed skipping).
    forecaster:    the forecaster's kind: "linear" (a rank-R bottleneck, fitted in closed form).
    """

    router: str = "linear"
    router_input: str = "module"
    execute_bias: float = 2.0
    target_sparsity: float = 0.25
    accounting: str = "param"
    threshold: float = 0.0
    forecaster_rank: int = 0
    forecaster: str = "linear"
    base: BaseModelInfo = field(default_factory=BaseModelInfo)
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.router not in ROUTER_KINDS:
            raise ConfigError(f"router must be one of {ROUTER_KINDS}, got {self.router!r}")
        if self.router_input not in ROUTER_INPUTS:
            raise ConfigError(f"router_input must be one of {ROUTER_INPUTS}, got {self.router_input!r}")
        if self.accounting not in ACCOUNTINGS:
            raise ConfigError(f"accounting must be one of {ACCOUNTINGS}, got {self.accounting!r}")
        if self.forecaster not in FORECASTERS:
            raise ConfigError(f"forecaster must be one of {FORECASTERS}, got {self.forecaster!r}")
        rank = self.forecaster_rank
        if not whole_number(rank) or rank < 0:
            raise ConfigError(f"forecaster_rank must be a whole number >= 0 (0 = plain skip), got {rank!r}")
        check_sparsity(self.target_sparsity)
        if not finite_number(self.threshold):  # +-inf would execute or skip all
            raise ConfigError(f"threshold must be a finite number (skip iff skip - execute logit > threshold), "
                              f"got {shown(self.threshold)}")
        if not finite_number(self.execute_bias):
            raise ConfigError(f"execute_bias must be a finite number, got {shown(self.execute_bias)}")
        if not isinstance(self.extra, dict):
            raise ConfigError(f"extra must be a JSON object, got {self.extra!r}")
        for f in dataclasses.fields(BaseModelInfo):
            value = getattr(self.base, f.name)
            if not isinstance(value, type(f.default)) or isinstance(value, bool):
                raise ConfigError(f"base.{f.name} must be a {type(f.default).__name__}, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> SkipConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        version = data.get("format_version", FORMAT_VERSION)
        if not whole_number(version) or version < 1:
            raise ConfigError(f"{source}: format_version must be a whole number >= 1, got {version!r}")
        if version > FORMAT_VERSION:
            raise ConfigError(
                f"{source}: format_version {version} is newer than this skipgpt understands "
                f"({FORMAT_VERSION}); upgrade skipgpt"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {FILES_KEY})
        if unknown:
            raise ConfigError(f"{source}: unknown keys {unknown}")
        data = {k: v for k, v in data.items() if k != FILES_KEY}
        base = data.pop("base", None)
        base = {} if base is None else base
        base_known = {f.name for f in dataclasses.fields(BaseModelInfo)}
        if not isinstance(base, dict):
            raise ConfigError(f"{source}: 'base' must be a JSON object")
        if set(base) - base_known:
            raise ConfigError(f"{source}: unknown keys in 'base': {sorted(set(base) - base_known)}")
        try:
            return cls(base=BaseModelInfo(**base), **data)
        except (TypeError, ConfigError) as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, text: str, source: str = "config") -> SkipConfig:
        try:
            data = json.loads(text)
        except ValueError as e:  # JSONDecodeError, or an integer past Python's 4,300-digit limit
            raise ConfigError(f"{source}: not valid JSON ({e})") from None
        return cls.from_dict(data, source)

    @classmethod
    def load(cls, path: str | Path) -> SkipConfig:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a UTF-8 JSON file") from None
        return cls.from_json(text, source=str(path))


def whole_number(value: Any) -> bool:
    """An int that is not a bool (JSON's true is an int to isinstance)."""
    return isinstance(value, int) and not isinstance(value, bool)


def finite_number(value: Any) -> bool:
    """An int or float (not a bool) that a float holds finitely: not inf or NaN, nor an integer too large to
    convert (a JSON or YAML file can hold a 400-digit one, which math.isfinite refuses with OverflowError)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def shown(value: Any) -> str:
    """A refused value as an error line shows it, in a bounded length: hundreds of digits are no help there, and
    a few YAML aliases nested in a file of 300 bytes make a list whose full repr takes gigabytes."""
    huge = whole_number(value) and value.bit_length() > 100
    text = "an integer too large" if huge else _SHORT.repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


_SHORT = reprlib.Repr()  # (keyword arguments need Python 3.12)
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 3, 80, 80, 80
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 6


def check_sparsity(value: float, name: str = "target sparsity") -> float:
    """Sparsity targets are fractions in [0, 1); 1.0 would skip every module and leave no model."""
    if not finite_number(value):
        raise ConfigError(f"{name} must be a number, got {shown(value)}")
    if not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"{name} must be in [0, 1) as a fraction (e.g. 0.25 for 25%), got {value}")
    return float(value)
