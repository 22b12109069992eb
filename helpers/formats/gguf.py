"""GGUF files (llama.cpp's format): metadata -> GPTConfig, tensors dequantized to float32 one at a
time, when asked for (helpers.formats.weights), and named through the tables in helpers.formats.families.
Floor "formats": uses families, weights, the models and the errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from helpers.formats import families
from helpers.errors import CheckpointError
from helpers.formats.families import GGUF
from helpers.formats.weights import Weights, gpt_on_meta, read_exact
from helpers.model import GPT, llama_config

GGUF_ARCHES = ("llama", "qwen2", "qwen3")  # llama.cpp writes Mistral as llama
GGUF_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
LAYER_PREFIX = "blk.{}."
HF_INSTEAD = "pass the model's Hugging Face folder instead (any decoder of transformers loads from one)"


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's converter reorders Q and K rows of each head from Hugging Face's halves layout
    to interleaved pairs; this undoes it."""
    out_dim = w.shape[0]
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face's Q/K row layout -> llama.cpp's (used when writing test GGUF files)."""
    out_dim = w.shape[0]
    return w.reshape(n_heads, 2, out_dim // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_gguf(path):
    """gguf's reader of a file (weights and tokenizer alike), or one CheckpointError saying why not."""
    try:
        import gguf
    except ImportError:
        raise CheckpointError(f"{path}: reading GGUF files needs the gguf package: pip install gguf") from None
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # gguf fails in many ways on a cut or foreign file; all mean the same to a user
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:100]}); "
                              "it may be truncated, download it again") from None


def open_gguf_weights(path: Path) -> Weights:
    """A GGUF file opened: our model on the meta device, every tensor it needs present and of a type
    we dequantize; each is read (and dequantized) only when asked for."""
    reader = open_gguf(path)
    f = reader.fields
    arch = f["general.architecture"].contents() if "general.architecture" in f else None
    if arch not in GGUF_ARCHES:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported ({', '.join(GGUF_ARCHES)} are); "
                              f"{HF_INSTEAD}")

    def meta(key, default=None):
        full = f"{arch}.{key}"
        if full in f:
            return f[full].contents()
        if default is None:
            raise CheckpointError(f"{path}: GGUF metadata lacks {full}")
        return default

    tensors = {t.name: t for t in reader.tensors}
    n_vocab = len(f["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in f else None
    n_head, n_embd = meta("attention.head_count"), meta("embedding_length")
    cfg = llama_config(
        family=arch, qkv_bias="blk.0.attn_q.bias" in tensors, qk_norm="blk.0.attn_q_norm.weight" in tensors,
        head_dim=meta("attention.key_length", n_embd // n_head), block_size=meta("context_length"),
        vocab_size=meta("vocab_size", n_vocab),  # else the length of the token list
        n_layer=meta("block_count"), n_head=n_head, n_embd=n_embd,
        n_kv_head=meta("attention.head_count_kv", n_head), intermediate_size=meta("feed_forward_length"),
        norm_eps=meta("attention.layer_norm_rms_epsilon"), rope_base=meta("rope.freq_base", 10000.0),
        tie_embeddings="output.weight" not in tensors)
    if "rope_freqs.weight" in tensors:
        raise CheckpointError(f"{path}: RoPE frequency scaling (Llama 3.1 style) is not supported in GGUF; "
                              f"{HF_INSTEAD}")
    if meta("rope.dimension_count", cfg.head_dim) != cfg.head_dim:
        raise CheckpointError(f"{path}: partial rotary embeddings are not supported in GGUF; {HF_INSTEAD}")
    plan = families.plan(cfg, GGUF, LAYER_PREFIX)
    types = set()
    for name in (name for parts in plan.values() for name in parts):
        t = tensors.get(name)
        if t is None:
            raise CheckpointError(f"{path}: GGUF tensor {name} is missing")
        if t.tensor_type.name not in GGUF_TYPES:
            raise CheckpointError(f"{path}: tensor {name} has type {t.tensor_type.name}, not one of {sorted(GGUF_TYPES)}")
        types.add(t.tensor_type.name)
    model = gpt_on_meta(cfg)
    quantized = sorted(types - {"F32", "F16", "BF16"})
    model.provenance = {"source": str(path), "format": "gguf", "tokenizer": str(path),
                        "gguf_types": sorted(types), "quantized": bool(quantized),
                        "note": f"weights dequantized from a {'/'.join(quantized)} file" if quantized else ""}
    return Weights(model, plan, GGUFTensors(path, tensors, cfg), path)


def load_gguf(path: Path) -> GPT:
    return open_gguf_weights(path).read()


class GGUFTensors:
    """A GGUF file's tensors by name, each read from the file and dequantized to float32 only when
    asked for (llama's Q and K rows back in Hugging Face's order)."""

    def __init__(self, path: Path, tensors: dict, cfg):
        self.path, self.tensors, self.cfg = path, tensors, cfg

    def names(self) -> set[str]:
        return set(self.tensors)

    def shape(self, name: str) -> tuple | None:
        t = self.tensors.get(name)
        # GGUF lists dimensions innermost first; PyTorch's shape is the reverse (out, in)
        return None if t is None else tuple(reversed(t.shape.tolist()))

    def _rope_heads(self, name: str) -> int:
        """The heads whose rows llama.cpp's converter reordered (only llama is permuted), else 0."""
        if self.cfg.family != "llama":
            return 0
        return self.cfg.n_head if name.endswith("attn_q.weight") else \
            self.cfg.n_kv_head if name.endswith("attn_k.weight") else 0

    def read(self, name: str) -> torch.Tensor:
        from gguf.quants import dequantize
        t = self.tensors[name]
        # the raw bytes, as the reader's own (memory-mapped) array would hold them, read in one go
        raw = np.empty(t.data.shape, dtype=t.data.dtype)
        read_exact(self.path, t.data_offset, torch.from_numpy(raw.view(np.uint8)))
        try:
            arr = dequantize(raw, t.tensor_type)
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot dequantize {name} ({type(e).__name__}); file corrupt?") from None
        w = torch.from_numpy(arr.reshape(self.shape(name)).astype("float32", copy=False))
        heads = self._rope_heads(name)
        return unpermute_rope_rows(w, heads) if heads else w

    def read_into(self, name: str, out: torch.Tensor) -> bool:
        """Float32 tensors in their final row order go straight from the file into `out`."""
        t = self.tensors[name]
        if t.tensor_type.name != "F32" or self._rope_heads(name) or out.dtype != torch.float32 \
                or not out.is_contiguous():
            return False
        read_exact(self.path, t.data_offset, out)
        return True
