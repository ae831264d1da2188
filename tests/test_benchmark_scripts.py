"""Scripts of benchmarks/ whose numbers docs/RESULTS.md reports, checked on a tiny model against hand computations."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from skipgpt import load_model, save_routers

from conftest import make_tiny, varied_routers

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "eval"


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
    got, got_counts = positions.nll_by_position(model, items)
    assert got_counts.tolist() == counts
    for b, (s, c) in enumerate(zip(sums, counts)):
        assert c > 0 and math.isclose(float(got[b]), s / c, rel_tol=1e-4), (b, float(got[b]), s / c)


@pytest.mark.parametrize("padding", ["left", "none"])
def test_first_tokens_execute_forces_the_first_real_tokens_only(positions, padding):
    """Left padding through a 2-D mask (generate), or none at all (how the harness scores: right-padded, no mask)."""
    routed = varied_routers(seed=3)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    if padding == "left":
        mask[1, :3] = 0  # row 1's first real token sits at index 3
    with torch.no_grad():
        given = {"attention_mask": mask} if padding == "left" else {}
        routed(input_ids=ids, **given)
        saved = routed.decisions()
        positions.first_tokens_execute(routed, 2)
        routed(input_ids=ids, **given)
        forced = routed.decisions()
    first = torch.zeros(2, 12, dtype=torch.bool)
    first[0, :2] = True
    first[1, 3:5] = padding == "left"
    first[1, :2] = padding == "none"
    assert not saved[:, :, first].all()  # the routers skip some of them: forcing has something to do
    assert forced[:, :, first].all()
    # the first layer's attention reads the embeddings, which forcing cannot change: elsewhere its decisions stand
    later = ~first & mask.bool()
    assert torch.equal(forced[0, 0][later], saved[0, 0][later])
    assert not forced[0, 0][later].all()  # and they still skip


def test_positions_script_end_to_end(positions, tiny_dir, tmp_path, capsys):
    """main() on a tiny model: dense, the routers and ShortGPT on the same weights, the routers put back for part 2."""
    model, _ = load_model(str(tiny_dir / "model"))
    save_routers(varied_routers(seed=2, model=model), tmp_path / "r")
    text = tiny_dir / "text.txt"
    positions.main(["--model", str(tiny_dir / "model"), "--dtype", "float32", "--routers", str(tmp_path / "r"),
                    "--task", f"piqa={FIXTURES / 'piqa'}", "--skip", "0", "--items", "3", "--limit", "3",
                    "--calibration", str(text), "--snippets", str(text), "--execute-first", "1",
                    # main() sets torch's thread count for the whole process: this one's, or the tests after it
                    # would compare runs at another count (a resumed run against a subprocess's, bitwise)
                    "--threads", str(torch.get_num_threads())])
    out = capsys.readouterr().out
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in out.splitlines() if line.startswith("|")}
    for group in ("task text", "WikiText snippets"):
        for who in ("routers", "ShortGPT"):
            extra = [float(v) for v in rows[group, who].split("|")[3:-1]]
            assert any(v != 0 for v in extra), rows[group, who]  # skipping moved the loss
    scored = [line for line in out.splitlines() if line.startswith(("| as saved", "| first 1 execute"))]
    assert len(scored) == 2
    for line in scored:  # the routers decide in part 2 again: each task's own sparsity is above zero
        assert float(line.split(" at ")[1].split("%")[0]) > 0, line
