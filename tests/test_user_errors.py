"""Every bad input a user can give is one line on stderr, exit status 2, before any work, nothing written.

One test (or group) per case of the "one-line error" issue, numbered as there; 7 and 8 (file modes,
all-or-nothing run folders) are in test_all_or_nothing.py, the fuzz test in test_cli_fuzz.py."""

from __future__ import annotations

import argparse
import ast
import errno
import importlib
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from skipgpt import RoutedModel, load_model, save_routers
from skipgpt.cli.main import build_parser
from skipgpt.errors import ConfigError
from skipgpt.io import check_output
from skipgpt.models.loading import _embedded_gguf
from skipgpt.training.checkpoint import CHECKPOINT_NAME, read_metadata
from skipgpt.training.data import data_digest

from conftest import make_tiny, one_error_line, run_cli, run_process, save_tiny_llama, snapshot

TRAIN = ["--seq-len", "16", "--batch-size", "2", "--val-sequences", "4", "--no-progress"]


def fails(capfd, argv: list[str], model_loaded: bool = False) -> str:
    """Run `skipgpt ARGV` in this process; assert exit status 2 and one error line; return the line."""
    capfd.readouterr()
    assert run_cli(argv) == 2
    return one_error_line(capfd.readouterr().err, argv[0], model_loaded)


@pytest.fixture(scope="module")
def routers(tiny_dir, tmp_path_factory) -> Path:
    """Routers saved for the tiny model of tiny_dir."""
    folder = tmp_path_factory.mktemp("routers") / "r"
    model, _ = load_model(str(tiny_dir / "model"))
    save_routers(RoutedModel(model), folder)
    return folder


# -- 1. output locations ------------------------------------------------------------------------------------


def test_1_an_output_that_is_a_file_or_a_folder_is_refused_before_the_model_loads(tmp_path, tiny_dir, routers,
                                                                                  capfd):
    model, text = str(tiny_dir / "model"), str(tiny_dir / "text.txt")
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    folder = tmp_path / "folder"
    folder.mkdir()
    cases = [
        (["train", "--model", model, "--data", text, "--output", str(afile), *TRAIN], "is a file"),
        (["analyze", "--model", model, "--routers", str(routers), "--text", text, "--output", str(afile)], "is a file"),
        (["eval", "--model", model, "--task", f"wikitext2={text}", "--output", str(folder)], "is a folder"),
        (["bench", "--model", model, "--output", str(folder)], "is a folder"),
        (["bench", "--model", model, "--output", str(afile / "b.json")], "is a file, not a folder"),
    ]
    for argv, message in cases:
        assert message in fails(capfd, argv), argv
    assert afile.read_text() == "keep me" and list(folder.iterdir()) == []


def test_1_an_output_over_or_inside_what_the_command_reads_is_refused(tmp_path, tiny_dir, routers, capfd):
    """eval and compare wrote their results over the task text they had just read, and eval into the router
    folder it evaluated (its skip_config.json replaced by the results), both with exit status 0. A result beside
    a run's files (a training run's folder is its router folder) is still written."""
    model = str(tiny_dir / "model")
    text = shutil.copy(tiny_dir / "text.txt", tmp_path / "wt.raw")
    mine = shutil.copytree(routers, tmp_path / "r")
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(tiny_dir / "text.txt", data / "train.txt")
    before = snapshot(tmp_path)
    task = ["--task", f"wikitext2={text}", "--seq-len", "16", "--no-progress"]
    cases = [
        ["eval", "--model", model, *task, "--output", str(text)],
        ["eval", "--model", model, "--routers", str(mine), *task, "--output", str(mine / "skip_config.json")],
        ["eval", "--model", model, *task, "--output", str(tiny_dir / "model" / "config.json")],
        ["compare", "--model", model, "--methods", "dense", *task[:2], "--output", str(text)],
        ["compare", "--model", model, "--methods", "dense,shortgpt", *task[:2], "--data", str(data), "--output",
         str(data / "c.json")],  # a data folder is read whole: a file written there would be trained on
        ["analyze", "--model", model, "--routers", str(mine), "--text", str(text), "--output", str(text)],
        ["bench", "--model", model, "--routers", str(mine), "--output", str(mine / "routers.safetensors")],
        # a run inside the data folder: its log, config and summary would be read as data by the next run
        ["train", "--model", model, "--data", str(data), "--output", str(data / "run"), *TRAIN],
    ]
    for argv in cases:
        assert "which this command reads" in fails(capfd, argv), argv
    assert snapshot(tmp_path) == before
    assert run_cli(["eval", "--model", model, "--routers", str(mine), *task, "--output", str(mine / "eval.json")]) == 0
    assert json.loads((mine / "eval.json").read_text())["tasks"]["wikitext2"]["ppl"] > 0


