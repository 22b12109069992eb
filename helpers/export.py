"""export_hf: any model of ours as a Hugging Face folder that the family's own transformers class
loads with identical logits, with the model's tokenizer in Hugging Face's form (so
lm-evaluation-harness, vLLM and the rest can use a child as it is). A model with LoRA adapters is
written merged, or (adapter=True) as its base plus the adapters in peft's own format.
Floor "checkpoint": uses the formats, helpers.lora and helpers.tokenizer; helpers.checkpoint offers it."""
from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

from helpers.errors import CheckpointError
from helpers.formats.families import HF, LLAMA_LAYER
from helpers.formats.hf import LAYER_PREFIX, hf_config, state_to_hf
from helpers.lora import NATIVE, blocks_of, merge, record_of, row_blocks, strip
from helpers.model import GPT
from helpers.tokenizer import hf_tokenizer


def export_hf(model: GPT, out_dir, adapter: bool = False) -> Path:
    """Write config.json + model.safetensors, and the tokenizer its provenance names (GPT-2's, a
    GGUF file's, a folder's tokenizer.json; helpers.formats.sources.resolve_tokenizer_source) as
    tokenizer.json + tokenizer_config.json. A model with no tokenizer recorded gets none.
    A model with LoRA adapters (helpers.lora) is written merged. adapter=True writes instead the base
    the adapters apply to (the frozen weights and the tensors trained in full) and, in out_dir/adapter,
    the adapters in peft's format: peft.PeftModel.from_pretrained(<out_dir's transformers model>,
    out_dir/adapter) computes what the model does."""
    from safetensors.torch import save_file

    with_adapters = record_of(model) is not None
    if adapter and not with_adapters:
        raise CheckpointError("export_hf(adapter=True): this model has no LoRA adapters; load a LoRA run's checkpoint "
                              "with helpers.checkpoint.load_lora (load_model merges them)")
    plain = (strip(model) if adapter else merge(model)) if with_adapters else model
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not isinstance(plain, GPT):  # a transformers model (helpers.generic): its own class writes it
        plain.hf.save_pretrained(out)
    else:
        hf = hf_config(plain.config)
        hf["torch_dtype"] = str(plain.transformer.wte.weight.dtype).removeprefix("torch.")
        (out / "config.json").write_text(json.dumps(hf, indent=2))
        save_file({k: v.detach().cpu() for k, v in state_to_hf(plain).items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
    write_tokenizer(plain, out)
    if adapter:
        write_peft_adapter(model, out / "adapter", out)
    return out


def write_peft_adapter(model, folder: Path, base: Path) -> None:
    """The adapters of a model with LoRA adapters as peft saves them (adapter_config.json,
    adapter_model.safetensors), under the module names of the exported transformers model."""
    import peft
    from safetensors.torch import save_file

    record, state = record_of(model), model.state_dict()
    r, alpha = record["settings"]["r"], record["settings"]["alpha"]
    prefix, n_blocks = blocks_of(model)
    tensors, wide = {}, {}
    for i in range(n_blocks):
        for module, parts in record["modules"].items():
            a, b = (state[f"{prefix}.{i}.{module}.lora_{x}.default.weight"] for x in "AB")
            for name, a_part, b_part in transformers_adapters(model, i, module, parts, a, b, r):
                tensors[f"base_model.model.{name}.lora_A.weight"] = a_part.contiguous()
                tensors[f"base_model.model.{name}.lora_B.weight"] = b_part.contiguous()
                if a_part.shape[0] != r:  # GPT-2's c_attn stays one matrix there too, with a rank block per projection
                    wide[re.escape(module)] = a_part.shape[0] // r
    targets = sorted({k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in tensors})
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=record["settings"]["dropout"], bias="none",
                             target_modules=targets, task_type="CAUSAL_LM", base_model_name_or_path=str(base),
                             rank_pattern={m: r * k for m, k in wide.items()},
                             alpha_pattern={m: alpha * k for m, k in wide.items()},
                             fan_in_fan_out=any(type(m).__name__ == "Conv1D" for m in model.modules())
                             or isinstance(model, GPT) and model.config.family == "gpt2")
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file({k: v.detach().cpu() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})


def transformers_adapters(model, i: int, module: str, parts: list[str], a, b, r: int):
    """(module name in the exported transformers model, A, B) of block i's adapter on `module`: a
    transformers model's own; GPT-2's under the same names (Conv1D there); a Llama-like model's fused
    q/k/v and gate/up matrices split into one adapter per projection (its rows, its block of the rank)."""
    if not isinstance(model, GPT):
        yield f"{blocks_of(model)[0]}.{i}.{module}".removeprefix("hf."), a, b
    elif model.config.family == "gpt2":
        yield f"transformer.h.{i}.{module}", a, b
    else:
        blocks = {role: (start, end) for role, start, end in row_blocks(model.config, module)}
        hf_names = [names[HF].removesuffix(".weight") for names in LLAMA_LAYER[f"{module}.weight"]]
        for j, part in enumerate(parts):
            hf_name = hf_names[NATIVE[module].index(part)] if blocks else hf_names[0]
            rows = slice(*blocks[part]) if blocks else slice(None)
            yield LAYER_PREFIX.format(i) + hf_name, a[j * r:(j + 1) * r], b[rows, j * r:(j + 1) * r]


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
