"""Two-stage training on tiny random models: gradients, schedules, accumulation, resume, LoRA, errors."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from skipgpt import RoutedModel, SkipConfig
from skipgpt.errors import ConfigError
from skipgpt.routing import policies
from skipgpt.training import TrainConfig, TrainingError, merge_lora, train, trainer
from skipgpt.training import loss as L
from skipgpt.training.checkpoint import CHECKPOINT_NAME
from skipgpt.training.data import PackedData, load_self
from skipgpt.training.lora import attach_lora
from skipgpt.training.step import learning_rate, step_gradients
from skipgpt.training.trainer import _setup_parameters

from conftest import linear_router_share, make_tiny, one_error_line, run_cli, varied_routers


def packed(seed: int = 0, n: int = 12, seq: int = 16, vocab: int = 128) -> PackedData:
    g = torch.Generator().manual_seed(seed)
    train_ids = torch.randint(0, vocab, (n, seq), generator=g)
    return PackedData(train_ids, torch.randint(0, vocab, (4, seq), generator=g), "t")


def tiny_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(output=str(tmp_path / "out"), steps=4, seq_len=16, batch_size=2, checkpoint_every=0, progress=False,
                val_sequences=4)
    base.update(kw)
    return TrainConfig(**base)


# -- gradients ------------------------------------------------------------------------------------------


def test_stage1_only_routers_get_gradients(tmp_path):
    routed = RoutedModel(make_tiny("llama"))
    cfg = tiny_cfg(tmp_path, distill=0.5)
    _setup_parameters(routed, cfg)
    routed.temperature = 2.0
    step_gradients(routed, [{"input_ids": packed().train[:2]}], cfg)
    for name, p in routed.model.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    grads = [p.grad for p in routed.routers.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_stage2_only_lora_gets_gradients(tmp_path):
    routed = RoutedModel(make_tiny("llama"))
    cfg = tiny_cfg(tmp_path, stage="lora", lora_targets=["q_proj", "v_proj", "gate_proj"])
    _setup_parameters(routed, cfg)
    assert not routed.routers.training  # frozen routers decide by argmax, as at inference
    step_gradients(routed, [{"input_ids": packed().train[:2]}], cfg)
    lora = {n: p for n, p in routed.model.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * 3 * 3  # A and B for 3 targets in 3 layers
    assert all(p.grad is not None for n, p in lora.items() if "lora_B" in n)
    assert sum(float(p.grad.abs().sum()) for n, p in lora.items() if "lora_B" in n) > 0
    for name, p in routed.model.named_parameters():
        if "lora_" not in name:
            assert not p.requires_grad and p.grad is None, name
    assert all(p.grad is None and not p.requires_grad for p in routed.routers.parameters())


def test_stage2_trains_an_adapter_the_routed_model_already_carries(tmp_path):
    """A routed model handed over with its LoRA attached (load_routers(..., lora="attach")) goes on training it."""
    routed = RoutedModel(make_tiny("llama"))
    cfg = tiny_cfg(tmp_path, stage="lora")
    attach_lora(routed)
    for p in routed.model.parameters():  # as a loaded adapter comes: frozen for inference
        p.requires_grad_(False)
    _setup_parameters(routed, cfg)
    step_gradients(routed, [{"input_ids": packed().train[:2]}], cfg)
    lora_b = [p for n, p in routed.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.requires_grad and p.grad is not None for p in lora_b)
    assert sum(float(p.grad.abs().sum()) for p in lora_b) > 0


def test_regulariser_gradient_pushes_sparsity_toward_target():
    routed = RoutedModel(make_tiny("llama"))
    routed.routers.train()
    batch = {"input_ids": packed().train[:4]}
    for target, sign in ((0.9, -1.0), (0.0, 1.0)):
        routed.routers.zero_grad()
        torch.manual_seed(0)
        routed(**batch)
        realised = float(L.sequence_sparsity(routed, "param")[0].detach().mean())
        assert 0.0 < realised < 0.9
        L.regulariser_sum(routed, "param", target).backward()
        # d loss / d skip-bias: negative (raise skip logits) below the target, positive above it.
        skip_bias = torch.stack([r.net.bias.grad[1] for r in list(routed.routers.attn) + list(routed.routers.mlp)])
        assert (skip_bias * sign >= 0).all() and float((skip_bias * sign).sum()) > 0


def test_regulariser_aims_at_the_net_target_where_a_threshold_sets_the_rate():
    """Routers that skip nothing realise minus their own cost (counted by hand) in the regulariser, so training
    at a target lands near the net sparsity calibration meets; MoD-D's fixed capacity is left gross."""
    model = make_tiny("llama")
    routed = RoutedModel(model)  # fresh routers: everything executes
    batch = {"input_ids": packed().train[:2]}
    for policy, expected in ((None, -linear_router_share(model)),
                             (policies.ModPolicy(routed, torch.ones(3, 2)), 0.0)):
        routed.force(policy)
        with torch.no_grad():
            routed(**batch)
        values, counts = L.sequence_sparsity(routed, "param")
        assert values.tolist() == pytest.approx([expected] * 2, rel=1e-6, abs=1e-9)
        assert float(L.regulariser_sum(routed, "param", 0.25)) == pytest.approx(
            float(counts.sum()) * (0.25 - expected), rel=1e-6)


