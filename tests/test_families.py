"""Qwen2, Qwen3 and Mistral as native families: logits, inherit, export, KV cache and GGUF against
tiny random transformers models built here (non-default sizes, GQA, tied and untied heads)."""
import pytest
import torch

from conftest import perturb_norms, tokens
from helpers.checkpoint import export_hf, load_model
from helpers.inherit import inherit, truncated_forward

BASE = dict(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=64, intermediate_size=96,
            vocab_size=1000, max_position_embeddings=64, rope_theta=50000.0, rms_norm_eps=1e-5)
FAMILIES = {  # model_type -> (config class, extra settings that make the family's feature matter)
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 24}),  # wider heads than hidden_size / heads, as Qwen3 has
    "mistral": ("MistralConfig", {"sliding_window": 7}),  # shorter than the test inputs
}
CASES = [(f, tie) for f in FAMILIES for tie in (False, True)]


def make_hf(family, path, tie):
    import transformers
    cls_name, extra = FAMILIES[family]
    torch.manual_seed(0)
    cfg = getattr(transformers, cls_name)(**BASE, **extra, tie_word_embeddings=tie)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    perturb_norms(model, biases=True)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{'tied' if t else 'untied'}" for f, t in CASES])
def pair(request, tmp_path_factory):
    family, tie = request.param
    path = tmp_path_factory.mktemp(family)
    return make_hf(family, path, tie), load_model(path), path


def test_logits_equal_transformers(pair):
    ref, ours, _ = pair
    idx = tokens(t=24)
    with torch.no_grad():
        assert torch.allclose(ours(idx)[0], ref(idx).logits, atol=1e-4)
    assert ours.config.family == ref.config.model_type


def test_inherit_equals_the_truncated_parent(pair):
    _, parent, _ = pair
    child = inherit(parent, 2, layers=[2, 0])
    idx = tokens(t=24)
    with torch.no_grad():
        assert torch.allclose(child(idx)[0], truncated_forward(parent, idx, [2, 0]), atol=1e-5)
    assert child.config.family == parent.config.family


def test_export_round_trips_to_the_familys_own_class(pair, tmp_path):
    import transformers
    ref, ours, _ = pair
    child = inherit(ours, 2)
    export_hf(child, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(back) is type(ref)
    idx = tokens(t=24)
    with torch.no_grad():
        assert torch.allclose(back(idx).logits, child(idx)[0], atol=1e-5)
    assert torch.allclose(load_model(tmp_path / "export")(idx)[0], child(idx)[0], atol=1e-6)


def test_kv_cache_greedy_equals_no_cache_and_transformers(pair):
    ref, ours, _ = pair
    idx = tokens(n=2, t=5)
    cached = ours.generate(idx, 9, temperature=0, use_cache=True)  # 14 positions: twice Mistral's window of 7
    assert torch.equal(cached, ours.generate(idx, 9, temperature=0, use_cache=False))
    assert torch.equal(cached, ref.generate(idx, max_new_tokens=9, do_sample=False, pad_token_id=0))


def test_use_sliding_window_in_qwen_loads_through_the_generic_path(tmp_path):
    """Qwen2 with windows in some layers only is not native: transformers' own class runs it."""
    import json
    import transformers
    from helpers.generic import HFCausalLM
    make_hf("qwen2", tmp_path, tie=False)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "use_sliding_window": True, "sliding_window": 8,
                                                      "max_window_layers": 1, "layer_types": None}))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ours = load_model(tmp_path)
    assert isinstance(ours, HFCausalLM) and "use_sliding_window=true" in ours.provenance["note"]
    idx = tokens(t=24)
    with torch.no_grad():
        assert torch.equal(ours(idx)[0], ref(idx).logits)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_gguf_equals_the_hf_folder(family, tmp_path):
    pytest.importorskip("gguf")
    from test_llama_gguf import assert_gguf_equals_hf_folder
    make_hf(family, tmp_path / "hf", tie=False)
    assert_gguf_equals_hf_folder(tmp_path / "hf", tmp_path)
