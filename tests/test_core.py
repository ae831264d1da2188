"""Routed-model core: parity with the unmodified HF model, forced routing, determinism, accounting."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from skipgpt import RoutedModel, SkipConfig
from skipgpt.errors import ConfigError, DataError, UnsupportedModelError
from skipgpt.models.adapters import find_decoder
from skipgpt.routing import policies
from skipgpt.routing.sparsity import SparsityMeter, report

from conftest import ARCHS, linear_router_share, make_tiny, varied_routers


def ids_and_mask(vocab: int = 128, batch: int = 2, seq: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, :3] = 0  # left padding on the second row
    return ids, mask


def skip_everything_reference(model, ids):
    """Logits when every module is skipped: the embedding goes straight to the final norm and head."""
    hf = model.model
    h = hf.embed_tokens(ids)
    cfg = model.config
    if cfg.model_type.startswith("gemma"):
        h = h * torch.tensor(cfg.hidden_size**0.5, dtype=h.dtype)
    logits = model.lm_head(hf.norm(h))
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@pytest.mark.parametrize("arch", ARCHS)
def test_execute_all_equals_hf_model(arch):
    model = make_tiny(arch)
    ids, mask = ids_and_mask()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    routed = RoutedModel(model)
    with torch.no_grad(), routed.forced("execute"):
        got = routed(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert routed.sparsity().param == 0.0  # a fixed policy decided: no router ran
    # Fresh routers start from "execute everything" too (zero weights, execute bias); they ran on every real token,
    # which the net sparsity charges.
    routed.reset_sparsity()
    with torch.no_grad():
        got = routed(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert routed.sparsity().module == 0.0
    assert routed.sparsity().param == pytest.approx(-linear_router_share(model), rel=1e-12)


@pytest.mark.parametrize("arch", ARCHS)
def test_skip_all_passes_the_residual_stream_through(arch):
    model = make_tiny(arch)
    ids, _ = ids_and_mask()
    with torch.no_grad():
        expected = skip_everything_reference(model, ids)
        routed = RoutedModel(model)
        got = routed.force("skip")(input_ids=ids).logits
    torch.testing.assert_close(got, expected)
    assert routed.sparsity().param == pytest.approx(1.0)


def test_static_mask_equals_hf_model_with_modules_zeroed():
    """Skipping a module for every token equals an HF model whose module output is zero."""
    model = make_tiny("llama")
    ids, mask = ids_and_mask()
    keep = torch.tensor([[True, False], [False, True], [True, True]])
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(zeroed.model.layers):
            if not keep[i, 0]:
                layer.self_attn.o_proj.weight.zero_()
            if not keep[i, 1]:
                layer.mlp.down_proj.weight.zero_()
        expected = zeroed(input_ids=ids, attention_mask=mask).logits
        got = RoutedModel(model).force(policies.static(keep))(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected)


def test_argmax_routing_is_deterministic_and_matches_router_logits():
    model = make_tiny("llama")
    ids, mask = ids_and_mask()
    routed = RoutedModel(model)
    torch.manual_seed(3)
    for p in routed.routers.parameters():
        torch.nn.init.normal_(p, std=1.0)
    routed.routers.eval()
    with torch.no_grad():
        a = routed(input_ids=ids, attention_mask=mask).logits
        d1 = routed.decisions()
        b = routed(input_ids=ids, attention_mask=mask).logits
        d2 = routed.decisions()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(d1, d2)
    assert 0 < d1.float().mean() < 1  # a real mix of decisions, not a trivial case
    # The first attention decision reads the embeddings: check it against the router by hand.
    x = model.model.embed_tokens(ids)
    logits = routed.routers.attn[0](x)
    assert torch.equal(d1[0, 0], logits[..., 1] - logits[..., 0] <= 0)


def test_threshold_dials_sparsity_monotonically():
    model = make_tiny("llama")
    ids, _ = ids_and_mask()
    routed = RoutedModel(model)
    torch.manual_seed(0)
    for p in routed.routers.parameters():
        torch.nn.init.normal_(p, std=1.0)
    seen = []
    for t in (-5.0, 0.0, 5.0):
        routed.threshold = t
        routed.reset_sparsity()
        with torch.no_grad():
            routed(input_ids=ids)
        seen.append(routed.sparsity().module)
    assert seen[0] > seen[1] > seen[2]


def test_sparsity_accounting_against_hand_computation():
    model = make_tiny("llama")
    routed = RoutedModel(model)
    ids, mask = ids_and_mask(batch=2, seq=6)
    g = torch.Generator().manual_seed(5)
    masks = torch.rand(3, 2, 2, 6, generator=g) > 0.5
    with torch.no_grad():
        routed.force(masks)(input_ids=ids, attention_mask=mask)
    report = routed.sparsity()

    real = mask.bool()
    n = int(real.sum())
    skipped = [[int((~masks[i, k] & real).sum()) for k in range(2)] for i in range(3)]
    attn_p = [sum(p.numel() for p in lay.self_attn.parameters()) + lay.input_layernorm.weight.numel()
              for lay in model.model.layers]
    mlp_p = [sum(p.numel() for p in lay.mlp.parameters()) + lay.post_attention_layernorm.weight.numel()
             for lay in model.model.layers]
    assert report.tokens == n == 9
    assert report.module == pytest.approx(sum(map(sum, skipped)) / (6 * n))
    assert report.attention == pytest.approx(sum(s[0] for s in skipped) / (3 * n))
    assert report.mlp == pytest.approx(sum(s[1] for s in skipped) / (3 * n))
    skipped_params = sum(s[0] * a + s[1] * m for s, a, m in zip(skipped, attn_p, mlp_p))
    expected_param = skipped_params / (n * (sum(attn_p) + sum(mlp_p)))
    assert report.param == pytest.approx(expected_param)
    assert report.per_layer_attention == pytest.approx([s[0] / n for s in skipped])

    # FLOPs: q/o projections and the attention product are skippable, k/v projections are not.
    d, heads, hd, inter = 32, 4, 8, 64
    kv = 2 * 2 * d * (2 * hd)
    mlp = 2 * 3 * d * inter
    skipped_flops = total_flops = 0.0
    keys = mask.cumsum(-1)  # a token reads the real keys up to its own, not the left padding before them
    for i in range(3):
        for b in range(2):
            for t in range(6):
                if not real[b, t]:
                    continue
                attn = 2 * 2 * d * d + 4 * heads * hd * int(keys[b, t])
                total_flops += attn + kv + mlp
                skipped_flops += attn * (not masks[i, 0, b, t]) + mlp * (not masks[i, 1, b, t])
    assert report.flop == pytest.approx(skipped_flops / total_flops)


def test_routers_are_charged_on_every_token_they_decide_for_by_hand():
    """Routers run before every module whatever they decide: net sparsity charges their parameters (and 2 FLOPs
    each) per real token; a fixed policy runs none; the coupled variant runs the attention routers only."""
    model = make_tiny("llama")
    routed = RoutedModel(model)  # fresh routers: everything executes
    ids, mask = ids_and_mask(batch=2, seq=6)
    real = mask.bool()
    d, heads, hd, inter = 32, 4, 8, 64
    router = d + 1  # Linear(d, 2) per module, its two rows folded into one at inference
    per_token = 0.0  # decoder FLOPs of the real tokens, summed (as in the hand computation above)
    for b in range(2):
        for t in range(6):
            if real[b, t]:
                per_token += 3 * (2 * 2 * d * d + 4 * heads * hd * int(mask.cumsum(-1)[b, t]) + 2 * 2 * d * (2 * hd)
                                  + 2 * 3 * d * inter)
    n = int(real.sum())

    def own(layer, kind, x):  # a policy of one's own that says what router work it runs
        return torch.ones(x.shape[:-1], dtype=torch.bool)

    own.router_share = 0.25
    for policy, share in ((None, 1.0), (policies.CoupledPolicy(routed), 0.5),
                          (policies.static(torch.ones(3, 2, dtype=torch.bool)), 0.0), (own, 0.25)):
        routed.force(policy).reset_sparsity()
        with torch.no_grad():
            routed(input_ids=ids, attention_mask=mask)
        report = routed.sparsity()
        assert report.module == 0.0
        assert report.param == pytest.approx(-share * linear_router_share(model), rel=1e-12, abs=1e-15)
        assert report.flop == pytest.approx(-share * n * 3 * 2 * 2 * router / per_token, rel=1e-12, abs=1e-15)


def test_flop_accounting_of_a_row_does_not_depend_on_its_left_padding():
    """A plain forward gives position ids 0..T-1 whatever the padding; the attention product of a left-padded
    row still reads only its real keys, as in generate() (which passes position ids from the mask)."""
    model = make_tiny("llama")
    routed = RoutedModel(model)
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(2))
    masks = torch.rand(3, 2, 1, 7, generator=torch.Generator().manual_seed(3)) > 0.5
    with torch.no_grad():
        routed.force(masks)(input_ids=ids)
    alone = routed.meter.totals
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], dim=1)
    routed.reset_sparsity()
    with torch.no_grad():
        routed.force(torch.cat([torch.ones(3, 2, 1, 4, dtype=torch.bool), masks], dim=-1))(
            input_ids=padded, attention_mask=mask)
    for key in ("flop_total", "flop_skipped", "tokens"):
        assert float(routed.meter.totals[key]) == pytest.approx(float(alone[key])), key


def test_flop_accounting_reads_only_the_keys_a_sliding_window_layer_sees():
    """Gemma 2 alternates sliding (window 16) and global layers: a token at position 40 reads 16 keys in the
    first, 41 in the second."""
    model = make_tiny("gemma2")
    assert [lay.self_attn.sliding_window for lay in model.model.layers] == [16, None, 16]
    routed = RoutedModel(model)
    T = 48
    masks = torch.rand(3, 2, 1, T, generator=torch.Generator().manual_seed(1)) > 0.5
    with torch.no_grad():
        routed.force(masks)(input_ids=torch.randint(0, 128, (1, T)))
    totals = routed.meter.totals
    c = routed.costs
    total = skipped = 0.0
    for i, window in enumerate([16, None, 16]):
        for t in range(T):
            keys = t + 1 if window is None else min(t + 1, window)
            attn = float(c.attn_flops[i] + c.attn_ctx_flops[i] * keys)
            total += attn + float(c.attn_kv_flops[i] + c.mlp_flops[i])
            skipped += attn * (not masks[i, 0, 0, t]) + float(c.mlp_flops[i]) * (not masks[i, 1, 0, t])
    assert float(totals["flop_total"]) == pytest.approx(total)
    assert float(totals["flop_skipped"]) == pytest.approx(skipped)


def test_realised_sparsity_is_differentiable_in_training():
    model = make_tiny("llama")
    routed = RoutedModel(model, SkipConfig(target_sparsity=0.5))
    routed.freeze_base()
    routed.routers.train()
    routed.temperature = 2.0
    ids, mask = ids_and_mask()
    routed(input_ids=ids, attention_mask=mask)
    s = routed.realised_sparsity("param")["target_metric"]
    s.backward()
    grads = [p.grad for p in routed.routers.parameters()]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.parameters())


def test_state_dict_keys_stay_stock():
    model = make_tiny("llama")
    before = list(model.state_dict().keys())
    routed = RoutedModel(model)
    assert list(routed.model.state_dict().keys()) == before
    assert not any("router" in k for k in before)
    assert routed.unpatch() is model
    assert "forward" not in model.model.layers[0].__dict__


def test_unsupported_model_names_what_is_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(UnsupportedModelError, match="supports"):
        RoutedModel(model)


@pytest.mark.parametrize("name,options", [("Granite", {"residual_multiplier": 0.5}), ("Olmo", {"clip_qkv": 1.0}),
                                          ("Helium", {}), ("StableLm", {}), ("SmolLM3", {"pad_token_id": 0})])
def test_llama_shaped_relatives_that_routing_would_get_wrong_are_refused(name, options):
    """These have the LLaMA layer's parts but scale the residual, clip q/k/v, rotate other pairs or parts of a
    head, or leave RoPE out of some layers: routed they gave wrong logits (or crashed) instead of an error."""
    import transformers as tf

    from conftest import TINY

    config = getattr(tf, f"{name}Config")(**TINY, **options)
    model = getattr(tf, f"{name}ForCausalLM")(config)
    with pytest.raises(UnsupportedModelError, match=f"{config.model_type!r} is not supported"):
        RoutedModel(model)


def test_a_multimodal_gemma3_is_refused_with_what_to_load_instead():
    import transformers as tf

    from conftest import TINY

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = tf.Gemma3Config(text_config=dict(TINY, head_dim=16), vision_config=vision, mm_tokens_per_image=4)
    with pytest.raises(UnsupportedModelError, match="multimodal.*gemma3_text"):
        RoutedModel(tf.AutoModelForCausalLM.from_config(config))


def test_bad_config_values():
    with pytest.raises(ConfigError, match="target sparsity"):
        SkipConfig(target_sparsity=1.5)
    with pytest.raises(ConfigError, match="router"):
        SkipConfig(router="conv")
    with pytest.raises(ConfigError):
        SkipConfig(target_sparsity=float("nan"))


def test_config_round_trips_through_json():
    c = SkipConfig(router="mlp", router_input="layer", target_sparsity=0.4, threshold=-1.5, extra={"steps": 3})
    assert SkipConfig.from_json(c.to_json()) == c


@pytest.mark.slow
def test_smollm2_parity_and_skip_all(smollm2):
    model, tok = smollm2
    batch = tok(["The quick brown fox jumps over the lazy dog.", "Hello there"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**batch).logits
        routed = RoutedModel(model)
        try:
            got = routed(**batch).logits
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
            skipped = routed.force("skip")(**batch).logits
            torch.testing.assert_close(skipped, skip_everything_reference(model, batch["input_ids"]))
        finally:
            routed.unpatch()


def test_layer_input_option_feeds_the_mlp_router_the_layer_input():
    model = make_tiny("llama")
    ids, _ = ids_and_mask()
    routed = RoutedModel(model, SkipConfig(router_input="layer"))
    torch.manual_seed(2)
    for p in routed.routers.parameters():
        torch.nn.init.normal_(p, std=1.0)
    with torch.no_grad():
        routed(input_ids=ids)
        x = model.model.embed_tokens(ids)
        logits = routed.routers.mlp[0](x)
    assert torch.equal(routed.decisions()[0, 1], logits[..., 1] - logits[..., 0] <= 0)


def test_gumbel_sampling_at_inference_is_an_explicit_option():
    model = make_tiny("llama")
    ids, _ = ids_and_mask(seq=40)
    routed = RoutedModel(model)
    with torch.no_grad():
        for r in list(routed.routers.attn) + list(routed.routers.mlp):
            r.net.bias.zero_()  # 50/50 logits: argmax executes, sampling skips about half
        routed(input_ids=ids)
        assert routed.decisions().all()
        routed.sample = True
        torch.manual_seed(0)
        routed(input_ids=ids)
        first = routed.decisions()
        torch.manual_seed(0)
        routed(input_ids=ids)
    assert torch.equal(first, routed.decisions())
    assert 0.3 < first.float().mean() < 0.7


def test_gradient_checkpointing_gives_the_same_router_gradients():
    ids, mask = ids_and_mask()
    grads = []
    for ckpt in (False, True):
        routed = RoutedModel(make_tiny("llama"))
        routed.freeze_base()
        routed.routers.train()
        routed.gradient_checkpointing = ckpt
        torch.manual_seed(11)
        out = routed(input_ids=ids, attention_mask=mask).logits
        (out.float().pow(2).mean() + routed.realised_sparsity()["param"]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in routed.routers.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


def _two_passes_then_backward(routed: RoutedModel, seed: int):
    """Gradient accumulation: two forward passes, one backward; the gradients, and what the meter counted. The
    second pass runs under other settings, which are back to the first's when backward recomputes both."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randint(0, 128, (2, 12), generator=g), torch.randint(0, 128, (3, 7), generator=g)
    routed.reset_sparsity()
    torch.manual_seed(5)
    loss = routed(input_ids=a, use_cache=False).logits.float().pow(2).mean()
    decided = routed.decisions().clone()
    with routed.using(temperature=0.5, noise=0.0):
        loss = loss + routed(input_ids=b, use_cache=False).logits.float().pow(2).mean()
    last = routed.decisions().clone()
    loss.backward()
    assert torch.equal(routed.decisions(), last)  # backward left the last pass's decisions alone
    grads = torch.cat([p.grad.flatten() for p in routed.parameters() if p.grad is not None])
    return grads, decided, last, routed.sparsity()


