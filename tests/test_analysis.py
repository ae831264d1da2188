"""Analysis figures: produced, non-empty, and the CSV behind them equals the decisions that were taken."""

from __future__ import annotations

import csv

import pytest
import torch

import skipgpt
from skipgpt.analysis.figures import write_analysis
from skipgpt.errors import DataError

from conftest import make_tiny, save_tiny_llama


class CharTokenizer:
    """One token per character (byte value modulo the tiny vocabulary)."""

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        ids = [ord(c) % 128 for c in text]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


TEXT = "The quick brown fox jumps over the lazy dog. " * 8  # 360 characters


def position_policy(layer, kind, x):
    """Attention skipped at odd positions in layer 1, MLP of layer 2 skipped from position 20 on."""
    T = x.shape[1]
    pos = torch.arange(T).expand(x.shape[0], T)
    if kind == "attn" and layer == 1:
        return pos % 2 == 0
    if kind == "mlp" and layer == 2:
        return pos < 20
    return torch.ones_like(pos, dtype=torch.bool)


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_write_analysis_files_match_decisions(tmp_path):
    routed = skipgpt.RoutedModel(make_tiny("llama"))
    routed.force(position_policy)
    paths = write_analysis(routed, CharTokenizer(), TEXT, tmp_path, seq_len=40, heatmap_tokens=30)
    names = {p.name for p in paths}
    for stem in ("per_layer_skip", "skip_vs_position", "decision_heatmap", "module_sparsity"):
        assert f"{stem}.png" in names and f"{stem}.csv" in names
    for p in paths:
        assert p.stat().st_size > 0
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    layers = read(tmp_path / "per_layer_skip.csv")
    assert [float(r["attention_skip_rate"]) for r in layers] == pytest.approx([0.0, 0.5, 0.0])
    assert [float(r["mlp_skip_rate"]) for r in layers] == pytest.approx([0.0, 0.0, 0.5])
    pos = read(tmp_path / "skip_vs_position.csv")
    for r in pos:
        first, last = int(r["first_position"]), int(r["last_position"])
        span = range(first, last + 1)
        odd = sum(p % 2 for p in span) / len(span)
        late = sum(p >= 20 for p in span) / len(span)
        assert float(r["attention_skip_rate"]) == pytest.approx(odd / 3, abs=1e-6)
        assert float(r["mlp_skip_rate"]) == pytest.approx(late / 3, abs=1e-6)
    heat = read(tmp_path / "decision_heatmap.csv")
    assert len(heat) == 30 * 3
    for r in heat:
        want = position_policy(int(r["layer"]), "attn", torch.zeros(1, 40, 1))[0, int(r["position"])]
        assert int(r["attention_executed"]) == int(want)
    assert heat[0]["token"] == repr("T")
    overall = {r["measure"]: r["skip_rate"] for r in read(tmp_path / "module_sparsity.csv")}
    assert float(overall["attention"]) == pytest.approx(0.5 / 3, abs=1e-6)
    assert float(overall["MLP"]) == pytest.approx(0.5 / 3, abs=1e-6)
    assert int(overall["tokens"]) == 9 * 40  # nine full windows of 40 characters


def test_write_analysis_on_learned_style_routers(tmp_path):
    routed = skipgpt.RoutedModel(make_tiny("qwen2"))
    with torch.no_grad():
        for r in list(routed.routers.attn) + list(routed.routers.mlp):
            r.net.weight.normal_(0, 1.0)
    routed.routers.train()  # a caller mid-training: the analysis must hand the routers back in train mode
    paths = write_analysis(routed, CharTokenizer(), TEXT, tmp_path)
    assert len(paths) == 8
    assert routed.policy is None and routed.routers.training, "the caller's train/eval state is restored"


def test_write_analysis_rejects_empty_text_and_creates_nothing(tmp_path):
    routed = skipgpt.RoutedModel(make_tiny("llama"))
    with pytest.raises(DataError, match="empty"):
        write_analysis(routed, CharTokenizer(), "a", tmp_path / "figs")
    assert not (tmp_path / "figs").exists()


class WordTokenizer(CharTokenizer):
    """One token per 20-character word: the heatmap's labels must come from the routed tokens, not from a
    guess at how much text they span."""

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        ids = [sum(map(ord, text[i:i + 20])) % 100 + 28 for i in range(0, len(text), 20)]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


def test_heatmap_labels_are_the_routed_tokens(tmp_path):
    routed = skipgpt.RoutedModel(make_tiny("llama"))
    text = "".join(chr(65 + i % 26) * 20 for i in range(60))  # 60 tokens of 20 characters
    write_analysis(routed, WordTokenizer(), text, tmp_path, seq_len=30, heatmap_tokens=30)
    ids = WordTokenizer()(text)["input_ids"][:30]
    labels = [r["token"] for r in read(tmp_path / "decision_heatmap.csv") if r["layer"] == "0"]
    assert labels == [repr(f"<{i}>") for i in ids]


