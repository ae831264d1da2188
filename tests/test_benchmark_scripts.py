"""Scripts of benchmarks/ whose numbers docs/RESULTS.md reports, checked on a tiny model against hand computations."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from conftest import make_tiny, varied_routers

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def positions(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it imports task_text beside it, as `python benchmarks/...` does
    spec = importlib.util.spec_from_file_location("positions_benchmark", BENCHMARKS / "positions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nll_by_position_matches_a_token_by_token_sum(positions):
    model = make_tiny("llama")
    g = torch.Generator().manual_seed(0)
    items = [torch.randint(0, 128, (1, n), generator=g) for n in (3, 11, 40, 70)]
    sums, counts = [0.0] * len(positions.EDGES), [0] * len(positions.EDGES)
    with torch.no_grad():
        for ids in items:
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            for p in range(1, ids.shape[1]):  # the token at position p, predicted from the p before it
                b = max(i for i, edge in enumerate(positions.EDGES) if p >= edge)
                sums[b] -= float(logp[p - 1, ids[0, p]])
                counts[b] += 1
    got = positions.nll_by_position(model, items)
    for b, (s, c) in enumerate(zip(sums, counts)):
        assert c > 0 and math.isclose(float(got[b]), s / c, rel_tol=1e-4), (b, float(got[b]), s / c)


def test_first_tokens_execute_forces_the_first_real_tokens_only(positions):
    routed = varied_routers(seed=3)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # row 1 is left-padded: its first real token sits at index 3
    with torch.no_grad():
        routed(input_ids=ids, attention_mask=mask)
        saved = routed.decisions()
        positions.first_tokens_execute(routed, 2)
        routed(input_ids=ids, attention_mask=mask)
        forced = routed.decisions()
    first = torch.zeros(2, 12, dtype=torch.bool)
    first[0, :2] = first[1, 3:5] = True
    assert not saved[:, :, first].all()  # the routers skip some of them: forcing has something to do
    assert forced[:, :, first].all()
    # the first layer's attention reads the embeddings, which forcing cannot change: elsewhere its decisions stand
    later = ~first & mask.bool()
    assert torch.equal(forced[0, 0][later], saved[0, 0][later])
    assert not forced[0, 0][later].all()  # and they still skip
