"""Every other decoder-only model of transformers, behind our GPT's interface: the thin adapter.

A model whose family is not native (helpers.model) is a transformers model wrapped in `HFCausalLM`,
which offers what the training loop and evaluation use from our GPT: `forward(idx, targets) ->
(logits, loss)`, `config.n_layer / block_size / vocab_size`, `num_params`, `flops_per_token`,
`generate`, `provenance`. It works for any decoder whose blocks are one `nn.ModuleList` of
`config.num_hidden_layers` modules (GPT-NeoX/Pythia, Phi-3, Gemma 2, OLMo 2, ...): `find_blocks`
finds that list. Floor "models", beside helpers.model: it knows nothing of files (helpers.formats.hf and
torch_files load such models) or of inheritance (helpers.inherit cuts them). What the native path
has and this one lacks: the fused CPU loss, our KV cache, the attention diagnostic and GGUF.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers.errors import CheckpointError
from helpers.model import sample_next

SUPPORTED = ("natively: gpt2, llama, mistral, qwen2, qwen3; generically: any decoder-only model of "
             "transformers' AutoModelForCausalLM whose blocks are one nn.ModuleList")


@dataclass
class GenericConfig:
    """What the training loop reads from a model's config, plus the whole transformers config."""
    hf: dict = field(repr=False)
    n_layer: int = 0
    block_size: int = 0
    vocab_size: int = 0
    dropout: float = 0.0  # the transformers config keeps its own dropout settings
    tie_embeddings: bool = False
    family: str = ""  # the transformers model_type, e.g. "gpt_neox"

    def to_dict(self) -> dict:
        return {"generic": True, "hf_config": self.hf}


class HFCausalLM(nn.Module):
    """A transformers causal LM behind our GPT's interface."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model
        self.provenance: dict = {}
        find_blocks(hf_model, "model")  # refuse early what the generic path cannot cut

    @property
    def config(self) -> GenericConfig:
        c = self.hf.config
        block_size = next((getattr(c, k) for k in ("max_position_embeddings", "n_positions", "seq_length")
                           if isinstance(getattr(c, k, None), int)), 2048)
        return GenericConfig(hf=c.to_dict(), n_layer=c.num_hidden_layers, block_size=block_size,
                             vocab_size=c.vocab_size, tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
                             family=c.model_type)

    def forward(self, idx, targets=None, last_only: bool = False):
        """(logits, loss) as GPT.forward: loss is cross-entropy over targets, -1 ignored."""
        logits = self.hf(input_ids=idx, use_cache=False).logits  # (B, T, vocab)
        if targets is None:
            return (logits[:, -1:] if last_only else logits), None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, counting a tied head once. non_embedding drops the token table (and an untied head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            emb, head = self.hf.get_input_embeddings().weight, self.hf.get_output_embeddings().weight
            n -= emb.numel() + (head.numel() if head is not emb else 0)
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """As GPT.flops_per_token: 6 per matmul weight (head included) plus attention's 12 * L * d * T."""
        c, T = self.hf.config, seq_len or self.config.block_size
        return 6 * (self.num_params(non_embedding=True) + c.vocab_size * c.hidden_size) + \
            12 * c.num_hidden_layers * c.hidden_size * T

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None, use_cache: bool = True):
        """As GPT.generate, with transformers' own cache while the context fits block_size."""
        was_training = self.training
        self.eval()
        bs, past = self.config.block_size, None
        # transformers 5.24 renamed past_key_values to cache; either works here
        cache_arg = "cache" if "cache" in inspect.signature(type(self.hf).forward).parameters else "past_key_values"
        for _ in range(max_new_tokens):
            if use_cache and idx.size(1) <= bs:
                step_ids = idx if past is None else idx[:, -1:]
                out = self.hf(input_ids=step_ids, use_cache=True, **({cache_arg: past} if past is not None else {}))
                past = out[cache_arg]
            else:
                out = self.hf(input_ids=idx[:, -bs:], use_cache=False)
            idx = torch.cat([idx, sample_next(out.logits[:, -1, :], temperature, top_k, top_p, generator)], dim=1)
        self.train(was_training)
        return idx


def find_blocks(hf_model: nn.Module, where) -> tuple[nn.Module, str, nn.ModuleList]:
    """(holder, attribute, blocks): the one ModuleList of num_hidden_layers modules."""
    n = getattr(hf_model.config, "num_hidden_layers", None)
    found = [(holder, name, child) for holder in hf_model.modules() for name, child in holder.named_children()
             if isinstance(child, nn.ModuleList) and len(child) == n]
    if len(found) != 1:
        mt = getattr(hf_model.config, "model_type", type(hf_model).__name__)
        raise CheckpointError(f"{where}: model_type {mt!r} has {len(found)} nn.ModuleLists of num_hidden_layers={n} "
                              f"blocks, not one, so its layers cannot be cut; supported: {SUPPORTED}")
    return found[0]


def build(hf_config, where) -> nn.Module:
    """An untrained transformers model for a config, refused with one clear error when not a decoder."""
    import transformers
    check_decoder(hf_config, where)
    return transformers.AutoModelForCausalLM.from_config(hf_config)


def check_decoder(hf_config, where) -> None:
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                         MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    mt = hf_config.model_type
    encoder = mt in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(hf_config, "is_decoder", False)
    if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or encoder or getattr(hf_config, "is_encoder_decoder", False):
        kind = "an encoder" if encoder else "an encoder-decoder" if hf_config.is_encoder_decoder else \
            "not a causal language model"
        raise CheckpointError(f"{where}: model_type {mt!r} is {kind}; supported: {SUPPORTED}")


def config_from_dict(d: dict, where):
    from transformers import CONFIG_MAPPING
    mt = d.get("model_type")
    if mt not in CONFIG_MAPPING:
        raise CheckpointError(f"{where}: model_type {mt!r} is unknown to the installed transformers; "
                              f"upgrade transformers (supported: {SUPPORTED})")
    return CONFIG_MAPPING[mt].from_dict(d)


def scratch_like(model: HFCausalLM, seed: int) -> HFCausalLM:
    """A randomly initialised model of the same shape (the paper's baseline)."""
    torch.manual_seed(seed)
    fresh = HFCausalLM(build(model.hf.config, "scratch"))
    return fresh.to(next(model.parameters()).dtype)
