"""Inheritune's one operation: a child that keeps n transformer blocks of its parent.

Which n blocks is a choice (`strategy`): Inheritune keeps the first n; ShortGPT (arXiv 2403.03853)
keeps the blocks that change their input most (block influence); Gromov et al. (arXiv 2403.17887)
drop the window of consecutive blocks whose input and output are closest in angle. The scored
strategies read `layer_scores`, computed from one forward pass of the parent over calibration
tokens (taken from the train split, never val).

The child gets its own copies of the token (and position) embeddings, the chosen blocks, the final
norm and the output head (tied to the embedding or not, as in the parent). Nothing is shared with
the parent, so training the child can never change it (the student project's child shared
modules with its parent, and training it silently rewrote the parent). `copy="paper"` copies what
the paper's own code copies (blocks, token embedding, head) and leaves the rest freshly initialised.
"""
from __future__ import annotations

import dataclasses
import math

import pandas as pd
import torch
import torch.nn.functional as F

from helpers.model import GPT

STRATEGIES = ("first", "first+last", "block-influence", "angular")
COPY_MODES = ("all", "paper")
SCORE_OF = {"block-influence": "block_influence", "angular": "angular_distance"}  # the column a strategy reads


# ---- scores ----------------------------------------------------------------------------------
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
                 full: bool = True) -> pd.DataFrame:
    """One row per parent block (index: block number) from one forward pass over `tokens` (B, T):

    - block_influence: 1 - mean over tokens of cos(input, output) of the block (ShortGPT);
    - angular_distance: arccos(cos(h_i, h_{i+k})) / pi on the last token of each sequence,
      averaged, for the window of k = L - n_layers blocks starting at i (Gromov et al.); NaN where
      the window does not fit (and everywhere when k = 0);
    - attention_rank: rank holding 90% of the attention matrix's energy, mean over heads, on the
      first sequence's first `attention_tokens` tokens (helpers.evaluate.attention_collapse);
    - early_exit_loss: next-token loss of the parent using only blocks 0..i, then its final norm and head.

    full=False computes only the first two (all the strategies read): the parent's forward pass,
    without the L head products of the early exits and the attention maps.
    """
    from helpers.evaluate import attention_collapse

    total = parent.config.n_layer
    _check_n_layers(n_layers, total)
    if tokens.dim() != 2 or tokens.size(1) < 2:
        raise ValueError(f"tokens of shape {tuple(tokens.shape)}: give a (batch, time) LongTensor with time >= 2")
    tokens = tokens.to(parent.transformer.wte.weight.device)
    states = hidden_states(parent, tokens)
    influence = [1.0 - F.cosine_similarity(states[i].float(), states[i + 1].float(), dim=-1).mean().item()
                 for i in range(total)]
    k = total - n_layers
    angular = []
    for i in range(total):
        if k == 0 or i + k > total:
            angular.append(math.nan)
            continue
        cos = F.cosine_similarity(states[i][:, -1].float(), states[i + k][:, -1].float(), dim=-1)
        angular.append((torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi).mean().item())
    table = pd.DataFrame({"block_influence": influence, "angular_distance": angular})
    table.index.name = "block"
    table.attrs["n_layers"] = n_layers
    if not full:
        return table
    targets = tokens[:, 1:].reshape(-1)
    early_exit = []
    for i in range(total):
        logits = parent.lm_head(parent.transformer.ln_f(states[i + 1][:, :-1]))  # (B, T-1, vocab)
        early_exit.append(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets).item())
        del logits
    del states
    attn = attention_collapse(parent, tokens[:1, :attention_tokens])
    rank = attn.groupby("layer")["rank90"].mean()
    table["attention_rank"] = [float(rank.get(i, math.nan)) for i in range(total)]
    table["early_exit_loss"] = early_exit
    return table


def scores_record(scores: pd.DataFrame) -> dict:
    """The scores as plain JSON (for sidecars and provenance): {column: [value per block]}, NaN as None."""
    return {"n_layers": scores.attrs.get("n_layers"),
            **{c: [None if v != v else round(float(v), 6) for v in scores[c]] for c in scores.columns}}


# ---- which blocks ----------------------------------------------------------------------------
def select_layers(parent: GPT, n_layers: int, layers=None, strategy: str = "first", tokens=None,
                  scores: pd.DataFrame | None = None) -> tuple[list[int], pd.DataFrame | None]:
    """(kept block indices in the parent's order, the scores used or None) for a strategy, or the
    explicit `layers` (kept as given). The scored strategies need calibration `tokens` or `scores`."""
    total = parent.config.n_layer
    if layers is not None:
        if strategy != "first":
            raise ValueError(f"layers={layers!r} and strategy={strategy!r}: give an explicit layers list or a strategy, not both")
        layers = list(layers)
        bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < total]
        if not layers or bad or len(set(layers)) != len(layers):
            raise ValueError(f"layers={layers!r}: give distinct block indices in 0..{total - 1}, at least one")
        return layers, None
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: choose one of {', '.join(STRATEGIES)} (or give layers=[...])")
    _check_n_layers(n_layers, total)
    if strategy == "first":
        return list(range(n_layers)), None
    if strategy == "first+last":
        return sorted(set(range(n_layers - 1)) | {total - 1}), None
    if scores is None or scores.attrs.get("n_layers") != n_layers:
        if tokens is None:
            raise ValueError(f"strategy={strategy!r} needs calibration tokens=(batch, time) ids from the train split")
        scores = layer_scores(parent, tokens, n_layers, full=False)
    if strategy == "block-influence":
        top = scores["block_influence"].nlargest(n_layers, keep="first").index
        return sorted(int(i) for i in top), scores
    window = scores["angular_distance"]  # strategy == "angular"
    if window.isna().all():  # n_layers == L: nothing to drop
        return list(range(total)), scores
    start, k = int(window.idxmin()), total - n_layers
    return [i for i in range(total) if not start <= i < start + k], scores