@pytest.mark.parametrize("routing", ["random policy", "frozen routers", "training routers", "sampled, dropout",
                                     "mod-d, frozen routers"])
def test_checkpointed_layers_recompute_the_decisions_their_pass_made(routing):
    """Recomputation in backward belongs to its own pass (another may have run since) and settings, and must
    make its decisions as the forward did: the random baseline's generator is not replayed (a second draw
    trained the base on decisions never made), while a sample from the global RNG must be drawn again (dropout
    after it draws from the same stream), and a policy that runs router layers saves nothing to recompute."""
    from skipgpt.baselines import mod_d

    results = []
    for ckpt in (False, True):
        routed = varied_routers(1, model=make_tiny("llama", attention_dropout=0.3 * (routing == "sampled, dropout")))
        if routing == "random policy":
            routed.force(policies.random(torch.full((len(routed.layers), 2), 0.5), seed=0))
        if routing == "training routers":
            routed.freeze_base()
            routed.routers.train()
        if routing == "sampled, dropout":
            routed.sample = True
            routed.model.train()
        if routing == "mod-d, frozen routers":  # router parameters still require grad, as loaded
            routed = mod_d(routed, 0.5)
            calibration = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(9))
            with torch.no_grad():
                routed.policy.calibrate([{"input_ids": calibration}])
        routed.gradient_checkpointing = ckpt
        results.append(_two_passes_then_backward(routed, seed=3))
    (g0, first0, last0, report0), (g1, first1, last1, report1) = results
    assert torch.equal(first0, first1) and torch.equal(last0, last1)
    assert report0.tokens == report1.tokens == 2 * 12 + 3 * 7
    assert report0.param == pytest.approx(report1.param)
    assert 0 < last0.float().mean() < 1  # some skip, some execute: the test sees a wrong decision
    torch.testing.assert_close(g0, g1)
    assert g0.abs().sum() > 0


