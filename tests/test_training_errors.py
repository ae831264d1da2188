"""Bad training input fails in one line and leaves the output directory as it was (nothing created)."""

from __future__ import annotations

from pathlib import Path

from skipgpt import RoutedModel, load_model, save_routers
from skipgpt.training.checkpoint import CHECKPOINT_NAME

from conftest import run_cli


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error printed"
    assert err[-1].startswith("skipgpt train: error:")
    return err[-1]


def common(tiny_dir: Path, out: Path) -> list[str]:
    return ["train", "--model", str(tiny_dir / "model"), "--data", str(tiny_dir / "text.txt"), "--seq-len", "16",
            "--batch-size", "2", "--val-sequences", "4", "--no-progress", "--output", str(out)]


def test_lora_targets_matching_no_module_are_refused_before_anything_is_written(tmp_path, tiny_dir, capsys):
    out = tmp_path / "out"
    # "self" data would sample and cache text under the output folder: the check must come first.
    argv = ["train", "--model", str(tiny_dir / "model"), "--data", "self", "--output", str(out), "--no-progress",
            "--lora-targets", "q_proj,foo_proj"]
    assert run_cli([*argv, "--stage", "joint"]) == 2
    err = one_line_error(capsys)
    assert "foo_proj" in err and "q_proj" in err.split("choose from", 1)[1]
    assert not out.exists()

    routers = tmp_path / "routers"
    model, _ = load_model(str(tiny_dir / "model"))
    save_routers(RoutedModel(model), routers)
    assert run_cli([*argv, "--stage", "lora", "--routers", str(routers)]) == 2
    assert "foo_proj" in one_line_error(capsys)
    assert not out.exists()


def test_resume_with_other_options_names_them_and_changes_nothing(tmp_path, tiny_dir, capsys):
    out = tmp_path / "out"
    argv = [*common(tiny_dir, out), "--steps", "4", "--checkpoint-every", "2"]
    assert run_cli([*argv, "--steps", "2"]) == 0  # a checkpoint at step 2 of a 2-step run
    before = snapshot(out)
    assert CHECKPOINT_NAME in before
    assert run_cli([*argv, "--steps", "2", "--resume", "--lr", "0.01", "--seed", "3"]) == 2
    err = one_line_error(capsys)
    assert "lr 0.002 -> 0.01" in err and "seed 0 -> 3" in err and "steps" not in err
    assert snapshot(out) == before
    # The schedule depends on the total steps, so a different --steps is refused too.
    assert run_cli([*argv, "--resume"]) == 2
    assert "steps 2 -> 4" in one_line_error(capsys)
    assert snapshot(out) == before
    # Options that do not change the computation may differ.
    assert run_cli([*argv, "--steps", "2", "--resume", "--checkpoint-every", "1", "--progress"]) == 0


def test_other_bad_input_creates_no_output_folder(tmp_path, tiny_dir, capsys):
    (tmp_path / "empty.txt").write_text("")
    out = tmp_path / "out"
    cases = [
        (["--target-sparsity", "1.5"], "target sparsity"),
        (["--data", str(tmp_path / "missing.txt")], "does not exist"),
        (["--data", str(tmp_path / "empty.txt")], "no text found"),
        (["--seq-len", "512"], "need at least"),
    ]
    for extra, message in cases:
        assert run_cli([*common(tiny_dir, out), *extra]) == 2
        assert message in one_line_error(capsys)
        assert not out.exists(), extra
