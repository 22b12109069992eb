"""bfloat16 on the CPU (issue 21): mixed precision under torch.autocast with float32 master weights.
The fused heads in bfloat16 equal the unfused bfloat16 computation; losses and gradients of tiny
native and generic models stay close to float32; evaluation sums in float32; a killed bfloat16 run
resumes bit-identically; a CPU without native bfloat16 is refused by name."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_hf_llama, tokens
from helpers import measures
from helpers.config import TrainConfig
from helpers.errors import ConfigError
from helpers.head_loss import (Distill, LinearCrossEntropy, LinearDistillation, Workspace, cross_entropy_sum,
                               distillation_loss)
from helpers.model import GPT, GPTConfig, llama_config
from helpers.startup import resolve_device
from test_train import cli_args, losses, run_cli, run_killed_and_resumed, setup  # noqa: F401 (setup is a fixture)

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)
NATIVE = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()


def close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    """Equal within rel of b's largest magnitude (bfloat16 keeps 8 bits: ~0.4% per rounding)."""
    return (a.float() - b.float()).abs().max().item() <= rel * b.float().abs().max().item()


def tiny(family: str) -> GPT:
    torch.manual_seed(0)
    kw = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=500, block_size=32)
    model = GPT(GPTConfig(**kw) if family == "gpt2" else llama_config(n_kv_head=2, **kw))
    for p in model.parameters():  # norms away from their all-ones init, so that their gradients count
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    return model


def head_inputs(seed=0, n=37, width=24, vocab=300):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(n, width, generator=g), torch.randn(vocab, width, generator=g) * 0.5
    t = torch.randint(0, vocab, (n,), generator=g)
    t[[0, 9, 36]] = -1  # ignored positions count neither in the loss nor in the mean
    return x, w, t


@pytest.mark.parametrize("token_chunk,vocab_chunk", [(5, 7), (4096, 64), (4096, 2048)])
def test_fused_bf16_head_equals_the_unfused_bf16_head(token_chunk, vocab_chunk):
    """LinearCrossEntropy with bfloat16 products (several token chunks and vocabulary blocks or one)
    against autograd of F.cross_entropy on the bfloat16 logits widened to float32: the loss within
    1e-5 (float32 products would be 1.5e-4 off), both gradients within 1% of their scale (two
    bfloat16 roundings), in float32 as the master weights."""
    x0, w0, t = head_inputs()
    got, want = [], []
    for fused, out in ((True, got), (False, want)):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        if fused:
            loss = LinearCrossEntropy.apply(x, w, t, Workspace(), token_chunk, vocab_chunk, torch.bfloat16)
        else:
            loss = F.cross_entropy(F.linear(x.bfloat16(), w.bfloat16()).float(), t, ignore_index=-1)
        (2.0 * loss).backward()
        out += [loss.detach(), x.grad, w.grad]
    assert got[0].dtype == got[1].dtype == got[2].dtype == torch.float32
    assert got[0].item() == pytest.approx(want[0].item(), rel=1e-5)
    assert close(got[1], want[1], 0.01) and close(got[2], want[2], 0.01)
    assert got[1][[0, 9, 36]].abs().max() == 0  # ignored tokens get no gradient


def test_training_heads_take_bf16_under_autocast_and_stay_float32_outside():
    """Under autocast the model's fused head computes in bfloat16 (its loss differs from the float32
    one by bfloat16 rounding, not by zero); outside, it is float32 exactly as before."""
    model = tiny("llama")
    idx = tokens(2, 16, vocab=500)
    logits, fp32 = model(idx, idx)
    with torch.autocast(**BF16):
        logits_bf, bf = model(idx, idx)
    assert logits is None and logits_bf is None  # both fused: no (tokens, vocab) logits
    plain = F.cross_entropy(model(idx)[0].flatten(0, 1), idx.flatten())
    assert fp32.item() == pytest.approx(plain.item(), rel=1e-6)
    assert bf.dtype == torch.float32 and bf.item() != fp32.item() and bf.item() == pytest.approx(fp32.item(), rel=1e-2)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bf16_loss_and_gradients_are_close_to_float32(family):
    """A training step of a tiny native model under autocast to bfloat16 against float32: loss within
    1%, every parameter's gradient within 5% of its scale and pointing the same way (cosine > 0.995),
    gradients and weights float32 (the master copy), the matmuls of attention, MLP and head in bfloat16."""
    model = tiny(family)
    idx, tgt = tokens(4, 32, vocab=500, seed=2), tokens(4, 32, vocab=500, seed=3)
    results = []
    for amp in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast(**BF16, enabled=amp):
            loss = model(idx, tgt)[1]
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l32, g32), (l16, g16) = results
    assert l16 == pytest.approx(l32, rel=1e-2)
    for name, g in g16.items():
        assert g.dtype == torch.float32 and model.get_parameter(name).dtype == torch.float32
        assert close(g, g32[name], 0.05), name
        assert F.cosine_similarity(g.flatten(), g32[name].flatten(), dim=0) > 0.995, name
    seen = set()
    hooks = [m.register_forward_hook(lambda m, a, o: seen.add((type(m).__name__, o.dtype)))
             for m in model.modules() if type(m).__name__ in ("CausalSelfAttention", "MLP")]
    with torch.autocast(**BF16):
        model(idx, tgt)
    for h in hooks:
        h.remove()
    assert seen == {("CausalSelfAttention", torch.bfloat16), ("MLP", torch.bfloat16)}


