"""Baselines: Block Influence against a hand computation, matched sparsity, MoD-D and coupled routing."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

import skipgpt
from skipgpt.baselines import (
    block_influence,
    coupled,
    mod_d,
    random_routing,
    shortgpt,
    static_modules,
)
from skipgpt.baselines.static import static_routed
from skipgpt.errors import ArtifactError, ConfigError

from conftest import TINY, make_tiny, one_error_line, run_cli


def batches(vocab: int = 128, n: int = 2, seq: int = 24, pad: bool = True):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, seq), generator=g)
        mask = torch.ones_like(ids)
        if pad:
            mask[1, -5:] = 0  # right padding must not count
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def deep_tiny(layers: int = 24, seed: int = 0):
    """Tiny llama with enough layers that one layer is a few percent of the parameters."""
    torch.manual_seed(seed)
    config = tf.LlamaConfig(**{**TINY, "num_hidden_layers": layers})
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return model.eval()


def hand_block_influence(model, data):
    """Residual states read with plain hooks on the unmodified HF model, cosines in a Python loop."""
    layers = model.model.layers
    L = len(layers)
    sums = torch.zeros(L, 3, dtype=torch.float64)  # attn, mlp, layer
    count = 0.0
    for batch in data:
        ins, attn_out, outs = {}, {}, {}
        hooks = []
        for i, layer in enumerate(layers):
            hooks.append(layer.register_forward_pre_hook(
                lambda m, a, k, i=i, ins=ins: ins.__setitem__(i, (a[0] if a else k["hidden_states"]).detach()),
                with_kwargs=True))
            hooks.append(layer.self_attn.register_forward_hook(
                lambda m, a, o, i=i, attn_out=attn_out: attn_out.__setitem__(i, o[0].detach())))
            hooks.append(layer.register_forward_hook(
                lambda m, a, o, i=i, outs=outs: outs.__setitem__(
                    i, (o[0] if isinstance(o, tuple) else o).detach())))
        with torch.no_grad():
            model(**batch)
        for h in hooks:
            h.remove()
        mask = batch["attention_mask"]
        for b in range(mask.shape[0]):
            for t in range(mask.shape[1]):
                if not mask[b, t]:
                    continue
                count += 1
                for i in range(L):
                    x, y = ins[i][b, t].double(), outs[i][b, t].double()
                    mid = x + attn_out[i][b, t].double()
                    cos = lambda u, v: float(u @ v / (u.norm() * v.norm()))  # noqa: E731
                    sums[i, 0] += cos(x, mid)
                    sums[i, 1] += cos(mid, y)
                    sums[i, 2] += cos(x, y)
    return 1.0 - sums / count


def test_block_influence_matches_hand_computation():
    model = make_tiny("llama")
    data = batches()
    got = block_influence(model, data)
    want = hand_block_influence(model, data)
    torch.testing.assert_close(got["module"], want[:, :2], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(got["layer"], want[:, 2], rtol=1e-6, atol=1e-8)
    assert torch.equal(torch.argsort(got["layer"]), torch.argsort(want[:, 2]))
    # the model is left unpatched: its output equals a fresh copy's
    assert not hasattr(model.model.layers[0], "__dict__") or "forward" not in model.model.layers[0].__dict__


def test_block_influence_ignores_pad_tokens():
    model = make_tiny("llama")
    data = batches(pad=True)
    garbled = [{"input_ids": b["input_ids"].clone(), "attention_mask": b["attention_mask"]} for b in data]
    for b in garbled:
        b["input_ids"][1, -5:] = 7  # change only padded positions (right padding: causal, so nothing else moves)
    torch.testing.assert_close(block_influence(model, data)["module"], block_influence(model, garbled)["module"])


@pytest.mark.parametrize("target", [0.25, 0.40])
def test_shortgpt_hits_target_and_removes_lowest_bi_layers(target):
    model = deep_tiny()
    data = batches()
    routed = shortgpt(model, None, target, data)
    keep = torch.tensor(routed.config.extra["keep"], dtype=torch.bool)
    assert torch.equal(keep[:, 0], keep[:, 1]), "ShortGPT removes whole layers"
    bi = block_influence(routed, data)["layer"]
    removed = (~keep[:, 0]).nonzero().flatten()
    kept = keep[:, 0].nonzero().flatten()
    assert bi[removed].max() <= bi[kept].min()
    routed.reset_sparsity()
    with torch.no_grad():
        for b in data:
            routed(**b)
    realised = routed.sparsity().param
    assert abs(realised - target) <= 0.02
    assert realised == pytest.approx(routed.config.extra["realised_param_sparsity"], abs=1e-9)


@pytest.mark.parametrize("kinds", ["both", "attn", "mlp"])
def test_static_module_removal_hits_target(kinds):
    model = deep_tiny()
    data = batches()
    target = 0.25 if kinds != "attn" else 0.2  # attention is a third of this model's parameters
    routed = static_modules(model, None, target, data, kinds=kinds)
    keep = torch.tensor(routed.config.extra["keep"], dtype=torch.bool)
    if kinds == "attn":
        assert keep[:, 1].all()
    if kinds == "mlp":
        assert keep[:, 0].all()
    with torch.no_grad():
        routed(**data[0])
    assert abs(routed.sparsity().param - target) <= 0.02
    # the modules skipped are exactly those of the keep mask, for every real token
    d = routed.decisions()
    assert torch.equal(d[:, :, 0, 0], keep)


def test_static_removal_equals_model_without_those_layers():
    model = deep_tiny(layers=6)
    data = batches(pad=False)
    routed = shortgpt(model, None, 0.34, data)
    keep = torch.tensor(routed.config.extra["keep"], dtype=torch.bool)[:, 0]
    with torch.no_grad():
        got = routed(**data[0]).logits
    routed.unpatch()
    pruned = deep_tiny(layers=6)
    pruned.model.layers = torch.nn.ModuleList([pruned.model.layers[i] for i in range(6) if keep[i]])
    for i, layer in enumerate(pruned.model.layers):
        layer.self_attn.layer_idx = i
    pruned.config.num_hidden_layers = int(keep.sum())
    pruned.config.layer_types = None
    with torch.no_grad():
        want = pruned(**data[0]).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_random_routing_matches_rates():
    model = deep_tiny(layers=8)
    rates = torch.linspace(0.1, 0.6, 16).reshape(8, 2)
    routed = random_routing(model, 0.3, skip_rates=rates, seed=3)
    ids = torch.randint(0, 128, (8, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        routed(input_ids=ids)
    rep = routed.sparsity()
    got = torch.tensor([rep.per_layer_attention, rep.per_layer_mlp]).T
    assert (got - rates).abs().max() < 0.08  # 512 Bernoulli draws per module
    assert abs(rep.param - routed.config.extra["expected_param_sparsity"]) < 0.02
    uniform = random_routing(deep_tiny(layers=8), 0.25)
    with torch.no_grad():
        uniform(input_ids=ids)
    assert abs(uniform.sparsity().param - 0.25) <= 0.02
    with pytest.raises(ConfigError):
        random_routing(deep_tiny(layers=8), 0.25, skip_rates=torch.zeros(3, 2))


def test_rate_and_threshold_tables_are_checked_when_given():
    nan = torch.full((8, 2), 0.25, dtype=torch.float64)
    nan[3, 1] = float("nan")
    with pytest.raises(ConfigError, match="NaN"):  # saved, it would be refused at load
        random_routing(deep_tiny(layers=8), 0.25, skip_rates=nan)
    with pytest.raises(ConfigError, match="NaN"):
        mod_d(deep_tiny(layers=8), 0.25, thresholds=nan)
    with pytest.raises(ConfigError, match=r"\(8, 2\) table"):
        mod_d(deep_tiny(layers=8), 0.25, thresholds=[[0.0, 0.0]])
    # a list of thresholds decides as the same table as a tensor does
    table = torch.linspace(-0.2, 0.2, 16, dtype=torch.float64).reshape(8, 2)
    data = batches(pad=False)
    decisions = []
    for thresholds in (table, table.tolist()):
        routed = mod_d(deep_tiny(layers=8), 0.25, thresholds=thresholds)  # deep_tiny seeds: the same routers
        with torch.no_grad():
            routed(**data[0])
        decisions.append(routed.decisions())
    assert torch.equal(decisions[0], decisions[1])


def test_mod_d_topk_capacity_gradient_and_causal_threshold():
    model = make_tiny("llama")
    routed = mod_d(model, 0.4)
    routed.freeze_base()
    data = batches(pad=True)
    with torch.no_grad():  # give the routers some non-constant scores
        for r in list(routed.routers.attn) + list(routed.routers.mlp):
            r.net.weight.normal_(0, 1.0)
    routed.routers.train()
    out = routed(**data[0], labels=data[0]["input_ids"])
    d = routed.decisions()
    real = data[0]["attention_mask"].bool()
    executed = d[..., 0, :][..., real[0]].float().mean()
    assert executed == pytest.approx(round(24 * 0.6) / 24, abs=1e-6)  # exact top-k capacity per sequence
    assert not d[..., 1, :][..., ~real[1]].any(), "pads never take capacity"
    out.loss.backward()
    grads = [r.net.weight.grad for r in routed.routers.attn]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    # inference: causal thresholds calibrated to the capacity, and decode of one token works
    routed.routers.eval()
    routed.policy.calibrate(data)
    routed.reset_sparsity()
    with torch.no_grad():
        for b in data:
            routed(**b)
    assert abs(routed.sparsity().module - 0.4) < 0.03  # calibrated causally: on target on its own text
    # causality: changing the last token does not change earlier decisions under the threshold rule
    ids = data[0]["input_ids"][:1].clone()
    with torch.no_grad():
        routed(input_ids=ids)
        before = routed.decisions()[..., :-1].clone()
        ids[0, -1] = (ids[0, -1] + 1) % 128
        routed(input_ids=ids)
    assert torch.equal(before, routed.decisions()[..., :-1])
    with torch.no_grad():
        generated = routed.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 3


def test_dynamic_baselines_take_the_router_design_of_a_plain_model():
    # `config` picks the routers a plain HF model is wrapped with; the target is the baseline's own
    for build in (coupled, mod_d):
        routed = build(make_tiny("llama"), 0.3, skipgpt.SkipConfig(router="mlp", target_sparsity=0.5))
        assert routed.config.router == "mlp" and not routed.routers.attn[0].linear
        assert routed.config.target_sparsity == 0.3


def test_coupled_skips_attention_and_mlp_together(tmp_path):
    model = make_tiny("llama")
    routed = coupled(model, 0.3)
    with torch.no_grad():
        for r in routed.routers.attn:
            r.net.weight.normal_(0, 1.0)
            r.net.bias.zero_()
    routed.routers.eval()
    data = batches(pad=False)
    with torch.no_grad():
        routed(**data[0])
    d = routed.decisions()
    assert torch.equal(d[:, 0], d[:, 1])
    assert 0 < (~d).float().mean() < 1
    routed.routers.train()
    routed.freeze_base()
    routed(**data[0], labels=data[0]["input_ids"]).loss.backward()
    assert routed.routers.attn[0].net.weight.grad is not None
    assert all(r.net.weight.grad is None for r in routed.routers.mlp), "MLP routers are unused"
    # saved and restored with its policy, the decisions are identical
    routed.routers.eval()
    skipgpt.save_routers(routed, tmp_path / "coupled")
    routed.unpatch()
    again = skipgpt.load_routers(make_tiny("llama"), tmp_path / "coupled")
    again.routers.eval()
    with torch.no_grad():
        again(**data[0])
    assert torch.equal(again.decisions(), d)


def test_static_baselines_round_trip(tmp_path):
    model = deep_tiny(layers=8)
    data = batches()
    routed = static_modules(model, None, 0.25, data)
    with torch.no_grad():
        want = routed(**data[0]).logits
    skipgpt.save_routers(routed, tmp_path / "static")
    routed.unpatch()
    again = skipgpt.load_routers(deep_tiny(layers=8), tmp_path / "static")
    with torch.no_grad():
        torch.testing.assert_close(again(**data[0]).logits, want)
    again.unpatch()
    bad = skipgpt.SkipConfig.load(tmp_path / "static" / "skip_config.json")
    bad.extra["routing"] = "teleport"
    (tmp_path / "static" / "skip_config.json").write_text(bad.to_json())
    with pytest.raises(ArtifactError, match="teleport"):
        skipgpt.load_routers(deep_tiny(layers=8), tmp_path / "static")


def test_static_needs_calibration():
    with pytest.raises(ConfigError, match="calibration"):
        shortgpt(make_tiny("llama"), None, 0.25, [])


class CharTokenizer:
    def __call__(self, text, return_tensors=None):
        ids = [ord(c) % 128 for c in text]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


def test_shortgpt_accepts_calibration_texts():
    texts = ["a calibration sentence of some length", "and another one, a little longer than that"]
    tok = CharTokenizer()
    from_texts = shortgpt(deep_tiny(layers=8), tok, 0.25, texts)
    from_ids = shortgpt(deep_tiny(layers=8), None, 0.25, [tok(t, return_tensors="pt") for t in texts])
    assert from_texts.config.extra["keep"] == from_ids.config.extra["keep"]
    with pytest.raises(ConfigError, match="tokenizer"):
        shortgpt(deep_tiny(layers=8), None, 0.25, texts)


def test_static_baselines_accept_a_tokenizers_batch_encoding():
    data = batches()
    from_dicts = static_modules(deep_tiny(layers=8), None, 0.25, data)
    from_encodings = static_modules(deep_tiny(layers=8), None, 0.25, [tf.BatchEncoding(b) for b in data])
    assert from_encodings.config.extra["block_influence"] == from_dicts.config.extra["block_influence"]


def test_one_text_or_one_batch_is_one_calibration_batch_and_empty_texts_are_skipped():
    """list() split one text into characters and one BatchEncoding into its key names, silently."""
    tok, text = CharTokenizer(), "a calibration sentence of some length"
    data = batches()[0]
    one = static_modules(deep_tiny(layers=8), tok, 0.25, text).config.extra["block_influence"]
    assert one == static_modules(deep_tiny(layers=8), tok, 0.25, [text, ""]).config.extra["block_influence"]
    assert (static_modules(deep_tiny(layers=8), None, 0.25, tf.BatchEncoding(data)).config.extra["block_influence"]
            == static_modules(deep_tiny(layers=8), None, 0.25, [data]).config.extra["block_influence"])
    with pytest.raises(ConfigError, match="dict with input_ids"):
        shortgpt(deep_tiny(layers=8), None, 0.25, data["input_ids"])  # was "Boolean value of Tensor ... ambiguous"


@pytest.mark.parametrize("refused", [
    lambda m: static_modules(m, None, 0.25, batches(), kinds="ATTN"),
    lambda m: shortgpt(m, None, 0.25, []),
    lambda m: mod_d(m, 0.25, thresholds=[[0.0, 0.0]]),
    lambda m: random_routing(m, 0.25, skip_rates=torch.ones(2, 2)),
    lambda m: static_routed(m, torch.ones(3, 2), "static", 0.25),
], ids=["kinds", "no calibration", "thresholds", "skip rates", "keep table"])
def test_a_refused_baseline_leaves_the_plain_model_as_it_was(refused):
    """The builders routed the caller's model before checking their input: a refused call left it routed, and the
    retry with good input was refused as "already routed"."""
    model = deep_tiny(layers=8)
    ids = torch.arange(12)[None]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with pytest.raises(ConfigError):
        refused(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    assert shortgpt(model, None, 0.25, batches()).config.extra["realised_param_sparsity"] > 0


def test_a_refused_baseline_leaves_a_callers_routed_model_at_its_target():
    routed = skipgpt.RoutedModel(deep_tiny(layers=8), skipgpt.SkipConfig(target_sparsity=0.1))
    with pytest.raises(ConfigError):
        mod_d(routed, 0.4, thresholds=[[0.0, 0.0]])
    assert routed.config.target_sparsity == 0.1


def test_static_routed_takes_a_0_1_keep_table():
    """~keep on integers is a bitwise not: the recorded sparsity was -1.75 for a model that skips a quarter."""
    keep = torch.ones(8, 2, dtype=torch.int64)
    keep[:2] = 0
    routed = static_routed(deep_tiny(layers=8), keep, "static", 0.25)
    assert routed.config.extra["realised_param_sparsity"] == pytest.approx(0.25)
    with torch.no_grad():
        routed(**batches()[0])
    assert routed.sparsity().param == pytest.approx(0.25)
    with pytest.raises(ConfigError, match="holds other values"):
        static_routed(deep_tiny(layers=8), keep * 2, "static", 0.25)


@pytest.mark.slow
@pytest.mark.parametrize("target", [0.25, 0.40])
def test_smollm2_static_baselines_hit_target(smollm2, target):
    model, tok = smollm2
    texts = ["The history of the city begins with a small settlement on the river, where traders met each spring.",
             "To make bread, mix flour, water, salt and yeast, knead the dough and let it rise for an hour."]
    for build in (shortgpt, static_modules):
        routed = build(model, tok, target, texts)
        try:
            with torch.no_grad():
                routed(**tok(texts[0], return_tensors="pt"))
            assert abs(routed.sparsity().param - target) <= 0.02, build.__name__
        finally:
            routed.unpatch()


def test_baselines_run_in_sparse_mode():
    """The sparse inference path accepts every baseline and gives the masked path's logits."""
    data = batches(pad=False)
    built = [
        shortgpt(deep_tiny(layers=8), None, 0.25, data),
        static_modules(deep_tiny(layers=8), None, 0.25, data),
        mod_d(deep_tiny(layers=8), 0.25, thresholds=torch.zeros(8, 2)),
        coupled(deep_tiny(layers=8), 0.25),
    ]
    for routed in built:
        with torch.no_grad():
            for r in list(routed.routers.attn) + list(routed.routers.mlp):
                r.net.weight.normal_(0, 1.0)
                r.net.bias.zero_()
        routed.routers.eval()
        with torch.no_grad():
            masked = routed(**data[0]).logits
            with routed.mode_as("sparse"):
                sparse = routed(**data[0]).logits
        torch.testing.assert_close(sparse, masked, rtol=1e-4, atol=1e-4)
        assert not routed.decisions().all(), routed.config.extra["routing"]


