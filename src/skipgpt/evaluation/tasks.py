"""Read a task's data from a file or folder, in its official release format or the Hugging Face layout.

Multiple-choice items come out in the schema of the Hugging Face dataset that lm-evaluation-harness's
stock task reads, so the harness's own prompts, choices and targets apply unchanged. The one exception
is HellaSwag from llama.cpp's text file (hellaswag_val_full.txt), whose first line is scored as the prompt
as it stands (format "llamacpp" in the results; published numbers depend on it). That is close to, but
not, the stock preprocessing: the file keeps ctx_b lower-case where the stock task capitalises it
(ctx_a + " " + ctx_b.capitalize(), so ". he" where the stock prompt has ". He"), and
it keeps the "[...]" text the stock preprocess removes in 2 prompts and 11 endings (and one ending's
double space). The official hellaswag_val.jsonl gives the stock prompts exactly.
Perplexity tasks come out as the joined test text, the way the pruning literature builds it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from ..io import expand_user

MC_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
PPL_TASKS = ("wikitext2", "ptb")
TASKS = MC_TASKS + PPL_TASKS
# The metric the paper reports: acc_norm for these, acc for the other multiple-choice tasks.
NORM_TASKS = ("hellaswag", "openbookqa")
PAPER_METRIC = {name: "acc_norm" for name in NORM_TASKS}  # the rest: acc

# Release file names, tried in order when PATH is a folder.
RELEASE_FILES = {
    "boolq": ["dev.jsonl"],
    "piqa": ["valid.jsonl"],
    "hellaswag": ["hellaswag_val.jsonl", "hellaswag_val_full.txt"],
    "winogrande": ["dev.jsonl"],
    "arc_easy": ["ARC-Easy-Test.jsonl"],
    "arc_challenge": ["ARC-Challenge-Test.jsonl"],
    "openbookqa": ["test.jsonl"],
    "wikitext2": ["wiki.test.raw", "wiki.test.tokens", "test.txt"],
    "ptb": ["ptb.test.txt"],
}
# The split each task is scored on (as the harness does), for folders in the Hugging Face layout.
EVAL_SPLIT = {"arc_easy": "test", "arc_challenge": "test", "openbookqa": "test", "wikitext2": "test", "ptb": "test"}
# How a file or folder name marks each split; a file marked as another split is never read in its place.
SPLIT_NAMES = {"test": ("test",), "validation": ("validation", "dev", "val", "valid")}
SPLIT_WORDS = {"train", "test", "validation", "dev", "val", "valid"}
HF_EXTENSIONS = (".parquet", ".jsonl", ".json")


@dataclass
class TaskData:
    name: str
    source: str  # the file read
    format: str  # "release", "hf" or "llamacpp"
    docs: list[dict] = field(default_factory=list)


def paper_metric(name: str) -> str:
    """The accuracy the paper reports for multiple-choice task `name`: "acc_norm" or "acc"."""
    return PAPER_METRIC.get(name, "acc")


def check_name(name: str) -> None:
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; known tasks: {' '.join(TASKS)}")


# -- finding the file ---------------------------------------------------------------------------------------


def _not_for(name: str, file: Path) -> str | None:
    """Why a lone data file named `file` (relative to its folder) is some other data than `name`'s, or None."""
    owners = [task for task, names in RELEASE_FILES.items() if task != name and file.name in names]
    if owners:
        return f"the release file of {'/'.join(owners)}"
    split = EVAL_SPLIT.get(name, "validation")
    words = set(re.split(r"[^a-z]+", str(file.with_suffix("")).lower()))
    other = sorted((words & SPLIT_WORDS) - set(SPLIT_NAMES[split]))
    if other:
        return f"a {other[0]} split, but {name} is scored on the {split} split"
    return None


def _hf_file(name: str, folder: Path) -> Path | None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(HF_EXTENSIONS))
    if not files:
        return None
    split = EVAL_SPLIT.get(name, "validation")
    for wanted in SPLIT_NAMES[split]:
        hits = [p for p in files if p.name.startswith(wanted) or p.parent.name == wanted]
        if hits:
            if len(hits) > 1:  # shards, or several tasks' splits (ai2_arc's ARC-Easy and ARC-Challenge): not one
                names = ", ".join(str(p.relative_to(folder)) for p in hits[:4]) + (", ..." if len(hits) > 4 else "")
                raise DataError(f"{folder}: {len(hits)} files could hold the {wanted!r} split of {name} ({names}); "
                                "pass the one file, or the folder of one task")
            return hits[0]
    if len(files) == 1:
        # A lone file of unmarked name is taken as the split asked for; one that names another task's
        # release or another split would silently score the wrong data.
        lone = files[0].relative_to(folder)
        why = _not_for(name, lone)
        if why:
            expected = ", ".join(RELEASE_FILES[name])
            raise DataError(f"{folder}: holds only {lone}, {why} (expected {expected}, or a {split} split file "
                            f"in the HF layout)")
        return files[0]
    raise DataError(f"{folder}: cannot tell which of {len(files)} data files holds the {split} split of {name}")