def test_one_config_for_two_models_gives_each_its_own():
    """The constructor fills in the base model's name and fingerprint: on the caller's object, the second model was
    recorded as the first (and refused to save) and the two shared one threshold."""
    from skipgpt.models.adapters import fingerprint

    config = SkipConfig(target_sparsity=0.3)
    a = RoutedModel(make_tiny("llama", seed=0), config, name="model-a")
    b = RoutedModel(make_tiny("llama", seed=1), config, name="model-b")
    assert (a.config.base.name, b.config.base.name) == ("model-a", "model-b")
    assert b.config.base.fingerprint == fingerprint(b.model) != a.config.base.fingerprint
    a.threshold = 3.0
    assert b.threshold == config.threshold == 0.0
    assert config.base.name == "" and b.config.target_sparsity == 0.3


def test_the_meter_keeps_its_own_copy_of_masks_a_caller_refills():
    """Passes are summed when the statistics are read; a bool mask or forced decisions kept by reference were
    changed by a caller refilling the buffer for the next batch."""
    routed = varied_routers(1)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.bool)
    real = 0
    with torch.no_grad():
        for pads in (3, 9):
            mask.fill_(True)
            mask[0, :pads] = False
            routed(input_ids=ids, attention_mask=mask)
            real += int(mask.sum())
        assert routed.sparsity().tokens == real
        routed.reset_sparsity()
        with routed.using(real_tokens=mask):
            routed(input_ids=ids)
            mask.fill_(True)
            assert routed.sparsity().tokens == 24 - 9  # counted as passed: 9 of the 24 tokens were pads
        routed.reset_sparsity()
        decisions = torch.ones(len(routed.layers), 2, 2, 12, dtype=torch.bool)
        with routed.forced(decisions):
            routed(input_ids=ids)
            decisions.fill_(False)
            assert routed.sparsity().module == 0.0


