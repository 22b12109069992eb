"""torch.save checkpoints: this project's own (weights, config, provenance, training state and a
JSON sidecar), nanoGPT's `ckpt.pt` and the Kaggle student project's `model_state_dict` files.
Loaded memory-mapped, the model's tensors taken as they are (helpers.formats.weights).
Floor "formats": uses families, weights, the models, files and the errors."""
from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import torch

from helpers.errors import CheckpointError
from helpers.formats.families import assign_state
from helpers.formats.weights import TensorDict, Weights, check_names, gpt_on_meta
from helpers.files import atomic_write, jsonable
from helpers.generic import HFCausalLM, build, config_from_dict
from helpers.model import GPT, GPTConfig

FORMAT = "inheritune-helpers"
FORMAT_VERSION = 1


def torch_load(path: Path, mmap: bool = False) -> dict:
    """A torch file's dictionary; mmap=True maps the file instead of reading it: a tensor costs memory
    only when it is touched (a checkpoint's AdamW state is not, for load_model), and it can be taken as
    a parameter as it is (a private map: writing to it copies the pages written)."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # torch's legacy format cannot be mapped
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


def config_of(fields, path) -> GPTConfig:
    """The GPTConfig a checkpoint stores, or one CheckpointError when it is missing or impossible."""
    try:
        return GPTConfig.from_dict(fields)
    except (AttributeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: model_config is damaged ({e}); pass an intact checkpoint") from None


def open_torch_checkpoint(path: Path) -> Weights:
    """A torch file opened (memory-mapped): our model on the meta device, the names and shapes of its
    weights checked, each tensor taken when asked for; a generic model's is read whole."""
    ck = torch_load(path, mmap=True)
    if ck.get("format") == FORMAT:
        if ck.get("version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{path}: written by a newer version ({ck['version']}); upgrade helpers")
        if ck.get("model_config", {}).get("generic"):  # a transformers model (helpers.generic)
            return Weights.loaded(load_generic_checkpoint(ck["model_config"], ck["model"],
                                                          dict(ck.get("provenance", {})), path))
        cfg = config_of(ck.get("model_config"), path)
        sd, provenance = ck["model"], dict(ck.get("provenance", {}))
    elif "model_args" in ck and "model" in ck:  # nanoGPT
        args = {k: v for k, v in ck["model_args"].items() if k in GPTConfig.__dataclass_fields__}
        cfg, sd = config_of(args, path), _strip_prefixes(ck["model"])
        provenance = {"format": "nanogpt", "tokenizer": "gpt2"}
    elif "model_state_dict" in ck:  # the Kaggle student project
        sd = _strip_prefixes(ck["model_state_dict"])
        saved = ck.get("config") or ck.get("model_args") or {}
        cfg = config_from_nanogpt_keys(sd, path, saved.get("n_head") if isinstance(saved, dict) else None)
        provenance = {"format": "student", "tokenizer": "gpt2"}
    else:
        raise CheckpointError(f"{path}: unknown checkpoint layout (keys {sorted(ck)[:6]}); expected ours, "
                              "nanoGPT's (model_args + model) or model_state_dict")
    model = gpt_on_meta(cfg)
    plan = check_names(model, sd, path)
    model.provenance = {**provenance, "source": provenance.get("source", str(path))}
    return Weights(model, plan, TensorDict(sd), path)


def load_torch_checkpoint(path: Path) -> GPT:
    return open_torch_checkpoint(path).read()


def load_generic_checkpoint(model_config: dict, sd: dict, provenance: dict, where) -> HFCausalLM:
    """One of our checkpoints of a generic model: its transformers config and state dict."""
    model = HFCausalLM(build(config_from_dict(model_config["hf_config"], where), where))
    assign_state(model, sd, where)
    model.provenance = provenance
    return model


# ---- our checkpoint format -------------------------------------------------------------------
def sidecar_path(path) -> Path:
    return Path(path).with_suffix(".json")


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
    atomic_write(path, lambda f: save_without_crc(payload, f))
    side = {k: v for k, v in payload.items() if k not in ("model",)}
    side = jsonable(side) | {"checkpoint": path.name, "num_params": raw.num_params()}
    atomic_write(sidecar_path(path), lambda f: f.write(json.dumps(side, indent=2).encode()))
    return path


_CRC_OPTION = threading.Lock()  # torch's CRC switch is process-wide: one save at a time flips it


def save_without_crc(obj, f) -> None:
    """torch.save without the zip CRC-32 of every record: a ~1 GB checkpoint (the SmolLM2 child's
    weights and AdamW state) wrote in 0.83 s instead of 1.45 s. Nothing torch.load checks is lost
    (it never reads the CRCs: a flipped bit in a tensor went unnoticed before too, and a truncated
    file still fails); zip tools that verify CRCs (Python's zipfile.read) reject such a file. The
    write is atomic and fsynced (files.atomic_write). torch < 2.6 has no switch: a plain save."""
    if not hasattr(torch.serialization, "set_crc32_options"):
        torch.save(obj, f)
        return
    with _CRC_OPTION:
        before = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            torch.save(obj, f)
        finally:
            torch.serialization.set_crc32_options(before)


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
    ck = torch_load(Path(path), mmap=True)
    if ck.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this project; cannot resume from it")
    return ck
