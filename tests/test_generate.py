"""Generation with routing in prefill and decode: HF generate() and its cache, both modes alike."""

from __future__ import annotations

import pytest
import torch

import skipgpt
from skipgpt.routing import policies

from conftest import make_tiny

NEW = 32


def _prompt():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 128, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, :3] = 0  # generation pads on the left
    mask[2, :1] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _with_random_routers(routed, seed: int = 3):
    """Routers with random weights: per-token decisions that differ between tokens and layers."""
    torch.manual_seed(seed)
    for r in list(routed.routers.attn) + list(routed.routers.mlp):
        torch.nn.init.normal_(r.net.weight, std=1.0)
        r.net.bias.data.zero_()
    return routed


def _generate(routed, mode, **kw):
    with torch.no_grad(), routed.mode_as(mode):
        return routed.generate(**_prompt(), max_new_tokens=NEW, pad_token_id=0, **kw)


@pytest.mark.parametrize("cache", [None, "static"])
def test_greedy_generation_identical_in_both_modes(cache):
    routed = _with_random_routers(skipgpt.RoutedModel(make_tiny("llama")))
    masked = _generate(routed, "masked", do_sample=False, cache_implementation=cache)
    routed.reset_sparsity()
    sparse = _generate(routed, "sparse", do_sample=False, cache_implementation=cache)
    assert masked.shape == (3, 10 + NEW)
    assert torch.equal(masked, sparse)
    s = routed.sparsity()
    assert 0.1 < s.attention < 0.9 and 0.1 < s.mlp < 0.9  # routing really skipped in decode


def test_sampling_identical_in_both_modes_for_a_seed():
    routed = _with_random_routers(skipgpt.RoutedModel(make_tiny("qwen2")))
    torch.manual_seed(11)
    masked = _generate(routed, "masked", do_sample=True, top_k=0, temperature=1.0)
    torch.manual_seed(11)
    sparse = _generate(routed, "sparse", do_sample=True, top_k=0, temperature=1.0)
    assert torch.equal(masked, sparse)


def test_everything_executing_generates_like_unmodified_model():
    routed = skipgpt.RoutedModel(make_tiny("llama")).force("execute")
    sparse = _generate(routed, "sparse", do_sample=False)
    masked = _generate(routed, "masked", do_sample=False)
    with torch.no_grad():
        hf = make_tiny("llama").generate(**_prompt(), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert torch.equal(sparse, hf)
    assert torch.equal(masked, hf)


def test_decode_skips_a_module_only_when_every_sequence_skips_it():
    # Decode reads each weight once for all rows, so a module is skipped when all rows skip it, and
    # runs for every row (gated, exact) when they disagree.
    routed = skipgpt.RoutedModel(make_tiny("llama"))
    assert len(routed.layers) == 3

    def decode_rule(layer, kind, x):
        execute = torch.ones(x.shape[:-1], dtype=torch.bool)
        if x.shape[1] == 1:
            if layer == 0:
                execute[:] = False  # every row skips
            elif layer == 1:
                execute[1:] = False  # the rows disagree
        return execute

    rows = {"q": 0, "k": 0, "mlp": 0}
    calls = {"decode": 0, "in_decode": False}

    def count(name):
        def hook(module, args):
            if calls["in_decode"]:
                rows[name] += args[0].shape[:-1].numel()
        return hook

    layers = routed.layers
    handles = [p.attn.q_proj.register_forward_pre_hook(count("q")) for p in layers]
    handles += [p.attn.k_proj.register_forward_pre_hook(count("k")) for p in layers]
    handles += [p.mlp.register_forward_pre_hook(count("mlp")) for p in layers]

    def decode_step(module, args, kwargs):
        ids = kwargs.get("input_ids")
        calls["in_decode"] = ids is not None and ids.shape[1] == 1
        calls["decode"] += calls["in_decode"]

    handles.append(routed.model.model.register_forward_pre_hook(decode_step, with_kwargs=True))
    with routed.forced(decode_rule):
        out = _generate(routed, "sparse", do_sample=False)
    for h in handles:
        h.remove()
    steps = calls["decode"]
    assert steps == NEW - 1
    assert rows["q"] == steps * 2 * 3  # layers 1 and 2, every row; layer 0 not at all
    assert rows["k"] == steps * 3 * 3  # every sequence's keys go into the cache
    assert rows["mlp"] == steps * 2 * 3
    with routed.forced(decode_rule):
        again = _generate(routed, "masked", do_sample=False)
    assert torch.equal(out, again)


def test_smollm2_greedy_identical_in_both_modes(smollm2):
    model, tok = smollm2
    routed = skipgpt.RoutedModel(model)
    try:
        tok.padding_side = "left"
        batch = tok(["The capital of France is", "Once upon a time"], return_tensors="pt", padding=True)
        outs = []
        for mode in ("masked", "sparse"):
            routed.force(policies.random(torch.full((len(routed.layers), 2), 0.1), seed=5))
            with torch.no_grad(), routed.mode_as(mode):
                # 16 tokens on the real model keep the test quick; the tiny models above run 32
                outs.append(routed.generate(**batch, max_new_tokens=16, do_sample=False,
                                            pad_token_id=tok.pad_token_id or 0))
        assert torch.equal(outs[0], outs[1])
    finally:
        routed.unpatch()
