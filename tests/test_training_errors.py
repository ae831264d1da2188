"""Bad training input fails in one line and leaves the output directory as it was (nothing created)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from skipgpt import RoutedModel, load_model, save_routers
from skipgpt.training import trainer
from skipgpt.training.checkpoint import CHECKPOINT_NAME

from conftest import one_error_line, run_cli


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
            "--seq-len", "16", "--lora-targets", "q_proj,foo_proj"]
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


def test_other_bad_input_creates_no_output_folder(tmp_path, tiny_dir, capsys, monkeypatch):
    monkeypatch.setitem(trainer.REPORTER_MODULES, "wandb", ("skipgpt_test_absent_module",))  # wandb not installed
    (tmp_path / "empty.txt").write_text("")
    out = tmp_path / "out"
    cases = [
        (["--target-sparsity", "1.5"], "target sparsity"),
        (["--data", str(tmp_path / "missing.txt")], "does not exist"),
        (["--data", str(tmp_path / "empty.txt")], "no text found"),
        (["--val-sequences", "100000"], "need at least"),
        (["--val-sequences", "100000", "--max-tokens", "100000000"], "Give more text"),  # the cap is not the cause
        (["--max-tokens", "64"], "Give a larger --max-tokens (now 64)"),  # the text is long enough: the cap is not
        # the tiny model has 64 positions: the routers would have learned on positions it never saw
        (["--seq-len", "65"], "training sequences of 65 tokens exceed the model's maximum context of 64 tokens"),
        (["--data", "self", "--max-tokens", "64"], "sampled data ('self') is sized by self_sequences"),
        (["--routers", ""], "routers is empty"),  # an unset $R: fresh routers without a word
        (["--report-to", "wandb"], "needs the wandb package, which is not installed"),  # would log nothing
        (["--stage", "joint", "--lora-r", "100000"], "LoRA rank 100000 exceeds"),  # before: an allocator traceback
        (["--lora-alpha", "2000000"], "lora_alpha must be at most 1e+06"),  # saved, no loader would read it
    ]
    for extra, message in cases:
        assert run_cli([*common(tiny_dir, out), *extra]) == 2
        assert message in one_line_error(capsys)
        assert not out.exists(), extra


def test_an_empty_output_is_refused_not_the_working_folder(tmp_path, tiny_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an unset $OUT: the run's files went into the working folder
    assert run_cli([*common(tiny_dir, Path("x"))[:-1], ""]) == 2
    assert "output is empty" in one_line_error(capsys)
    assert not list(tmp_path.iterdir())


# -- a checkpoint that is not this run's as it wrote it --------------------------------------------------------


def first_param(tensors: dict) -> str:
    return sorted(k for k in tensors if k.startswith("param."))[0]


def with_tensor(key, make):
    """An edit of the checkpoint's tensors: `key` (a name, or a function of the tensors naming one) set to
    make(old value), or removed when make is None."""
    def edit(tensors: dict, meta: dict) -> None:
        name = key(tensors) if callable(key) else key
        old = tensors.pop(name, None)
        if make is not None:
            tensors[name] = make(old)
    return edit


def with_meta(key, value):
    """An edit of the checkpoint's JSON metadata: `key` set to `value`, or removed when value is None."""
    def edit(tensors: dict, meta: dict) -> None:
        meta.pop(key, None)
        if value is not None:
            meta[key] = value
    return edit


def with_base_lr(value):
    """An edit of the first optimizer group's base_lr (the trainer's schedule reads it at every step)."""
    def edit(tensors: dict, meta: dict) -> None:
        meta["param_groups"][0]["base_lr"] = value
    return edit


