"""Tables and plots of the examples' results: markdown tables, and PNGs drawn with matplotlib
(imported when a plot is drawn, with the file-only Agg backend: no display needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hgrn2mini.checkpoint import atomic_write


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def best_by(records: list[dict], keys: tuple[str, ...], metric: str) -> list[dict]:
    """Per distinct value of `keys`, the record with the highest `metric` (a sweep's best)."""
    best: dict[tuple, dict] = {}
    for r in records:
        k = tuple(r[key] for key in keys)
        if k not in best or r[metric] > best[k][metric]:
            best[k] = r
    return list(best.values())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> None:
    """Written atomically: a reader (or a run killed mid-write) never sees half a PNG."""
    plt = _pyplot()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> None:
    """Training loss per step and validation loss at each evaluation, from a metrics.jsonl."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r["kind"] == "eval"]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.8, label="training loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, png_path)


def plot_perplexity(curves: dict[str, list[tuple[int, float]]], png_path: str | os.PathLike, title: str,
                    xlabel: str = "tokens") -> None:
    """Validation perplexity against training progress, one line per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        if points:
            ax.plot(*zip(*points), "o-", ms=3, label=name)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation perplexity")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    _save(fig, png_path)


def plot_mqar(best: list[dict], settings: list[tuple[int, int]], labels: dict[str, str],
              png_path: str | os.PathLike, title: str) -> None:
    """Accuracy against d_model, one panel per (sequence length, pairs), one line per model."""
    plt = _pyplot()
    cols = len(settings)
    fig, axes = plt.subplots(1, cols, figsize=(3.6 * cols, 3.4), squeeze=False, sharey=True)
    for ax, (T, N) in zip(axes[0], settings):
        for model, label in labels.items():
            points = sorted((r["d_model"], r["accuracy"]) for r in best
                            if r["model"] == model and (r["seq_len"], r["pairs"]) == (T, N))
            if points:
                ax.plot(*zip(*points), "o-", label=label)
        ax.set_xscale("log", base=2)
        ax.set_title(f"seq len {T}, {N} pairs")
        ax.set_xlabel("d_model")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (held out)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title, y=1.04)
    _save(fig, png_path)

