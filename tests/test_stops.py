"""Runs that are stopped, starved or doubled lose nothing and say so in one line: Ctrl-C and SIGTERM
write a checkpoint of the step reached and resume exactly; a full disk is one StorageError naming
out_dir and the checkpoint to resume from; a second run on a busy out_dir is refused by name."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import helpers.saving
import helpers.train
from helpers.checkpoint import load_model
from helpers.errors import ConfigError, RunStopped, StorageError
from helpers.train import train
from tests.test_train import cli_args, losses, run_cli, tiny


@pytest.fixture(scope="module")
def setup(train_inputs):
    return train_inputs


def stop_at(monkeypatch, step: int, sig=signal.SIGINT):
    """The signal arrives (from this very process, as a notebook's interrupt would) during `step`."""
    real = helpers.train.train_step

    def step_then_signal(run):
        real(run)
        if run.step == step:
            signal.raise_signal(sig)
    monkeypatch.setattr(helpers.train, "train_step", step_then_signal)


def test_ctrl_c_writes_the_step_and_a_resume_logs_what_an_unstopped_run_would(setup, tmp_path, monkeypatch):
    """Stopped between two evaluations (step 3 of 8, evaluations every 2): the checkpoint holds that
    step, including the training-loss sums since the last evaluation (eval_train=False), so the
    resumed run's records equal those of a run that never stopped (dropout on: RNG matters too)."""
    kw = dict(max_iters=8, dropout=0.1, eval_train=False)
    train(tiny(setup, tmp_path / "full", **kw))
    stop_at(monkeypatch, 3)
    with pytest.raises(RunStopped) as stop:
        train(tiny(setup, tmp_path / "stopped", **kw))
    monkeypatch.undo()
    message = str(stop.value)
    assert "stopped by SIGINT at step 3" in message and "init=resume" in message and "\n" not in message
    assert stop.value._render_traceback_() == [f"RunStopped: {message}"]  # what a notebook shows: one line
    assert (tmp_path / "stopped" / "step_0000003.pt").is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is given back
    assert [s for s, _, _ in losses(tmp_path / "stopped")] == [0, 2]
    train(tiny(setup, tmp_path / "stopped", init="resume", **kw))
    assert losses(tmp_path / "stopped") == losses(tmp_path / "full")


def test_a_stop_at_an_evaluation_step_records_it_once(setup, tmp_path, monkeypatch):
    stop_at(monkeypatch, 4, signal.SIGTERM)
    with pytest.raises(RunStopped, match="SIGTERM at step 4"):
        train(tiny(setup, tmp_path / "s", max_iters=8, ckpt_interval=0))  # checkpoints at the end only
    monkeypatch.undo()
    assert [s for s, _, _ in losses(tmp_path / "s")] == [0, 2, 4]
    assert (tmp_path / "s" / "step_0000004.pt").is_file()
    train(tiny(setup, tmp_path / "s", max_iters=8, ckpt_interval=0, init="resume"))
    assert [s for s, _, _ in losses(tmp_path / "s")] == [0, 2, 4, 6, 8]


def test_sigterm_from_outside_ends_the_command_line_run_in_one_line(setup, tmp_path, reference_run):
    """What a scheduler or Kaggle does: SIGTERM to `python -m helpers.train`. It exits 143 with one
    line (no traceback) naming the checkpoint, and the resumed run completes the same record as the
    run that never stopped (test_train's reference run of the same arguments)."""
    proc = run_cli(cli_args(setup, tmp_path / "t"), stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "t" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("stopped by SIGTERM at step")
    step = int(err.split("at step ")[1].split(";")[0])
    assert 8 <= step < 40 and (tmp_path / "t" / f"step_{step:07d}.pt").is_file()
    assert run_cli(cli_args(setup, tmp_path / "t", init="resume")).wait() == 0
    assert losses(tmp_path / "t") == losses(reference_run)


def test_a_full_disk_is_one_error_naming_the_checkpoint_to_resume(setup, tmp_path, monkeypatch):
    """The third checkpoint write fails as torch fails on a full disk (RuntimeError over ENOSPC):
    one StorageError names out_dir, the space and the last intact checkpoint, which still loads."""
    real, calls = helpers.saving.save_checkpoint, []

    def fills_the_disk(path, *a, **kw):
        calls.append(path)
        if len(calls) == 3:
            Path(path).with_name(f".{Path(path).name}.tmp").unlink(missing_ok=True)
            try:
                raise OSError(28, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real(path, *a, **kw)
    monkeypatch.setattr(helpers.saving, "save_checkpoint", fills_the_disk)
    out = tmp_path / "d"
    with pytest.raises(StorageError) as full:
        train(tiny(setup, out, max_iters=8))
    message = str(full.value)
    assert f"out_dir={out}" in message and "GB free" in message and "needs about" in message
    assert f"the last intact checkpoint is {out / 'step_0000002.pt'}" in message and "init=resume" in message
    load_model(out / "step_0000002.pt")


def test_another_error_while_saving_is_not_called_a_full_disk(setup, tmp_path, monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("something else")
    monkeypatch.setattr(helpers.saving, "save_checkpoint", broken)
    with pytest.raises(RuntimeError, match="something else"):
        train(tiny(setup, tmp_path / "b", max_iters=2))


@pytest.fixture
def small_disk(tmp_path):
    """A real 40 MB filesystem (tmpfs), where this machine lets us mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40M", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_real_full_disk(setup, small_disk):
    """The tiny child's checkpoint is ~19 MB: the preflight passes, the third write fills the disk."""
    out = small_disk / "run"
    with pytest.raises(StorageError, match="the disk is full at step 4") as full:
        train(tiny(setup, out, max_iters=8, keep_last=3))
    assert "step_0000002.pt (step 2)" in str(full.value)
    assert not list(out.glob(".*.tmp"))  # the partial file is gone
    assert torch.isfinite(load_model(out / "step_0000002.pt").transformer.wte.weight).all()


def test_one_run_per_out_dir(setup, tmp_path):
    """init=resume while the run is still going is refused, naming its process; once that process
    is killed (SIGKILL: nothing cleans up) the lock is gone with it and the resume proceeds."""
    args = dict(max_iters=2000, eval_interval=2)
    proc = run_cli(cli_args(setup, tmp_path / "r", **args))
    metrics = tmp_path / "r" / "metrics.jsonl"
    try:
        deadline = time.time() + 60
        while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
            time.sleep(0.02)
        with pytest.raises(ConfigError, match=f"in use by another run \\(process {proc.pid}\\)"):
            train(tiny(setup, tmp_path / "r", init="resume", max_iters=2000))
    finally:
        proc.kill()
        proc.wait()
    before = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    train(tiny(setup, tmp_path / "r", init="resume", max_iters=before[-1] + 2))
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()][-1] == before[-1] + 2