BAD_CHECKPOINTS = {
    # before: resumed without a word, from broadcast, cast, NaN or mis-shaped state
    "smaller parameter": (with_tensor(first_param, lambda v: v[..., :1].clone()), "is float32 (1,), this run's is"),
    "NaN parameter": (with_tensor(first_param, lambda v: torch.full_like(v, float("nan"))), "holds NaN"),
    "int parameter": (with_tensor(first_param, lambda v: v.long()), "is int64"),
    "moment of another shape": (with_tensor("opt.0.exp_avg", lambda v: torch.zeros(7)), "exp_avg is float32 (7,)"),
    "step past the run": (with_meta("step", 99), "step 99 is past the run's 2 steps"),
    # before: a traceback (KeyError, RuntimeError, ValueError, TypeError)
    "parameter of another shape": (with_tensor(first_param, lambda v: torch.zeros(3, 5)), "is float32 (3, 5)"),
    "moment missing": (with_tensor("opt.0.exp_avg_sq", None), "AdamW keeps"),
    "no RNG state": (with_tensor("rng.torch", None), "rng.torch is missing"),
    "short RNG state": (with_tensor("rng.torch", lambda v: v[:3].clone()), "rng.torch is missing or not"),
    "garbage RNG state": (with_tensor("rng.torch", lambda v: torch.full_like(v, 255)), "can resume from"),
    "optimizer key": (with_tensor("opt.x.exp_avg", lambda v: torch.zeros(1)), "unexpected tensor opt.x.exp_avg"),
    "no param_groups": (with_meta("param_groups", None), "param_groups is missing"),
    "param_groups of another run": (with_meta("param_groups", [{"lr": 1}]), "other parameters than this run's"),
    "lr not a number": (with_base_lr("x"), "optimizer base_lr is 'x'"),
    "step not a number": (with_meta("step", "x"), "step 'x' is not a whole number"),
    "history not a list": (with_meta("history", 5), "history is not a list"),
    "infinite threshold": (with_meta("threshold", float("inf")), "threshold inf is not a finite number"),
    # before: resumed, re-reading data the two processes had trained on (each step reads world x batch rows)
    "written by 2 processes": (with_meta("world", 2), "written by 2"),
}
# Checkpoints written before the process count was recorded resume as one process's.
ACCEPTED = {"as written": lambda tensors, meta: None, "no process count": with_meta("world", None)}


@pytest.fixture(scope="module")
def checkpoint(tiny_dir, tmp_path_factory) -> Path:
    """The checkpoint of a finished 2-step run (checkpointed after each step)."""
    out = tmp_path_factory.mktemp("checkpointed")
    assert run_cli([*common(tiny_dir, out), "--steps", "2", "--checkpoint-every", "1"]) == 0
    return out / CHECKPOINT_NAME