def test_gradient_accumulation_equals_the_large_batch_gradient(tmp_path):
    routed = RoutedModel(make_tiny("llama"))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in routed.routers.parameters():
            p.normal_(0.0, 0.5)
    # A deterministic float gate from the routers (as a baseline policy would), so both runs see the same gates.
    routed.force(lambda layer, kind, x: torch.softmax(routed.routers.get(layer, kind)(x), -1)[..., 0])
    cfg = tiny_cfg(tmp_path, distill=0.3, alpha=8.0, accounting="flop")
    _setup_parameters(routed, cfg)
    ids = packed().train[:4]
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0  # pads in one micro-batch only: token counts differ between micro-batches
    big = [{"input_ids": ids, "attention_mask": mask}]
    small = [{"input_ids": ids[i : i + 2], "attention_mask": mask[i : i + 2]} for i in (0, 2)]
    grads = []
    for batches in (big, small):
        routed.routers.zero_grad()
        stats = step_gradients(routed, batches, cfg)
        grads.append([p.grad.clone() for p in routed.routers.parameters()])
        assert stats["reg"] > 0 and stats["kd_loss"] > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_the_record_of_a_run_on_a_model_the_caller_built_names_that_models_router_design(tmp_path):
    """compare builds informed routers as RoutedModel(..., SkipConfig(forecaster_rank=32, router="mlp")) with a
    TrainConfig of the defaults: train_config.yaml said rank 0, linear, and a rerun from it trained plain routers."""
    routed = RoutedModel(make_tiny("llama"), SkipConfig(forecaster_rank=2, router="mlp", execute_bias=1.5))
    result = train(tiny_cfg(tmp_path, steps=2, calibrate=False, forecaster_steps=0), routed=routed, data=packed())
    record = TrainConfig.load(result.output_dir / "train_config.yaml")
    assert (record.forecaster_rank, record.router, record.execute_bias) == (2, "mlp", 1.5)
    saved = json.loads((result.output_dir / "skip_config.json").read_text())
    assert (saved["forecaster_rank"], saved["router"]) == (2, "mlp")


# -- schedules ------------------------------------------------------------------------------------------


def test_temperature_anneals_linearly_and_lr_schedules(tmp_path):
    cfg = tiny_cfg(tmp_path, steps=5, calibrate=False)
    result = train(cfg, routed=RoutedModel(make_tiny("llama")), data=packed())
    assert [h["temperature"] for h in result.history] == pytest.approx([5.0, 4.0, 3.0, 2.0, 1.0])
    assert [h["noise"] for h in result.history] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    # auto: cosine decay from the first step, no warmup, for router tuning
    assert [h["lr"] for h in result.history] == pytest.approx(
        [learning_rate(s, 5, cfg.lr, "cosine", 0.0) for s in range(5)])
    assert result.history[0]["lr"] == pytest.approx(cfg.lr) and result.history[-1]["lr"] < 0.2 * cfg.lr
    lrs = [learning_rate(s, 10, 1.0, "cosine", 0.2) for s in range(10)]
    assert lrs[:2] == pytest.approx([0.5, 1.0])  # linear warmup over 2 steps
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert TrainConfig(stage="joint").effective_schedule() == ("cosine", 0.1)
    assert TrainConfig(stage="router").effective_schedule() == ("cosine", 0.0)
    assert TrainConfig(stage="router", schedule="constant").effective_schedule() == ("constant", 0.0)


