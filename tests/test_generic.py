"""The generic path: decoder-only models of transformers that are not native (GPT-NeoX, Phi-3,
Gemma 2, OLMo 2), built here as tiny random models, as parents, children, training runs and exports."""
import json

import pytest
import torch

from conftest import perturb_norms, tokens
from helpers.checkpoint import export_hf, load_model, save_checkpoint
from helpers.errors import CheckpointError
from helpers.generic import HFCausalLM
from helpers.inherit import inherit

SIZES = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=3, intermediate_size=96,
             max_position_embeddings=64)
ARCHES = {  # config class -> settings that make each one itself (GQA, sliding windows, partial rotary)
    "GPTNeoXConfig": dict(rotary_pct=0.5),
    "Phi3Config": dict(num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "Gemma2Config": dict(num_key_value_heads=2, head_dim=16, sliding_window=6, pad_token_id=0),
    "Olmo2Config": dict(num_key_value_heads=2, pad_token_id=0),
}


def make_hf(arch, path, vocab=1000):
    import transformers
    torch.manual_seed(0)
    cfg = getattr(transformers, arch)(**SIZES, **ARCHES[arch], vocab_size=vocab)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    perturb_norms(model)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=list(ARCHES))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return make_hf(request.param, path), load_model(path), path


def truncated_logits(parent: HFCausalLM, idx, keep):
    """The parent's logits with the blocks not in `keep` replaced by the identity (forward hooks on
    the parent itself, no copying): what a child with blocks `keep` must reproduce."""
    from helpers.generic import find_blocks
    _, _, blocks = find_blocks(parent.hf, "test")

    def identity(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    hooks = [b.register_forward_hook(identity, with_kwargs=True) for i, b in enumerate(blocks) if i not in keep]
    try:
        with torch.no_grad():
            return parent(idx)[0]
    finally:
        for h in hooks:
            h.remove()


def test_loads_as_the_wrapped_transformers_model(pair):
    ref, ours, _ = pair
    assert isinstance(ours, HFCausalLM) and ours.config.n_layer == 3 and ours.config.vocab_size == 1000
    assert ours.config.family == ref.config.model_type
    idx = tokens(t=20)
    with torch.no_grad():
        assert torch.equal(ours(idx)[0], ref(idx).logits)
        logits, loss = ours(idx[:, :-1], idx[:, 1:])
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits.reshape(-1, 1000), idx[:, 1:].reshape(-1)).item())


@pytest.mark.parametrize("keep", [[0, 1], [0, 2], [1]])
def test_child_logits_equal_the_truncated_parent(pair, keep):
    _, parent, _ = pair
    child = inherit(parent, len(keep), layers=keep)
    assert isinstance(child, HFCausalLM) and child.config.n_layer == len(keep)
    idx = tokens(t=20)  # longer than Gemma 2's sliding window of 6: layer types must follow their blocks
    with torch.no_grad():
        assert torch.allclose(child(idx)[0], truncated_logits(parent, idx, keep), atol=1e-5)
    if keep != list(range(len(keep))):  # renumbered blocks: transformers' own cache, indexed by layer_idx,
        start = tokens(n=2, t=4)  # gives the same greedy tokens as recomputing, past Gemma 2's window
        cached = child.generate(start, 8, temperature=0)
        assert torch.equal(cached, child.generate(start, 8, temperature=0, use_cache=False))


def test_training_the_child_never_changes_the_parent(pair):
    _, parent, _ = pair
    before = {k: v.clone() for k, v in parent.state_dict().items()}
    child = inherit(parent, 2)
    parent_ptrs = {p.data_ptr() for p in parent.parameters()}
    assert not parent_ptrs & {p.data_ptr() for p in child.parameters()}
    child.train()
    opt = torch.optim.AdamW(child.parameters(), lr=1e-2)
    idx = tokens(t=20)
    child(idx[:, :-1], idx[:, 1:])[1].backward()
    opt.step()  # one step changes every trained tensor
    assert all(torch.equal(v, before[k]) for k, v in parent.state_dict().items())
    assert not torch.equal(inherit(parent, 2)(idx)[0], child(idx)[0])


