"""Task loaders: every release format and the HF layout give the right choices, gold labels and text;
bad input gives one-line errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from skipgpt.errors import ConfigError, DataError
from skipgpt.evaluation.tasks import (
    MC_TASKS,
    choices_and_gold,
    find_file,
    load_perplexity_text,
    load_task,
    paper_metric,
    read_records,
)

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
    empty.write_text("\ufeff\n", encoding="utf-8")  # what an editor saving an empty file as UTF-8 may write
    assert "file is empty" in one_line_error(load_perplexity_text, "ptb", empty)
    assert "no such file" in one_line_error(find_file, "boolq", tmp_path / "nope")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not data\n")
    assert "no piqa data found" in one_line_error(find_file, "piqa", other)


def test_perplexity_and_mc_tasks_not_mixed_up():
    assert "perplexity task" in one_line_error(load_task, "wikitext2", FIX / "wikitext2")
    assert "not a perplexity task" in one_line_error(load_perplexity_text, "piqa", FIX / "piqa")


# -- a folder's lone file must be the task and split asked for ----------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ARC_ITEM = {"id": "q1", "question": {"stem": "Which is a liquid?", "choices": [
    {"text": "water", "label": "A"}, {"text": "stone", "label": "B"}]}, "answerKey": "A"}


@pytest.mark.parametrize("name, file, why", [
    ("arc_challenge", "ARC-Easy-Test.jsonl", "the release file of arc_easy"),
    ("openbookqa", "ARC-Easy-Test.jsonl", "the release file of arc_easy"),
    ("arc_easy", "ARC-Challenge-Test.jsonl", "the release file of arc_challenge"),
    ("arc_easy", "ARC-Easy-Dev.jsonl", "a dev split, but arc_easy is scored on the test split"),
    ("arc_easy", "dev.jsonl", "the release file of boolq/winogrande"),
    ("arc_easy", "validation.jsonl", "a validation split, but arc_easy is scored on the test split"),
    ("openbookqa", "train/0000.jsonl", "a train split"),
    ("piqa", "hellaswag_val.jsonl", "the release file of hellaswag"),
    ("piqa", "test.jsonl", "the release file of openbookqa"),
])
def test_lone_file_of_another_task_or_split_is_refused(tmp_path, name, file, why):
    from skipgpt.cli.eval import parse_tasks

    write_jsonl(tmp_path / file, [ARC_ITEM])
    msg = one_line_error(find_file, name, tmp_path)
    assert f"{tmp_path}: holds only {file}, {why}" in msg
    assert "expected " + {"arc_easy": "ARC-Easy-Test.jsonl", "arc_challenge": "ARC-Challenge-Test.jsonl",
                          "openbookqa": "test.jsonl", "piqa": "valid.jsonl"}[name] in msg
    with pytest.raises(DataError, match="holds only"):  # the CLI's check before the model loads
        parse_tasks([f"{name}={tmp_path}"])


def test_a_line_separator_inside_a_json_string_is_text(tmp_path):
    """JSON allows U+2028, U+0085 and form feeds unescaped (ensure_ascii=False writes them so): splitting lines at
    them refused a valid file with "line 2 is not JSON"."""
    stem = "Which is a liquid?\u2028Pick one\x85\x0c"
    item = {**ARC_ITEM, "question": {**ARC_ITEM["question"], "stem": stem}}
    path = tmp_path / "arc.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in (ARC_ITEM, item)), encoding="utf-8")
    assert [r["question"]["stem"] for r in read_records(path)] == ["Which is a liquid?", stem]


def test_lone_file_of_the_task_or_unmarked_is_still_read(tmp_path):
    own = write_jsonl(tmp_path / "own" / "ARC-Challenge-Test.jsonl", [ARC_ITEM])
    assert find_file("arc_challenge", own.parent) == own
    plain = write_jsonl(tmp_path / "plain" / "arc.jsonl", [ARC_ITEM])
    assert find_file("arc_easy", plain.parent) == plain
    split = write_jsonl(tmp_path / "hf" / "test-00000-of-00001.jsonl", [ARC_ITEM])
    assert find_file("arc_easy", split.parent) == split


# -- malformed items: one line naming the file and the item ---------------------------------------------------


PIQA_ITEM = {"goal": "Open a jar.", "sol1": "Twist the lid.", "sol2": "Paint the lid.", "label": 0}
WINO_ITEM = {"sentence": "The cup fell off the shelf because _ was wobbly.", "option1": "the cup",
             "option2": "the shelf", "answer": "2"}
HF_ARC_ITEM = {"id": "q1", "question": "Which is a liquid?", "choices": {"text": ["water", "stone"],
               "label": ["A", "B"]}, "answerKey": "A"}
HS_ITEM = {"activity_label": "Cooking", "ctx_a": "A man cracks an egg.", "ctx_b": "he", "endings": ["fries it.",
           "reads it.", "sings.", "swims."], "label": 0}


@pytest.mark.parametrize("name, good, bad, why", [
    ("arc_easy", ARC_ITEM, {**ARC_ITEM, "question": {"stem": "q", "choices": [{"label": "A"}, {"text": "b"}]}},
     "a choice without text and label"),
    ("arc_easy", ARC_ITEM, {**ARC_ITEM, "question": {"stem": "q", "choices": ["water", "stone"]}},
     "a choice without text and label"),
    ("arc_easy", HF_ARC_ITEM, {**HF_ARC_ITEM, "choices": ["water", "stone"]}, "choices that are not"),
    ("arc_easy", HF_ARC_ITEM, {**HF_ARC_ITEM, "choices": {"text": "ws", "label": "AB"}}, "choices that are not"),
    ("arc_easy", HF_ARC_ITEM, {**HF_ARC_ITEM, "choices": {"text": ["water"], "label": ["A", "B"]}},
     "1 choice texts and 2 labels"),
    ("arc_easy", HF_ARC_ITEM, {**HF_ARC_ITEM, "choices": {"text": ["water", 7], "label": ["A", "B"]}},
     "not text"),
    ("winogrande", WINO_ITEM, {**WINO_ITEM, "sentence": 5}, "sentence that is not text"),
    ("winogrande", WINO_ITEM, {**WINO_ITEM, "option1": ["a", "_"]}, "option1 that is not text"),
    ("piqa", PIQA_ITEM, {**PIQA_ITEM, "label": 1.9}, "label 1.9, not an integer"),
    ("piqa", PIQA_ITEM, {**PIQA_ITEM, "label": float("inf")}, "label inf, not an integer"),
    ("piqa", PIQA_ITEM, {**PIQA_ITEM, "label": True}, "label True, not an integer"),
    ("piqa", PIQA_ITEM, {**PIQA_ITEM, "sol2": None}, "sol2 that is not text"),
    # a blank choice: lm-eval's traceback after the model loaded (first item), or an acc_norm over zero characters
    ("piqa", PIQA_ITEM, {**PIQA_ITEM, "sol1": ""}, "a choice with no text"),
    ("arc_easy", HF_ARC_ITEM, {**HF_ARC_ITEM, "choices": {"text": ["water", "  "], "label": ["A", "B"]}},
     "a choice with no text"),
    ("hellaswag", HS_ITEM, {**HS_ITEM, "endings": ["a", "", "c", "d"]}, "a choice with no text"),
])
def test_malformed_item_names_file_and_item(tmp_path, name, good, bad, why):
    from skipgpt.cli.eval import parse_tasks

    bad_file = write_jsonl(tmp_path / "data.jsonl", [good, bad])
    if bad.get("label") == float("inf"):  # json.dumps writes Infinity; a file says 1e999, read as inf
        bad_file.write_text(bad_file.read_text().replace("Infinity", "1e999"))
    msg = one_line_error(load_task, name, bad_file)
    assert f"{bad_file}: item 2 " in msg and why in msg
    with pytest.raises(DataError, match="item 2"):  # the CLI's check before the model loads
        parse_tasks([f"{name}={bad_file}"])


def test_blank_ending_in_llamacpp_hellaswag_text_is_refused(tmp_path):
    text = tmp_path / "hellaswag_val_full.txt"
    text.write_text("Cooking: A man cracks an egg. he\n0\nfries it.\nreads it.\n\nswims.\n")
    assert f"{text}: item 1 has a choice with no text" in one_line_error(load_task, "hellaswag", text)


def test_arc_ids_of_mixed_types_are_read_as_text(tmp_path):
    # a number, a string, no id and a null one: pyarrow refused the mix with a traceback after the model loaded
    rows = [{**HF_ARC_ITEM, "id": 1}, {**HF_ARC_ITEM, "id": "x2"}, {k: v for k, v in HF_ARC_ITEM.items() if k != "id"},
            {**HF_ARC_ITEM, "id": None}]
    data = load_task("arc_easy", write_jsonl(tmp_path / "test.jsonl", rows))
    assert [d["id"] for d in data.docs] == ["1", "x2", "2", "3"]


def test_json_nested_past_the_parsers_stack_is_not_json(tmp_path):
    for name in ("ARC-Easy-Test.jsonl", "test.json"):
        deep = tmp_path / name
        deep.write_text("[" * 200_000)
        assert f"{deep}: line 1 is not JSON" in one_line_error(load_task, "arc_easy", deep)


def test_a_folder_with_several_files_for_the_split_is_refused_not_read_in_part(tmp_path):
    # ai2_arc's layout: both tasks' test splits under one folder; or one split in shards
    write_jsonl(tmp_path / "ai2_arc" / "ARC-Challenge" / "test.jsonl", [{**HF_ARC_ITEM, "id": "chal"}])
    write_jsonl(tmp_path / "ai2_arc" / "ARC-Easy" / "test.jsonl", [{**HF_ARC_ITEM, "id": "easy"}])
    msg = one_line_error(find_file, "arc_easy", tmp_path / "ai2_arc")
    assert "2 files could hold the 'test' split of arc_easy" in msg and "ARC-Challenge/test.jsonl" in msg
    assert find_file("arc_easy", tmp_path / "ai2_arc" / "ARC-Easy").parent.name == "ARC-Easy"
    for shard in ("validation-00000-of-00002.jsonl", "validation-00001-of-00002.jsonl"):
        write_jsonl(tmp_path / "piqa" / shard, [PIQA_ITEM])
    assert "2 files could hold the 'validation' split of piqa" in one_line_error(find_file, "piqa",
                                                                                 tmp_path / "piqa")


def test_whole_number_labels_still_read(tmp_path):
    rows = [{**PIQA_ITEM, "label": 1.0}, {**PIQA_ITEM, "label": "1"}, {**PIQA_ITEM, "label": 0}]
    data = load_task("piqa", write_jsonl(tmp_path / "validation.jsonl", rows))
    assert [d["label"] for d in data.docs] == [1, 1, 0]


def test_cli_refuses_a_bad_item_before_the_model_loads(tmp_path, capfd):
    from conftest import one_error_line, run_cli

    bad = write_jsonl(tmp_path / "wino" / "dev.jsonl", [WINO_ITEM, {**WINO_ITEM, "sentence": 5}])
    out = tmp_path / "results.json"
    capfd.readouterr()
    argv = ["eval", "--model", str(tmp_path / "no-model"), "--task", f"winogrande={bad.parent}", "--output", str(out)]
    assert run_cli(argv) == 2
    line = one_error_line(capfd.readouterr().err, "eval")
    assert f"{bad}: item 2 has sentence that is not text" in line
    assert not out.exists()


def test_paper_metric_is_stated_once():
    """The evaluator's "metric", the comparison table's columns and its cells all ask paper_metric."""
    from skipgpt.baselines.table import markdown_table, task_metric

    assert {n for n in MC_TASKS if paper_metric(n) == "acc_norm"} == {"hellaswag", "openbookqa"}
    assert task_metric("hellaswag", {"acc": 0.1, "acc_norm": 0.2}) == ("acc_norm", 0.2)
    assert task_metric("hellaswag", {"acc": 0.1}) == ("acc", 0.1)  # no acc_norm scored: acc
    assert task_metric("piqa", {"acc": 0.1, "acc_norm": 0.2}) == ("acc", 0.1)
    row = {"method": "dense", "sparsity": {"param": 0.0, "attention": 0.0, "mlp": 0.0},
           "tasks": {"openbookqa": {"acc": 0.1, "acc_norm": 0.2}, "piqa": {"acc": 0.5}}}
    assert "| openbookqa acc_norm | piqa acc |" in markdown_table([row])


@pytest.mark.parametrize("spec", ["piqa=", "wikitext2= "])
def test_an_empty_task_path_is_refused_not_taken_for_the_hub(spec):
    # `--task piqa=$D/piqa` with D unset: the hub was tried, and offline that failed only after the model loaded
    from skipgpt.cli.eval import parse_tasks

    with pytest.raises(ConfigError, match=f"--task {spec}: the path after = is empty"):
        parse_tasks([spec])
    assert parse_tasks([spec.split("=")[0]]) == {spec.split("=")[0]: None}
