"""LoRA healing (lora_r > 0, helpers.lora through peft): the inherited weights frozen and only the
adapters (and the tensors the child did not inherit) trained; a checkpoint holds those, not the
base, and a stopped run resumes bit-identically; load_model merges; export_hf writes merged weights
and peft's own adapter format; our fused q/k/v and gate/up matrices act as separate adapters per
projection; transformers models of the generic path; DDP; and the errors users can cause."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from helpers.checkpoint import export_hf, load_lora, load_model, load_training_state, read_sidecar, save_checkpoint
from helpers.errors import CheckpointError, ConfigError, RunStopped
from helpers.inherit import inherit
from helpers.lora import LoraSettings, attach, merge, not_inherited
from helpers.pipeline import ARMS, arm_label, arm_settings, compare_table, settings, train_settings
from helpers.train import TrainConfig, parse_cli, torchrun_command, train
from tests.test_parallel import config
from tests.test_stops import stop_at
from tests.test_train import losses, tiny

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def inputs(train_inputs):
    return train_inputs


@pytest.fixture(scope="module")
def neox_parent(tmp_path_factory):
    """A tiny GPT-NeoX folder (the generic path; q, k and v in one matrix, query_key_value) with
    GPT-2's vocabulary size, so that it trains on train_inputs' data."""
    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(num_hidden_layers=3, num_attention_heads=2, hidden_size=32, intermediate_size=48,
                                     vocab_size=50257, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("neox") / "parent"
    transformers.GPTNeoXForCausalLM(cfg).save_pretrained(path)
    return path


def nudge_adapters(model, seed=0):
    """B starts at zero (the adapters change nothing yet): give it values, as training would, inside its mask."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                layer = model.get_submodule(name.split(".lora_B.")[0])
                p.add_(0.05 * torch.randn(p.shape, generator=g) * getattr(layer, "lora_B_mask", 1.0))


def ids(n=2, t=12, vocab=1000):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(1))


