"""Router directories that skipgpt did not write as they are (edited, damaged, or made to harm): a save into
one never touches anything outside it, and a load refuses each in one clear error before changing the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from skipgpt import RoutedModel, SkipConfig, load_routers, save_routers
from skipgpt.artifact import (
    ADAPTER_DIR,
    CONFIG_NAME,
    FORECASTERS_NAME,
    WEIGHTS_NAME,
    apply_adapter,
    check_adapter,
    check_base,
)
from skipgpt.config import FILES_KEY
from skipgpt.errors import ArtifactError
from skipgpt.io import file_sha256
from skipgpt.training.lora import attach_lora, merge_lora

from conftest import make_tiny, snapshot, varied_routers

ADAPTER_WEIGHTS = f"{ADAPTER_DIR}/adapter_model.safetensors"


def edit_config(directory: Path, edit) -> None:
    """Change skip_config.json in place (the config is not among the files it lists)."""
    config = json.loads((directory / CONFIG_NAME).read_text())
    edit(config)
    (directory / CONFIG_NAME).write_text(json.dumps(config))


def rewrite(directory: Path, name: str, edit) -> None:
    """Replace the tensors of `name` with edit(tensors), and list the new file's sha256 as a save would: only
    the content is wrong, so the check under test is the one that must refuse it."""
    tensors = edit(load_file(directory / name))
    save_file(tensors, str(directory / name))
    edit_config(directory, lambda c: c[FILES_KEY].__setitem__(name, file_sha256(directory / name)))


def with_adapter(directory: Path) -> Path:
    """A stage-2 directory: routers and a LoRA adapter (rank 2 on q_proj) whose weights are not zero."""
    routed = varied_routers(1)
    attach_lora(routed, r=2, targets=["q_proj"])
    with torch.no_grad():
        for name, p in routed.model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    save_routers(routed, directory)
    return directory


def untouched(model: torch.nn.Module) -> bool:
    """No PEFT layer or config left in the model (a refused load must not half-apply an adapter)."""
    return not hasattr(model, "peft_config") and not any("lora" in n for n, _ in model.named_modules())


# -- saving into a directory whose config was edited --------------------------------------------------------


@pytest.mark.parametrize("listed", ["../victim.txt", "ABSOLUTE", "../other_run/model.bin", "."])
def test_a_save_removes_nothing_that_an_old_config_lists(tmp_path, listed):
    """The old config is input: a save into its directory must not remove what it names (before: '../x'
    removed every sibling of the directory, an absolute name removed the directory itself)."""
    project = tmp_path / "project"
    out = project / "out"
    out.mkdir(parents=True)
    (project / "victim.txt").write_text("precious")
    (project / "other_run").mkdir()
    (project / "other_run" / "model.bin").write_text("x")
    (out / "train_log.csv").write_text("log")
    name = str(project / "victim.txt") if listed == "ABSOLUTE" else listed
    (out / CONFIG_NAME).write_text(json.dumps({FILES_KEY: {name: "0" * 64}}))
    before = snapshot(project / "other_run"), snapshot(project / "victim.txt")

    save_routers(varied_routers(1), out)
    assert (snapshot(project / "other_run"), snapshot(project / "victim.txt")) == before
    assert (out / "train_log.csv").read_text() == "log"
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, "train_log.csv"])
    load_routers(make_tiny("llama"), out).unpatch()


def test_a_save_still_removes_stale_parts_of_its_own_and_only_links_not_their_targets(tmp_path):
    out = with_adapter(tmp_path / "out")
    (out / FORECASTERS_NAME).write_text("left by an older save")
    save_routers(varied_routers(1), out)  # no adapter now: the old one goes
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep.txt").write_text("keep")
    (out / ADAPTER_DIR).symlink_to(tmp_path / "elsewhere")
    save_routers(varied_routers(1), out)
    assert not (out / ADAPTER_DIR).exists() and (tmp_path / "elsewhere" / "keep.txt").read_text() == "keep"


@pytest.mark.parametrize("part", ["routers", "forecasters"])
def test_non_finite_weights_are_not_saved(tmp_path, part):
    """The loader refuses them: saving would leave a directory that cannot be loaded (before: written)."""
    routed = varied_routers(1, model=make_tiny("llama")) if part == "routers" else RoutedModel(
        make_tiny("llama"), SkipConfig(forecaster_rank=2))
    with torch.no_grad():
        next(iter(getattr(routed, part).parameters())).view(-1)[0] = float("inf")
    with pytest.raises(ArtifactError, match="NaN or infinite.*nothing was saved"):
        save_routers(routed, tmp_path / "r")
    assert not (tmp_path / "r").exists()


# -- loading: router weights and the config's routing -------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.float64])
def test_router_weights_of_other_dtypes_are_refused(tmp_path, dtype):
    """A bool weight would load as 1.0, an int one rounded: not the routers that were saved (before: loaded)."""
    save_routers(varied_routers(1), tmp_path / "r")
    rewrite(tmp_path / "r", WEIGHTS_NAME, lambda t: {k: (v * 3).to(dtype) for k, v in t.items()})
    with pytest.raises(ArtifactError, match=f"{str(dtype).removeprefix('torch.')}, not a float weight"):
        load_routers(make_tiny("llama"), tmp_path / "r")


@pytest.mark.parametrize("routing,field,value,message", [
    ("random", "skip_rates", float("nan"), "skip_rates holds NaN"),
    ("random", "skip_rates", 1.5, r"skip_rates holds values outside \[0, 1\]"),
    ("mod-d", "capacity", -0.1, r"capacity holds values outside \[0, 1\]"),
    ("mod-d", "thresholds", float("inf"), "thresholds holds NaN or infinite"),
    ("shortgpt", "keep", 0.5, "keep holds values other than true and false"),
])
def test_routing_tables_with_impossible_values_are_refused(tmp_path, routing, field, value, message):
    save_routers(varied_routers(1), tmp_path / "r")
    table = [[0.5, 0.5]] * 3 if field != "keep" else [[True, True]] * 3
    extra = {"routing": routing, "skip_rates": table, "capacity": table, "keep": table, "thresholds": table}
    extra[field] = [[value, table[0][1]]] * 3
    edit_config(tmp_path / "r", lambda c: c["extra"].update(extra))
    model = make_tiny("llama")
    with pytest.raises(ArtifactError, match=f"routing variant '{routing}' .*{message}"):
        load_routers(model, tmp_path / "r")
    edit_config(tmp_path / "r", lambda c: c["extra"].update({field: table}))  # in range: loads
    load_routers(model, tmp_path / "r").unpatch()


@pytest.mark.parametrize("version,message", [("1", "whole number >= 1, got '1'"), (-5, "whole number >= 1, got -5"),
                                             (True, "whole number >= 1, got True"), (2, "newer than this skipgpt")])
def test_format_versions_that_are_not_versions_are_named_as_such(tmp_path, version, message):
    save_routers(varied_routers(1), tmp_path / "r")
    edit_config(tmp_path / "r", lambda c: c.__setitem__("format_version", version))
    with pytest.raises(ArtifactError, match=message):
        load_routers(make_tiny("llama"), tmp_path / "r")


def test_other_weights_are_named_without_an_empty_model_name(tmp_path):
    save_routers(varied_routers(1), tmp_path / "r")
    edit_config(tmp_path / "r", lambda c: c["base"].__setitem__("name", ""))
    with pytest.raises(ArtifactError, match=r"different weights \(fingerprint ") as info:
        load_routers(make_tiny("llama", seed=1), tmp_path / "r")
    assert "(," not in str(info.value)


# -- loading: the stage-2 adapter ----------------------------------------------------------------------------


def nan_weights(t: dict) -> dict:
    return {k: torch.full_like(v, float("nan")) if "lora_B" in k else v for k, v in t.items()}


def wrong_shapes(t: dict) -> dict:
    return {k: torch.zeros(2, 3) if "lora_A" in k else v for k, v in t.items()}


def extra_layer(t: dict) -> dict:
    return {**t, "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32)}


def int_weights(t: dict) -> dict:
    return {k: v.to(torch.int32) for k, v in t.items()}


@pytest.mark.parametrize("edit,message", [
    (nan_weights, "NaN or infinite"),  # before: loaded, and every logit was NaN
    (wrong_shapes, r"has shape \(2, 3\), this model needs \(2, 32\)"),  # before: refused after injecting LoRA
    (extra_layer, "adapts model.layers.9.self_attn.q_proj, which this model does not have"),  # before: ignored
    (int_weights, "int32, not a float weight"),
])
def test_bad_adapter_weights_are_refused_before_the_model_is_changed(tmp_path, edit, message):
    directory = with_adapter(tmp_path / "r")
    rewrite(directory, ADAPTER_WEIGHTS, edit)
    model = make_tiny("llama")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    for lora in ("merge", "attach"):
        with pytest.raises(ArtifactError, match=message):
            load_routers(model, directory, lora=lora)
        assert untouched(model)
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, before)  # and no routing left patched in


def test_an_adapter_of_another_peft_method_is_refused(tmp_path):
    """Prompt tuning in DIR/adapter: before, merge_and_unload on the plain model raised AttributeError (a
    traceback), and IA3 loaded as if it were the run's LoRA."""
    from peft import IA3Config, PromptTuningConfig, get_peft_model

    directory = tmp_path / "r"
    save_routers(varied_routers(1), directory)
    for config in (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
                   IA3Config(task_type="CAUSAL_LM", target_modules=["q_proj", "down_proj"],
                             feedforward_modules=["down_proj"])):
        get_peft_model(make_tiny("llama"), config).save_pretrained(directory / ADAPTER_DIR)
        edit_config(directory, lambda c: c[FILES_KEY].update(
            {p.relative_to(directory).as_posix(): file_sha256(p) for p in (directory / ADAPTER_DIR).rglob("*")
             if p.is_file()}))
        with pytest.raises(ArtifactError, match=f"peft_type is '{config.peft_type.value}'.*LoRA adapters only"):
            check_adapter(directory / ADAPTER_DIR)
        model = make_tiny("llama")
        with pytest.raises(ArtifactError, match="LoRA adapters only"):
            load_routers(model, directory)
        assert untouched(model)


