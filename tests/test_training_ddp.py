"""Two CPU processes under torchrun (DDP over gloo) train the same routers as one process with the same
global batch: 2 processes x 1 sequence against 1 process x 1 sequence x 2 accumulated micro-batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_training import tiny_dir  # noqa: F401 - a fixture

pytest.importorskip("torch.distributed")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch was built without gloo", allow_module_level=True)


def train_argv(tiny_dir: Path, out: Path, accum: int) -> list[str]:  # noqa: F811
    return ["train", "--model", str(tiny_dir / "model"), "--data", str(tiny_dir / "text.txt"), "--seq-len", "16",
            "--batch-size", "1", "--grad-accum", str(accum), "--val-sequences", "4", "--steps", "4",
            "--checkpoint-every", "0", "--no-calibrate", "--no-progress", "--lr", "0.02", "--output", str(out)]


def run(cmd: list[str]) -> None:
    # One thread per process: two processes share the two cores, and the matmul split is the same in every run.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_process_ddp_equals_one_process_with_accumulation(tmp_path, tiny_dir):  # noqa: F811
    cli = [sys.executable, "-m", "skipgpt.cli.main"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "skipgpt.cli.main"]
    run(torchrun + train_argv(tiny_dir, tmp_path / "ddp", accum=1))
    run(cli + train_argv(tiny_dir, tmp_path / "one", accum=2))
    run(cli + train_argv(tiny_dir, tmp_path / "half", accum=1))  # half the global batch: must differ

    ddp = load_file(tmp_path / "ddp" / "routers.safetensors")
    one = load_file(tmp_path / "one" / "routers.safetensors")
    half = load_file(tmp_path / "half" / "routers.safetensors")
    assert ddp.keys() == one.keys() and len(ddp) > 0
    # DDP averages the two ranks' gradients with an all-reduce, accumulation sums them in one process:
    # the same terms added in another order, so equal up to float rounding (bitwise on this CPU, not promised).
    for key in ddp:
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    assert any(not torch.allclose(half[k], one[k], rtol=1e-3, atol=1e-4) for k in one)
