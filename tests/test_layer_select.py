"""Layer scores and the strategies that read them, checked against direct computations on tiny
random parents (GPT-2 and Llama), and the two copy modes."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tokens
from helpers.checkpoint import load_model
from helpers.inherit import hidden_states, inherit, layer_scores, select_layers, truncated_forward


@pytest.fixture(params=["gpt2", "llama"])
def parent(request, hf_gpt2, hf_llama):
    return load_model((hf_gpt2 if request.param == "gpt2" else hf_llama)[1])


def test_scores_equal_direct_computations(parent):
    idx = tokens(n=3, t=20)
    sc = layer_scores(parent, idx, n_layers=2)
    assert list(sc.index) == [0, 1, 2] and list(sc.columns) == ["block_influence", "angular_distance",
                                                                 "attention_rank", "early_exit_loss"]
    with torch.no_grad():
        h = hidden_states(parent, idx)
        for i in range(3):
            cos = F.cosine_similarity(h[i], h[i + 1], dim=-1).mean().item()
            assert sc.loc[i, "block_influence"] == pytest.approx(1 - cos, abs=1e-5)
            logits = truncated_forward(parent, idx, list(range(i + 1)))[:, :-1]
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), idx[:, 1:].reshape(-1)).item()
            assert sc.loc[i, "early_exit_loss"] == pytest.approx(loss, rel=1e-5)
        # window of k = 3 - 2 = 1 block: fits at 0, 1, 2
        for i in range(3):
            cos = F.cosine_similarity(h[i][:, -1], h[i + 1][:, -1], dim=-1).clamp(-1, 1)
            assert sc.loc[i, "angular_distance"] == pytest.approx((torch.arccos(cos) / math.pi).mean().item(), abs=1e-5)
    assert sc["attention_rank"].between(1, 20).all()


def test_angular_window_that_does_not_fit_is_nan(parent):
    sc = layer_scores(parent, tokens(n=2, t=16), n_layers=1)  # k = 2: windows start at 0 or 1
    assert sc["angular_distance"].notna().tolist() == [True, True, False]
    assert layer_scores(parent, tokens(n=2, t=16), n_layers=3)["angular_distance"].isna().all()


def test_strategies_pick_the_documented_blocks(parent):
    idx = tokens(n=2, t=16)
    assert select_layers(parent, 2)[0] == [0, 1]
    assert select_layers(parent, 2, strategy="first+last")[0] == [0, 2]
    assert select_layers(parent, 1, strategy="first+last")[0] == [2]
    sc = layer_scores(parent, idx, 2)
    kept, used = select_layers(parent, 2, strategy="block-influence", tokens=idx)
    assert kept == sorted(sc["block_influence"].sort_values(ascending=False).index[:2].tolist())
    assert used is not None
    kept, _ = select_layers(parent, 2, strategy="angular", tokens=idx)
    dropped = int(sc["angular_distance"].idxmin())
    assert kept == [i for i in range(3) if i != dropped]


def test_scored_child_is_the_parent_without_the_dropped_blocks(parent):
    idx = tokens(n=2, t=16)
    child = inherit(parent, 2, strategy="angular", tokens=idx)
    kept = child.provenance["layers"]
    assert len(kept) == 2 and kept == sorted(kept)
    with torch.no_grad():
        assert torch.allclose(child(idx)[0], truncated_forward(parent, idx, kept), atol=1e-5)
    sel = child.provenance["selection"]
    assert sel["strategy"] == "angular" and len(sel["scores"]["angular_distance"]) == 3


def test_scored_strategy_without_tokens_and_bad_names(parent):
    with pytest.raises(ValueError, match="calibration tokens"):
        inherit(parent, 2, strategy="angular")
    with pytest.raises(ValueError, match="strategy='middle'"):
        inherit(parent, 2, strategy="middle")
    with pytest.raises(ValueError, match="copy='some'"):
        inherit(parent, 2, copy="some")
    with pytest.raises(ValueError, match="not both"):
        inherit(parent, 2, layers=[0, 1], strategy="angular")


def test_copy_paper_leaves_position_table_and_final_norm_fresh(parent):
    with torch.no_grad():
        parent.transformer.ln_f.weight.add_(0.5)  # so that a fresh norm (ones) differs from the parent's
    child = inherit(parent, 2, copy="paper")
    psd = parent.state_dict()
    tied = parent.config.tie_embeddings  # GPT-2: the head is the embedding; the Llama here has its own
    for key, value in child.state_dict().items():
        if key.startswith(("transformer.wpe.", "transformer.ln_f.")):
            continue
        if key.startswith("transformer.wte.") and not tied:  # lit-gpt copied lm_head, not wte
            assert not torch.equal(value, psd[key]) and value.std().item() == pytest.approx(0.02, rel=0.2)
            continue
        assert torch.equal(value, psd[key]), key
    assert torch.equal(child.lm_head.weight, parent.lm_head.weight)
    norm = child.transformer.ln_f.weight
    assert torch.equal(norm, torch.ones_like(norm))
    if "wpe" in child.transformer:
        assert not torch.equal(child.transformer.wpe.weight, psd["transformer.wpe.weight"])
        assert child.transformer.wpe.weight.std().item() == pytest.approx(0.02, rel=0.2)
    everything = inherit(parent, 2)  # copy="all" keeps them
    assert torch.equal(everything.transformer.ln_f.weight, parent.transformer.ln_f.weight)
    assert child.provenance["selection"]["copy"] == "paper"


def test_cheap_scores_equal_the_full_ones(parent):
    idx = tokens(n=2, t=16)
    full, cheap = layer_scores(parent, idx, 2), layer_scores(parent, idx, 2, full=False)
    assert list(cheap.columns) == ["block_influence", "angular_distance"]
    assert full[cheap.columns].equals(cheap)