def test_bench_calibrates_a_coupled_baseline_and_refuses_a_fixed_one(tmp_path, tiny_dir, capfd):
    """--sparsity sets the routers' threshold: the coupled variant decides by it, ShortGPT's fixed policy does not."""
    model_dir = str(tiny_dir / "model")
    routed = coupled(skipgpt.load_model(model_dir)[0], 0.3)
    with torch.no_grad():
        for r in routed.routers.attn:
            r.net.weight.normal_(0, 1.0)
    skipgpt.save_routers(routed, tmp_path / "coupled")
    skipgpt.save_routers(shortgpt(skipgpt.load_model(model_dir)[0], None, 0.3, batches()), tmp_path / "shortgpt")
    bench = ["bench", "--model", model_dir, "--seq-len", "16", "--batch-size", "2", "--decode-tokens", "8",
             "--repeats", "1"]
    realised = []
    for target in ("0.1", "0.6"):
        out = tmp_path / f"b{target}.json"
        argv = [*bench, "--routers", str(tmp_path / "coupled"), "--sparsity", target, "--output", str(out)]
        assert run_cli(argv) == 0
        s = json.loads(out.read_text())["sparsity"]
        assert s["attention"] == pytest.approx(s["mlp"])
        realised.append(s["param"])
    assert realised[0] < realised[1], realised
    capfd.readouterr()
    argv = [*bench, "--routers", str(tmp_path / "shortgpt"), "--sparsity", "0.3", "--output", str(tmp_path / "s.json")]
    assert run_cli(argv) == 2
    assert "drop --sparsity" in one_error_line(capfd.readouterr().err, "bench", model_loaded=True)
    assert not (tmp_path / "s.json").exists()
    # info says how each folder decides: a fixed policy has no threshold to report
    for folder, says in (("shortgpt", "routing: shortgpt baseline"), ("coupled", "threshold +0.000")):
        assert run_cli(["info", "--model", model_dir, "--routers", str(tmp_path / folder)]) == 0
        assert says in capfd.readouterr().out


