"""Tiny random models in every format we load, built inside the tests: nothing is downloaded.
SentencePiece tokenizers are trained here too (the sentencepiece package) and written in the shapes
Llama 2, Mistral and Gemma ship them."""
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from test_tokenizer import MULTILINGUAL, corpus

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

GPT2_KW = dict(n_layer=3, n_head=4, n_embd=96, vocab_size=1000, n_positions=64)
LLAMA_KW = dict(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                intermediate_size=96, vocab_size=1000, max_position_embeddings=64, rope_theta=50000.0,
                rms_norm_eps=1e-5)


def make_hf_gpt2(path, safe=True, **kw):
    import transformers
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(**{**GPT2_KW, **kw})
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(path, safe_serialization=safe)
    return model


def make_hf_llama(path, tie=False, **kw):
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{**LLAMA_KW, **kw}, tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(cfg).eval()
    perturb_norms(model)
    model.save_pretrained(path)
    return model


def perturb_norms(model, biases: bool = False) -> None:
    """Random init leaves norm weights at 1 (0 for Gemma's 1 + w) and biases at 0, where a weight
    loaded into the wrong place or not at all changes nothing: nudge them so that it shows."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or (biases and n.endswith("bias")):
                p.add_(0.1 * torch.randn_like(p))


# ---- SentencePiece tokenizers, trained here --------------------------------------------------
def train_spm(prefix: Path, model_type: str, **kw) -> Path:
    """A SentencePiece model in Llama 2's settings (byte fallback, digits split, no
    normalization, spaces kept) trained on the standard library's code and many scripts."""
    import sentencepiece as spm
    text = prefix.parent / "spm_corpus.txt"
    if not text.is_file():
        lines = [line for t in corpus(40) for line in t.splitlines() if line.strip()]
        text.write_text("\n".join(lines * 1 + MULTILINGUAL * 20), encoding="utf-8")
    settings = dict(input=str(text), model_prefix=str(prefix), vocab_size=800, model_type=model_type,
                    byte_fallback=True, character_coverage=0.9995, normalization_rule_name="identity",
                    remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
                    num_threads=1, minloglevel=2, input_sentence_size=20000, shuffle_input_sentence=False)
    spm.SentencePieceTrainer.train(**{**settings, **kw})
    return prefix.with_suffix(".model")


def train_gemma_spm(prefix: Path) -> Path:
    """Gemma's SentencePiece settings: no dummy prefix; <pad> 0, <eos> 1, <bos> 2, <unk> 3."""
    return train_spm(prefix, "bpe", add_dummy_prefix=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                     pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>")


def transformers_folder(folder: Path, model_file: Path, bos="<s>", eos="</s>") -> Path:
    """transformers' own conversion of a tokenizer.model (AutoTokenizer on a folder holding only
    it), saved as tokenizer.json + tokenizer_config.json: BPE, byte fallback, Metaspace. The
    config names LlamaTokenizer, as Mistral's and Llama 2's do."""
    from transformers import AutoTokenizer
    staging = folder.parent / f"{folder.name}_model_only"
    staging.mkdir()
    shutil.copy(model_file, staging / "tokenizer.model")
    (staging / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "bos_token": bos, "eos_token": eos,
         "unk_token": "<unk>"}))
    AutoTokenizer.from_pretrained(str(staging)).save_pretrained(str(folder))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


def generic_folder(folder: Path, tokenizer_json: dict, bos: str, **config) -> Path:
    """A folder whose tokenizer_config names the generic fast tokenizer (unless `config` names
    another class): transformers runs the file as written (its Llama and Gemma classes rebuild the
    pipeline from the vocabulary)."""
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "bos_token": bos, **config}))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