# ---- what trains -----------------------------------------------------------------------------
def test_only_adapters_and_what_was_not_inherited_train(hf_llama):
    """copy=paper leaves the final norm and the untied embedding fresh: those train in full, every
    inherited weight is frozen, the gradients reach only the trainable tensors, the untrained
    adapters change nothing, and AdamW keeps each projection's block of the fused B at zero elsewhere."""
    parent = load_model(hf_llama[1])
    child = inherit(parent, 2, layers=[0, 2], copy="paper")
    fresh = {n for n, p in child.named_parameters() if not torch.equal(p, parent.get_parameter(
        n.replace("transformer.h.1.", "transformer.h.2.")))}
    assert set(not_inherited(child)) == fresh == {"transformer.wte.weight", "transformer.ln_f.weight"}
    x = ids()
    before = child(x)[0]
    record = attach(child, LoraSettings(r=2, targets=["q", "v", "down"]), {"source": "p", "layers": [0, 2]},
                    full=not_inherited(child))
    assert torch.equal(child(x)[0], before)
    trainable = {n for n, p in child.named_parameters() if p.requires_grad}
    assert trainable == fresh | {n for n, _ in child.named_parameters() if ".lora_" in n}
    assert record["modules"] == {"attn.c_attn": ["q", "v"], "mlp.c_proj": ["down"]}
    assert record["trainable_params"] == sum(child.get_parameter(n).numel() for n in trainable)
    opt = torch.optim.AdamW([p for p in child.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    for _ in range(2):
        child(x, x)[1].backward()
        assert {n for n, p in child.named_parameters() if p.grad is not None} == trainable
        opt.step()
        opt.zero_grad()
    b = child.transformer.h[0].attn.c_attn.lora_B["default"].weight  # rows q | k | v, rank blocks q | v
    q, kv = 4 * 16, 2 * 16
    assert b[:q, :2].abs().sum() > 0 and b[q + kv:, 2:].abs().sum() > 0
    assert b[:q, 2:].abs().sum() == b[q:q + kv].abs().sum() == b[q + kv:, :2].abs().sum() == 0


# ---- export: merged, and peft's own format -------------------------------------------------------
@pytest.mark.parametrize("family, targets", [("llama", None), ("llama", ["k", "o", "gate"]), ("gpt2", ["q", "v", "up"])])
def test_export_merged_and_as_a_peft_adapter(family, targets, hf_llama, hf_gpt2, tmp_path):
    """Merged weights load into the family's transformers class with the unmerged model's logits
    (within 1e-5); the adapter in peft's format loads onto the exported base with PeftModel and
    gives them too: our fused c_attn and c_fc are exactly separate adapters on q_proj, k_proj, ...
    (GPT-2's c_attn is one matrix there too)."""
    folder = (hf_llama if family == "llama" else hf_gpt2)[1]
    child = inherit(load_model(folder), 2, layers=[0, 2])
    attach(child, LoraSettings(r=2, alpha=4.0, targets=targets), {"source": str(folder), "layers": [0, 2]}, seed=3)
    nudge_adapters(child)
    x = ids()
    with torch.no_grad():
        want = child.eval()(x)[0]
        merged = transformers.AutoModelForCausalLM.from_pretrained(export_hf(child, tmp_path / "merged")).eval()
        assert (merged(input_ids=x).logits - want).abs().max() < 1e-5
        out = export_hf(child, tmp_path / "base", adapter=True)
        base = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert (base(input_ids=x).logits - want).abs().max() > 1e-3  # the base alone is not the healed model
        healed = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
        assert (healed(input_ids=x).logits - want).abs().max() < 1e-5
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 4.0
    if family == "llama":
        assert "model.layers.0.self_attn.k_proj" in config["target_modules"]


# ---- a training run: checkpoints, resume, load_model ---------------------------------------------
@pytest.mark.parametrize("kind", ["native", "generic"])
def test_a_stopped_run_resumes_bit_identically_from_adapters_alone(kind, inputs, neox_parent, tmp_path, monkeypatch):
    """Stopped by Ctrl-C at step 3 of 6 (dropout on: the RNG matters), the checkpoint holds the adapters
    and the tensors trained in full with their AdamW state, and no frozen weight; resumed, the run logs
    the losses of the run that never stopped and ends with the same adapters and AdamW state, bit for
    bit. load_model gives the merged plain model, with the unmerged model's logits."""
    kw = dict(lora_r=4, max_iters=6)
    if kind == "native":
        kw.update(copy="paper", dropout=0.1, lora_dropout=0.1)
    else:
        kw.update(parent=str(neox_parent))
    train(tiny(inputs, tmp_path / "full", **kw))
    stop_at(monkeypatch, 3)
    with pytest.raises(RunStopped):
        train(tiny(inputs, tmp_path / "stopped", **kw))
    monkeypatch.undo()
    ck = load_training_state(tmp_path / "stopped" / "step_0000003.pt")
    record = ck["lora"]
    assert all(".lora_" in k or k in record["full"] for k in ck["model"]) and record["base"]["layers"] == [0, 1]
    assert sum(v.numel() for v in ck["model"].values()) == record["trainable_params"] < record["frozen_params"] / 10
    assert len(ck["optimizer"]["state"]) == len(ck["model"])
    assert read_sidecar(tmp_path / "stopped" / "step_0000003.pt")["lora"]["fingerprint"] == record["fingerprint"]
    if kind == "native":
        assert record["full"] == ["transformer.ln_f.bias", "transformer.ln_f.weight", "transformer.wpe.weight"]
    train(tiny(inputs, tmp_path / "stopped", init="resume", **kw))
    assert losses(tmp_path / "stopped") == losses(tmp_path / "full")
    a, b = (load_training_state(tmp_path / d / "step_0000006.pt") for d in ("full", "stopped"))
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for i, state in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][i][k]) for k, v in state.items())
    merged, unmerged = load_model(tmp_path / "full"), load_lora(tmp_path / "full")
    assert not any(".lora_" in n for n, _ in merged.named_parameters()) and "lora_merged" in merged.provenance
    x = ids(vocab=50257)
    with torch.no_grad():
        assert (merged(x)[0] - unmerged(x)[0]).abs().max() < 1e-5


def test_a_parent_that_changed_is_refused_by_name(inputs, tmp_path):
    """The base is rebuilt from the parent the record names: another model under that name is caught."""
    parent = tmp_path / "parent.pt"
    parent.write_bytes((inputs / "parent.pt").read_bytes())
    train(tiny(inputs, tmp_path / "r", parent=str(parent), lora_r=2, max_iters=2))
    other = load_model(parent)
    with torch.no_grad():
        other.transformer.h[1].attn.c_attn.weight.mul_(2)
    save_checkpoint(parent, other)
    with pytest.raises(CheckpointError, match=f"rebuilt from {parent} differs"):
        load_model(tmp_path / "r")


