"""Hugging Face folders: config.json <-> GPTConfig, weights <-> our state dict (through the
tables in helpers.formats.families), safetensors or pytorch_model.bin, sharded or not, read one
tensor at a time (helpers.formats.weights). A folder of another family, or of a native family's
variant our model lacks (`native_gap`), goes to helpers.generic (transformers maps the file itself).
Floor "formats": uses families, weights, the models (ours and helpers.generic) and the errors."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from helpers.formats import families
from helpers.errors import CheckpointError
from helpers.formats.families import GPT2_CONV1D, HF
from helpers.formats.weights import SafetensorsFiles, TensorDict, Weights, check_names, gpt_on_meta
from helpers.generic import HFCausalLM, check_decoder, config_from_dict
from helpers.model import GPT, GPTConfig, llama_config

LAYER_PREFIX = "model.layers.{}."
LLAMA_LIKE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "qwen3": "Qwen3ForCausalLM"}  # model_type -> transformers class
NATIVE = ("gpt2", *LLAMA_LIKE)


def native_gap(hf: dict) -> str | None:
    """What a config of a native family asks for that our model does not implement (a variant such
    as Llama 3's RoPE scaling), or None. Such a folder is loaded through helpers.generic instead."""
    mt = hf.get("model_type")
    if mt == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        return None if act in ("gelu_new", "gelu_pytorch_tanh") else f"activation {act!r} is not GPT-2's tanh GELU"
    if mt not in LLAMA_LIKE:
        return None
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        return f"RoPE scaling {rope_type!r} is not implemented natively"
    if hf.get("mlp_bias") or hf.get("hidden_act", "silu") != "silu":
        return f"{mt} variants with MLP biases or a non-SiLU MLP are not implemented natively"
    if mt != "qwen2" and hf.get("attention_bias"):
        return f"{mt} with attention_bias=true is not implemented natively"
    if mt in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        return f"{mt} with use_sliding_window=true (a window in some layers only) is not implemented natively"
    return None


def config_from_hf(hf: dict, where) -> GPTConfig:
    mt = hf.get("model_type")
    if mt not in NATIVE:
        raise CheckpointError(f"{where}: model_type {mt!r} is not supported natively ({', '.join(NATIVE)} are)")
    gap = native_gap(hf)
    if gap:
        raise CheckpointError(f"{where}: {gap}; load_model loads this folder through the generic path")
    try:
        if mt == "gpt2":
            return GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                             n_head=hf["n_head"], n_embd=hf["n_embd"], intermediate_size=hf.get("n_inner"),
                             norm_eps=hf.get("layer_norm_epsilon", 1e-5), bias=True,
                             tie_embeddings=hf.get("tie_word_embeddings", True))
        return llama_like_config(hf, mt)
    except KeyError as e:
        raise CheckpointError(f"{where}: config.json lacks {e.args[0]!r}") from None


def llama_like_config(hf: dict, mt: str) -> GPTConfig:
    """Llama and the families that differ from it by one feature: Qwen2 (q, k, v biases), Qwen3
    (per-head q/k RMSNorm), Mistral (sliding window)."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    heads, dim = hf["num_attention_heads"], hf["hidden_size"]
    return llama_config(
        family=mt, block_size=hf["max_position_embeddings"], vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"], n_head=heads, n_embd=dim, head_dim=hf.get("head_dim") or dim // heads,
        n_kv_head=hf.get("num_key_value_heads") or heads, intermediate_size=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_base=rope.get("rope_theta", hf.get("rope_theta", 1e4)),
        tie_embeddings=hf.get("tie_word_embeddings", False), qkv_bias=mt == "qwen2", qk_norm=mt == "qwen3",
        sliding_window=hf.get("sliding_window") if mt == "mistral" else None)


def hf_config(cfg: GPTConfig) -> dict:
    """config.json for our config, in the family's own transformers class."""
    if cfg.family == "gpt2":
        if not cfg.bias:
            raise CheckpointError("export_hf: GPT-2 without biases has no Hugging Face equivalent")
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_positions": cfg.block_size,
                "n_ctx": cfg.block_size, "vocab_size": cfg.vocab_size, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                "n_embd": cfg.n_embd, "n_inner": cfg.intermediate_size, "layer_norm_epsilon": cfg.norm_eps,
                "activation_function": "gelu_new", "tie_word_embeddings": cfg.tie_embeddings,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": 50256, "eos_token_id": 50256}
    fam = cfg.family
    if (cfg.qkv_bias, cfg.qk_norm) != (fam == "qwen2", fam == "qwen3") or cfg.bias \
            or cfg.sliding_window is not None and fam != "mistral":
        raise CheckpointError(f"export_hf: a {fam} config with qkv_bias={cfg.qkv_bias}, qk_norm={cfg.qk_norm}, "
                              f"bias={cfg.bias}, sliding_window={cfg.sliding_window} has no Hugging Face equivalent")
    hf = {"architectures": [LLAMA_LIKE[fam]], "model_type": fam, "hidden_size": cfg.n_embd,
          "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.n_layer,
          "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
          "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_base,
          "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
          "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu"}
    if fam in ("llama", "qwen3"):
        hf["attention_bias"] = False
    if fam == "llama":
        hf["mlp_bias"] = False
    if fam in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = False
    if fam == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    return hf


