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
the paper's own code copies (blocks and output head; GPT-2's head is its token embedding, a Llama's
embedding is its own matrix and stays fresh there) and leaves the rest freshly initialised.
`inherit_from` makes the same child of a parent that is only opened (helpers.checkpoint.open_weights),
reading the kept blocks and nothing else of it: what a training run does.
Floor "inherit": uses the measures, the data, the checkpoint (an opened parent) and the models
(native and generic parents alike).
"""
from __future__ import annotations

import dataclasses
from copy import deepcopy

import pandas as pd
import torch
import torch.nn as nn

from helpers.checkpoint import Weights, gpt_on_meta
from helpers.data import get_batch, open_split
from helpers.generic import HFCausalLM, find_blocks
from helpers.measures import (check_n_layers, hidden_states, layer_scores, scores_record,  # noqa: F401 (public here too)
                              val_loss_full)
from helpers.model import GPT

STRATEGIES = ("first", "first+last", "block-influence", "angular")
COPY_MODES = ("all", "paper")
SCORE_OF = {"block-influence": "block_influence", "angular": "angular_distance"}  # the column a strategy reads


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
    check_n_layers(n_layers, total)
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


# ---- the child -------------------------------------------------------------------------------
def inherit(parent: GPT, n_layers: int, layers: list[int] | None = None, strategy: str = "first",
            copy: str = "all", tokens: torch.Tensor | None = None, scores: pd.DataFrame | None = None) -> GPT:
    """A new GPT holding the parent blocks chosen by `strategy` (or the explicit `layers`, in that
    order). copy="all" copies every other tensor too; copy="paper" copies only the blocks and the
    output head, as the paper's code did (nanoGPT for GPT-2, lit-gpt for OpenLLaMA), leaving the
    position table, the final norm and, where the head is not tied to it, the token embedding at fresh
    initialisation. A scored strategy reads `scores` (layer_scores) where given, else computes them
    from `tokens`. Only the kept blocks of the parent are read: the others may be left unread
    (inherit_from)."""
    check_copy(copy)
    if not isinstance(parent, GPT):  # a transformers model through the generic path
        if strategy in SCORE_OF or copy != "all":
            raise ValueError(f"strategy={strategy!r}, copy={copy!r}: a generic ({parent.config.family}) parent "
                             "takes strategy first or first+last, or explicit layers, with copy='all'")
        choice = strategy if layers is None else "layers"
        layers, _ = select_layers(parent, n_layers, layers, strategy)
        child = inherit_generic(parent, len(layers), layers)
        child.provenance["selection"] = {"strategy": choice, "copy": copy}  # as a native child's sidecar has it
        return child
    explicit = layers is not None
    layers, scores = select_layers(parent, n_layers, layers, strategy, tokens, scores)
    return native_child(parent, layers, "layers" if explicit else strategy, copy, scores)


def native_child(parent: GPT, layers: list[int], strategy: str, copy: str, scores: pd.DataFrame | None = None,
                 take: bool = False) -> GPT:
    """The child of our GPT holding blocks `layers` (inherit's second half; strategy and scores go to
    its provenance). take=True (copy="all" only): the parent's tensors become the child's, no copy,
    nothing drawn at random: for a parent nobody keeps (inherit_from), never for one still in use."""
    cfg = dataclasses.replace(parent.config, n_layer=len(layers))
    child = gpt_on_meta(cfg) if take else GPT(cfg)
    parent_sd = parent.state_dict()
    fresh = ()
    if copy == "paper":  # lit-gpt copied `h` and `lm_head` only; a tied head brings the embedding along
        fresh = ("transformer.wpe.", "transformer.ln_f.") + (() if parent.config.tie_embeddings else ("transformer.wte.",))
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
    child.load_state_dict(child_sd, assign=take)  # copies into the child's own tensors, or takes them
    if take and cfg.tie_embeddings:
        child.lm_head.weight = child.transformer.wte.weight
    ref = parent.transformer.wte.weight
    child.to(device=ref.device, dtype=ref.dtype)
    selection = {"strategy": strategy, "copy": copy}
    if scores is not None:
        selection["scores"] = scores_record(scores)
    child.provenance = {**parent.provenance, "inherited_from": parent.provenance.get("source", "model"),
                        "parent_n_layer": parent.config.n_layer, "layers": layers, "selection": selection}
    return child


def inherit_from(weights: Weights, n_layers: int, layers: list[int] | None = None, strategy: str = "first",
                 copy: str = "all", tokens: torch.Tensor | None = None) -> GPT:
    """inherit() of a parent opened with helpers.checkpoint.open_weights, reading of it only what the
    child needs: the root and the kept blocks, never the others; a scored strategy first runs the
    parent over `tokens` one block at a time (each read, run and dropped) for its scores. The child
    equals inherit(load_model(source), ...) bit for bit, and with copy="all" it takes the tensors
    read for it: a child costs one copy of itself, not a parent and a child."""
    check_copy(copy)
    parent, scores = weights.model, None
    if not isinstance(parent, GPT):  # the generic path: read whole already
        return inherit(parent, n_layers, layers, strategy, copy, tokens)
    if layers is None and strategy in SCORE_OF and tokens is not None:
        check_n_layers(n_layers, parent.config.n_layer)
        weights.read(blocks=[])  # the embeddings
        scores = layer_scores(parent, tokens, n_layers, full=False, blocks=weights.each_block)
    kept, scores = select_layers(parent, n_layers, layers, strategy, scores=scores)
    weights.read(kept)
    return native_child(parent, kept, strategy if layers is None else "layers", copy, scores, take=copy == "all")


def check_copy(copy: str) -> None:
    if copy not in COPY_MODES:
        raise ValueError(f"copy={copy!r}: choose one of {', '.join(COPY_MODES)}")


def inherit_generic(parent: HFCausalLM, n_layers: int, layers: list[int] | None = None) -> HFCausalLM:
    """A child of a wrapped transformers parent (helpers.generic) holding blocks `layers` (default 0..n_layers-1):
    its own copies of every tensor; config and per-layer settings renumbered."""
    total = parent.hf.config.num_hidden_layers
    layers, _ = select_layers(parent, n_layers, layers)
    holder, name, blocks = find_blocks(parent.hf, "inherit")
    setattr(holder, name, nn.ModuleList())  # copy everything but the blocks...
    try:
        child_hf = deepcopy(parent.hf)
    finally:
        setattr(holder, name, blocks)
    memo = {id(parent.hf.config): child_hf.config}  # ...then the chosen blocks, sharing the child's config
    chosen = nn.ModuleList(deepcopy(blocks[i], memo) for i in layers)
    child_holder = child_hf.get_submodule(next(n for n, m in parent.hf.named_modules() if m is holder))
    setattr(child_holder, name, chosen)
    cfg = child_hf.config
    for key, value in list(vars(cfg).items()):  # per-layer lists: layer_types (sliding/full), ...
        if isinstance(value, list) and len(value) == total and key != "architectures":
            setattr(cfg, key, [value[i] for i in layers])
    cfg.num_hidden_layers = len(layers)
    for j, block in enumerate(chosen):  # caches index layers by layer_idx
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = j
    child = HFCausalLM(child_hf)
    child.provenance = {**parent.provenance, "inherited_from": parent.provenance.get("source", "model"),
                        "parent_n_layer": total, "layers": layers}
    return child


def compare_strategies(parent: GPT, n_layers: int, scores: pd.DataFrame | None = None, data_dir=None,
                       block_size: int = 256, max_tokens: int | None = None, strategies=STRATEGIES) -> pd.DataFrame:
    """One row per strategy: the kept blocks and, given data_dir, the untrained child's loss over
    the val split (its first max_tokens tokens when given). Strategies that need scores are left
    out when `scores` is None."""
    rows = []
    for strategy in strategies:
        if strategy in SCORE_OF and scores is None:
            continue
        layers, _ = select_layers(parent, n_layers, strategy=strategy, scores=scores)
        row = {"strategy": strategy, "layers": layers}
        if data_dir is not None:
            child = inherit(parent, n_layers, layers=layers)
            row.update(val_loss_full(child, data_dir, block_size, device=next(parent.parameters()).device,
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
    what an inherited child must reproduce exactly. A parent of the generic path runs its own forward
    pass with every other block made the identity (forward hooks, nothing copied): its blocks stay in
    their order, so there `layers` must be ascending."""
    if not isinstance(parent, GPT):
        if list(layers) != sorted(layers):
            raise ValueError(f"layers={list(layers)}: the truncated forward pass of a generic "
                             f"({parent.config.family}) parent keeps its blocks in order; give them ascending")
        _, _, blocks = find_blocks(parent.hf, "truncated_forward")

        def identity(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        hooks = [b.register_forward_hook(identity, with_kwargs=True) for i, b in enumerate(blocks) if i not in layers]
        try:
            return parent(idx)[0]
        finally:
            for hook in hooks:
                hook.remove()
    t = parent.transformer
    x, rope = parent.embed(idx)
    for i in layers:
        x = t.h[i](x, rope)
    return parent.lm_head(t.ln_f(x))


def calibration_tokens(data_dir, n_sequences: int = 8, block_size: int = 256, seed: int = 1337) -> torch.Tensor:
    """(n_sequences, block_size) token ids drawn from the **train** split (never val: the scores
    choose the model that val then judges), the same for the same seed."""
    g = torch.Generator().manual_seed(seed * 7919 + 11)
    return get_batch(open_split(data_dir, "train"), block_size, n_sequences, g, "cpu")[0]


# ---- notebook 02's choices -----------------------------------------------------------------------
def child_depth(parent, n_layers: int | None = None, layers: list[int] | None = None) -> int:
    """Blocks the child keeps: n_layers when given, else the length of an explicit `layers` list,
    else half of the parent's (at least one)."""
    if n_layers:
        return n_layers
    return len(layers) if layers else max(1, parent.config.n_layer // 2)


def chosen_layers(parent: GPT, n_layers: int, layers=None, strategy: str = "first",
                  scores: pd.DataFrame | None = None) -> tuple[str, list[int]]:
    """(the choice's name, the kept blocks): an explicit `layers` list is named "layers",
    otherwise the strategy's own name with the blocks it keeps (select_layers)."""
    kept, _ = select_layers(parent, n_layers, layers, strategy, scores=scores)
    return ("layers" if layers is not None else strategy), kept


def kept_by_strategy(chosen: str, layers: list[int], strategies: pd.DataFrame) -> dict[str, list[int]]:
    """{name: kept blocks} for the scores figure: the child's own choice first (so the figure fills
    its markers), then every other strategy of compare_strategies' table, in the table's order."""
    return {chosen: list(layers), **{s: list(kept) for s, kept in strategies["layers"].items() if s != chosen}}


@torch.no_grad()
def truncation_error(parent: GPT, child: GPT, ids: torch.Tensor) -> float:
    """max |child logits - parent logits through the child's kept blocks| on (1, T) ids: zero up to
    rounding for a child inherited with copy="all" (the check of notebook 02)."""
    ids = ids[:, : child.config.block_size]
    return (child(ids)[0] - truncated_forward(parent, ids, child.provenance["layers"])).abs().max().item()