def _training_gates(tmp_path, **kw) -> tuple[list, list[dict]]:
    """(noise, gate, argmax gate) of every training router call of a short run, and the run's history."""
    routed = RoutedModel(make_tiny("llama"))
    original, seen = routed.decide, []

    def spy(router, x, fold=None):
        gate = original(router, x, fold)
        if routed.routers.training:  # not the held-out evaluation after training
            logits = router(x).detach()
            seen.append((routed.noise, gate.detach(), (logits[..., 1] - logits[..., 0] <= 0).float()))
        return gate

    routed.decide = spy
    result = train(tiny_cfg(tmp_path, calibrate=False, **kw), routed=routed, data=packed())
    return seen, result.history


def test_gumbel_noise_anneals_and_ends_on_the_inference_decisions(tmp_path):
    seen, history = _training_gates(tmp_path / "default", steps=5)  # default: noise 1 -> 0
    assert [h["noise"] for h in history] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    last = [(gate, argmax) for noise, gate, argmax in seen if noise == 0.0]
    assert last  # the last step ran without noise: its training gates are exactly the argmax decisions
    for gate, argmax in last:
        torch.testing.assert_close(gate, argmax)
    # the paper's constant noise stays one option away, and there the sampled gates differ from argmax
    seen, history = _training_gates(tmp_path / "paper", steps=3, noise_end=1.0)
    assert [h["noise"] for h in history] == pytest.approx([1.0] * 3)
    assert any(bool((gate != argmax).any()) for _, gate, argmax in seen)


# -- end-to-end on tiny models ---------------------------------------------------------------------------


def test_router_tuning_reduces_loss_and_meets_the_target_after_calibration(tmp_path):
    cfg = tiny_cfg(tmp_path, steps=25, lr=2e-2, target_sparsity=0.3)
    result = train(cfg, routed=RoutedModel(make_tiny("llama")), data=packed(n=20))
    first = sum(h["loss"] for h in result.history[:5]) / 5
    last = sum(h["loss"] for h in result.history[-5:]) / 5
    assert last < first
    assert result.history[-1]["sparsity"] > result.history[0]["sparsity"]  # moved from ~dense toward 30%
    assert abs(result.summary["held_out_sparsity"]["param"] - 0.3) < 0.05  # calibrated argmax
    saved = SkipConfig.load(Path(cfg.output) / "skip_config.json")
    assert saved.threshold == result.routed.threshold and "train_router" in saved.extra
    assert (Path(cfg.output) / "train_log.csv").read_text().count("\n") == 26


def test_lora_run_reduces_lm_loss(tmp_path):
    seq = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    data = PackedData(seq.repeat(8, 1), seq.repeat(4, 1), "repeat")
    cfg = tiny_cfg(tmp_path, stage="lora", steps=15, lora_lr=1e-2, lora_dropout=0.0, schedule="constant",
                   warmup_ratio=0.0)
    result = train(cfg, routed=RoutedModel(make_tiny("llama")), data=data)
    assert result.history[-1]["lm_loss"] < 0.7 * result.history[0]["lm_loss"]


