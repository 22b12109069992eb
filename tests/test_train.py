import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers.checkpoint import load_model, read_sidecar, save_checkpoint
from helpers.errors import ConfigError, DataError
from helpers.model import GPT, GPTConfig
from helpers.train import TrainConfig, coerce, lr_at, parse_cli, parse_student_log, read_metrics, train
from conftest import cli_args, run_cli  # noqa: F401 (imported from here by other test modules)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def setup(train_inputs):
    return train_inputs


def tiny(setup, out, **kw):
    values = dict(parent=str(setup / "parent.pt"), n_layers=2, data_dir=str(setup / "data"), out_dir=str(out),
                  max_iters=6, batch_size=2, block_size=32, eval_interval=2, eval_iters=2, log_interval=1,
                  warmup_iters=2, learning_rate=1e-3, min_lr=1e-4, progress=False)
    values.update(kw)
    return TrainConfig.from_dict(values)


def losses(out):
    return [(r["step"], r["train_loss"], r["val_loss"]) for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())]


def test_schedule_values():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=4, max_iters=14)
    assert lr_at(0, cfg, 14) == pytest.approx(1 / 5) and lr_at(3, cfg, 14) == pytest.approx(4 / 5)
    assert lr_at(4, cfg, 14) == pytest.approx(1.0)  # warm-up done: the peak
    assert lr_at(9, cfg, 14) == pytest.approx(0.1 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 0.9)
    assert lr_at(14, cfg, 14) == pytest.approx(0.1) and lr_at(100, cfg, 14) == pytest.approx(0.1)
    values = [lr_at(s, cfg, 14) for s in range(4, 15)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_coercion_and_rejection():
    cfg = TrainConfig.from_dict({"max_iters": "1e3", "learning_rate": "3e-4", "compile": "true", "n_layers": "none",
                                 "dropout": "0.1", "max_tokens": None})
    assert cfg.max_iters == 1000 and cfg.learning_rate == 3e-4 and cfg.compile is True and cfg.n_layers is None
    with pytest.raises(ConfigError, match="batch_size='eight' is not a valid int"):
        TrainConfig.from_dict({"batch_size": "eight"})
    with pytest.raises(ConfigError, match="compile='maybe' is not a valid bool"):
        TrainConfig.from_dict({"compile": "maybe"})
    with pytest.raises(ConfigError, match="unknown TrainConfig keys \\['lr'\\]"):
        TrainConfig.from_dict({"lr": 1})
    with pytest.raises(ConfigError, match="block_size=0"):
        TrainConfig.from_dict({"block_size": 0})
    with pytest.raises(ConfigError, match="max_iters"):
        coerce("max_iters", int, 2.5)


def test_cli_and_yaml(tmp_path):
    (tmp_path / "c.yaml").write_text("batch_size: 4\nlearning_rate: 0.001\n")
    cfg = parse_cli(["--config", str(tmp_path / "c.yaml"), "batch_size=16", "init=scratch"])
    assert cfg.batch_size == 16 and cfg.learning_rate == 0.001 and cfg.init == "scratch"
    with pytest.raises(ConfigError, match="key=value"):
        parse_cli(["oops"])


def test_inherit_run_logs_metrics_and_checkpoints(setup, tmp_path):
    rec = train(tiny(setup, tmp_path / "r"))
    rows = read_metrics(tmp_path / "r")
    assert list(rows["step"]) == [0, 2, 4, 6] and rec["step"] == 6
    assert rows["val_loss"].iloc[-1] < rows["val_loss"].iloc[0]
    assert set(rows.columns) >= {"step", "tokens", "lr", "train_loss", "val_loss", "tokens_per_s", "mfu", "elapsed_s"}
    assert rows["tokens"].iloc[-1] == 6 * 2 * 32
    files = sorted(p.name for p in (tmp_path / "r").glob("*.pt"))
    assert files == ["best.pt", "step_0000004.pt", "step_0000006.pt"]  # keep_last=2, plus the best
    side = read_sidecar(tmp_path / "r" / "step_0000006.pt")
    assert side["train_config"]["n_layers"] == 2 and side["step"] == 6
    assert load_model(tmp_path / "r").config.n_layer == 2


def test_scratch_has_the_child_shape_but_not_its_weights(setup, tmp_path):
    train(tiny(setup, tmp_path / "s", init="scratch", max_iters=2))
    scratch = load_model(tmp_path / "s" / "step_0000000.pt")
    parent = load_model(setup / "parent.pt")
    assert scratch.config.n_layer == 2 and scratch.config.n_embd == 32
    assert not torch.equal(scratch.transformer.wte.weight, parent.transformer.wte.weight)


def test_grad_accum_equals_bigger_batch(setup, tmp_path):
    """Two micro-steps of batch 2 == one step of batch 4 drawn in the same order."""
    a = train(tiny(setup, tmp_path / "a", batch_size=2, grad_accum=2, max_iters=3, eval_interval=3))
    b = _single_batch_equivalent(setup, tmp_path / "b")
    assert a["val_loss"] == pytest.approx(b, rel=1e-5)


def _single_batch_equivalent(setup, out):
    """Same thing by hand: the sampler order of grad_accum=2 x batch 2 is that of batch 4 drawn twice as 2."""
    from helpers.data import get_batch, open_split
    from helpers.inherit import inherit
    from helpers.train import configure_optimizer, estimate_loss
    cfg = tiny(setup, out, batch_size=2, grad_accum=2, max_iters=3, eval_interval=3)
    torch.manual_seed(cfg.seed)
    model = inherit(load_model(cfg.parent), 2)
    model.train()
    opt = configure_optimizer(model, cfg, torch.device("cpu"))
    data = open_split(cfg.data_dir, "train")
    g = torch.Generator().manual_seed(cfg.seed)
    for step in range(3):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg, 3)
        xs, ys = zip(*[get_batch(data, 32, 2, g) for _ in range(2)])
        _, loss = model(torch.cat(xs), torch.cat(ys))  # one batch of 4
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad()
    splits = {"train": data, "val": open_split(cfg.data_dir, "val")}
    from contextlib import nullcontext
    return estimate_loss(model, splits, cfg, 3, "cpu", nullcontext())["val"]


