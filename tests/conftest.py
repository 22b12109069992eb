"""Tiny random models in every format we load, built inside the tests: nothing is downloaded."""
import os

import pytest
import torch

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
