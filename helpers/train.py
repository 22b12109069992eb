"""Training: one TrainConfig, a few functions, one visible loop.

    python -m helpers.train [--config FILE.yaml] [key=value ...]
    torchrun --nproc_per_node=2 -m helpers.train key=value ...      (DDP, e.g. Kaggle's 2 x T4)
    torchrun --nproc_per_node=2 -m helpers.train parallel=fsdp ...  (FSDP2: weights, grads, AdamW sharded)

`init` chooses the starting point: "inherit" (the first n_layers of `parent`), "scratch" (the same
shape, randomly initialised: the paper's baseline), "resume" (the run in out_dir), or the path of
any checkpoint; an inherited child keeps the blocks `strategy` (or `layers`) chooses. Every
eval_interval steps one JSON line goes to out_dir/metrics.jsonl, and every ckpt_interval steps
(default: at every evaluation) a checkpoint is written atomically; a run killed at any moment and
resumed logs the same losses as one that never stopped.

The loop is `train()`: evaluate (and record) when due, else one optimizer step. What it stands on
has a module each: helpers.startup (everything before the first step, as one `Run`),
helpers.saving (what an evaluation writes), helpers.parallel (several processes), helpers.records
(metrics.jsonl), helpers.stopping (Ctrl-C and SIGTERM). The top of the training floor: evaluation,
plots and the pipeline do not import it.
"""
import json
import math
import sys
import time

import torch

from helpers.checkpoint import save_checkpoint  # noqa: F401 (importable from here too)
from helpers.config import TrainConfig, coerce, default_root, parse_cli  # noqa: F401
from helpers.data import get_batch
from helpers.errors import HelpersError, RunStopped
from helpers.head_loss import Distill
from helpers.model import GPT
from helpers.parallel import (gather_full_state, gradient_sync, is_sharded, launch,  # noqa: F401
                              load_optimizer_state, make_scaler, shard_model, skip_batch, torchrun_command)
from helpers.records import parse_student_log, progress_bar, read_metrics  # noqa: F401
from helpers.saving import save_evaluation, save_stop
from helpers.startup import (Run, build_model, configure_optimizer, finish_run, load_teacher, start_run,  # noqa: F401
                             total_iters)
from helpers.stopping import StopRequests, stopped


# ---- the loop --------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> dict:
    """Train per cfg; returns the last metrics record. Writes metrics.jsonl and checkpoints. Ctrl-C
    or SIGTERM stop it after the step in progress, with a checkpoint of that step (RunStopped)."""
    cfg.validate()
    run = start_run(cfg)
    if cfg.progress and run.procs.rank == 0:  # what this run computes in (dtype=auto differs by device)
        print(f"train: {run.procs.world} process(es) on {run.device.type}, {run.dtype} ({run.total} steps)", flush=True)
    bar = progress_bar(total=run.total, initial=run.step, desc="train", unit="step", mininterval=1.0, file=sys.stderr,
               disable=not cfg.progress or run.procs.rank != 0)
    record, failed = {}, True
    try:
        with StopRequests() as stop:
            while True:
                if evaluation_due(run):
                    record = evaluate_and_record(run)
                    show(bar, record)
                if run.step >= run.total:
                    break
                train_step(run)
                if run.step % cfg.log_interval == 0 or run.step == run.total:
                    stop_if_diverged(run)  # the one host sync, every log_interval steps
                    bar.update(run.step - bar.n)
                if run.step < run.total and stop.requested(run.procs, run.device):
                    stop_here(run, stop.signum)
        failed = False
    except RunStopped:  # Ctrl-C or SIGTERM: a checkpoint to resume from, not a failure
        failed = False
        raise
    finally:
        bar.close()
        finish_run(run, failed)
    return record


def evaluation_due(run: Run) -> bool:
    """Every eval_interval steps and at the last; not again at the step a resumed run starts from."""
    return (run.step % run.cfg.eval_interval == 0 or run.step == run.total) and run.step != run.resumed_at


