"""Evaluation: the honest comparison of parent, inherited child and scratch child.

- `val_loss_full`: loss and perplexity over the *whole* validation split, one deterministic
  sequential pass (every token predicted exactly once), not a sample of random batches.
- `continuations`: greedy and sampled text from fixed prompts, side by side.
- `attention_collapse`: the paper's later diagnostic: per layer and head, the rank of the
  post-softmax attention matrix on real text (smallest k whose squared singular values hold 90%
  of the energy) and whether the head puts most of its mass on a single column; a layer whose
  heads are all degenerate is "lazy".
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from helpers.checkpoint import load_model, read_sidecar, resolve
from helpers.data import iter_sequential, open_split
from helpers.errors import ConfigError, HelpersError
from helpers.model import GPT, attention_mask


@torch.no_grad()
def val_loss_full(model: GPT, data_dir, block_size: int = 256, batch_size: int = 8, device="cpu",
                  max_tokens: int | None = None) -> dict:
    """Mean next-token loss over the whole val split (or its first max_tokens tokens). Only the loss
    is computed for our own model (GPT.loss_sum): no (tokens, vocab) logits are kept."""
    model.eval()
    data = open_split(data_dir, "val")
    total_loss, count = 0.0, 0
    block_size = min(block_size, model.config.block_size)
    for x, y in iter_sequential(data, block_size, batch_size, device, max_tokens):
        if isinstance(model, GPT):
            loss, n = model.loss_sum(x, y)
        else:  # a transformers model (generic path): its own head, then the loss
            logits = model(x)[0].float()
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum")
            n = int((y >= 0).sum())
        total_loss += loss.item()
        count += n
    mean = total_loss / count
    return {"val_loss": mean, "perplexity": math.exp(min(mean, 50.0)), "val_tokens": count}


@torch.no_grad()
def continuations(models: dict, enc, prompts: list[str], max_new_tokens: int = 32, temperature: float = 0.8,
                  top_k: int | None = 50, seed: int = 0, device="cpu") -> pd.DataFrame:
    """One row per (prompt, model): a greedy and a sampled continuation."""
    rows = []
    for prompt in prompts:
        ids = torch.tensor([enc.encode_ordinary(prompt)], device=device)
        for name, model in models.items():
            greedy = model.generate(ids, max_new_tokens, temperature=0)
            sampled = model.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k,
                                     generator=torch.Generator(device=device).manual_seed(seed))
            rows.append({"prompt": prompt, "model": name,
                         "greedy": enc.decode(greedy[0, ids.size(1):].tolist()),
                         "sampled": enc.decode(sampled[0, ids.size(1):].tolist())})
    return pd.DataFrame(rows)


@torch.no_grad()
def attention_maps(model: GPT, idx: torch.Tensor) -> list[torch.Tensor]:
    """Post-softmax causal attention of every layer for idx (1, T): a list of (n_head, T, T)."""
    if not isinstance(model, GPT):
        raise ConfigError(f"attention maps need a native model (gpt2, llama, mistral, qwen2, qwen3); this "
                          f"{model.config.hf.get('model_type')!r} model is on the generic path")
    model.eval()
    T = idx.size(1)
    x, rope = model.embed(idx)
    mask = attention_mask(T, 0, idx.device, model.config.sliding_window)  # a sliding window, if any
    mask = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril() if mask is None else mask
    maps = []
    for block in model.transformer.h:
        attn = block.attn
        q, k, _ = attn.heads(block.ln_1(x), rope)  # exactly what the block's attention computes
        k = k.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(attn.head_dim)
        maps.append(scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)[0].float())
        x = block(x, rope)
    return maps


def attention_collapse(model: GPT, idx: torch.Tensor, energy: float = 0.9, single_column: float = 0.5) -> pd.DataFrame:
    """Per (layer, head): rank holding `energy` of the squared singular values, that rank as a
    share of T, the largest share of attention mass on one column, and whether the head is
    degenerate (mass share above `single_column`). `lazy` marks layers with every head degenerate."""
    rows = []
    for layer, maps in enumerate(attention_maps(model, idx)):
        T = maps.size(-1)
        for head, a in enumerate(maps):
            s = torch.linalg.svdvals(a.double())
            share = (s ** 2).cumsum(0) / (s ** 2).sum()
            rank = int((share < energy).sum().item()) + 1
            column_mass = (a.sum(dim=0) / T).max().item()
            rows.append({"layer": layer, "head": head, "rank90": rank, "rank_frac": rank / T,
                         "max_column_share": column_mass, "degenerate": column_mass > single_column})
    df = pd.DataFrame(rows)
    df["lazy"] = df.groupby("layer")["degenerate"].transform("all")
    return df


def tokens_seen(source) -> int | None:
    """Training tokens recorded in a checkpoint's sidecar (None for parents and foreign files)."""
    try:
        kind, path = resolve(source)
    except HelpersError:  # not a local file or folder (a hub id offline, say): no record of training
        return None
    side = read_sidecar(path) if kind == "torch" else None
    return side.get("tokens_seen") if side else None


def evaluate_models(models: dict, data_dir, out_dir=None, block_size: int = 256, batch_size: int = 8,
                    device="cpu", max_tokens: int | None = None) -> pd.DataFrame:
    """Val loss over the whole val split for each {name: source or GPT}; written to
    out_dir/eval.csv and eval.json when out_dir is given."""
    rows = []
    for name, source in models.items():
        model = source if isinstance(source, torch.nn.Module) else load_model(source, device=device)
        model.to(device)
        res = val_loss_full(model, data_dir, block_size, batch_size, device, max_tokens)
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
    from helpers.export import export_hf, hf_tokenizer
    out = export_hf(model, out_dir)
    if not (out / "tokenizer.json").is_file():
        hf_tokenizer(model).save_pretrained(str(out))
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
