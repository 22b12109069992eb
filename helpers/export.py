"""export_hf: any model of ours as a Hugging Face folder that the family's own transformers class
loads with identical logits, with the model's tokenizer in Hugging Face's form (so
lm-evaluation-harness, vLLM and the rest can use a child as it is)."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

from helpers.errors import CheckpointError
from helpers.hf_format import hf_config, state_to_hf
from helpers.model import GPT


def export_hf(model: GPT, out_dir) -> Path:
    """Write config.json + model.safetensors, and the tokenizer its provenance names (GPT-2's, a
    GGUF file's, a folder's tokenizer.json; helpers.sources.resolve_tokenizer_source) as
    tokenizer.json + tokenizer_config.json. A model with no tokenizer recorded gets none."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not isinstance(model, GPT):  # a transformers model (helpers.generic): its own save_pretrained
        from helpers.generic import export_generic
        export_generic(model, out)
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
        return True
    try:
        hf_tokenizer(model).save_pretrained(str(out))
    except (CheckpointError, ImportError, OSError, ValueError) as e:
        warnings.warn(f"export_hf: {out} has no tokenizer ({type(e).__name__}: {e})", stacklevel=3)
        return False
    return True


def hf_tokenizer(model):
    """The model's tokenizer as a Hugging Face tokenizer, built offline: GPT-2's from the embedded
    rank file, a GGUF file's from its metadata, a folder's from its tokenizer.json (a model folder
    or a tokenizer's own). Names such as "smollm2-135m" or a checkpoint of ours resolve as
    helpers.tokenizer.get_encoding resolves them; no tokenizer recorded means GPT-2's (nanoGPT's
    and the student project's checkpoints)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from helpers.sources import resolve_tokenizer_source
    source = model.provenance.get("tokenizer") or "gpt2"
    source = "gpt2" if source == "r50k_base" else source  # tiktoken's name for GPT-2's ranks
    if Path(source).is_dir() and (Path(source) / "tokenizer.json").is_file():  # also a tokenizer-only folder
        return AutoTokenizer.from_pretrained(str(source))
    kind, where = resolve_tokenizer_source(source)
    if kind == "gpt2":
        from transformers.convert_slow_tokenizer import TikTokenConverter

        from helpers.tokenizer import ENDOFTEXT, GPT2_PATTERN, GPT2_RANKS
        tok = TikTokenConverter(vocab_file=str(GPT2_RANKS), pattern=GPT2_PATTERN, extra_special_tokens=[ENDOFTEXT])
        return PreTrainedTokenizerFast(tokenizer_object=tok.converted(), bos_token=ENDOFTEXT, eos_token=ENDOFTEXT)
    if kind == "gguf":
        return AutoTokenizer.from_pretrained(str(where.parent), gguf_file=where.name)
    return AutoTokenizer.from_pretrained(str(where.parent))
