"""Training data: every source format loads, packing is exact, batches are a pure function of the step."""

from __future__ import annotations

import json

import pytest
import torch

from skipgpt.errors import DataError
from skipgpt.training.data import batch_order, micro_batches, read_texts, split, tokenize_and_pack


class WordTokenizer:
    """Deterministic stand-in tokenizer: one id per whitespace word (hash mod 100), EOS = 100."""

    eos_token_id = 100

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [sum(map(ord, w)) % 100 for w in text.split()]}


DOCS = ["the quick brown fox", "jumps over the lazy dog", "and runs far away from here"]


def test_txt_jsonl_parquet_and_folder_load(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text(DOCS[0], encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS[1:])))
    pq.write_table(pa.table({"text": DOCS, "n": [1, 2, 3]}), tmp_path / "c.parquet")
    assert read_texts(str(tmp_path / "a.txt")) == DOCS[:1]
    assert read_texts(str(tmp_path / "b.jsonl")) == DOCS[1:]
    assert read_texts(str(tmp_path / "c.parquet")) == DOCS
    # A folder: all supported files, sorted by path.
    assert read_texts(str(tmp_path)) == DOCS[:1] + DOCS[1:] + DOCS


def test_wikitext_release_files_read_as_text(tmp_path):
    # The WikiText releases ship plain text as wiki.valid.tokens / wiki.test.raw.
    (tmp_path / "wiki.valid.tokens").write_text(DOCS[0], encoding="utf-8")
    (tmp_path / "wiki.test.raw").write_text(DOCS[1], encoding="utf-8")
    assert read_texts(str(tmp_path / "wiki.valid.tokens")) == DOCS[:1]
    assert read_texts(str(tmp_path)) == [DOCS[1], DOCS[0]]


def test_a_byte_order_mark_is_not_read_as_text(tmp_path):
    """Windows editors start UTF-8 files with U+FEFF: it was trained on as text, and a .jsonl's first line failed."""
    (tmp_path / "a.txt").write_text("\ufeff" + DOCS[0], encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("\ufeff" + "\n".join(json.dumps({"text": d}) for d in DOCS[1:]), encoding="utf-8")
    assert read_texts(str(tmp_path / "a.txt")) == DOCS[:1]
    assert read_texts(str(tmp_path / "b.jsonl")) == DOCS[1:]


def test_text_field_is_selectable(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"body": "hello world"}) + "\n")
    assert read_texts(str(f), text_field="body") == ["hello world"]
    with pytest.raises(DataError, match="no 'text' field"):
        read_texts(str(f))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", "", "no text found"),
        ("blank.txt", "  \n\n ", "no text found"),
        ("bad.jsonl", '{"text": "ok"}\n{not json}\n', r"bad.jsonl:2: not valid JSON"),
        ("num.jsonl", '{"text": 3}\n', "is not a string"),
        ("data.csv", "a,b\n", "unsupported data file type"),
        ("broken.parquet", "not parquet", "not a readable parquet file"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, name, content, message):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        read_texts(str(f))
    assert "\n" not in str(info.value)


def test_a_folder_reads_no_hidden_copies_and_refuses_duplicates(tmp_path):
    """A notebook's checkpoint copy of the last file sorted first (.ipynb_checkpoints) and was trained on: every
    held-out row was training text. A macOS resource fork (__MACOSX/._x) stopped the run as not UTF-8."""
    (tmp_path / "corpus.txt").write_text(DOCS[0], encoding="utf-8")
    (tmp_path / "NOTES.TXT").write_text(DOCS[1], encoding="utf-8")  # upper-case suffix: text all the same
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / ".ipynb_checkpoints" / "corpus-checkpoint.txt").write_text(DOCS[0], encoding="utf-8")
    (tmp_path / "__MACOSX").mkdir()
    (tmp_path / "__MACOSX" / "._corpus.txt").write_bytes(b"\x00\x05\x16\x07\xff\xfe")
    (tmp_path / ".hidden.txt").write_text(DOCS[2], encoding="utf-8")
    assert read_texts(str(tmp_path)) == [DOCS[1], DOCS[0]]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "corpus copy.txt").write_text(DOCS[0], encoding="utf-8")
    with pytest.raises(DataError, match="corpus copy.txt holds the same text as .*corpus.txt; remove one"):
        read_texts(str(tmp_path))
    (tmp_path / "sub" / "corpus copy.txt").write_text("")  # two empty files are no copy: they add nothing
    (tmp_path / "sub" / "empty.txt").write_text("")
    assert read_texts(str(tmp_path)) == [DOCS[1], DOCS[0]]