def test_joint_artifact_reloads_exactly_and_merges(tmp_path, tiny_dir):
    out = tmp_path / "joint"
    cfg = tiny_cfg(tmp_path, stage="joint", model=str(tiny_dir / "model"), data=str(tiny_dir / "text.txt"),
                   output=str(out), steps=3, lora_lr=1e-2)
    result = train(cfg)
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    batch = {"input_ids": torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(5))}
    with torch.no_grad():
        want = result.routed(**batch).logits
        want_decisions = result.routed.decisions()

    from skipgpt import load_model, load_routers

    base, _ = load_model(str(tiny_dir / "model"))
    routed = load_routers(base, out, lora="attach")
    with torch.no_grad():
        got = routed(**batch).logits
    assert torch.equal(got, want) and torch.equal(routed.decisions(), want_decisions)
    merge_lora(routed)
    assert not hasattr(routed.model, "peft_config")
    with torch.no_grad():
        merged = routed(**batch).logits
    torch.testing.assert_close(merged, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(routed.decisions(), want_decisions)  # the layers are still routed after merging


def test_stage2_cli_from_stage1_routers(tmp_path, tiny_dir, capsys):
    common = ["--model", str(tiny_dir / "model"), "--data", str(tiny_dir / "text.txt"), "--seq-len", "16",
              "--batch-size", "2", "--val-sequences", "4", "--no-progress", "--checkpoint-every", "0"]
    assert run_cli(["train", *common, "--steps", "3", "--target-sparsity", "0.4", "--accounting", "flop",
                    "--output", str(tmp_path / "s1")]) == 0
    s1 = load_file(tmp_path / "s1" / "routers.safetensors")
    capsys.readouterr()
    assert run_cli(["train", *common, "--stage", "lora", "--routers", str(tmp_path / "s1"), "--steps", "2",
                    "--output", str(tmp_path / "s2")]) == 0
    # The summary line names the frozen routers' accounting, not the --accounting default (param).
    assert "held-out: flop sparsity" in capsys.readouterr().out
    s2 = load_file(tmp_path / "s2" / "routers.safetensors")
    assert all(torch.equal(s1[k], s2[k]) for k in s1)  # routers frozen in stage 2
    # Stage 2 keeps the routers' own target (no --target-sparsity given: not the 0.25 default).
    assert json.loads((tmp_path / "s2" / "skip_config.json").read_text())["target_sparsity"] == 0.4
    assert (tmp_path / "s2" / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "s2" / "train_summary.json").exists()
    # eval records the adapter the router directory applied (it said "lora": null, as if none had been)
    for routers, lora in (("s2", str(tmp_path / "s2" / "adapter")), ("s1", None)):
        out = tmp_path / f"eval-{routers}.json"
        assert run_cli(["eval", "--model", str(tiny_dir / "model"), "--routers", str(tmp_path / routers), "--task",
                        f"wikitext2={tiny_dir / 'text.txt'}", "--seq-len", "16", "--limit", "1", "--no-progress",
                        "--output", str(out)]) == 0
        assert json.loads(out.read_text())["lora"] == lora


def test_stage2_refuses_a_target_other_than_its_frozen_routers(tmp_path, tiny_dir, capsys):
    """Stage lora keeps the routers' target and accounting; another one given on the command line or in --config
    is refused in one line before the model loads (before: ignored without a word)."""
    from skipgpt import load_model, save_routers

    model, _ = load_model(str(tiny_dir / "model"))
    save_routers(RoutedModel(model, SkipConfig(target_sparsity=0.4)), tmp_path / "r")
    out = tmp_path / "s2"
    argv = ["train", "--stage", "lora", "--routers", str(tmp_path / "r"), "--model", str(tiny_dir / "model"),
            "--data", str(tiny_dir / "text.txt"), "--seq-len", "16", "--batch-size", "2", "--val-sequences", "4",
            "--no-progress", "--checkpoint-every", "0", "--steps", "1", "--output", str(out)]
    (tmp_path / "c.yaml").write_text("target-sparsity: 0.25\n")
    cases = [(["--target-sparsity", "0.25"], "target_sparsity"), (["--accounting", "flop"], "accounting"),
             (["--config", str(tmp_path / "c.yaml")], "target_sparsity")]
    for extra, name in cases:
        capsys.readouterr()
        assert run_cli([*argv, *extra]) == 2
        line = one_error_line(capsys.readouterr().err, "train")
        assert name in line and "keep their own" in line and "--stage router" in line, line
        assert not out.exists()
    # The routers' own values may be given.
    assert run_cli([*argv, "--target-sparsity", "0.4", "--accounting", "param"]) == 0
    # The run records them, so its own train_config.yaml reruns it (it held the CLI default 0.25 before).
    assert TrainConfig.load(out / "train_config.yaml").target_sparsity == 0.4
    assert run_cli(["train", "--config", str(out / "train_config.yaml"), "--output", str(tmp_path / "again")]) == 0


def test_self_data_is_sampled_once_and_cached(tmp_path, tiny_dir, monkeypatch):
    from skipgpt import load_model
    from skipgpt.training import data as data_module

    model, tok = load_model(str(tiny_dir / "model"))
    routed = RoutedModel(model)
    ids = load_self(routed, tok, count=3, seq_len=10, seed=0, cache_dir=tmp_path)
    assert ids.shape == (3, 10) and int(ids.max()) < len(tok)
    assert routed.policy is None  # the dense forcing is undone
    monkeypatch.setattr(data_module, "sample_self", lambda *a, **k: pytest.fail("cache not reused"))
    assert torch.equal(load_self(routed, tok, count=3, seq_len=10, seed=0, cache_dir=tmp_path), ids)
    # the same weights in bf16 sample other text: not the fp32 model's cache (the fingerprint rounds to bf16)
    monkeypatch.undo()
    bf16 = RoutedModel(load_model(str(tiny_dir / "model"), dtype="bfloat16")[0])
    load_self(bf16, tok, count=3, seq_len=10, seed=0, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("self-3x10-*.safetensors"))) == 2


