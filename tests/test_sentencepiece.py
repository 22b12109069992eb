"""SentencePiece-family tokenizers (Llama 2, OpenLLaMA, Mistral, Gemma, TinyLlama), trained here
with the sentencepiece package and converted by transformers: nothing is downloaded.

Each folder's ids are checked against transformers' (AutoTokenizer on the same folder,
add_special_tokens=False) and, where the file is a SentencePiece model's faithful conversion,
against SentencePieceProcessor itself, on a stress text."""
import json
import shutil
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import gemma_spec, generic_folder, llama2_spec, train_gemma_spm, train_spm, transformers_folder
from helpers.errors import CheckpointError, DataError
from helpers.tokenizer import (Framing, SentencePieceEncoding, TokenizersEncoding, copy_encoding, document_framing,
                               encode_prompt, get_encoding)
from test_tokenizer import MULTILINGUAL, corpus

spm = pytest.importorskip("sentencepiece")

STRESS = [
    "Hello world",
    " leading space",
    "   three leading spaces, then  two   and    four",
    "\ttab first\t\ttwo tabs\n\n\nthree newlines\r\n  \n",
    "digits 0 12 345 6789 1234567890123 3.14159e-10 x1y22z333",
    "def f(a,  b):\n    return {'k': [a + b, 0x1F]}  # comment\n\n\nclass A:\n\tpass\n",
    "Emoji 🙂🚀👩‍💻 flags 🇩🇪 and ∑∫√∞ ≠ ≤ ≥",
    "Only byte fallback: \U00050000 \U000E0001 𓀀 ꙮ \x04 \x7f",
    "trailing spaces   ",
    "",
    *MULTILINGUAL,
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """Every tokenizer folder of this module, built once."""
    from transformers.convert_slow_tokenizer import LlamaConverter
    root = tmp_path_factory.mktemp("spm")
    bpe, unigram = train_spm(root / "bpe", "bpe"), train_spm(root / "unigram", "unigram")
    gemma = train_gemma_spm(root / "gemma")
    f = types.SimpleNamespace(root=root, bpe=bpe, unigram=unigram)
    f.converted = transformers_folder(root / "converted", bpe)
    # Llama 2's tokenizer.json as Meta ships it: the legacy normalizer, no pre-tokenizer
    f.llama2 = generic_folder(root / "llama2", llama2_spec(f.converted), "<s>", eos_token="</s>", unk_token="<unk>")
    # a SentencePiece Unigram through transformers' Llama converter
    sp = spm.SentencePieceProcessor(model_file=str(unigram))
    slow = types.SimpleNamespace(vocab_file=str(unigram), legacy=True, add_prefix_space=True,
                                 convert_ids_to_tokens=sp.id_to_piece)
    f.unigram_json = generic_folder(root / "unigram_json", json.loads(LlamaConverter(slow).converted().to_str()),
                                    "<s>", eos_token="</s>", unk_token="<unk>")
    # Gemma's shape: no dummy prefix, normalizer Replace(" ", "▁"), no pre-tokenizer, <bos> = 2
    converted = transformers_folder(root / "gemma_converted", gemma, "<bos>", "<eos>")
    f.gemma = generic_folder(root / "gemma", gemma_spec(converted), "<bos>", eos_token="<eos>", pad_token="<pad>")
    # OpenLLaMA's shape: tokenizer.model and its config only
    f.model_only = root / "model_only"
    f.model_only.mkdir()
    shutil.copy(bpe, f.model_only / "tokenizer.model")
    (f.model_only / "config.json").write_text('{"model_type": "llama"}')
    return f


def auto_ids(folder, texts):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(folder))
    return [hf(t, add_special_tokens=False)["input_ids"] for t in texts], hf


@pytest.mark.parametrize("name", ["converted", "llama2", "unigram_json", "gemma"])
def test_tokenizer_json_ids_and_text_equal_transformers(tok, name):
    folder = getattr(tok, name)
    enc = get_encoding(folder)
    assert isinstance(enc, TokenizersEncoding) and enc.name == f"hf:{name}"
    texts = STRESS + corpus(30)
    expected, hf = auto_ids(folder, texts)
    assert [enc.encode_ordinary(t) for t in texts] == expected
    assert enc.encode_ordinary_batch(texts) == expected
    assert [enc.encode_to_numpy(t).tolist() for t in texts] == expected  # data preparation's path
    assert [enc.decode(ids) for ids in expected] == [hf.decode(ids) for ids in expected]
    assert enc.n_vocab == 800
    if name == "unigram_json":
        assert enc.tokenizer.model.__class__.__name__ == "Unigram"