def test_native_llama_in_bf16_matches_transformers_in_bf16(tmp_path):
    """Our Llama under autocast against transformers' under the same autocast, same weights: the
    logits agree to bfloat16's precision (their difference is no larger than either's from float32)."""
    from helpers.checkpoint import load_model
    ref = make_hf_llama(tmp_path)
    ours = load_model(tmp_path)
    idx = tokens(2, 24, vocab=1000, seed=8)
    with torch.no_grad():
        exact = ref(idx).logits
        with torch.autocast(**BF16):
            theirs, mine = ref(idx).logits.float(), ours(idx)[0].float()
    assert close(mine, theirs, 0.02)
    assert (mine - theirs).abs().max() <= 2 * max((mine - exact).abs().max(), (theirs - exact).abs().max())


def test_loss_only_head_in_bf16_sums_in_float32():
    """cross_entropy_sum under autocast (float32 weights, as in training) and with bfloat16 weights:
    the blocks in bfloat16, the sum in float32, equal to cross-entropy of the widened bfloat16 logits."""
    x, w, t = head_inputs(seed=1, n=200, width=32, vocab=3000)
    want = F.cross_entropy(F.linear(x.bfloat16(), w.bfloat16()).float(), t, ignore_index=-1, reduction="sum")
    with torch.autocast(**BF16):
        total, n = cross_entropy_sum(x, w, t, Workspace(), token_chunk=64, vocab_chunk=512)
    total16, _ = cross_entropy_sum(x.bfloat16(), w.bfloat16(), t, vocab_chunk=512)
    assert n == 197 and total.dtype == total16.dtype == torch.float32
    assert total.item() == pytest.approx(want.item(), rel=1e-6)
    assert total16.item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_fused_bf16_distillation_equals_the_plain_bf16_path(T):
    """LinearDistillation with bfloat16 products against distillation_loss of the bfloat16 logits
    (widened to float32): total, ce and kd within 1e-3, the student's gradients within 2%."""
    x0, w0, t = head_inputs(seed=2, n=40, width=16, vocab=400)
    g = torch.Generator().manual_seed(5)
    tx, tw = torch.randn(40, 24, generator=g), torch.randn(400, 24, generator=g) * 0.5
    outs = []
    for fused in (True, False):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        if fused:
            total, ce, kd = LinearDistillation.apply(x, w, t, tx, tw, 0.6, T, Workspace(), 16, 128, torch.bfloat16)
        else:
            logits, teacher_logits = F.linear(x.bfloat16(), w.bfloat16()), F.linear(tx.bfloat16(), tw.bfloat16())
            total, ce, kd = distillation_loss(logits, teacher_logits, t, 0.6, T)
        total.backward()
        outs.append((total.detach(), ce, kd, x.grad, w.grad))
    for a, b in zip(outs[0][:3], outs[1][:3]):
        assert a.dtype == torch.float32 and a.item() == pytest.approx(b.item(), rel=1e-3)
    assert close(outs[0][3], outs[1][3], 0.02) and close(outs[0][4], outs[1][4], 0.02)