def test_a_damaged_self_data_cache_is_sampled_again(tmp_path, tiny_dir):
    """Ids past the embedding, floats or another shape in the cache file were trained on (an IndexError
    traceback, or a misleading 'only 3 sequences' error); the cache is the project's own: it is rebuilt."""
    from safetensors.torch import save_file

    from skipgpt import load_model

    model, tok = load_model(str(tiny_dir / "model"))
    routed = RoutedModel(model)
    ids = load_self(routed, tok, count=3, seq_len=10, seed=0, cache_dir=tmp_path)
    (path,) = tmp_path.glob("self-3x10-*.safetensors")
    for damaged in (ids + 10**7, ids.float(), ids[:2, :5].contiguous(), ids - 10**7):
        save_file({"input_ids": damaged}, str(path))
        assert torch.equal(load_self(routed, tok, count=3, seq_len=10, seed=0, cache_dir=tmp_path), ids)


def test_self_sequences_shorter_than_a_seed_prompt(tiny_dir):
    """A sequence shorter than its seed prompt ("Once upon a time", the fourth) keeps the prompt's first tokens
    and still samples one."""
    from skipgpt import load_model
    from skipgpt.training.data import SEED_PROMPTS, sample_self

    model, tok = load_model(str(tiny_dir / "model"))
    prompt = tok(SEED_PROMPTS[3], add_special_tokens=False)["input_ids"]
    assert len(prompt) >= 3
    ids = sample_self(RoutedModel(model), tok, count=4, seq_len=3, seed=0, batch_size=1)
    assert ids.shape == (4, 3)
    assert ids[3, :2].tolist() == prompt[:2]


# -- resume ---------------------------------------------------------------------------------------------