def test_a_parquet_column_that_is_not_text_is_named(tmp_path):
    """Its values were dropped one by one, and the error blamed an empty file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match="column 'text' holds int64, not text"):
        read_texts(str(tmp_path / "n.parquet"))


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_texts(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="holds no"):
        read_texts(str(tmp_path))


def test_packing_joins_documents_with_eos_and_drops_the_remainder():
    tok = WordTokenizer()
    packed = tokenize_and_pack(DOCS, tok, seq_len=4)
    stream = []
    for d in DOCS:
        stream += tok(d)["input_ids"] + [tok.eos_token_id]
    assert len(stream) == 18
    assert packed.shape == (4, 4)
    assert packed.flatten().tolist() == stream[:16]
    assert tokenize_and_pack(DOCS, tok, seq_len=4, max_tokens=9).shape == (2, 4)


def test_split_holds_out_the_last_sequences_and_refuses_too_little_data():
    seqs = torch.arange(40).view(10, 4)
    data = split(seqs, 3, "x")
    assert torch.equal(data.train, seqs[:7]) and torch.equal(data.val, seqs[7:])
    with pytest.raises(DataError, match="only 3 sequences.*Give more text"):
        split(seqs[:3], 3, "x")
    # rows read under a token cap: the cap is what to raise, not the text
    with pytest.raises(DataError, match=r"Give a larger --max-tokens \(now 12\)"):
        split(seqs[:3], 3, "x", max_tokens=12)


def test_micro_batches_cover_each_epoch_once_and_are_reproducible():
    data = torch.arange(10).view(10, 1)
    seen = [int(x) for step in range(5) for b in micro_batches(data, step, 2, 1, seed=3) for x in b.flatten()]
    assert sorted(seen) == list(range(10))  # 5 steps x 2 = one epoch, a permutation
    again = [int(x) for step in range(5) for b in micro_batches(data, step, 2, 1, seed=3) for x in b.flatten()]
    assert seen == again
    assert not torch.equal(batch_order(10, 3, 0), batch_order(10, 3, 1))  # reshuffled each epoch
    # Accumulation splits the same rows a larger batch would take; processes take disjoint rows.
    big = torch.cat(list(micro_batches(data, 1, 4, 1, seed=3)))
    small = torch.cat(list(micro_batches(data, 1, 2, 2, seed=3)))
    assert torch.equal(big, small)
    ranks = [torch.cat(list(micro_batches(data, 0, 1, 2, seed=3, rank=r, world=2))) for r in range(2)]
    assert torch.equal(torch.cat([ranks[0][:1], ranks[1][:1], ranks[0][1:], ranks[1][1:]]).flatten(),
                       torch.cat(list(micro_batches(data, 0, 4, 1, seed=3))).flatten())


def test_self_data_holds_out_rows_of_several_seed_prompts(tmp_path, monkeypatch):
    """sample_self draws 16 rows per seed prompt; held out as drawn, the last rows would all come from one prompt
    that no training row starts from. A seeded shuffle after the cache mixes them."""
    from skipgpt.training import data as data_module
    from skipgpt.training.config import TrainConfig

    # every token of sample row i holds i, so a row names its seed prompt: i // 16
    monkeypatch.setattr(data_module, "load_self", lambda routed, tok, count, seq_len, *a: torch.arange(count)[:, None]
                        .repeat(1, seq_len))
    cfg = TrainConfig(data="self", self_sequences=64, val_sequences=8, seq_len=4)
    packed = data_module.load_data(cfg, None, None, tmp_path)
    prompts = lambda rows: {int(r[0]) // 16 for r in rows}  # noqa: E731
    assert len(prompts(packed.val)) > 1 and prompts(packed.val) <= prompts(packed.train)
    assert sorted(torch.cat([packed.train, packed.val])[:, 0].tolist()) == list(range(72))  # a permutation
    again = data_module.load_data(cfg, None, None, tmp_path)
    assert torch.equal(again.val, packed.val)  # seeded: a resumed run holds out the same rows
    other = data_module.load_data(TrainConfig(data="self", self_sequences=64, val_sequences=8, seq_len=4, seed=1),
                                  None, None, tmp_path)
    assert not torch.equal(other.val, packed.val)
