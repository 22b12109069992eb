"""Data assembly: documents from any source -> token ids in `train.bin` / `val.bin` + `meta.json`.

Streaming and bounded in memory (one batch of documents at a time), tokenized on several threads
(tiktoken releases the GIL), written incrementally under temporary names and renamed only when
complete. The split is by document, from a hash of (seed, document name): deterministic, and the
same whatever the order or parallelism. A source too small for that (one text file, a .jsonl of one
record: every document on one side) is split by position instead: the last val_fraction of its
tokens is the validation split; meta.json's "split" says which was done.

Sources (`source=`):
- "stdlib" — the embedded default: the Python standard library's own `.py` files of the running
  interpreter (real code with docstrings and comments, on every machine, no download). The exact
  file list goes into meta.json.
- an OpenWebText subset tar (`urlsf_subset00.tar`: members `openwebtext/*.xz`, each an xz tar of
  `.txt` documents), a folder of those `.xz` files, or `owt:N` (subset N, downloaded when online);
- `hf:<dataset id>` — a Hugging Face dataset, streamed (needs `datasets` and a network);
- a text file, a `.jsonl` file (field `text_field`), a folder or a glob of text files.
"""
from __future__ import annotations

import glob as globlib
import hashlib
import io
import json
import lzma
import os
import sys
import sysconfig
import tarfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from helpers.files import atomic_write, unwritable_reason
from helpers.errors import DataError
from helpers.records import progress_bar
from helpers.tokenizer import TokenizersEncoding, copy_encoding, document_framing, get_encoding

META_VERSION = 1
TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text"}
OWT_REPO = "Skylion007/openwebtext"  # hub dataset repo holding subsets/urlsf_subsetNN.tar
SOURCES_HELP = ("use 'stdlib' (the embedded default), an OpenWebText subset .tar, a folder of its .xz files, "
                "'owt:N', 'hf:<dataset id>', a .txt or .jsonl file, a folder or a glob of text files")


@dataclass
class Stats:
    """What a preparation read, kept, skipped and replaced; written into meta.json."""
    skipped: list = field(default_factory=list)  # [{"name", "reason"}], capped
    skipped_count: int = 0
    replaced_chars: int = 0  # U+FFFD inserted for bytes that were not UTF-8
    docs_with_replacements: int = 0
    files: list = field(default_factory=list)  # for the embedded default: exactly which files

    def skip(self, name: str, reason: str, strict: bool):
        if strict:
            raise DataError(f"{name}: {reason} (strict=True; pass strict=False to skip and count it)")
        warnings.warn(f"skipping {name}: {reason}", stacklevel=3)
        self.skipped_count += 1
        if len(self.skipped) < 1000:
            self.skipped.append({"name": name, "reason": reason})

    def decode(self, raw: bytes) -> str:
        text, bad = decode_counting(raw)
        self.count_replaced(bad)
        return text

    def count_replaced(self, bad: int):
        if bad:
            self.replaced_chars += bad
            self.docs_with_replacements += 1


def decode_counting(raw: bytes) -> tuple[str, int]:
    """UTF-8 text with undecodable bytes replaced by U+FFFD, and how many were replaced."""
    text = raw.decode("utf-8", errors="replace")
    if "\ufffd" not in text:
        return text, 0
    return text, text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")


# ---- document sources ------------------------------------------------------------------------
def _owt_xz_docs(fileobj, name: str, stats: Stats, strict: bool):
    """Documents of one OpenWebText `.xz` member: an xz-compressed tar of .txt files."""
    docs = []
    try:
        with lzma.open(fileobj) as xz, tarfile.open(fileobj=xz, mode="r|") as inner:
            for m in inner:
                if m.isfile() and m.name.endswith(".txt"):
                    docs.append((f"{name}/{m.name}", inner.extractfile(m).read()))
    except (lzma.LZMAError, tarfile.TarError, EOFError, OSError) as e:
        stats.skip(name, f"corrupt or truncated xz/tar member ({type(e).__name__}: {e})", strict)
        return  # a damaged member contributes nothing, not a partial set of documents
    for doc_name, raw in docs:
        yield doc_name, stats.decode(raw)