RUNNER = """
import sys
from skipgpt.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path, tiny_dir):
    argv = ["train", "--model", str(tiny_dir / "model"), "--data", str(tiny_dir / "text.txt"), "--seq-len", "16",
            "--batch-size", "2", "--grad-accum", "2", "--val-sequences", "4", "--steps", "12",
            "--checkpoint-every", "3", "--no-progress", "--distill", "0.5"]
    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, *argv, "--output", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (killed / CHECKPOINT_NAME).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert not (killed / "routers.safetensors").exists()  # it really died mid-run

    assert run_cli([*argv, "--output", str(killed), "--resume"]) == 0
    assert run_cli([*argv, "--output", str(tmp_path / "straight")]) == 0
    a = load_file(killed / "routers.safetensors")
    b = load_file(tmp_path / "straight" / "routers.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    log_a = (killed / "train_log.csv").read_text().splitlines()
    log_b = (tmp_path / "straight" / "train_log.csv").read_text().splitlines()
    assert len(log_a) == len(log_b) == 13
    strip = lambda rows: [r.rsplit(",", 1)[0] for r in rows]  # noqa: E731 - tokens/s is wall-clock
    assert strip(log_a) == strip(log_b)


# -- errors ---------------------------------------------------------------------------------------------


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    from skipgpt.training.checkpoint import load_checkpoint

    routed = RoutedModel(make_tiny("llama"))
    calls = {"n": 0}
    good = routed.routers.attn[0].net.bias

    def policy(layer, kind, x):
        calls["n"] += 1
        # Float gates that depend on a router (so it trains), NaN from the third step on (6 gates per forward).
        gate = torch.sigmoid(good[0] - good[1] + 0 * x[..., 0])
        return gate * float("nan") if calls["n"] > 12 else gate

    routed.force(policy)
    cfg = tiny_cfg(tmp_path, steps=6, checkpoint_every=1)
    with pytest.raises(TrainingError, match=r"NaN/inf at step 3.*last good checkpoint") as info:
        train(cfg, routed=routed, data=packed())
    assert "\n" not in str(info.value)
    fresh = RoutedModel(make_tiny("llama"))
    _setup_parameters(fresh, cfg)
    opt = torch.optim.AdamW([p for p in fresh.routers.parameters()])
    meta = load_checkpoint(Path(cfg.output) / CHECKPOINT_NAME, fresh, opt)
    assert meta["step"] == 2
    assert all(torch.isfinite(p).all() for p in fresh.routers.parameters())


@pytest.mark.parametrize("target", [1.5, -0.1, 1.0, float("nan")])
def test_impossible_targets_are_refused(target, tmp_path, capsys):
    with pytest.raises(ConfigError, match="target sparsity"):
        TrainConfig(target_sparsity=target)
    assert run_cli(["train", "--target-sparsity", str(target), "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("skipgpt train: error:") and "target sparsity" in err and "\n" not in err


@pytest.mark.parametrize("flags, message", [(["--forecaster-steps", "-1"], "forecaster_steps"),
                                             (["--forecaster-lr=-1e-3"], "forecaster_lr")])
def test_bad_forecaster_tuning_settings_are_refused(flags, message, tmp_path, capsys):
    assert run_cli(["train", *flags, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("skipgpt train: error:") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("alpha", ["0", "-16"])
def test_lora_alpha_must_be_positive(alpha, tmp_path, capsys):
    """0 would train nothing, a negative alpha flips the sign of LoRA's update (before: both accepted)."""
    with pytest.raises(ConfigError, match="lora_alpha must be a positive integer"):
        TrainConfig(lora_alpha=int(alpha))
    assert run_cli(["train", "--stage", "joint", f"--lora-alpha={alpha}", "--output", str(tmp_path / "o")]) == 2
    assert "lora_alpha" in one_error_line(capsys.readouterr().err, "train")
    assert not (tmp_path / "o").exists()