def test_using_restores_every_setting_it_changed_even_on_error():
    routed = RoutedModel(make_tiny("llama"))
    before = {k: getattr(routed, k) for k in RoutedModel.SETTINGS}
    with pytest.raises(RuntimeError, match="inside"):
        with routed.using(mode="sparse", policy="skip", sample=True, track=False, temperature=3.0, noise=0.0):
            assert routed.mode == "sparse" and routed.policy is policies.skip_all and not routed.track
            raise RuntimeError("inside")
    assert {k: getattr(routed, k) for k in RoutedModel.SETTINGS} == before
    with pytest.raises(ConfigError, match="unknown routing settings"):
        with routed.using(threshold=1.0):
            pass
    with pytest.raises(ConfigError, match="mode must be one of"):
        with routed.using(mode="fast"):
            pass
    assert routed.mode == "masked"


@pytest.mark.parametrize("max_pending", [2, 256])
def test_meter_sums_queued_passes_like_each_pass_alone(max_pending, monkeypatch):
    # Inference passes are queued and summed when read (grouped by batch size, flushed when the queue
    # is long): the report must equal summing every pass's own totals, with prefill, decode-sized
    # passes, another batch size and padding mixed.
    monkeypatch.setattr(SparsityMeter, "MAX_PENDING", max_pending)
    routed = RoutedModel(make_tiny("llama"))
    g = torch.Generator().manual_seed(7)
    shapes = [(2, 6), (2, 1), (2, 1), (1, 4), (2, 1), (1, 1)]
    summed = None
    routed.reset_sparsity()
    with torch.no_grad():
        for i, (b, t) in enumerate(shapes):
            ids = torch.randint(0, 128, (b, t), generator=g)
            mask = torch.ones(b, t, dtype=torch.long)
            if i == 0:
                mask[0, 0] = 0  # a pad
            routed.force(torch.rand(3, 2, b, t, generator=g) > 0.4)(input_ids=ids, attention_mask=mask)
            own = {k: v.double() for k, v in routed.state.totals(routed.costs).items()}
            summed = own if summed is None else {k: summed[k] + own[k] for k in own}
    got, want = routed.sparsity(), report(summed, routed.costs)
    assert got.tokens == want.tokens == 2 * 6 - 1 + 2 + 2 + 4 + 2 + 1
    for key in ("param", "module", "flop", "attention", "mlp"):
        assert getattr(got, key) == pytest.approx(getattr(want, key), rel=1e-12)
    assert got.per_layer_mlp == pytest.approx(want.per_layer_mlp, rel=1e-12)
    assert 0.2 < got.param < 0.6