def _iter_owt_tar(path: Path, stats: Stats, strict: bool):
    try:
        outer = tarfile.open(path, mode="r|")
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{path}: not a readable tar archive ({e}); pass an OpenWebText subset .tar") from None
    with outer:
        try:
            for m in outer:
                if m.isfile() and m.name.endswith(".xz"):
                    yield from _owt_xz_docs(io.BytesIO(outer.extractfile(m).read()), m.name, stats, strict)
        except (tarfile.TarError, EOFError, OSError) as e:
            stats.skip(str(path), f"outer tar is truncated or corrupt after this point ({e})", strict)


def _iter_owt_folder(path: Path, stats: Stats, strict: bool):
    for f in sorted(path.glob("*.xz")):
        with open(f, "rb") as fh:
            yield from _owt_xz_docs(fh, f.name, stats, strict)


class TextFile(NamedTuple):
    """A document still on disk: the tokenizer threads read and decode it, off the main thread."""
    path: str
    size: int


def _iter_text_files(files, root: Path | None = None):
    prefix = os.path.join(str(root), "") if root is not None and str(root) != "." else ""
    for f in files:
        path = str(f)
        name = path[len(prefix):] if prefix and path.startswith(prefix) else path
        yield name, TextFile(path, os.stat(path).st_size)


def _glob_root(pattern: str) -> Path:
    """The folder above a glob's first wildcard: document names are taken relative to it, so the
    split does not depend on where the corpus lies on disk."""
    parts = Path(pattern).expanduser().parts
    fixed = [p for p in parts[:next(i for i, p in enumerate(parts) if any(ch in p for ch in "*?["))]]
    return Path(*fixed) if fixed else Path(".")


def _iter_jsonl(path: Path, text_field: str, stats: Stats, strict: bool):
    with open(path, "rb") as fh:
        for i, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_field]
            except (ValueError, KeyError, TypeError):
                text = None
            if not isinstance(text, str):
                stats.skip(f"{path}:{i + 1}", f"not a JSON object with a {text_field!r} string", strict)
                continue
            yield f"{path.name}:{i + 1}", text