def test_bad_data_is_reported_in_one_line(tmp_path, tiny_dir, capsys):
    (tmp_path / "empty.txt").write_text("")
    common = ["train", "--model", str(tiny_dir / "model"), "--output", str(tmp_path / "o"), "--no-progress",
              "--seq-len", "16"]
    for data, message in ((tmp_path / "missing.txt", "does not exist"), (tmp_path / "empty.txt", "no text found")):
        assert run_cli([*common, "--data", str(data)]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("skipgpt train: error:") and message in err and str(data) in err
    assert run_cli([*common, "--data", str(tiny_dir / "text.txt"), "--val-sequences", "100000"]) == 2
    assert "need at least" in capsys.readouterr().err
    assert run_cli(["train", "--stage", "lora", "--output", str(tmp_path / "o")]) == 2
    assert "--routers" in capsys.readouterr().err


# -- configuration --------------------------------------------------------------------------------------


def test_yaml_config_roundtrip_and_flags_override(tmp_path):
    import dataclasses

    from skipgpt.cli.train import config_from_args

    cfg = TrainConfig(stage="joint", steps=7, lora_targets=["q_proj"], distill=1.0, warmup_ratio=0.05)
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert TrainConfig.load(path) == cfg
    json_path = tmp_path / "c.json"
    json_path.write_text(cfg.to_json())
    assert TrainConfig.load(json_path) == cfg

    from skipgpt.cli import train as command

    parser = argparse.ArgumentParser()
    command.add_parser(parser.add_subparsers())
    args = parser.parse_args(["train", "--config", str(path), "--steps", "9", "--no-calibrate",
                              "--lora-targets", "q_proj,o_proj"])
    got = config_from_args(args)
    assert (got.steps, got.calibrate, got.lora_targets, got.stage) == (9, False, ["q_proj", "o_proj"], "joint")
    # Every option is a flag.
    flags = {a.dest for a in parser._subparsers._group_actions[0].choices["train"]._actions}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= flags

    # a YAML list is cleaned as the comma-separated flag is; all blank is refused before a model loads
    path.write_text('lora_targets: [" q_proj ", "", v_proj]\n')
    assert TrainConfig.load(path).lora_targets == ["q_proj", "v_proj"]
    path.write_text('lora_targets: ["", " "]\n')
    with pytest.raises(ConfigError, match="lora_targets must name at least one module"):
        TrainConfig.load(path)
    # an option earlier versions wrote into train_config.yaml: null reads as absent, a value is refused
    path.write_text("steps: 3\nforecaster_distill: null\n")
    assert TrainConfig.load(path).steps == 3
    path.write_text("steps: 3\nforecaster_distill: 1.0\n")
    with pytest.raises(ConfigError, match="option forecaster_distill was removed"):
        TrainConfig.load(path)
    path.write_text("steps: 3\nbogus: 1\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown options \['bogus'\]"):
        TrainConfig.load(path)
    path.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        TrainConfig.load(path)


def test_trainer_still_exports_what_moved_to_step_and_forecast():
    """benchmarks/, the demo, compare and docs/RESULTS.md import these from trainer."""
    for name in ("held_out_nll", "FIT_SEQUENCES", "step_gradients", "_setup_parameters", "build_routed", "train",
                 "TrainResult", "TrainingError", "learning_rate", "anneal", "micro_seed"):
        assert hasattr(trainer, name), name


def test_new_routers_get_the_router_design_of_the_train_config():
    cfg = TrainConfig(router="mlp", router_input="layer", execute_bias=1.5, target_sparsity=0.4, accounting="flop",
                      forecaster_rank=3)
    want = SkipConfig(router="mlp", router_input="layer", execute_bias=1.5, target_sparsity=0.4, accounting="flop",
                      forecaster_rank=3)
    assert cfg.skip_config() == want


# -- stage 2 threshold steering -------------------------------------------------------------------------


def _lora_steer_cfg(tmp_path, name: str, **kw) -> TrainConfig:
    return tiny_cfg(tmp_path, output=str(tmp_path / name), stage="lora", calibrate=False, target_sparsity=0.25,
                    **kw)


def test_threshold_gain_steers_stage2_sparsity_to_the_target(tmp_path):
    data = packed(n=20)
    fixed = varied_routers()
    fixed.threshold = -3.0  # skips far more than the 25% target
    kept = train(_lora_steer_cfg(tmp_path, "fixed", steps=30), routed=fixed, data=data)
    steered_model = varied_routers()
    steered_model.threshold = -3.0
    steered = train(_lora_steer_cfg(tmp_path, "steered", steps=30, threshold_gain=4.0), routed=steered_model,
                    data=data)
    assert {h["threshold"] for h in kept.history} == {-3.0}
    start = kept.history[0]["sparsity"]
    assert start > 0.4  # the gap the controller has to close
    late = [h["sparsity"] for h in steered.history[-10:]]
    assert abs(sum(late) / len(late) - 0.25) < 0.08 < start - 0.25
    assert steered.history[-1]["threshold"] > -3.0  # raised: a higher threshold executes more


def test_threshold_gain_needs_frozen_routers_and_is_restored_on_resume(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="threshold_gain"):
        tiny_cfg(tmp_path, stage="router", threshold_gain=1.0)
    data = packed(n=20)
    straight_model = varied_routers()
    straight_model.threshold = -3.0
    straight = train(_lora_steer_cfg(tmp_path, "straight", steps=6, threshold_gain=4.0), routed=straight_model,
                     data=data)

    real, calls = trainer.step_gradients, []

    def dies_at_step_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "step_gradients", dies_at_step_5)  # where the training loop looks it up
    cfg = _lora_steer_cfg(tmp_path, "resumed", steps=6, threshold_gain=4.0, checkpoint_every=3)
    first = varied_routers()
    first.threshold = -3.0
    with pytest.raises(KeyboardInterrupt):
        train(cfg, routed=first, data=data)
    monkeypatch.setattr(trainer, "step_gradients", real)
    again = varied_routers()
    again.threshold = -3.0  # what the user rebuilds; the checkpoint must bring back the steered value
    cfg.resume = True
    resumed = train(cfg, routed=again, data=data)
    assert resumed.routed.threshold == straight.routed.threshold != -3.0
    assert [h["threshold"] for h in resumed.history] == [h["threshold"] for h in straight.history]