def _check_n_layers(n_layers, total: int) -> None:
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 1 <= n_layers <= total:
        raise ValueError(f"n_layers={n_layers!r} is out of range: choose 1..{total} for this {total}-layer parent")


# ---- the child -------------------------------------------------------------------------------
def inherit(parent: GPT, n_layers: int, layers: list[int] | None = None, strategy: str = "first",
            copy: str = "all", tokens: torch.Tensor | None = None) -> GPT:
    """A new GPT holding the parent blocks chosen by `strategy` (or the explicit `layers`, in that
    order). copy="all" copies every other tensor too; copy="paper" copies only the blocks, the
    token embedding and the head, leaving the position table and final norm at fresh initialisation."""
    if copy not in COPY_MODES:
        raise ValueError(f"copy={copy!r}: choose one of {', '.join(COPY_MODES)}")
    if not isinstance(parent, GPT):  # a transformers model through the generic path
        from helpers.generic import inherit_generic
        if strategy in SCORE_OF or copy != "all":
            raise ValueError(f"strategy={strategy!r}, copy={copy!r}: a generic ({parent.config.family}) parent "
                             "takes strategy first or first+last, or explicit layers, with copy='all'")
        layers, _ = select_layers(parent, n_layers, layers, strategy)
        return inherit_generic(parent, len(layers), layers)
    explicit = layers is not None
    layers, scores = select_layers(parent, n_layers, layers, strategy, tokens)
    child = GPT(dataclasses.replace(parent.config, n_layer=len(layers)))
    parent_sd = parent.state_dict()
    fresh = ("transformer.wpe.", "transformer.ln_f.") if copy == "paper" else ()
    child_sd = child.state_dict()
    for key in child_sd:
        if key.startswith(fresh):
            continue
        if key.startswith("transformer.h."):
            _, _, i, rest = key.split(".", 3)
            key_in_parent = f"transformer.h.{layers[int(i)]}.{rest}"
        else:
            key_in_parent = key
        child_sd[key] = parent_sd[key_in_parent]
    child.load_state_dict(child_sd)  # copies into the child's own tensors
    ref = parent.transformer.wte.weight
    child.to(device=ref.device, dtype=ref.dtype)
    selection = {"strategy": "layers" if explicit else strategy, "copy": copy}
    if scores is not None:
        selection["scores"] = scores_record(scores)
    child.provenance = {**parent.provenance, "inherited_from": parent.provenance.get("source", "model"),
                        "parent_n_layer": parent.config.n_layer, "layers": layers, "selection": selection}
    return child


def compare_strategies(parent: GPT, n_layers: int, scores: pd.DataFrame | None = None, data_dir=None,
                       block_size: int = 256, max_tokens: int | None = None, strategies=STRATEGIES) -> pd.DataFrame:
    """One row per strategy: the kept blocks and, given data_dir, the untrained child's loss over
    the val split (its first max_tokens tokens when given). Strategies that need scores are left
    out when `scores` is None."""
    from helpers.evaluate import val_loss_full
    rows = []
    for strategy in strategies:
        if strategy in SCORE_OF and scores is None:
            continue
        layers, _ = select_layers(parent, n_layers, strategy=strategy, scores=scores)
        row = {"strategy": strategy, "layers": layers}
        if data_dir is not None:
            child = inherit(parent, n_layers, layers=layers)
            row.update(val_loss_full(child, data_dir, block_size, device=parent.transformer.wte.weight.device,
                                     max_tokens=max_tokens))
            del child
        rows.append(row)
    return pd.DataFrame(rows).set_index("strategy")


def param_report(parent: GPT, child: GPT) -> dict:
    """Parameter counts of parent and child, and the share the child keeps."""
    p, c = parent.num_params(), child.num_params()
    return {"parent_layers": parent.config.n_layer, "child_layers": child.config.n_layer,
            "parent_params": p, "child_params": c, "kept_pct": round(100.0 * c / p, 2)}


@torch.no_grad()
def truncated_forward(parent: GPT, idx: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """The parent's logits computed with only `layers` of its blocks, then its final norm and head:
    what an inherited child must reproduce exactly."""
    t = parent.transformer
    x, rope = parent.embed(idx)
    for i in layers:
        x = t.h[i](x, rope)
    return parent.lm_head(t.ln_f(x))


def calibration_tokens(data_dir, n_sequences: int = 8, block_size: int = 256, seed: int = 1337) -> torch.Tensor:
    """(n_sequences, block_size) token ids drawn from the **train** split (never val: the scores
    choose the model that val then judges), the same for the same seed."""
    from helpers.data import get_batch, open_split
    g = torch.Generator().manual_seed(seed * 7919 + 11)
    return get_batch(open_split(data_dir, "train"), block_size, n_sequences, g, "cpu")[0]