def test_folded_router_follows_every_weight_change():
    # Inference decisions use a cached skip-minus-execute fold of the router's last layer; it must be
    # rebuilt after an in-place update (optimizer step, load_state_dict), a reassignment of the data or
    # of the Parameter itself, and a threshold change.
    torch.manual_seed(4)
    bank = RoutedModel(make_tiny("llama")).routers
    router = bank.attn[1]
    x = torch.randn(2, 5, 32)

    def by_hand(threshold=0.0):
        logits = router(x)
        return logits[..., 1] - logits[..., 0] <= threshold

    for change in ("init", "in_place", "load", "reassign", "new_parameter"):
        with torch.no_grad():
            if change == "init":
                torch.nn.init.normal_(router.net.weight)
            elif change == "in_place":
                router.net.weight.mul_(-1.0)
                router.net.bias.add_(torch.tensor([0.0, 0.3]))
            elif change == "load":
                router.load_state_dict({"net.weight": torch.randn(2, 32), "net.bias": torch.randn(2)})
            elif change == "reassign":
                router.net.weight.data = torch.randn(2, 32)
            else:
                router.net.bias = torch.nn.Parameter(torch.randn(2))
        bank.folds(0.2)[0][1]  # another router's fold read in between changes nothing
        for threshold in (0.2, -0.1):
            fold = bank.folds(threshold)[1][0]
            assert fold.threshold == threshold
            assert torch.equal(fold.executes(x), by_hand(threshold)), change
            assert torch.equal(router.executes(x, threshold), by_hand(threshold)), change
            assert torch.equal(router.executes(x, threshold, fold), by_hand(threshold)), change
        assert torch.equal(router.executes(x, 0.2, bank.folds(-0.1)[1][0]), by_hand(0.2))  # a stale fold is not used
        bank.folds(0.2)  # the next change is made at an unchanged threshold
        assert 0 < by_hand(0.2).float().mean() < 1
        logits = router(x)
        torch.testing.assert_close(router.margin(x), logits[..., 1] - logits[..., 0])


# -- state that must not leak or go stale ------------------------------------------------------------------


