"""Figures read from the runs' own records (metrics.jsonl, eval.csv, attention tables), never from
printed logs. Each function draws on a new figure, returns it, and saves a PNG when asked."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from helpers.train import read_metrics


def _save(fig, path):
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def plot_loss_curves(runs: dict, reference: dict | None = None, title: str = "Loss against tokens seen",
                     path=None, log_y: bool = True):
    """Loss against tokens seen for each {name: run folder}: val solid, train dashed, one colour
    per run. `reference` draws horizontal lines, e.g. {"parent val loss": 1.3}. The loss axis is
    logarithmic by default: an inherited child starts very high and ends close to its parent."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, run) in enumerate(runs.items()):
        m = read_metrics(run)
        colour = f"C{i}"
        ax.plot(m["tokens"], m["val_loss"], "-o", ms=3, color=colour, label=f"{name} (val)")
        ax.plot(m["tokens"], m["train_loss"], "--", color=colour, alpha=0.7, label=f"{name} (train)")
    for j, (label, value) in enumerate((reference or {}).items()):
        ax.axhline(value, color="k", ls=":" if j else "-.", lw=1.2, label=f"{label} = {value:.2f}")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy loss")
    if log_y:
        from matplotlib.ticker import LogLocator, ScalarFormatter
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_loss_vs_params(results: pd.DataFrame, path=None):
    """Final val loss against parameter count, one labelled point per model (from eval.csv)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, row in results.reset_index(drop=True).iterrows():
        ax.scatter(row["params"] / 1e6, row["val_loss"], color=f"C{i}", s=40)
        ax.annotate(row["model"], (row["params"] / 1e6, row["val_loss"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("val loss (whole val split)")
    ax.set_title("Validation loss against model size")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_attention_rank(table: pd.DataFrame, title: str, path=None):
    """Heatmap of attention rank (share of T holding 90% of the energy), layers x heads; lazy layers
    (every head on one column) are marked."""
    grid = table.pivot(index="layer", columns="head", values="rank_frac")
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * grid.shape[1] + 2), max(3, 0.3 * grid.shape[0] + 1.5)))
    im = ax.imshow(grid.values, aspect="auto", cmap="viridis", vmin=0, vmax=max(0.05, float(grid.values.max())))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    lazy = sorted(table.loc[table["lazy"], "layer"].unique())
    ax.set_yticks(range(grid.shape[0]), [f"{l}{' (lazy)' if l in lazy else ''}" for l in grid.index], fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="rank for 90% energy / T")
    return _save(fig, path)


def plot_downstream(scores: pd.DataFrame, metric: str = "acc", path=None):
    """Grouped bars from helpers.evaluate.downstream's table: one group per task (and their mean),
    one bar per model, `metric` (acc or acc_norm; tasks without it are left out) in percent."""
    table = scores.pivot(index="task", columns="model", values=metric).dropna(how="all")
    table = table[list(dict.fromkeys(scores["model"]))]  # models in the order given
    table.loc["mean"] = table.mean()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(table) * max(1, len(table.columns)) / 2), 4))
    width = 0.8 / len(table.columns)
    for i, model in enumerate(table.columns):
        xs = [j + (i - (len(table.columns) - 1) / 2) * width for j in range(len(table))]
        bars = ax.bar(xs, 100 * table[model], width, label=model, color=f"C{i}")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(table)), table.index, fontsize=8)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"Downstream tasks, {metric}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _save(fig, path)
