"""export_hf: any model of ours as a Hugging Face folder that the family's own transformers class
loads with identical logits, with the model's tokenizer in Hugging Face's form (so
lm-evaluation-harness, vLLM and the rest can use a child as it is). Floor "checkpoint": uses the formats and
helpers.tokenizer; helpers.checkpoint offers it."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

from helpers.errors import CheckpointError
from helpers.formats.hf import hf_config, state_to_hf
from helpers.model import GPT
from helpers.tokenizer import hf_tokenizer


def export_hf(model: GPT, out_dir) -> Path:
    """Write config.json + model.safetensors, and the tokenizer its provenance names (GPT-2's, a
    GGUF file's, a folder's tokenizer.json; helpers.formats.sources.resolve_tokenizer_source) as
    tokenizer.json + tokenizer_config.json. A model with no tokenizer recorded gets none."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not isinstance(model, GPT):  # a transformers model (helpers.generic): its own class writes it
        model.hf.save_pretrained(out)
        write_tokenizer(model, out)
        return out
    hf = hf_config(model.config)
    hf["torch_dtype"] = str(model.transformer.wte.weight.dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    save_file({k: v.detach().cpu() for k, v in state_to_hf(model).items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    write_tokenizer(model, out)
    return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_tokenizer(model, out: Path) -> bool:
    """Save the tokenizer the model's provenance names into `out` (replacing any left there by an
    earlier export). A folder's tokenizer files are copied as they are; GPT-2's and a GGUF file's
    are built with transformers. False, with a warning naming the reason, when none can be written
    (a moved file, a folder without tokenizer.json, transformers missing): the weights are written
    all the same. False, silently, when the provenance names no tokenizer (a random model)."""
    for name in TOKENIZER_FILES:
        (out / name).unlink(missing_ok=True)
    source = model.provenance.get("tokenizer")
    if not source:
        return False
    if Path(source).is_dir() and (Path(source) / "tokenizer.json").is_file():
        for name in TOKENIZER_FILES:
            if (Path(source) / name).is_file():
                shutil.copy(Path(source) / name, out / name)
        if sentencepiece_family(out / "tokenizer.json"):
            run_file_as_written(out / "tokenizer_config.json")
        return True
    try:
        hf_tokenizer(source).save_pretrained(str(out))
    except (CheckpointError, ImportError, OSError, ValueError) as e:
        warnings.warn(f"export_hf: {out} has no tokenizer ({type(e).__name__}: {e})", stacklevel=3)
        return False
    return True


def sentencepiece_family(tokenizer_json: Path) -> bool:
    """Whether a tokenizer.json holds one of SentencePiece's models (BPE with byte fallback, or
    Unigram): Llama 2, OpenLLaMA, Mistral, Gemma, Phi-3, TinyLlama."""
    try:
        model = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("model") or {}
    except (OSError, ValueError):
        return False
    return model.get("type") == "Unigram" or (model.get("type") == "BPE" and bool(model.get("byte_fallback")))


def run_file_as_written(tokenizer_config: Path) -> None:
    """Name transformers' generic fast class in tokenizer_config.json. transformers 5 rebuilds the
    pipeline of the class a Llama 2 or Mistral folder names (LlamaTokenizer: Metaspace, the dummy
    prefix dropped before a text that starts with a space) instead of running tokenizer.json, which
    helpers.tokenizer runs as written; with the generic class both give the same ids."""
    config = json.loads(tokenizer_config.read_text(encoding="utf-8")) if tokenizer_config.is_file() else {}
    tokenizer_config.write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
