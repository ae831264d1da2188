"""Router artifacts: round trip, and one clear error for each kind of bad input."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from skipgpt import RoutedModel, SkipConfig, load_routers, save_routers
from skipgpt.artifact import CONFIG_NAME, WEIGHTS_NAME
from skipgpt.errors import ArtifactError
from skipgpt.io import file_sha256

from conftest import make_tiny


def trained_like(model) -> RoutedModel:
    routed = RoutedModel(model, SkipConfig(router="mlp", target_sparsity=0.4))
    torch.manual_seed(7)
    for p in routed.routers.parameters():
        torch.nn.init.normal_(p, std=0.5)
    routed.threshold = 0.3
    return routed


@pytest.fixture
def saved(tmp_path):
    model = make_tiny("llama")
    routed = trained_like(model)
    save_routers(routed, tmp_path / "r")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = routed(input_ids=ids).logits
    decisions = routed.decisions()
    routed.unpatch()
    return tmp_path / "r", ids, logits, decisions


def test_round_trip_gives_identical_routing(saved):
    path, ids, logits, decisions = saved
    assert json.loads((path / CONFIG_NAME).read_text())["threshold"] == 0.3
    routed = load_routers(make_tiny("llama"), path)
    assert routed.config.router == "mlp" and routed.threshold == 0.3
    with torch.no_grad():
        again = routed(input_ids=ids).logits
    assert torch.equal(routed.decisions(), decisions)
    torch.testing.assert_close(again, logits, rtol=0, atol=0)


def test_missing_directory(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_routers(make_tiny("llama"), tmp_path / "nope")


def test_missing_config(saved):
    path = saved[0]
    (path / CONFIG_NAME).unlink()
    with pytest.raises(ArtifactError, match="no skip_config.json"):
        load_routers(make_tiny("llama"), path)


def test_missing_weights(saved):
    path = saved[0]
    (path / WEIGHTS_NAME).unlink()
    with pytest.raises(ArtifactError, match="routers.safetensors is missing"):
        load_routers(make_tiny("llama"), path)


def test_corrupt_weights(saved):
    path = saved[0]
    data = (path / WEIGHTS_NAME).read_bytes()
    (path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="corrupt or truncated"):
        load_routers(make_tiny("llama"), path)


def test_corrupt_config(saved):
    path = saved[0]
    (path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_routers(make_tiny("llama"), path)


@pytest.mark.parametrize("key, raw, message", [
    ("threshold", "1" + "0" * 400, "threshold must be a finite number.*got an integer too large"),
    ("target_sparsity", "1" + "0" * 400, "target sparsity must be a number, got an integer too large"),
    ("execute_bias", "9" * 5000, "not valid JSON"),  # past Python's 4,300-digit limit: json.loads' ValueError
    ("target_sparsity", "false", "target sparsity must be a number, got False"),
    ("base", "[]", "'base' must be a JSON object"),
])
def test_config_values_that_are_no_numbers_or_objects_are_artifact_errors(saved, key, raw, message):
    path = saved[0]
    cfg = json.loads((path / CONFIG_NAME).read_text())
    cfg[key] = "PLACEHOLDER"
    (path / CONFIG_NAME).write_text(json.dumps(cfg).replace('"PLACEHOLDER"', raw))
    with pytest.raises(ArtifactError, match=message):
        load_routers(make_tiny("llama"), path)


def test_config_from_a_newer_format(saved):
    path = saved[0]
    cfg = json.loads((path / CONFIG_NAME).read_text())
    cfg["format_version"] = 99
    (path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="newer than this skipgpt"):
        load_routers(make_tiny("llama"), path)


def test_other_weights_are_refused(saved):
    with pytest.raises(ArtifactError, match="different weights"):
        load_routers(make_tiny("llama", seed=1), saved[0])
    # the common HF step of resizing the embeddings (a pad token added) is named, with the way around it
    resized = make_tiny("llama")
    resized.resize_token_embeddings(resized.config.vocab_size + 8)
    with pytest.raises(ArtifactError, match=r"resized token embeddings.*check=False"):
        load_routers(resized, saved[0])
    # ...unless the user insists.
    load_routers(make_tiny("llama", seed=1), saved[0], check=False).unpatch()


def test_other_architecture_is_refused(saved):
    with pytest.raises(ArtifactError, match="layer count|hidden size|model type"):
        load_routers(make_tiny("qwen3"), saved[0])


def test_nan_weights_are_refused(tmp_path):
    # A run that diverged: not saved (the loader would refuse the directory)...
    routed = trained_like(make_tiny("llama"))
    with torch.no_grad():
        next(iter(routed.routers.parameters()))[..., 0] = float("nan")
    with pytest.raises(ArtifactError, match="NaN.*nothing was saved"):
        save_routers(routed, tmp_path / "r")
    assert not (tmp_path / "r").exists()
    # ...and such weights written by other means, with the file list matching them, are refused on load.
    save_routers(trained_like(make_tiny("llama")), tmp_path / "r")
    weights = {k: v.clone() for k, v in load_file(tmp_path / "r" / WEIGHTS_NAME).items()}
    next(iter(weights.values()))[..., 0] = float("nan")
    save_file(weights, str(tmp_path / "r" / WEIGHTS_NAME))
    config = json.loads((tmp_path / "r" / CONFIG_NAME).read_text())
    config["files"][WEIGHTS_NAME] = file_sha256(tmp_path / "r" / WEIGHTS_NAME)
    (tmp_path / "r" / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="NaN"):
        load_routers(make_tiny("llama"), tmp_path / "r", check=False)


def test_save_leaves_no_temporary_files(saved):
    assert sorted(p.name for p in saved[0].iterdir()) == [WEIGHTS_NAME, CONFIG_NAME]


def test_loaded_routers_route_deterministically_even_with_gradients_on(saved):
    """A loaded model is for inference: argmax routing, also outside torch.no_grad()."""
    path, ids, logits, decisions = saved
    routed = load_routers(make_tiny("llama"), path)
    routed(input_ids=ids)
    first = routed.decisions()
    routed(input_ids=ids)
    assert torch.equal(first, routed.decisions())
    assert torch.equal(first, decisions)


def test_a_model_whose_weights_changed_is_not_saved_as_the_routers_base(saved, tmp_path):
    """A LoRA adapter merged into the base (or weights edited) would be saved with the old base's identity: the
    routers would then load onto the plain base without a word and give other outputs."""
    from skipgpt.training import attach_lora, merge_lora

    routed = load_routers(make_tiny("llama"), saved[0])
    attach_lora(routed, r=2, targets=["q_proj"])
    with torch.no_grad():
        for name, p in routed.model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    save_routers(routed, tmp_path / "attached")  # the adapter is saved beside the routers
    merge_lora(routed)
    with pytest.raises(ArtifactError, match="no longer the base"):
        save_routers(routed, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    # routers paired with other weights on purpose (check=False) record those weights
    other = load_routers(make_tiny("llama", seed=1), saved[0], check=False)
    save_routers(other, tmp_path / "other")
    load_routers(make_tiny("llama", seed=1), tmp_path / "other").unpatch()


def test_attaching_and_loading_an_adapter_warns_nothing(saved, tmp_path):
    """PEFT reads a property transformers deprecates: a FutureWarning on every stage-2 run and load."""
    from skipgpt.training import attach_lora

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        routed = load_routers(make_tiny("llama"), saved[0])
        attach_lora(routed, r=2, targets=["q_proj"])
        save_routers(routed, tmp_path / "stage2")
        load_routers(make_tiny("llama"), tmp_path / "stage2", lora="attach")
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []


def test_float16_weights_load_routers_with_a_warning(saved):
    model = make_tiny("llama").half()
    with pytest.warns(UserWarning, match="float16"):
        routed = load_routers(model, saved[0])
    assert routed.threshold == 0.3
    with pytest.raises(ArtifactError, match="different weights"):  # other weights are still refused in float32
        load_routers(make_tiny("llama", seed=1), saved[0])


# -- adapters loaded with load_adapter (eval --lora DIR, and DIR/adapter of a stage-2 run) --------------------


def saved_adapter(folder, targets=("q_proj", "v_proj"), **model_options):
    """A LoRA adapter with non-zero weights on `targets` of make_tiny("llama", **model_options); returns `folder`."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, target_modules=list(targets), init_lora_weights=False)
    get_peft_model(make_tiny("llama", **model_options), config).save_pretrained(folder)
    return folder