@pytest.mark.skipif(not getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)(),
                    reason="bfloat16 training on the CPU needs AVX512-BF16")
def test_a_16_bit_base(inputs, tmp_path):
    """base_dtype=bfloat16: the frozen projections held in bfloat16, the adapters in float32, trained
    in bfloat16 products; the checkpoint still holds no base, and load_model merges in float32."""
    train(tiny(inputs, tmp_path / "bf16", lora_r=4, base_dtype="bfloat16", dtype="bfloat16", max_iters=4))
    model = load_lora(tmp_path / "bf16")
    assert model.transformer.h[0].attn.c_attn.base_layer.weight.dtype == torch.bfloat16
    assert model.transformer.h[0].attn.c_attn.lora_A["default"].weight.dtype == torch.float32
    assert model.transformer.wte.weight.dtype == torch.float32
    assert load_model(tmp_path / "bf16").transformer.h[0].attn.c_attn.weight.dtype == torch.float32


# ---- the generic path -----------------------------------------------------------------------------
def test_a_generic_model_gets_adapters_on_its_own_modules(neox_parent, tmp_path):
    child = inherit(load_model(neox_parent), 2, layers=[0, 2])
    with pytest.raises(ConfigError, match="holds q, k, v in one matrix \\(attention.query_key_value\\); name all"):
        attach(inherit(load_model(neox_parent), 2), LoraSettings(r=2, targets=["q", "o"]), {})
    record = attach(child, LoraSettings(r=2), {"source": str(neox_parent), "layers": [0, 2]})
    assert record["modules"] == {"attention.query_key_value": ["q+k+v"], "attention.dense": ["o"],
                                 "mlp.dense_h_to_4h": ["up"], "mlp.dense_4h_to_h": ["down"]}
    nudge_adapters(child)
    x = ids(vocab=50257)
    with torch.no_grad():
        want = child.eval()(x)[0]
        assert (merge(child)(x)[0] - want).abs().max() < 1e-5
        out = export_hf(child, tmp_path / "base", adapter=True)
        healed = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(out), out / "adapter")
        assert (healed.eval()(input_ids=x).logits - want).abs().max() < 1e-5