def test_model_distils_in_bf16_under_autocast():
    """GPT.forward with a Distill under autocast takes the fused bfloat16 KD head: no logits, a
    float32 loss close to the float32 one."""
    student, teacher = tiny("llama"), tiny("llama").eval()
    x, y = tokens(2, 16, vocab=500, seed=6), tokens(2, 16, vocab=500, seed=7)
    out = []
    for amp in (False, True):
        with torch.autocast(**BF16, enabled=amp):
            d = Distill(teacher.hidden(x).detach(), teacher.lm_head.weight.detach(), 0.5, 2.0)
            logits, loss = student(x, y, distill=d)
        out.append((logits, loss))
    assert out[1][0] is None and out[1][1].dtype == torch.float32
    assert out[1][1].item() == pytest.approx(out[0][1].item(), rel=2e-2)


def test_whole_split_val_loss_in_bf16_is_float32_and_close(monkeypatch):
    """val_loss_full(dtype=bfloat16): every val token counted once, the loss summed in float32,
    within 1% of float32 for the native model; the same for a transformers model (generic path)."""
    from helpers.generic import HFCausalLM
    data = np.random.default_rng(0).integers(0, 500, 203).astype(np.uint16)
    monkeypatch.setattr(measures, "open_split", lambda data_dir, split: data)
    native = tiny("llama")
    torch.manual_seed(0)
    import transformers
    generic = HFCausalLM(transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=96, vocab_size=500,
        max_position_embeddings=64)))
    for model in (native, generic):
        fp32 = measures.val_loss_full(model, "unused", block_size=16, batch_size=4)
        bf16 = measures.val_loss_full(model, "unused", block_size=16, batch_size=4, dtype=torch.bfloat16)
        assert bf16["val_tokens"] == fp32["val_tokens"] == 202
        assert bf16["val_loss"] != fp32["val_loss"] and bf16["val_loss"] == pytest.approx(fp32["val_loss"], rel=1e-2)


def test_generic_model_trains_in_bf16_close_to_float32(tmp_path):
    """A transformers model behind HFCausalLM under autocast: float32 loss and gradients close to float32."""
    from helpers.checkpoint import load_model
    make_hf_llama(tmp_path)
    model = load_model(tmp_path).train()
    idx = tokens(2, 24, vocab=1000, seed=4)
    grads = []
    for amp in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast(**BF16, enabled=amp):
            loss = model(idx, idx)[1]
        loss.backward()
        grads.append((loss, torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert grads[1][0].dtype == torch.float32 and grads[1][0].item() == pytest.approx(grads[0][0].item(), rel=1e-2)
    assert F.cosine_similarity(grads[0][1], grads[1][1], dim=0) > 0.99


def test_dtype_auto_is_float32_on_the_cpu_and_bf16_needs_native_support(monkeypatch):
    """dtype=auto on the CPU is float32 (same numbers on every CPU); dtype=bfloat16 on a CPU that
    would emulate it is refused with the way out."""
    assert resolve_device(TrainConfig(device="cpu", dtype="auto")) == (torch.device("cpu"), torch.float32)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    with pytest.raises(ConfigError, match="no native bfloat16.*use dtype=float32"):
        resolve_device(TrainConfig(device="cpu", dtype="bfloat16"))
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve_device(TrainConfig(device="cpu", dtype="bfloat16"))[1] == torch.bfloat16


@pytest.mark.skipif(not NATIVE, reason="this CPU has no native bfloat16: dtype=bfloat16 is refused here")
def test_bf16_run_killed_and_resumed_logs_the_same_losses(setup, tmp_path, reference_run):  # noqa: F811
    """The SIGKILL-and-resume run of test_train in bfloat16: the losses, step for step, of the run
    that never stopped; checkpoints hold float32 weights; the losses are bfloat16's, not float32's.
    Not bit for bit: two processes' bfloat16 products (oneDNN, AMX) differed in the 7th digit even at
    step 0, before any training (seen on a clean-clone run), so bit-identical bf16 resume is not
    established; float32 resume is bit-identical (test_train)."""
    from helpers.checkpoint import load_model
    full, resumed = run_killed_and_resumed(setup, tmp_path, dtype="bfloat16")
    assert [s for s, _, _ in losses(resumed)] == [s for s, _, _ in losses(full)] == list(range(0, 41, 2))
    for a, b in zip(losses(resumed), losses(full)):
        assert a[1:] == pytest.approx(b[1:], rel=1e-4)
    assert all(p.dtype == torch.float32 for p in load_model(full).parameters())
    bf16, fp32 = losses(full), losses(reference_run)  # the same arguments in float32
    assert bf16 != fp32  # bfloat16 really ran
    assert all(a[2] == pytest.approx(b[2], rel=2e-2) for a, b in zip(bf16, fp32))  # and stayed close