def stdlib_files() -> tuple[Path, list[Path]]:
    """The embedded default corpus: every .py file of this interpreter's standard library
    (site-packages excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in ("site-packages", "__pycache__")]
        files.extend(Path(folder, n) for n in names if n.endswith(".py"))
    return root, sorted(files)


def _download_owt_subset(n: int, cache_dir: Path) -> Path:
    local = cache_dir / f"urlsf_subset{n:02d}.tar"
    if local.is_file():
        return local
    try:
        from huggingface_hub import hf_hub_download
        # resumable, with a progress bar; the file lands in cache_dir
        return Path(hf_hub_download(OWT_REPO, f"subsets/urlsf_subset{n:02d}.tar", repo_type="dataset",
                                    local_dir=cache_dir))
    except Exception as e:
        raise DataError(f"owt:{n}: subset not on disk at {local} and the download failed ({type(e).__name__}); "
                        "go online, or pass the path of a downloaded urlsf_subsetNN.tar") from None


def iter_documents(source: str, stats: Stats, text_field: str = "text", strict: bool = False,
                   cache_dir: str | Path = "data/cache"):
    """(name, text) for every document of `source`, streamed."""
    s = str(source)
    if s == "stdlib":
        root, files = stdlib_files()
        stats.files = [str(f.relative_to(root)) for f in files]
        return _iter_text_files(files, root)
    if s.startswith("owt:"):
        try:
            n = int(s[4:])
        except ValueError:
            raise DataError(f"{s}: write the subset number, e.g. owt:0") from None
        return _iter_owt_tar(_download_owt_subset(n, Path(cache_dir)), stats, strict)
    if s.startswith("hf:"):
        return _iter_hf_dataset(s[3:], text_field, stats, strict)
    path = Path(s).expanduser()
    if path.is_file():
        if path.suffix == ".tar":
            return _iter_owt_tar(path, stats, strict)
        if path.suffix == ".jsonl":
            return _iter_jsonl(path, text_field, stats, strict)
        return _iter_text_files([path], path.parent)
    if path.is_dir():
        if any(path.glob("*.xz")):
            return _iter_owt_folder(path, stats, strict)
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"{path}: folder has no .xz or text files ({', '.join(sorted(TEXT_SUFFIXES))}); {SOURCES_HELP}")
        return _iter_text_files(files, path)
    if any(ch in s for ch in "*?["):
        files = sorted(Path(p) for p in globlib.glob(str(Path(s).expanduser()), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{s}: the glob matches no files; {SOURCES_HELP}")
        return _iter_text_files(files, _glob_root(s))
    raise DataError(f"{s}: no such file or folder; {SOURCES_HELP}")


def _iter_hf_dataset(name: str, text_field: str, stats: Stats, strict: bool):
    try:
        import datasets
    except ImportError:
        raise DataError(f"hf:{name}: needs the datasets library: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, split="train", streaming=True)
    except Exception as e:
        raise DataError(f"hf:{name}: could not open the dataset ({type(e).__name__}); go online or use a local source") from None
    for i, row in enumerate(ds):
        text = row.get(text_field) if isinstance(row, dict) else None
        if not isinstance(text, str):
            stats.skip(f"hf:{name}:{i}", f"no {text_field!r} string in this row (fields: {sorted(row)[:8]}); "
                       "pass text_field=<the text column>", strict)
            continue
        yield f"{name}:{i}", text


# ---- preparation -----------------------------------------------------------------------------
def is_val(name: str, seed: int, val_fraction: float) -> bool:
    h = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0 ** 64 < val_fraction


def _batches(docs, max_docs: int | None, batch_chars: int = 1_000_000, batch_docs: int = 512):
    batch, chars = [], 0
    for i, (name, text) in enumerate(docs):
        if max_docs is not None and i >= max_docs:
            break
        batch.append((name, text))
        chars += text.size if isinstance(text, TextFile) else len(text)
        if chars >= batch_chars or len(batch) >= batch_docs:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def prepare(source: str = "stdlib", out_dir: str | Path = "data/stdlib", tokenizer: str = "gpt2",
            val_fraction: float = 0.05, seed: int = 1337, max_tokens: int | None = None,
            max_docs: int | None = None, text_field: str = "text", strict: bool = False,
            overwrite: bool = False, num_threads: int | None = None, progress: bool = True,
            cache_dir: str | Path = "data/cache") -> dict:
    """Tokenize `source` into out_dir/{train,val}.bin + meta.json and return the meta dict.
    A finished folder with the same parameters is reused; a different dataset is never overwritten
    unless overwrite=True."""
    if not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction!r} must lie strictly between 0 and 1, e.g. 0.05")
    for name, v in (("max_tokens", max_tokens), ("max_docs", max_docs)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise DataError(f"{name}={v!r} must be a positive integer or None")
    out = Path(out_dir)
    params = dict(source=str(source), tokenizer=str(tokenizer), val_fraction=val_fraction, seed=seed,
                  max_tokens=max_tokens, max_docs=max_docs, text_field=text_field, strict=strict)
    meta_path = out / "meta.json"
    existing = read_meta(out) if meta_path.is_file() and not overwrite else None  # overwrite: even a damaged one
    if existing is not None:
        if existing.get("params") == params and _outputs_intact(out, existing):
            return existing
        if existing.get("params") != params:
            made = existing.get("params") or {}
            raise DataError(f"{out}: holds a different dataset (source {made.get('source')!r}, tokenizer "
                            f"{made.get('tokenizer')!r}); pick another out_dir or pass overwrite=True")
    elif not overwrite and any((out / f).exists() for f in ("train.bin", "val.bin")):
        raise DataError(f"{out}: has train.bin/val.bin but no meta.json (not made here, or damaged); "
                        "pick another out_dir or pass overwrite=True")
    reason = unwritable_reason(out)
    if reason:
        raise DataError(f"{out}: output folder is not writable ({reason}); pick another out_dir")

    enc = get_encoding(None if tokenizer == "gpt2" else tokenizer)
    framing = document_framing(enc)  # BOS before each document (Llama 2, Gemma) or end-of-text after it
    dtype = np.uint16 if enc.n_vocab <= 2 ** 16 else np.uint32
    before, after = (np.array([framing.token] if framing.kind == k else [], dtype=np.uint32) for k in ("bos", "eot"))
    stats = Stats()
    docs = iter_documents(source, stats, text_field, strict, cache_dir)
    splits = {s: {"documents": 0, "tokens": 0, "characters": 0} for s in ("train", "val")}
    hashes = {s: hashlib.sha256() for s in splits}
    tmp = {s: out / f".{s}.bin.tmp" for s in splits}
    handles = {s: open(tmp[s], "wb") for s in splits}
    threads = num_threads or min(8, os.cpu_count() or 1)
    bar = _progress(progress)
    started = time.time()
    total = 0
    try:
        local = threading.local()

        def start_worker():
            # Each thread encodes with its own copy of the encoding, made on that thread (~20 ms):
            # tiktoken's native core serves the thread that first used it fastest, and two threads
            # sharing one ran 10-15% slower here.
            local.enc = copy_encoding(enc)

        with ThreadPoolExecutor(threads, initializer=start_worker) as pool:
            def encode(batch):  # runs on a worker thread; tiktoken releases the GIL while encoding
                parts = {"train": [], "val": []}
                sizes = []  # per document, in order: (split, tokens incl. BOS or end-of-text, characters, replaced)
                texts, replaced = [], []
                for name, text in batch:
                    bad = 0
                    if isinstance(text, TextFile):
                        with open(text.path, "rb") as fh:
                            text, bad = decode_counting(fh.read())
                    texts.append(text)
                    replaced.append(bad)
                for (name, _), text, bad, ids in zip(batch, texts, replaced, encode_many(local.enc, texts)):
                    split = "val" if is_val(name, seed, val_fraction) else "train"
                    parts[split] += (before, ids, after)
                    sizes.append((split, ids.size + 1, len(text), bad))
                # one array per split and batch: the main thread writes and hashes twice per batch
                return {k: np.concatenate(v, dtype=dtype, casting="unsafe") for k, v in parts.items() if v}, sizes

            pending = []
            batches = _batches(docs, max_docs)
            exhausted = stop = False
            while not stop:
                while not exhausted and len(pending) < 2 * threads:  # bounded read-ahead
                    b = next(batches, None)
                    if b is None:
                        exhausted = True
                    else:
                        pending.append(pool.submit(encode, b))
                if not pending:
                    break
                arrays, sizes = pending.pop(0).result()  # in order: the output is deterministic
                used = {"train": 0, "val": 0}
                for split, n_tokens, n_chars, bad in sizes:
                    if max_tokens is not None and total >= max_tokens:
                        stop = True
                        break
                    st = splits[split]
                    st["documents"] += 1
                    st["tokens"] += n_tokens
                    st["characters"] += n_chars
                    used[split] += n_tokens
                    total += n_tokens
                    stats.count_replaced(bad)
                    bar.update(1)
                for split, n in used.items():
                    if n:
                        data = arrays[split][:n].data
                        handles[split].write(data)
                        hashes[split].update(data)
                bar.set_postfix(tokens=f"{total:,}", MB=f"{sum(s['characters'] for s in splits.values()) / 1e6:.1f}",
                                refresh=False)
            for f in pending:
                f.cancel()
    except BaseException:
        for h in handles.values():
            h.close()
        for p in tmp.values():
            p.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    for h in handles.values():
        h.flush()
        os.fsync(h.fileno())
        h.close()
    if total == 0:
        for p in tmp.values():
            p.unlink(missing_ok=True)
        raise DataError(f"{source}: produced {splits['train']['tokens']} training tokens "
                        f"({stats.skipped_count} documents skipped); the source holds no usable text")
    split = {"method": "hash", "seed": seed}
    if splits["val"]["documents"] == 0 or splits["train"]["documents"] == 0:
        try:
            split = _split_by_position(tmp, splits, hashes, dtype, val_fraction)
        except BaseException:
            for p in tmp.values():
                p.unlink(missing_ok=True)
            raise
    meta = dict(version=META_VERSION, params=params, source=str(source),
                tokenizer=dict(spec=str(tokenizer), name=enc.name, n_vocab=enc.n_vocab, **framing.meta()),
                dtype=np.dtype(dtype).name, splits=splits, split=split,
                sha256={s: hashes[s].hexdigest() for s in splits},
                skipped=dict(count=stats.skipped_count, examples=stats.skipped),
                replaced_chars=stats.replaced_chars, docs_with_replacements=stats.docs_with_replacements,
                files=stats.files, python=sys.version.split()[0] if source == "stdlib" else None,
                elapsed_s=round(time.time() - started, 2), created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    for s in splits:
        os.replace(tmp[s], out / f"{s}.bin")
    atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))  # last: marks completion
    return meta


def _split_by_position(tmp: dict, splits: dict, hashes: dict, dtype, val_fraction: float) -> dict:
    """Every document fell on one side of the hash split (too few of them): make the last
    val_fraction of the tokens, in order, the validation split instead. Rewrites the temporary
    files, counts and hashes in place; returns meta.json's description of the split."""
    whole = "train" if splits["train"]["documents"] else "val"
    data = np.fromfile(tmp[whole], dtype=dtype)
    n_val = max(1, round(len(data) * val_fraction))
    if len(data) - n_val < 1:
        raise DataError(f"{len(data)} tokens are too few to split into train and val; add text")
    cut = len(data) - n_val
    for name, part in (("train", data[:cut]), ("val", data[cut:])):
        with open(tmp[name], "wb") as f:
            f.write(part.tobytes())
            f.flush()
            os.fsync(f.fileno())
        hashes[name] = hashlib.sha256(part.tobytes())
        splits[name]["tokens"] = int(part.size)
    documents, characters = (sum(splits[s][k] for s in splits) for k in ("documents", "characters"))
    splits["train"].update(documents=documents, characters=characters)  # the val tokens are the end of the last ones
    splits["val"].update(documents=0, characters=0)
    return {"method": "position", "val_from_token": cut,
            "why": f"all {documents} document(s) fell on one side of the hash split; the last "
                   f"{val_fraction} of the tokens are the validation split"}