def test_loaded_routers_refuse_other_design_options_and_record_their_own(tmp_path, tiny_dir, capsys):
    """With --routers, the options for new routers (router, router_input, forecaster_rank, execute_bias) were
    ignored while train_config.yaml recorded them; another value given is refused in one line before the model
    loads, in every stage, and the run records the routers' own design."""
    from skipgpt import load_model, save_routers

    design = SkipConfig(router="mlp", router_input="layer", execute_bias=3.0)
    save_routers(RoutedModel(load_model(str(tiny_dir / "model"))[0], design), tmp_path / "r")
    out = tmp_path / "out"
    argv = ["train", "--routers", str(tmp_path / "r"), "--model", str(tiny_dir / "model"), "--data",
            str(tiny_dir / "text.txt"), "--seq-len", "16", "--batch-size", "2", "--val-sequences", "4",
            "--no-progress", "--checkpoint-every", "0", "--steps", "1", "--output", str(out)]
    (tmp_path / "c.yaml").write_text("router: linear\n")
    cases = [(["--router", "linear"], "router", "mlp", "linear"),
             (["--router-input", "module"], "router_input", "layer", "module"),
             (["--forecaster-rank", "2"], "forecaster_rank", 0, 2), (["--execute-bias", "2"], "execute_bias", 3.0, 2.0),
             (["--config", str(tmp_path / "c.yaml")], "router", "mlp", "linear")]
    for stage in ("router", "lora"):
        for extra, name, theirs, given in cases:
            capsys.readouterr()
            assert run_cli([*argv, "--stage", stage, *extra]) == 2
            line = one_error_line(capsys.readouterr().err, "train")
            assert f"own {name} ({theirs!r}), not the {given!r} given" in line and "without --routers" in line, line
            assert not out.exists()
    # The routers' own values may be given; left out, the record holds the routers' design, not the defaults.
    assert run_cli([*argv, "--router", "mlp", "--execute-bias", "3"]) == 0
    recorded = TrainConfig.load(out / "train_config.yaml")
    assert (recorded.router, recorded.router_input, recorded.execute_bias) == ("mlp", "layer", 3.0)
    assert run_cli(["train", "--config", str(out / "train_config.yaml"), "--output", str(tmp_path / "again")]) == 0


def test_lora_on_an_lm_head_tied_to_the_input_embedding_is_refused(tmp_path):
    """Merging (eval) would write the lm_head update into the shared embedding: the evaluated model would not be the
    trained one. An untied lm_head stays a valid target."""
    from skipgpt.training.lora import check_lora_targets

    tied = RoutedModel(make_tiny("llama", tie_word_embeddings=True))
    assert tied.model.lm_head.weight is tied.model.get_input_embeddings().weight
    cfg = tiny_cfg(tmp_path, stage="joint", lora_targets=["q_proj", "lm_head"])
    with pytest.raises(ConfigError, match="LoRA target lm_head shares its weight with the input embedding"):
        train(cfg, routed=tied, data=packed())
    assert not Path(cfg.output).exists()
    check_lora_targets(tied.model, ["q_proj"])
    check_lora_targets(make_tiny("llama"), ["q_proj", "lm_head"])
