"""Every decoder tokenizer behind one interface, built offline from a model's own files.

Which library runs which tokenizer, and why:
- **tiktoken** where a vocabulary converts exactly (the fast path): GPT-2's, from the rank file
  shipped in `helpers/assets/` (hash checked), and a model's own byte-level BPE from a GGUF file's
  metadata or a `tokenizer.json`. tiktoken merges the adjacent pair whose joined bytes have the
  lowest rank, and a token's rank is its id; Hugging Face applies merges in list order. The two
  agree when ids grow with merge order, which `_byte_level_encoding` checks.
- **tokenizers** (Hugging Face's own library, the reference for the file format) for every other
  `tokenizer.json`: BPE with byte fallback, Unigram, Metaspace/Split/Digits pre-tokenizers,
  Prepend/Replace/NFC/NFKC normalizers (Llama 2, Mistral, Gemma, Phi-3, TinyLlama). Its ids are
  transformers' ids, because transformers runs the same file through the same library.
- **sentencepiece** for a folder with only a SentencePiece `tokenizer.model` (OpenLLaMA; the
  paper's lit-gpt code read it so) and for a GGUF file whose tokenizer is 'llama' (the
  SentencePiece model rebuilt from the metadata). transformers' conversion of a tokenizer.model to
  a fast tokenizer differs from SentencePiece on leading and repeated spaces, so it is not used.

Every encoding answers `encode_ordinary(text)`, `encode_ordinary_batch(texts)`,
`encode_to_numpy(text)`, `decode(ids)`, `n_vocab` and `name`; special-token strings inside a text
are encoded as text (tiktoken's `encode_ordinary`). `bos_id` is the BOS its settings put before
every text (None if none), and `document_framing` says how documents join into one token stream.
`hf_tokenizer` gives the same tokenizer in Hugging Face's form (for export and lm-eval).

Floor "text": reads tokenizer files through helpers.formats (sources, gguf), nothing above.
"""
from __future__ import annotations

import functools
import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from helpers.errors import CheckpointError
from helpers.formats.gguf import open_gguf
from helpers.formats.sources import resolve_tokenizer_source

GPT2_RANKS = Path(__file__).parent / "assets" / "gpt2.tiktoken"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
ENDOFTEXT = "<|endoftext|>"
DOCUMENT_SEPARATORS = (ENDOFTEXT, "<|end_of_text|>")  # special tokens that end a document, by preference
SUPPORTED = ("supported: 'gpt2', a Hugging Face tokenizer.json (any that the tokenizers library reads), "
             "a SentencePiece tokenizer.model, a GGUF file whose tokenizer is 'gpt2' or 'llama'")

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


# ---- tiktoken: GPT-2's, and byte-level BPEs whose ids follow merge order ---------------------
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


def copy_encoding(enc):
    """An independent copy of `enc` for one thread. Two threads encoding through one tiktoken
    Encoding contend inside its shared native core (measured: 1.78x on two cores instead of 2.0x
    with a copy per thread); a SentencePiece processor is copied too; a `tokenizers` tokenizer is
    shared (thread-safe, and it releases the GIL itself)."""
    if isinstance(enc, SentencePieceEncoding):
        return enc.copy()
    if not isinstance(enc, tiktoken.Encoding):
        return enc
    kw = dict(name=enc.name, pat_str=enc._pat_str, mergeable_ranks=enc._mergeable_ranks,
              special_tokens=enc._special_tokens)
    if isinstance(enc, ModelEncoding):
        copy = ModelEncoding(model_vocab=enc.model_vocab, normalize=enc.normalize, **kw)
    else:
        copy = tiktoken.Encoding(**kw)
    copy.bos_id = getattr(enc, "bos_id", None)
    return copy


