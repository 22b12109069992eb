"""The attention-collapse diagnostic reads the attention the model really computes."""
import pytest
import torch

from conftest import tokens
from helpers.checkpoint import load_model
from helpers.evaluate import attention_collapse, attention_maps


@pytest.fixture(params=["gpt2", "llama", "qwen3", "mistral"])
def model(request, hf_gpt2, hf_llama, tmp_path):
    if request.param in ("qwen3", "mistral"):  # per-head q/k norms; a sliding window of 7 (< 20 tokens)
        from test_families import make_hf
        make_hf(request.param, tmp_path, tie=False)
        return load_model(tmp_path)
    return load_model((hf_gpt2 if request.param == "gpt2" else hf_llama)[1]).eval()


def test_attention_maps_reproduce_each_layers_attention_output(model):
    idx = tokens(n=1, t=20)
    maps = attention_maps(model, idx)
    cfg, t = model.config, model.transformer
    assert len(maps) == cfg.n_layer and maps[0].shape == (cfg.n_head, 20, 20)
    x, rope = model.embed(idx)
    with torch.no_grad():
        for a, block in zip(maps, t.h):
            assert torch.allclose(a.sum(-1), torch.ones(cfg.n_head, 20), atol=1e-5)
            assert (a.triu(1) == 0).all()  # causal
            _, _, v = block.attn.heads(block.ln_1(x), rope)
            v = v.repeat_interleave(cfg.n_head // cfg.n_kv_head, dim=1)[0]  # (nh, T, hd)
            y = (a @ v).transpose(0, 1).reshape(1, 20, cfg.n_head * cfg.head_dim)
            assert torch.allclose(block.attn.c_proj(y), block.attn(block.ln_1(x), rope), atol=1e-5)
            x = block(x, rope)


def test_attention_collapse_table(model):
    df = attention_collapse(model, tokens(n=1, t=16))
    assert len(df) == model.config.n_layer * model.config.n_head
    assert df["rank90"].between(1, 16).all() and df["max_column_share"].between(0, 1).all()
    assert (df["degenerate"] == (df["max_column_share"] > 0.5)).all()
    assert (df.groupby("layer")["degenerate"].all() == df.groupby("layer")["lazy"].first()).all()
