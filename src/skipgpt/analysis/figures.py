"""What the routers learned: per-layer skip rates, skip rate against position, a decision heatmap.

Every figure is written as a PNG next to the CSV it is drawn from, so the numbers can be re-plotted
or checked. Decisions come from real forward passes of the routed model (argmax routing unless the
caller set routed.sample), on non-overlapping windows of the given text.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..errors import DataError  # noqa: E402
from ..io import write_files_atomic  # noqa: E402

ATTN_COLOR, MLP_COLOR = "#d62728", "#1f77b4"


def text_windows(tokenizer, text: str, seq_len: int = 256, max_windows: int = 16) -> torch.Tensor:
    """Token ids (windows, T) of consecutive windows of `text`, T = seq_len or the whole text if shorter."""
    # A book need not be tokenised whole: a prefix of 16 characters per token is usually enough, but runs of
    # spaces or rules are single tokens of up to 80 characters, so the prefix grows until the windows fill.
    cut = seq_len * max_windows * 16
    while True:
        ids = tokenizer(text[:cut], return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        if ids.numel() >= seq_len * max_windows or cut >= len(text):
            break
        cut *= 4
    if ids.numel() < 2:
        raise DataError("the analysis text is empty or shorter than two tokens")
    seq_len = min(seq_len, ids.numel())
    return ids[: (ids.numel() // seq_len) * seq_len].reshape(-1, seq_len)[:max_windows]


def collect_decisions(routed, windows: torch.Tensor) -> torch.Tensor:
    """Execute decisions (windows, L, 2, T) of `routed` over token windows (windows, T)."""
    device = next(routed.model.parameters()).device
    out = []
    with torch.no_grad():  # without gradients routers decide by argmax, whatever their train flag
        for w in windows:
            routed(input_ids=w[None].to(device), use_cache=False)
            out.append(routed.decisions()[:, :, 0].cpu())
    return torch.stack(out)


def _csv(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def render(fig) -> bytes:
    """`fig` as PNG bytes, then closed: drawn in memory, so every figure can be drawn before any file is written."""
    try:
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
    finally:
        plt.close(fig)
    return buf.getvalue()


def _write(path: Path, content: str | bytes) -> Path:
    """Write through a temporary and a rename: a reader never sees half a file."""
    return write_files_atomic(path.parent, {path.name: content})[0]


def save_figure(fig, path: Path) -> Path:
    return _write(path, render(fig))


# Each figure returns {file name: content}, the PNG before the CSV it is drawn from. Titles and labels that carry
# text from outside (model names, tokens such as "$$") are drawn with parse_math=False: as mathtext they crash.


def per_layer_figure(skip: torch.Tensor, title: str) -> dict[str, str | bytes]:
    """skip: (L, 2) skip rates. Grouped bars, attention vs MLP, one group per layer."""
    L = skip.shape[0]
    table = _csv(["layer", "attention_skip_rate", "mlp_skip_rate"],
                 [[i, f"{float(skip[i, 0]):.6f}", f"{float(skip[i, 1]):.6f}"] for i in range(L)])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * L + 2), 3.6))
    x = torch.arange(L).float().numpy()
    ax.bar(x - 0.2, skip[:, 0].numpy() * 100, 0.4, label="attention", color=ATTN_COLOR)
    ax.bar(x + 0.2, skip[:, 1].numpy() * 100, 0.4, label="MLP", color=MLP_COLOR)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("tokens skipping the module (%)")
    ax.set_ylim(0, 100)
    ax.set_xticks(range(0, L, max(1, L // 15)))
    ax.set_title(f"Per-layer skip rate, attention vs MLP\n{title}", parse_math=False)
    ax.legend()
    return {"per_layer_skip.png": render(fig), "per_layer_skip.csv": table}


def position_figure(decisions: torch.Tensor, title: str, window: int = 16) -> dict[str, str | bytes]:
    """Skip rate (averaged over layers and text windows) against token position, in position buckets."""
    skip = 1.0 - decisions.float().mean(dim=(0, 1))  # (2, T)
    T = skip.shape[-1]
    window = max(1, min(window, T))
    rows, xs, ys = [], [], []
    for start in range(0, T, window):
        a = float(skip[0, start : start + window].mean())
        m = float(skip[1, start : start + window].mean())
        rows.append([start, min(start + window, T) - 1, f"{a:.6f}", f"{m:.6f}"])
        xs.append(start + (min(start + window, T) - start - 1) / 2)
        ys.append((a * 100, m * 100))
    table = _csv(["first_position", "last_position", "attention_skip_rate", "mlp_skip_rate"], rows)
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.plot(xs, [y[0] for y in ys], "o-", color=ATTN_COLOR, label="attention")
    ax.plot(xs, [y[1] for y in ys], "s-", color=MLP_COLOR, label="MLP")
    ax.set_xlabel(f"token position in the sequence (windows of {window} tokens)")
    ax.set_ylabel("tokens skipping, all layers (%)")
    ax.set_title(f"Skip rate against token position\n{title}", parse_math=False)
    ax.legend()
    return {"skip_vs_position.png": render(fig), "skip_vs_position.csv": table}


def heatmap_figure(decisions: torch.Tensor, tokens: list[str], title: str) -> dict[str, str | bytes]:
    """decisions: (L, 2, T) for one text; a token x layer map of executed (dark) and skipped (light) modules."""
    L, _, T = decisions.shape
    rows = [[t, repr(tokens[t]), i, int(decisions[i, 0, t]), int(decisions[i, 1, t])]
            for t in range(T) for i in range(L)]
    table = _csv(["position", "token", "layer", "attention_executed", "mlp_executed"], rows)
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.16 * T + 2), 2 * (0.12 * L + 1.5)), sharex=True)
    for ax, k, name in zip(axes, (0, 1), ("attention", "MLP")):
        ax.imshow(decisions[:, k].float().numpy(), aspect="auto", cmap="Greys", vmin=-0.15, vmax=1.0,
                  interpolation="nearest", origin="lower")
        ax.set_ylabel(f"{name}\nlayer")
        ax.set_title(f"{name}: dark = executed, white = skipped")
    axes[-1].set_xticks(range(T))
    axes[-1].set_xticklabels([t.replace("\n", "\\n") for t in tokens], rotation=90, fontsize=6, parse_math=False)
    axes[-1].set_xlabel("token")
    fig.suptitle(f"Routing decisions per token and layer\n{title}", parse_math=False)
    return {"decision_heatmap.png": render(fig), "decision_heatmap.csv": table}


def module_sparsity_figure(report, title: str) -> dict[str, str | bytes]:
    """Overall sparsity reached by each module type, and the parameter-weighted total."""
    names = ["attention", "MLP", "parameters (total)"]
    values = [report.attention, report.mlp, report.param]
    table = _csv(["measure", "skip_rate"],
                 [[n, f"{v:.6f}"] for n, v in zip(names, values)] + [["tokens", report.tokens]])
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    bars = ax.bar(names, [v * 100 for v in values], color=[ATTN_COLOR, MLP_COLOR, "#7f7f7f"])
    for b, v in zip(bars, values):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 1, f"{v:.1%}", ha="center")
    ax.set_ylabel("skipped (%)")
    ax.set_ylim(0, max(10.0, max(values) * 100 * 1.25))
    ax.set_title(f"Sparsity reached by module type ({report.tokens} tokens)\n{title}", parse_math=False)
    return {"module_sparsity.png": render(fig), "module_sparsity.csv": table}


def write_analysis(routed, tokenizer, text: str, output_dir: str | Path, seq_len: int = 256,
                   max_windows: int = 16, heatmap_tokens: int = 48, title: str | None = None) -> list[Path]:
    """Run `routed` over `text` and write the four analysis figures and their CSVs; returns the paths.

    The routed model's settings and sparsity meter are left as the caller had them."""
    title = title or _describe(routed)
    windows = text_windows(tokenizer, text, seq_len, max_windows)
    with routed.measuring():
        decisions = collect_decisions(routed, windows)  # (W, L, 2, T)
        report = routed.sparsity()
    skip = 1.0 - decisions.float().mean(dim=(0, 3))  # (L, 2)
    T = min(heatmap_tokens, decisions.shape[-1])
    tokens = [tokenizer.decode([i]) for i in windows[0, :T].tolist()]  # the heatmap's window, as routed
    # Everything is drawn before anything is written: a drawing error must not leave new files among old ones.
    files = {
        **per_layer_figure(skip, title),
        **position_figure(decisions, title, window=max(1, decisions.shape[-1] // 16)),
        **heatmap_figure(decisions[0, :, :, :T], tokens, title),
        **module_sparsity_figure(report, title),
    }
    return write_files_atomic(output_dir, files)  # the folder is made only once there is something to write


def _describe(routed) -> str:
    c = routed.config
    kind = c.extra.get("routing", "SkipGPT routers")
    return f"{c.base.name or c.base.architecture}, {kind}, target {c.target_sparsity:.0%}"