def test_1_an_output_on_a_read_only_mount_is_refused_before_the_model_loads(readonly_dir, tiny_dir, routers, capfd):
    model, text = str(tiny_dir / "model"), str(tiny_dir / "text.txt")
    cases = [
        ["train", "--model", model, "--data", text, "--output", str(readonly_dir / "run"), *TRAIN],
        ["analyze", "--model", model, "--routers", str(routers), "--text", text, "--output", str(readonly_dir / "a")],
        ["eval", "--model", model, "--task", f"wikitext2={text}", "--output", str(readonly_dir / "e.json")],
        ["bench", "--model", model, "--output", str(readonly_dir / "sub" / "b.json")],
    ]
    for argv in cases:
        line = fails(capfd, argv)
        assert str(readonly_dir) in line and ("read-only" in line or "not writable" in line), line
    assert list(readonly_dir.iterdir()) == []


def test_1_an_output_through_a_link_to_nowhere_is_refused_before_the_model_loads(tmp_path, tiny_dir, capfd):
    """A folder to create that is a dangling link: mkdir would meet it only after the work."""
    model, text = str(tiny_dir / "model"), str(tiny_dir / "text.txt")
    (tmp_path / "run").symlink_to(tmp_path / "gone")
    cases = [
        ["train", "--model", model, "--data", text, "--output", str(tmp_path / "run"), *TRAIN],
        ["train", "--model", model, "--data", text, "--output", str(tmp_path / "run" / "sub"), *TRAIN],
        ["eval", "--model", model, "--task", f"wikitext2={text}", "--output", str(tmp_path / "run" / "e.json")],
    ]
    for argv in cases:
        line = fails(capfd, argv)
        assert f"{tmp_path / 'run'} is a link to" in line and "does not exist" in line, line
    assert [p.name for p in tmp_path.iterdir()] == ["run"] and not (tmp_path / "gone").exists()


def test_1_an_output_where_nothing_can_be_created_is_refused_before_the_model_loads(tiny_dir, capfd, monkeypatch):
    """/proc passes os.access for root, and mkdir there fails: demo met it after sampling its data (a traceback).
    os.access passes everything here, so that the probe is what refuses, whoever runs the test."""
    import os

    monkeypatch.setattr(os, "access", lambda *args, **kwargs: True)
    model, text = str(tiny_dir / "model"), str(tiny_dir / "text.txt")
    cases = [
        ["train", "--model", model, "--data", text, "--output", "/proc/skipgpt-run", *TRAIN],
        ["eval", "--model", model, "--task", f"wikitext2={text}", "--output", "/proc/skipgpt-e.json"],
    ]
    for argv in cases:
        line = fails(capfd, argv)
        assert "cannot be written" in line and "/proc" in line, line
    with pytest.raises(ConfigError, match="nothing can be created in /proc"):  # what demo checks first
        check_output("/proc/skipgpt-demo", folder=True)