def test_llama2s_shipped_file_encodes_like_sentencepiece_and_decodes_back(tok):
    """Meta's form of the file (legacy normalizer) is SentencePiece's tokenization exactly."""
    sp = spm.SentencePieceProcessor(model_file=str(tok.bpe))
    enc = get_encoding(tok.llama2)
    texts = STRESS + corpus(30)
    assert [enc.encode_ordinary(t) for t in texts] == [sp.encode(t) for t in texts]
    assert [enc.decode(enc.encode_ordinary(t)) for t in STRESS] == STRESS


def test_transformers_llama_class_differs_only_on_a_leading_space(tok, tmp_path):
    """Llama 2's real tokenizer_config names LlamaTokenizer. transformers 5 rebuilds that class's
    pipeline (Metaspace, prepend 'always') instead of running the file, and then drops
    SentencePiece's dummy prefix before a text that starts with a space; 4.x ran the file. We run
    the file, which is SentencePiece's tokenization (the test above): any difference is there."""
    from transformers import AutoTokenizer
    folder = tmp_path / "llama2_class"
    shutil.copytree(tok.llama2, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "LlamaTokenizer"}))
    hf, enc = AutoTokenizer.from_pretrained(str(folder)), get_encoding(folder)
    differ = [t for t in STRESS + corpus(30) if hf(t, add_special_tokens=False)["input_ids"] != enc.encode_ordinary(t)]
    assert all(t.startswith(" ") for t in differ)


def test_model_only_folder_is_sentencepiece_itself(tok):
    sp = spm.SentencePieceProcessor(model_file=str(tok.bpe))
    texts = STRESS + corpus(30)
    for source in (tok.model_only, tok.model_only / "tokenizer.model"):
        enc = get_encoding(source)
        assert isinstance(enc, SentencePieceEncoding) and enc.n_vocab == 800
        assert [enc.encode_ordinary(t) for t in texts] == [sp.encode(t) for t in texts]
        assert enc.encode_ordinary_batch(texts) == [sp.encode(t) for t in texts]
        assert [enc.decode(sp.encode(t)) for t in STRESS] == [sp.decode(sp.encode(t)) for t in STRESS] == STRESS
        assert document_framing(enc) == Framing("bos", 1)
    copy = copy_encoding(enc)
    assert copy is not enc and copy.encode_ordinary(STRESS[5]) == enc.encode_ordinary(STRESS[5])


def write_llama_gguf(path: Path, model_file: Path, add_bos: bool = True) -> Path:
    """A GGUF file holding only a SentencePiece tokenizer, written as llama.cpp's converter does."""
    import gguf
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    n = sp.get_piece_size()
    kinds = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types(kinds)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(add_bos)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


def test_gguf_llama_tokenizer_encodes_like_the_same_sentencepiece_model(tok, tmp_path):
    pytest.importorskip("gguf")
    sp = spm.SentencePieceProcessor(model_file=str(tok.bpe))
    enc = get_encoding(write_llama_gguf(tmp_path / "t.gguf", tok.bpe))
    texts = STRESS + corpus(30)
    assert [enc.encode_ordinary(t) for t in texts] == [sp.encode(t) for t in texts]
    assert [enc.decode(sp.encode(t)) for t in STRESS] == STRESS
    assert enc.name == "gguf:t.gguf" and document_framing(enc) == Framing("bos", 1)
    no_bos = get_encoding(write_llama_gguf(tmp_path / "no_bos.gguf", tok.bpe, add_bos=False))
    with pytest.raises(CheckpointError, match="no_bos.gguf has none of .* adds no BOS"):
        document_framing(no_bos)


def test_framing_follows_each_familys_settings(tok, tmp_path):
    from test_tokenizer import train_bpe
    assert document_framing(get_encoding("gpt2")) == Framing("eot", 50256)
    for folder, bos in ((tok.converted, 1), (tok.llama2, 1), (tok.gemma, 2), (tok.unigram_json, 1)):
        enc = get_encoding(folder)
        assert document_framing(enc) == Framing("bos", bos), folder
        assert encode_prompt(enc, "def f():") == [bos] + enc.encode_ordinary("def f():")
    assert encode_prompt(get_encoding("gpt2"), "Hello world") == [15496, 995]
    # Llama 3: its template adds <|begin_of_text|>, but documents end with <|end_of_text|>
    llama3 = tmp_path / "llama3"
    tk = train_bpe(llama3, MULTILINGUAL, 300, ["<|begin_of_text|>", "<|end_of_text|>"])
    from tokenizers import processors
    tk.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                      special_tokens=[("<|begin_of_text|>", 0)])
    tk.save(str(llama3 / "tokenizer.json"))
    assert document_framing(get_encoding(llama3)) == Framing("eot", 1)
    # add_bos_token=false in tokenizer_config.json overrules the template; then nothing frames documents
    off = tmp_path / "off"
    shutil.copytree(tok.converted, off)
    (off / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "bos_token": "<s>"}))
    with pytest.raises(CheckpointError, match="none of <\\|endoftext\\|>.*adds no BOS"):
        document_framing(get_encoding(off))