def edit_adapter_config(folder, **fields) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(fields)
    (folder / "adapter_config.json").write_text(json.dumps(config))


def untouched(model, ids, logits) -> bool:
    """No PEFT layer or config left in `model`, and its output on `ids` is still `logits`."""
    with torch.no_grad():
        same = torch.equal(model(input_ids=ids).logits, logits)
    return same and not hasattr(model, "peft_config") and not any("lora" in n for n, _ in model.named_modules())


def plain_logits(model):
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return ids, model(input_ids=ids).logits


@pytest.mark.parametrize("fields, message", [
    ({"lora_alpha": "x"}, "lora_alpha .*holds 'x', not a number"),  # PEFT: TypeError (before: a traceback)
    ({"r": None}, "r .*holds None, not a whole number"),
    ({"target_modules": 5}, "cannot load the adapter"),
    ({"lora_alpha": float("nan")}, "holds nan"),  # before: loaded, every score NaN, exit status 0
    ({"lora_alpha": 1e30}, r"holds 1e\+30, not a number in \(0, 1e\+06\]"),  # before: loaded, nonsense scores
    ({"r": 0}, "holds 0, not a whole number"),
    ({"r": 2.0}, "holds 2.0, not a whole number"),
    ({"alpha_pattern": {"q_proj": -1}}, r"lora_alpha \(or alpha_pattern\) holds -1"),
    ({"rank_pattern": {"q_proj": True}}, r"r \(or rank_pattern\) holds True"),
    ({"use_dora": True}, "a DoRA adapter"),  # before: loaded without its magnitude vectors, with a warning
    # before: a TypeError or AttributeError inside PEFT (a traceback), or, for a string, LoRA layers left injected
    ({"modules_to_save": 5}, "modules_to_save is 5, not a list of names"),
    ({"modules_to_save": "mlp"}, "modules_to_save is 'mlp', not a list of names"),
    ({"alpha_pattern": "x"}, "alpha_pattern is 'x', not a map"),
    ({"rank_pattern": [2]}, r"rank_pattern is \[2\], not a map"),
], ids=["alpha text", "r null", "targets", "alpha nan", "alpha huge", "r 0", "r float", "alpha pattern",
        "rank pattern", "dora", "saved int", "saved text", "alpha pattern text", "rank pattern list"])
