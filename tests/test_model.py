import pytest
import torch
import torch.nn.functional as F

from conftest import tokens
from helpers.checkpoint import load_model
from helpers.errors import ConfigError
from helpers.model import GPT, GPTConfig, KVCache, llama_config


def test_gpt2_logits_equal_transformers(hf_gpt2):
    ref, path = hf_gpt2
    ours = load_model(path)
    idx = tokens()
    with torch.no_grad():
        expected = ref(idx).logits
    got, _ = ours(idx)
    assert ours.config.n_layer == 3 and ours.config.vocab_size == 1000
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


def test_gpt2_greedy_generation_equals_transformers(hf_gpt2):
    ref, path = hf_gpt2
    ours = load_model(path)
    idx = tokens(n=1, t=5)
    expected = ref.generate(idx, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(idx, 12, temperature=0), expected)


def test_kv_cache_gives_identical_greedy_output():
    for cfg in (GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=50, block_size=16),
                llama_config(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, vocab_size=50, block_size=16)):
        torch.manual_seed(0)
        m = GPT(cfg)
        idx = tokens(n=2, t=4, vocab=50)
        # 20 new tokens run past block_size=16, exercising the fallback to the cropped window
        assert torch.equal(m.generate(idx, 20, temperature=0, use_cache=True),
                           m.generate(idx, 20, temperature=0, use_cache=False))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kv_cache_chunks_after_a_prefix_equal_one_full_forward(family):
    """A multi-token chunk at position > 0 (issue 10 item 7): each of its tokens sees the cached
    prefix and the chunk's earlier tokens, never later ones."""
    kw = dict(n_layer=2, n_head=4, n_embd=32, vocab_size=50, block_size=32)
    cfg = GPTConfig(**kw) if family == "gpt2" else llama_config(**kw, n_kv_head=2)
    torch.manual_seed(0)
    m = GPT(cfg).eval()
    idx = tokens(n=2, t=20, vocab=50)
    cache = KVCache(cfg, 2, "cpu", torch.float32)
    with torch.no_grad():
        full = m(idx)[0]
        chunks = [m(idx[:, a:b], cache=cache)[0] for a, b in ((0, 5), (5, 6), (6, 13), (13, 20))]
    assert torch.allclose(torch.cat(chunks, dim=1), full, atol=1e-5)


def test_sampling_top_k_and_top_p_restrict_the_choice():
    from helpers.model import sample_next
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert picks == {0, 1}
    # probabilities ~ [0.72, 0.26, 0.013, ...]: top_p=0.5 keeps only the first
    picks = {sample_next(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(100)}
    assert picks == {0}
    assert sample_next(logits, 0.0).item() == 0


def test_param_count_and_flops():
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=50, block_size=16)
    m = GPT(cfg)
    per_block = 2 * (2 * 32) + (32 * 96 + 96) + (32 * 32 + 32) + (32 * 128 + 128) + (128 * 32 + 32)
    expected = 50 * 32 + 16 * 32 + 2 * per_block + 2 * 32
    assert m.num_params() == expected
    assert m.num_params(non_embedding=True) == expected - 50 * 32 - 16 * 32
    assert m.flops_per_token(16) == 6 * (m.num_params(True) + 50 * 32) + 12 * 2 * 32 * 16


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="n_head"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="norm"):
        GPTConfig(norm="batchnorm")
    with pytest.raises(ConfigError, match="n_layer, n_head and n_kv_head must be at least 1"):
        GPTConfig(n_head=0)
    with pytest.raises(ConfigError, match="n_layer, n_head and n_kv_head must be at least 1"):
        GPTConfig(n_kv_head=0)


@pytest.mark.parametrize("tie", [False, True])
def test_llama_logits_equal_transformers(tmp_path, tie):
    from conftest import make_hf_llama
    ref = make_hf_llama(tmp_path, tie=tie)
    ours = load_model(tmp_path)
    assert ours.config.n_kv_head == 2 and ours.config.n_head == 4  # grouped-query attention
    assert ours.config.tie_embeddings == tie
    assert (ours.lm_head.weight is ours.transformer.wte.weight) == tie
    idx = tokens()
    with torch.no_grad():
        expected = ref(idx).logits
    got, _ = ours(idx)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert torch.equal(ours.generate(idx[:1, :5], 10, temperature=0),
                       ref.generate(idx[:1, :5], max_new_tokens=10, do_sample=False, pad_token_id=0))


