"""Measures of a model on real tokens, which both the choice of blocks (helpers.inherit) and the
evaluation (helpers.evaluate) read. Floor "measures": uses the models and the data, nothing above.

- `val_loss_full`: loss and perplexity over the *whole* validation split, one deterministic
  sequential pass (every token predicted exactly once), not a sample of random batches.
- `hidden_states`: the residual stream before block 0 and after every block.
- `attention_maps`, `attention_collapse`: the paper's later diagnostic: per layer and head, the rank
  of the post-softmax attention matrix on real text (smallest k whose squared singular values hold
  90% of the energy) and whether the head puts most of its mass on a single column; a layer whose
  heads are all degenerate is "lazy".
- `layer_scores`: one row per parent block (block influence, angular distance, attention rank,
  early-exit loss) from one forward pass over calibration tokens.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import pandas as pd
import torch
import torch.nn.functional as F

from helpers.data import iter_sequential, open_split
from helpers.errors import ConfigError
from helpers.model import GPT, attention_mask


# ---- loss over the whole val split -----------------------------------------------------------
@torch.no_grad()
def val_loss_full(model: GPT, data_dir, block_size: int = 256, batch_size: int = 8, device="cpu",
                  max_tokens: int | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """Mean next-token loss over the whole val split (or its first max_tokens tokens). Only the loss
    is computed for our own model (GPT.loss_sum): no (tokens, vocab) logits are kept.

    dtype: the matrix products' dtype; bfloat16 (or float16) runs under torch.autocast, the
    weights as they are. Whatever it is, each batch's loss is summed in float32 (loss_sum's head;
    the generic path's logits widened first) and the batches in Python floats."""
    model.eval()
    data = open_split(data_dir, "val")
    total_loss, count = 0.0, 0
    block_size = min(block_size, model.config.block_size)
    amp = torch.autocast(torch.device(device).type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    for x, y in iter_sequential(data, block_size, batch_size, device, max_tokens):
        with amp:
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


# ---- attention -------------------------------------------------------------------------------
@torch.no_grad()
def attention_maps(model: GPT, idx: torch.Tensor, blocks=None) -> list[torch.Tensor]:
    """Post-softmax causal attention of every layer for idx (1, T): a list of (n_head, T, T).
    blocks: a function giving the blocks in order (layer_scores), by default the model's own."""
    if not isinstance(model, GPT):
        raise ConfigError(f"attention maps need a native model (gpt2, llama, mistral, qwen2, qwen3); this "
                          f"{model.config.hf.get('model_type')!r} model is on the generic path")
    model.eval()
    T = idx.size(1)
    x, rope = model.embed(idx)
    mask = attention_mask(T, 0, idx.device, model.config.sliding_window)  # a sliding window, if any
    mask = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril() if mask is None else mask
    maps = []
    for block in (blocks or (lambda: model.transformer.h))():
        attn = block.attn
        q, k, _ = attn.heads(block.ln_1(x), rope)  # exactly what the block's attention computes
        k = k.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(attn.head_dim)
        maps.append(scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)[0].float())
        x = block(x, rope)
    return maps


def attention_collapse(model: GPT, idx: torch.Tensor, energy: float = 0.9, single_column: float = 0.5,
                       blocks=None) -> pd.DataFrame:
    """Per (layer, head): rank holding `energy` of the squared singular values, that rank as a
    share of T, the largest share of attention mass on one column, and whether the head is
    degenerate (mass share above `single_column`). `lazy` marks layers with every head degenerate."""
    rows = []
    for layer, maps in enumerate(attention_maps(model, idx, blocks)):
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


# ---- layer scores ----------------------------------------------------------------------------------
@torch.no_grad()
def hidden_states(parent: GPT, tokens: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream before block 0 and after every block: L + 1 tensors (B, T, C)."""
    parent.eval()
    x, rope = parent.embed(tokens)
    states = [x]
    for block in parent.transformer.h:
        x = block(x, rope)
        states.append(x)
    return states


@torch.no_grad()
def layer_scores(parent: GPT, tokens: torch.Tensor, n_layers: int, attention_tokens: int = 128,
                 full: bool = True, blocks=None) -> pd.DataFrame:
    """One row per parent block (index: block number) from one forward pass over `tokens` (B, T):

    - block_influence: 1 - mean over tokens of cos(input, output) of the block (ShortGPT);
    - angular_distance: arccos(cos(h_i, h_{i+k})) / pi on the last token of each sequence,
      averaged, for the window of k = L - n_layers blocks starting at i (Gromov et al.); NaN where
      the window does not fit (and everywhere when k = 0);
    - attention_rank: rank holding 90% of the attention matrix's energy, mean over heads, on the
      first sequence's first `attention_tokens` tokens (attention_collapse);
    - early_exit_loss: next-token loss of the parent using only blocks 0..i, then its final norm and head.

    full=False computes only the first two (all the strategies read): the parent's forward pass,
    without the L head products of the early exits and the attention maps.
    The pass holds two blocks' states at a time, not every block's. blocks: a function giving the
    parent's blocks in order, by default its own; helpers.checkpoint's `open_weights(...).each_block`
    reads each one just before it runs and drops it after, so a parent on file is held one block at
    a time (the embeddings, and with full=True the final norm and head, read beforehand).
    """
    total = parent.config.n_layer
    check_n_layers(n_layers, total)
    if tokens.dim() != 2 or tokens.size(1) < 2:
        raise ValueError(f"tokens of shape {tuple(tokens.shape)}: give a (batch, time) LongTensor with time >= 2")
    parent.eval()
    blocks = blocks or (lambda: parent.transformer.h)
    tokens = tokens.to(parent.transformer.wte.weight.device)
    targets = tokens[:, 1:].reshape(-1)
    x, rope = parent.embed(tokens)
    influence, last, early_exit = [], [x[:, -1].float().clone()], []  # last: each state's last token (angular)
    for block in blocks():
        y = block(x, rope)
        influence.append(1.0 - F.cosine_similarity(x.float(), y.float(), dim=-1).mean().item())
        last.append(y[:, -1].float().clone())
        if full:
            logits = parent.lm_head(parent.transformer.ln_f(y[:, :-1]))  # (B, T-1, vocab)
            early_exit.append(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets).item())
            del logits
        x = y
    del x
    k = total - n_layers
    angular = []
    for i in range(total):
        if k == 0 or i + k > total:
            angular.append(math.nan)
            continue
        cos = F.cosine_similarity(last[i], last[i + k], dim=-1)
        angular.append((torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi).mean().item())
    table = pd.DataFrame({"block_influence": influence, "angular_distance": angular})
    table.index.name = "block"
    table.attrs["n_layers"] = n_layers
    if not full:
        return table
    attn = attention_collapse(parent, tokens[:1, :attention_tokens], blocks=blocks)
    rank = attn.groupby("layer")["rank90"].mean()
    table["attention_rank"] = [float(rank.get(i, math.nan)) for i in range(total)]
    table["early_exit_loss"] = early_exit
    return table


def scores_record(scores: pd.DataFrame) -> dict:
    """The scores as plain JSON (for sidecars and provenance): {column: [value per block]}, NaN as None."""
    return {"n_layers": scores.attrs.get("n_layers"),
            **{c: [None if v != v else round(float(v), 6) for v in scores[c]] for c in scores.columns}}


def check_n_layers(n_layers, total: int) -> None:
    """A ValueError unless 1 <= n_layers <= total (a child keeps at least one block, at most all)."""
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 1 <= n_layers <= total:
        raise ValueError(f"n_layers={n_layers!r} is out of range: choose 1..{total} for this {total}-layer parent")