def test_prepared_documents_start_with_bos(tok, tmp_path):
    from helpers.data import open_split, prepare
    docs = tmp_path / "docs"
    docs.mkdir()
    texts = {f"d{i}.txt": f"{STRESS[i % 9]} #{i}" for i in range(30)}
    for name, text in texts.items():
        (docs / name).write_text(text, encoding="utf-8")
    meta = prepare(str(docs), tmp_path / "data", tokenizer=str(tok.llama2), val_fraction=0.3, progress=False,
                   num_threads=2)
    assert meta["tokenizer"]["framing"] == "bos" and meta["tokenizer"]["bos"] == 1 and meta["tokenizer"]["eot"] is None
    assert meta["split"]["method"] == "hash"
    enc = get_encoding(tok.llama2)
    tokens = np.concatenate([open_split(tmp_path / "data", s) for s in ("train", "val")])
    assert (tokens == 1).sum() == len(texts)
    expected = sorted([1, *enc.encode_ordinary(t)] for t in texts.values())
    starts = np.flatnonzero(tokens == 1).tolist() + [len(tokens)]
    assert sorted(tokens[a:b].tolist() for a, b in zip(starts, starts[1:])) == expected
    from helpers.data import document_lengths
    lengths = np.concatenate([document_lengths(tmp_path / "data", s) for s in ("train", "val")])
    assert sorted(lengths.tolist()) == sorted(len(ids) for ids in expected)


@pytest.mark.parametrize("kind", ["bpe", "unigram", "gguf"])
def test_a_sentencepiece_model_exports_to_transformers_encoding_like_sentencepiece(tok, tmp_path, kind):
    """hf_tokenizer (what export_hf and lm-eval use) of a tokenizer.model or a GGUF 'llama'
    tokenizer, saved and loaded back by AutoTokenizer: SentencePiece's ids, BOS first with special
    tokens, SentencePiece's text back."""
    from transformers import AutoTokenizer
    from helpers.tokenizer import hf_tokenizer
    model_file = tok.unigram if kind == "unigram" else tok.bpe
    if kind == "gguf":
        pytest.importorskip("gguf")
        source = write_llama_gguf(tmp_path / "t.gguf", model_file)
    else:
        source = tmp_path / "tokenizer_only"
        source.mkdir()
        shutil.copy(model_file, source / "tokenizer.model")
    hf_tokenizer(str(source)).save_pretrained(str(tmp_path / "export"))
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    texts = STRESS + corpus(30)
    ours, theirs = [hf(t, add_special_tokens=False)["input_ids"] for t in texts], [sp.encode(t) for t in texts]
    if kind == "unigram":  # Viterbi ties (segmentations of equal score) break differently: same score, same text
        score = lambda ids: round(sum(sp.get_score(i) for i in ids), 2)  # noqa: E731
        assert [score(a) for a in ours] == [score(b) for b in theirs]
        assert [sp.decode(a) for a in ours] == [sp.decode(b) for b in theirs]
        assert sum(a != b for a, b in zip(ours, theirs)) <= len(texts) // 10
    else:
        assert ours == theirs
    assert hf("def f():")["input_ids"] == [1] + sp.encode("def f():")
    assert [hf.decode(sp.encode(t)) for t in STRESS] == [sp.decode(sp.encode(t)) for t in STRESS]


def test_padded_vocabulary_fits_and_a_larger_tokenizer_is_refused(tok, tmp_path):
    from helpers.model import GPT, GPTConfig
    from helpers.startup import check_data_fits_model
    meta = {"tokenizer": {"name": "hf:llama2", "n_vocab": 800}}
    for rows in (800, 864):  # embedding rows padded past the tokenizer (Phi-3: 32,000 in 32,064)
        model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=rows))
        model.provenance = {"tokenizer": str(tok.llama2)}
        check_data_fits_model(meta, model, tmp_path)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=512))
    model.provenance = {"tokenizer": str(tok.llama2)}
    with pytest.raises(DataError, match="hf:llama2 \\(800 ids\\).*512"):
        check_data_fits_model(meta, model, tmp_path)