def hf_plan(cfg: GPTConfig, names: set[str], where) -> tuple[dict[str, list[str]], frozenset]:
    """(our name -> the folder's tensors whose rows make it, the tensors stored transposed) for the
    tensor names of a Hugging Face folder, through the family's table; a weight missing, or one no
    table names, is refused here, before anything is read."""
    if cfg.family == "gpt2":
        plan, transposed = {}, set()
        for k in names:
            bare = k.removeprefix("transformer.")
            if bare.endswith((".attn.bias", ".attn.masked_bias")) or bare == "lm_head.weight" and cfg.tie_embeddings:
                continue  # causal-mask buffers; the tied head is the embedding
            plan[bare if bare == "lm_head.weight" else "transformer." + bare] = [k]
            if bare.endswith(GPT2_CONV1D):
                transposed.add(k)
        return plan, frozenset(transposed)  # names checked against the model by check_names
    plan = families.plan(cfg, HF, LAYER_PREFIX)
    used = {name for parts in plan.values() for name in parts}
    missing = sorted(used - names)
    if missing:
        raise CheckpointError(f"{where}: missing weights ['{missing[0]}']")
    unknown = sorted(k for k in names - used if not k.endswith("rotary_emb.inv_freq")
                     and not (k == "lm_head.weight" and cfg.tie_embeddings))
    if unknown:
        raise CheckpointError(f"{where}: unexpected weights {unknown[:3]} (is this a {cfg.family} checkpoint?)")
    return plan, frozenset()


def state_to_hf(model: GPT) -> dict:
    cfg, sd = model.config, model.state_dict()
    if cfg.family == "gpt2":
        out = {k.removeprefix("transformer."): (v.t() if k.endswith(GPT2_CONV1D) else v)
               for k, v in sd.items() if k != "lm_head.weight"}
    else:
        out = families.scatter(cfg, sd, HF, LAYER_PREFIX)
    return {k: v.contiguous() for k, v in out.items()}


def hf_tensors(path: Path):
    """The tensors of a Hugging Face folder by name, nothing read yet: safetensors (their headers), or
    pytorch_model.bin (memory-mapped), sharded or not."""
    def load_bin(f: Path) -> dict:
        try:
            try:
                return torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # a file of torch's legacy format cannot be mapped
                return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read weights ({type(e).__name__}: {str(e)[:120]}); the file "
                                  "is truncated or corrupt, download it again") from None

    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        files = None
        if (path / index_name).is_file():
            try:
                shards = sorted(set(json.loads((path / index_name).read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{path / index_name}: not a shard index ({type(e).__name__}: {e}); "
                                      "download it again") from None
            for shard in shards:
                if not (path / shard).is_file():
                    raise CheckpointError(f"{path / shard}: shard named in {index_name} is missing")
            files = [path / shard for shard in shards]
        elif (path / single).is_file():
            files = [path / single]
        if files is None:
            continue
        if single.endswith(".safetensors"):
            return SafetensorsFiles(files)
        return TensorDict({k: v for f in files for k, v in load_bin(f).items()})
    raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin next to config.json")


def read_config(path: Path) -> dict:
    try:
        hf = json.loads((path / "config.json").read_text())
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({e}); download it again") from None
    if not isinstance(hf, dict) or not isinstance(hf.get("model_type"), str):
        raise CheckpointError(f"{path / 'config.json'}: not a model config (no model_type); pass a model folder")
    return hf


def open_hf_folder(path: Path) -> Weights:
    """A Hugging Face folder opened: a native family's model on the meta device with its tensors
    indexed and checked (read on demand), or any other decoder read whole by transformers."""
    hf = read_config(path)
    gap = native_gap(hf)
    if hf.get("model_type") not in NATIVE or gap:  # any other decoder of transformers, or a variant
        model = load_generic_folder(path, hf)
        if gap:
            model.provenance["note"] = f"{gap}; loaded through the generic path (transformers' own class)"
        return Weights.loaded(model)
    cfg = config_from_hf(hf, path / "config.json")
    source = hf_tensors(path)
    plan, transposed = hf_plan(cfg, source.names(), path)
    model = gpt_on_meta(cfg)
    if cfg.family == "gpt2":
        plan = {k: plan[k] for k in check_names(model, plan, path)}
    tok = "gpt2" if cfg.family == "gpt2" and not (path / "tokenizer.json").is_file() else str(path)
    model.provenance = {"source": str(path), "format": "huggingface", "tokenizer": tok}
    return Weights(model, plan, source, path, transposed)


def load_hf_folder(path: Path) -> GPT:
    return open_hf_folder(path).read()


def load_generic_folder(path: Path, hf: dict) -> HFCausalLM:
    """A Hugging Face folder of a non-native family, through AutoModelForCausalLM (which also knows
    each family's renamed weights); any weight missing, unexpected or of the wrong shape is refused."""
    import transformers
    where = path / "config.json"
    check_decoder(config_from_dict(hf, where), where)
    try:
        hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                           output_loading_info=True)
    except Exception as e:  # truncated shards, foreign files: transformers' message, on one line
        raise CheckpointError(f"{path}: transformers cannot load it ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:150]}); check the folder or download it again") from None
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise CheckpointError(f"{path}: weights do not match config.json: "
                              + "; ".join(f"{k.replace('_keys', '')} {sorted(map(str, v))[:3]}" for k, v in bad.items()))
    model = HFCausalLM(hf_model.eval())
    model.provenance = {"source": str(path), "format": "huggingface", "tokenizer": str(path), "generic": True}
    return model
