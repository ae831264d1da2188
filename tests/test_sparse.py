"""Sparse execution computes only executing tokens and matches the masked computation exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

import skipgpt
from skipgpt.models import sparse

from conftest import ARCHS, make_tiny, varied_routers, with_random_forecasters

B, T = 3, 12


def _batch(seed: int = 0, vocab: int = 128):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, -4:] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask}


def _random_masks(layers: int, rate: float, seed: int = 0, batch: int = B, seq: int = T) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(layers, 2, batch, seq, generator=g) >= rate


def _both_modes(routed, batch, force):
    with torch.no_grad(), routed.forced(force):
        masked = routed(**batch).logits
        masked_decisions = routed.decisions()
        with routed.mode_as("sparse"):
            sparse = routed(**batch).logits
            sparse_decisions = routed.decisions()
    assert torch.equal(masked_decisions, sparse_decisions)
    return masked, sparse


class _RowCounter:
    """Counts the token rows that reach a module, to show skipped tokens are never computed."""

    def __init__(self, modules):
        self.rows = 0
        self.handles = [m.register_forward_pre_hook(self) for m in modules]

    def __call__(self, module, args):
        self.rows += args[0].shape[:-1].numel()

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_equals_masked_random_routing_with_padding(arch):
    routed = skipgpt.RoutedModel(make_tiny(arch))
    batch = _batch()
    masks = _random_masks(len(routed.layers), 0.4, seed=1)
    masked, sparse = _both_modes(routed, batch, masks)
    torch.testing.assert_close(sparse, masked, rtol=1e-5, atol=1e-5)
    # the routing matters (otherwise equality says nothing)
    with torch.no_grad(), routed.forced("execute"):
        dense = routed(**batch).logits
    assert (dense - masked).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_sparse_computes_only_executing_tokens(arch):
    routed = skipgpt.RoutedModel(make_tiny(arch))
    batch = _batch(seed=2)
    masks = _random_masks(len(routed.layers), 0.5, seed=3)
    mlp = _RowCounter([p.mlp for p in routed.layers])
    query = _RowCounter([p.attn.q_proj for p in routed.layers])
    output = _RowCounter([p.attn.o_proj for p in routed.layers])
    keys = _RowCounter([p.attn.k_proj for p in routed.layers])
    with torch.no_grad(), routed.forced(masks), routed.mode_as("sparse"):
        routed(**batch)
    for c in (mlp, query, output, keys):
        c.remove()
    assert mlp.rows == int(masks[:, 1].sum())
    # the attention grid pads rows to the longest one, but only executing queries are projected;
    # keys are computed for every token
    longest = masks[:, 0].sum(dim=2).max(dim=1).values
    assert int(longest.sum()) * B > int(masks[:, 0].sum())  # rows differ, so the grid has padding
    assert query.rows == output.rows == int(masks[:, 0].sum())
    assert keys.rows == len(routed.layers) * B * T


@pytest.mark.parametrize("force", ["skip", "execute"])
def test_sparse_edge_routing_all_or_nothing(force):
    routed = skipgpt.RoutedModel(make_tiny("llama"))
    batch = _batch(seed=4)
    masked, sparse = _both_modes(routed, batch, force)
    torch.testing.assert_close(sparse, masked, rtol=1e-5, atol=1e-5)
    if force == "execute":  # everything executes: exactly the unmodified HF model
        reference = make_tiny("llama")
        with torch.no_grad():
            hf = reference(**batch).logits
        torch.testing.assert_close(sparse, hf, rtol=0, atol=0)
    else:  # nothing executes: final norm and LM head of the embeddings, computed here by hand
        hf = routed.model
        with torch.no_grad():
            direct = hf.lm_head(hf.model.norm(hf.model.embed_tokens(batch["input_ids"])))
        torch.testing.assert_close(sparse, direct, rtol=1e-5, atol=1e-5)


def test_sparse_one_token_and_one_module_executing():
    routed = skipgpt.RoutedModel(make_tiny("mistral"))
    one = {"input_ids": torch.tensor([[5]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    for decision in (True, False):
        masks = torch.full((len(routed.layers), 2, 1, 1), decision)
        masked, sparse = _both_modes(routed, one, masks)
        torch.testing.assert_close(sparse, masked, rtol=1e-5, atol=1e-5)
    # a single executing token in the whole batch, in the middle of a padded row
    masks = torch.zeros(len(routed.layers), 2, B, T, dtype=torch.bool)
    masks[:, :, 1, 5] = True
    masked, sparse = _both_modes(routed, _batch(seed=5), masks)
    torch.testing.assert_close(sparse, masked, rtol=1e-5, atol=1e-5)


def test_sparse_without_mask_and_batch_rows_that_skip_entirely():
    routed = skipgpt.RoutedModel(make_tiny("qwen2"))
    batch = {"input_ids": _batch(seed=6)["input_ids"]}  # no padding: HF passes no 4-D mask to SDPA
    masks = _random_masks(len(routed.layers), 0.3, seed=7)
    masks[:, :, 0] = False  # the first sequence skips every module
    masked, sparse = _both_modes(routed, batch, masks)
    torch.testing.assert_close(sparse, masked, rtol=1e-5, atol=1e-5)


def test_sparse_one_row_prefill_and_chunk_after_a_cache():
    # One sequence takes the path without per-row bookkeeping, also for a second chunk whose queries
    # sit after the cached keys.
    routed = skipgpt.RoutedModel(make_tiny("llama"))
    ids = _batch(seed=16)["input_ids"][:1]
    first, later = (_random_masks(len(routed.layers), 0.4, seed=s, batch=1, seq=n) for s, n in ((17, 5), (18, T - 5)))
    masked, sparse_logits = _both_modes(routed, {"input_ids": ids}, _random_masks(len(routed.layers), 0.4, 19, 1))
    torch.testing.assert_close(sparse_logits, masked, rtol=1e-5, atol=1e-5)
    logits = {}
    with torch.no_grad():
        for mode in ("masked", "sparse"):
            cache = DynamicCache(config=routed.model.config)
            with routed.mode_as(mode):
                with routed.forced(first):
                    routed(input_ids=ids[:, :5], cache=cache, use_cache=True)
                with routed.forced(later):
                    logits[mode] = routed(input_ids=ids[:, 5:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(logits["sparse"], logits["masked"], rtol=1e-5, atol=1e-5)


def test_sparse_sparsity_accounting_matches_masked():
    routed = skipgpt.RoutedModel(make_tiny("llama"))
    batch = _batch(seed=8)
    masks = _random_masks(len(routed.layers), 0.35, seed=9)
    with torch.no_grad(), routed.forced(masks):
        routed.reset_sparsity()
        routed(**batch)
        masked = routed.sparsity()
        routed.reset_sparsity()
        with routed.mode_as("sparse"):
            routed(**batch)
        sparse = routed.sparsity()
    assert masked.to_dict() == sparse.to_dict()
    assert 0.2 < sparse.param < 0.5


def test_sparse_kv_cache_after_prefill_equals_masked():
    routed = skipgpt.RoutedModel(make_tiny("qwen3"))
    batch = _batch(seed=10)
    masks = _random_masks(len(routed.layers), 0.5, seed=11)
    caches = {}
    with torch.no_grad(), routed.forced(masks):
        for mode in ("masked", "sparse"):
            cache = DynamicCache(config=routed.model.config)
            with routed.mode_as(mode):
                routed(**batch, cache=cache, use_cache=True)
            caches[mode] = cache
    for a, b in zip(caches["masked"].layers, caches["sparse"].layers, strict=True):
        torch.testing.assert_close(b.keys, a.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.values, a.values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_query_blocks_match_one_call_and_masked(arch, monkeypatch):
    # Prefill attention runs gathered queries in blocks, each over the keys up to its last position;
    # with 4-query blocks a 12-token batch takes several blocks, with padding, and a second chunk
    # after a cache (keys offset by the cached length).
    routed = skipgpt.RoutedModel(make_tiny(arch))
    batch = _batch(seed=13)
    masks = _random_masks(len(routed.layers), 0.3, seed=14)
    calls = []
    real_sdpa = sparse.F.scaled_dot_product_attention
    monkeypatch.setattr(sparse.F, "scaled_dot_product_attention",
                        lambda q, k, *a, **kw: calls.append(k.shape[2]) or real_sdpa(q, k, *a, **kw))
    outs = {}
    for block in (4, 10**6):
        monkeypatch.setattr(sparse, "QUERY_BLOCK", block)
        calls.clear()
        masked, outs[block] = _both_modes(routed, batch, masks)
        torch.testing.assert_close(outs[block], masked, rtol=1e-5, atol=1e-5)
        if block == 4:
            assert min(calls) < T  # some blocks read fewer keys than the sequence has
    torch.testing.assert_close(outs[4], outs[10**6], rtol=1e-5, atol=1e-5)

    monkeypatch.setattr(sparse, "QUERY_BLOCK", 4)
    ids = batch["input_ids"][:, :4], batch["input_ids"][:, 4:]
    later = _random_masks(len(routed.layers), 0.3, seed=15, seq=T - 4)
    logits = {}
    with torch.no_grad():
        for mode in ("masked", "sparse"):
            cache = DynamicCache(config=routed.model.config)
            with routed.mode_as(mode):
                with routed.forced("execute"):
                    routed(input_ids=ids[0], cache=cache, use_cache=True)
                with routed.forced(later):
                    logits[mode] = routed(input_ids=ids[1], cache=cache, use_cache=True).logits
    torch.testing.assert_close(logits["sparse"], logits["masked"], rtol=1e-5, atol=1e-5)


def test_training_in_sparse_mode_runs_the_masked_path():
    # Sparse execution is for inference: a token whose module is not computed would give its router no
    # gradient, so while routers train the sparse mode falls back to the masked path, gradients included.
    grads = {}
    for mode in ("masked", "sparse"):
        routed = varied_routers()
        routed.freeze_base()
        routed.routers.train()
        torch.manual_seed(0)
        with routed.mode_as(mode):
            routed(**_batch(seed=12)).logits.float().pow(2).mean().backward()
        grads[mode] = [r.net.weight.grad for r in routed.routers.attn]
    assert all(g is not None and g.abs().sum() > 0 for g in grads["sparse"])
    for a, b in zip(grads["masked"], grads["sparse"]):
        assert torch.equal(a, b)


def test_sparse_smollm2_matches_masked(smollm2):
    model, tok = smollm2
    routed = skipgpt.RoutedModel(model)
    try:
        batch = tok(["The quick brown fox jumps over", "Hi"], return_tensors="pt", padding=True)
        seq = batch["input_ids"].shape[1]
        masks = _random_masks(len(routed.layers), 0.25, seed=13, batch=2, seq=seq)
        masked, sparse = _both_modes(routed, dict(batch), masks)
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(sparse[real], masked[real], rtol=1e-4, atol=1e-4)
    finally:
        routed.unpatch()


@pytest.mark.parametrize("rank", [0, 3])
def test_sparse_gives_masked_states_layer_by_layer_and_leaves_its_inputs_alone(rank):
    # Every layer's output (not only the logits) matches the masked path, and no sparse update writes into a
    # tensor the layer did not make: the embeddings a caller passes and the recorded states stay as they were.
    routed = skipgpt.RoutedModel(make_tiny("llama"), skipgpt.SkipConfig(forecaster_rank=rank))
    if rank:
        with_random_forecasters(routed, seed=4)
    layers = len(routed.layers)
    masks = _random_masks(layers, 0.4, seed=4)
    masks[0, 0] = False  # layer 0's attention skipped by every token: its MLP reads the layer's own input
    masks[1, 1] = True  # every token runs layer 1's MLP (the whole-batch path)
    batch = _batch(seed=5)
    with torch.no_grad():
        embeds = routed.model.get_input_embeddings()(batch["input_ids"])
        kept = embeds.clone()
        states = {}
        with routed.forced(masks):
            for mode in ("masked", "sparse"):
                with routed.mode_as(mode):
                    states[mode] = routed(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                          output_hidden_states=True).hidden_states
    assert torch.equal(embeds, kept)
    real = batch["attention_mask"].bool()
    assert len(states["sparse"]) == layers + 1
    for want, got in zip(states["masked"], states["sparse"]):
        torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(states["sparse"][1][real], states["sparse"][2][real])


def _last_key_causal(module, q, k, v, attention_mask, scaling=None, sliding_window=None, **kwargs):
    """An attention implementation with flash-attention's contract: no mask unless something is padded, the
    causal mask aligned with the last key, the sliding window applied by the kernel."""
    position = torch.arange(q.shape[2])[:, None] + k.shape[2] - q.shape[2]
    key = torch.arange(k.shape[2])[None, :]
    allowed = (key <= position) & ((position - key < sliding_window) if sliding_window else True)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling,
                                                           enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2).contiguous(), None


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_sparse_with_a_flash_style_absent_mask_equals_masked(arch):
    """A mask left out by a flash-style implementation is not plain causal from key 0: after cached keys, or past a
    sliding window, sparse mode must still give the masked logits."""
    AttentionInterface.register("last_key_causal", _last_key_causal)
    AttentionMaskInterface.register("last_key_causal", flash_attention_mask)
    model = make_tiny(arch, sliding_window=5 if arch == "mistral" else None)
    model.config._attn_implementation = "last_key_causal"
    routed = skipgpt.RoutedModel(model)
    ids = _batch()["input_ids"]
    masks = _random_masks(len(routed.layers), 0.4, seed=7)
    out = {}
    for mode in ("masked", "sparse"):
        cache = DynamicCache(config=model.config)
        with torch.no_grad(), routed.mode_as(mode):
            with routed.forced(masks):
                whole = routed(input_ids=ids).logits
            with routed.forced(masks[..., :8]):
                routed(input_ids=ids[:, :8], cache=cache, use_cache=True)
            with routed.forced(masks[..., 8:]):
                out[mode] = whole, routed(input_ids=ids[:, 8:], cache=cache, use_cache=True).logits
    for masked, sparse_ in zip(out["masked"], out["sparse"]):
        torch.testing.assert_close(sparse_, masked, rtol=1e-5, atol=1e-5)