@pytest.mark.parametrize("token_chunk,vocab_chunk", [(5, 7), (4096, 2048)])
def test_fused_head_loss_equals_cross_entropy_in_value_and_gradients(token_chunk, vocab_chunk):
    from helpers.head_loss import LinearCrossEntropy, Workspace
    space = Workspace()
    torch.manual_seed(0)
    x0, w0 = torch.randn(23, 16), torch.randn(50, 16)
    targets = torch.randint(0, 50, (23,))
    targets[[0, 7, 22]] = -1  # ignored positions count neither in the loss nor in the mean
    grads = []
    for fused in (False, True):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = (LinearCrossEntropy.apply(x, w, targets, space, token_chunk, vocab_chunk) if fused
                else F.cross_entropy(x @ w.t(), targets, ignore_index=-1))
        (3.0 * loss).backward()  # the upstream gradient scales both gradients
        grads.append((loss.detach(), x.grad, w.grad))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    frozen = w0.clone()  # a frozen head: only x gets a gradient
    x = x0.clone().requires_grad_()
    LinearCrossEntropy.apply(x, frozen, targets, space, token_chunk, vocab_chunk).backward()
    assert frozen.grad is None and torch.allclose(x.grad, grads[0][1] / 3, atol=1e-6)


def test_training_loss_uses_the_fused_head_and_matches_the_plain_one():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=97, block_size=16))
    idx = torch.randint(0, 97, (3, 16))
    logits, fused = model(idx, idx)
    assert logits is None  # training on the CPU: no (tokens, vocab) logits were built
    fused.backward()
    g_fused = model.lm_head.weight.grad.clone()
    model.zero_grad()
    model.fused_loss = False
    logits, plain = model(idx, idx)
    assert logits is not None and torch.allclose(fused, plain, atol=1e-6)
    plain.backward()
    assert torch.allclose(g_fused, model.lm_head.weight.grad, atol=1e-6)


def test_fused_head_loss_rejects_out_of_range_targets_like_cross_entropy():
    from helpers.head_loss import linear_cross_entropy
    x, w = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    for bad in (10, -2):
        with pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
            linear_cross_entropy(x, w, torch.tensor([1, bad, 2, -1]))


@pytest.mark.parametrize("qk_norm", [False, True])
def test_no_grad_in_place_paths_equal_the_training_ops(qk_norm):
    """Without autograd on the CPU, RMSNorm, RoPE and SwiGLU take fewer-pass in-place paths
    (helpers.model.in_place_ok): same logits as the plain ops, and no input or weight is changed."""
    from helpers.inherit import hidden_states
    from helpers.model import RMSNorm, apply_rope, in_place_ok
    torch.manual_seed(0)
    model = GPT(llama_config(n_layer=3, n_embd=64, n_head=4, n_kv_head=2, vocab_size=97, block_size=32, qk_norm=qk_norm))
    for p in model.parameters():  # norms away from their all-ones init, so their weights count
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = torch.randint(0, 97, (2, 32))
    assert not in_place_ok(torch.zeros(1))  # grad enabled
    plain = model(idx)[0].detach()  # grad enabled: the plain ops
    plain_states = [s.detach() for s in hidden_states.__wrapped__(model, idx)]  # (undecorated: with grad)
    with torch.no_grad():
        assert in_place_ok(torch.zeros(1)) and not in_place_ok(torch.zeros(1, dtype=torch.bfloat16))
        fast = model(idx)[0]
        states = hidden_states(model, idx)  # each block's input is the previous one's output, kept
    assert torch.allclose(fast, plain, atol=1e-5), (fast - plain).abs().max()
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(states, plain_states))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    x, cos, sin = torch.randn(2, 4, 8, 16), torch.randn(8, 16), torch.randn(8, 16)
    norm = RMSNorm(16, eps=1e-6)
    norm.weight.data.uniform_(0.5, 1.5)
    with torch.no_grad():
        got = apply_rope(x, cos, sin), norm(x)
    want = apply_rope(x.requires_grad_(), cos, sin), norm(x)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-6)
