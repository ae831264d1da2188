"""A run folder loads whole or not at all, and what skipgpt writes is shared as the user's umask says.

Cases 7 (file modes) and 8 (all-or-nothing run folders) of the "one-line error" issue."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from skipgpt import RoutedModel, load_model, load_routers, save_routers
from skipgpt import artifact as artifact_module
from skipgpt.artifact import ADAPTER_DIR, CONFIG_NAME, SAVE_PREFIX, WEIGHTS_NAME
from skipgpt.errors import ArtifactError
from skipgpt.io import save_safetensors_atomic, write_text_atomic
from skipgpt.training.lora import attach_lora

from conftest import make_tiny, one_error_line, run_cli, run_process, varied_routers


def routed_on(tiny_dir: Path, seed: int, lora: bool = False) -> RoutedModel:
    """Routers of one seed on the tiny model of tiny_dir; with a LoRA adapter whose weights are not zero."""
    model, _ = load_model(str(tiny_dir / "model"))
    routed = varied_routers(seed, model=model)
    if lora:
        attach_lora(routed, r=2, targets=("q_proj",))
        with torch.no_grad():
            for name, p in routed.model.named_parameters():
                if "lora_B" in name:
                    p.fill_(0.01 * seed)
    return routed


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


# -- 7. files get the user's umask ----------------------------------------------------------------------------


def test_7_every_file_and_folder_a_command_writes_follows_the_umask(tmp_path, tiny_dir):
    out, text = tmp_path / "run", str(tiny_dir / "text.txt")
    proc = run_process(["train", "--stage", "joint", "--model", str(tiny_dir / "model"), "--data", text,
                        "--steps", "1", "--seq-len", "16", "--val-sequences", "4", "--lora-targets", "q_proj",
                        "--lora-r", "2", "--no-progress", "--output", str(out)], umask=0o022)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    proc = run_process(["eval", "--model", str(tiny_dir / "model"), "--routers", str(out), "--task",
                        f"wikitext2={text}", "--limit", "1", "--seq-len", "16", "--no-progress",
                        "--output", str(tmp_path / "results" / "e.json")], umask=0o022)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = {**modes(out), **modes(tmp_path / "results")}
    expected = {name: 0o755 if (out / name).is_dir() or name == "." or (tmp_path / "results" / name).is_dir()
                else 0o644 for name in found}
    assert found == expected
    assert {"routers.safetensors", "skip_config.json", "checkpoint.safetensors", "train_log.csv",
            "train_config.yaml", "train_summary.json", "e.json"} <= set(found)


def test_7_a_tighter_umask_is_followed_too(tmp_path):
    mask = os.umask(0o077)
    try:
        save_routers(RoutedModel(make_tiny("llama")), tmp_path / "r")
        save_safetensors_atomic(tmp_path / "r" / "checkpoint.safetensors", {"x": torch.zeros(2)})
    finally:
        os.umask(mask)
    assert set(modes(tmp_path / "r").values()) == {0o700, 0o600}


def test_7_the_model_cache_folder_follows_the_umask(tmp_path, tiny_dir, monkeypatch):
    """The GGUF conversion behind the embedded alias, with the slow GGUF reading stubbed by the tiny model."""
    import transformers

    from skipgpt.models import loading

    tiny = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir / "model")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    mask = os.umask(0o022)
    try:
        loading._convert_gguf(tmp_path / "x.gguf", tmp_path / "cache" / "models" / "tiny")
    finally:
        os.umask(mask)
    found = modes(tmp_path / "cache")
    assert found["models/tiny"] == 0o755 and found["models/tiny/model.safetensors"] == 0o644
    assert set(found.values()) == {0o755, 0o644}


def test_7_a_conversion_replaces_a_broken_cache_folder_and_what_killed_ones_left(tmp_path, tiny_dir, monkeypatch):
    # before: a folder without config.json stood for good (every run converted, then threw its work away and
    # failed), and a killed conversion's temporary folder (up to the model's size) was never removed
    import transformers

    from skipgpt.models import loading

    tiny = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir / "model")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
    gguf, target = tmp_path / "x.gguf", tmp_path / "models" / "tiny"
    gguf.write_bytes(b"GGUF")
    target.mkdir(parents=True)
    (target / "junk").write_text("an interrupted copy")
    stale, live = tmp_path / "models" / ".tiny.old12345", tmp_path / "models" / ".tiny.new12345"
    for folder in (stale, live):
        folder.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    loading._convert_gguf(gguf, target)
    assert (target / "config.json").is_file() and not (target / "junk").exists()
    assert loading._built_from(target) == loading._source(gguf)
    assert sorted(p.name for p in target.parent.iterdir()) == [live.name, "tiny"]  # a running conversion's stays


# -- 8. a run folder loads whole or not at all -------------------------------------------------------------


def state(routed: RoutedModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in routed.routers.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_8_new_routers_beside_the_old_config_do_not_load(tmp_path, tiny_dir, capfd):
    save_routers(routed_on(tiny_dir, 1), tmp_path / "old")
    save_routers(routed_on(tiny_dir, 2), tmp_path / "new")
    shutil.copy(tmp_path / "new" / WEIGHTS_NAME, tmp_path / "old" / WEIGHTS_NAME)  # a kill between two files
    with pytest.raises(ArtifactError, match="not the file skip_config.json was saved with"):
        load_routers(load_model(str(tiny_dir / "model"))[0], tmp_path / "old")
    capfd.readouterr()
    assert run_cli(["info", "--model", str(tiny_dir / "model"), "--routers", str(tmp_path / "old")]) == 2
    assert WEIGHTS_NAME in one_error_line(capfd.readouterr().err, "info")


@pytest.mark.parametrize("missing", [ADAPTER_DIR, f"{ADAPTER_DIR}/adapter_model.safetensors"])
def test_8_a_lora_folder_without_its_adapter_does_not_load(missing, tmp_path, tiny_dir, capfd):
    folder = tmp_path / "lora"
    save_routers(routed_on(tiny_dir, 1, lora=True), folder)
    load_routers(load_model(str(tiny_dir / "model"))[0], folder, lora="attach").unpatch()  # whole: loads
    target = folder / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(ArtifactError, match="incomplete"):
        load_routers(load_model(str(tiny_dir / "model"))[0], folder)
    capfd.readouterr()
    assert run_cli(["info", "--model", str(tiny_dir / "model"), "--routers", str(folder)]) == 2
    assert "adapter" in one_error_line(capfd.readouterr().err, "info")


def test_8_what_a_killed_save_left_is_removed_by_the_next_save(tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    left = [folder / f".{WEIGHTS_NAME}.k2j3h4ab.tmp", folder / f".{CONFIG_NAME}.x8y9_z01.tmp",
            folder / ".checkpoint.safetensors.q1w2e3r4.tmp"]  # the names mkstemp gives, from a write killed earlier
    for f in left:
        f.write_bytes(b"half a file")
        os.utime(f, (time.time() - 3600, time.time() - 3600))
    (folder / f"{SAVE_PREFIX}abc").mkdir()
    (folder / f"{SAVE_PREFIX}abc" / WEIGHTS_NAME).write_bytes(b"half a file")
    (folder / "notes.txt").write_text("the user's own file stays")
    save_routers(RoutedModel(make_tiny("llama")), folder)
    save_safetensors_atomic(folder / "checkpoint.safetensors", {"x": torch.zeros(2)})
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.safetensors", "notes.txt", WEIGHTS_NAME,
                                                        CONFIG_NAME]


def test_8_a_write_leaves_other_files_temporaries_and_live_ones_alone(tmp_path):
    # before: every ".results.*.tmp" went, another file's (".results.json.*") and a concurrent write's included
    other = tmp_path / ".results.json.abcd1234.tmp"
    live = tmp_path / ".results.abcd1234.tmp"
    for f in (other, live):
        f.write_text("being written")
    os.utime(other, (time.time() - 3600, time.time() - 3600))
    write_text_atomic(tmp_path / "results", "x")
    assert other.exists() and live.exists() and (tmp_path / "results").read_text() == "x"


class Killed(BaseException):
    """Stands in for SIGKILL at one point of a save (a real one is in the next test)."""


@pytest.mark.parametrize("point", ["while writing", "move 1", "move 2", "move 3 (the config)"])
def test_8_a_save_interrupted_anywhere_leaves_the_old_run_the_new_run_or_nothing_loadable(point, tmp_path, tiny_dir,
                                                                                          monkeypatch):
    folder = tmp_path / "run"
    old, new = routed_on(tiny_dir, 1), routed_on(tiny_dir, 2, lora=True)  # the new save adds an adapter
    save_routers(old, folder)
    moves = {"n": 0}
    real_replace = os.replace

    def replace(src, dst):
        moves["n"] += SAVE_PREFIX in str(src)  # the moves of the save, not other renames
        if point == f"move {moves['n']}" or point.startswith(f"move {moves['n']} "):
            raise Killed
        real_replace(src, dst)

    def settle(path):
        raise Killed

    monkeypatch.setattr(artifact_module.os, "replace", replace)
    if point == "while writing":
        monkeypatch.setattr(artifact_module, "settle", settle)
    with pytest.raises(Killed):
        save_routers(new, folder)
    monkeypatch.undo()

    try:
        loaded = load_routers(load_model(str(tiny_dir / "model"))[0], folder, lora="attach")
    except ArtifactError as e:
        assert point != "while writing" and "incomplete" in str(e)
    else:
        with_adapter = hasattr(loaded.model, "peft_config")
        assert (same(state(loaded), state(old)) and not with_adapter) or (same(state(loaded), state(new))
                                                                         and with_adapter)
        assert point == "while writing"  # the old run, untouched
    save_routers(new, folder)  # the next save completes and tidies up
    assert sorted(p.name for p in folder.iterdir()) == [ADAPTER_DIR, WEIGHTS_NAME, CONFIG_NAME]
    assert same(state(load_routers(load_model(str(tiny_dir / "model"))[0], folder)), state(new))


KILLED_SAVE = """
import os, signal, sys
from pathlib import Path
import torch
from skipgpt import artifact, load_model, save_routers
from conftest import varied_routers