def run_killed_and_resumed(setup, root, full=None, **kw):
    """The 40-step CLI run of cli_args twice under `root`: "full" uninterrupted (or the given `full`
    run of the same arguments), and "killed" with SIGKILL once it has logged 6 of its 21 records,
    then resumed with init=resume."""
    if full is None:
        full = root / "full"
        assert run_cli(cli_args(setup, full, **kw)).wait() == 0
    proc = run_cli(cli_args(setup, root / "killed", **kw))
    metrics = root / "killed" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 6):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 6 <= len(metrics.read_text().splitlines()) < 21, "the kill must land mid-run"
    assert run_cli(cli_args(setup, root / "killed", init="resume", **kw)).wait() == 0
    return full, root / "killed"


def test_sigkill_and_resume_logs_the_same_losses(setup, tmp_path, reference_run):
    """A run killed with SIGKILL mid-way and resumed logs the same losses, step for step (dropout on,
    so RNG restore matters), as a run that never stopped."""
    full, resumed = (losses(d) for d in run_killed_and_resumed(setup, tmp_path, full=reference_run))
    assert [s for s, _, _ in resumed] == [s for s, _, _ in full] == list(range(0, 41, 2))
    assert resumed == full


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(setup, tmp_path):
    with pytest.raises(FloatingPointError, match="step"):
        train(tiny(setup, tmp_path / "n", learning_rate=1e30, min_lr=1e29, warmup_iters=0, max_iters=20))
    kept = sorted((tmp_path / "n").glob("step_*.pt"))
    assert kept and torch.isfinite(load_model(kept[-1]).transformer.wte.weight).all()


