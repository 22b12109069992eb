"""Activation checkpointing (grad_checkpointing=true): every block recomputed in the backward pass.
Losses and gradients equal the run without it (float32, CPU, within 1e-6), for our model and a
transformers model of the generic path, in one process and under FSDP; a model that cannot
recompute its blocks is refused by name."""
import os
import subprocess
from pathlib import Path

import pytest
import torch

from helpers.errors import ConfigError
from helpers.model import GPT, GPTConfig, llama_config
from helpers.startup import enable_grad_checkpointing
from helpers.train import read_metrics, torchrun_command, train
from tests.test_parallel import config

ROOT = Path(__file__).resolve().parent.parent


def loss_and_grads(model, idx, targets):
    model.zero_grad(set_to_none=True)
    _, loss = model(idx, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cfg", [GPTConfig(n_layer=3, n_head=2, n_embd=32, vocab_size=200, block_size=32, dropout=0.1),
                                 llama_config(n_layer=3, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48,
                                              vocab_size=200, block_size=32, dropout=0.1)], ids=["gpt2", "llama"])
def test_native_losses_and_gradients_equal_without_it(cfg, monkeypatch):
    """Dropout on: the recomputation must draw the same masks (the RNG state is replayed)."""
    from helpers.model import Block
    torch.manual_seed(0)
    model = GPT(cfg).train()
    idx, targets = torch.randint(0, 200, (2, 16)), torch.randint(0, 200, (2, 16))
    torch.manual_seed(1)
    plain = loss_and_grads(model, idx, targets)
    runs, forward = [], Block.forward
    monkeypatch.setattr(Block, "forward", lambda self, *a, **kw: runs.append(1) or forward(self, *a, **kw))
    enable_grad_checkpointing(model)
    torch.manual_seed(1)
    checkpointed = loss_and_grads(model, idx, targets)
    assert len(runs) == 2 * cfg.n_layer  # each block ran twice: forward, then again in backward
    assert torch.allclose(plain[0], checkpointed[0], atol=1e-6)
    assert plain[1].keys() == checkpointed[1].keys()
    for name, g in plain[1].items():
        assert torch.allclose(g, checkpointed[1][name], atol=1e-6), name


def test_generic_losses_and_gradients_equal_without_it():
    transformers = pytest.importorskip("transformers")
    from helpers.generic import HFCausalLM
    torch.manual_seed(0)
    hf = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=48, vocab_size=200,
        max_position_embeddings=32)).train()
    model = HFCausalLM(hf)
    idx, targets = torch.randint(0, 200, (2, 16)), torch.randint(0, 200, (2, 16))
    plain = loss_and_grads(model, idx, targets)
    enable_grad_checkpointing(model)
    assert any(getattr(m, "gradient_checkpointing", False) for m in hf.modules())  # the blocks recompute
    checkpointed = loss_and_grads(model, idx, targets)
    assert torch.allclose(plain[0], checkpointed[0], atol=1e-6)
    for name, g in plain[1].items():
        assert torch.allclose(g, checkpointed[1][name], atol=1e-6), name


def test_a_model_that_cannot_recompute_is_refused_by_name():
    transformers = pytest.importorskip("transformers")
    from helpers.generic import HFCausalLM
    hf = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=48, vocab_size=200))
    model = HFCausalLM(hf)
    type(hf).supports_gradient_checkpointing = False
    try:
        with pytest.raises(ConfigError, match="grad_checkpointing=true: the gpt_neox model .*cannot recompute"):
            enable_grad_checkpointing(model)
    finally:
        type(hf).supports_gradient_checkpointing = True


def test_a_training_run_logs_the_same_losses(train_inputs, tmp_path):
    train(config(train_inputs, tmp_path / "plain", dropout=0.1))
    train(config(train_inputs, tmp_path / "recomputed", dropout=0.1, grad_checkpointing=True))
    a, b = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "recomputed")
    for name in ("train_loss", "val_loss"):
        assert list(b[name]) == pytest.approx(list(a[name]), abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_with_two_processes(parallel, train_inputs, tmp_path):
    """Under DDP and FSDP2 (2 gloo processes) the losses equal one process without checkpointing."""
    train(config(train_inputs, tmp_path / "one"))
    cfg = config(train_inputs, tmp_path / "two", parallel=parallel, grad_checkpointing=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(torchrun_command(cfg, 2), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for name in ("train_loss", "val_loss"):
        assert list(b[name]) == pytest.approx(list(a[name]), rel=1e-5)