def _varied(routed: RoutedModel, seed: int = 0) -> RoutedModel:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in routed.routers.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return routed


def test_nested_unrouted_blocks_leave_the_outer_one_unrouted():
    routed = _varied(RoutedModel(make_tiny("llama")))
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = make_tiny("llama")(input_ids=ids).logits
        with routed.unrouted() as hf:
            with routed.unrouted():
                pass
            torch.testing.assert_close(hf(input_ids=ids).logits, dense, rtol=0, atol=0)
        assert not torch.equal(routed(input_ids=ids).logits, dense)  # routed again after the outer block
        routed.unpatch()
        with routed.unrouted():
            pass
        torch.testing.assert_close(routed.model(input_ids=ids).logits, dense, rtol=0, atol=0)


def test_a_nan_or_infinite_threshold_is_refused_and_the_old_one_kept():
    routed = RoutedModel(make_tiny("llama"))
    routed.threshold = 0.5
    for bad in (float("nan"), float("inf"), -float("inf")):  # inf would execute every module, -inf skip all
        with pytest.raises(ConfigError, match="threshold"):
            routed.threshold = bad
    assert routed.threshold == 0.5


def test_decisions_follow_a_replaced_router():
    from skipgpt.models.routed import Router

    routed = _varied(RoutedModel(make_tiny("llama")))
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        routed(input_ids=ids)
        assert not routed.decisions()[1, 0].all()
        fresh = Router(32, "linear")  # zero weights, execute bias: executes every token
        routed.routers.attn[1] = fresh
        routed(input_ids=ids)
        assert routed.decisions()[1, 0].all()
        fresh.net.bias.copy_(torch.tensor([-5.0, 5.0]))  # an in-place edit of the new router
        routed(input_ids=ids)
        assert not routed.decisions()[1, 0].any()


@pytest.mark.parametrize("asked_in", ["call", "config"])
def test_sparse_mode_returns_the_attention_weights_asked_for(asked_in):
    model = make_tiny("llama")
    model.config._attn_implementation = "eager"
    ask = {"output_attentions": True}
    if asked_in == "config":  # what from_pretrained(..., output_attentions=True) sets; no layer sees a kwarg
        model.config.output_attentions, ask = True, {}
    routed = _varied(RoutedModel(model))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        masked = routed(input_ids=ids, **ask)
        with routed.mode_as("sparse"):
            sparse = routed(input_ids=ids, **ask)
    assert len(sparse.attentions) == len(masked.attentions) == 3
    for a, b in zip(sparse.attentions, masked.attentions):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(sparse.logits, masked.logits, rtol=1e-5, atol=1e-5)


def test_folds_follow_a_fused_optimizer_step_after_a_train_eval_switch():
    # a fused step writes the weights without bumping their version counter, which the fold cache keys on
    routed = _varied(RoutedModel(make_tiny("llama")))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    routed.eval()
    with torch.no_grad():
        routed(input_ids=ids)
    before = routed.decisions().clone()
    routed.train()
    optimizer = torch.optim.AdamW(routed.routers.parameters(), lr=1.0, fused=True)
    for p in routed.routers.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    routed.eval()
    with torch.no_grad():
        routed(input_ids=ids)
        cached = routed.decisions().clone()
        routed.routers._folds_key = None  # what a fresh cache decides
        routed(input_ids=ids)
    assert torch.equal(cached, routed.decisions()) and not torch.equal(before, cached)


def test_an_interrupted_calibration_keeps_the_callers_threshold(monkeypatch):
    from skipgpt.routing import calibrate

    routed = _varied(RoutedModel(make_tiny("llama")))
    routed.threshold = 0.7
    calls = []

    def measure(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return 0.9

    monkeypatch.setattr(calibrate, "measure", measure)
    with pytest.raises(KeyboardInterrupt):
        calibrate.calibrate_threshold(routed, [{"input_ids": torch.zeros(1, 4, dtype=torch.long)}], 0.25)
    assert routed.threshold == 0.7


def test_calibration_from_a_generator_equals_calibration_from_a_list():
    from skipgpt.routing import calibrate

    routed = _varied(RoutedModel(make_tiny("llama")))
    batches = [{"input_ids": torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(i))}
               for i in range(3)]
    from_list = calibrate.calibrate_threshold(routed, batches, 0.3)
    routed.threshold = 0.0
    assert calibrate.calibrate_threshold(routed, (b for b in batches), 0.3) == from_list


