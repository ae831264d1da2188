"""`evaluate`: every task of the paper's table on local data, with realised sparsity per task."""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from ..errors import DataError
from ..models.routed import RoutedModel
from . import tasks as task_data
from .harness import SkipGPTLM, build_task, quiet_bars, run_task
from .perplexity import check_one_window, default_seq_len, perplexity, tokenize_text

COLUMNS = ("task", "n", "acc", "acc_norm", "ppl", "tokens", "seq_len", "param", "attention", "mlp")


def _hub_text(name: str) -> str:
    import datasets

    try:
        if name == "wikitext2":
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
        else:
            rows = datasets.load_dataset("ptb_text_only", "penn_treebank", split="test")["sentence"]
    except Exception as e:  # network or hub errors surface as many types
        raise DataError(f"{name}: no PATH given and the hub dataset could not be loaded ({type(e).__name__})") from None
    return task_data.join_rows(name, rows)


def _perplexity_ids(name: str, path: str | None, tokenizer, seq_len: int) -> torch.Tensor:
    """The task's text as token ids, refused if shorter than one window."""
    text = task_data.load_perplexity_text(name, path) if path else _hub_text(name)
    ids = tokenize_text(tokenizer, text)
    check_one_window(ids, seq_len, f"{name}: the text")
    return ids


def _choice_task(name: str, path: str | None, limit: int | None, progress: bool):
    """(the task's local items or None for the hub's, its harness task) of a multiple-choice task."""
    data = task_data.load_task(name, path) if path else None
    if data is not None and limit is not None:
        data.docs = data.docs[:limit]  # the first N items, in file order
    with nullcontext() if progress else quiet_bars():
        return data, build_task(data, name)


def _sparsity(routed) -> dict:
    if routed is None:
        return {"param": 0.0, "attention": 0.0, "mlp": 0.0}
    return routed.sparsity().short()


def evaluate(
    model,
    tokenizer,
    tasks: dict[str, str | None],
    limit: int | None = None,
    batch_size: int = 1,
    seq_len: int | None = None,
    progress: bool = True,
    model_name: str | None = None,
    routers: str | None = None,
    lora: str | None = None,
    windows: int | None = None,
) -> dict:
    """Evaluate `model` (a RoutedModel or a plain HF causal LM) on {task name: data path or None}.

    Multiple-choice tasks run through lm-evaluation-harness (stock prompts and metrics, first `limit`
    items); perplexity tasks score the first `windows` windows of `seq_len` tokens (default: `limit`, so
    one quick-run flag shortens both). Returns the results
    dict written by `skipgpt eval --output` (see docs/RESULTS.md for its shape). A routed model's settings and
    sparsity meter are left as the caller had them.
    """
    for name in tasks:
        task_data.check_name(name)
    routed = model if isinstance(model, RoutedModel) else None
    seq_len = default_seq_len(model.model if routed is not None else model, seq_len)
    windows = limit if windows is None else windows
    # Every perplexity text is read and checked before the first task: a text too short for one window must not
    # fail after hours of multiple-choice scoring.
    texts = {name: _perplexity_ids(name, path, tokenizer, seq_len)
             for name, path in tasks.items() if name in task_data.PPL_TASKS}
    # So is every multiple-choice task, a hub one fetched: one the hub cannot give must not fail after the others.
    choices = {name: _choice_task(name, path, limit, progress) for name, path in tasks.items() if name not in texts}
    lm = None
    out_tasks: dict[str, dict] = {}
    bar = tqdm(list(tasks.items()), desc="tasks", unit="task", disable=not progress)
    with routed.measuring() if routed is not None else nullcontext():
        for name, path in bar:
            bar.set_postfix_str(name)
            start = time.perf_counter()
            if routed is not None:
                routed.reset_sparsity()
            if name in texts:
                ids = texts[name]
                total = ids.numel() // seq_len if windows is None else min(ids.numel() // seq_len, windows)
                with tqdm(total=total, desc=f"{name} windows", leave=False, disable=not progress) as bar_windows:
                    result = perplexity(model, ids, seq_len, limit=windows, batch_size=batch_size,
                                        progress=bar_windows.update)
                row = {**result, "source": path}
            else:
                data, task = choices[name]
                with torch.no_grad(), nullcontext() if progress else quiet_bars():
                    if lm is None:
                        lm = SkipGPTLM(model, tokenizer=tokenizer, batch_size=batch_size)
                    result = run_task(lm, task, limit=limit if data is None else None)
                row = {**result, "metric": task_data.paper_metric(name),
                       "source": data.source if data else None, "format": data.format if data else "hub"}
            row["sparsity"] = _sparsity(routed)
            row["seconds"] = round(time.perf_counter() - start, 1)
            out_tasks[name] = row
    mc = [row[row["metric"]] for name, row in out_tasks.items() if "metric" in row]
    hf = routed.model if routed is not None else model
    return {
        "model": model_name or getattr(getattr(hf, "config", None), "skipgpt_name", None) or type(hf).__name__,
        "routers": routers,
        "lora": lora,
        "mode": routed.mode if routed is not None else "dense",
        "limit": limit,
        "windows": windows,
        "batch_size": batch_size,
        "tasks": out_tasks,
        "average_acc": sum(mc) / len(mc) if mc else None,
    }


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown_table(results: dict) -> str:
    """The results as a markdown table, one row per task, sparsity in percent."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for name, row in results["tasks"].items():
        sp = row.get("sparsity", {})
        cells = [
            name, _fmt(row.get("n"), "d"), _fmt(row.get("acc"), ".4f"), _fmt(row.get("acc_norm"), ".4f"),
            _fmt(row.get("ppl"), ".2f"), _fmt(row.get("tokens"), "d"), _fmt(row.get("seq_len"), "d"),
            _fmt(sp.get("param"), ".1%"), _fmt(sp.get("attention"), ".1%"), _fmt(sp.get("mlp"), ".1%"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if results.get("average_acc") is not None:
        norm = "/".join(task_data.NORM_TASKS)
        lines.append(f"\naverage_acc (acc_norm for {norm}, acc otherwise): {results['average_acc']:.4f}")
    return "\n".join(lines)
