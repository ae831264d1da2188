"""Model loading: local folders, GGUF files, the embedded alias, and clear errors."""

from __future__ import annotations

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