def test_a_calibration_that_ends_off_target_warns_and_one_on_target_does_not(monkeypatch):
    from skipgpt.routing import calibrate

    routed = _varied(RoutedModel(make_tiny("llama")))
    batches = [{"input_ids": torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(i))}
               for i in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # met: silent
        calibrate.calibrate_threshold(routed, batches, 0.3)
    assert abs(calibrate.measure(routed, batches) - 0.3) <= calibrate.FAR
    monkeypatch.setattr(calibrate, "measure", lambda *args: 0.9)  # routers that skip 90% at every threshold
    with pytest.warns(UserWarning, match=r"calibration to param sparsity 25.0% ended at 90.0%") as caught:
        calibrate.calibrate_threshold(routed, batches, 0.25)
    assert caught[0].filename == __file__  # the caller's line, not torch's no_grad wrapper
    with warnings.catch_warnings():  # a caller who accepts a wider miss is not warned about it
        warnings.simplefilter("error")
        calibrate.calibrate_threshold(routed, batches, 0.25, tolerance=0.7)
    # under torchrun every rank calibrates the same: only rank 0 says so
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate.calibrate_threshold(routed, batches, 0.25)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    with pytest.warns(UserWarning, match="ended at 90.0%"):
        calibrate.calibrate_threshold(routed, batches, 0.25)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_padding_is_found_in_a_prepared_4d_or_per_type_mask(arch):
    """generate() with a static cache hands the decoder a 4-D mask (a dict of them for Qwen2): its pads must not
    count as real tokens, so the sparsity statistics equal the dynamic cache's."""
    model = make_tiny(arch)
    model.generation_config.pad_token_id = 0
    routed = RoutedModel(model)
    ids = torch.randint(1, 100, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, :3] = 0
    mask[2, :8] = 0
    reports, real, seen = {}, {}, []
    hook = find_decoder(model).register_forward_hook(lambda *_: seen.append(routed.token_mask.clone()))
    for cache in ("dynamic", "static"):
        routed.reset_sparsity()
        seen.clear()
        with torch.no_grad(), routed.forced(policies.random(torch.full((len(routed.layers), 2), 0.5), seed=0)):
            routed.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                            cache_implementation=cache)
        reports[cache], real[cache] = routed.sparsity(), seen[0]
    hook.remove()
    assert torch.equal(real["static"], mask.bool()) and torch.equal(real["dynamic"], mask.bool())
    # the prompt's real tokens, then one decode step per row
    assert reports["static"].tokens == reports["dynamic"].tokens == int(mask.sum()) + 3
    assert reports["static"].param == pytest.approx(reports["dynamic"].param)


def test_dtype_conversions_keep_the_routers_fp32_and_their_decisions():
    """routed.to(bfloat16) and .half() convert the base model only: bf16 routers would round the calibrated
    threshold and the margins and change decisions. The reference: a bf16 base routed by the fp32 routers."""
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    routed = _varied(RoutedModel(make_tiny("llama")))
    routed.threshold = 0.37
    state = {k: v.clone() for k, v in routed.routers.state_dict().items()}
    reference = RoutedModel(make_tiny("llama").to(torch.bfloat16))
    reference.routers.load_state_dict(state)
    reference.threshold = 0.37
    with torch.no_grad():
        reference(input_ids=ids)
    for convert in (lambda r: r.to(torch.bfloat16), lambda r: r.half().bfloat16()):
        convert(routed)
        assert all(p.dtype == torch.bfloat16 for p in routed.model.parameters())
        assert all(torch.equal(v, state[k]) for k, v in routed.routers.state_dict().items())  # fp32, not rounded
        with torch.no_grad():
            routed(input_ids=ids)
        assert torch.equal(routed.decisions(), reference.decisions())


def test_hf_gradient_checkpointing_enable_checkpoints_the_routed_layers(monkeypatch):
    """HF's switch wraps the layer class's forward, which routing replaces: the routed layer honours it itself."""
    from skipgpt.models import routed as routed_module

    ids, mask = ids_and_mask()
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(routed_module, "checkpoint", counting)
    grads = []
    for enable in (False, True):
        model = make_tiny("llama")
        if enable:
            model.gradient_checkpointing_enable()
        routed = RoutedModel(model)
        routed.freeze_base()
        routed.routers.train()
        model.train()
        torch.manual_seed(11)
        out = routed(input_ids=ids, attention_mask=mask, use_cache=False).logits
        (out.float().pow(2).mean() + routed.realised_sparsity()["param"]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in routed.routers.parameters()]))
    assert len(calls) == len(routed.layers)  # every layer, only with the switch on
    torch.testing.assert_close(grads[0], grads[1])


def test_a_model_without_weights_is_refused_in_one_error():
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    from conftest import TINY

    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(LlamaConfig(**TINY))
    with pytest.raises(ConfigError, match="meta device"):
        RoutedModel(empty)


