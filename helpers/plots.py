"""Figures read from the runs' own records (metrics.jsonl, eval.csv, attention tables), never from
printed logs. Each function draws on a new figure, returns it, and saves a PNG when asked.
Floor "figures": reads run files (helpers.records); it imports neither the trainer nor a model."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from helpers.records import read_metrics


def _save(fig, path):
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def plot_loss_curves(runs: dict, reference: dict | None = None, title: str = "Loss against tokens seen",
                     path=None, log_y: bool = True, untrained: dict | None = None):
    """Loss against tokens seen for each {name: run folder}: val solid, train dashed, one colour
    per run. `reference` draws horizontal lines, e.g. {"parent val loss": 1.3}; `untrained` marks
    {name: val loss} at zero tokens (e.g. every strategy's child before training). The loss axis is
    logarithmic by default: an inherited child starts very high and ends close to its parent."""
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for j, (name, value) in enumerate((untrained or {}).items()):
        ax.scatter([0], [value], marker=["x", "+", "1", "2", "3", "4"][j % 6], s=70, color="k", zorder=4,
                   label=f"{name}: {value:.2f}")
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
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the curves, never over them
    fig.tight_layout()
    return _save(fig, path)


def read_eval(eval_dir) -> tuple[pd.DataFrame | None, dict]:
    """Notebook 04's eval.csv (None when eval_dir is None) and the reference lines it gives the
    loss curves: {"parent val loss": value} when a model named parent was evaluated."""
    if eval_dir is None:
        return None, {}
    results = pd.read_csv(Path(eval_dir) / "eval.csv")
    parent = results.loc[results["model"] == "parent", "val_loss"]
    return results, ({"parent val loss": float(parent.iloc[0])} if len(parent) else {})


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


def plot_attention_tables(eval_dir, images_dir) -> list[Path]:
    """One heatmap per attention table notebook 04 wrote (attention_<model>.csv; not the summary),
    each saved as <images_dir>/attention_<model>.png; returns the PNG paths."""
    paths = []
    for csv in sorted(Path(eval_dir).glob("attention_*.csv")):
        if csv.stem == "attention_summary":
            continue
        path = Path(images_dir) / f"{csv.stem}.png"
        plot_attention_rank(pd.read_csv(csv), csv.stem.removeprefix("attention_").replace("_", " "), path=path)
        paths.append(path)
    return paths


def plot_document_lengths(lengths, split: str = "train", path=None):
    """Histogram of tokens per document (helpers.data.document_lengths) on log-spaced bins, titled
    with the count and the median. One document (a corpus split by position) is one bar."""
    lengths = np.asarray(lengths)
    fig, ax = plt.subplots(figsize=(7, 3))
    if lengths.size:
        # the top edge above the longest: logspace's rounding could leave it outside every bin
        ax.hist(lengths, bins=np.geomspace(1, 1.05 * max(int(lengths.max()), 10), 40))
        title = f"{lengths.size:,} {split} document{'s' if lengths.size != 1 else ''} (median {int(np.median(lengths)):,} tokens)"
    else:
        title = f"no {split} documents"
    ax.set_xscale("log")
    ax.set_xlabel("tokens per document")
    ax.set_ylabel("documents")
    ax.set_title(title)
    return _save(fig, path)


SCORE_LABELS = {"block_influence": "block influence (1 - cos in/out)", "angular_distance": "angular distance of the window starting here",
                "attention_rank": "attention rank (90% energy, mean over heads)", "early_exit_loss": "early-exit loss (blocks 0..i)"}


def plot_layer_scores(scores: pd.DataFrame, kept: list[int] | dict, title: str = "Layer scores of the parent", path=None):
    """The four scores of `helpers.inherit.layer_scores` against block index, one panel each.
    `kept`: the kept block indices, or {strategy name: kept indices} to mark several choices
    (filled markers on the first one's kept blocks, one row of ticks per strategy below each panel)."""
    choices = kept if isinstance(kept, dict) else {"kept": list(kept)}
    first = next(iter(choices.values()))
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharex=True)
    blocks = scores.index.to_numpy()
    for ax, column in zip(axes.flat, SCORE_LABELS):
        values = scores[column]
        ax.plot(blocks, values, "-", color="0.6", lw=1)
        keep = [b in first for b in blocks]
        ax.scatter(blocks[keep], values[keep], color="C0", s=22, zorder=3, label=f"{next(iter(choices))}: kept")
        ax.scatter(blocks[[not k for k in keep]], values[[not k for k in keep]], facecolors="none", edgecolors="C3",
                   s=22, zorder=3, label="dropped")
        lo, hi = ax.get_ylim()
        for j, (name, layers) in enumerate(choices.items()):  # one row of ticks per strategy, under the curve
            y = lo - (j + 1) * 0.07 * (hi - lo)
            ax.plot(layers, [y] * len(layers), "|", color=f"C{j}", ms=7, mew=2, label=f"{name}" if len(choices) > 1 else None)
        ax.set_ylim(lo - (len(choices) + 1) * 0.07 * (hi - lo), hi)
        ax.set_title(SCORE_LABELS[column], fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("parent block")
    axes[0, 0].legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def plot_grow(rounds: list[dict], parent_val_loss: float, title: str = "Growing the child until it reaches its parent",
              path=None):
    """The grow loop's rounds: whole-split val loss of each trained child against its number of
    blocks, with the parent's val loss as the line to reach."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    n = [r["n_layers"] for r in rounds]
    ax.plot(n, [r["val_loss"] for r in rounds], "-o", color="C0", label="child after training")
    ax.axhline(parent_val_loss, color="k", ls="-.", lw=1.2, label=f"parent = {parent_val_loss:.2f}")
    ax.set_xticks(n)
    ax.set_xlabel("blocks kept (n)")
    ax.set_ylabel("val loss (whole val split)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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