def test_analyze_command_on_saved_baseline(tmp_path):
    """`skipgpt analyze` reloads a saved baseline with its policy and writes the figures of its decisions."""
    import argparse

    from skipgpt.baselines import static_modules
    from skipgpt.cli import analyze
    save_tiny_llama(tmp_path / "model", layers=6)
    model, tok = skipgpt.load_model(str(tmp_path / "model"))
    routed = static_modules(model, tok, 0.3, [TEXT])
    keep = torch.tensor(routed.config.extra["keep"], dtype=torch.bool)
    skipgpt.save_routers(routed, tmp_path / "routers")
    (tmp_path / "text.txt").write_text(TEXT * 4, encoding="utf-8")
    parser = argparse.ArgumentParser()
    analyze.add_parser(parser.add_subparsers())
    args = parser.parse_args(["analyze", "--model", str(tmp_path / "model"), "--routers", str(tmp_path / "routers"),
                              "--text", str(tmp_path / "text.txt"), "--output", str(tmp_path / "figs"),
                              "--seq-len", "64"])
    assert analyze.run(args) == 0
    rows = read(tmp_path / "figs" / "per_layer_skip.csv")
    got = torch.tensor([[float(r["attention_skip_rate"]), float(r["mlp_skip_rate"])] for r in rows])
    assert torch.equal(got, (~keep).float())
    args.text = str(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="does not exist"):
        analyze.run(args)


class DoubledTokenizer(CharTokenizer):
    """Every character decodes twice: "$" becomes the token "$$", which matplotlib would read as mathtext."""

    def decode(self, ids):
        return "".join(2 * chr(i) for i in ids)


def test_tokens_and_titles_with_dollars_are_drawn_as_text(tmp_path):
    routed = skipgpt.RoutedModel(make_tiny("llama"))
    text = "Price is $5 and $x_1$ or $\\frac{a}{$ more. " * 8
    paths = write_analysis(routed, DoubledTokenizer(), text, tmp_path, seq_len=40, title="model $\\frac{$ name")
    assert len(paths) == 8
    assert repr("$$") in [r["token"] for r in read(tmp_path / "decision_heatmap.csv")]


def test_a_drawing_error_writes_no_file(tmp_path, monkeypatch):
    """Every figure is drawn before any file is written: a failure leaves an existing folder as it was."""
    from skipgpt.analysis import figures

    (tmp_path / "per_layer_skip.csv").write_text("old\n")

    def broken(*args):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(figures, "module_sparsity_figure", broken)
    with pytest.raises(RuntimeError, match="drawing failed"):
        write_analysis(skipgpt.RoutedModel(make_tiny("llama")), CharTokenizer(), TEXT, tmp_path, seq_len=40)
    assert [p.name for p in tmp_path.iterdir()] == ["per_layer_skip.csv"]
    assert (tmp_path / "per_layer_skip.csv").read_text() == "old\n"


def test_a_failed_write_leaves_every_earlier_file_as_it_was(tmp_path, monkeypatch):
    """The eight files were renamed one by one: a full disk half-way left new figures beside stale ones."""
    from skipgpt import io

    routed = skipgpt.RoutedModel(make_tiny("llama"))
    routed.force(position_policy)
    first = write_analysis(routed, CharTokenizer(), TEXT, tmp_path, seq_len=40)
    before = {p.name: p.read_bytes() for p in first}
    calls = []

    def full_disk(path):
        calls.append(path)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "settle", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_analysis(routed, CharTokenizer(), TEXT[:200], tmp_path, seq_len=20)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary left either
    monkeypatch.undo()
    (tmp_path / "module_sparsity.png").unlink()
    (tmp_path / "module_sparsity.png").mkdir()
    with pytest.raises(IsADirectoryError, match="module_sparsity.png"):
        write_analysis(routed, CharTokenizer(), TEXT[:200], tmp_path, seq_len=20)
    assert all((tmp_path / name).read_bytes() == data for name, data in before.items() if name != "module_sparsity.png")


def test_windows_fill_even_where_tokens_are_long():
    """The text was cut at 16 characters per token before tokenising: text of long tokens (runs of spaces, rules)
    gave fewer windows, or shorter ones, than asked for."""
    from skipgpt.analysis.figures import text_windows

    class RunTokenizer:  # one token per run of 40 equal characters
        def __call__(self, text, return_tensors=None, add_special_tokens=False):
            return {"input_ids": torch.tensor([[ord(text[i]) % 128 for i in range(0, len(text) - 39, 40)]])}

    text = "".join(c * 40 for c in "ab" * 400)  # 800 tokens
    assert tuple(text_windows(RunTokenizer(), text, seq_len=40, max_windows=4).shape) == (4, 40)
    assert tuple(text_windows(RunTokenizer(), text, seq_len=256, max_windows=1).shape) == (1, 256)


def test_write_analysis_measures_with_tracking_off_and_keeps_the_callers_meter(tmp_path):
    routed = skipgpt.RoutedModel(make_tiny("llama"))
    routed(input_ids=torch.randint(0, 128, (2, 20)))  # the caller has counted 40 tokens of its own
    before = routed.sparsity()
    routed.force(position_policy)
    with routed.using(track=False):
        write_analysis(routed, CharTokenizer(), TEXT, tmp_path, seq_len=40)
        assert routed.track is False, "the caller's setting is restored"
    overall = {r["measure"]: r["skip_rate"] for r in read(tmp_path / "module_sparsity.csv")}
    assert float(overall["attention"]) == pytest.approx(0.5 / 3, abs=1e-6) and int(overall["tokens"]) == 9 * 40
    assert routed.sparsity() == before and before.tokens == 40
