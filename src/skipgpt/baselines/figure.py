"""The comparison as one figure: accuracy retained and perplexity of every method, per sparsity."""

from __future__ import annotations

from pathlib import Path

from ..analysis.figures import plt, save_figure
from .table import task_metric

SPARSITY_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd")


def comparison_figure(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Grouped bars, one group per method and one bar per target sparsity: retention % (left) and
    the first perplexity task (right, log scale). Dense is the dashed line in both panels."""
    dense = next((r for r in rows if r["method"] == "dense"), None)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"))
    targets = sorted({r["target_sparsity"] for r in rows if r["method"] != "dense"})
    ppl_task = next((n for r in rows for n, m in r["tasks"].items() if "ppl" in m), None)
    accuracy = any(r.get("retention") is not None for r in rows if r["method"] != "dense")
    panels = [("retention", "average accuracy, % of dense")] if accuracy or not ppl_task else []  # (ppl alone: none)
    if ppl_task:
        panels.append((ppl_task, f"{ppl_task} perplexity (log scale)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.0, 0.7 * len(methods) + 2) * len(panels), 4.2),
                             squeeze=False)
    width = 0.8 / max(1, len(targets))
    for ax, (key, label) in zip(axes[0], panels):
        for j, target in enumerate(targets):
            by = {r["method"]: r for r in rows if r["target_sparsity"] == target and r["method"] != "dense"}
            xs, ys = [], []
            for i, m in enumerate(methods):
                value = _value(by.get(m), key)
                if value is not None:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(value)
            ax.bar(xs, ys, width, label=f"target {100 * target:g}%", color=SPARSITY_COLORS[j % len(SPARSITY_COLORS)])
        reference = 100.0 if key == "retention" else _value(dense, key)
        if dense is not None and reference is not None:
            ax.axhline(reference, color="black", linestyle="--", linewidth=1, label="dense")
        if key != "retention":
            ax.set_yscale("log")
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=30, ha="right")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(title or "Methods at equal parameter sparsity", parse_math=False)  # a "$" in a model path is text
    return save_figure(fig, Path(path))


def _value(row: dict | None, key: str) -> float | None:
    if row is None:
        return None
    if key == "retention":
        return row.get("retention")
    return task_metric(key, row["tasks"].get(key, {}))[1]