def show(bar, record: dict) -> None:
    train_loss, tps = record["train_loss"], record["tokens_per_s"]
    bar.set_postfix(train="-" if train_loss is None else f"{train_loss:.3f}", val=f"{record['val_loss']:.3f}",
                    tok_s=f"{tps:,.0f}" if tps else "-", refresh=False)


def stop_here(run: Run, signum: int | None) -> None:
    """A stop was asked: the evaluation this step owes (if any), a checkpoint of it, one line."""
    if evaluation_due(run):
        evaluate_and_record(run)
    path = save_stop(run, elapsed_s=round(run.elapsed_before + time.time() - run.t_start, 3))
    raise stopped(signum, run.step, path or run.out_dir / f"step_{run.step:07d}.pt", run.out_dir)


def train_step(run: Run) -> None:
    """One optimizer step over grad_accum micro-batches. Every process draws every micro-batch, in
    the same order, and computes only its own: N processes see exactly the samples one process
    with the same grad_accum would."""
    cfg, procs, optimizer = run.cfg, run.procs, run.optimizer
    lr = lr_at(run.step, cfg, run.total)
    for g in optimizer.param_groups:
        g["lr"] = lr
    local_accum = cfg.grad_accum // procs.world
    for micro in range(cfg.grad_accum):
        mine = micro // local_accum == procs.rank
        x, y = get_batch(run.splits["train"], cfg.block_size, cfg.batch_size, run.sampler, run.device) \
            if mine else skip_batch(run.splits["train"], cfg, run.sampler)
        if x is None:
            continue
        last_micro = mine and (micro + 1) % local_accum == 0
        with gradient_sync(run.model, cfg.parallel if procs.ddp else None, last_micro), run.autocast:
            loss = micro_loss(run, x, y) / cfg.grad_accum
        run.scaler.scale(loss).backward() if not procs.ddp else run.scaler.scale(loss * procs.world).backward()
        run.first_bad = torch.where((run.first_bad < 0) & ~torch.isfinite(loss.detach()), run.step, run.first_bad)
        if not cfg.eval_train:
            run.train_sum += loss.detach().float()
    if cfg.grad_clip > 0:
        run.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), cfg.grad_clip)
    run.scaler.step(optimizer)
    run.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.train_steps += 1
    run.tokens_seen += run.tokens_per_step
    run.tokens_timed += run.tokens_per_step


