"""Task loaders: every release format and the HF layout give the right choices, gold labels and text;
bad input gives one-line errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from skipgpt.errors import DataError
from skipgpt.evaluation.tasks import choices_and_gold, find_file, load_perplexity_text, load_task

FIX = Path(__file__).resolve().parent / "fixtures" / "eval"


def gold_choices(data):
    return [choices_and_gold(data.name, d) for d in data.docs]


def test_piqa_release_reads_labels_file():
    data = load_task("piqa", FIX / "piqa")
    assert data.format == "release" and data.source.endswith("valid.jsonl")
    got = gold_choices(data)
    assert [g for _, g in got] == [0, 1, 0]
    assert got[1][0] == ["Put the jar in the freezer for a day.", "Run the lid under hot water for a minute."]


def test_piqa_hf_folder_picks_validation_split():
    data = load_task("piqa", FIX / "hf" / "piqa")
    assert data.format == "hf" and data.source.endswith("validation.jsonl")
    assert [g for _, g in gold_choices(data)] == [0, 1]
    assert data.docs == load_task("piqa", FIX / "piqa").docs[:2]


def test_boolq_release_writes_superglue_passage():
    data = load_task("boolq", FIX / "boolq" / "dev.jsonl")
    assert [d["label"] for d in data.docs] == [1, 0, 0]
    assert data.docs[1]["passage"].startswith("Penguin -- Penguins are flightless")
    assert choices_and_gold("boolq", data.docs[0]) == (["no", "yes"], 1)


def test_hellaswag_jsonl_and_llamacpp_text_agree_on_gold_and_endings():
    js = load_task("hellaswag", FIX / "hellaswag" / "hellaswag_val.jsonl")
    txt = load_task("hellaswag", FIX / "hellaswag" / "hellaswag_val_full.txt")
    assert js.format == "release" and txt.format == "llamacpp"
    assert [g for _, g in gold_choices(js)] == [g for _, g in gold_choices(txt)] == [2, 0]
    assert txt.docs[0]["query"] == "Baking cookies: A woman mixes flour and sugar in a bowl. she"
    assert gold_choices(txt)[1][0][0] == "scrubs the doors with a soapy sponge."
    assert js.docs[0]["label"] == "2"  # the stock task's target template reads a string label


def test_arc_release_letters_digits_and_three_choices():
    data = load_task("arc_easy", FIX / "arc_easy")
    got = gold_choices(data)
    assert [g for _, g in got] == [0, 1, 1]
    assert got[2][0] == ["heated", "frozen", "stirred"]
    assert data.docs[1]["question"] == "What do plants need to make food?"
    assert data.docs == load_task("arc_easy", FIX / "hf" / "arc_easy" / "test.json").docs[:2] + data.docs[2:]


def test_openbookqa_uses_question_stem_and_winogrande_options():
    obqa = load_task("openbookqa", FIX / "openbookqa")
    assert obqa.docs[0]["question_stem"] == "A magnet will stick to"
    assert [g for _, g in gold_choices(obqa)] == [1, 0]
    wg = load_task("winogrande", FIX / "winogrande")
    assert gold_choices(wg) == [(["trophy", "case"], 0), (["Anna", "Maria"], 1)]


def test_parquet_in_hf_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [json.loads(x) for x in (FIX / "hf" / "piqa" / "validation.jsonl").read_text().splitlines()]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / "validation-00000-of-00001.parquet")
    data = load_task("piqa", tmp_path)
    assert data.source.endswith(".parquet") and data.docs == load_task("piqa", FIX / "hf" / "piqa").docs


def test_wikitext_release_and_hf_rows_join_identically():
    raw = load_perplexity_text("wikitext2", FIX / "wikitext2")
    hf = load_perplexity_text("wikitext2", FIX / "hf" / "wikitext2")
    assert raw == hf
    # HF rows: "", " = Fixture Heading = \n", "", ... joined with a blank line.
    assert raw.startswith("\n\n = Fixture Heading = \n\n\n\n\n The river")


def test_ptb_sentences_joined_with_a_space():
    text = load_perplexity_text("ptb", FIX / "ptb")
    assert text == ("the market closed higher today traders said <unk> stocks rose N points "
                    "the company expects growth")


# -- bad input ------------------------------------------------------------------------------------------------


def one_line_error(fn, *args) -> str:
    with pytest.raises(DataError) as e:
        fn(*args)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_unknown_task_name():
    assert "unknown task 'mmlu'" in one_line_error(load_task, "mmlu", FIX)


def test_wrong_format_file(tmp_path):
    bad = tmp_path / "valid.jsonl"
    bad.write_text("this is not json\n")
    msg = one_line_error(load_task, "piqa", bad)
    assert str(bad) in msg and "line 1 is not JSON" in msg
    arc_as_piqa = one_line_error(load_task, "piqa", FIX / "arc_easy" / "ARC-Easy-Test.jsonl")
    assert "ARC-Easy-Test.jsonl" in arc_as_piqa and "lacks goal" in arc_as_piqa
    hs = tmp_path / "hs.txt"
    hs.write_text("ctx\n1\na\nb\nc\n")
    assert "multiple of 6" in one_line_error(load_task, "hellaswag", hs)


def test_labels_out_of_range(tmp_path):
    (tmp_path / "valid.jsonl").write_text((FIX / "piqa" / "valid.jsonl").read_text())
    (tmp_path / "valid-labels.lst").write_text("0\n2\n1\n")
    msg = one_line_error(load_task, "piqa", tmp_path)
    assert "valid-labels.lst" in msg and "item 2" in msg and "out of range" in msg
    arc = tmp_path / "arc.jsonl"
    arc.write_text((FIX / "arc_easy" / "ARC-Easy-Test.jsonl").read_text().replace('"answerKey":"B"', '"answerKey":"E"'))
    assert "answerKey 'E'" in one_line_error(load_task, "arc_easy", arc)
    hs = tmp_path / "hs.txt"
    hs.write_text((FIX / "hellaswag" / "hellaswag_val_full.txt").read_text().replace("\n2\n", "\n4\n", 1))
    assert "out of range for 4 choices" in one_line_error(load_task, "hellaswag", hs)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "dev.jsonl"
    empty.write_text("\n")
    assert f"{empty}: file is empty" in one_line_error(load_task, "boolq", empty)
    assert "file is empty" in one_line_error(load_perplexity_text, "ptb", empty)
    assert "no such file" in one_line_error(find_file, "boolq", tmp_path / "nope")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not data\n")
    assert "no piqa data found" in one_line_error(find_file, "piqa", other)


def test_perplexity_and_mc_tasks_not_mixed_up():
    assert "perplexity task" in one_line_error(load_task, "wikitext2", FIX / "wikitext2")
    assert "not a perplexity task" in one_line_error(load_perplexity_text, "piqa", FIX / "piqa")
