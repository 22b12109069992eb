"""Inheritune's one operation: a child that keeps the first n transformer blocks of its parent.

The child gets its own copies of the token (and position) embeddings, the chosen blocks, the final
norm and the output head (tied to the embedding or not, as in the parent). Nothing is shared with
the parent, so training the child can never change it (the student project's child shared
modules with its parent, and training it silently rewrote the parent).
"""
from __future__ import annotations

import dataclasses

import torch

from helpers.model import GPT


def inherit(parent: GPT, n_layers: int, layers: list[int] | None = None) -> GPT:
    """A new GPT holding parent blocks 0..n_layers-1, or the explicit `layers`, in that order."""
    if not isinstance(parent, GPT):  # a transformers model through the generic path
        from helpers.generic import inherit_generic
        return inherit_generic(parent, n_layers, layers)
    total = parent.config.n_layer
    if layers is None:
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 1 <= n_layers <= total:
            raise ValueError(f"n_layers={n_layers!r} is out of range: choose 1..{total} for this {total}-layer parent")
        layers = list(range(n_layers))
    else:
        layers = list(layers)
        bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < total]
        if not layers or bad or len(set(layers)) != len(layers):
            raise ValueError(f"layers={layers!r}: give distinct block indices in 0..{total - 1}, at least one")
    child = GPT(dataclasses.replace(parent.config, n_layer=len(layers)))
    parent_sd = parent.state_dict()
    child_sd = {}
    for key in child.state_dict():
        if key.startswith("transformer.h."):
            _, _, i, rest = key.split(".", 3)
            key_in_parent = f"transformer.h.{layers[int(i)]}.{rest}"
        else:
            key_in_parent = key
        child_sd[key] = parent_sd[key_in_parent]
    child.load_state_dict(child_sd)  # copies into the child's own tensors
    ref = parent.transformer.wte.weight
    child.to(device=ref.device, dtype=ref.dtype)
    child.provenance = {**parent.provenance, "inherited_from": parent.provenance.get("source", "model"),
                        "parent_n_layer": total, "layers": layers}
    return child


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
