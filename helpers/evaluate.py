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

from helpers.checkpoint import load_model, read_sidecar, resolve
from helpers.data import iter_sequential, open_split
from helpers.head_loss import cross_entropy_sum
from helpers.model import GPT


@torch.no_grad()
def val_loss_full(model: GPT, data_dir, block_size: int = 256, batch_size: int = 8, device="cpu",
                  max_tokens: int | None = None) -> dict:
    """Mean next-token loss over the whole val split (or its first max_tokens tokens). Only the loss
    is computed (helpers.head_loss.cross_entropy_sum): no (tokens, vocab) logits are kept."""
    model.eval()
    data = open_split(data_dir, "val")
    total_loss, count = 0.0, 0
    block_size = min(block_size, model.config.block_size)
    for x, y in iter_sequential(data, block_size, batch_size, device, max_tokens):
        loss, n = cross_entropy_sum(model.hidden(x).flatten(0, 1), model.lm_head.weight, y.flatten(), model._workspace)
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
    model.eval()
    T = idx.size(1)
    x, rope = model.embed(idx)
    mask = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
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
    except Exception:
        return None
    side = read_sidecar(path) if kind == "torch" else None
    return side.get("tokens_seen") if side else None


def evaluate_models(models: dict, data_dir, out_dir=None, block_size: int = 256, batch_size: int = 8,
                    device="cpu", max_tokens: int | None = None) -> pd.DataFrame:
    """Val loss over the whole val split for each {name: source or GPT}; written to
    out_dir/eval.csv and eval.json when out_dir is given."""
    rows = []
    for name, source in models.items():
        model = source if isinstance(source, GPT) else load_model(source, device=device)
        model.to(device)
        res = val_loss_full(model, data_dir, block_size, batch_size, device, max_tokens)
        rows.append({"model": name, "layers": model.config.n_layer, "params": model.num_params(),
                     "tokens_seen": tokens_seen(source) if not isinstance(source, GPT) else None, **res})
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
