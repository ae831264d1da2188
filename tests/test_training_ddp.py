"""Two CPU processes under torchrun (DDP over gloo) train the same routers as one process with the same
global batch: 2 processes x 1 sequence against 1 process x 1 sequence x 2 accumulated micro-batches; the same
holds for the stage-2 threshold that --threshold-gain steers."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import varied_routers

pytest.importorskip("torch.distributed")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch was built without gloo", allow_module_level=True)


def train_argv(tiny_dir: Path, out: Path, accum: int) -> list[str]:
    return ["train", "--model", str(tiny_dir / "model"), "--data", str(tiny_dir / "text.txt"), "--seq-len", "16",
            "--batch-size", "1", "--grad-accum", str(accum), "--val-sequences", "4", "--steps", "4",
            "--checkpoint-every", "0", "--no-calibrate", "--no-progress", "--lr", "0.02", "--output", str(out)]


CLI = [sys.executable, "-m", "skipgpt.cli.main"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "skipgpt.cli.main"]


def run(cmd: list[str]) -> str:
    # One thread per process: two processes share the two cores, and the matmul split is the same in every run.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def log_columns(out: Path, *names: str) -> list[list[float]]:
    with open(out / "train_log.csv", encoding="utf-8") as f:
        return [[float(row[n]) for n in names] for row in csv.DictReader(f)]


def test_two_process_ddp_equals_one_process_with_accumulation(tmp_path, tiny_dir):
    printed = run(TORCHRUN + train_argv(tiny_dir, tmp_path / "ddp", accum=1))
    run(CLI + train_argv(tiny_dir, tmp_path / "one", accum=2))
    run(CLI + train_argv(tiny_dir, tmp_path / "half", accum=1))  # half the global batch: must differ

    ddp = load_file(tmp_path / "ddp" / "routers.safetensors")
    one = load_file(tmp_path / "one" / "routers.safetensors")
    half = load_file(tmp_path / "half" / "routers.safetensors")
    assert ddp.keys() == one.keys() and len(ddp) > 0
    # DDP averages the two ranks' gradients with an all-reduce, accumulation sums them in one process:
    # the same terms added in another order, so equal up to float rounding (bitwise on this CPU, not promised).
    for key in ddp:
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    assert any(not torch.allclose(half[k], one[k], rtol=1e-3, atol=1e-4) for k in one)
    # The log is the whole step's (both ranks' sequences), as accumulation's is, not rank 0's shard.
    names = ("loss", "lm_loss", "reg", "attention", "mlp")
    ddp_log, one_log, half_log = (log_columns(tmp_path / r, *names) for r in ("ddp", "one", "half"))
    assert len(ddp_log) == len(one_log) == 4
    for a, b in zip(ddp_log, one_log):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)
    assert half_log[0] != pytest.approx(one_log[0], rel=1e-5, abs=1e-7)  # rank 0's shard alone differs
    assert printed.count("saved routers") == 1  # one report, not one per process


def test_two_process_ddp_steers_the_threshold_like_one_process(tmp_path, tiny_dir):
    """Stage 2 with --threshold-gain: the ranks average their realised sparsity before moving the threshold,
    so 2 processes x 1 sequence end where 1 process x 2 accumulated sequences ends, not where rank 0 alone would."""
    from transformers import AutoModelForCausalLM

    from skipgpt.artifact import read_config, save_routers

    # token-dependent decisions, so the two ranks' batches skip differently
    routed = varied_routers(model=AutoModelForCausalLM.from_pretrained(tiny_dir / "model"))
    routed.threshold = -3.0  # skips far more than the 25% target: the controller has work on every step
    save_routers(routed, tmp_path / "routers")

    def argv(out: str, accum: int) -> list[str]:
        return [*train_argv(tiny_dir, tmp_path / out, accum), "--stage", "lora", "--routers", str(tmp_path / "routers"),
                "--target-sparsity", "0.25", "--threshold-gain", "4", "--lora-dropout", "0"]

    def thresholds(out: str) -> list[float]:
        with open(tmp_path / out / "train_log.csv", encoding="utf-8") as f:
            return [float(row["threshold"]) for row in csv.DictReader(f)]

    run(TORCHRUN + argv("ddp", accum=1))
    run(CLI + argv("one", accum=2))
    run(CLI + argv("half", accum=1))  # half the global batch: a controller that saw one rank's share would differ

    ddp, one, half = thresholds("ddp"), thresholds("one"), thresholds("half")
    assert len(ddp) == len(one) == 4 and ddp[-1] > -3.0
    assert ddp == pytest.approx(one, abs=1e-6)
    assert abs(half[-1] - one[-1]) > 1e-3
    assert read_config(tmp_path / "ddp").threshold == pytest.approx(one[-1], abs=1e-6)  # what the artifact keeps
