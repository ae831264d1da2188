"""The paper-style comparison table, as markdown (also what `skipgpt compare` prints)."""

from __future__ import annotations

from ..evaluation.tasks import NORM_TASKS as NORM_TASKS  # noqa: F401 - kept importable from here
from ..evaluation.tasks import paper_metric


def task_metric(name: str, metrics: dict) -> tuple[str, float | None]:
    if "ppl" in metrics:
        return "ppl", metrics["ppl"]
    key = paper_metric(name) if paper_metric(name) in metrics else "acc"
    return key, metrics.get(key)


def _fmt(value, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "ppl":
        return f"{value:.2f}"
    if kind == "pct":
        return f"{value:.1f}"
    return f"{100 * value:.1f}"


def _mc_cell(name: str, metrics: dict) -> str:
    """The column's metric, or acc named in the cell where the task did not score that one."""
    key, value = task_metric(name, metrics)
    return _fmt(value, "acc") + ("" if key == paper_metric(name) or value is None else f" ({key})")


def markdown_table(rows: list[dict]) -> str:
    """Columns: method, target, realised param (attention / MLP) sparsity, each task, average, retention."""
    names: list[str] = []
    for row in rows:
        names += [n for n in row["tasks"] if n not in names]
    mc = [n for n in names if not any("ppl" in r["tasks"].get(n, {}) for r in rows)]
    ppl = [n for n in names if n not in mc]
    header = ["method", "target", "param sparsity (attn / MLP)"]
    header += [f"{n} {paper_metric(n)}" for n in mc]
    header += ["avg acc", "retention %"] + [f"{n} ppl" for n in ppl]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        sp = r["sparsity"]
        cells = [r["method"], f"{100 * r.get('target_sparsity', 0.0):g}%",  # as the build folders: 25%, 25.4%, 25.45%
                 f"{100 * sp['param']:.1f}% ({100 * sp['attention']:.0f} / {100 * sp['mlp']:.0f})"]
        cells += [_mc_cell(n, r["tasks"].get(n, {})) for n in mc]
        cells += [_fmt(r.get("average_acc"), "acc"), _fmt(r.get("retention"), "pct")]
        cells += [_fmt(r["tasks"].get(n, {}).get("ppl"), "ppl") for n in ppl]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
