"""A run's record: `metrics.jsonl`, one JSON line per evaluation, is what the plots and the
comparison read (never printed logs); and the progress bar a run shows people meanwhile.
Floor "ground": plain files and pandas, no model, no torch.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pandas as pd

from helpers.files import atomic_write

METRICS = "metrics.jsonl"
PROGRESS_ENV = "INHERITUNE_PROGRESS"  # "text": plain-text bars even inside a notebook's kernel


def progress_bar(**kwargs):
    """A tqdm bar (keyword arguments as tqdm's): a widget inside a notebook, text on a terminal;
    text inside a notebook too when INHERITUNE_PROGRESS=text, which helpers.pipeline sets for the
    kernels whose output it streams to the terminal (a widget's updates never reach it)."""
    if os.environ.get(PROGRESS_ENV) == "text":
        from tqdm.std import tqdm
    else:
        from tqdm.auto import tqdm
    return tqdm(**kwargs)


def append_record(out_dir: Path, record: dict) -> None:
    """One evaluation's line at the end of out_dir/metrics.jsonl."""
    with open(Path(out_dir) / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path) -> pd.DataFrame:
    """metrics.jsonl of a run folder (or the file itself) as a table, one row per evaluation."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return pd.DataFrame(rows)


def metrics_table(metrics: pd.DataFrame, last: int = 8) -> pd.DataFrame:
    """The last evaluations of read_metrics' table, in the columns a reader looks at: step, tokens,
    lr, train and val loss, the distillation parts (distillation runs only) and tokens per second."""
    columns = ["step", "tokens", "lr", "train_loss", "val_loss", "ce_loss", "kd_loss", "total_loss", "tokens_per_s"]
    return metrics[[c for c in columns if c in metrics]].tail(last)


def best_val_loss(metrics: pd.DataFrame) -> float:
    """The lowest val loss of a run's evaluations (the one best.pt holds)."""
    return float(metrics["val_loss"].min())


def from_json_text(value):
    """A notebook parameter that `papermill -p` passed as JSON text ('{"parent": "gpt2"}') as the
    dict or list it stands for; any other value (already a dict or list, YAML, the default) as it is."""
    if isinstance(value, str) and value.strip()[:1] in ("{", "["):
        return json.loads(value)
    return value


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records written after the checkpoint we resume from."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write(path, lambda f: f.write(("\n".join(keep) + "\n" if keep else "").encode()))


def parse_student_log(text: str) -> pd.DataFrame:
    """The Kaggle student project's printed logs (`step N: train loss X, val loss Y`) as the same
    table as metrics.jsonl (step, train_loss, val_loss)."""
    pattern = re.compile(r"step\s+(\d+):\s*train loss\s+([-+\d.eE]+|nan|inf),\s*val loss\s+([-+\d.eE]+|nan|inf)")
    rows = [{"step": int(m.group(1)), "train_loss": float(m.group(2)), "val_loss": float(m.group(3))}
            for m in pattern.finditer(text)]
    return pd.DataFrame(rows, columns=["step", "train_loss", "val_loss"])
