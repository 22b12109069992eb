import pytest
import torch

from conftest import tokens
from helpers.checkpoint import load_model
from helpers.inherit import inherit, param_report, truncated_forward


@pytest.fixture(params=["gpt2", "llama"])
def parent(request, hf_gpt2, hf_llama):
    return load_model((hf_gpt2 if request.param == "gpt2" else hf_llama)[1])


@pytest.mark.parametrize("n", [1, 2, 3])
def test_child_equals_truncated_parent(parent, n):
    child = inherit(parent, n)
    idx = tokens()
    with torch.no_grad():
        assert torch.allclose(child(idx)[0], truncated_forward(parent, idx, list(range(n))), atol=1e-5)
    assert child.config.n_layer == n


def test_explicit_layer_list(parent):
    child = inherit(parent, 2, layers=[2, 0])
    idx = tokens()
    with torch.no_grad():
        assert torch.allclose(child(idx)[0], truncated_forward(parent, idx, [2, 0]), atol=1e-5)


def test_training_the_child_never_changes_the_parent(parent):
    before = {k: v.clone() for k, v in parent.state_dict().items()}
    child = inherit(parent, 2)
    child.train()
    opt = torch.optim.AdamW(child.parameters(), lr=1e-2)
    idx = tokens()
    for _ in range(2):
        _, loss = child(idx, idx)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert any(not torch.equal(child.state_dict()[k], before[k]) for k in child.state_dict())
    for k, v in parent.state_dict().items():
        assert torch.equal(v, before[k]), f"parent tensor {k} changed"
    parent_ptrs = {p.data_ptr() for p in parent.parameters()}
    assert not parent_ptrs & {p.data_ptr() for p in child.parameters()}


def test_head_tying_follows_the_parent(parent):
    child = inherit(parent, 1)
    tied = child.lm_head.weight is child.transformer.wte.weight
    assert tied == parent.config.tie_embeddings


def test_param_report(parent):
    child = inherit(parent, 1)
    r = param_report(parent, child)
    assert r["parent_params"] == parent.num_params() and r["child_params"] == child.num_params()
    assert 0 < r["kept_pct"] < 100 and r["child_layers"] == 1


@pytest.mark.parametrize("bad", [0, 4, -1, 2.5, True])
def test_n_layers_out_of_range(parent, bad):
    with pytest.raises(ValueError, match=r"1\.\.3"):
        inherit(parent, bad)


@pytest.mark.parametrize("layers", [[], [0, 0], [3], [-1]])
def test_bad_layer_lists(parent, layers):
    with pytest.raises(ValueError, match=r"0\.\.2"):
        inherit(parent, 1, layers=layers)