def encode_ids(enc, text: str) -> np.ndarray:
    """Token ids of ordinary text (special-token strings count as text) as a numpy array, without
    building a Python list (tiktoken's encode_to_numpy)."""
    ids = enc.encode_to_numpy(text, disallowed_special=())
    limit = getattr(enc, "model_vocab", None)  # ModelEncoding: drop bytes the model has no token for
    return ids[ids < limit] if limit is not None and ids.size and ids.max() >= limit else ids


def encode_many(enc, texts: list[str]) -> list[np.ndarray]:
    """encode_ids of each text. A `tokenizers` tokenizer gets them in one call, which it spreads
    over every core; tiktoken and SentencePiece encode one text at a time on our threads."""
    if isinstance(enc, TokenizersEncoding):
        return enc.encode_to_numpy_batch(texts)
    return [encode_ids(enc, text) for text in texts]


def _progress(enabled: bool):
    return progress_bar(desc="documents", unit=" docs", disable=not enabled, mininterval=1.0, file=sys.stderr)


def _outputs_intact(out: Path, meta: dict) -> bool:
    item = np.dtype(meta["dtype"]).itemsize
    return all((out / f"{s}.bin").is_file() and (out / f"{s}.bin").stat().st_size == meta["splits"][s]["tokens"] * item
               for s in ("train", "val"))


