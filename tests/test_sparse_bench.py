"""measure_speed: the JSON shape the CLI, benchmark and demo share, and its ideal speedup by hand."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import skipgpt
from skipgpt.inference.bench import measure_speed, random_ids
from skipgpt.routing import policies

from conftest import linear_router_share, make_tiny


def test_measure_speed_shape_and_dense_ideal():
    routed = skipgpt.RoutedModel(make_tiny("llama"))
    r = measure_speed(routed, 128, seq_len=8, batch_size=2, decode_tokens=3, repeats=3, sparsity=0.0)
    json.dumps(r)  # JSON-able
    for key in ("dense_tok_s", "masked_tok_s", "sparse_tok_s", "speedup", "ideal_speedup"):
        assert r["prefill"][key] > 0
    for key in ("dense_tok_s", "sparse_tok_s", "speedup", "ideal_speedup"):
        assert r["decode"][key] > 0
    # nothing skipped, and the routers ran on every token: below 1 by their cost
    assert r["sparsity"]["param"] == pytest.approx(-linear_router_share(routed.model), rel=1e-12)
    assert r["prefill"]["ideal_speedup"] == pytest.approx(1 / (1 - r["prefill"]["flop_sparsity"]))
    assert r["prefill"]["ideal_speedup"] < 1.0
    # speedups are medians of the per-round ratios; tokens/s medians of the rounds' times
    for phase, n in (("prefill", 2 * 8), ("decode", 2 * 3)):
        rounds = r[phase]["rounds_s"]
        assert [len(rounds[v]) for v in ("dense", "masked", "sparse")] == [3, 3, 3]
        ratios = sorted(d / s for d, s in zip(rounds["dense"], rounds["sparse"]))
        assert r[phase]["speedup"] == pytest.approx(ratios[1])
        masked = sorted(d / m for d, m in zip(rounds["dense"], rounds["masked"]))
        assert r[phase]["masked_speedup"] == pytest.approx(masked[1])
        # quartiles of 3 values (exclusive method): the first and the last
        assert r[phase]["speedup_quartiles"] == pytest.approx([ratios[0], ratios[2]])
        assert r[phase]["masked_speedup_quartiles"] == pytest.approx([masked[0], masked[2]])
        assert r[phase]["dense_tok_s"] == pytest.approx(n / sorted(rounds["dense"])[1])
    assert isinstance(r["device"], str) and r["device"].startswith("cpu")
    assert set(r["sparsity"]) >= {"param", "attention", "mlp"}
    assert routed.mode == "masked" and routed.policy is None  # state restored
    # the routed forwards are back in place after the dense variant ran
    assert all("forward" in p.layer.__dict__ for p in routed.layers)


def test_measure_speed_decodes_every_token_in_turns():
    # 11 decode tokens run as turns of 8 and 3, each variant on its own cache: every round of every variant
    # (the warm-up and 2 timed) is one prefill and 11 one-token steps
    model = make_tiny("llama")
    routed = skipgpt.RoutedModel(model)
    lengths = []
    model.register_forward_pre_hook(lambda m, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]),
                                    with_kwargs=True)
    r = measure_speed(routed, 128, seq_len=5, batch_size=1, decode_tokens=11, repeats=2, sparsity=0.5)
    assert sorted(lengths) == [1] * (3 * 3 * 11) + [5] * (3 * 3)
    # two rounds have no quartiles: their range stands in (never beyond the rounds, as extrapolation would be)
    rounds = r["decode"]["rounds_s"]
    ratios = [d / s for d, s in zip(rounds["dense"], rounds["sparse"])]
    assert r["decode"]["speedup_quartiles"] == pytest.approx([min(ratios), max(ratios)])


def test_measure_speed_ideal_speedup_by_hand():
    model = make_tiny("llama")
    routed = skipgpt.RoutedModel(model)
    keep = torch.tensor([[False, True], [True, True], [True, False]])  # skip attn 0 and MLP 2 everywhere
    routed.force(policies.static(keep))
    seq, batch = 6, 2
    r = measure_speed(routed, 128, seq_len=seq, batch_size=batch, decode_tokens=2, repeats=1, sparsity=None)
    c = model.config
    h, inter, heads, kv, d, v = c.hidden_size, c.intermediate_size, c.num_attention_heads, 2, 8, c.vocab_size
    q_o = 2 * (h * heads * d + heads * d * h)  # q and o projections, per token
    k_v = 2 * 2 * h * kv * d
    mlp = 2 * 3 * h * inter
    ctx_tokens = batch * seq * (seq + 1) / 2  # keys seen by every query, causal
    tokens = batch * seq
    per_layer = tokens * (q_o + k_v + mlp) + ctx_tokens * 4 * heads * d
    total = 3 * per_layer + batch * 2 * h * v  # the head on the last position of each row, as generate runs it
    skipped = tokens * q_o + ctx_tokens * 4 * heads * d + tokens * mlp
    assert r["prefill"]["ideal_speedup"] == pytest.approx(total / (total - skipped), rel=1e-6)
    assert r["sparsity"]["attention"] == pytest.approx(1 / 3)
    assert r["sparsity"]["mlp"] == pytest.approx(1 / 3)
    assert routed.policy is not None  # the caller's forced routing is left as it was


def test_bench_cli_rejects_bad_arguments(tmp_path, capsys):
    from skipgpt.cli.main import main

    assert main(["bench", "--seq-len", "0", "--output", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--seq-len" in err
    assert main(["bench", "--sparsity", "1.5", "--output", str(tmp_path / "b.json")]) == 2
    assert "--sparsity" in capsys.readouterr().err


def _random_baseline() -> skipgpt.RoutedModel:
    """A `routing: random` baseline as load_routers rebuilds it: one policy, one generator, from the config."""
    routed = skipgpt.RoutedModel(make_tiny("llama"))
    routed.config.extra.update({"routing": "random", "skip_rates": [[0.3, 0.3]] * 3, "seed": 0})
    return routed.force(policies.from_extra(routed))


def test_random_baseline_decides_alike_in_every_variant_and_round():
    # routing sees the same tokens in every variant, so masked and sparse must make the same random decisions
    # (the loaded policy's one generator ran on from pass to pass, so each variant drew other decisions)
    routed = _random_baseline()
    decisions = {"masked": [], "sparse": []}
    gate = routed.gate

    def spy(layer, kind, x):
        g = gate(layer, kind, x)
        decisions[routed.mode].append(g.clone())
        return g

    routed.gate = spy
    measure_speed(routed, 128, seq_len=8, batch_size=2, decode_tokens=3, repeats=2)
    masked, sparse = decisions["masked"], decisions["sparse"]
    assert len(masked) == len(sparse) == 3 * 2 * 3 * (1 + 3)  # 3 rounds (warm-up, 2 timed), 3 layers, 2 modules
    assert all(torch.equal(m, s) for m, s in zip(masked, sparse))
    assert all(torch.equal(m, w) for m, w in zip(masked, masked[:24] * 3))  # every round as the warm-up
    every = torch.cat([g.reshape(-1) for g in masked])
    assert 0 < every.float().mean() < 1  # the decisions are random, not all alike


def test_timed_rounds_leave_the_sparsity_meter_alone(monkeypatch):
    # a queued-statistics flush inside a timed turn would be timed with it: only the untimed warm-up is counted,
    # on a meter of its own, whatever the caller's tracking setting and meter hold
    from skipgpt.routing.sparsity import SparsityMeter

    routed = skipgpt.RoutedModel(make_tiny("llama"))
    with torch.no_grad():
        routed(input_ids=torch.zeros(1, 4, dtype=torch.long))  # the caller's own statistics
    before = routed.sparsity().tokens
    passes = []
    add = SparsityMeter.add
    monkeypatch.setattr(SparsityMeter, "add", lambda meter, state: (passes.append(state), add(meter, state)))
    routed.track = False
    r = measure_speed(routed, 128, seq_len=8, batch_size=2, decode_tokens=3, repeats=2, sparsity=0.25)
    assert len(passes) == 2 * (1 + 3)  # the masked and sparse warm-up: one prefill and 3 decode steps each
    assert 0 < r["sparsity"]["param"] < 1 and 0 < r["decode_sparsity"]["param"] < 1
    assert not routed.track and routed.sparsity().tokens == before == 4  # the caller's setting and meter


def test_random_ids_stay_below_the_embedding_rows():
    # a tokenizer may count more tokens than the model embeds (added tokens without resized embeddings): ids from
    # its length alone would index past the embedding, a traceback in the middle of `skipgpt bench`
    model = make_tiny("llama")
    rows = model.get_input_embeddings().num_embeddings
    ids = random_ids(model, 100 * rows, batch_size=4, seq_len=256, seed=0)
    assert ids.shape == (4, 256) and int(ids.max()) < rows and int(ids.max()) > rows // 2
    assert torch.equal(ids, random_ids(model, 100 * rows, batch_size=4, seq_len=256, seed=0))
    assert int(random_ids(model, 10, batch_size=4, seq_len=256, seed=0).max()) < 10
    r = measure_speed(skipgpt.RoutedModel(model), 100 * rows, seq_len=8, batch_size=1, decode_tokens=1, repeats=1)
    assert r["prefill"]["sparse_tok_s"] > 0


# -- benchmarks/speed.py -------------------------------------------------------------------------------------


def _speed_script():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "speed.py"
    spec = importlib.util.spec_from_file_location("speed_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speed_table_shows_each_phases_own_sparsity():
    """Decode rows showed the prefill's realised sparsity beside the decode's ideal speedup."""
    routed = skipgpt.RoutedModel(make_tiny("llama"))
    r = measure_speed(routed, 128, seq_len=8, batch_size=2, decode_tokens=3, repeats=1, sparsity=0.4)
    assert r["sparsity"]["param"] != r["decode_sparsity"]["param"]  # random skipping: the phases differ
    speed = _speed_script()
    for phase, key in (("prefill", "sparsity"), ("decode", "decode_sparsity")):
        cells = speed.row("tiny", "b2 s8", "40%", phase, r).split(" | ")
        assert cells[3] == f"{r[key]['param']:.1%}" and cells[4] == phase


@pytest.mark.parametrize("flags, says", [
    (["--repeats", "0"], "--repeats: must be at least 1"),
    (["--sparsities", "0.25,x"], "'x' is not a number"),
    (["--sparsities", "1.5"], "sparsity"),
    (["--llama-batches", "0"], "must be at least 1"),
    (["--threads", "-1"], "--threads: must be at least 1"),
    (["--models", "foo"], "unknown model 'foo'"),
])
def test_speed_script_refuses_bad_flags_in_one_line(flags, says, capsys):
    """Each ran into a traceback after building the model, or ran and printed nonsense (150% sparsity, no rows)."""
    with pytest.raises(SystemExit) as info:
        _speed_script().main(flags)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and says in err, err