def find_file(name: str, path: str | Path) -> Path:
    """The file holding task `name` under `path` (a file, or a folder in release or HF layout). A file of a
    type the task cannot be read from fails here, before anything loads."""
    check_name(name)
    path = expand_user(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (data for task {name})")
    if path.is_file():
        text_ok = name in PPL_TASKS or (name == "hellaswag" and path.suffix == ".txt")
        if not text_ok and path.suffix not in HF_EXTENSIONS:
            raise DataError(f"{path}: unsupported file type for {name} (use .jsonl, .json or .parquet)")
        return path
    for candidate in RELEASE_FILES[name]:
        if (path / candidate).is_file():
            return path / candidate
    found = _hf_file(name, path)
    if found is None:
        expected = ", ".join(RELEASE_FILES[name])
        raise DataError(f"{path}: no {name} data found (expected {expected}, or .parquet/.jsonl/.json files)")
    return found


# -- reading records ----------------------------------------------------------------------------------------


def read_text(path: Path) -> str:
    """A UTF-8 text file that must not be empty (one-line DataError otherwise); a byte-order mark is no text."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    return text


def read_records(path: Path) -> list[dict]:
    """Rows of a .jsonl, .json (list, or JSON lines) or .parquet file, as dicts."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several unrelated types for a bad file
            raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
        if not rows:
            raise DataError(f"{path}: file has no rows")
        return rows
    text = read_text(path)
    if path.suffix == ".json" and text.lstrip()[:1] in "[{":
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError):  # (nesting deeper than the parser's stack: not data)
            data = None  # JSON lines under a .json name, as the HF json builder accepts
        if isinstance(data, list):
            rows = data
        elif isinstance(data, dict) and isinstance(data.get("data"), list):
            rows = data["data"]
        else:
            rows = None
        if rows is not None:
            if not rows or not all(isinstance(r, dict) for r in rows):
                raise DataError(f"{path}: expected a non-empty list of JSON objects")
            return rows
    rows = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: a JSON string may hold U+2028 or \x85
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise DataError(f"{path}: line {number} is not JSON (expected one JSON object per line)") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number} is not a JSON object")
        rows.append(row)
    return rows


def _need(path: Path, row: dict, keys: tuple[str, ...], index: int, what: str, text: tuple[str, ...] = ()) -> None:
    """Item `index` has every key; those in `text` hold strings (the harness joins them into prompts: anything
    else would fail there, after the model loaded)."""
    missing = [k for k in keys if k not in row]
    if missing:
        raise DataError(f"{path}: item {index + 1} lacks {', '.join(missing)}; not {what}")
    bad = [k for k in text if not isinstance(row[k], str)]
    if bad:
        raise DataError(f"{path}: item {index + 1} has {', '.join(bad)} that is not text")


def _no_blank_choice(path: Path, index: int, choices: list[str]) -> None:
    """A choice with no text cannot be scored: lm-eval fails on it with a traceback after the model loaded, or
    (past the first item) scores it with an acc_norm that divides by its length, zero."""
    if any(not c.strip() for c in choices):
        raise DataError(f"{path}: item {index + 1} has a choice with no text")


# -- multiple-choice tasks: convert to the HF schema the stock harness task reads ---------------------------


def _gold_index(path: Path, index: int, value, n: int) -> int:
    # int() would truncate 1.9 to 1, overflow on 1e999 (inf) and take true as 1: only whole numbers and
    # strings of digits are labels.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DataError(f"{path}: item {index + 1} has label {value!r}, not an integer")
    try:
        gold = int(value)
    except ValueError:
        raise DataError(f"{path}: item {index + 1} has label {value!r}, not an integer") from None
    if not 0 <= gold < n:
        raise DataError(f"{path}: item {index + 1} has label {gold}, out of range for {n} choices")
    return gold


def _piqa(path: Path, rows: list[dict]) -> tuple[str, list[dict]]:
    for i, r in enumerate(rows):
        _need(path, r, ("goal", "sol1", "sol2"), i, "PIQA (goal, sol1, sol2)", text=("goal", "sol1", "sol2"))
        _no_blank_choice(path, i, [r["sol1"], r["sol2"]])
    labels_file = path.with_name(path.stem + "-labels.lst")
    hf = all("label" in r for r in rows)
    if not hf:
        if not labels_file.exists():
            raise DataError(f"{path}: PIQA items have no label and {labels_file.name} is missing next to it")
        labels = [x.strip() for x in read_text(labels_file).splitlines() if x.strip()]
        if len(labels) != len(rows):
            raise DataError(f"{labels_file}: {len(labels)} labels for {len(rows)} items in {path.name}")
    docs = []
    for i, r in enumerate(rows):
        where = path if hf else labels_file
        label = _gold_index(where, i, r["label"] if hf else labels[i], 2)
        docs.append({"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": label})
    return ("hf" if hf else "release"), docs