def test_mod_d_at_full_capacity_executes_every_token_once_calibrated():
    """The calibrated threshold is a quantile of the scores: at capacity 1 it is the lowest score, which must
    execute (a strict comparison skipped it in every module)."""
    routed = mod_d(make_tiny("llama"), 0.0)
    with torch.no_grad():
        for r in (*routed.routers.attn, *routed.routers.mlp):
            r.net.weight.normal_(0, 1.0)
    data = batches(pad=False)
    routed.policy.calibrate(data)
    routed.reset_sparsity()
    with torch.no_grad():
        routed(**data[0])
    assert routed.sparsity().module == 0.0


def test_a_mod_d_baseline_saved_before_calibration_is_refused(tmp_path):
    """Uncalibrated, MoD-D routes each sequence on top-k, so a token's decision would read later tokens."""
    routed = mod_d(make_tiny("llama"), 0.25)
    skipgpt.save_routers(routed, tmp_path / "r")
    with pytest.raises(ArtifactError, match="saved before its thresholds were calibrated"):
        skipgpt.load_routers(make_tiny("llama"), tmp_path / "r")
    routed.policy.calibrate(batches())
    skipgpt.save_routers(routed, tmp_path / "r")
    assert skipgpt.load_routers(make_tiny("llama"), tmp_path / "r").policy.thresholds is not None


