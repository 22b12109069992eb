"""What a training run writes: at an evaluation the metrics line and (every ckpt_interval steps) a
resumable checkpoint, best.pt, and the removal of step checkpoints beyond keep_last; at a stop
(Ctrl-C, SIGTERM) a checkpoint of the step reached. A best seen between checkpoints is held in
memory until the next one (no disk write per improvement). A full disk is one StorageError.
A LoRA run's checkpoint holds the adapters and the tensors trained in full, with their AdamW state,
and the record that rebuilds the frozen base (helpers.lora), not a second copy of the base.
Floor "training": uses startup's Run, parallel (gathering FSDP shards), checkpoint, lora.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from helpers.checkpoint import save_checkpoint
from helpers.config import TrainConfig
from helpers.errors import StorageError
from helpers.files import is_disk_full
from helpers.lora import record_of, trainable_state
from helpers.parallel import GatheredModel, gather_full_state
from helpers.records import append_record
from helpers.startup import Run, rng_state


def save_evaluation(run: Run, record: dict, losses: dict) -> None:
    """Record one evaluation: every process takes part in gathering a sharded model; process 0
    appends the metrics line and writes what is due."""
    saved_model, saved_optimizer = gathered(run)
    if run.procs.rank != 0:
        return
    append_record(run.out_dir, record)
    if run.tracker is not None:
        run.tracker.log(record)
    improved = losses["val"] < run.best_val
    run.best_val = min(run.best_val, losses["val"])
    state = run_state(run, saved_optimizer, elapsed_s=record["elapsed_s"], val_loss=losses["val"],
                      train_loss=losses["train"])
    if checkpoint_due(run.step, run.total, run.cfg):
        write_checkpoint(run, saved_model, state, improved)
    elif improved:  # held in memory until the next checkpoint: no disk write per improvement
        run.best_aside = (weights_aside(saved_model, reuse=run.best_aside and run.best_aside[0]),
                          {k: v for k, v in state.items() if k != "optimizer"})


def save_stop(run: Run, elapsed_s: float) -> Path | None:
    """A resumable checkpoint of the step a stopped run reached (and the best held aside, if any):
    resumed, the run logs what it would have logged without the stop. Every process calls it."""
    saved_model, saved_optimizer = gathered(run)
    if run.procs.rank != 0:
        return None
    path = run.out_dir / f"step_{run.step:07d}.pt"
    if not path.exists():  # an evaluation at this very step may have written it already
        write_checkpoint(run, saved_model, run_state(run, saved_optimizer, elapsed_s=elapsed_s), improved=False)
    return path


def gathered(run: Run):
    """(model, optimizer state or None) as a checkpoint holds them: a sharded model's full weights
    and AdamW state are gathered collectively, a plain model is itself, a model with LoRA adapters
    its trainable part."""
    if record_of(run.raw_model) is not None:
        return GatheredModel(run.raw_model, trainable_state(run.raw_model)), None
    return gather_full_state(run.raw_model, run.optimizer) if run.sharded else (run.raw_model, None)


def run_state(run: Run, saved_optimizer, **extra) -> dict:
    """What a checkpoint holds besides the weights: everything the next step depends on."""
    return dict(optimizer=saved_optimizer or run.optimizer.state_dict(), scaler=run.scaler.state_dict(),
                sampler=run.sampler.get_state(), rng=rng_state(), step=run.step, tokens_seen=run.tokens_seen,
                best_val_loss=run.best_val, train_config=dataclasses.asdict(run.cfg),
                data_meta={"source": run.meta["source"], "tokenizer": run.meta["tokenizer"]},
                # sums since the last evaluation, so that a run stopped between two resumes exactly
                since_eval=dict(train_sum=run.train_sum.item(), train_steps=run.train_steps,
                                kd_sums=run.kd_sums.tolist(), kd_count=run.kd_count),
                **({"lora": record_of(run.raw_model)} if record_of(run.raw_model) else {}),
                **{"val_loss": None, "train_loss": None, **extra})


def write_checkpoint(run: Run, model, state: dict, improved: bool) -> None:
    """step_N.pt (+ best.pt when `improved`, or from the best held aside), then the step
    checkpoints beyond keep_last removed. A full disk is one StorageError naming what to resume."""
    out_dir = run.out_dir
    try:
        path = save_checkpoint(out_dir / f"step_{run.step:07d}.pt", model, **state)
        if improved:
            for src, dst in ((path, out_dir / "best.pt"), (path.with_suffix(".json"), out_dir / "best.json")):
                link_or_copy(src, dst)
        elif run.best_aside is not None:  # a best seen since the last checkpoint: weights only
            save_checkpoint(out_dir / "best.pt", run.best_aside[0], **run.best_aside[1])
    except (OSError, RuntimeError) as e:
        if not is_disk_full(e):
            raise
        raise disk_full(run) from None
    run.best_aside = None
    for old in sorted(out_dir.glob("step_*.pt"))[:-run.cfg.keep_last]:
        old.unlink()
        old.with_suffix(".json").unlink(missing_ok=True)


def disk_full(run: Run) -> StorageError:
    """The one error of a checkpoint write that filled the disk: out_dir, the space a checkpoint
    needs, and the last intact checkpoint (writes are atomic: a partial file never stays)."""
    need = sum(p.numel() for p in run.raw_model.parameters() if p.requires_grad) * 4 * 3  # weights + AdamW, float32
    free = shutil.disk_usage(run.out_dir).free
    intact = sorted(run.out_dir.glob("step_*.pt"))
    last = f"the last intact checkpoint is {intact[-1]} (step {int(intact[-1].stem[5:])})" if intact else \
        "no checkpoint was written yet"
    return StorageError(f"out_dir={run.out_dir}: the disk is full at step {run.step} ({free / 1e9:.2f} GB free, a "
                        f"checkpoint needs about {need / 1e9:.2f} GB); {last}: free space (or move out_dir) and "
                        "continue with init=resume")


def checkpoint_due(step: int, total: int, cfg: TrainConfig) -> bool:
    """Whether the evaluation at `step` also writes a resumable checkpoint (weights + optimizer)."""
    if step >= total or cfg.ckpt_interval is None:
        return True
    return cfg.ckpt_interval > 0 and step % cfg.ckpt_interval == 0


def weights_aside(model, reuse: GatheredModel | None = None) -> GatheredModel:
    """A copy of a model's weights on the CPU (tied tensors stay tied), as save_checkpoint reads it.
    `reuse`: an earlier copy of the same model whose tensors are overwritten in place (no fresh
    allocation of the whole model, and its page faults, at every improvement)."""
    if reuse is not None:
        for k, v in model.state_dict().items():
            reuse._state[k].copy_(v.detach())  # tied tensors share storage: copied twice, still tied
        reuse.provenance = dict(model.provenance)
        return reuse
    copies = {}
    state = {k: copies.setdefault(v.data_ptr(), v.detach().to("cpu", copy=True)) for k, v in model.state_dict().items()}
    return GatheredModel(model, state)


def link_or_copy(src: Path, dst: Path) -> None:
    """dst becomes a hard link to src (no second gigabyte on disk), or a copy where links fail."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy(src, tmp)
    os.replace(tmp, dst)
