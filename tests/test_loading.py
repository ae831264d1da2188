"""Model loading: local folders, GGUF files, the embedded alias, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from skipgpt.errors import SkipGPTError
from skipgpt.models import loading

from conftest import make_tiny


def test_local_folder_round_trip(tmp_path):
    model = make_tiny("qwen2")
    model.save_pretrained(tmp_path / "m")
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    source, gguf = loading.resolve(str(tmp_path / "m"))
    assert source == tmp_path / "m" and gguf is None


def test_half_precision_on_a_cpu_that_emulates_it_is_named_in_a_warning(tmp_path, monkeypatch, recwarn):
    from conftest import save_tiny_llama

    save_tiny_llama(tmp_path / "m", layers=2)
    slow = {torch.bfloat16}
    monkeypatch.setattr(loading, "_emulated", lambda dtype: dtype in slow)
    loading.load_model(str(tmp_path / "m"), dtype="bfloat16")
    loading.load_model(str(tmp_path / "m"), dtype="float32")
    slow.clear()  # a CPU with native bf16
    loading.load_model(str(tmp_path / "m"), dtype="bfloat16")
    said = [str(w.message) for w in recwarn if "native" in str(w.message)]
    assert len(said) == 1 and "--dtype bfloat16" in said[0] and "use float32" in said[0]


def test_bad_paths_give_clear_errors(tmp_path):
    with pytest.raises(SkipGPTError, match="does not exist"):
        loading.resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(SkipGPTError, match="does not exist"):
        loading.resolve("./no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SkipGPTError, match="no config.json"):
        loading.resolve(str(tmp_path / "empty"))
    with pytest.raises(SkipGPTError, match="dtype") as bad_dtype:
        loading.load_model("smollm2-135m", dtype="int3")
    assert "corrupt" not in str(bad_dtype.value)  # a bad option, not a damaged file


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPGPT_CACHE", str(tmp_path / "c"))
    assert loading.cache_dir() == tmp_path / "c"
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SKIPGPT_CACHE", "~/c")  # not a folder named "~" in the working directory
    assert loading.cache_dir() == tmp_path / "c"


def test_alias_cache_is_rebuilt_unless_made_from_this_file(tmp_path, monkeypatch):
    # before: any folder with a config.json passed for the converted alias (another model, an older package's
    # file), and a folder without one was converted into on every run and never replaced
    monkeypatch.setenv("SKIPGPT_CACHE", str(tmp_path))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    converted = []

    def convert(source, target):
        converted.append(target)
        target.mkdir(parents=True, exist_ok=True)
        (target / "config.json").write_text("{}")
        (target / loading.SOURCE_NAME).write_text(json.dumps(loading._source(source)))

    monkeypatch.setattr(loading, "_embedded_gguf", lambda alias: gguf)
    monkeypatch.setattr(loading, "_convert_gguf", convert)
    target = tmp_path / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    (target / "config.json").write_text('{"model_type": "llama"}')  # someone else's folder, no record
    assert loading.resolve("smollm2-135m") == (target, None) and len(converted) == 1
    loading.resolve("smollm2-135m")
    assert len(converted) == 1  # made from this file: reused
    gguf.write_bytes(b"GGUF" + bytes(80))  # the package shipped another file
    loading.resolve("smollm2-135m")
    assert len(converted) == 2


def test_a_damaged_hub_cache_is_one_line(monkeypatch):
    # before: any reader error of a hub name (here a damaged cached file) came out as a traceback
    import transformers

    def damaged(*args, **kwargs):
        raise ValueError("Error while deserializing header: incomplete metadata")

    monkeypatch.setattr(loading, "hub_problem", lambda name: None)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", damaged)
    with pytest.raises(SkipGPTError, match="Hugging Face cache"):
        loading.load_model("org/tiny")


@pytest.mark.slow
def test_alias_equals_the_gguf_it_was_converted_from(smollm2):
    """The cached plain LlamaForCausalLM gives the same logits as the GGUF loaded directly."""
    model, tok = smollm2
    gguf = loading._embedded_gguf("smollm2-135m")
    direct, _ = loading.load_model(str(gguf))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model.config, "quantization_config", None) is None
    batch = tok(["Once upon a time"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, direct(**batch).logits)