def test_vocabulary_mismatch_is_refused_before_training(setup, tmp_path):
    torch.manual_seed(0)
    small = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=1000, block_size=64))
    small.provenance = {"tokenizer": "gpt2"}
    save_checkpoint(tmp_path / "small.pt", small)
    with pytest.raises(DataError, match="50,257 ids.*1,000"):
        train(tiny(setup, tmp_path / "v", parent=str(tmp_path / "small.pt")))
    assert not (tmp_path / "v" / "metrics.jsonl").exists()


def test_unwritable_out_dir_fails_before_training(setup, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        train(tiny(setup, tmp_path / "f" / "run"))


def test_existing_run_is_not_overwritten(setup, tmp_path):
    train(tiny(setup, tmp_path / "e", max_iters=2))
    before = (tmp_path / "e" / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds a run"):
        train(tiny(setup, tmp_path / "e", max_iters=2))
    assert (tmp_path / "e" / "metrics.jsonl").read_text() == before


def test_n_layers_out_of_range(setup, tmp_path):
    with pytest.raises(ConfigError, match=r"1\.\.4"):
        train(tiny(setup, tmp_path / "x", n_layers=9))


def test_student_log_reader():
    log = "step 0: train loss 10.9512, val loss 10.9473\nsomething else\nstep 250: train loss 5.1, val loss 5.25\n"
    df = parse_student_log(log)
    assert list(df["step"]) == [0, 250] and df["val_loss"].iloc[1] == 5.25


def test_ddp_two_processes_equal_one_with_twice_the_accumulation(setup, tmp_path):
    """torchrun with 2 CPU processes (gloo) and grad_accum=2 logs the losses of 1 process with grad_accum=2."""
    one = cli_args(setup, tmp_path / "one", max_iters=4, grad_accum=2, dropout=0.0)
    assert run_cli(one).wait() == 0
    two = cli_args(setup, tmp_path / "two", max_iters=4, grad_accum=2, dropout=0.0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "helpers.train", *two], cwd=ROOT, env=env)
    assert proc.wait(timeout=300) == 0
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _, _ in a] == [s for s, _, _ in b]
    for (_, ta, va), (_, tb, vb) in zip(a, b):
        assert ta == pytest.approx(tb, rel=1e-4) and va == pytest.approx(vb, rel=1e-4)


def test_token_budget_sets_the_number_of_steps(setup, tmp_path):
    from helpers.train import total_iters
    cfg = tiny(setup, tmp_path / "t", max_iters=None, max_tokens=1000, batch_size=2, block_size=32, grad_accum=2)
    assert total_iters(cfg) == 8  # ceil(1000 / (2 * 32 * 2))
    rec = train(cfg)
    assert rec["step"] == 8 and rec["tokens"] == 8 * 2 * 32 * 2


def test_compiled_training_matches_eager(setup, tmp_path):
    """compile=True goes through torch.compile (inductor on CPU) and trains to the same losses."""
    pytest.importorskip("torch._inductor")
    eager = train(tiny(setup, tmp_path / "eager", max_iters=2, eval_interval=2))
    compiled = train(tiny(setup, tmp_path / "compiled", max_iters=2, eval_interval=2, compile=True))
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-3)


def test_kaggle_default_paths(monkeypatch):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    cfg = TrainConfig()
    assert cfg.out_dir.startswith("/kaggle/working/") and cfg.data_dir.startswith("/kaggle/working/data/")
    monkeypatch.setenv("INHERITUNE_KAGGLE_WORKING", "/tmp/stand in")  # what the offline Kaggle tests use
    assert TrainConfig().out_dir == "/tmp/stand in/runs/train"
    monkeypatch.delenv("INHERITUNE_KAGGLE_WORKING")
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE")
    assert TrainConfig().out_dir == "./runs/train"