def _boolq(path: Path, rows: list[dict]) -> tuple[str, list[dict]]:
    docs, fmt = [], "hf"
    for i, r in enumerate(rows):
        if "answer" in r:  # release: title and passage apart, answer true/false
            fmt = "release"
            _need(path, r, ("question", "passage"), i, "BoolQ (question, passage, answer)",
                  text=("question", "passage"))
            if not isinstance(r["answer"], bool):
                raise DataError(f"{path}: item {i + 1} has answer {r['answer']!r}, expected true or false")
            # SuperGLUE, which the stock task reads, writes the passage as "title -- passage".
            passage = f"{r['title']} -- {r['passage']}" if r.get("title") else r["passage"]
            docs.append({"question": r["question"], "passage": passage, "label": int(r["answer"])})
        else:
            _need(path, r, ("question", "passage", "label"), i, "BoolQ (question, passage, label)",
                  text=("question", "passage"))
            label = _gold_index(path, i, r["label"], 2)
            docs.append({"question": r["question"], "passage": r["passage"], "label": label})
    return fmt, docs


def _hellaswag_jsonl(path: Path, rows: list[dict]) -> tuple[str, list[dict]]:
    docs = []
    for i, r in enumerate(rows):
        _need(path, r, ("activity_label", "ctx_a", "ctx_b", "endings", "label"), i, "HellaSwag",
              text=("activity_label", "ctx_a", "ctx_b"))
        endings = r["endings"]
        if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
            raise DataError(f"{path}: item {i + 1} has no list of text endings")
        _no_blank_choice(path, i, endings)
        gold = _gold_index(path, i, r["label"], len(endings))
        docs.append({"activity_label": r["activity_label"], "ctx_a": r["ctx_a"], "ctx_b": r["ctx_b"],
                     "endings": list(endings), "label": str(gold)})
    return ("release" if isinstance(rows[0]["label"], int) else "hf"), docs


def _hellaswag_text(path: Path) -> list[dict]:
    """llama.cpp's HellaSwag file: 6 lines per item (prompt, gold index, four endings)."""
    lines = read_text(path).rstrip("\n").split("\n")
    if len(lines) % 6:
        raise DataError(f"{path}: {len(lines)} lines is not a multiple of 6 (prompt, gold index, 4 endings per item)")
    docs = []
    for i in range(len(lines) // 6):
        block = lines[6 * i : 6 * i + 6]
        gold = _gold_index(path, i, block[1].strip(), 4)
        _no_blank_choice(path, i, block[2:6])
        docs.append({"query": block[0], "choices": block[2:6], "label": str(gold)})
    return docs


def _arc(path: Path, rows: list[dict], stem_key: str) -> tuple[str, list[dict]]:
    docs, fmt = [], "hf"
    for i, r in enumerate(rows):
        _need(path, r, ("question", "answerKey") if stem_key == "question" else ("answerKey",), i, "ARC/OpenBookQA")
        q = r.get("question")
        if isinstance(q, dict):  # release: question.stem and a list of {text, label}
            fmt = "release"
            if "stem" not in q or not isinstance(q.get("choices"), list):
                raise DataError(f"{path}: item {i + 1} has no question.stem / question.choices")
            if not all(isinstance(c, dict) and "text" in c and "label" in c for c in q["choices"]):
                raise DataError(f"{path}: item {i + 1} has a choice without text and label")
            stem = q["stem"]
            texts = [c["text"] for c in q["choices"]]
            labels = [c["label"] for c in q["choices"]]
        else:
            _need(path, r, (stem_key, "choices"), i, "ARC/OpenBookQA in the HF layout")
            choices = r["choices"]
            if not (isinstance(choices, dict) and isinstance(choices.get("text"), list)
                    and isinstance(choices.get("label"), list)):
                raise DataError(f"{path}: item {i + 1} has choices that are not {{text: [...], label: [...]}}")
            stem, texts, labels = r[stem_key], list(choices["text"]), list(choices["label"])
        if not isinstance(stem, str) or not all(isinstance(x, str) for x in texts + labels):
            raise DataError(f"{path}: item {i + 1} has a question, choice text or choice label that is not text")
        if len(texts) != len(labels) or len(texts) < 2:
            raise DataError(f"{path}: item {i + 1} has {len(texts)} choice texts and {len(labels)} labels; "
                            "expected one label per choice, at least 2 choices")
        _no_blank_choice(path, i, texts)
        key = str(r["answerKey"]).strip()
        if key not in labels:
            raise DataError(f"{path}: item {i + 1} has answerKey {key!r}, not among its choice labels {labels}")
        # ids as text: a file mixing numbers, text and no id failed in pyarrow after the model loaded; a null id is
        # a missing one (not the text "None")
        docs.append({"id": str(i if r.get("id") is None else r["id"]), stem_key: stem,
                     "choices": {"text": texts, "label": labels}, "answerKey": key})
    return fmt, docs


def _winogrande(path: Path, rows: list[dict]) -> tuple[str, list[dict]]:
    docs = []
    for i, r in enumerate(rows):
        _need(path, r, ("sentence", "option1", "option2", "answer"), i, "WinoGrande",
              text=("sentence", "option1", "option2"))
        if str(r["answer"]) not in ("1", "2"):
            raise DataError(f"{path}: item {i + 1} has answer {r['answer']!r}, expected 1 or 2")
        if "_" not in r["sentence"]:
            raise DataError(f"{path}: item {i + 1} has no blank '_' in its sentence")
        docs.append({"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"],
                     "answer": str(r["answer"])})
    return "release", docs