@pytest.mark.parametrize("case", [*ACCEPTED, *BAD_CHECKPOINTS, "metadata not an object"])
def test_a_checkpoint_that_does_not_fit_this_run_is_refused_in_one_line(case, checkpoint, tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with safe_open(str(checkpoint), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["state"])  # noqa: SIM118
    meta["step"], meta["history"] = 1, meta["history"][:1]  # so that the resumed run has a step to train
    argv = [*common(tiny_dir, out), "--steps", "2", "--checkpoint-every", "1", "--resume"]
    if case in ACCEPTED:
        ACCEPTED[case](tensors, meta)
        save_file(tensors, str(out / CHECKPOINT_NAME), metadata={"format": "skipgpt-train-state",
                                                                 "state": json.dumps(meta)})
        assert run_cli(argv) == 0
        assert "resuming from" in capsys.readouterr().out
        return
    if case == "metadata not an object":
        meta, message = [meta], "not a JSON object"  # before: AttributeError in the --resume option check
    else:
        edit, message = BAD_CHECKPOINTS[case]
        edit(tensors, meta)
    save_file(tensors, str(out / CHECKPOINT_NAME), metadata={"format": "skipgpt-train-state",
                                                             "state": json.dumps(meta)})
    before = snapshot(out)
    capsys.readouterr()
    assert run_cli(argv) == 2
    line = one_error_line(capsys.readouterr().err, "train", model_loaded=True)
    assert message in line and str(out / CHECKPOINT_NAME) in line
    assert snapshot(out) == before


def test_a_checkpoint_records_the_process_count(checkpoint):
    from skipgpt.training.checkpoint import read_metadata

    assert read_metadata(checkpoint)["world"] == 1


def test_a_fresh_run_into_an_unfinished_runs_folder_is_refused(checkpoint, tiny_dir, tmp_path, capsys):
    """Without --resume, a run into a folder whose checkpoint has steps left would overwrite its log at once and
    the checkpoint at its first save (before: it did); a finished run's folder may be trained into again."""
    finished = tmp_path / "finished"
    shutil.copytree(checkpoint.parent, finished)
    out = tmp_path / "out"
    out.mkdir()
    with safe_open(str(checkpoint), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["state"])  # noqa: SIM118
    meta["step"], meta["history"] = 1, meta["history"][:1]
    save_file(tensors, str(out / CHECKPOINT_NAME), metadata={"format": "skipgpt-train-state",
                                                             "state": json.dumps(meta)})
    (out / "train_log.csv").write_text("step,loss\n1,5.0\n")
    before = snapshot(out)
    argv = [*common(tiny_dir, out), "--steps", "2", "--checkpoint-every", "1"]
    capsys.readouterr()
    assert run_cli(argv) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert "unfinished run (step 1 of 2)" in line and "--resume" in line and str(out) in line
    assert snapshot(out) == before
    assert run_cli([*common(tiny_dir, finished), "--steps", "2", "--checkpoint-every", "1"]) == 0


def test_resume_may_change_the_forecaster_tuning_options(checkpoint, tiny_dir, tmp_path):
    """They act after the last router step, past every checkpoint; the forecaster NaN error says to lower
    --forecaster-lr (before: --resume refused both)."""
    out = tmp_path / "out"
    shutil.copytree(checkpoint.parent, out)
    argv = [*common(tiny_dir, out), "--steps", "2", "--checkpoint-every", "1", "--resume"]
    assert run_cli([*argv, "--forecaster-lr", "1e-4", "--forecaster-steps", "5"]) == 0


def test_resume_refuses_routers_whose_content_changed(tiny_dir, tmp_path, capsys):
    """Stage lora resumes under the routers it trained under: the checkpoint holds a digest of the --routers
    folder's files (before: only the path was compared)."""
    model, _ = load_model(str(tiny_dir / "model"))
    routers, out = tmp_path / "routers", tmp_path / "out"
    save_routers(RoutedModel(model), routers)
    argv = [*common(tiny_dir, out), "--stage", "lora", "--routers", str(routers), "--steps", "2",
            "--checkpoint-every", "1", "--no-calibrate"]
    assert run_cli(argv) == 0
    assert run_cli([*argv, "--resume"]) == 0  # the same routers
    retuned = RoutedModel(load_model(str(tiny_dir / "model"))[0])
    retuned.threshold = 1.5
    save_routers(retuned, routers)
    before = snapshot(out)
    capsys.readouterr()
    assert run_cli([*argv, "--resume"]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert "routers" in line and "changed" in line and str(routers) in line
    assert snapshot(out) == before


@pytest.mark.parametrize("option, value", [("seed", 5_000_000_000), ("seed", 2**64), ("seed", -1),
                                           ("lr", 10**400), ("target_sparsity", 10**400)],
                         ids=["seed 5e9", "seed 2**64", "seed -1", "lr of 401 digits", "target of 401 digits"])
def test_out_of_range_numbers_are_one_line_before_anything_is_written(option, value, tiny_dir, tmp_path, capsys):
    """Before: a traceback (OverflowError in validate, or in torch's seeding after the output was written)."""
    out = tmp_path / "out"
    (tmp_path / "c.yaml").write_text(f"{option}: {value}\n")
    for extra in (["--config", str(tmp_path / "c.yaml")], [f"--{option.replace('_', '-')}={value}"]):
        capsys.readouterr()
        assert run_cli([*common(tiny_dir, out), "--steps", "1", *extra]) == 2
        line = one_error_line(capsys.readouterr().err, "train")
        assert option.replace("_", " " if option == "target_sparsity" else "_") in line and len(line) < 300
        assert not out.exists()


def test_resume_refuses_a_model_whose_weights_changed(tiny_dir, tmp_path, capsys):
    """The checkpoint records the base model's fingerprint: the same --model folder holding other weights is refused
    (before: resumed onto them, compared by path only). Checkpoints from before the record resume unchecked."""
    from skipgpt.models.adapters import fingerprint

    shutil.copytree(tiny_dir / "model", tmp_path / "model")
    out = tmp_path / "out"
    argv = [*common(tiny_dir, out), "--model", str(tmp_path / "model"), "--steps", "2", "--checkpoint-every", "1"]
    assert run_cli(argv) == 0
    model, _ = load_model(str(tmp_path / "model"))
    trained_on = fingerprint(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    model.save_pretrained(tmp_path / "model")
    before = snapshot(out)
    capsys.readouterr()
    assert run_cli([*argv, "--resume"]) == 2
    line = one_error_line(capsys.readouterr().err, "train", model_loaded=True)
    assert f"fingerprint {fingerprint(model)}" in line and f"fingerprint {trained_on}" in line
    assert str(out / CHECKPOINT_NAME) in line and snapshot(out) == before
    with safe_open(str(out / CHECKPOINT_NAME), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["state"])  # noqa: SIM118
    del meta["base_fingerprint"]
    save_file(tensors, str(out / CHECKPOINT_NAME), metadata={"format": "skipgpt-train-state",
                                                             "state": json.dumps(meta)})
    assert run_cli([*argv, "--resume"]) == 0


@pytest.fixture(scope="module")
def baselines(tiny_dir, tmp_path_factory) -> Path:
    """Static and random baseline artifacts for the tiny model (their saved policies never ask the routers)."""
    from skipgpt.baselines.static import random_routing, static_routed

    root = tmp_path_factory.mktemp("baselines")
    keep = torch.ones(3, 2, dtype=torch.bool)
    keep[1] = False
    save_routers(static_routed(load_model(str(tiny_dir / "model"))[0], keep, "shortgpt", 0.3), root / "shortgpt")
    save_routers(random_routing(load_model(str(tiny_dir / "model"))[0], 0.2), root / "random")
    return root


@pytest.mark.parametrize("variant", ["shortgpt", "random"])
def test_routers_of_a_fixed_policy_baseline_are_not_trained(variant, baselines, tiny_dir, tmp_path, capsys):
    """Before: backward on a loss without grad_fn, a RuntimeError after loading the model and data, with
    train_config.yaml and train_log.csv left in the output. Stage lora trains LoRA under the baseline's policy."""
    from skipgpt.errors import ConfigError
    from skipgpt.training import TrainConfig, train

    out = tmp_path / "out"
    argv = [*common(tiny_dir, out), "--routers", str(baselines / variant), "--steps", "1", "--checkpoint-every", "0"]
    for stage in ("router", "joint"):
        capsys.readouterr()
        assert run_cli([*argv, "--stage", stage]) == 2
        line = one_error_line(capsys.readouterr().err, "train")
        assert f"'{variant}' baseline" in line and f"stage {stage}" in line and "--stage lora" in line
        assert not out.exists()
        with pytest.raises(ConfigError, match="never asks its routers"):
            train(TrainConfig(stage=stage, routers=str(baselines / variant), output=str(out)))
        assert not out.exists()
    assert run_cli([*argv, "--stage", "lora"]) == 0


def test_a_run_that_fails_at_its_first_step_leaves_a_finished_runs_folder_as_it_was(tmp_path, tiny_dir, capsys):
    out = tmp_path / "out"
    argv = [*common(tiny_dir, out), "--steps", "2", "--checkpoint-every", "1"]
    assert run_cli(argv) == 0
    before = snapshot(out)
    assert run_cli([*argv, "--alpha", "1e308"]) == 2  # an infinite loss at the first step
    err = one_line_error(capsys)
    # the checkpoint there is the earlier run's, which --resume would refuse for these options
    assert "NaN/inf at step 1" in err and "no checkpoint of this run was written" in err and "--alpha" in err
    assert snapshot(out) == before  # its config and log were rewritten before the first step


@pytest.mark.parametrize("blocked", ["train_log.csv", "train_config.yaml", "checkpoint.safetensors", "cache"])
def test_something_in_the_way_of_a_run_file_is_refused_before_the_model_loads(blocked, tmp_path, tiny_dir, capsys,
                                                                             monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    if blocked == "cache":  # sampled text is cached in a folder there
        (out / blocked).write_text("not a folder")
    else:
        (out / blocked).mkdir()
    before = snapshot(out)
    monkeypatch.setattr(trainer, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    extra = ["--data", "self", "--self-sequences", "4"] if blocked == "cache" else []
    assert run_cli([*common(tiny_dir, out), *extra]) == 2
    assert f"{out / blocked} is a {'file' if blocked == 'cache' else 'folder'}" in one_line_error(capsys)
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == [blocked]


def alias_bomb(levels: int = 9) -> str:
    """A few hundred bytes of YAML whose value, expanded, holds 9**levels strings."""
    value = '&a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]'
    for i in range(1, levels):  # each level: the one below, then 8 more references to it
        value = f"&a{i} [{value}, {', '.join([f'*a{i - 1}'] * 8)}]"
    return f"text_field: {value}\n"


@pytest.mark.parametrize("name, text, message", [
    # before: an error line of 226 MB, or (one level more) a MemoryError traceback after building it
    ("bomb.yaml", alias_bomb(), r"text_field must be a string, got \[\[\[\[...\], \[...\]"),
    ("twice.yaml", "steps: 3\nsteps: 5\n", "given twice"),  # before: steps 5, silently
    ("twice.json", '{"steps": 3, "steps": 5}', "given twice"),
    ("spellings.yaml", "seq_len: 32\nseq-len: 64\n", "option 'seq_len' is given twice"),  # before: 64 beat --seq-len
    ("no.yaml", "mixed_precision: no\n", r"got False \(quote it in a YAML file\)"),
])
def test_config_files_that_cannot_mean_one_thing_are_one_short_line(name, text, message, tiny_dir, tmp_path, capsys):
    path = tmp_path / name
    path.write_text(text)
    out = tmp_path / "out"
    assert run_cli([*common(tiny_dir, out), "--seq-len", "16", "--config", str(path)]) == 2
    line = one_line_error(capsys)
    assert len(line) < 400 and re.search(message, line), line
    assert not out.exists()


def test_config_and_routers_paths_are_read_as_a_shell_would(tiny_dir, tmp_path, capsys, monkeypatch):
    """--config "" (an unset $CFG) ran a default run; "~/c.yaml" and routers "~/r" were looked for literally."""
    out = tmp_path / "out"
    assert run_cli([*common(tiny_dir, out), "--config", ""]) == 2
    assert "--config: is empty" in capsys.readouterr().err
    model, _ = load_model(str(tiny_dir / "model"))
    save_routers(RoutedModel(model), tmp_path / "r")
    (tmp_path / "c.yaml").write_text("steps: 1\nroutersx: 1\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert run_cli([*common(tiny_dir, out), "--config", "~/c.yaml"]) == 2
    assert "unknown options ['routersx']" in one_line_error(capsys)  # the file was found and read
    (tmp_path / "c.yaml").write_text("steps: 1\nstage: lora\nrouters: ~/r\n")
    assert run_cli([*common(tiny_dir, out), "--config", "~/c.yaml"]) == 0
    assert (out / "adapter").is_dir()