def test_1_an_empty_router_folder_or_output_is_refused_and_a_home_one_is_found(tiny_dir, routers, tmp_path, capfd,
                                                                     monkeypatch):
    """An unset $RUN in `--routers "$RUN"` evaluated the dense model with exit status 0; a quoted "~/r" was
    looked for as a folder named "~"."""
    model, text = str(tiny_dir / "model"), str(tiny_dir / "text.txt")
    task = ["--task", f"wikitext2={text}", "--seq-len", "16", "--no-progress"]
    assert "--routers: is empty" in fails(capfd, ["eval", "--model", model, "--routers", "", *task])
    assert "--lora: is empty" in fails(capfd, ["eval", "--model", model, "--lora", "", *task])  # was: no adapter
    assert "--text: is empty" in fails(capfd, ["analyze", "--model", model, "--routers", str(routers), "--text", "",
                                               "--output", str(tmp_path / "a")])  # was: "text file . is a folder"
    # an unset $OUT: analyze (like demo) wrote its figures into the working folder
    assert "--output: is empty" in fails(capfd, ["analyze", "--model", model, "--routers", str(routers), "--text",
                                                 text, "--output", ""])
    monkeypatch.setenv("HOME", str(routers.parent))
    assert run_cli(["info", "--model", model, "--routers", "~/" + routers.name]) == 0
    # a folder named ~x is read as typed, and a ~user nobody is is a missing folder, not a RuntimeError traceback
    shutil.copytree(routers, tmp_path / "~old")
    monkeypatch.chdir(tmp_path)
    assert run_cli(["info", "--model", model, "--routers", "./~old"]) == 0
    assert "does not exist" in fails(capfd, ["info", "--model", model, "--routers", "~nosuchuser-skipgpt/r"])
    # (as in a shell, a ~user nobody is stays a name: the result goes into a folder of that name)
    assert run_cli(["eval", "--model", model, *task, "--output", "~nosuchuser-skipgpt/e.json"]) == 0
    assert (tmp_path / "~nosuchuser-skipgpt" / "e.json").is_file()


def test_1_results_computed_are_printed_when_writing_them_fails_late(tmp_path, tiny_dir, capfd, monkeypatch):
    """The output was fine when checked; the disk filled up during the job: the numbers are not lost."""
    from skipgpt.cli import common

    def disk_full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(common, "write_json_atomic", disk_full)
    out = tmp_path / "e.json"
    text = tiny_dir / "text.txt"
    assert run_cli(["eval", "--model", str(tiny_dir / "model"), "--task", f"wikitext2={text}", "--limit", "1",
                    "--seq-len", "16", "--no-progress", "--output", str(out)]) == 2
    captured = capfd.readouterr()
    line = one_error_line(captured.err, "eval", model_loaded=True)
    assert "No space left on device" in line and "printed above" in line
    printed = json.loads(captured.out[captured.out.index("\n{") + 1:])  # after the markdown table
    assert printed["tasks"]["wikitext2"]["ppl"] > 0
    assert not out.exists()


# -- 2. a .gguf that is not GGUF ----------------------------------------------------------------------------


def bad_ggufs(folder: Path) -> dict[str, Path]:
    real = _embedded_gguf("smollm2-135m").read_bytes()[: 2 << 20]  # the header and part of the tensor index
    contents = {
        "text": b"this is a text file, not a model\n",
        "random": bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist()),
        "empty": b"",
        "truncated": real,
        "magic-only": b"GGUF",
        "garbage-header": b"GGUF" + bytes(range(256)) * 8,
    }
    paths = {}
    for name, data in contents.items():
        paths[name] = folder / f"{name}.gguf"
        paths[name].write_bytes(data)
    return paths


def test_2_a_gguf_that_is_not_gguf_is_one_line_for_train_and_info(tmp_path, tiny_dir, capfd):
    out = tmp_path / "out"
    for name, path in bad_ggufs(tmp_path).items():
        line = fails(capfd, ["info", "--model", str(path)])
        assert str(path.name) in line, (name, line)
        fails(capfd, ["train", "--model", str(path), "--data", str(tiny_dir / "text.txt"), "--output", str(out),
                      *TRAIN])
        assert not out.exists(), name


# -- 3. non-UTF-8 input -------------------------------------------------------------------------------------


def test_3_binary_data_and_config_files_are_one_line(tmp_path, tiny_dir, capfd):
    binary = bytes(range(128, 256)) * 16
    out = tmp_path / "out"
    for suffix in (".jsonl", ".txt"):
        data = tmp_path / f"x{suffix}"
        data.write_bytes(binary)
        line = fails(capfd, ["train", "--model", str(tiny_dir / "model"), "--data", str(data), "--output", str(out),
                             *TRAIN], model_loaded=True)
        assert "UTF-8" in line and str(data) in line
    for suffix in (".yaml", ".json"):
        config = tmp_path / f"x{suffix}"
        config.write_bytes(binary)
        line = fails(capfd, ["train", "--config", str(config), "--output", str(out)])
        assert "UTF-8" in line and str(config) in line
    assert not out.exists()


