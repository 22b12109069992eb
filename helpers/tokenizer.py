"""Tokenizers as tiktoken Encodings, built offline.

- GPT-2's (the default): from the rank file shipped in `helpers/assets/` (hash checked).
- A model's own byte-level BPE: from a GGUF file's metadata (tokens, merges, pre-tokenizer name)
  or from a Hugging Face `tokenizer.json`. tiktoken merges the adjacent pair whose joined bytes
  have the lowest rank, and a token's rank is its id; Hugging Face applies merges in list order.
  The two agree when ids grow with merge order, which `_byte_level_encoding` checks.
"""
from __future__ import annotations

import functools
import json
import unicodedata
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from helpers.errors import CheckpointError
from helpers.sources import resolve_tokenizer_source

GPT2_RANKS = Path(__file__).parent / "assets" / "gpt2.tiktoken"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
ENDOFTEXT = "<|endoftext|>"
DOCUMENT_SEPARATORS = (ENDOFTEXT, "<|end_of_text|>")  # special tokens that end a document, by preference

# GPT-2's split pattern, as tiktoken writes it for r50k_base.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# GPT-2's pattern after a `Digits(individual_digits=True)` pre-tokenizer (SmolLM2, StarCoder):
# every digit is its own piece, and a whitespace run may end where a digit starts.
DIGITS_PATTERN = r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?![^\s\p{N}])|\s"""
# Qwen2, Qwen2.5 and Qwen3's pattern (their tokenizer.json: a Split with it, then byte-level, after NFC):
# one digit per piece, case-insensitive contractions, punctuation runs keep their newlines.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's pre-tokenizer names -> split pattern
GGUF_PRE = {"default": GPT2_PATTERN, "gpt-2": GPT2_PATTERN, "gpt2": GPT2_PATTERN,
            "smollm": DIGITS_PATTERN, "starcoder": DIGITS_PATTERN, "refact": DIGITS_PATTERN, "qwen2": QWEN2_PATTERN}
GGUF_NFC = {"qwen2"}  # pre-tokenizers whose Hugging Face tokenizer normalizes to NFC first


@functools.lru_cache(maxsize=None)
def gpt2_encoding() -> tiktoken.Encoding:
    """GPT-2's tokenizer (vocabulary 50,257, <|endoftext|> = 50256) with no network."""
    ranks = load_tiktoken_bpe(str(GPT2_RANKS), expected_hash=GPT2_RANKS_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: 50256}, explicit_n_vocab=50257)


class ModelEncoding(tiktoken.Encoding):
    """A tiktoken Encoding for a model whose vocabulary lacks some single bytes, or whose text is
    Unicode-normalized first (Qwen's tokenizer.json: NFC).

    tiktoken needs a rank for every byte; bytes the model has no token for get ranks past its
    vocabulary, and every encode drops them again, as Hugging Face's BPE does (it has no unknown
    token for them). `n_vocab` is the model's vocabulary size."""

    def __init__(self, *, model_vocab: int, normalize: str | None = None, **kw):
        super().__init__(**kw)
        self.model_vocab, self.normalize = model_vocab, normalize

    def _text(self, text):
        if self.normalize is None:
            return text
        return unicodedata.normalize(self.normalize, text) if isinstance(text, str) else [self._text(t) for t in text]

    @property
    def n_vocab(self) -> int:
        return self.model_vocab

    def _keep(self, ids):
        return ids if not ids or max(ids) < self.model_vocab else [i for i in ids if i < self.model_vocab]

    def encode_ordinary(self, text):
        return self._keep(super().encode_ordinary(self._text(text)))

    def encode(self, text, **kw):
        return self._keep(super().encode(self._text(text), **kw))

    def encode_to_numpy(self, text, **kw):  # ids past model_vocab are dropped by data.encode_ids
        return super().encode_to_numpy(self._text(text), **kw)

    def encode_ordinary_batch(self, text, **kw):
        return [self._keep(ids) for ids in super().encode_ordinary_batch(self._text(text), **kw)]

    def encode_batch(self, text, **kw):
        return [self._keep(ids) for ids in super().encode_batch(self._text(text), **kw)]


