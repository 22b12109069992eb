"""export_hf: any model of ours as a Hugging Face folder that the family's own transformers class
loads with identical logits (so lm-evaluation-harness, vLLM and the rest can use a child)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from helpers.hf_format import hf_config, state_to_hf
from helpers.model import GPT


def export_hf(model: GPT, out_dir) -> Path:
    """Write config.json + model.safetensors (+ the parent's tokenizer.json when it had one)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not isinstance(model, GPT):  # a transformers model (helpers.generic): its own save_pretrained
        from helpers.generic import export_generic
        export_generic(model, out)
        copy_tokenizer(model.provenance, out)
        return out
    hf = hf_config(model.config)
    hf["torch_dtype"] = str(model.transformer.wte.weight.dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    save_file({k: v.detach().cpu() for k, v in state_to_hf(model).items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    copy_tokenizer(model.provenance, out)
    return out


def copy_tokenizer(provenance: dict, out: Path) -> None:
    """Keep a Hugging Face parent's tokenizer.json next to the exported weights."""
    tok_folder = Path(str(provenance.get("tokenizer", "")))
    if tok_folder.is_dir() and (tok_folder / "tokenizer.json").is_file():
        shutil.copy(tok_folder / "tokenizer.json", out / "tokenizer.json")