def test_routing_runs_inside_accelerate_device_hooks_and_leaves_them_in_place():
    """A device_map across devices puts accelerate's hook on every layer (an instance forward): routing goes inside
    it, whichever comes first, and unrouting leaves it there (before: refused as 'already routed', or the hook
    removed for good)."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Counting(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Counting.calls += 1
            return args, kwargs

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    plain = RoutedModel(make_tiny("llama"))
    layers = len(plain.layers)
    masks = torch.rand(layers, 2, 2, 12, generator=torch.Generator().manual_seed(1)) > 0.4
    with torch.no_grad():
        want = plain.force(masks)(input_ids=ids).logits
        dense = plain.unpatch()(input_ids=ids).logits
    for hook_first in (True, False):
        model = make_tiny("llama")
        if hook_first:
            for layer in find_decoder(model).layers:
                add_hook_to_module(layer, Counting())
        routed = RoutedModel(model).force(masks)
        if not hook_first:
            for layer in find_decoder(model).layers:
                add_hook_to_module(layer, Counting())
        with torch.no_grad():
            Counting.calls = 0
            torch.testing.assert_close(routed(input_ids=ids).logits, want, rtol=0, atol=0)
            assert Counting.calls == layers
            with routed.unrouted():
                torch.testing.assert_close(model(input_ids=ids).logits, dense, rtol=0, atol=0)
            assert Counting.calls == 2 * layers
            torch.testing.assert_close(routed(input_ids=ids).logits, want, rtol=0, atol=0)
            routed.unpatch()
            torch.testing.assert_close(model(input_ids=ids).logits, dense, rtol=0, atol=0)
            assert Counting.calls == 4 * layers


@pytest.mark.parametrize("shift", [100.0, -100.0])
def test_calibration_reaches_a_target_past_its_first_interval(shift):
    """Trained routers' margins reach the hundreds: a target beyond +-30 widens the search (the first version
    stopped at the interval's end without a word: every token skipped at target 0.4)."""
    from skipgpt.routing import calibrate

    routed = _varied(RoutedModel(make_tiny("llama")))
    with torch.no_grad():  # every margin (skip - execute) moves by `shift`
        for r in (*routed.routers.attn, *routed.routers.mlp):
            r.net.bias[policies.SKIP] += shift
    batches = [{"input_ids": torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(i))}
               for i in range(2)]
    threshold = calibrate.calibrate_threshold(routed, batches, 0.4)
    assert abs(threshold) > 30 and routed.threshold == threshold
    routed.reset_sparsity()
    with torch.no_grad():
        for b in batches:
            routed(**b)
    assert routed.sparsity().param == pytest.approx(0.4, abs=0.03)


def test_calibration_leaves_the_callers_statistics_and_refuses_what_it_cannot_set():
    from skipgpt.routing import calibrate

    routed = _varied(RoutedModel(make_tiny("llama")))
    batch = {"input_ids": torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))}
    with torch.no_grad():
        routed(**batch)
    counted = routed.sparsity()
    calibrate.calibrate_threshold(routed, [batch], 0.3)
    assert routed.sparsity() == counted  # its own passes on a meter of its own
    passes = []
    hook = find_decoder(routed.model).register_forward_hook(lambda *_: passes.append(1))
    routed.threshold = 0.7
    with pytest.raises(ConfigError, match="accounting must be one of"):
        calibrate.calibrate_threshold(routed, [batch], 0.3, accounting="params")
    routed.force(policies.static(torch.ones(3, 2, dtype=torch.bool)))
    with pytest.raises(ConfigError, match="does not read the threshold"):
        calibrate.calibrate_threshold(routed, [batch], 0.3)
    hook.remove()
    assert not passes and routed.threshold == 0.7  # refused before any pass, threshold kept


def test_calibration_on_padding_only_is_refused_and_keeps_the_threshold():
    """Every sparsity reads 0 on batches without a real token: the search returned the threshold it started from,
    as if it had met the target."""
    from skipgpt.routing import calibrate

    routed = _varied(RoutedModel(make_tiny("llama")))
    routed.threshold = 0.7
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(DataError, match="hold no real tokens"):
        calibrate.calibrate_threshold(routed, [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}], 0.25)
    assert routed.threshold == 0.7


def test_a_tie_executes_in_training_as_at_inference():
    """Zero-initialised routers with no execute bias tie every margin: with the noise off, the straight-through
    gate must take the inference decision (execute), not the opposite one."""
    routed = RoutedModel(make_tiny("llama"), SkipConfig(execute_bias=0.0))
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        routed(input_ids=ids)
    inference = routed.decisions()
    routed.routers.train()
    with routed.using(noise=0.0, temperature=1.0):
        routed(input_ids=ids)
    assert torch.equal(routed.decisions(), inference) and inference.all()


def test_api_misuse_is_one_clear_error():
    routed = RoutedModel(make_tiny("llama"))
    with pytest.raises(RuntimeError, match="no complete routed forward pass"):
        routed.decisions()
    with pytest.raises(ConfigError, match="covers 2 layers, the model has 3"):
        routed.force(torch.ones(2, 2, 1, 4, dtype=torch.bool))
    with pytest.raises(ConfigError, match=r"\(num_layers, 2, batch, seq\)"):
        routed.force(torch.ones(3, 1, 4, dtype=torch.bool))
    for make in (policies.static, policies.random):
        with pytest.raises(ConfigError, match=r"\(num_layers, 2\)"):
            make(torch.ones(3))
        routed.force(make(torch.ones(2, 2)))  # too few layers: found at the layer that has none
        with pytest.raises(ConfigError, match="covers 2 layers; the model has more"):
            routed(input_ids=torch.zeros(1, 4, dtype=torch.long))
    routed.force(None)
    routed(input_ids=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ConfigError, match="accounting must be one of"):
        routed.realised_sparsity("params")
    from skipgpt.models.routers import Router

    with pytest.raises(ConfigError, match="router kind must be one of"):
        Router(32, "Linear")