class NotExact(CheckpointError):
    """A tokenizer that tiktoken cannot run exactly (a tokenizer.json then goes to `tokenizers`)."""


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
            raise NotExact(f"{where}: token {i} {tok!r} is not byte-level BPE; only GPT-2-style "
                           "byte-level tokenizers run on tiktoken") from None
    index = {t: i for i, t in enumerate(tokens)}
    last = -1
    for m in merges:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        i = index.get(a + b)
        if i is None or i <= last:
            raise NotExact(f"{where}: token ids do not follow merge order at merge {m!r}; "
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


# ---- tokenizers and sentencepiece: everything else -------------------------------------------
LONG_TEXT_CHARS = 1 << 18  # longer texts are encoded in pieces, where that gives the same ids
PIECES_PER_CALL = 8  # a library Encoding holds ~100 bytes a token: a few pieces at a time


def pieces_after_newlines(text: str, size: int) -> list[str]:
    """`text` cut after a newline about every `size` characters. Every piece but the first starts
    with the newline that ends the one before: encoded, it stands where the piece stood in the
    whole text, behind that newline, and its first tokens (the newline's) are dropped."""
    bounds, start = [0], 0
    while len(text) - start > size:
        cut = text.find("\n", start + size) + 1
        if cut in (0, len(text)):
            break
        bounds.append(cut)
        start = cut
    bounds.append(len(text))
    return [("\n" if a else "") + text[a:b] for a, b in zip(bounds, bounds[1:])]


class TokenizersEncoding:
    """A tokenizer.json run by Hugging Face's `tokenizers` library, with tiktoken's methods.

    Special-token strings in a text are encoded as text, as tiktoken's encode_ordinary does; added
    tokens that are not special (SentencePiece's user-defined pieces) stay whole, as transformers
    keeps them. One instance serves many threads: the library is thread-safe. A SentencePiece-style
    BPE sees a whole text as one word, which costs time and ~45 bytes a character at once (an 8 MB
    file: 350 MB); where no token can hold a newline with anything else (`newline_is_a_wall`), a
    long text is encoded in pieces cut after newlines, in parallel, with the same ids."""

    def __init__(self, tokenizer, name: str, bos_id: int | None = None, newline_wall: bool = False):
        tokenizer.no_padding()
        tokenizer.no_truncation()
        tokenizer.encode_special_tokens = True
        self.tokenizer, self.name, self.bos_id = tokenizer, name, bos_id
        self.n_vocab = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        self.special_tokens = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self.newline_tokens = len(self._encode_whole(["\n"])[0]) if newline_wall else None

    def _encode_whole(self, texts) -> list[list[int]]:
        # encode_batch_fast releases the GIL, where encode holds it (measured: a Python thread ran
        # 0.5% of its speed beside encode, 80% beside encode_batch_fast), so threads encode in parallel
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def _encode_parts(self, text: str):
        """Ids of `text`, as lists to concatenate: one, or one per piece of a long text (yielded a
        few at a time, so that a caller keeping arrays never holds them all as Python ints)."""
        if self.newline_tokens is None or len(text) <= LONG_TEXT_CHARS:
            yield from self._encode_whole([text])
            return
        pieces = pieces_after_newlines(text, LONG_TEXT_CHARS)
        for start in range(0, len(pieces), PIECES_PER_CALL):
            for n, ids in enumerate(self._encode_whole(pieces[start:start + PIECES_PER_CALL]), start):
                yield ids[self.newline_tokens:] if n else ids

    def encode_ordinary(self, text: str) -> list[int]:
        parts = list(self._encode_parts(text))
        return parts[0] if len(parts) == 1 else [i for part in parts for i in part]

    def encode_ordinary_batch(self, texts, num_threads: int | None = None) -> list[list[int]]:
        """All texts at once, in parallel on the library's own threads (num_threads: tiktoken's
        signature; the library sizes its pool itself)."""
        texts = list(texts)
        if self.newline_tokens is not None and any(len(t) > LONG_TEXT_CHARS for t in texts):
            return [self.encode_ordinary(t) for t in texts]
        return self._encode_whole(texts)

    def encode_to_numpy(self, text: str, disallowed_special=()) -> np.ndarray:
        return np.concatenate([np.array(part, dtype=np.uint32) for part in self._encode_parts(text)])

    def encode_to_numpy_batch(self, texts) -> list[np.ndarray]:
        """encode_to_numpy of each text; all but the long ones in one call, which the library
        spreads over every core (data preparation: one call per document would use only as many
        cores as it has threads)."""
        texts = list(texts)
        out = [None if self.newline_tokens is not None and len(t) > LONG_TEXT_CHARS else t for t in texts]
        short = [i for i, t in enumerate(out) if t is not None]
        for i, ids in zip(short, self._encode_whole([texts[i] for i in short])):
            out[i] = np.array(ids, dtype=np.uint32)
        return [self.encode_to_numpy(t) if ids is None else ids for t, ids in zip(texts, out)]

    def decode(self, ids) -> str:
        """Text of ids; ids past the vocabulary (rows of a padded embedding, 32,064 for 32,000
        tokens) have no text and are left out."""
        return self.tokenizer.decode([int(i) for i in ids if 0 <= i < self.n_vocab], skip_special_tokens=False)


class SentencePieceEncoding:
    """A SentencePiece model run by the `sentencepiece` package itself, with tiktoken's methods.
    Control pieces (<s>, </s>) are its special tokens; their strings in a text are encoded as text,
    as SentencePiece always does. Long texts are encoded in pieces where that gives the same ids,
    as in TokenizersEncoding (SentencePiece costs ~20 bytes a character at once)."""

    def __init__(self, processor, name: str, bos_id: int | None = None):
        self.processor, self.name, self.bos_id = processor, name, bos_id
        self.n_vocab = processor.get_piece_size()
        self.special_tokens = {processor.id_to_piece(i): i for i in range(self.n_vocab) if processor.is_control(i)}
        self.newline_tokens = len(processor.encode("\n")) if _sentencepiece_newline_is_a_wall(processor) else None

    def _encode_parts(self, text: str):
        if self.newline_tokens is None or len(text) <= LONG_TEXT_CHARS:
            yield self.processor.encode(text)
            return
        pieces = pieces_after_newlines(text, LONG_TEXT_CHARS)
        for start in range(0, len(pieces), PIECES_PER_CALL):
            for n, ids in enumerate(self.processor.encode(pieces[start:start + PIECES_PER_CALL]), start):
                yield ids[self.newline_tokens:] if n else ids

    def encode_ordinary(self, text: str) -> list[int]:
        parts = list(self._encode_parts(text))
        return parts[0] if len(parts) == 1 else [i for part in parts for i in part]

    def encode_ordinary_batch(self, texts, num_threads: int | None = None) -> list[list[int]]:
        texts = list(texts)
        if self.newline_tokens is not None and any(len(t) > LONG_TEXT_CHARS for t in texts):
            return [self.encode_ordinary(t) for t in texts]
        return self.processor.encode(texts, num_threads=num_threads or -1)

    def encode_to_numpy(self, text: str, disallowed_special=()) -> np.ndarray:
        return np.concatenate([np.array(part, dtype=np.uint32) for part in self._encode_parts(text)])

    def decode(self, ids) -> str:
        return self.processor.decode([int(i) for i in ids if 0 <= i < self.n_vocab])  # as TokenizersEncoding

    def copy(self) -> "SentencePieceEncoding":
        from sentencepiece import SentencePieceProcessor
        return SentencePieceEncoding(SentencePieceProcessor(model_proto=self.processor.serialized_model_proto()),
                                     self.name, self.bos_id)


# A newline is a wall when no token holds it with other characters: BPE never merges across it,
# so the text on either side encodes alone. These steps keep that (they act per character, or
# at the text's start, where every piece gets the same dummy prefix before its leading newline).
LOCAL_NORMALIZERS = {"Prepend", "NFC", "NFD", "NFKC", "NFKD", "Lowercase"}


def newline_is_a_wall(spec: dict) -> bool:
    """Whether a tokenizer.json encodes a text cut after newlines piece by piece to the same ids
    (see TokenizersEncoding): a BPE with no token holding a newline among other characters, no
    added token holding one, normalizers that act per character (Replace of plain strings too),
    no pre-tokenizer but Metaspace without splitting. Llama 2, Mistral and TinyLlama's are."""
    model = spec["model"]
    vocab = [*model.get("vocab", {}), *(a["content"] for a in spec.get("added_tokens", []))]
    if model.get("type") != "BPE" or model.get("dropout") or any("\n" in t and len(t) > 1 for t in vocab) \
            or not (model.get("byte_fallback") or "\n" in vocab):  # else unknown characters fuse across it
        return False

    def local(step) -> bool:
        if step is None:
            return True
        if step["type"] == "Sequence":
            return all(map(local, step.get("normalizers", step.get("pretokenizers", []))))
        if step["type"] == "Replace":
            pattern = step.get("pattern", {})
            return "String" in pattern and "\n" not in pattern["String"] + step.get("content", "")
        if step["type"] == "Metaspace":
            return not step.get("split", True)
        return step["type"] in LOCAL_NORMALIZERS

    return local(spec.get("normalizer")) and local(spec.get("pre_tokenizer"))


def _sentencepiece_newline_is_a_wall(processor) -> bool:
    """The same for a SentencePiece model: BPE, no piece holding a newline among other characters,
    a newline piece or byte fallback (unknown characters fuse), no normalization table, the dummy
    space in front (not behind) of words."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as spm_pb2
    except ImportError:  # protobuf is missing: encode long texts whole, which is always exact
        return False
    proto = spm_pb2.ModelProto()
    proto.ParseFromString(processor.serialized_model_proto())
    return proto.trainer_spec.model_type == spm_pb2.TrainerSpec.BPE and not proto.normalizer_spec.precompiled_charsmap \
        and not proto.trainer_spec.treat_whitespace_as_suffix \
        and not any("\n" in p.piece and len(p.piece) > 1 for p in proto.pieces) \
        and (proto.trainer_spec.byte_fallback or any(p.piece == "\n" for p in proto.pieces))


def special_tokens(enc) -> dict[str, int]:
    """{string: id} of an encoding's special tokens, whichever library runs it."""
    return enc._special_tokens if isinstance(enc, tiktoken.Encoding) else enc.special_tokens


# ---- reading a tokenizer's files -------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e}); {SUPPORTED}") from None


def _bos_id(folder: Path | None, token_id, default: int | None) -> int | None:
    """The id the tokenizer's settings put before every text, or None. tokenizer_config.json's
    add_bos_token decides where it is written, as in transformers; otherwise `default`, what the
    tokenizer itself says (its post-processor's template, SentencePiece's bos, GGUF's flag)."""
    path = folder / "tokenizer_config.json" if folder is not None else None
    config = _read_json(path) if path is not None and path.is_file() else {}
    if "add_bos_token" not in config:
        return default
    if not config["add_bos_token"]:
        return None
    name = config.get("bos_token")
    name = name.get("content") if isinstance(name, dict) else name
    found = token_id(name) if isinstance(name, str) else None
    return found if found is not None else default


def _template_bos(processor: dict | None) -> int | None:
    """The special token a tokenizer.json's post-processor puts first in a single text, if any
    (TemplateProcessing, alone or inside a Sequence as Llama 3 writes it)."""
    if not processor:
        return None
    if processor.get("type") == "Sequence":
        return next((i for p in processor.get("processors", []) if (i := _template_bos(p)) is not None), None)
    single = processor.get("single") or []
    if processor.get("type") == "TemplateProcessing" and single and "SpecialToken" in single[0]:
        name = single[0]["SpecialToken"]["id"]
        return processor.get("special_tokens", {}).get(name, {}).get("ids", [None])[0]
    return None


def encoding_from_gguf(path):
    """A GGUF file's tokenizer from its metadata: 'gpt2' (byte-level BPE) through tiktoken,
    'llama' (SentencePiece) through sentencepiece."""
    path = str(path)
    f = open_gguf(path).fields

    def get(key, default=KeyError):
        if key in f:
            return f[key].contents()
        if default is KeyError:
            raise CheckpointError(f"{path}: GGUF metadata has no {key}; cannot build its tokenizer")
        return default

    model = get("tokenizer.ggml.model")
    if model == "llama":
        return _sentencepiece_from_gguf(path, get)
    if model != "gpt2":
        raise CheckpointError(f"{path}: tokenizer model {model!r} is not supported; {SUPPORTED}")
    pre = get("tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE:
        raise CheckpointError(f"{path}: pre-tokenizer {pre!r} is not supported; known: {sorted(GGUF_PRE)}")
    tokens, types = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.token_type")
    special = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)}  # control, user-defined
    enc = _byte_level_encoding(f"gguf:{Path(path).name}", tokens, get("tokenizer.ggml.merges"), special,
                               GGUF_PRE[pre], path, normalize="NFC" if pre in GGUF_NFC else None)
    enc.bos_id = get("tokenizer.ggml.bos_token_id", None) if get("tokenizer.ggml.add_bos_token", False) else None
    return enc