def micro_loss(run: Run, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss of one micro-batch: cross-entropy, or with a teacher the distillation objective
    (its two parts summed for the record)."""
    if run.teacher is None:
        return run.model(x, y)[1]
    distill = teacher_batch(run.teacher, x, run.cfg)
    _, loss = run.model(x, y, distill=distill)
    run.kd_sums += torch.stack(distill.parts).float()
    run.kd_count += 1
    return loss


def stop_if_diverged(run: Run) -> None:
    bad = int(run.first_bad.item())
    if bad >= 0:
        raise FloatingPointError(f"step {bad}: the training loss is NaN or infinite; stopped. The last good "
                                 f"checkpoint is kept in {run.out_dir}; lower learning_rate or use dtype=bfloat16")


def evaluate_and_record(run: Run) -> dict:
    """The evaluation at run.step: losses, throughput and (with a teacher) the distillation parts
    as one metrics record, written with any checkpoint due (helpers.saving)."""
    cfg, step = run.cfg, run.step
    losses = estimate_loss(run.model, run.splits, cfg, step, run.device, run.autocast)
    if not cfg.eval_train:  # the mean loss of this process's training steps since the last evaluation
        losses["train"] = (run.train_sum * run.procs.world / run.train_steps).item() if run.train_steps else None
        run.train_sum, run.train_steps = torch.zeros((), device=run.device), 0
    now = time.time()
    tps = run.tokens_timed / (now - run.t_window) if run.tokens_timed else None
    flops_per_step = run.raw_model.flops_per_token(cfg.block_size) * run.tokens_per_step
    record = {"step": step, "tokens": run.tokens_seen, "lr": lr_at(min(step, run.total - 1), cfg, run.total),
              "train_loss": losses["train"], "val_loss": losses["val"], "tokens_per_s": tps,
              "mfu": mfu(tps, flops_per_step / run.tokens_per_step, peak_flops(run.device), run.procs.world),
              "elapsed_s": round(run.elapsed_before + now - run.t_start, 3), "init": cfg.init}
    if run.teacher is not None:  # the distillation objective on the training batches since the last record
        ce, kd = (run.kd_sums / run.kd_count).tolist() if run.kd_count else (None, None)
        record.update(ce_loss=ce, kd_loss=kd, total_loss=None if ce is None else
                      (1 - cfg.kd_alpha) * ce + cfg.kd_alpha * kd)
        run.kd_sums.zero_()
        run.kd_count = 0
    if not all(math.isfinite(v) for v in (losses["train"], losses["val"]) if v is not None):
        raise FloatingPointError(f"step {step}: evaluation loss is {losses}; training diverged. The last "
                                 f"good checkpoint is kept in {run.out_dir}; lower learning_rate")
    save_evaluation(run, record, losses)
    run.t_window, run.tokens_timed = time.time(), 0
    return record


# ---- pure pieces -----------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig, total_iters: int) -> float:
    """Linear warm-up to learning_rate, then cosine decay to min_lr at lr_decay_iters."""
    decay_end = cfg.lr_decay_iters or total_iters
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if step >= decay_end:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / max(1, decay_end - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12,
              "A10": 125e12, "V100": 125e12, "T4": 65e12, "P100": 18.7e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16/fp16 tensor-core peak of known GPUs (None on CPU or an unknown device)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def mfu(tokens_per_s: float | None, flops_per_token: float, peak_per_device: float | None, n_devices: int) -> float | None:
    """Model FLOPs utilisation: the FLOPs all processes did per second over the peak of all their devices."""
    if not tokens_per_s or not peak_per_device:
        return None
    return tokens_per_s * flops_per_token / (peak_per_device * n_devices)


@torch.no_grad()
def teacher_batch(teacher: GPT, x: torch.Tensor, cfg: TrainConfig) -> Distill:
    """The teacher's side of one micro-batch: its final hidden states, and its head."""
    return Distill(teacher.hidden(x), teacher.lm_head.weight, cfg.kd_alpha, cfg.kd_temperature)


@torch.no_grad()
def estimate_loss(model, splits: dict, cfg: TrainConfig, step: int, device, autocast) -> dict:
    """Mean loss over eval_iters random batches per split, drawn from a generator seeded by
    (seed, step): the same batches whatever happened before, and the training sampler is untouched.
    With eval_train=False only val is estimated (train_loss then comes from the training steps)."""
    raw = getattr(model, "module", model)  # the model inside DistributedDataParallel
    raw = getattr(raw, "_orig_mod", raw)  # and inside torch.compile
    # the loss only, no (tokens, vocab) logits, for our own model; a sharded (FSDP) model gathers its
    # root weights in forward() only, and a transformers model (generic path) has its own head
    loss_only = isinstance(raw, GPT) and not is_sharded(raw)
    model.eval()
    out = {}
    for name, data in splits.items():
        if name == "train" and not cfg.eval_train:
            continue
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 2 + (name == "val"))
        losses = torch.zeros(cfg.eval_iters, device=device)
        for k in range(cfg.eval_iters):
            x, y = get_batch(data, cfg.block_size, cfg.batch_size, g, device)
            with autocast:
                if loss_only:
                    total, count = raw.loss_sum(x, y)
                    losses[k] = total / count
                else:
                    losses[k] = model(x, y)[1].float()
        out[name] = losses.mean().item()
    model.train()
    return out


def main(argv=None):
    try:
        cfg = parse_cli(sys.argv[1:] if argv is None else argv)
        record = train(cfg)
    except RunStopped as e:
        print(e, file=sys.stderr)
        return 128 + e.signum  # as a shell reports a process ended by that signal
    except HelpersError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if record:
        print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
