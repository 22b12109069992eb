"""Evaluation: the honest comparison of parent, inherited child and scratch child.

- `evaluate_models`: val loss over the whole val split of each model (helpers.measures.val_loss_full),
  written to eval.csv and eval.json;
- `continuations`: greedy and sampled text from fixed prompts, side by side;
- `attention_collapse` (from helpers.measures): the paper's lazy-layer diagnostic;
- `downstream`: zero- or few-shot accuracy through lm-evaluation-harness.

Floor "evaluation": loads models through helpers.checkpoint and measures them through helpers.measures.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from helpers.checkpoint import export_hf, load_model, read_sidecar, resolve
from helpers.data import open_split
from helpers.errors import ConfigError, HelpersError
from helpers.measures import attention_collapse, attention_maps, val_loss_full  # noqa: F401 (public here too)
from helpers.model import GPT
from helpers.tokenizer import encode_prompt, hf_tokenizer


@torch.no_grad()
def continuations(models: dict, enc, prompts: list[str], max_new_tokens: int = 32, temperature: float = 0.8,
                  top_k: int | None = 50, seed: int = 0, device="cpu") -> pd.DataFrame:
    """One row per (prompt, model): a greedy and a sampled continuation. Prompts start as the
    training documents did (helpers.tokenizer.encode_prompt); ids a padded embedding has past the
    tokenizer's vocabulary (nanoGPT's 50,304 rows for 50,257 tokens) have no text and are left out."""
    rows = []
    for prompt in prompts:
        ids = torch.tensor([encode_prompt(enc, prompt)], device=device)  # after the BOS where documents had one
        for name, model in models.items():
            greedy = model.generate(ids, max_new_tokens, temperature=0)
            sampled = model.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k,
                                     generator=torch.Generator(device=device).manual_seed(seed))
            text = [enc.decode([i for i in out[0, ids.size(1):].tolist() if i < enc.n_vocab])
                    for out in (greedy, sampled)]
            rows.append({"prompt": prompt, "model": name, "greedy": text[0], "sampled": text[1]})
    return pd.DataFrame(rows)


def tokens_seen(source) -> int | None:
    """Training tokens recorded in a checkpoint's sidecar (None for parents and foreign files)."""
    try:
        kind, path = resolve(source)
    except HelpersError:  # not a local file or folder (a hub id offline, say): no record of training
        return None
    side = read_sidecar(path) if kind == "torch" else None
    return side.get("tokens_seen") if side else None


def evaluate_models(models: dict, data_dir, out_dir=None, block_size: int = 256, batch_size: int = 8,
                    device="cpu", max_tokens: int | None = None, dtype: torch.dtype = torch.float32) -> pd.DataFrame:
    """Val loss over the whole val split for each {name: source or GPT}; written to
    out_dir/eval.csv and eval.json when out_dir is given. dtype=torch.bfloat16 computes in bfloat16
    (autocast); the losses are summed in float32 either way."""
    rows = []
    for name, source in models.items():
        model = source if isinstance(source, torch.nn.Module) else load_model(source, device=device)
        model.to(device)
        res = val_loss_full(model, data_dir, block_size, batch_size, device, max_tokens, dtype=dtype)
        rows.append({"model": name, "layers": model.config.n_layer, "params": model.num_params(),
                     "tokens_seen": tokens_seen(source) if not isinstance(source, torch.nn.Module) else None, **res})
    df = pd.DataFrame(rows)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        df.to_csv(out / "eval.csv", index=False)
        (out / "eval.json").write_text(json.dumps(df.to_dict(orient="records"), indent=1))
    return df


def sample_ids(data_dir, length: int, offset: int = 0) -> torch.Tensor:
    """(1, length) real tokens from the val split, for the attention diagnostic."""
    data = open_split(data_dir, "val")
    return torch.from_numpy(np.asarray(data[offset:offset + length]).astype(np.int64))[None]


# ---- downstream tasks through lm-evaluation-harness ----------------------------------------------
def export_for_harness(model: GPT, out_dir) -> Path:
    """A Hugging Face folder (weights, config and tokenizer) that lm-evaluation-harness loads; a
    model with no tokenizer recorded (a random test model) gets GPT-2's."""
    out = export_hf(model, out_dir)
    if not (out / "tokenizer.json").is_file():
        hf_tokenizer(model.provenance.get("tokenizer")).save_pretrained(str(out))
    return out