def load_task(name: str, path: str | Path) -> TaskData:
    """Items of a multiple-choice task from a release file, a llama.cpp text file or an HF-layout file/folder."""
    check_name(name)
    if name in PPL_TASKS:
        raise DataError(f"{name} is a perplexity task; use load_perplexity_text")
    file = find_file(name, path)
    if name == "hellaswag" and file.suffix == ".txt":
        return TaskData(name, str(file), "llamacpp", _hellaswag_text(file))
    rows = read_records(file)
    if not rows:
        raise DataError(f"{file}: file has no items")
    if name == "piqa":
        fmt, docs = _piqa(file, rows)
    elif name == "boolq":
        fmt, docs = _boolq(file, rows)
    elif name == "hellaswag":
        fmt, docs = _hellaswag_jsonl(file, rows)
    elif name == "winogrande":
        fmt, docs = _winogrande(file, rows)
    else:
        fmt, docs = _arc(file, rows, "question_stem" if name == "openbookqa" else "question")
    return TaskData(name, str(file), fmt, docs)


def choices_and_gold(name: str, doc: dict) -> tuple[list[str], int]:
    """The answer options and the gold index of one loaded item (for checks; the harness builds its own)."""
    if name == "piqa":
        return [doc["sol1"], doc["sol2"]], doc["label"]
    if name == "boolq":
        return ["no", "yes"], doc["label"]
    if name == "hellaswag":
        return list(doc["choices"] if "query" in doc else doc["endings"]), int(doc["label"])
    if name == "winogrande":
        return [doc["option1"], doc["option2"]], int(doc["answer"]) - 1
    return list(doc["choices"]["text"]), doc["choices"]["label"].index(doc["answerKey"])


# -- perplexity tasks -----------------------------------------------------------------------------------------


def load_perplexity_text(name: str, path: str | Path) -> str:
    """The whole test split joined as SparseGPT / LLM-Pruner do.

    WikiText-2: the HF rows (one per line of the release file, blank lines as "") joined with "\\n\\n".
    PTB: the sentences (stripped lines) joined with a single space.
    """
    check_name(name)
    if name not in PPL_TASKS:
        raise DataError(f"{name} is a multiple-choice task, not a perplexity task")
    file = find_file(name, path)
    column = "text" if name == "wikitext2" else "sentence"
    if file.suffix in HF_EXTENSIONS:
        rows = read_records(file)
        if any(column not in r for r in rows):
            raise DataError(f"{file}: rows have no {column!r} column, so this is not {name} in the HF layout")
        rows = [str(r[column]) for r in rows]
    else:
        text = read_text(file)
        if text.lstrip()[:1] in "{[" and file.suffix not in (".raw", ".tokens"):
            raise DataError(f"{file}: looks like JSON; give it a .jsonl/.json name for the HF layout")
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if name == "wikitext2":
            # HF keeps each line with its newline, and a blank line (" " in the release) as "".
            rows = ["" if not line.strip() else line + "\n" for line in lines]
        else:
            rows = [line.strip() for line in lines if line.strip()]
    joined = join_rows(name, rows)
    if not joined.strip():
        raise DataError(f"{file}: no text")
    return joined


def join_rows(name: str, rows: list[str]) -> str:
    """A perplexity task's test rows as one text, as load_perplexity_text says (the hub's rows too)."""
    return "\n\n".join(rows) if name == "wikitext2" else " ".join(rows)