def test_an_adapter_config_that_cannot_be_this_adapter_is_an_artifact_error(fields, message, tmp_path):
    from skipgpt.artifact import load_adapter

    folder = saved_adapter(tmp_path / "lora")
    edit_adapter_config(folder, **fields)
    model = make_tiny("llama")
    ids, logits = plain_logits(model)
    with pytest.raises(ArtifactError, match=message):
        load_adapter(model, folder)
    assert untouched(model, ids, logits)


@pytest.mark.parametrize("edit, message", [
    ({"target_modules": ["v_proj"]}, r"q_proj\.lora_A\.weight would not be applied"),
    ({"layers_to_transform": [0]}, r"layers\.1\..*would not be applied"),
    ({"exclude_modules": ["q_proj"]}, r"q_proj\.lora_A\.weight would not be applied"),
    ({"target_modules": ["q_proj", "v_proj", "o_proj"]}, r"o_proj\.lora_A\.weight is not in the file"),
], ids=["fewer targets", "fewer layers", "excluded", "more targets"])
def test_an_adapter_whose_config_applies_it_elsewhere_than_its_weights_is_refused(edit, message, tmp_path):
    """PEFT injects what the config names and loads only the file's weights for those, without a word: before,
    an adapter on q and v with its config edited to v alone loaded without the q update (or, with an extra
    target, with a randomly initialised one)."""
    from skipgpt.artifact import load_adapter

    folder = saved_adapter(tmp_path / "lora")
    edit_adapter_config(folder, **edit)
    model = make_tiny("llama")
    ids, logits = plain_logits(model)
    for merge in (True, False):
        with pytest.raises(ArtifactError, match=message):
            load_adapter(model, folder, merge=merge)
        assert untouched(model, ids, logits)


def test_an_adapter_on_a_tied_lm_head_is_attached_but_not_merged(tmp_path):
    """Merging writes the lm_head update into the input embedding it shares its weight with, so the merged model
    computes something else than the adapter attached (before: merged without a word)."""
    from skipgpt.artifact import load_adapter

    folder = saved_adapter(tmp_path / "lora", ("q_proj", "lm_head"), tie_word_embeddings=True)
    model = make_tiny("llama", tie_word_embeddings=True)
    ids, logits = plain_logits(model)
    embedding = model.get_input_embeddings().weight.detach().clone()
    with pytest.raises(ArtifactError, match="lm_head.*input embedding.*lora='attach'"):
        load_adapter(model, folder)
    assert untouched(model, ids, logits)
    attached = load_adapter(model, folder, merge=False)
    assert torch.equal(attached.get_input_embeddings().weight, embedding)