def _samples(typ) -> list:
    """Values of a field type that a launch line must carry unchanged, awkward ones included."""
    import types
    import typing
    args = typing.get_args(typ) if typing.get_origin(typ) in (typing.Union, types.UnionType) else ()
    base = next((a for a in args if a is not type(None)), typ) if args else typ
    values = [None] if type(None) in args else []
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        return values + [[], [s for s in _samples(item) if s is not None][:3]]
    return values + {bool: [True, False], int: [0, 7, -3, 2 ** 62 + 1], float: [0.1 + 0.2, 1e-05, 3.0, -2.5e300],
                     str: ["/tmp/a folder/with spaces", "none", "", " padded ", '"quoted"', "x=y", "ünï"]}[base]


def test_to_args_round_trips_every_field():
    """Every field of TrainConfig, whatever its type, survives to_args -> parse_cli unchanged."""
    import dataclasses
    import typing
    from helpers.config import to_text
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        for value in _samples(hints[f.name]):
            assert coerce(f.name, hints[f.name], to_text(value)) == value, (f.name, value)
    for typ in (list[int] | None, list[str], list[float]):  # list fields (layer selection) round-trip too
        for value in _samples(typ):
            assert coerce("x", typ, to_text(value)) == value, (typ, value)
    cfg = TrainConfig(parent="/tmp/my models/parent.pt", out_dir="/tmp/a b/run", data_dir="/tmp/my data", compile=True,
                      learning_rate=0.1 + 0.2, min_lr=1e-05, max_tokens=None, init="inherit", device="cpu")
    back = parse_cli(cfg.to_args())
    assert back == cfg and not back.auto_data
    assert [a.split("=", 1)[0] for a in cfg.to_args()] == TrainConfig.field_names()  # no auto_data
    default = TrainConfig(parent="/tmp/p q/x.pt")  # data_dir=None: the default folder, prepared on demand
    again = parse_cli(default.to_args())
    assert again == default and again.auto_data


def test_lists_and_quoted_text_parse():
    assert coerce("layers", list[int] | None, "0,1,5") == [0, 1, 5] == coerce("layers", list[int], "[0, 1, 5]")
    assert coerce("layers", list[int] | None, "none") is None and coerce("init", str, '"none"') == "none"
    with pytest.raises(ConfigError, match=r"layers\[1\]='x' is not a valid int"):
        coerce("layers", list[int], "0,x")


# ---- layer choice and checkpoint cadence (issue 11) ------------------------------------------
def test_strategy_and_layers_reach_the_child_and_its_sidecar(setup, tmp_path):
    from helpers.inherit import calibration_tokens, inherit
    cfg = tiny(setup, tmp_path / "a", strategy="angular", max_iters=2, calib_batches=3)
    train(cfg)
    side = read_sidecar(tmp_path / "a" / "step_0000002.pt")
    sel = side["provenance"]["selection"]
    assert sel["strategy"] == "angular" and len(sel["scores"]["block_influence"]) == 4
    # the scores came from train-split calibration tokens: the same call gives the same kept blocks
    parent = load_model(setup / "parent.pt")
    tokens = calibration_tokens(setup / "data", 3, 32, cfg.seed)
    assert side["provenance"]["layers"] == inherit(parent, 2, strategy="angular", tokens=tokens).provenance["layers"]
    train(tiny(setup, tmp_path / "b", layers="0,3", n_layers=None, max_iters=2))
    assert read_sidecar(tmp_path / "b" / "step_0000002.pt")["provenance"]["layers"] == [0, 3]


def test_calibration_tokens_come_from_the_train_split(setup):
    import numpy as np
    from helpers.data import open_split
    from helpers.inherit import calibration_tokens
    x = calibration_tokens(setup / "data", 4, 16, seed=1)
    assert x.shape == (4, 16) and torch.equal(x, calibration_tokens(setup / "data", 4, 16, seed=1))
    train_ids = np.asarray(open_split(setup / "data", "train"))
    windows = {tuple(train_ids[i:i + 16]) for i in range(len(train_ids) - 16)}
    assert all(tuple(row.tolist()) in windows for row in x)


