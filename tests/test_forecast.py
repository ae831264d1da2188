"""Informed skipping: forecasters stand in for skipped modules (fit, accounting, masked == sparse)."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from torch import nn
from transformers import DynamicCache

from skipgpt import RoutedModel, SkipConfig
from skipgpt.errors import ConfigError
from skipgpt.routing import policies
from skipgpt.training import forecast, trainer
from skipgpt.training.config import TrainConfig
from skipgpt.training.data import PackedData
from skipgpt.training.forecast import fit_forecasters, solve, tune_forecasters
from skipgpt.training.step import TrainingError, held_out_nll

from conftest import make_tiny, varied_routers, with_random_forecasters


def batch(seed: int = 0, rows: int = 3, seq: int = 12, vocab: int = 128, pad: bool = True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    mask = torch.ones(rows, seq, dtype=torch.long)
    if pad:
        mask[1, :4] = 0  # left padding
        mask[2, -3:] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask}


def test_unfitted_forecasters_are_the_plain_skip_and_rank_0_has_none():
    ids = batch()
    plain = varied_routers(model=make_tiny("llama"))
    informed = RoutedModel(make_tiny("llama"), SkipConfig(forecaster_rank=4))
    informed.routers.load_state_dict(plain.routers.state_dict())
    assert plain.forecasters is None
    with torch.no_grad():
        want = plain(**ids).logits
        got = informed(**ids).logits
    assert 0 < plain.decisions().float().mean() < 1
    assert torch.equal(got, want)  # zero forecasts: exactly the plain skip


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2"])
def test_masked_equals_sparse_with_forecasters(arch):
    routed = with_random_forecasters(RoutedModel(make_tiny(arch), SkipConfig(forecaster_rank=3)))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in routed.routers.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        masked = routed(**batch()).logits
        decisions = routed.decisions()
        with routed.mode_as("sparse"):
            sparse = routed(**batch()).logits
        plain = make_tiny(arch)(**batch()).logits
    assert 0 < decisions.float().mean() < 1
    assert torch.equal(routed.decisions(), decisions)
    real = batch()["attention_mask"].bool()
    torch.testing.assert_close(sparse[real], masked[real], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(masked[real], plain[real], atol=1e-2)


def test_forecasters_with_cache_and_generate_match_masked():
    routed = with_random_forecasters(RoutedModel(make_tiny("llama"), SkipConfig(forecaster_rank=3)))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in routed.routers.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    ids = batch(pad=False)["input_ids"][:2]
    out = {}
    for mode in ("masked", "sparse"):
        with torch.no_grad(), routed.mode_as(mode):
            out[mode] = routed.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
            cache = DynamicCache(config=routed.model.config)
            routed(input_ids=ids[:, :8], cache=cache, use_cache=True)
            step = routed(input_ids=ids[:, 8:9], cache=cache, use_cache=True).logits
            out[mode + "_step"] = step
    assert torch.equal(out["masked"], out["sparse"])
    torch.testing.assert_close(out["sparse_step"], out["masked_step"], rtol=1e-4, atol=1e-4)


def test_fit_recovers_a_known_linear_map_and_matches_least_squares():
    model = make_tiny("llama")
    hidden = model.config.hidden_size
    # Layer 1's MLP becomes a known rank-2 affine map of its (normalised) input: a rank-2 fit must recover it.
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(hidden, 2, generator=g), torch.randn(2, hidden, generator=g)
    known = nn.Linear(hidden, hidden)
    with torch.no_grad():
        known.weight.copy_((a @ b).T)
        known.bias.copy_(torch.randn(hidden, generator=g))
    model.model.layers[1].mlp = known
    routed = RoutedModel(model, SkipConfig(forecaster_rank=2))
    data = [batch(seed=s, pad=False) for s in range(4)]
    fit_forecasters(routed, data, on_policy=False, ridge=0.0)
    f = routed.forecasters.mlp[1]
    x = torch.randn(50, hidden, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(f(x), known(x), rtol=1e-3, atol=1e-3)

    # Full rank on a real module: the closed form equals an independent least-squares solve on the same rows.
    xs, ys = [], []
    parts = routed.layers[0]
    hooks = [parts.attn_norm.register_forward_hook(lambda m, a, o: xs.append(o.detach())),
             parts.attn.register_forward_hook(lambda m, a, o: ys.append(o[0].detach()))]
    with torch.no_grad(), routed.unrouted() as dense:  # the unmodified model: an independent pass
        for d in data:
            dense(**d)
    for h in hooks:
        h.remove()
    x1 = torch.cat([torch.cat(xs).reshape(-1, hidden), torch.ones(len(data) * 3 * 12, 1)], 1).double()
    y = torch.cat(ys).reshape(-1, hidden).double()
    want = torch.linalg.lstsq(x1, y).solution
    down, up, bias = solve(x1.T @ x1, x1.T @ y, hidden, ridge=0.0)
    torch.testing.assert_close(down.T @ up.T, want[:hidden], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bias, want[hidden], rtol=1e-5, atol=1e-6)
    # More input features than outputs (extra inputs, as benchmarks/forecaster_rank.py --context adds):
    # the same independent solve, on the first 8 output features (compared on its predictions).
    x2 = torch.cat([x1[:, :hidden], x1[:, :8] ** 2, x1[:, hidden:]], 1)
    want = torch.linalg.lstsq(x2, y[:, :8]).solution
    down, up, bias = solve(x2.T @ x2, x2.T @ y[:, :8], 8, ridge=0.0)
    torch.testing.assert_close(x2[:, :-1] @ down.T @ up.T + bias, x2 @ want, rtol=1e-5, atol=1e-6)


def test_on_policy_fit_uses_only_the_skipped_tokens():
    routed = RoutedModel(make_tiny("llama"), SkipConfig(forecaster_rank=2))
    routed.force(policies.static(torch.tensor([[True, True], [True, False], [True, True]])))  # layer 1 MLP skips
    stats = fit_forecasters(routed, [batch()], on_policy=True)
    real = int(batch()["attention_mask"].sum())
    assert stats == {"modules": 1, "rows": real, "tokens": real}
    assert routed.forecasters.mlp[1].up.weight.abs().sum() > 0
    assert routed.forecasters.mlp[0].up.weight.abs().sum() == 0  # never skipped: left as it was
    routed.force("execute")  # routers that skip nothing leave every forecaster as it is
    before = {k: v.clone() for k, v in routed.forecasters.state_dict().items()}
    assert fit_forecasters(routed, [batch()], on_policy=True)["modules"] == 0
    assert all(torch.equal(v, before[k]) for k, v in routed.forecasters.state_dict().items())


def test_accounting_charges_the_forecaster_by_hand():
    model = make_tiny("llama")
    rank, d, L = 3, model.config.hidden_size, model.config.num_hidden_layers
    routed = RoutedModel(model, SkipConfig(forecaster_rank=rank))
    plain = RoutedModel(make_tiny("llama"))
    fc = d * rank + rank * d + d  # down, up and its bias
    assert routed.forecasters.params_per_module() == fc
    attn = sum(p.numel() for n, p in model.named_parameters() if ".self_attn." in n or "input_layernorm" in n)
    mlp = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n or "post_attention_layernorm" in n)
    ids = batch()
    for r in (routed, plain):
        r.force("skip")
        with torch.no_grad():
            r(**ids)
    assert plain.sparsity().param == pytest.approx(1.0)
    assert routed.sparsity().param == pytest.approx((attn + mlp - 2 * L * fc) / (attn + mlp), rel=1e-9)
    assert routed.sparsity().module == plain.sparsity().module == 1.0
    # FLOPs: every skipped module is charged 2 x its forecaster's parameters per token
    real = int(ids["attention_mask"].sum())
    totals = routed.meter.totals
    torch.testing.assert_close(plain.meter.totals["flop_skipped"] - totals["flop_skipped"],
                               torch.tensor(2.0 * fc * 2 * L * real, dtype=torch.float64))


def test_bad_ranks_are_refused():
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="forecaster_rank"):
            SkipConfig(forecaster_rank=bad)
    with pytest.raises(ConfigError, match="above the hidden size"):
        RoutedModel(make_tiny("llama"), SkipConfig(forecaster_rank=33))


def test_forecasters_round_trip_through_the_run_directory(tmp_path):
    import skipgpt

    routed = with_random_forecasters(RoutedModel(make_tiny("llama"), SkipConfig(forecaster_rank=3)))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in routed.routers.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        want = routed(**batch()).logits
    skipgpt.save_routers(routed, tmp_path / "r")
    config = skipgpt.SkipConfig.load(tmp_path / "r" / "skip_config.json")
    assert (config.forecaster_rank, config.forecaster) == (3, "linear")
    again = skipgpt.load_routers(make_tiny("llama"), tmp_path / "r")
    with torch.no_grad():
        assert torch.equal(again(**batch()).logits, want)
    (tmp_path / "r" / "forecasters.safetensors").unlink()
    with pytest.raises(skipgpt.ArtifactError, match="forecasters.safetensors is missing"):
        skipgpt.load_routers(make_tiny("llama"), tmp_path / "r")
    # directories without forecasters keep loading as the plain skip
    plain = varied_routers()
    skipgpt.save_routers(plain, tmp_path / "plain")
    assert skipgpt.load_routers(make_tiny("llama"), tmp_path / "plain").forecasters is None


@pytest.mark.parametrize("rank", ["-1", "33"])
def test_bad_ranks_on_the_command_line_are_one_line_and_write_nothing(rank, tmp_path, tiny_dir, capsys):
    from conftest import run_cli

    out = tmp_path / "out"
    code = run_cli(["train", "--model", str(tiny_dir / "model"), "--data", str(tiny_dir / "text.txt"),
                    "--seq-len", "16", "--steps", "2", "--no-progress", "--forecaster-rank", rank,
                    "--output", str(out)])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (above it only the weight-loading progress bar of transformers)
    assert code == 2 and last.startswith("skipgpt train: error:") and "forecaster_rank" in last
    assert "Traceback" not in err
    assert not out.exists()


def test_tuning_trains_only_the_forecasters_of_skipped_modules_and_lowers_the_loss():
    routed = RoutedModel(make_tiny("llama"), SkipConfig(forecaster_rank=2))
    routed.force(policies.static(torch.tensor([[True, True], [True, False], [False, True]])))  # 2 modules skip
    ids = torch.randint(0, 128, (8, 12), generator=torch.Generator().manual_seed(0))
    data = PackedData(train=ids, val=ids, source="tiny")
    fit_forecasters(routed, [{"input_ids": ids}], on_policy=True)
    base = {k: v.clone() for k, v in routed.model.state_dict().items()}
    routers = {k: v.clone() for k, v in routed.routers.state_dict().items()}
    before = {k: v.clone() for k, v in routed.forecasters.state_dict().items()}
    nll = held_out_nll(routed, ids, 4)
    cfg = TrainConfig(model="tiny", data="tiny", seq_len=12, batch_size=2, steps=3, forecaster_steps=20,
                      forecaster_lr=1e-2)
    assert tune_forecasters(routed, data, cfg, Accelerator(cpu=True)) == 20 * 2 * 12
    after = routed.forecasters.state_dict()
    changed = {k.split(".weight")[0].split(".bias")[0].rsplit(".", 1)[0] for k in after
               if not torch.equal(after[k], before[k])}
    assert changed == {"attn.2", "mlp.1"}  # a module nobody skips gets no gradient
    assert held_out_nll(routed, ids, 4) < nll - 0.01  # the closed-form fit is not the best on the loss
    assert all(torch.equal(v, base[k]) for k, v in routed.model.state_dict().items())
    assert all(torch.equal(v, routers[k]) for k, v in routed.routers.state_dict().items())
    assert not any(p.requires_grad for p in routed.forecasters.parameters())


@pytest.mark.parametrize("spoil", [False, True])
def test_tuning_is_kept_only_when_held_out_text_agrees(spoil, tmp_path, monkeypatch):
    real, seen = forecast.tune_forecasters, {}

    def tune(routed, data, cfg, accelerator):
        seen["fitted"] = {k: v.clone() for k, v in routed.forecasters.state_dict().items()}
        tokens = real(routed, data, cfg, accelerator)
        if spoil:  # tuning that ruins the forecasts (sign-gradient ascent on held-out text): the guard must undo it
            bank = routed.forecasters.requires_grad_(True)
            for _ in range(5):
                logits = routed(input_ids=data.val).logits[:, :-1]
                nn.functional.cross_entropy(logits.flatten(0, 1), data.val[:, 1:].flatten()).backward()
                with torch.no_grad():
                    for p in bank.parameters():
                        p.add_(0.3 * p.grad.sign())
                        p.grad = None
            bank.requires_grad_(False)
        seen["tuned"] = {k: v.clone() for k, v in routed.forecasters.state_dict().items()}
        return tokens

    monkeypatch.setattr(forecast, "tune_forecasters", tune)  # where fit_and_tune looks it up
    ids = torch.randint(0, 128, (12, 16), generator=torch.Generator().manual_seed(0))
    data = PackedData(ids, ids[:4], "t")  # held-out = training text: honest tuning lowers its loss
    cfg = TrainConfig(output=str(tmp_path / "out"), steps=4, seq_len=16, batch_size=2, checkpoint_every=0,
                      progress=False, val_sequences=4, target_sparsity=0.5, forecaster_rank=2, forecaster_steps=10,
                      forecaster_lr=1e-2)
    routed = RoutedModel(make_tiny("llama"), SkipConfig(forecaster_rank=2, target_sparsity=0.5))
    result = trainer.train(cfg, routed=routed, data=data)
    record = result.routed.config.extra["forecaster_tuning"]
    assert record["kept"] is not spoil
    want = seen["fitted" if spoil else "tuned"]
    assert all(torch.equal(v, want[k]) for k, v in result.routed.forecasters.state_dict().items())
    assert (record["held_out_ppl_tuned"] > record["held_out_ppl_fitted"]) is spoil
    # the final model is the one whose held-out perplexity was measured: forecasters and threshold restored
    chosen = record["held_out_ppl_fitted" if spoil else "held_out_ppl_tuned"]
    assert result.summary["held_out_ppl"] == pytest.approx(chosen, rel=1e-6)


def test_fit_moments_take_rows_from_a_gpu_model():
    """A model on a GPU hands the fit GPU rows; the moments stay on the CPU. Fake tensors stand in for CUDA
    ones on any machine: they keep the device and refuse to mix two in one op (before: torch.cat of the GPU
    rows with a CPU column of ones)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from skipgpt.training.forecast import Moments

    with FakeTensorMode():
        m = Moments(8)
        m.add(torch.randn(5, 8, device="cuda"), torch.randn(5, 8, device="cuda"))
        assert m.xx.device.type == m.xy.device.type == "cpu"
        assert m.xx.shape == (9, 9) and m.xy.shape == (9, 8) and m.rows == 5