# -- 4. a skip_config.json with a threshold that is not a number ------------------------------------------


@pytest.mark.parametrize("threshold", ["abc", None, True, float("nan"), float("inf"), -float("inf")])
def test_4_a_bad_threshold_is_one_line_and_the_lora_run_writes_nothing(threshold, tmp_path, tiny_dir, routers,
                                                                       capfd):
    bad = tmp_path / "bad"
    shutil.copytree(routers, bad)
    config = json.loads((bad / "skip_config.json").read_text())
    config["threshold"] = threshold
    (bad / "skip_config.json").write_text(json.dumps(config))
    model, text = str(tiny_dir / "model"), str(tiny_dir / "text.txt")
    out = tmp_path / "lora"
    for argv in (["info", "--model", model, "--routers", str(bad)],
                 ["eval", "--model", model, "--routers", str(bad), "--task", f"wikitext2={text}", "--limit", "1"],
                 ["train", "--stage", "lora", "--model", model, "--routers", str(bad), "--data", text,
                  "--output", str(out), "--steps", "1", *TRAIN]):
        line = fails(capfd, argv)
        assert "threshold must be a finite number" in line and str(bad) in line, line
    assert not out.exists()


# -- 5. the base-model mismatch names no flag that does not exist -------------------------------------------


def flags_of(command: str) -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return {flag for action in sub._actions for flag in action.option_strings}


def test_5_the_base_mismatch_message_names_only_flags_that_exist(tmp_path, tiny_dir, capfd):
    other = tmp_path / "other"
    save_routers(RoutedModel(make_tiny("llama")), other)  # same shape, other weights
    model, text = str(tiny_dir / "model"), str(tiny_dir / "text.txt")
    for argv in (["info", "--model", model, "--routers", str(other)],
                 ["bench", "--model", model, "--routers", str(other), "--output", str(tmp_path / "b.json")],
                 ["analyze", "--model", model, "--routers", str(other), "--text", text,
                  "--output", str(tmp_path / "a")]):
        line = fails(capfd, argv, model_loaded=True)
        assert "different weights" in line
        named = set(re.findall(r"--[a-z][a-z0-9-]*", line))
        assert named <= flags_of(argv[0]), named - flags_of(argv[0])


def every_cli_flag() -> set[str]:
    """The flags of every command module in skipgpt.cli (registered or about to be)."""
    import skipgpt.cli

    flags = set()
    for info in pkgutil.iter_modules(skipgpt.cli.__path__):
        module = importlib.import_module(f"skipgpt.cli.{info.name}")
        if hasattr(module, "add_parser"):
            parser = module.add_parser(argparse.ArgumentParser().add_subparsers())
            flags |= {flag for action in parser._actions for flag in action.option_strings}
    return flags


def test_5_no_error_message_in_the_package_names_a_flag_that_no_command_has():
    """Every --flag written into a raised error exists on some command (it once advised --no-check-base)."""
    known = every_cli_flag() | {"--no-deps"}  # pip's, in the advice to install the embedded model
    named = {}
    for path in Path(__file__).parents[1].joinpath("src", "skipgpt").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise):
                for const in ast.walk(node):
                    if isinstance(const, ast.Constant) and isinstance(const.value, str):
                        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", const.value):
                            named.setdefault(flag, path.name)
    assert named, "the scan found no flags at all"
    assert {f: where for f, where in named.items() if f not in known} == {}


# -- 6. devices and threads ---------------------------------------------------------------------------------