def copy_encoding(enc: tiktoken.Encoding) -> tiktoken.Encoding:
    """An independent copy of `enc` with its own native core. Two threads encoding through one
    Encoding contend inside tiktoken's shared core (measured: 1.78x on two cores instead of 2.0x
    with a copy per thread)."""
    kw = dict(name=enc.name, pat_str=enc._pat_str, mergeable_ranks=enc._mergeable_ranks,
              special_tokens=enc._special_tokens)
    if isinstance(enc, ModelEncoding):
        return ModelEncoding(model_vocab=enc.model_vocab, normalize=enc.normalize, **kw)
    return tiktoken.Encoding(**kw)


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable-character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def _byte_level_encoding(name: str, tokens: list[str], merges: list[str], special: dict[str, int],
                         pattern: str, where: str, normalize: str | None = None) -> tiktoken.Encoding:
    decode = _byte_decoder()
    ranks: dict[bytes, int] = {}
    for i, tok in enumerate(tokens):
        if tok in special:
            continue
        try:
            ranks[bytes(decode[c] for c in tok)] = i
        except KeyError:
            raise CheckpointError(f"{where}: token {i} {tok!r} is not byte-level BPE; only GPT-2-style "
                                  "byte-level tokenizers are supported") from None
    index = {t: i for i, t in enumerate(tokens)}
    last = -1
    for m in merges:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        i = index.get(a + b)
        if i is None or i <= last:
            raise CheckpointError(f"{where}: token ids do not follow merge order at merge {m!r}; "
                                  "this vocabulary cannot be expressed as tiktoken ranks")
        last = i
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    vocab = max([*ranks.values(), *special.values()]) + 1
    for k, b in enumerate(missing):
        ranks[bytes([b])] = vocab + k
    kw = dict(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)
    if missing or normalize:
        return ModelEncoding(model_vocab=vocab, normalize=normalize, **kw)
    return tiktoken.Encoding(**kw)


def encoding_from_gguf(path) -> tiktoken.Encoding:
    from helpers.gguf_format import open_gguf  # gguf is optional until a GGUF file is used

    path = str(path)
    f = open_gguf(path).fields

    def get(key):
        if key not in f:
            raise CheckpointError(f"{path}: GGUF metadata has no {key}; cannot build its tokenizer")
        return f[key].contents()

    if get("tokenizer.ggml.model") != "gpt2":
        raise CheckpointError(f"{path}: tokenizer model {get('tokenizer.ggml.model')!r} is not supported "
                              "(only byte-level BPE, 'gpt2')")
    pre = f["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in f else "default"
    if pre not in GGUF_PRE:
        raise CheckpointError(f"{path}: pre-tokenizer {pre!r} is not supported; known: {sorted(GGUF_PRE)}")
    tokens, types = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.token_type")
    special = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)}  # control, user-defined
    return _byte_level_encoding(f"gguf:{Path(path).name}", tokens, get("tokenizer.ggml.merges"), special,
                                GGUF_PRE[pre], path, normalize="NFC" if pre in GGUF_NFC else None)


def _pattern_from_pre_tokenizer(pre: dict | None, where: str) -> str:
    steps = pre.get("pretokenizers", []) if pre and pre["type"] == "Sequence" else [pre] if pre else []
    kinds = [step["type"] for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return DIGITS_PATTERN
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) \
            and steps[0].get("behavior") == "Isolated" and "Regex" in steps[0].get("pattern", {}):
        return steps[0]["pattern"]["Regex"]
    raise CheckpointError(f"{where}: pre-tokenizer {kinds} is not supported (ByteLevel, Digits+ByteLevel, "
                          "Split+ByteLevel are)")


def encoding_from_tokenizer_json(path) -> tiktoken.Encoding:
    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        model = spec["model"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: not a readable tokenizer.json ({e})") from None
    normalizer = spec.get("normalizer")
    if model.get("type") != "BPE" or normalizer not in (None, {"type": "NFC"}):
        raise CheckpointError(f"{path}: only byte-level BPE tokenizers without a normalizer or with NFC (Qwen's) "
                              "are supported")
    vocab = model["vocab"]
    tokens = [None] * (max(vocab.values()) + 1)
    for tok, i in vocab.items():
        tokens[i] = tok
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    for t, i in special.items():
        if i >= len(tokens):
            tokens.extend([None] * (i + 1 - len(tokens)))
        tokens[i] = t
    if any(t is None for t in tokens):
        raise CheckpointError(f"{path}: vocabulary ids are not contiguous")
    pattern = _pattern_from_pre_tokenizer(spec.get("pre_tokenizer"), str(path))
    return _byte_level_encoding(f"hf:{path.parent.name}", tokens, model["merges"], special, pattern, str(path),
                                normalize="NFC" if normalizer else None)


def get_encoding(source: str | Path | None = None) -> tiktoken.Encoding:
    """The tokenizer for `source`: None or "gpt2" gives GPT-2's; otherwise any model source that
    `helpers.checkpoint.load_model` accepts (a GGUF file, a Hugging Face folder with
    tokenizer.json, "smollm2-135m", a GPT-2 hub id, or one of our checkpoints)."""
    if source is None or str(source) in ("gpt2", "r50k_base"):
        return gpt2_encoding()
    kind, where = resolve_tokenizer_source(source)
    if kind == "gpt2":
        return gpt2_encoding()
    if kind == "gguf":
        return encoding_from_gguf(where)
    return encoding_from_tokenizer_json(where)


def end_of_text(enc: tiktoken.Encoding) -> int:
    """The id that separates documents: <|endoftext|> (GPT-2, SmolLM, Qwen) or <|end_of_text|> (Llama 3)."""
    for name in DOCUMENT_SEPARATORS:
        if name in enc._special_tokens:
            return enc._special_tokens[name]
    raise CheckpointError(f"tokenizer {enc.name} has none of {', '.join(DOCUMENT_SEPARATORS)} to separate "
                          "documents; prepare the data with a tokenizer that has one, e.g. tokenizer='gpt2'")