def test_no_calibrate_keeps_the_threshold_through_forecaster_tuning(tmp_path, monkeypatch):
    """--no-calibrate with informed skipping: the forecasters are still tuned (at the trained threshold), and the
    threshold is never calibrated (before: tuning calibrated it whatever --calibrate said)."""
    for module in (forecast, trainer):  # the forecaster phase calibrates in forecast, the final step in trainer
        monkeypatch.setattr(module, "calibrate_threshold",
                            lambda *a, **k: pytest.fail("calibrated under --no-calibrate"))
    ids = torch.randint(0, 128, (12, 16), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(output=str(tmp_path / "out"), steps=2, seq_len=16, batch_size=2, checkpoint_every=0,
                      progress=False, val_sequences=4, forecaster_rank=2, forecaster_steps=2, calibrate=False)
    routed = RoutedModel(make_tiny("llama"), SkipConfig(forecaster_rank=2))
    before = routed.threshold
    result = trainer.train(cfg, routed=routed, data=PackedData(ids, ids[:4], "t"))
    assert result.routed.threshold == before
    assert "forecaster_tuning" in result.routed.config.extra


def test_fitted_forecasters_are_not_refitted_on_dense_passes_before_the_routers_train(tmp_path, monkeypatch):
    """Continuing from informed routers: their fitted forecasters stay what the routers were trained with (before:
    replaced by a fit on every token of dense passes, the fit informed skipping starts from). Unfitted ones are
    still fitted first."""
    fits = []
    real = forecast.fit_forecasters

    def fit(routed, batches, on_policy, **kwargs):
        fits.append(on_policy)
        return real(routed, batches, on_policy, **kwargs)

    monkeypatch.setattr(forecast, "fit_forecasters", fit)
    ids = torch.randint(0, 128, (12, 16), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(output=str(tmp_path / "out"), steps=1, seq_len=16, batch_size=2, checkpoint_every=0,
                      progress=False, val_sequences=4, forecaster_rank=2, forecaster_steps=0)
    trainer.train(cfg, routed=RoutedModel(make_tiny("llama"), SkipConfig(forecaster_rank=2)),
                  data=PackedData(ids, ids[:4], "t"))
    assert fits == [False, True, True]  # dense start, then twice on the skipped tokens
    fits.clear()
    fitted = with_random_forecasters(RoutedModel(make_tiny("llama"), SkipConfig(forecaster_rank=2)))
    trainer.train(TrainConfig(**{**cfg.to_dict(), "output": str(tmp_path / "again")}), routed=fitted,
                  data=PackedData(ids, ids[:4], "t"))
    assert fits == [True, True]


def test_a_nan_on_another_rank_stops_forecaster_tuning_on_this_one():
    """Under torchrun each rank checks the loss averaged over all ranks: a rank whose own loss is finite stops
    with the others (before the gradient reduce it would otherwise wait in), with the forecasters untouched."""
    class OtherRankNaN:  # rank 0 of 2, the other rank's loss NaN: every mean it reduces is NaN
        num_processes, process_index, device = 2, 0, torch.device("cpu")

        def reduce(self, t, op):
            return torch.full_like(t, float("nan"))

    routed = RoutedModel(make_tiny("llama"), SkipConfig(forecaster_rank=2))
    routed.force(policies.static(torch.tensor([[True, True], [True, False], [False, True]])))
    ids = torch.randint(0, 128, (8, 12), generator=torch.Generator().manual_seed(0))
    fit_forecasters(routed, [{"input_ids": ids}], on_policy=True)
    before = {k: v.clone() for k, v in routed.forecasters.state_dict().items()}
    cfg = TrainConfig(model="tiny", data="tiny", seq_len=12, batch_size=2, steps=3, forecaster_steps=5)
    with pytest.raises(TrainingError, match="forecaster step 1"):
        tune_forecasters(routed, PackedData(train=ids, val=ids, source="tiny"), cfg, OtherRankNaN())
    assert all(torch.equal(v, before[k].float()) for k, v in routed.forecasters.state_dict().items())