def test_6_unknown_or_missing_devices_and_bad_threads_are_one_line(tmp_path, tiny_dir, capfd, monkeypatch):
    model, text = str(tiny_dir / "model"), str(tiny_dir / "text.txt")
    out = tmp_path / "b.json"
    evaluate = ["eval", "--model", model, "--task", f"wikitext2={text}", "--output", str(out)]
    bench = ["bench", "--model", model, "--output", str(out)]
    assert "not a torch device" in fails(capfd, [*bench, "--device", "tpu"])
    assert "not a torch device" in fails(capfd, [*evaluate, "--device", "tpu"])
    assert "--threads" in fails(capfd, [*bench, "--threads", "-1"])
    assert "--threads" in fails(capfd, [*bench, "--threads", "0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only build
    for device in ("cuda", "cuda:1"):
        assert "no CUDA device" in fails(capfd, [*evaluate, "--device", device])
        assert "no CUDA device" in fails(capfd, [*bench, "--device", device])
    assert not out.exists()


# -- 9. resume compares the data's content, not the spelling of its path ----------------------------------


def first_run(tmp_path, tiny_dir) -> tuple[Path, Path, list[str]]:
    data = tmp_path / "data" / "text.txt"
    data.parent.mkdir()
    shutil.copy(tiny_dir / "text.txt", data)
    out = tmp_path / "out"
    argv = ["train", "--model", str(tiny_dir / "model"), "--steps", "2", "--checkpoint-every", "1", "--output",
            str(out), *TRAIN]
    assert run_cli([*argv, "--data", str(data)]) == 0
    return data, out, argv


def test_9_resume_refuses_training_data_whose_content_changed(tmp_path, tiny_dir, capfd):
    data, out, argv = first_run(tmp_path, tiny_dir)
    assert read_metadata(out / CHECKPOINT_NAME)["data_sha256"] == data_digest(str(data))
    before = snapshot(out)
    data.write_text(data.read_text().replace("the", "a"))
    line = fails(capfd, [*argv, "--data", str(data), "--resume"])
    assert "changed" in line and str(data) in line
    assert snapshot(out) == before


def test_9_resume_accepts_the_same_data_under_another_path(tmp_path, tiny_dir, monkeypatch):
    data, out, argv = first_run(tmp_path, tiny_dir)
    monkeypatch.chdir(data.parent)
    assert run_cli([*argv, "--data", "text.txt", "--resume"]) == 0  # relative now, absolute before
    moved = tmp_path / "elsewhere.txt"
    shutil.copy(data, moved)
    assert run_cli([*argv, "--data", str(moved), "--resume"]) == 0  # another file with the same content


# -- 10. hub names offline, non-finite options, the summary of a resumed run --------------------------------


def test_10_an_unknown_hub_name_fails_at_once_in_one_line(tmp_path):
    # A closed local port stands in for "no network" (and for an unknown name on a machine that has one).
    proc = run_process(["info", "--model", "someone/no-such-model-xyz"], HF_ENDPOINT="http://127.0.0.1:9",
                       HF_HUB_CACHE=str(tmp_path / "hub"))
    assert proc.returncode == 2
    line = one_error_line(proc.stderr, "info")
    assert "someone/no-such-model-xyz" in line and "cache" in line


def test_10_a_hub_model_in_the_local_cache_loads_without_the_hub(tmp_path, tiny_dir):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny"
    shutil.copytree(tiny_dir / "model", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    proc = run_process(["info", "--model", "someone/tiny"], HF_ENDPOINT="http://127.0.0.1:9",
                       HF_HUB_CACHE=str(tmp_path / "hub"))
    assert proc.returncode == 0, proc.stderr
    assert "decoder layers: 3" in proc.stdout and "Retry" not in proc.stderr


def test_10_a_reader_that_leaves_ends_the_command_quietly(tiny_dir):
    """`skipgpt generate ... | head`: the streamed text met a closed pipe, and the user got a BrokenPipeError
    traceback and exit status 1. Now: nothing on stderr, and SIGPIPE's status as a shell reports it."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the command writes its first byte
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    command = [sys.executable, "-m", "skipgpt", "info", "--model", str(tiny_dir / "model")]
    proc = subprocess.run(command, stdout=write, stderr=subprocess.PIPE, env=env, text=True, timeout=600)
    os.close(write)
    assert proc.returncode == 141 and "Traceback" not in proc.stderr and "Error" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("flag,value", [("--lr", "inf"), ("--temperature-start", "nan"), ("--alpha", "-inf"),
                                        ("--noise-end", "nan"), ("--warmup-ratio", "nan")])
def test_10_non_finite_options_are_refused_before_the_model_loads(flag, value, tmp_path, tiny_dir, capfd):
    line = fails(capfd, ["train", "--model", str(tiny_dir / "model"), "--data", str(tiny_dir / "text.txt"),
                         "--output", str(tmp_path / "o"), f"{flag}={value}", *TRAIN])
    assert flag[2:].replace("-", "_") in line and "finite" in line
    assert not (tmp_path / "o").exists()


def test_10_the_summary_of_a_resumed_run_covers_the_whole_run(tmp_path, tiny_dir):
    _, out, argv = first_run(tmp_path, tiny_dir)
    meta = read_metadata(out / CHECKPOINT_NAME)
    assert run_cli([*argv, "--data", str(tmp_path / "data" / "text.txt"), "--resume"]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    tokens = 2 * 2 * 16  # steps x batch x seq_len, all trained before the resume
    assert summary["train_seconds"] >= meta["train_seconds"] > 0
    assert summary["tokens_per_s"] * summary["train_seconds"] == pytest.approx(tokens)


# -- 11. found in review: refused before any work, nothing written ---------------------------------------------


@pytest.mark.parametrize("text,why", [("123: 4\n", "must be text"), ("on: 3\n", "must be text"),
                                      ("seq_len: 1\n", "seq_len"), ("dtype: float64\n", "dtype")])
def test_11_config_files_with_odd_keys_or_values_are_one_line(text, why, tmp_path, tiny_dir, capfd):
    (tmp_path / "c.yaml").write_text(text)
    line = fails(capfd, ["train", "--config", str(tmp_path / "c.yaml"), "--model", str(tiny_dir / "model"),
                         "--output", str(tmp_path / "o")])
    assert why in line and not (tmp_path / "o").exists()


def test_11_a_config_file_takes_numbers_in_exponent_notation():
    from skipgpt.training import TrainConfig

    cfg = TrainConfig.from_dict({"lr": "5e-4", "lora_lr": "1E-3", "alpha": 2})  # YAML 1.1 reads 5e-4 as text
    assert (cfg.lr, cfg.lora_lr, cfg.alpha) == (5e-4, 1e-3, 2)
    with pytest.raises(Exception, match="lr must be a finite number"):
        TrainConfig.from_dict({"lr": "fast"})


@pytest.mark.parametrize("extra,why", [
    (["--methods", ""], "names no method"), (["--methods", " , "], "names no method"),
    (["--eval-seq-len", "1"], "at least 2"), (["--alpha", "-1"], "alpha"), (["--distill", "7"], "distill"),
    (["--seq-len", "1"], "seq_len"), (["--task", "ptb=missing.txt"], "no such file"),
    (["--task", "piqa=notes.txt"], "unsupported file type"), (["--output", "cmp.md"], "give the JSON's name"),
])
def test_11_compare_refuses_bad_settings_before_evaluating_the_dense_model(extra, why, tmp_path, tiny_dir, capfd,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not piqa")
    argv = ["compare", "--model", str(tiny_dir / "model"), "--task", "wikitext2=" + str(tiny_dir / "text.txt"),
            "--data", str(tiny_dir / "text.txt"), "--output", "cmp.json", *extra]
    before = sorted(p.name for p in tmp_path.iterdir())
    line = fails(capfd, argv)
    assert why in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no results, no artifacts folder


def test_11_compare_builds_each_target_in_its_own_folder(tmp_path):
    from skipgpt.baselines.compare import CompareSettings, artifact_dir

    s = CompareSettings(workdir=tmp_path)
    names = [artifact_dir(s, "skipgpt-rt", x).name for x in (0.25, 0.254, 0.4, 0.07)]
    assert names == ["skipgpt-rt-25", "skipgpt-rt-25.4", "skipgpt-rt-40", "skipgpt-rt-7"]


def test_11_a_tilde_in_an_output_is_the_home_folder(tmp_path, tiny_dir, monkeypatch, capfd):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    argv = ["eval", "--model", str(tiny_dir / "model"), "--task", "wikitext2=" + str(tiny_dir / "text.txt"),
            "--limit", "1", "--seq-len", "16", "--no-progress", "--output", "~/r.json"]
    assert run_cli(argv) == 0
    assert (tmp_path / "home" / "r.json").is_file() and not (tmp_path / "~").exists()


def test_11_a_stage_that_would_save_over_the_routers_it_starts_from_is_refused(tmp_path, tiny_dir, routers, capfd):
    folder = tmp_path / "r"
    shutil.copytree(routers, folder)
    before = snapshot(folder)
    line = fails(capfd, ["train", "--stage", "lora", "--model", str(tiny_dir / "model"), "--routers", str(folder),
                         "--data", str(tiny_dir / "text.txt"), "--output", str(folder), "--steps", "1", *TRAIN])
    assert "routers folder" in line and snapshot(folder) == before


def test_11_a_policy_table_of_the_wrong_shape_is_an_artifact_error(tmp_path, tiny_dir):
    from skipgpt import load_routers
    from skipgpt.errors import ArtifactError

    model, _ = load_model(str(tiny_dir / "model"))
    routed = RoutedModel(model)
    routed.config.extra.update(routing="shortgpt", keep=[[True, True]])  # one layer of three
    save_routers(routed, tmp_path / "r")
    with pytest.raises(ArtifactError, match=r"keep has shape \(1, 2\), the model needs \(3, 2\)"):
        load_routers(load_model(str(tiny_dir / "model"))[0], tmp_path / "r")


def test_11_small_refusals_name_the_problem(tmp_path, tiny_dir, routers, capfd):
    from skipgpt.training import TrainConfig

    with pytest.raises(Exception, match="max_tokens must be a positive integer"):
        TrainConfig(max_tokens=0)
    line = fails(capfd, ["eval", "--model", str(tiny_dir / "model"), "--task", "wikitext2", "--dtype", "float64"])
    assert "invalid choice: 'float64'" in line
    line = fails(capfd, ["analyze", "--model", str(tiny_dir / "model"), "--routers", str(routers), "--text",
                         str(tmp_path), "--output", str(tmp_path / "figs")])
    assert "is a folder" in line and not (tmp_path / "figs").exists()


def test_11_analyze_names_a_text_that_is_not_a_regular_file(tmp_path, tiny_dir, routers, capfd):
    line = fails(capfd, ["analyze", "--model", str(tiny_dir / "model"), "--routers", str(routers), "--text",
                         "/dev/null", "--output", str(tmp_path / "figs")])
    assert "/dev/null is not a regular file" in line and not (tmp_path / "figs").exists()


def test_11_an_empty_data_source_is_refused_not_read_as_the_working_folder(tmp_path, tiny_dir, capfd, monkeypatch):
    # `--data "$DATA"` with DATA unset: Path("") is ".", whose text files would become the training data
    shutil.copy(tiny_dir / "text.txt", tmp_path / "notes.txt")
    monkeypatch.chdir(tmp_path)
    for source in ("", "  "):
        line = fails(capfd, ["train", "--model", str(tiny_dir / "model"), "--data", source, "--output", "out",
                             "--steps", "1", *TRAIN], model_loaded=True)
        assert "data source is empty" in line and not (tmp_path / "out").exists()


def test_12_a_demo_cut_short_never_leaves_new_routers_beside_an_old_summary(tmp_path, capfd):
    """demo replaced the routers at step 2 and wrote summary.json only at the end: a later failure left the old
    summary describing new routers. What is in the way of its last writes is refused before any work."""
    save_tiny_llama(tmp_path / "m", layers=2, max_positions=512)  # the speed step reads 256 + 16 positions
    out = tmp_path / "d"
    argv = ["demo", "--model", str(tmp_path / "m"), "--steps", "1", "--sequences", "4", "--seq-len", "16",
            "--no-progress", "--output", str(out)]
    for blocked, message in (("summary.json", "is a folder"), ("analysis", "is a file")):
        (out / blocked).parent.mkdir(parents=True, exist_ok=True)
        (out / blocked).mkdir() if blocked == "summary.json" else (out / blocked).write_text("x")
        assert message in fails(capfd, argv)
        assert sorted(p.name for p in out.iterdir()) == [blocked]  # nothing sampled, trained or written
        shutil.rmtree(out)
    assert run_cli(argv) == 0 and (out / "summary.json").exists()
    figure = out / "analysis" / "per_layer_skip.png"
    figure.unlink()
    figure.mkdir()  # the last step fails
    assert run_cli([*argv, "--sparsity", "0.4"]) == 2
    assert json.loads((out / "routers" / "skip_config.json").read_text())["target_sparsity"] == 0.4
    assert not (out / "summary.json").exists()  # the earlier demo's (target 0.25) went with its routers
