"""Experiment trackers: `report_to=tensorboard|wandb` mirrors each line a run appends to
out_dir/metrics.jsonl into TensorBoard event files (out_dir/tensorboard) or a Weights & Biases run,
for people who watch a long run there. metrics.jsonl stays the record (the plots and the comparison
read it, never a tracker). Only process 0 opens a tracker. A resumed run continues the same tracker
run: TensorBoard's folder, where the events the stopped run logged after its checkpoint are purged as
metrics.jsonl drops their lines; the W&B run whose id out_dir/wandb_run_id keeps.
Floor "training", its first module (config reads REPORT_TO): uses the errors only; tensorboard and
wandb are optional extras, imported when a run asks for one.
"""
from __future__ import annotations

import importlib.util
import os
import secrets
from pathlib import Path

from helpers.errors import ConfigError

REPORT_TO = ("none", "tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"  # under out_dir
WANDB_ID = "wandb_run_id"  # under out_dir: the W&B run a resumed run continues


def check_installed(report_to: str) -> None:
    """The tracker's package is importable (found, not imported: cheap enough to run before the
    model loads), else one ConfigError naming the extra to install."""
    if report_to != "none" and importlib.util.find_spec(report_to) is None:
        raise not_installed(report_to)


def not_installed(report_to: str) -> ConfigError:
    return ConfigError(f"report_to={report_to}: the {report_to} package is not installed; install the extra "
                       f"(pip install 'inheritune-helpers[{report_to}]', or pip install {report_to}) or use report_to=none")


def open_tracker(report_to: str, out_dir: Path, config: dict, resumed_at: int | None):
    """The tracker of report_to (None for none), with `log(record)` and `close(failed)`. `config`: the run's
    settings (W&B shows them with the run); `resumed_at`: the step a resumed run continues from."""
    if report_to == "tensorboard":
        return TensorBoardTracker(Path(out_dir), resumed_at)
    if report_to == "wandb":
        return WandbTracker(Path(out_dir), config, resumed=resumed_at is not None)
    return None


def scalars(record: dict) -> dict:
    """The numbers of a metrics line, step aside (text such as `init`, and None, are not plotted)."""
    return {k: v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardTracker:
    """Event files in out_dir/tensorboard, one scalar per metrics key at the record's step (stored
    as float32, as TensorBoard stores every scalar)."""

    def __init__(self, out_dir: Path, resumed_at: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        except ImportError:
            raise not_installed("tensorboard") from None
        # resumed: steps after the checkpoint's are purged from the earlier event files (the stopped
        # run may have logged some); they are logged again
        purge_step = None if resumed_at is None else resumed_at + 1
        self.writer = SummaryWriter(log_dir=str(out_dir / TENSORBOARD_DIR), purge_step=purge_step)

    def log(self, record: dict) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, global_step=record["step"])
        self.writer.flush()  # an evaluation at a time: a live TensorBoard shows it at once

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run (project $WANDB_PROJECT, else inheritune; named after out_dir) whose x-axis is the
    metrics' `step`. Its local folder goes to $WANDB_DIR, else out_dir/wandb; WANDB_MODE=offline
    writes only that folder (`wandb sync` uploads it later)."""

    def __init__(self, out_dir: Path, config: dict, resumed: bool):
        try:
            import wandb
        except ImportError:
            raise not_installed("wandb") from None
        id_file = out_dir / WANDB_ID
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else secrets.token_hex(4)
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "inheritune"), name=out_dir.resolve().name,
                                  id=run_id, resume="allow", config=config,
                                  dir=os.environ.get("WANDB_DIR") or str(out_dir))
        except wandb.errors.UsageError as e:  # not logged in, above all
            raise ConfigError(f"report_to=wandb: W&B cannot start a run ({e}); log in (wandb login, or "
                              "WANDB_API_KEY), or set WANDB_MODE=offline to write the run locally") from None
        id_file.write_text(run_id + "\n")
        # the x-axis is our step, not W&B's own counter: a resumed run logs again the steps the stopped
        # run logged after its checkpoint, which W&B would drop as going back in time
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, record: dict) -> None:
        self.run.log({"step": record["step"], **scalars(record)})

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)  # a run that ended in an error shows as failed
