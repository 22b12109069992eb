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


@pytest.mark.parametrize("chunk, vocab_chunk, scale", [(1, 2048, 1.0), (7, 64, 1.0), (64, 7, 1.0), (64, 300, 1.0),
                                                      (None, 64, 40.0)])
def test_loss_only_head_equals_cross_entropy(chunk, vocab_chunk, scale):
    """Every chunking gives F.cross_entropy's sum; logits in the hundreds (scale) do not overflow
    the in-place log-sum-exp."""
    import torch.nn.functional as F

    from helpers.head_loss import Workspace, cross_entropy_sum
    torch.manual_seed(0)
    x, w = torch.randn(50, 16) * scale, torch.randn(300, 16)
    t = torch.randint(0, 300, (50,))
    t[[3, 17, 49]] = -1
    total, n = cross_entropy_sum(x, w, t, Workspace(), token_chunk=chunk, vocab_chunk=vocab_chunk)
    want = F.cross_entropy(x @ w.T, t, ignore_index=-1, reduction="sum").item()
    assert n == 47 and total.item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(IndexError, match="300"):
        cross_entropy_sum(x, w, torch.full((50,), 300))


def test_loss_only_head_of_bfloat16_weights_sums_in_float32():
    """bfloat16 on the CPU: the head's product in bfloat16 (as the model's own head), the log-sum-exp
    in float32, not block by block in bfloat16."""
    import torch.nn.functional as F

    from helpers.head_loss import cross_entropy_sum
    torch.manual_seed(0)
    x, w, t = torch.randn(64, 16).bfloat16(), torch.randn(5000, 16).bfloat16(), torch.randint(0, 5000, (64,))
    total, n = cross_entropy_sum(x, w, t, vocab_chunk=512)
    want = F.cross_entropy((x @ w.T).float(), t, reduction="sum").item()
    assert n == 64 and total.dtype == torch.float32 and total.item() == pytest.approx(want, rel=1e-6)


def test_whole_split_val_loss_keeps_no_logits(model, monkeypatch):
    """val_loss_full equals the loss of the full logits over the whole split (a last window padded
    with ignored targets included), without calling the head module and with a buffer of one chunk."""
    import numpy as np
    import torch.nn.functional as F

    from helpers import measures
    from helpers.data import iter_sequential
    data = np.random.default_rng(0).integers(0, 1000, 203).astype(np.uint16)
    monkeypatch.setattr(measures, "open_split", lambda data_dir, split: data)
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in iter_sequential(data, 16, 4):
            total += F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum").item()
            count += int((y >= 0).sum())

    def no_logits(*_):
        raise AssertionError("the (tokens, vocab) logits were computed")
    model.lm_head.register_forward_hook(no_logits)
    res = measures.val_loss_full(model, "unused", block_size=16, batch_size=4)
    assert res["val_tokens"] == count == 202 and res["val_loss"] == pytest.approx(total / count, rel=1e-5)
    assert model._workspace.buf.numel() <= 2 ** 26  # one chunk of logits, never the whole split's


def test_training_evaluation_is_the_plain_loss(model):
    """estimate_loss (the loss-only path) gives the mean of model(x, y)'s plain loss on the same batches."""
    from contextlib import nullcontext

    import numpy as np

    from helpers.data import get_batch
    from helpers.train import TrainConfig, estimate_loss
    cfg = TrainConfig(batch_size=3, block_size=16, eval_iters=2, seed=5)
    split = np.random.default_rng(1).integers(0, 1000, 500).astype(np.uint16)
    got = estimate_loss(model, {"val": split}, cfg, 4, "cpu", nullcontext())["val"]
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 4 * 2 + 1)
    with torch.no_grad():
        want = [model(*get_batch(split, 16, 3, g))[1].item() for _ in range(2)]
    assert got == pytest.approx(sum(want) / 2, rel=1e-5)