def test_an_adapter_that_replaces_a_routed_module_is_one_error(tmp_path):
    """modules_to_save wraps the whole MLP: the routed forward would run the stale one, so it is refused (before:
    a bare RuntimeError, a traceback on the command line), and before PEFT changes the caller's model (before:
    its q_proj LoRA merged and its MLPs swapped)."""
    from peft import LoraConfig, get_peft_model

    directory = tmp_path / "r"
    save_routers(varied_routers(1), directory)
    config = LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["mlp"])
    get_peft_model(make_tiny("llama"), config).save_pretrained(directory / ADAPTER_DIR)
    edit_config(directory, lambda c: c[FILES_KEY].update(
        {p.relative_to(directory).as_posix(): file_sha256(p) for p in (directory / ADAPTER_DIR).rglob("*")
         if p.is_file()}))
    for lora in ("attach", "merge"):  # refused before PEFT touches the model: merged, q_proj had changed
        model = make_tiny("llama")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ArtifactError, match=r"saves model.layers.0.mlp whole \(modules_to_save\)"):
            load_routers(model, directory, lora=lora)
        after = model.state_dict()
        assert untouched(model) and after.keys() == before.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
    # a module routing does not run (the LM head, saved whole for added tokens) is PEFT's business: applied
    adapter = tmp_path / "head"
    get_peft_model(make_tiny("llama"), LoraConfig(r=2, target_modules=["q_proj"],
                                                  modules_to_save=["lm_head"])).save_pretrained(adapter)
    routed = RoutedModel(make_tiny("llama"))
    apply_adapter(routed, adapter, merge=False)
    assert any("modules_to_save" in n for n, _ in routed.model.named_modules())