def _sentencepiece_from_gguf(path: str, get) -> SentencePieceEncoding:
    """llama.cpp's 'llama' tokenizer is a SentencePiece BPE: pieces with scores and types (the
    same numbering as SentencePiece's), BOS/EOS/UNK ids, whether to prepend a space. Rebuilt here
    as the SentencePiece model it came from, minus what GGUF does not keep (a normalization
    table other than identity, unless the file carries it)."""
    from sentencepiece import SentencePieceProcessor
    try:
        from sentencepiece import sentencepiece_model_pb2 as spm_pb2
    except ImportError:
        raise CheckpointError(f"{path}: rebuilding its SentencePiece tokenizer needs protobuf: "
                              "pip install protobuf") from None

    tokens = get("tokenizer.ggml.tokens")
    scores = get("tokenizer.ggml.scores", [0.0] * len(tokens))
    types = get("tokenizer.ggml.token_type", [1] * len(tokens))
    proto = spm_pb2.ModelProto()
    for piece, score, kind in zip(tokens, scores, types):
        proto.pieces.add(piece=piece, score=float(score), type=kind if 1 <= kind <= 6 else 1)
    trainer = proto.trainer_spec
    trainer.model_type = spm_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = 6 in types
    trainer.unk_id = get("tokenizer.ggml.unknown_token_id", types.index(2) if 2 in types else 0)
    trainer.bos_id = get("tokenizer.ggml.bos_token_id", -1)
    trainer.eos_id = get("tokenizer.ggml.eos_token_id", -1)
    trainer.pad_id = get("tokenizer.ggml.padding_token_id", -1)
    for role in ("unk", "bos", "eos", "pad"):
        i = getattr(trainer, f"{role}_id")
        if 0 <= i < len(tokens):
            setattr(trainer, f"{role}_piece", tokens[i])
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(get("tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = bool(get("tokenizer.ggml.remove_extra_whitespaces", False))
    norm.escape_whitespaces = True
    charsmap = get("tokenizer.ggml.precompiled_charsmap", None)
    if charsmap is not None and len(charsmap):
        norm.precompiled_charsmap = bytes(bytearray(int(b) & 0xFF for b in charsmap))
    try:
        processor = SentencePieceProcessor(model_proto=proto.SerializeToString())
    except RuntimeError as e:
        raise CheckpointError(f"{path}: its 'llama' tokenizer metadata is not a valid SentencePiece model ({e}); "
                              f"{SUPPORTED}") from None
    add_bos = get("tokenizer.ggml.add_bos_token", True) and trainer.bos_id >= 0  # llama.cpp's default: add it
    return SentencePieceEncoding(processor, f"gguf:{Path(path).name}", trainer.bos_id if add_bos else None)


def encoding_from_sentencepiece(path) -> SentencePieceEncoding:
    """A SentencePiece tokenizer.model, run by sentencepiece; BOS as tokenizer_config.json's
    add_bos_token says, else as the model defines one (lit-gpt and transformers add it then)."""
    from sentencepiece import SentencePieceProcessor

    path = Path(path)
    try:
        processor = SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: sentencepiece cannot read this file ({str(e).splitlines()[0]}); "
                              f"{SUPPORTED}") from None

    def token_id(name):
        i = processor.piece_to_id(name)
        return i if processor.id_to_piece(i) == name else None

    bos = processor.bos_id()
    return SentencePieceEncoding(processor, f"spm:{path.parent.name}",
                                 _bos_id(path.parent, token_id, bos if bos >= 0 else None))


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
    raise NotExact(f"{where}: pre-tokenizer {kinds} has no tiktoken pattern here (ByteLevel, Digits+ByteLevel, "
                   "Split+ByteLevel have)")


def _tiktoken_from_spec(path: Path, spec: dict) -> tiktoken.Encoding:
    """A tokenizer.json as a tiktoken Encoding, or NotExact saying why it cannot be one."""
    model = spec["model"]
    normalizer = spec.get("normalizer")
    if model.get("type") != "BPE" or normalizer not in (None, {"type": "NFC"}) or model.get("byte_fallback") \
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("dropout"):
        raise NotExact(f"{path}: only byte-level BPE without a normalizer or with NFC (Qwen's) runs on tiktoken")
    added = spec.get("added_tokens", [])
    if any(not t.get("special") for t in added):
        raise NotExact(f"{path}: added tokens that are not special are matched in text, which tiktoken does not do")
    vocab = model["vocab"]
    tokens = [None] * (max(vocab.values()) + 1)
    for tok, i in vocab.items():
        tokens[i] = tok
    special = {t["content"]: t["id"] for t in added}
    for t, i in special.items():
        if i >= len(tokens):
            tokens.extend([None] * (i + 1 - len(tokens)))
        tokens[i] = t
    if any(t is None for t in tokens):
        raise NotExact(f"{path}: vocabulary ids are not contiguous")
    pattern = _pattern_from_pre_tokenizer(spec.get("pre_tokenizer"), str(path))
    return _byte_level_encoding(f"hf:{path.parent.name}", tokens, model["merges"], special, pattern, str(path),
                                normalize="NFC" if normalizer else None)


def encoding_from_tokenizer_json(path):
    """A tokenizer.json: through tiktoken where it converts exactly, else through `tokenizers`."""
    path = Path(path)
    spec = _read_json(path)
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise CheckpointError(f"{path}: not a tokenizer.json (no model); {SUPPORTED}")
    try:
        enc = _tiktoken_from_spec(path, spec)
    except (NotExact, KeyError, TypeError, ValueError):
        enc = None
    if enc is not None:
        ids = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        enc.bos_id = _bos_id(path.parent, ids.get, _template_bos(spec.get("post_processor")))
        return enc
    try:
        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_str(json.dumps(spec))
    except Exception as e:  # the library's own message says what it could not parse
        raise CheckpointError(f"{path}: neither tiktoken nor the tokenizers library reads this tokenizer "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); {SUPPORTED}") from None
    return TokenizersEncoding(tokenizer, f"hf:{path.parent.name}",
                              _bos_id(path.parent, tokenizer.token_to_id, _template_bos(spec.get("post_processor"))),
                              newline_wall=newline_is_a_wall(spec))


def _tokenizer_source(source) -> tuple[str, Path | None]:
    """(kind, file) as helpers.formats.sources.resolve_tokenizer_source gives it, also for a
    tokenizer's own folder (no config.json) and a tokenizer.json or tokenizer.model file."""
    path = Path(str(source)).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        found = [path / n for n in ("tokenizer.json", "tokenizer.model") if (path / n).is_file()]
        path = found[0] if found else path
    if path.is_file() and path.name.endswith("tokenizer.json"):
        return "json", path.absolute()
    if path.is_file() and path.suffix == ".model":
        return "spm", path.absolute()
    return resolve_tokenizer_source(source)


def get_encoding(source: str | Path | None = None):
    """The tokenizer for `source`: None or "gpt2" gives GPT-2's; otherwise any model source that
    `helpers.checkpoint.load_model` accepts (a GGUF file, a Hugging Face folder with tokenizer.json
    or tokenizer.model, "smollm2-135m", a GPT-2 hub id, or one of our checkpoints), a tokenizer's
    own folder (no config.json), or a tokenizer.json / tokenizer.model file."""
    if source is None or str(source) in ("gpt2", "r50k_base"):
        return gpt2_encoding()
    kind, where = _tokenizer_source(source)
    if kind == "gpt2":
        return gpt2_encoding()
    if kind == "gguf":
        return encoding_from_gguf(where)
    if kind == "spm":
        return encoding_from_sentencepiece(where)
    return encoding_from_tokenizer_json(where)


# ---- documents in one token stream -----------------------------------------------------------
@dataclass(frozen=True)
class Framing:
    """How documents join into one stream of tokens, as the tokenizer's family was trained:
    `token` before every document ("bos": Llama 2, OpenLLaMA, Mistral, Gemma) or after it ("eot":
    GPT-2, SmolLM2, Qwen, Llama 3)."""
    kind: str
    token: int

    def meta(self) -> dict:
        """meta.json's record of it: {"framing": kind, "bos": id or None, "eot": id or None}."""
        return {"framing": self.kind, "bos": self.token if self.kind == "bos" else None,
                "eot": self.token if self.kind == "eot" else None}


def document_framing(enc) -> Framing:
    """End-of-text between documents where the vocabulary has one of DOCUMENT_SEPARATORS (even
    if its settings also add a BOS: Llama 3); else the BOS its settings add (add_bos_token, the
    post-processor's template, SentencePiece's bos); else one CheckpointError."""
    special = special_tokens(enc)
    for name in DOCUMENT_SEPARATORS:
        if name in special:
            return Framing("eot", special[name])
    if getattr(enc, "bos_id", None) is not None:
        return Framing("bos", enc.bos_id)
    raise CheckpointError(f"tokenizer {enc.name} has none of {', '.join(DOCUMENT_SEPARATORS)} to separate "
                          "documents and adds no BOS token (add_bos_token in tokenizer_config.json, a post-processor "
                          "template); prepare the data with a tokenizer that has one, e.g. tokenizer='gpt2'")


def end_of_text(enc) -> int:
    """The id that separates documents: <|endoftext|> (GPT-2, SmolLM, Qwen) or <|end_of_text|> (Llama 3)."""
    special = special_tokens(enc)
    for name in DOCUMENT_SEPARATORS:
        if name in special:
            return special[name]
    raise CheckpointError(f"tokenizer {enc.name} has none of {', '.join(DOCUMENT_SEPARATORS)} to separate "
                          "documents; prepare the data with a tokenizer that has one, e.g. tokenizer='gpt2'")


def encode_prompt(enc, text: str) -> list[int]:
    """A prompt's ids as documents began in training: after the BOS where the family puts one."""
    try:
        framing = document_framing(enc)
    except CheckpointError:
        framing = None
    return ([framing.token] if framing and framing.kind == "bos" else []) + enc.encode_ordinary(text)


# ---- the same tokenizers in Hugging Face's form (export_hf, lm-eval) -------------------------
def sentencepiece_as_tokenizers(enc: SentencePieceEncoding):
    """A `tokenizers` pipeline that encodes like the SentencePiece model itself, in the shape of
    Llama 2's own tokenizer.json: the model's normalization (its table, extra-space removal, the
    dummy "▁" prefix, spaces as "▁") as normalizers, no pre-tokenizer, BPE merges ranked by piece
    score (or its Unigram pieces), byte fallback, control pieces as special tokens. transformers'
    own conversion (Metaspace) differs from SentencePiece on leading and repeated spaces."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    proto = spm_pb2.ModelProto()
    proto.ParseFromString(enc.processor.serialized_model_proto())
    trainer, norm, pieces = proto.trainer_spec, proto.normalizer_spec, proto.pieces
    unk = trainer.unk_id if 0 <= trainer.unk_id < len(pieces) else None
    if trainer.model_type == spm_pb2.TrainerSpec.UNIGRAM:
        model = models.Unigram([(p.piece, p.score) for p in pieces], unk_id=unk, byte_fallback=trainer.byte_fallback)
    else:
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        score = {p.piece: p.score for p in pieces if p.type == spm_pb2.ModelProto.SentencePiece.NORMAL}
        # SentencePiece joins the adjacent pair whose joined piece scores highest; BPE applies the first merge
        ranked = sorted((-score[piece], vocab[piece], piece[:k], piece[k:]) for piece in score
                        for k in range(1, len(piece)) if piece[:k] in score and piece[k:] in score)
        model = models.BPE(vocab, [(a, b) for _, _, a, b in ranked], fuse_unk=True, byte_fallback=trainer.byte_fallback,
                           unk_token=pieces[unk].piece if unk is not None else None)
    tokenizer = Tokenizer(model)
    steps = [normalizers.Precompiled(norm.precompiled_charsmap)] if norm.precompiled_charsmap else []
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           *([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else [])])
    tokenizer.add_tokens([AddedToken(p.piece, normalized=False, special=False) for p in pieces
                          if p.type == spm_pb2.ModelProto.SentencePiece.USER_DEFINED])
    tokenizer.add_special_tokens([AddedToken(p.piece, normalized=False, special=True) for p in pieces
                                  if p.type == spm_pb2.ModelProto.SentencePiece.CONTROL])
    return tokenizer


def _sentencepiece_as_transformers(enc: SentencePieceEncoding):
    """sentencepiece_as_tokenizers in transformers' generic fast class (its Llama class would
    rebuild the pipeline as Metaspace), adding the BOS where `enc` frames documents with it."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tokenizer, p = sentencepiece_as_tokenizers(enc), enc.processor
    roles = {f"{role}_token": p.id_to_piece(i) for role, i in (("bos", p.bos_id()), ("eos", p.eos_id()),
                                                               ("unk", p.unk_id()), ("pad", p.pad_id())) if i >= 0}
    if enc.bos_id is not None:
        bos = p.id_to_piece(enc.bos_id)
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                                 special_tokens=[(bos, enc.bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, clean_up_tokenization_spaces=False, **roles)


def hf_tokenizer(source: str | None):
    """The tokenizer a model's provenance names (`source`) as a Hugging Face tokenizer, built
    offline: GPT-2's from the embedded rank file, a GGUF file's from its metadata, a folder's from
    its tokenizer.json (a model folder or a tokenizer's own), a SentencePiece model (a
    tokenizer.model, a GGUF 'llama' tokenizer) as `sentencepiece_as_tokenizers` builds it. Names
    such as "smollm2-135m" or a checkpoint of ours resolve as get_encoding resolves them; None (no
    tokenizer recorded) means GPT-2's, as for nanoGPT's and the student project's checkpoints."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    source = source or "gpt2"
    source = "gpt2" if source == "r50k_base" else source  # tiktoken's name for GPT-2's ranks
    kind, where = _tokenizer_source(source)
    if kind == "json":  # a model folder or a tokenizer's own
        return AutoTokenizer.from_pretrained(str(where.parent))
    if kind == "gpt2":
        from transformers.convert_slow_tokenizer import TikTokenConverter
        tok = TikTokenConverter(vocab_file=str(GPT2_RANKS), pattern=GPT2_PATTERN, extra_special_tokens=[ENDOFTEXT])
        return PreTrainedTokenizerFast(tokenizer_object=tok.converted(), bos_token=ENDOFTEXT, eos_token=ENDOFTEXT)
    enc = encoding_from_sentencepiece(where) if kind == "spm" else encoding_from_gguf(where)
    if isinstance(enc, SentencePieceEncoding):  # a tokenizer.model, or a GGUF file's 'llama' tokenizer
        return _sentencepiece_as_transformers(enc)
    return AutoTokenizer.from_pretrained(str(where.parent), gguf_file=where.name)