def test_export_and_checkpoint_round_trips(pair, tmp_path):
    import transformers
    ref, parent, _ = pair
    child = inherit(parent, 2)
    export_hf(child, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(back) is type(ref) and back.config.num_hidden_layers == 2
    idx = tokens(t=20)
    with torch.no_grad():
        expected = child(idx)[0]
        assert torch.equal(back(idx).logits, expected)
        assert torch.equal(load_model(tmp_path / "export")(idx)[0], expected)
        again = load_model(save_checkpoint(tmp_path / "c.pt", child))
        assert torch.equal(again(idx)[0], expected) and again.provenance["layers"] == [0, 1]
    ck = torch.load(tmp_path / "c.pt", weights_only=True)
    dropped = sorted(ck["model"])[-1]
    torch.save({**ck, "model": {k: v for k, v in ck["model"].items() if k != dropped}}, tmp_path / "d.pt")
    with pytest.raises(CheckpointError, match=f"d.pt: missing weights \\['{dropped}'\\]"):
        load_model(tmp_path / "d.pt")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """stdlib documents in a 320-token byte-level BPE trained here: the models' vocabulary, and so
    their embeddings, heads and checkpoints, stay tiny (GPT-2's 50,257 made each run ~4x slower)."""
    from test_tokenizer import train_bpe
    from helpers.data import prepare, stdlib_files
    tok = tmp_path_factory.mktemp("tokenizer")
    train_bpe(tok, [f.read_text(errors="replace") for f in stdlib_files()[1][:30]], 320)
    (tok / "config.json").write_text("{}")  # a model folder in name only: what prepare's tokenizer= takes
    path = tmp_path_factory.mktemp("generic_data")
    meta = prepare("stdlib", path, tokenizer=str(tok), max_docs=30, val_fraction=0.2, progress=False)
    return path, meta["tokenizer"]["n_vocab"]


@pytest.mark.parametrize("arch", ["GPTNeoXConfig", "Phi3Config", "Gemma2Config"])
def test_training_run_killed_and_resumed_logs_the_same_losses(arch, data, tmp_path, monkeypatch):
    import helpers.train as T
    data_dir, vocab = data
    make_hf(arch, tmp_path / "parent", vocab=vocab)
    base = dict(parent=str(tmp_path / "parent"), n_layers=2, data_dir=str(data_dir), max_iters=4, batch_size=2,
                block_size=32, eval_interval=2, eval_iters=2, log_interval=1, warmup_iters=2, learning_rate=1e-3,
                progress=False)
    T.train(T.TrainConfig.from_dict({**base, "out_dir": str(tmp_path / "full")}))
    real_lr_at = T.lr_at

    def dies_at_step_3(step, *a):
        if step == 3:
            raise KeyboardInterrupt("killed")
        return real_lr_at(step, *a)
    monkeypatch.setattr(T, "lr_at", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        T.train(T.TrainConfig.from_dict({**base, "out_dir": str(tmp_path / "killed")}))
    monkeypatch.setattr(T, "lr_at", real_lr_at)
    T.train(T.TrainConfig.from_dict({**base, "out_dir": str(tmp_path / "killed"), "init": "resume"}))
    rows = [[(r["step"], r["train_loss"], r["val_loss"]) for r in map(json.loads, (tmp_path / d / "metrics.jsonl")
                                                                       .read_text().splitlines())] for d in ("full", "killed")]
    assert rows[0] == rows[1] and [s for s, _, _ in rows[0]] == [0, 2, 4]
    assert rows[0][-1][2] < rows[0][0][2]  # it learns
    parent = load_model(tmp_path / "parent")
    assert isinstance(load_model(tmp_path / "full"), HFCausalLM) and parent.config.n_layer == 3


def test_scratch_has_the_child_shape_but_not_its_weights(pair):
    from helpers.generic import scratch_like
    _, parent, _ = pair
    child = inherit(parent, 2)
    scratch = scratch_like(child, seed=0)
    assert scratch.config.n_layer == 2 and scratch.num_params() == child.num_params()
    assert not torch.equal(scratch.hf.get_input_embeddings().weight, child.hf.get_input_embeddings().weight)


@pytest.mark.parametrize("config_class, kind", [("T5Config", "an encoder-decoder"), ("BertConfig", "an encoder"),
                                                ("CLIPTextConfig", "not a causal language model")])
def test_unsupported_architectures_get_one_clear_error(config_class, kind, tmp_path):
    import transformers
    cfg = getattr(transformers, config_class)(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=64)
    cfg.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"model_type '{cfg.model_type}' is {kind}; supported: natively: "
                                              "gpt2, llama.*generically: any decoder-only"):
        load_model(tmp_path)


def test_a_model_without_one_list_of_blocks_is_refused_by_name(pair, monkeypatch):
    from helpers import generic
    ref, _, _ = pair
    monkeypatch.setattr(ref.config, "num_hidden_layers", 7)  # no ModuleList of 7 blocks
    with pytest.raises(CheckpointError, match=f"model_type '{ref.config.model_type}' has 0 nn.ModuleLists"):
        generic.HFCausalLM(ref)


def test_attention_diagnostic_names_the_generic_model(pair):
    from helpers.errors import ConfigError
    from helpers.evaluate import attention_maps
    _, parent, _ = pair
    with pytest.raises(ConfigError, match=f"'{parent.hf.config.model_type}' model is on the generic path"):
        attention_maps(parent, tokens(n=1, t=8))


def test_fsdp_shards_a_generic_model_by_its_own_blocks(tmp_path):
    """parallel=fsdp on a transformers model: each of its blocks is one FSDP unit and the sharded
    model computes the same loss (a one-process group in this process)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from helpers.generic import find_blocks
    from helpers.train import shard_model
    make_hf("GPTNeoXConfig", tmp_path)
    model = load_model(tmp_path)
    x, y = tokens(2, 16), tokens(2, 16, seed=2)
    with torch.no_grad():
        expected = model(x, y)[1]
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        shard_model(model, torch.device("cpu"))
        blocks = find_blocks(model.hf, "test")[2]
        assert all(isinstance(b, FSDPModule) for b in blocks) and isinstance(model, FSDPModule)
        with torch.no_grad():
            assert torch.allclose(model(x, y)[1], expected, atol=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_of_a_generic_model_equals_one_process(data, tmp_path):
    """torchrun with 2 gloo processes (DistributedDataParallel around a transformers model) and
    grad_accum=2 logs the losses of 1 process with grad_accum=2, and leaves a child load_model reads."""
    import os
    import subprocess
    from pathlib import Path

    from helpers.train import TrainConfig, read_metrics, torchrun_command, train
    data_dir, vocab = data
    make_hf("GPTNeoXConfig", tmp_path / "parent", vocab=vocab)
    base = dict(parent=str(tmp_path / "parent"), n_layers=2, data_dir=str(data_dir), max_iters=4, batch_size=2,
                block_size=32, grad_accum=2, eval_interval=2, eval_iters=2, log_interval=1, warmup_iters=2,
                learning_rate=1e-3, device="cpu", progress=False)
    train(TrainConfig.from_dict({**base, "out_dir": str(tmp_path / "one")}))
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(torchrun_command(TrainConfig.from_dict({**base, "out_dir": str(tmp_path / "two")}), 2),
                          cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert list(a["step"]) == list(b["step"]) == [0, 2, 4]
    for name in ("train_loss", "val_loss"):
        assert list(b[name]) == pytest.approx(list(a[name]), rel=1e-5)
    assert a["val_loss"].iloc[-1] < a["val_loss"].iloc[0]
    assert isinstance(load_model(tmp_path / "two"), HFCausalLM)


def test_whole_split_val_loss_of_a_generic_model(data, tmp_path):
    """helpers.evaluate on a transformers model (loaded or by path): the loss over every val token,
    equal to cross-entropy of its own logits computed here."""
    import numpy as np
    import torch.nn.functional as F
    from helpers.data import open_split
    from helpers.evaluate import evaluate_models
    data_dir, vocab = data
    make_hf("Olmo2Config", tmp_path, vocab=vocab)
    model = load_model(tmp_path)
    table = evaluate_models({"loaded": model, "by path": str(tmp_path)}, data_dir, block_size=32, batch_size=4)
    ids = torch.from_numpy(np.asarray(open_split(data_dir, "val")).astype(np.int64))
    n = (len(ids) - 1) // 32 * 32  # whole windows, checked against the sequential pass's first windows
    x, y = ids[:n].view(-1, 32), ids[1:n + 1].view(-1, 32)
    with torch.no_grad():
        by_hand = F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten(), reduction="sum").item()
    rest = evaluate_models({"m": model}, data_dir, block_size=32, batch_size=4, max_tokens=n)
    assert rest["val_tokens"][0] == n and rest["val_loss"][0] == pytest.approx(by_hand / n, rel=1e-5)
    assert table["val_loss"][0] == pytest.approx(table["val_loss"][1], rel=1e-6)
    assert table["layers"].tolist() == [3, 3] and table["val_tokens"][0] >= n


def test_04_eval_runs_on_a_generic_model(data, tmp_path):
    """Notebook 04 with a model of the generic path: val loss and continuations, the attention
    diagnostic skipped by name (transformers' attention is not instrumented)."""
    import pandas as pd
    import papermill
    from test_notebooks import NOTEBOOKS
    data_dir, vocab = data
    make_hf("GPTNeoXConfig", tmp_path / "neox", vocab=vocab)
    params = dict(models=json.dumps({"neox": str(tmp_path / "neox")}), data_dir=str(data_dir),
                  out_dir=str(tmp_path / "eval"), block_size=32, max_new_tokens=4, attention_tokens=16,
                  prompts=["def f():"])
    papermill.execute_notebook(str(NOTEBOOKS / "04_eval.ipynb"), str(tmp_path / "04.ipynb"), parameters=params,
                               progress_bar=False, cwd=str(tmp_path))
    nb = json.loads((tmp_path / "04.ipynb").read_text())
    printed = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    assert "neox: a gpt_neox model of the generic path; no attention diagnostic" in printed
    assert pd.read_csv(tmp_path / "eval" / "eval.csv")["val_loss"].notna().all()
