"""The command line's flags: shared ones declared once with each command's old defaults, train's built from
TrainConfig (help and choices from its field metadata), bad numbers refused at parse time in one line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from skipgpt.cli import common
from skipgpt.cli.main import COMMANDS, build_parser, main
from skipgpt.cli.train import config_from_args
from skipgpt.errors import ConfigError
from skipgpt.training.config import TrainConfig

CLI = Path(common.__file__).parent
# the least each command needs on its command line
REQUIRED = {
    "demo": [], "train": [], "eval": ["--task", "piqa"], "bench": ["--output", "b.json"],
    "compare": ["--task", "piqa", "--output", "c.json"], "analyze": ["--routers", "r", "--text", "t.txt",
                                                                    "--output", "figs"], "info": [],
    "generate": ["--prompt", "hi"],
}


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args([argv[0], *REQUIRED[argv[0]], *argv[1:]])


def subcommand(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def options(name: str) -> dict[str, argparse.Action]:
    return {s: a for a in subcommand(name)._actions for s in a.option_strings}


def skipgpt(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="400")  # no wrapped help lines
    return subprocess.run([sys.executable, "-m", "skipgpt", *argv], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


# -- the shared flags keep every command's defaults -------------------------------------------------------


def test_shared_flags_keep_their_defaults():
    for name in COMMANDS:  # train's flags stay None unless given: TrainConfig holds the default
        assert (parse(name).model or TrainConfig().model) == "smollm2-135m", name
    assert parse("train").model is None and parse("info").model == "smollm2-135m"
    # --dtype: float32 where it was; bench picks it by device (None); train leaves it to TrainConfig (None)
    assert parse("eval").dtype == "float32" and parse("compare").dtype == "float32"
    assert parse("bench").dtype is None and parse("train").dtype is None
    assert TrainConfig().dtype == "float32"
    for name in ("demo", "analyze", "info"):
        assert "--dtype" not in options(name) and "--device" not in options(name), name
    # --device: bench and eval; --threads: bench
    assert parse("bench").device is None and parse("eval").device is None
    assert parse("bench").threads is None and "--threads" not in options("eval")
    # --output: optional for eval, demo and train (with their defaults), required for bench, compare, analyze
    assert parse("eval").output is None and parse("demo").output == "runs/demo" and parse("train").output is None
    assert "--output" not in options("info")
    for name in ("bench", "compare", "analyze"):
        assert options(name)["--output"].required, name
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["bench"])
    assert exit_info.value.code == 2


def test_shared_flags_are_accepted_everywhere_they_were():
    for name in ("train", "eval", "bench", "compare"):
        args = parse(name, "--model", "some/model", "--dtype", "bfloat16", "--output", "out")
        assert (args.model, args.dtype, args.output) == ("some/model", "bfloat16", "out"), name
    for name in ("demo", "analyze", "info"):
        assert parse(name, "--model", "some/model").model == "some/model"
    args = parse("bench", "--device", "cpu", "--threads", "3")
    assert (args.device, args.threads) == ("cpu", 3)
    assert parse("eval", "--device", "cpu").device == "cpu"
    # one text for the same flag: the TrainConfig field's help
    model_help = TrainConfig.__dataclass_fields__["model"].metadata["help"]
    for name in COMMANDS:
        assert options(name)["--model"].help.startswith(model_help), name


def test_command_specific_defaults_are_unchanged():
    args = parse("bench")
    assert (args.seq_len, args.batch_size, args.decode_tokens, args.repeats, args.sparsity, args.routers) == (
        512, 4, 32, 5, None, None)
    args = parse("eval")
    assert (args.limit, args.batch_size, args.seq_len, args.mode, args.routers, args.lora) == (
        None, 1, None, "masked", None, None)
    args = parse("compare")
    assert args.sparsity == [0.25] and parse("compare", "--sparsity", "0.25,0.4").sparsity == [0.25, 0.4]
    assert (args.steps, args.seq_len, args.batch_size, args.eval_batch_size, args.calibration_sequences) == (
        100, 256, 2, 8, 8)
    assert (args.data, args.alpha, args.lr, args.distill, args.limit, args.eval_seq_len, args.seed) == (
        "self", 8.0, 2e-3, 0.0, None, None, 0)
    args = parse("demo")
    assert (args.sparsity, args.steps, args.seq_len, args.sequences, args.distill) == (0.25, 120, 128, 48, 1.0)
    args = parse("analyze")
    # --seq-len: 256, or the model's context if shorter (None here; an explicit longer one is refused)
    assert (args.seq_len, args.max_windows, args.heatmap_tokens) == (None, 16, 48)


def test_compare_flags_default_to_its_settings_and_train_config():
    """compare's settings are its flags of the same names; the training ones are TrainConfig's, defaults included."""
    from skipgpt.baselines.compare import CompareSettings

    args, settings, train = parse("compare"), CompareSettings(), TrainConfig()
    for f in dataclasses.fields(CompareSettings):
        if f.name not in ("tasks", "methods", "workdir"):  # read from --task, --methods and --output
            assert getattr(args, f.name) == getattr(settings, f.name), f.name
    for name in ("model", "dtype", "data", "seq_len", "batch_size", "alpha", "lr", "distill", "seed"):
        assert getattr(settings, name) == getattr(train, name), name
    assert options("compare")["--seq-len"].type is common.positive_int  # refused at parse time, as before


def test_routers_flag_keeps_each_commands_help():
    for name in ("eval", "bench", "generate", "analyze", "info"):
        action = options(name)["--routers"]
        assert action.default is None and action.required == (name == "analyze"), name
    assert "omit for the dense model" in options("eval")["--routers"].help


# -- bad numbers: argparse's one line, exit status 2 ------------------------------------------------------


@pytest.mark.parametrize("argv, flag", [
    (["eval", "--task", "piqa", "--limit", "0"], "--limit"),
    (["bench", "--output", "b.json", "--batch-size", "0"], "--batch-size"),
    (["bench", "--output", "b.json", "--repeats", "0"], "--repeats"),
])
def test_zero_is_refused_in_one_line(argv, flag, tmp_path):
    done = skipgpt(*argv, cwd=tmp_path)
    assert done.returncode == 2
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"skipgpt {argv[0]}: error: argument {flag}") and "at least 1" in err
    assert not list(tmp_path.iterdir())  # nothing ran


@pytest.mark.parametrize("argv", [
    ["eval", "--task", "piqa", "--batch-size", "0"], ["eval", "--task", "piqa", "--seq-len", "1"],
    ["compare", "--task", "piqa", "--output", "c.json", "--limit", "0"],
    ["compare", "--task", "piqa", "--output", "c.json", "--sparsity", "0.25,1.5"],
    ["compare", "--task", "piqa", "--output", "c.json", "--seq-len", "0"],
    ["bench", "--output", "b.json", "--seq-len", "x"], ["bench", "--output", "b.json", "--threads", "0"],
    ["generate", "--prompt", "hi", "--threads", "2147483648"],  # past torch's C int: was a traceback
    ["bench", "--output", "b.json", "--threads", "2048"],  # torch's CPU index_add crashed the process (exit 139)
    ["bench", "--output", "b.json", "--sparsity", "1.0"], ["demo", "--steps", "0"],
    ["analyze", "--routers", "r", "--text", "t", "--output", "o", "--max-windows", "0"],
    ["train", "--stage", "bogus"], ["train", "--router-norm", "rms"], ["train", "--attention-sparsity", "0.1"],
])
def test_main_reports_bad_flags_in_one_line(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    # an unknown flag is the top-level parser's error ("skipgpt: error: unrecognized arguments: ...")
    assert err.startswith((f"skipgpt {argv[0]}: error:", "skipgpt: error: unrecognized")), err
    assert len(err.splitlines()) == 1 and argv[-2] in err


def test_main_returns_zero_for_help(capsys):
    assert main(["bench", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: skipgpt bench")


def test_types():
    assert common.positive_int("3") == 3
    for bad in ("0", "-1", "x", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            common.positive_int(bad)
    assert common.int_at_least(2)("2") == 2
    with pytest.raises(argparse.ArgumentTypeError, match="at least 2"):
        common.int_at_least(2)("1")
    assert common.sparsity("0.4") == 0.4
    for bad in ("1", "-0.1", "nan", "25%"):
        with pytest.raises(argparse.ArgumentTypeError):
            common.sparsity(bad)
    assert common.comma_list(" q_proj, v_proj ,") == ["q_proj", "v_proj"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(capsys, tmp_path):
    assert main(["bench", "--device", "cuda", "--output", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "skipgpt bench: error: --device cuda was asked for but no CUDA device is available"
    assert main(["eval", "--task", "piqa", "--device", "cuda:0"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_device_and_dtype_resolution():
    auto = parse("bench")
    assert common.resolve_device(auto) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert common.resolve_device(parse("eval")) is None  # eval leaves the model where it loads (cpu)
    assert common.resolve_dtype(auto, "cuda") == "bfloat16" and common.resolve_dtype(auto, "cpu") == "float32"
    assert common.model_options(parse("bench", "--device", "cpu", "--dtype", "float16")) == {
        "dtype": "float16", "device": "cpu"}
    assert common.model_options(parse("eval")) == {"dtype": "float32", "device": None}


# -- skipgpt train: one flag per TrainConfig field ---------------------------------------------------------


def test_train_help_lists_every_field_with_its_metadata_help(tmp_path):
    done = skipgpt("train", "--help", cwd=tmp_path)
    assert done.returncode == 0
    out = " ".join(done.stdout.split())
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in out, flag
        assert " ".join(f.metadata["help"].split()) in out, f.name
        for choice in f.metadata.get("choices", ()):
            assert choice in out
    assert "--router-norm" not in out and "--attention-sparsity" not in out


def test_train_flags_come_from_the_field_types():
    acts = {a.dest: a for a in subcommand("train")._actions}
    kinds = {"stage": str, "steps": int, "lr": float, "warmup_ratio": float, "max_tokens": int, "routers": str,
             "lora_targets": common.comma_list}
    for name, kind in kinds.items():
        assert acts[name].type is kind, name
    for name in ("calibrate", "resume", "progress"):
        assert isinstance(acts[name], argparse.BooleanOptionalAction)
    fields = dataclasses.fields(TrainConfig)
    for f in fields:  # defaults stay None so --config FILE can fill them; choices from the metadata
        assert acts[f.name].default is None
        assert acts[f.name].choices == f.metadata.get("choices")
    assert {f.name for f in fields if "choices" in f.metadata} == {
        "stage", "accounting", "schedule", "router", "router_input", "report_to", "mixed_precision", "dtype"}
    flags = [s for a in subcommand("train")._actions for s in a.option_strings]
    assert len(flags) == len(set(flags))  # model, dtype, output: once, from TrainConfig
    args = parse("train", "--lora-targets", "q_proj, o_proj", "--max-tokens", "100", "--warmup-ratio", "0.1",
                 "--no-calibrate", "--data", "text.txt")
    cfg = config_from_args(args)
    assert (cfg.lora_targets, cfg.max_tokens, cfg.warmup_ratio, cfg.calibrate) == (
        ["q_proj", "o_proj"], 100, 0.1, False)
    assert config_from_args(parse("train")) == TrainConfig()


def test_field_type():
    assert [common.field_type(t) for t in (int, float, str, bool)] == [int, float, str, bool]
    assert common.field_type(float | None) is float and common.field_type(int | None) is int
    assert common.field_type(str | None) is str and common.field_type(list[str]) is common.comma_list
    with pytest.raises(TypeError):
        common.field_type(dict[str, int])


def test_train_config_round_trip(tmp_path):
    cfg = TrainConfig(stage="joint", steps=7, lora_targets=["q_proj"], distill=1.0, warmup_ratio=0.05,
                      max_tokens=1000, routers="r", dtype="bfloat16", output="o", data="text.txt")
    data = cfg.to_dict()
    assert set(data) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert not any(isinstance(v, dict) for v in data.values())  # no metadata
    assert json.loads(cfg.to_json()) == data
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
    (tmp_path / "c.json").write_text(cfg.to_json())
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    assert TrainConfig.load(tmp_path / "c.json") == cfg == TrainConfig.load(tmp_path / "c.yaml")
    assert "help" not in cfg.to_yaml() and "choices" not in cfg.to_json()
    args = parse("train", "--config", str(tmp_path / "c.yaml"), "--steps", "9")
    assert config_from_args(args) == dataclasses.replace(cfg, steps=9)
    with pytest.raises(ConfigError, match="stage must be one of"):
        TrainConfig(stage="bogus")
    with pytest.raises(ConfigError, match="unknown options"):
        TrainConfig.from_dict({"router_norm": "rms"})


def test_cli_source_drops_removed_options():
    for path in CLI.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        for gone in ("attention_sparsity", "attention-sparsity", "router_norm", "router-norm"):
            assert gone not in text, (path.name, gone)