def test_an_adapter_whose_lora_pairs_disagree_is_refused_before_the_model_is_changed(tmp_path):
    """With a rank_pattern the rank is read from the weights: a B of another rank than its A, or a weight that is
    no matrix, failed inside PEFT after it had injected LoRA into the caller's model (or with an IndexError)."""
    directory = with_adapter(tmp_path / "r")
    config_path = directory / ADAPTER_DIR / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["rank_pattern"] = {"q_proj": 2}
    config_path.write_text(json.dumps(config))
    edit_config(directory, lambda c: c[FILES_KEY].__setitem__(f"{ADAPTER_DIR}/adapter_config.json",
                                                              file_sha256(config_path)))
    wider = lambda t: {k: torch.zeros(v.shape[0], 3) if "lora_B" in k else v for k, v in t.items()}  # noqa: E731
    scalar = lambda t: {k: torch.tensor(1.0) if "lora_A" in k else v for k, v in t.items()}  # noqa: E731
    for edit, message in ((wider, r"has shape \(32, 3\), this model needs \(32, 2\)"), (scalar, "not a matrix")):
        saved = load_file(directory / ADAPTER_WEIGHTS)
        rewrite(directory, ADAPTER_WEIGHTS, edit)
        model = make_tiny("llama")
        with pytest.raises(ArtifactError, match=message):
            load_routers(model, directory, lora="attach")
        assert untouched(model) and "forward" not in model.model.layers[0].__dict__
        rewrite(directory, ADAPTER_WEIGHTS, lambda t, saved=saved: saved)