def downstream(models: dict, tasks: list[str], limit: int | float | None = None, num_fewshot: int = 0,
               include_path=None, batch_size: int = 8, device: str = "cpu") -> pd.DataFrame:
    """Zero- (or few-) shot accuracy of each {name: source or GPT} on lm-evaluation-harness tasks,
    one row per (model, task): acc, acc_norm (NaN where the task has none), their standard errors
    and n (documents scored; `limit` caps it per task). Each model goes to the harness as an
    exported Hugging Face folder (the `hf` model type), so what is scored is exactly our weights.
    `include_path`: a folder of extra task YAML files (tasks over local files, offline)."""
    import tempfile

    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("downstream tasks need lm-evaluation-harness: pip install -e '.[eval]' "
                          "(or pip install 'lm-eval[hf]')") from None
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    rows = []
    for name, source in models.items():
        model = source if isinstance(source, torch.nn.Module) else load_model(source)
        with tempfile.TemporaryDirectory() as tmp:
            folder = export_for_harness(model, tmp)
            lm = HFLM(pretrained=str(folder), device=device, batch_size=batch_size, dtype="float32")
            out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                          task_manager=manager, log_samples=False, verbosity="WARNING")
        for task, metrics in out["results"].items():
            get = lambda key: metrics.get(f"{key},none", float("nan"))  # noqa: E731
            rows.append({"model": name, "task": task, "acc": get("acc"), "acc_norm": get("acc_norm"),
                         "acc_stderr": get("acc_stderr"), "acc_norm_stderr": get("acc_norm_stderr"),
                         "n": out.get("n-samples", {}).get(task, {}).get("effective")})
    return pd.DataFrame(rows, columns=["model", "task", "acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "n"])


def merge_downstream(results: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    """results (one row per model, as evaluate_models) with the downstream scores as columns
    `<task>_acc` and `<task>_acc_norm` (the latter only for tasks that have it), for eval.csv."""
    wide = scores.pivot(index="model", columns="task", values=["acc", "acc_norm"])
    wide = wide.dropna(axis=1, how="all")
    wide.columns = [f"{task}_{metric}" for metric, task in wide.columns]
    return results.merge(wide[sorted(wide.columns)], left_on="model", right_index=True, how="left")


# ---- notebook 04's tables ------------------------------------------------------------------------
def task_list(tasks) -> list[str]:
    """The `tasks` parameter as a list of names: a list, JSON text ('["arc_easy", "piqa"]') or
    comma-separated text ('arc_easy,piqa', what `papermill -p tasks ...` passes); '' or [] for none."""
    if isinstance(tasks, str):
        text = tasks.strip()
        tasks = json.loads(text) if text.startswith("[") else text.split(",")
    return [str(t).strip() for t in tasks or [] if str(t).strip()]


def write_results(results: pd.DataFrame, out_dir) -> pd.DataFrame:
    """results as out_dir/eval.csv and eval.json (one record per model); returns them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results.to_csv(out / "eval.csv", index=False)
    (out / "eval.json").write_text(json.dumps(results.to_dict(orient="records"), indent=1))
    return results


def compare_models(loaded: dict, sources: dict, data_dir, out_dir, block_size: int = 256, batch_size: int = 8,
                   device="cpu") -> pd.DataFrame:
    """Whole-split val loss of each already loaded {name: model}, with the training tokens that
    its source's sidecar records ({name: source}), written to out_dir/eval.csv and eval.json."""
    results = evaluate_models(loaded, data_dir, block_size=block_size, batch_size=batch_size, device=device)
    results["tokens_seen"] = [tokens_seen(sources[name]) for name in results["model"]]
    return write_results(results, out_dir)


def attention_report(models: dict, ids: torch.Tensor, out_dir) -> tuple[pd.DataFrame, dict]:
    """The attention-collapse diagnostic of each {name: model} on one (1, T) sample: per model a
    table (attention_<name>.csv in out_dir), and one summary row each (attention_summary.csv):
    mean rank share, degenerate heads, lazy layers. Models of the generic path (transformers'
    own attention, not instrumented) are left out of both. Returns (summary, {name: table})."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary, tables = [], {}
    for name, model in models.items():
        if not isinstance(model, GPT):
            continue
        table = attention_collapse(model, ids[:, : model.config.block_size])
        table.to_csv(out / f"attention_{slug(name)}.csv", index=False)
        tables[name] = table
        summary.append({"model": name, "layers": model.config.n_layer, "mean_rank_frac": table["rank_frac"].mean(),
                        "degenerate_heads": int(table["degenerate"].sum()), "heads": len(table),
                        "lazy_layers": sorted(table.loc[table["lazy"], "layer"].unique().tolist())})
    summary = pd.DataFrame(summary, columns=["model", "layers", "mean_rank_frac", "degenerate_heads", "heads", "lazy_layers"])
    summary.to_csv(out / "attention_summary.csv", index=False)
    return summary, tables


def slug(name: str) -> str:
    """A model's name as a file name part: every character but letters and digits becomes _."""
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")