def llama2_spec(converted: Path) -> dict:
    """Llama 2's tokenizer.json as Meta ships it, from transformers' conversion of the same model:
    the legacy normalizer (prepend "▁", spaces to "▁"), no pre-tokenizer."""
    spec = json.loads((converted / "tokenizer.json").read_text())
    return {**spec, "normalizer": {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None}


def gemma_spec(converted: Path) -> dict:
    """Gemma's shape, from transformers' conversion of a Gemma-style model: normalizer Replace(" ", "▁"),
    no pre-tokenizer, and the decoder turning "▁" back into spaces."""
    spec = json.loads((converted / "tokenizer.json").read_text())
    space_to_mark = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    mark_to_space = {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}
    return {**spec, "normalizer": space_to_mark, "pre_tokenizer": None, "decoder": {
        "type": "Sequence", "decoders": [mark_to_space, {"type": "ByteFallback"}, {"type": "Fuse"}]}}


@pytest.fixture(scope="session")
def spm_tokenizers(tmp_path_factory):
    """Tokenizer folders as the families ship them (800 tokens each), built once per session:
    `llama2` (Meta's tokenizer.json, tokenizer_config naming LlamaTokenizer: Llama 2, OpenLLaMA's
    converted form), `mistral` (transformers' conversion: Metaspace, LlamaTokenizer), `gemma`
    (Gemma's shape, GemmaTokenizer, <bos> = 2), and `bpe` / `gemma_model`, the tokenizer.model files."""
    root = tmp_path_factory.mktemp("spm_tokenizers")
    f = types.SimpleNamespace(root=root, bpe=train_spm(root / "bpe", "bpe"), gemma_model=train_gemma_spm(root / "gemma"))
    f.mistral = transformers_folder(root / "mistral", f.bpe)
    f.llama2 = generic_folder(root / "llama2", llama2_spec(f.mistral), "<s>", eos_token="</s>", unk_token="<unk>",
                              tokenizer_class="LlamaTokenizer")
    f.gemma = generic_folder(root / "gemma_tokenizer", gemma_spec(transformers_folder(root / "gemma_converted",
                                                                                        f.gemma_model, "<bos>", "<eos>")),
                             "<bos>", eos_token="<eos>", pad_token="<pad>", tokenizer_class="GemmaTokenizer")
    return f


def with_tokenizer(model_folder: Path, tokenizer_folder: Path) -> Path:
    """A model folder given a tokenizer folder's files (its config.json stays the model's)."""
    for file in tokenizer_folder.iterdir():
        if file.is_file() and file.name != "config.json":
            shutil.copy(file, model_folder / file.name)
    return model_folder


def make_hf_family(path: Path, arch: str, tokenizer_folder: Path, **kw):
    """A tiny random transformers model of config class `arch` (LlamaConfig, MistralConfig,
    Gemma2Config, ...) with 800 tokens, saved with the tokenizer folder's files."""
    import transformers
    torch.manual_seed(0)
    base = dict(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                intermediate_size=96, vocab_size=800, max_position_embeddings=128, tie_word_embeddings=False)
    cfg = getattr(transformers, arch)(**{**base, **kw})
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    perturb_norms(model)
    model.save_pretrained(path)
    return with_tokenizer(Path(path), tokenizer_folder)


@pytest.fixture(scope="session")
def hf_gpt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_gpt2")
    return make_hf_gpt2(path), path


@pytest.fixture(scope="session")
def hf_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_llama")
    return make_hf_llama(path), path


def tokens(n=2, t=24, vocab=1000, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t), generator=g)


@pytest.fixture(scope="session")
def train_inputs(tmp_path_factory):
    """A tiny GPT-2-vocabulary parent saved as our checkpoint (parent.pt) and a small prepared corpus
    (data/), shared by the training, parallel and notebook tests."""
    from helpers.checkpoint import save_checkpoint
    from helpers.data import prepare
    from helpers.model import GPT, GPTConfig
    base = tmp_path_factory.mktemp("train_inputs")
    torch.manual_seed(0)
    parent = GPT(GPTConfig(n_layer=4, n_head=2, n_embd=32, vocab_size=50257, block_size=64))
    parent.provenance = {"tokenizer": "gpt2", "source": "tiny"}
    save_checkpoint(base / "parent.pt", parent)
    prepare("stdlib", base / "data", max_docs=40, val_fraction=0.2, progress=False)
    return base


def run_cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "helpers.train", *args], cwd=Path(__file__).resolve().parent.parent, **kw)


def cli_args(setup, out, **kw):
    cfg = dict(parent=str(setup / "parent.pt"), n_layers=2, data_dir=str(setup / "data"), out_dir=str(out),
               max_iters=40, batch_size=2, block_size=32, eval_interval=2, eval_iters=2, log_interval=1,
               dropout=0.1, progress=False)
    cfg.update(kw)
    return [f"{k}={v}" for k, v in cfg.items()]


@pytest.fixture(scope="session")
def reference_run(train_inputs, tmp_path_factory):
    """cli_args' 40-step command-line run in float32, uninterrupted: what every stopped and resumed
    float32 run of those arguments must log (the SIGKILL, SIGTERM and bfloat16 tests share it)."""
    out = tmp_path_factory.mktemp("reference") / "full"
    assert run_cli(cli_args(train_inputs, out)).wait() == 0
    return out


@pytest.fixture(scope="session")
def spm_llama(tmp_path_factory, spm_tokenizers):
    """A tiny Llama folder (4 layers) with Llama 2's SentencePiece tokenizer.json: the OpenLLaMA /
    Llama 2 case."""
    return make_hf_family(tmp_path_factory.mktemp("spm_llama") / "llama", "LlamaConfig", spm_tokenizers.llama2)


@pytest.fixture(scope="session")
def plain_run(tmp_path_factory, spm_llama):
    """`python -m helpers.pipeline --preset smoke parent=<folder> tokenizer=<folder> layers=0,1,3` at a
    tiny budget, the parent a tiny Llama with Llama 2's SentencePiece tokenizer: the plain comparison
    (child against scratch, the untrained child evaluated too) with the README's explicit layers."""
    from helpers.pipeline import run
    out = tmp_path_factory.mktemp("plain") / "run"
    return run("smoke", out, {"parent": str(spm_llama), "tokenizer": str(spm_llama), "layers": "0,1,3",
                              "max_iters": 4, "eval_interval": 2}), out


@pytest.fixture(scope="session")
def compare_run(tmp_path_factory):
    """The smoke preset comparing four arms on one budget, with the comparison table."""
    from helpers.pipeline import run
    out = tmp_path_factory.mktemp("compare") / "run"
    return run("smoke", out, {"compare": "child,angular,scratch,scratch+kd", "calib_batches": 2}), out
