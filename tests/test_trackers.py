"""report_to=tensorboard|wandb mirrors metrics.jsonl, offline: TensorBoard's own reader finds the
same values, step for step, in out_dir/tensorboard; a W&B run in offline mode writes its local run
folder with the same rows; a resumed run continues the same tracker run; a missing package or an
unknown name is one ConfigError. Tests that need a tracker's package skip without it."""
import json
import struct
import sys
import time
from pathlib import Path

import pytest

from helpers.errors import ConfigError
from helpers.trackers import open_tracker, scalars
from helpers.train import TrainConfig, parse_cli, train
from test_parallel import torchrun
from test_train import setup, tiny  # noqa: F401, F811 (setup is a fixture)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(out) -> dict:
    """{tag: [(step, value), ...]} as TensorBoard's reader loads out_dir/tensorboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(Path(out) / "tensorboard"), size_guidance={"scalars": 0})  # 0: keep all
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def as_float32(value: float) -> float:
    """A number as a TensorBoard scalar holds it (float32)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def expected_scalars(rows: list[dict]) -> dict:
    """metrics.jsonl's numbers as tensorboard_scalars gives them (None and text are not plotted)."""
    tags = {}
    for row in rows:
        for key, value in scalars(row).items():
            tags.setdefault(key, []).append((row["step"], as_float32(value)))
    return tags


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (run-ID.wandb): a 7-byte header (:W&B, magic, version), then
    LevelDB-log chunks (crc32 4, length 2, type 1: full/first/middle/last) in 32 KiB blocks, each
    record a wandb_internal_pb2.Record. W&B has no public reader of an offline run's file."""
    from wandb.proto import wandb_internal_pb2
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the block's end
            pos += block - pos % block
            continue
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, or the last chunk of a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def finished_records(path: Path, timeout_s: float = 60) -> list:
    """The records of a finished run's file: W&B's service may still be writing it when finish()
    returns (seen here: only the header, a moment after), so wait for the last record, `exit`."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def wandb_runs(wandb_dir: Path) -> list[dict]:
    """Each offline run folder under wandb_dir/wandb, oldest first: its run id, config and history
    rows (W&B's own keys, `_step`, `_runtime`, `_timestamp`, left out)."""
    runs = []
    for folder in sorted((wandb_dir / "wandb").glob("offline-run-*")):
        run = {"folder": folder, "history": []}
        for record in finished_records(next(folder.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["id"] = record.run.run_id
                run["config"] = {u.key: json.loads(u.value_json) for u in record.run.config.update}
            elif kind == "exit":
                run["exit_code"] = record.exit.exit_code
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                run["history"].append({k: v for k, v in row.items() if not k.startswith("_")})
        runs.append(run)
    return runs


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B offline and quiet, every folder it writes inside tmp_path; returns WANDB_DIR."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    return tmp_path / "wandb_dir"


def test_tensorboard_event_files_hold_the_metrics(setup, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    train(tiny(setup, out, report_to="tensorboard"))
    rows = metrics(out)
    assert [r["step"] for r in rows] == [0, 2, 4, 6]
    found = tensorboard_scalars(out)
    assert found == expected_scalars(rows)
    assert {"train_loss", "val_loss", "lr", "tokens", "tokens_per_s", "elapsed_s"} <= set(found)
    assert [s for s, _ in found["tokens_per_s"]] == [2, 4, 6]  # None at step 0: not plotted


def test_wandb_offline_run_folder_holds_the_metrics(setup, tmp_path, wandb_offline):
    out = tmp_path / "run"
    train(tiny(setup, out, report_to="wandb"))
    (run,) = wandb_runs(wandb_offline)
    assert run["id"] == (out / "wandb_run_id").read_text().strip()
    assert run["folder"].name.endswith(f"-{run['id']}")
    assert run["config"]["report_to"] == "wandb" and run["config"]["max_iters"] == 6
    assert run["history"] == [{"step": r["step"], **scalars(r)} for r in metrics(out)]  # JSON numbers: exact


def test_wandb_folder_defaults_to_out_dir(setup, tmp_path, wandb_offline, monkeypatch):
    monkeypatch.delenv("WANDB_DIR")
    out = tmp_path / "run"
    train(tiny(setup, out, report_to="wandb", max_iters=2))
    (run,) = wandb_runs(out)
    assert [row["step"] for row in run["history"]] == [0, 2]
    assert not wandb_offline.exists()


@pytest.mark.slow
def test_only_process_0_writes_to_the_tracker(setup, tmp_path):
    """Two DDP processes (torchrun, gloo): one event file, holding metrics.jsonl's values."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    torchrun(tiny(setup, out, report_to="tensorboard", max_iters=4, grad_accum=2, device="cpu"))
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert tensorboard_scalars(out) == expected_scalars(metrics(out))


def kill_after_checkpoint(out: Path) -> None:
    """As if the run had been killed after logging steps 6 and 8 but before step 8's checkpoint:
    the last checkpoint is step 4's; metrics.jsonl and the tracker hold 6 and 8 too."""
    for path in out.glob("step_0000008.*"):
        path.unlink()


def test_resume_continues_the_tensorboard_run(setup, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    settings = dict(report_to="tensorboard", max_iters=8, ckpt_interval=4)
    train(tiny(setup, out, **settings))
    kill_after_checkpoint(out)
    train(tiny(setup, out, init="resume", **settings))
    rows = metrics(out)
    assert [r["step"] for r in rows] == [0, 2, 4, 6, 8]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one folder, a file per process
    # steps 6 and 8 once each, from the resumed run (its elapsed_s, not the killed run's)
    assert tensorboard_scalars(out) == expected_scalars(rows)


def test_resume_continues_the_wandb_run(setup, tmp_path, wandb_offline):
    out = tmp_path / "run"
    settings = dict(report_to="wandb", max_iters=8, ckpt_interval=4)
    train(tiny(setup, out, **settings))
    run_id = (out / "wandb_run_id").read_text()
    kill_after_checkpoint(out)
    time.sleep(1)  # W&B names a run's folder by the second it starts (a real resume is never this quick)
    train(tiny(setup, out, init="resume", **settings))
    assert (out / "wandb_run_id").read_text() == run_id
    first, resumed = wandb_runs(wandb_offline)  # offline, each process writes a folder of the same run
    assert first["id"] == resumed["id"] == run_id.strip()
    assert [row["step"] for row in first["history"]] == [0, 2, 4, 6, 8]
    rows = metrics(out)
    assert resumed["history"] == [{"step": r["step"], **scalars(r)} for r in rows if r["step"] > 4]
    # a fresh run in another out_dir is another W&B run
    train(tiny(setup, tmp_path / "other", report_to="wandb", max_iters=2))
    assert (tmp_path / "other" / "wandb_run_id").read_text() != run_id


def test_a_failed_run_shows_as_failed_in_wandb(setup, tmp_path, wandb_offline):
    """A run that ends in an error (a diverged loss) closes its W&B run with a non-zero exit code,
    so it shows as failed, not finished; a run that completes exits 0."""
    with pytest.raises(FloatingPointError):
        train(tiny(setup, tmp_path / "nan", report_to="wandb", learning_rate=1e30, min_lr=1e29, warmup_iters=0,
                   max_iters=20))
    time.sleep(1)  # W&B names a run's folder by the second it starts
    train(tiny(setup, tmp_path / "ok", report_to="wandb", max_iters=2))
    failed, finished = wandb_runs(wandb_offline)
    assert failed["exit_code"] != 0 and finished["exit_code"] == 0


@pytest.mark.parametrize("report_to", ["tensorboard", "wandb"])
def test_a_missing_package_is_one_config_error_naming_the_extra(setup, tmp_path, monkeypatch, report_to):
    monkeypatch.setitem(sys.modules, report_to, None)  # `import report_to` fails, find_spec finds nothing
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # even where torch's writer was imported
    out = tmp_path / "run"
    message = rf"report_to={report_to}: the {report_to} package is not installed; .*inheritune-helpers\[{report_to}\]"
    with pytest.raises(ConfigError, match=message):
        train(tiny(setup, out, report_to=report_to))  # before the model loads
    assert not (out / "metrics.jsonl").exists()
    with pytest.raises(ConfigError, match=message):  # and where the package is found but does not import
        open_tracker(report_to, tmp_path, {}, resumed_at=None)


def test_report_to_is_a_setting_with_known_values():
    assert TrainConfig().report_to == "none"
    assert parse_cli(["report_to=tensorboard"]).report_to == "tensorboard"
    with pytest.raises(ConfigError, match="report_to='mlflow': choose one of none, tensorboard, wandb"):
        TrainConfig.from_dict({"report_to": "mlflow"})


def test_report_to_none_is_the_text_none_everywhere():
    """`none` is report_to's value, not a missing one: from the command line, from a notebook's
    parameter (papermill passes the text) and through to_args (the torchrun launch line)."""
    from helpers.config import TrainConfig, parse_cli
    assert parse_cli(["report_to=none"]).report_to == "none"
    assert TrainConfig.from_dict({"report_to": "none", "out_dir": "x"}).report_to == "none"
    assert parse_cli(TrainConfig(out_dir="x").to_args()).report_to == "none"