def test_layer_config_errors():
    with pytest.raises(ConfigError, match="strategy='middle'"):
        TrainConfig.from_dict({"strategy": "middle"})
    with pytest.raises(ConfigError, match="not both"):
        TrainConfig.from_dict({"strategy": "angular", "layers": "[0, 1]"})
    with pytest.raises(ConfigError, match=r"layers\[1\]='x'"):
        TrainConfig.from_dict({"layers": "0,x"})
    with pytest.raises(ConfigError, match="ckpt_interval=3"):
        TrainConfig.from_dict({"ckpt_interval": 3, "eval_interval": 2})
    assert TrainConfig.from_dict({"layers": [0, 5]}).layers == [0, 5]


def test_last_only_checkpoints_and_free_train_loss(setup, tmp_path):
    """ckpt_interval=0: one resumable checkpoint at the end, best.pt weights-only in between;
    eval_train=False: train_loss is the mean of the steps' own losses, val the same as before."""
    a = train(tiny(setup, tmp_path / "a", max_iters=6))
    b = train(tiny(setup, tmp_path / "b", max_iters=6, ckpt_interval=0, eval_train=False))
    assert sorted(p.name for p in (tmp_path / "b").glob("step_*.pt")) == ["step_0000006.pt"]
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-6)
    rows = read_metrics(tmp_path / "b")
    assert rows["train_loss"].isna().tolist() == [True, False, False, False]
    best = read_sidecar(tmp_path / "b" / "best.pt")
    assert best["val_loss"] == rows["val_loss"].min() and "optimizer" not in load_training_state_keys(tmp_path / "b" / "best.pt")
    # the recorded train loss is the mean of the training steps' losses: recompute steps 1..2 by hand
    cfg = tiny(setup, tmp_path / "c", max_iters=6)
    from helpers.train import build_model, configure_optimizer, lr_at
    from helpers.data import get_batch, open_split
    torch.manual_seed(cfg.seed)
    model, _ = build_model(cfg)
    model.train()
    opt = configure_optimizer(model, cfg, torch.device("cpu"))
    sampler = torch.Generator().manual_seed(cfg.seed)
    data = open_split(cfg.data_dir, "train")
    seen = []
    for step in range(2):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg, 6)
        x, y = get_batch(data, cfg.block_size, cfg.batch_size, sampler)
        loss = model(x, y)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen.append(loss.item())
    assert rows["train_loss"].iloc[1] == pytest.approx(sum(seen) / 2, rel=1e-5)


def load_training_state_keys(path):
    from helpers.checkpoint import load_training_state
    return set(load_training_state(path))


def test_best_weights_held_aside_equal_the_checkpointed_best(setup, tmp_path):
    """With ckpt_interval=0 the best evaluation's weights wait in memory and are written once: the
    same best.pt (weights, step, val loss) as the default cadence, where best.pt links a checkpoint."""
    kw = dict(max_iters=12, learning_rate=1.0, min_lr=1.0, warmup_iters=0)  # so high that the best is not the last
    train(tiny(setup, tmp_path / "every", **kw))
    train(tiny(setup, tmp_path / "last", ckpt_interval=0, **kw))
    every, last = read_sidecar(tmp_path / "every" / "best.pt"), read_sidecar(tmp_path / "last" / "best.pt")
    assert every["step"] == last["step"] < 12 and every["val_loss"] == last["val_loss"]
    a, b = load_model(tmp_path / "every" / "best.pt"), load_model(tmp_path / "last" / "best.pt")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert sorted(p.name for p in (tmp_path / "last").glob("*.pt")) == ["best.pt", "step_0000012.pt"]