# ---- several processes ---------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_two_processes_equal_one(inputs, tmp_path):
    """torchrun with 2 gloo processes and grad_accum=2 logs the losses of 1 process (the command line
    carries the lora settings), and its checkpoint is adapters only, which load_model merges."""
    kw = dict(lora_r=4, lora_targets=["q", "v", "o"], lora_alpha=8.0)
    train(config(inputs, tmp_path / "one", **kw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(torchrun_command(config(inputs, tmp_path / "two", **kw), 2), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _, _ in a] == [s for s, _, _ in b] == [0, 2, 4]
    for (_, ta, va), (_, tb, vb) in zip(a, b):
        assert ta == pytest.approx(tb, rel=1e-5) and va == pytest.approx(vb, rel=1e-5)
    assert read_sidecar(tmp_path / "two" / "step_0000004.pt")["lora"]["modules"] == {
        "attn.c_attn": ["q", "v"], "attn.c_proj": ["o"]}
    assert load_model(tmp_path / "two").config.n_layer == 2


# ---- settings and errors ---------------------------------------------------------------------------
def test_the_command_line_and_config_errors():
    cfg = parse_cli(["lora_r=8", "lora_targets=q_proj,v", "lora_alpha=16", "base_dtype=bfloat16"])
    assert (cfg.lora_r, cfg.lora_targets, cfg.lora_alpha, cfg.base_dtype) == (8, ["q_proj", "v"], 16.0, "bfloat16")
    for given, message in [({"lora_r": 8, "init": "scratch"}, "lora_r=8 with init=scratch: a random model has nothing to heal"),
                           ({"lora_targets": "q,attn"}, "lora_targets: no projection is called 'attn'; valid names: q, k, v, o, gate"),
                           ({"lora_r": 8, "parallel": "fsdp"}, "lora_r=8 with parallel=fsdp: LoRA trains with parallel=ddp"),
                           ({"base_dtype": "int8"}, "base_dtype='int8': choose one of float32, bfloat16, float16"),
                           ({"lora_r": -1}, "need lora_r >= 0")]:
        with pytest.raises(ConfigError, match=message.replace("(", "\\(")):
            TrainConfig.from_dict(given)


def test_errors_at_the_start_of_a_run(inputs, tmp_path, monkeypatch):
    """A projection the model lacks, a 16-bit base with float32 products, a resume with other settings,
    and a missing peft: each one ConfigError naming the setting, before any step."""
    with pytest.raises(ConfigError, match="lora_targets: gate match\\(es\\) no module of this gpt2 model; valid here: q, k, v, o, up, down"):
        train(tiny(inputs, tmp_path / "a", lora_r=2, lora_targets=["gate"]))
    with pytest.raises(ConfigError, match="base_dtype=bfloat16: frozen weights in 16 bits need 16-bit products"):
        train(tiny(inputs, tmp_path / "b", lora_r=2, base_dtype="bfloat16", dtype="float32"))
    train(tiny(inputs, tmp_path / "c", lora_r=2, max_iters=2))
    with pytest.raises(ConfigError, match="init=resume: the run in out_dir=.* trains LoRA adapters \\(lora_r=2 "):
        train(tiny(inputs, tmp_path / "c", lora_r=4, max_iters=4, init="resume"))
    train(tiny(inputs, tmp_path / "plain", max_iters=2))
    with pytest.raises(ConfigError, match="init=resume with lora_r=2: the run .* trains every weight"):
        train(tiny(inputs, tmp_path / "plain", lora_r=2, max_iters=4, init="resume"))
    with pytest.raises(CheckpointError, match="this model has no LoRA adapters; load a LoRA run's checkpoint"):
        export_hf(load_model(tmp_path / "c"), tmp_path / "x", adapter=True)
    monkeypatch.setitem(sys.modules, "peft", None)  # what `import peft` meets where it is not installed
    with pytest.raises(ConfigError, match=r"lora_r > 0 needs peft, which is not installed: pip install -e '.\[lora\]'"):
        train(tiny(inputs, tmp_path / "d", lora_r=2))


# ---- the pipeline's arm --------------------------------------------------------------------------
def test_the_pipelines_lora_arm(tmp_path):
    """compare=child,child+lora,scratch trains the inherited child plainly and with LoRA (rank 8, or the
    lora_r setting) at the same budget; the other arms train every weight; the table lists both children."""
    s = settings("smoke", {"compare": "child,child+lora,scratch"})
    configs = {arm: TrainConfig.from_dict({**train_settings(s, "data"), "parent": "p", "n_layers": 2,
                                           **arm_settings(arm, s), "out_dir": arm}) for arm in ("child", "child+lora", "scratch")}
    assert [configs[a].lora_r for a in configs] == [0, 8, 0]
    assert configs["child"].max_iters == configs["child+lora"].max_iters == configs["scratch"].max_iters
    ranked = settings("smoke", {"compare": "child,child+lora", "lora_r": "4", "lora_alpha": "8"})
    assert "lora_r" not in train_settings(ranked, "data") and arm_settings("child+lora", ranked)["lora_r"] == 4
    assert train_settings(ranked, "data")["lora_alpha"] == 8 and arm_settings("child", ranked) == ARMS["child"]
    with pytest.raises(ConfigError, match="lora_r=4: the pipeline trains LoRA adapters in its child\\+lora arm only"):
        settings("smoke", {"lora_r": "4"})
    (tmp_path / "eval").mkdir()
    pd.DataFrame({"strategy": ["first"], "layers": ["[0, 1]"], "val_loss": [5.0]}).to_csv(
        tmp_path / "child_init_strategies.csv", index=False)
    labels = [arm_label(a) for a in ("child", "child+lora", "scratch")]
    pd.DataFrame({"model": ["parent", *labels], "params": [4, 2, 2, 2], "tokens_seen": [0, 9, 9, 9],
                  "val_loss": [1.0, 2.0, 3.0, 4.0]}).to_csv(tmp_path / "eval" / "eval.csv", index=False)
    table = compare_table(tmp_path, {**s, "strategy": "first"}, ["child", "child+lora", "scratch"]).set_index("model")
    assert table.loc["child, inherited + trained with LoRA", "val_loss"] == 3.0
    assert table.loc["child, inherited + trained with LoRA", "blocks"] == "[0, 1]"
    assert table.loc["child, inherited + trained", "val_loss"] == 2.0