def read_meta(data_dir) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"{data_dir}: no meta.json; prepare the data first (notebook 01 or helpers.data.prepare)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f"{path}: damaged ({e}); prepare the data again with overwrite=True") from None


def verify(data_dir) -> None:
    """Check sizes and sha256 of the .bin files against meta.json."""
    meta = read_meta(data_dir)
    for s in ("train", "val"):
        h = hashlib.sha256()
        if not (Path(data_dir) / f"{s}.bin").is_file():
            raise DataError(f"{data_dir}/{s}.bin: missing; prepare the data again")
        with open(Path(data_dir) / f"{s}.bin", "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        if h.hexdigest() != meta["sha256"][s]:
            raise DataError(f"{data_dir}/{s}.bin: sha256 differs from meta.json; prepare the data again")


# ---- batches for training and evaluation -----------------------------------------------------
def open_split(data_dir, split: str) -> np.memmap:
    meta = read_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    if not _outputs_intact(Path(data_dir), meta):
        raise DataError(f"{path}: missing or its size disagrees with meta.json; prepare the data again")
    return np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")


def get_batch(data: np.ndarray, block_size: int, batch_size: int, generator: torch.Generator,
              device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """batch_size random windows of block_size+1 tokens -> (inputs, targets), both (B, T) int64.
    Randomness comes only from `generator`, so its state is the sampler's position."""
    if len(data) <= block_size + 1:
        raise DataError(f"split has {len(data)} tokens, fewer than block_size+1={block_size + 1}; lower block_size")
    starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator).tolist()
    rows = np.stack([data[i:i + block_size + 1] for i in starts]).astype(np.int64)
    xy = torch.from_numpy(rows)
    device = torch.device(device)
    if device.type == "cuda":
        xy = xy.pin_memory().to(device, non_blocking=True)
    return xy[:, :-1], xy[:, 1:]


def iter_sequential(data: np.ndarray, block_size: int, batch_size: int, device="cpu", max_tokens: int | None = None):
    """The whole split once, in order, as non-overlapping windows: (inputs, targets) batches where
    targets of padding are -1 (ignored by the loss). Every token after the first is predicted once."""
    n = len(data) if max_tokens is None else min(len(data), max_tokens + 1)
    starts = list(range(0, n - 1, block_size))
    device = torch.device(device)
    for b in range(0, len(starts), batch_size):
        chunk = starts[b:b + batch_size]
        x = torch.zeros((len(chunk), block_size), dtype=torch.int64)
        y = torch.full((len(chunk), block_size), -1, dtype=torch.int64)
        for r, s in enumerate(chunk):
            window = torch.from_numpy(np.asarray(data[s:min(s + block_size + 1, n)]).astype(np.int64))
            x[r, :len(window) - 1] = window[:-1]
            y[r, :len(window) - 1] = window[1:]
        if device.type == "cuda":
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        yield x, y


# ---- what a prepared folder holds (notebook 01) -------------------------------------------------
def split_summary(meta: dict) -> "pd.DataFrame":
    """meta.json's counts as a table, one row per split: documents, tokens, characters and
    characters per token (empty where a split has no characters of its own: after a split by
    position, val is the end of the train split's last document)."""
    import pandas as pd
    table = pd.DataFrame(meta["splits"]).T
    chars = table["characters"].astype(float)
    table["chars_per_token"] = (chars.where(chars > 0) / table["tokens"]).round(2)
    return table


def document_lengths(data_dir, split: str = "train", max_tokens: int | None = 50_000_000) -> np.ndarray:
    """Tokens per document (its end-of-text included) in the first max_tokens tokens of a split,
    read back from the end-of-text separators. Tokens after the last separator count as one more
    document: one cut short by max_tokens, or the only one of a corpus split by position (one text
    file such as input.txt), whose train split holds no separator at all. Where meta.json's framing
    is "bos", documents run from one BOS to the next instead (tokens before the first: one more)."""
    tok = read_meta(data_dir)["tokenizer"]
    data = open_split(data_dir, split)
    head = np.asarray(data[:max_tokens] if max_tokens is not None else data)
    if tok.get("framing") == "bos":
        starts = np.unique(np.concatenate([[0], np.flatnonzero(head == tok["bos"]), [head.size]]))
        return np.diff(starts).astype(np.int64)
    ends = np.flatnonzero(head == tok["eot"])
    lengths = np.diff(np.concatenate([[-1], ends]))
    last = ends[-1] if ends.size else -1
    if head.size - 1 > last:
        lengths = np.append(lengths, head.size - 1 - last)
    return lengths.astype(np.int64)
