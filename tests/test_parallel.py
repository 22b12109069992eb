"""Several processes: FSDP2 (parallel=fsdp) against one process, resume under FSDP, the optimizer
state across layouts, and the MFU of several devices. Multi-process runs use torchrun with gloo on
the CPU, with a tiny model and a few steps."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from helpers.checkpoint import load_model, load_training_state, read_sidecar
from helpers.model import GPT, GPTConfig
from helpers.train import TrainConfig, read_metrics, train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def inputs(train_inputs):
    return train_inputs


def config(inputs, out, **kw):
    """A 4-step run of the tiny parent's child with grad_accum=2 (what 2 processes split); kw override."""
    values = dict(parent=str(inputs / "parent.pt"), n_layers=2, data_dir=str(inputs / "data"), out_dir=str(out),
                  max_iters=4, batch_size=2, block_size=32, grad_accum=2, eval_interval=2, eval_iters=2,
                  log_interval=1, warmup_iters=2, device="cpu", progress=False)
    return TrainConfig.from_dict({**values, **kw})


def torchrun(cfg: TrainConfig, n: int = 2):
    from helpers.train import torchrun_command
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(torchrun_command(cfg, n), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def losses(out):
    return [(r["step"], r["train_loss"], r["val_loss"]) for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.slow
def test_fsdp_equals_one_process_and_resumes_bit_identically(inputs, tmp_path):
    """2 processes with sharded weights, grads and AdamW state log the losses of 1 process with
    grad_accum=2; their checkpoints are full models load_model reads; a run stopped after step 2
    and resumed under FSDP ends bit-identical (losses, weights, AdamW state) to the one that did not stop."""
    one = train(config(inputs, tmp_path / "one"))
    torchrun(config(inputs, tmp_path / "fsdp", parallel="fsdp"))
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "fsdp")
    assert list(b["step"]) == [0, 2, 4] and one["step"] == 4
    for name in ("train_loss", "val_loss"):
        assert list(b[name]) == pytest.approx(list(a[name]), rel=1e-5)
    full, single = load_model(tmp_path / "fsdp"), load_model(tmp_path / "one")
    for (k, p), (_, q) in zip(full.state_dict().items(), single.state_dict().items()):
        assert torch.allclose(p, q, atol=1e-6), k
    assert read_sidecar(tmp_path / "fsdp" / "step_0000004.pt")["num_params"] == single.num_params()
    # stopped after step 2's checkpoint (what a killed run leaves), then resumed with the same processes
    shutil.copytree(tmp_path / "fsdp", tmp_path / "stopped")
    for f in (tmp_path / "stopped").glob("step_0000004.*"):
        f.unlink()
    torchrun(config(inputs, tmp_path / "stopped", parallel="fsdp", init="resume"))
    assert losses(tmp_path / "stopped") == losses(tmp_path / "fsdp")
    x, y = (load_training_state(tmp_path / d / "step_0000004.pt") for d in ("fsdp", "stopped"))
    assert all(torch.equal(x["model"][k], y["model"][k]) for k in x["model"])
    assert x["optimizer"]["state"].keys() == y["optimizer"]["state"].keys()
    for name, st in x["optimizer"]["state"].items():
        assert all(torch.equal(st[k], y["optimizer"]["state"][name][k]) for k in st), name


def test_optimizer_state_moves_between_plain_and_sharded(tmp_path):
    """AdamW state saved by one process (parameters by index) restores into an FSDP model, and state
    gathered from an FSDP model (by name) restores into a plain one: the same moments either way.
    (A one-process group in this process: FSDP2 code paths without the cost of launching.)"""
    import torch.distributed as dist
    from helpers.train import configure_optimizer, gather_full_state, load_optimizer_state, make_scaler, shard_model
    cfg = TrainConfig(data_dir="unused", out_dir=str(tmp_path))
    torch.manual_seed(0)
    gpt = GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=100, block_size=16)
    plain = GPT(gpt)
    opt = configure_optimizer(plain, cfg, torch.device("cpu"))
    for _ in range(2):
        plain(torch.randint(0, 100, (2, 8)), torch.randint(0, 100, (2, 8)))[1].backward()
        opt.step()
    saved = opt.state_dict()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        sharded = GPT(gpt)
        sharded.load_state_dict(plain.state_dict())
        shard_model(sharded, torch.device("cpu"))
        opt2 = configure_optimizer(sharded, cfg, torch.device("cpu"))
        load_optimizer_state(opt2, sharded, saved, sharded=True)
        _, by_name = gather_full_state(sharded, opt2)
        # float16 (T4): an overflow skips the step in every process and halves the loss scale
        scaler = make_scaler(torch.device("cpu"), torch.float16, sharded=True)
        before = [p.detach().full_tensor().clone() for p in sharded.parameters()]
        scaler.scale(sharded(torch.randint(0, 100, (2, 8)), torch.randint(0, 100, (2, 8)))[1] * float("inf")).backward()
        scaler.step(opt2)
        scaler.update()
        assert scaler.get_scale() == 2.0 ** 15
        assert all(torch.equal(a, p.detach().full_tensor()) for a, p in zip(before, sharded.parameters()))
        opt2.zero_grad()
    finally:
        dist.destroy_process_group()
    flat = [p for g in opt.param_groups for p in g["params"]]  # index i of the plain state
    name_of = {id(p): n for n, p in plain.named_parameters()}
    assert len(by_name["state"]) == len(saved["state"]) > 0
    for i, st in saved["state"].items():
        assert all(torch.equal(st[k], by_name["state"][name_of[id(flat[i])]][k]) for k in st)
    fresh = GPT(gpt)
    opt3 = configure_optimizer(fresh, cfg, torch.device("cpu"))
    load_optimizer_state(opt3, fresh, by_name)
    for i, st in opt3.state_dict()["state"].items():
        assert all(torch.equal(st[k], saved["state"][i][k]) for k in st)


def test_mfu_divides_by_every_device():
    from helpers.train import mfu
    one = mfu(1000.0, 6e9, 65e12, 1)
    assert one == pytest.approx(1000 * 6e9 / 65e12)
    assert mfu(1000.0, 6e9, 65e12, 2) == pytest.approx(one / 2)  # 2 x T4: the global rate over both peaks
    assert mfu(None, 6e9, 65e12, 2) is None and mfu(1000.0, 6e9, None, 2) is None