def test_a_tokenizer_no_library_reads_is_one_error_naming_it(tok, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text(json.dumps({"model": {"type": "Mystery", "vocab": {}}}))
    with pytest.raises(CheckpointError, match="bad/tokenizer.json: neither tiktoken nor the tokenizers library.*"
                                              "supported: 'gpt2', a Hugging Face tokenizer.json"):
        get_encoding(bad)
    (bad / "tokenizer.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="bad/tokenizer.json: not readable JSON.*supported"):
        get_encoding(bad)
    (bad / "tokenizer.json").unlink()
    (bad / "tokenizer.model").write_bytes(b"\x00not a sentencepiece model" * 10)
    with pytest.raises(CheckpointError, match="bad/tokenizer.model: sentencepiece cannot read this file.*supported"):
        get_encoding(bad)
    pytest.importorskip("gguf")
    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    w.add_tokenizer_model("bert")
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(CheckpointError, match="bert.gguf: tokenizer model 'bert' is not supported; supported"):
        get_encoding(tmp_path / "bert.gguf")


def test_continuation_prompts_start_with_bos_where_documents_did(tok):
    import torch
    from helpers.evaluate import continuations

    class Echo:  # stands in for a model: records the prompt, "generates" 300 and a padding row's id
        def generate(self, ids, n, **kw):
            self.prompt = ids[0].tolist()
            return torch.cat([ids, torch.tensor([[300, 50300][:n]])], dim=1)

    for source, first in ((tok.llama2, [1]), ("gpt2", [])):
        enc, model = get_encoding(source), Echo()
        table = continuations({"m": model}, enc, ["def f():"], max_new_tokens=2)
        assert model.prompt == first + enc.encode_ordinary("def f():")
        assert table.loc[0, "greedy"] == table.loc[0, "sampled"] == enc.decode([300])
    # a padded embedding (864 rows for 800 tokens) can generate ids past the vocabulary: no text
    for source in (tok.llama2, tok.model_only):
        enc = get_encoding(source)
        assert enc.decode([300, 850, 863, 300]) == enc.decode([300, 300])


def long_texts():
    """Texts of many documents joined by newlines: leading and trailing spaces around newlines,
    runs of newlines, code, many scripts."""
    docs = STRESS + corpus(12)
    return ["\n".join(docs), "\n\n".join(reversed(docs)), "   \n  ".join(docs[::2]) + "  \n\n", "x" * 500 + "\n" * 7]


@pytest.mark.parametrize("name", ["llama2", "converted", "unigram_json", "model_only", "spaces_collapsed", "gguf"])
def test_long_texts_encode_in_pieces_to_the_same_ids(tok, tmp_path, monkeypatch, name):
    """Cut after newlines about every 200 characters (instead of 256 K), encoded piece by piece:
    the ids of the whole text, for every tokenizer where a newline is a wall, and the whole text
    encoded at once for the others (Unigram)."""
    import helpers.tokenizer as tokenizer
    if name == "spaces_collapsed":  # OpenLLaMA v1's setting: runs of spaces collapse to one
        source = tmp_path / "collapsed"
        source.mkdir()
        shutil.copy(train_spm(tok.root / "collapsed", "bpe", remove_extra_whitespaces=True), source / "tokenizer.model")
    elif name == "gguf":
        pytest.importorskip("gguf")
        source = write_llama_gguf(tmp_path / "t.gguf", tok.bpe)
    else:
        source = getattr(tok, name)
    enc = get_encoding(source)
    assert (enc.newline_tokens is None) == (name == "unigram_json")
    texts = long_texts()
    whole = [enc.processor.encode(t) if isinstance(enc, SentencePieceEncoding)  # each library, at once
             else enc.tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    monkeypatch.setattr(tokenizer, "LONG_TEXT_CHARS", 200)
    monkeypatch.setattr(tokenizer, "PIECES_PER_CALL", 3)
    assert all(len(tokenizer.pieces_after_newlines(t, 200)) > 2 for t in texts[:3])
    assert [enc.encode_ordinary(t) for t in texts] == whole
    assert [enc.encode_to_numpy(t).tolist() for t in texts] == whole
    assert enc.encode_ordinary_batch(texts) == whole
    if isinstance(enc, TokenizersEncoding):  # data preparation's call: short and long texts together
        mixed = texts + ["short one", " and another\n"]
        expected = whole + [enc.encode_ordinary(t) for t in mixed[-2:]]
        assert [a.tolist() for a in enc.encode_to_numpy_batch(mixed)] == expected


def test_a_newline_inside_a_token_is_no_wall(tok):
    from helpers.tokenizer import newline_is_a_wall
    spec = json.loads((tok.llama2 / "tokenizer.json").read_text())
    assert newline_is_a_wall(spec)
    assert not newline_is_a_wall({**spec, "model": {**spec["model"], "vocab": {**spec["model"]["vocab"], "\n\n": 800}}})
    assert not newline_is_a_wall({**spec, "normalizer": {"type": "Strip", "left": False, "right": True}})
    assert not newline_is_a_wall({**spec, "pre_tokenizer": {"type": "ByteLevel"}})