folder, model = Path(sys.argv[1]), sys.argv[2]
save_routers(varied_routers(1, model=load_model(model)[0]), folder)
moves = []
def replace(src, dst):
    moves.extend([dst] if artifact.SAVE_PREFIX in str(src) else [])
    if len(moves) == 2:  # the routers are in place, the config is not
        os.kill(os.getpid(), signal.SIGKILL)
    os.rename(src, dst)
artifact.os.replace = replace
save_routers(varied_routers(2, model=load_model(model)[0]), folder)
"""


def test_8_sigkill_during_a_save_leaves_a_folder_that_refuses_to_load_in_one_line(tmp_path, tiny_dir, capfd):
    folder = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(folder), str(tiny_dir / "model")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert any(p.name.startswith(SAVE_PREFIX) for p in folder.iterdir())  # it really died mid-save
    capfd.readouterr()
    assert run_cli(["info", "--model", str(tiny_dir / "model"), "--routers", str(folder)]) == 2
    assert "incomplete" in one_error_line(capfd.readouterr().err, "info")
    save_routers(routed_on(tiny_dir, 3), folder)
    assert sorted(p.name for p in folder.iterdir()) == [WEIGHTS_NAME, CONFIG_NAME]


def test_8_a_full_disk_during_the_final_save_is_one_line_and_resume_completes_the_run(tmp_path, tiny_dir, capfd,
                                                                                    monkeypatch):
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_dir / "model"), "--data", str(tiny_dir / "text.txt"), "--seq-len", "16",
            "--val-sequences", "4", "--steps", "2", "--checkpoint-every", "1", "--no-progress", "--output", str(out)]

    def disk_full(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(artifact_module, "save_tensors", disk_full)
    capfd.readouterr()
    assert run_cli(argv) == 2
    assert "No space left on device" in one_error_line(capfd.readouterr().err, "train", model_loaded=True)
    assert not (out / CONFIG_NAME).exists() and not any(p.name.startswith(SAVE_PREFIX) for p in out.iterdir())
    monkeypatch.undo()
    assert run_cli([*argv, "--resume"]) == 0
    load_routers(load_model(str(tiny_dir / "model"))[0], out).unpatch()