def test_a_merged_adapter_is_not_saved_as_the_base_in_float16_either(tmp_path):
    """float16 weights are not fingerprinted, so a base with its adapter merged saved as if it were plain:
    reloaded, the routers ran on the base without the adapter."""
    directory = with_adapter(tmp_path / "r")
    routed = load_routers(make_tiny("llama").to(torch.float16), directory)  # merged
    with pytest.raises(ArtifactError, match="merged"):
        save_routers(routed, tmp_path / "again")
    assert not (tmp_path / "again").exists()
    trained = varied_routers(1)  # an adapter trained in Python and merged by merge_lora: the same
    trained.model.half()
    attach_lora(trained, r=2, targets=["q_proj"])
    merge_lora(trained)
    with pytest.raises(ArtifactError, match="merged"):
        save_routers(trained, tmp_path / "again")


def test_routers_loaded_onto_an_unsupported_model_name_the_difference():
    """The layer count is read last: a GPT-2 has no layers skipgpt can count (before: UnsupportedModelError)."""
    import transformers as tf

    save = varied_routers(1)
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=128, n_positions=64))
    with pytest.raises(ArtifactError, match="model type 'llama'.*model type 'gpt2'"):
        check_base(save.config, gpt2, "r")


def test_routers_of_a_model_with_layers_removed_load_back_onto_it(tmp_path):
    """A save records the layers the model runs; the load compared them with the config's count."""
    model = make_tiny("llama")
    del model.model.layers[2]
    routed = RoutedModel(model)
    save_routers(routed, tmp_path / "r")
    routed.unpatch()
    assert len(load_routers(model, tmp_path / "r").layers) == 2
    with pytest.raises(ArtifactError, match="layer count 2.*layer count 3"):
        load_routers(make_tiny("llama"), tmp_path / "r")


def test_a_config_that_is_not_a_regular_file_is_refused_without_reading_it(tmp_path):
    """A FIFO named skip_config.json blocked the load forever (an alarm fails the test rather than hang it)."""
    import os
    import signal

    directory = tmp_path / "r"
    directory.mkdir()
    os.mkfifo(directory / CONFIG_NAME)
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the load blocked on the FIFO"))
    signal.alarm(20)
    try:
        with pytest.raises(ArtifactError, match="not a regular file"):
            load_routers(make_tiny("llama"), directory)
    finally:
        signal.alarm(0)


def test_a_save_replaces_a_file_where_its_adapter_folder_goes(tmp_path):
    """A file named `adapter` in the folder: the save removed the old config and replaced the router weights,
    then failed to move the adapter folder in (NotADirectoryError), leaving a folder that did not load."""
    directory = tmp_path / "r"
    save_routers(varied_routers(1), directory)
    (directory / ADAPTER_DIR).write_text("in the way")
    with_adapter(directory)
    routed = load_routers(make_tiny("llama"), directory, lora="attach")
    assert hasattr(routed.model, "peft_config")


def test_a_load_that_fails_in_any_way_leaves_the_model_unrouted(tmp_path, monkeypatch):
    from skipgpt.routing import policies

    directory = tmp_path / "r"
    save_routers(varied_routers(1), directory)

    def broken(*args, **kwargs):
        raise RuntimeError("broken")

    monkeypatch.setattr(policies, "from_extra", broken)
    model = make_tiny("llama")
    with pytest.raises(RuntimeError):
        load_routers(model, directory)
    assert "forward" not in model.model.layers[0].__dict__