def test_baselines_refuse_a_model_with_forecasters():
    """Their parameter sparsity is reckoned on whole modules, the meter's on a forecaster's net saving: ShortGPT
    recorded 25% where the meter measured 23.4%."""
    routed = skipgpt.RoutedModel(make_tiny("llama"), skipgpt.SkipConfig(forecaster_rank=2))
    ids = {"input_ids": torch.randint(0, 128, (2, 8))}
    with pytest.raises(ConfigError, match="rank-2 forecasters"):
        shortgpt(routed, None, 0.25, [ids])
    assert "routing" not in routed.config.extra
    model = make_tiny("llama")
    with pytest.raises(ConfigError, match="without forecasters"):
        mod_d(model, 0.25, skipgpt.SkipConfig(forecaster_rank=2))
    assert "forward" not in model.model.layers[0].__dict__  # not left routed


@pytest.mark.parametrize("batch, message", [
    ({"input_ids": torch.arange(10)}, r"a \(batch, tokens\) tensor"),  # before: a TypeError inside routing
    ({"input_ids": [[1, 2, 3]]}, r"a \(batch, tokens\) tensor"),  # before: an AttributeError
    ({"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.tensor([[1, 1]])}, "the shape of its input_ids"),
], ids=["1-D", "list", "short mask"])
def test_calibration_batches_of_the_wrong_form_are_one_error(batch, message):
    with pytest.raises(ConfigError, match=message):
        shortgpt(make_tiny("llama"), None, 0.25, [batch])


def test_mod_d_calibration_on_batches_it_cannot_join_or_use_is_one_error():
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ConfigError, match="all have an attention_mask, or none"):  # before: a KeyError
        mod_d(make_tiny("llama"), 0.25).policy.calibrate([{"input_ids": ids, "attention_mask": torch.ones(1, 4)},
                                                          {"input_ids": ids}])
    with pytest.raises(ConfigError, match="only padding"):  # before: quantile() of an empty tensor
        mod_d(make_tiny("llama"), 0.25).policy.calibrate([{"input_ids": ids, "attention_mask": torch.zeros(1, 4)}])
