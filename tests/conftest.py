"""Shared fixtures: tiny random models of each supported architecture, a tiny model folder with text,
the embedded SmolLM2, and the CLI run in-process."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from skipgpt import RoutedModel
from skipgpt.cli.main import main as cli_main

WORDS = "the a of and to in is was he she it they said time man day long house water old king go came".split()

TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def tiny_config(arch: str):
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**TINY)
    if arch == "mistral":
        return tf.MistralConfig(**TINY, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**TINY)
    if arch == "qwen3":
        return tf.Qwen3Config(**TINY, head_dim=8)
    if arch == "gemma2":
        return tf.Gemma2Config(**TINY, head_dim=8, query_pre_attn_scalar=8, sliding_window=16)
    raise ValueError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2"]


def make_tiny(arch: str = "llama", seed: int = 0, **overrides):
    """A tiny randomly initialised causal LM (fp32, eval mode) of the given architecture."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch)
    for key, value in overrides.items():
        setattr(config, key, value)
    config._attn_implementation = "eager" if arch == "gemma2" else "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init is tiny; scale weights up so modules matter and skipping changes the logits.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return model.eval()


def save_tiny_llama(folder, layers: int, max_positions: int = 256, with_special_ids: bool = False):
    """Save a tiny random Llama that speaks the SmolLM2 tokenizer (tokenizer saved beside it); returns it."""
    import transformers as tf

    from skipgpt.models.loading import resolve

    tok = tf.AutoTokenizer.from_pretrained(resolve("smollm2-135m")[0])
    torch.manual_seed(0)
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id) if with_special_ids else {}
    config = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                            **special)
    tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_llama():
    return make_tiny("llama")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, fp32; do not mutate its weights."""
    from skipgpt.models.loading import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama saved as an HF folder with the SmolLM2 tokenizer, plus a small text file."""
    root = tmp_path_factory.mktemp("tiny")
    save_tiny_llama(root / "model", layers=3, max_positions=64)
    rng = random.Random(0)
    (root / "text.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(1500)), encoding="utf-8")
    return root


def run_cli(argv: list[str]) -> int:
    """`skipgpt ...` in this process, through the real entry point (one-line errors, exit code 2)."""
    return cli_main(argv)


def linear_router_share(model: torch.nn.Module) -> float:
    """By hand: a Linear(hidden, 2) router before every attention and MLP, as inference runs it (its two rows
    folded into one: hidden + 1 parameters), over the parameters of the decoder layers (what routers charge every
    token they decide for)."""
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    decoder = sum(p.numel() for name, p in model.named_parameters() if ".layers." in name)
    return 2 * layers * (hidden + 1) / decoder


def varied_routers(seed: int = 1, model: torch.nn.Module | None = None) -> RoutedModel:
    """Tiny routed model whose routers make token-dependent decisions (fresh routers are constant)."""
    routed = RoutedModel(make_tiny("llama") if model is None else model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in routed.routers.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return routed


def with_random_forecasters(routed: RoutedModel, seed: int = 0) -> RoutedModel:
    """Forecasters with random weights, so a forecast changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in routed.forecasters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return routed


# -- what a user sees --------------------------------------------------------------------------------------

PROGRESS_BAR = re.compile(r"\d+%\|")  # a tqdm bar (transformers' weight loading): progress, not a message


def one_error_line(err: str, command: str, model_loaded: bool = False) -> str:
    """The one error line of `skipgpt COMMAND` in stderr `err` (asserted: no traceback, nothing else).

    model_loaded=False also refuses a progress bar: the error came before the model started loading."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not (model_loaded and PROGRESS_BAR.search(line))]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"skipgpt {command}: error: "), err
    return lines[0]


def snapshot(path: Path) -> object:
    """What is at `path` (nothing, a file's bytes, or a folder's files and bytes), to compare before/after."""
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def run_process(argv: list[str], umask: int | None = None, **env: str) -> subprocess.CompletedProcess:
    """`python -m skipgpt ARGV...` in a fresh process: its own exit status, stderr and umask."""
    environ = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **env)
    return subprocess.run([sys.executable, "-m", "skipgpt", *argv], env=environ, capture_output=True, text=True,
                          timeout=600, preexec_fn=None if umask is None else (lambda: os.umask(umask)))


@pytest.fixture
def readonly_dir(tmp_path):
    """An empty folder nothing can be written into: a read-only mount as root, a 0555 folder otherwise."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("root without the right to mount a read-only file system")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)
