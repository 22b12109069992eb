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
"""
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from helpers.config import TrainConfig, coerce, default_root, parse_cli  # noqa: F401 (importable from here too)
from helpers.checkpoint import atomic_write, load_model, load_training_state, save_checkpoint, unwritable_reason
from helpers.data import get_batch, open_split, prepare, read_meta
from helpers.errors import ConfigError, DataError, HelpersError
from helpers.generic import scratch_like
from helpers.head_loss import Distill
from helpers.inherit import SCORE_OF, calibration_tokens, inherit
from helpers.model import GPT


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


def total_iters(cfg: TrainConfig) -> int:
    if cfg.max_iters is not None:
        return cfg.max_iters
    return math.ceil(cfg.max_tokens / (cfg.batch_size * cfg.block_size * cfg.grad_accum))


def resolve_device(cfg: TrainConfig) -> tuple[torch.device, torch.dtype]:
    if cfg.device == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        dev = cfg.device
    device = torch.device(dev)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device!r} but no CUDA GPU is visible; use device=cpu or auto")
    if cfg.dtype == "auto":
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32
    else:
        dtype = getattr(torch, cfg.dtype)
    return device, dtype


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


def configure_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
             "numpy": np.random.get_state()[1].tolist(), "numpy_pos": int(np.random.get_state()[2])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- building the model ----------------------------------------------------------------------
def build_model(cfg: TrainConfig) -> tuple[GPT, dict | None]:
    """(model, training state to resume from or None) for cfg.init."""
    if cfg.init == "resume":
        ck = latest_checkpoint(cfg.out_dir)
        if ck is None:
            raise ConfigError(f"init=resume: no checkpoint in out_dir={cfg.out_dir}; start with init=inherit or scratch")
        return load_model(ck), load_training_state(ck)
    if cfg.init in ("inherit", "scratch"):
        parent = load_model(cfg.parent)
        n = cfg.n_layers or (len(cfg.layers) if cfg.layers else max(1, parent.config.n_layer // 2))
        try:
            if cfg.init == "scratch":  # the shape is all that counts
                child = inherit(parent, n)
            else:
                tokens = calibration_tokens(cfg.data_dir, cfg.calib_batches, min(cfg.block_size, parent.config.block_size),
                                            cfg.seed) \
                    if cfg.strategy in SCORE_OF and cfg.layers is None else None
                child = inherit(parent, n, cfg.layers, cfg.strategy, cfg.copy, tokens)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if cfg.init == "scratch":
            torch.manual_seed(cfg.seed)
            scratch = GPT(child.config) if isinstance(child, GPT) else scratch_like(child, cfg.seed)
            scratch.provenance = {"tokenizer": parent.provenance.get("tokenizer"), "source": "scratch",
                                  "shape_of": f"first {n} layers of {cfg.parent}"}
            child = scratch
        del parent
        model = child
    else:
        model = load_model(cfg.init)
    if cfg.dropout != model.config.dropout and not isinstance(model, GPT):
        raise ConfigError(f"dropout={cfg.dropout}: a transformers model (generic path) trains with the dropout "
                          "of its own config; leave dropout=0")
    if cfg.dropout != model.config.dropout:  # dropout is a training choice, not part of the weights
        rebuilt = GPT(dataclasses.replace(model.config, dropout=cfg.dropout))
        rebuilt.load_state_dict(model.state_dict())
        rebuilt.provenance = model.provenance
        model = rebuilt
    return model, None


def latest_checkpoint(out_dir) -> Path | None:
    steps = sorted(Path(out_dir).glob("step_*.pt"))
    return steps[-1] if steps else None


def check_data_fits_model(meta: dict, model: GPT, data_dir) -> None:
    tok = meta["tokenizer"]
    model_tok = model.provenance.get("tokenizer")
    if tok["n_vocab"] > model.config.vocab_size:
        raise DataError(f"{data_dir}: tokenized with {tok['name']} ({tok['n_vocab']:,} ids) but the model's vocabulary "
                        f"has {model.config.vocab_size:,}; prepare the data with tokenizer={model_tok or 'the model source'}")
    if model_tok:
        from helpers.tokenizer import get_encoding
        try:
            model_enc = get_encoding(None if model_tok == "gpt2" else model_tok)
        except HelpersError:
            return  # the model's tokenizer source is gone; the vocabulary size check above still holds
        if model_enc.name != tok["name"] and not {model_enc.name, tok["name"]} <= {"gpt2", "r50k_base"}:
            raise DataError(f"{data_dir}: tokenized with {tok['name']}, but the model uses {model_enc.name}; "
                            f"prepare the data with tokenizer={model_tok}")


def load_teacher(cfg: TrainConfig, student: GPT, device) -> GPT:
    """The frozen teacher of distillation (cfg.teacher: "parent" or any model source) on the
    student's device and in its dtype, in eval mode, without gradients. A teacher with another
    vocabulary or tokenizer is refused: its probabilities would be over other tokens."""
    source = cfg.parent if cfg.teacher == "parent" else cfg.teacher
    teacher = load_model(source)
    if not isinstance(student, GPT) or not isinstance(teacher, GPT):
        kind = (student if not isinstance(student, GPT) else teacher).config.family
        raise ConfigError(f"teacher={cfg.teacher}: distillation runs on this project's own model families only, "
                          f"not on a {kind} model of the generic path; train without teacher")
    from helpers.tokenizer import get_encoding
    mine, theirs = student.provenance.get("tokenizer"), teacher.provenance.get("tokenizer")
    names = []
    for tok in (mine, theirs):
        try:
            names.append(get_encoding(None if tok in (None, "gpt2") else tok).name if tok else None)
        except HelpersError:
            names.append(None)  # the tokenizer source is gone: the vocabulary size check still holds
    same_tok = None in names or names[0] == names[1] or set(names) <= {"gpt2", "r50k_base"}
    if teacher.config.vocab_size != student.config.vocab_size or not same_tok:
        raise ConfigError(f"teacher={cfg.teacher}: its vocabulary ({teacher.config.vocab_size:,} ids, tokenizer "
                          f"{names[1] or theirs}) differs from the student's ({student.config.vocab_size:,} ids, "
                          f"{names[0] or mine}); distil from a model with the student's tokenizer, e.g. teacher=parent")
    teacher.to(device=device, dtype=student.lm_head.weight.dtype).eval().requires_grad_(False)
    return teacher


@torch.no_grad()
def teacher_batch(teacher: GPT, x: torch.Tensor, cfg: TrainConfig) -> Distill:
    """The teacher's side of one micro-batch: its final hidden states, and its head."""
    return Distill(teacher.hidden(x), teacher.lm_head.weight, cfg.kd_alpha, cfg.kd_temperature)


def ensure_data(cfg: TrainConfig) -> dict:
    """meta.json of cfg.data_dir; the default folder is prepared on the spot from the embedded corpus."""
    if (Path(cfg.data_dir) / "meta.json").is_file():
        return read_meta(cfg.data_dir)
    if cfg.auto_data:
        return prepare("stdlib", cfg.data_dir, tokenizer=cfg.parent, progress=cfg.progress)
    raise DataError(f"{cfg.data_dir}: no prepared data; run first: papermill notebooks/01_data.ipynb out.ipynb "
                    f"-p out_dir {cfg.data_dir} -p tokenizer {cfg.parent}")


def check_out_dir(out_dir: Path, model: GPT) -> None:
    reason = unwritable_reason(out_dir)
    if reason:
        raise ConfigError(f"out_dir={out_dir}: not writable ({reason}); choose another out_dir")
    need = model.num_params() * 4 * 3 * 2  # weights + two AdamW moments, twice (a checkpoint and its successor)
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise ConfigError(f"out_dir={out_dir}: {free / 1e9:.2f} GB free, a checkpoint needs about {need / 2e9:.2f} GB "
                          "(twice that while replacing one); free some space or choose another out_dir")


# ---- evaluation during training --------------------------------------------------------------
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


def is_sharded(model) -> bool:
    """Whether `model` has been sharded by FSDP2's fully_shard."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def read_metrics(path) -> "pd.DataFrame":  # noqa: F821
    import pandas as pd
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return pd.DataFrame(rows)


def parse_student_log(text: str) -> "pd.DataFrame":  # noqa: F821
    """The Kaggle student project's printed logs (`step N: train loss X, val loss Y`) as the same
    table as metrics.jsonl (step, train_loss, val_loss)."""
    import re
    import pandas as pd
    pattern = re.compile(r"step\s+(\d+):\s*train loss\s+([-+\d.eE]+|nan|inf),\s*val loss\s+([-+\d.eE]+|nan|inf)")
    rows = [{"step": int(m.group(1)), "train_loss": float(m.group(2)), "val_loss": float(m.group(3))}
            for m in pattern.finditer(text)]
    return pd.DataFrame(rows, columns=["step", "train_loss", "val_loss"])


# ---- the loop --------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> dict:
    """Train per cfg; returns the last metrics record. Writes metrics.jsonl and checkpoints."""
    cfg.validate()
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    if cfg.grad_accum % world:
        raise ConfigError(f"grad_accum={cfg.grad_accum} must be a multiple of the {world} processes")
    device, dtype = resolve_device(cfg)
    if ddp:
        import torch.distributed as dist
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        if device.type == "cuda":
            device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
            torch.cuda.set_device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    meta = ensure_data(cfg) if rank == 0 else None  # before the model: scored strategies read train tokens
    if ddp:
        dist.barrier()
        meta = read_meta(cfg.data_dir)
    model, state = build_model(cfg)
    check_data_fits_model(meta, model, cfg.data_dir)
    if cfg.block_size > model.config.block_size:
        raise ConfigError(f"block_size={cfg.block_size} exceeds the model's context of {model.config.block_size}")
    if rank == 0:
        check_out_dir(out_dir, model)
    splits = {"train": open_split(cfg.data_dir, "train"), "val": open_split(cfg.data_dir, "val")}
    sharded = ddp and cfg.parallel == "fsdp"
    if sharded:
        shard_model(model, device)
    model.to(device)
    model.train()
    teacher = load_teacher(cfg, model, device) if cfg.distilling else None
    kd_sums, kd_count = torch.zeros(2, device=device), 0  # (ce, kd) of the micro-batches since the last record
    optimizer = configure_optimizer(model, cfg, device)
    scaler = make_scaler(device, dtype, sharded)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    sampler = torch.Generator().manual_seed(cfg.seed)
    step, tokens_seen, best_val, elapsed_before = 0, 0, float("inf"), 0.0
    if state is not None:
        load_optimizer_state(optimizer, model, state["optimizer"], sharded)
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        sampler.set_state(state["sampler"])
        set_rng_state(state["rng"])
        step, tokens_seen = state["step"], state["tokens_seen"]
        best_val, elapsed_before = state.get("best_val_loss", best_val), state.get("elapsed_s", 0.0)
        if rank == 0:
            truncate_metrics(out_dir / "metrics.jsonl", step)
    elif rank == 0 and (out_dir / "metrics.jsonl").exists():
        if latest_checkpoint(out_dir) is not None or (out_dir / "metrics.jsonl").stat().st_size:
            raise ConfigError(f"out_dir={out_dir} already holds a run; use init=resume to continue it, or another out_dir")
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp and not sharded:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    total = total_iters(cfg)
    local_accum = cfg.grad_accum // world
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
    flops_per_step = raw_model.flops_per_token(cfg.block_size) * tokens_per_step
    peak = peak_flops(device)  # of one device; the MFU divides by all of them
    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not cfg.progress or rank != 0,
               mininterval=1.0, file=sys.stderr)
    first_bad = torch.tensor(-1, device=device)  # step of the first non-finite loss, kept on the device
    record, resumed_at = {}, step if state is not None else None
    t_start, tokens_timed = time.time(), 0
    t_window = time.time()
    train_sum, train_steps = torch.zeros((), device=device), 0  # training losses since the last evaluation
    best_aside = None  # (weights, state) of the best evaluation since the last checkpoint, not yet on disk
    while True:
        if (step % cfg.eval_interval == 0 or step == total) and step != resumed_at:
            losses = estimate_loss(model, splits, cfg, step, device, autocast)
            if not cfg.eval_train:  # the mean loss of this process's training steps since the last evaluation
                losses["train"] = (train_sum * world / train_steps).item() if train_steps else None
                train_sum, train_steps = torch.zeros((), device=device), 0
            now = time.time()
            tps = tokens_timed / (now - t_window) if tokens_timed else None
            record = {"step": step, "tokens": tokens_seen, "lr": lr_at(min(step, total - 1), cfg, total),
                      "train_loss": losses["train"], "val_loss": losses["val"],
                      "tokens_per_s": tps, "mfu": mfu(tps, flops_per_step / tokens_per_step, peak, world),
                      "elapsed_s": round(elapsed_before + now - t_start, 3), "init": cfg.init}
            if teacher is not None:  # the distillation objective on the training batches since the last record
                ce, kd = (kd_sums / kd_count).tolist() if kd_count else (None, None)
                record.update(ce_loss=ce, kd_loss=kd, total_loss=None if ce is None else
                              (1 - cfg.kd_alpha) * ce + cfg.kd_alpha * kd)
                kd_sums.zero_()
                kd_count = 0
            if not all(math.isfinite(v) for v in (losses["train"], losses["val"]) if v is not None):
                raise FloatingPointError(f"step {step}: evaluation loss is {losses}; training diverged. The last "
                                         f"good checkpoint is kept in {out_dir}; lower learning_rate")
            # sharded: every process takes part in gathering the full weights and AdamW state
            saved_model, saved_optimizer = gather_full_state(raw_model, optimizer) if sharded else (raw_model, None)
            if rank == 0:
                with open(out_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                improved = losses["val"] < best_val
                best_val = min(best_val, losses["val"])
                state_out = dict(optimizer=saved_optimizer or optimizer.state_dict(), scaler=scaler.state_dict(), sampler=sampler.get_state(),
                                 rng=rng_state(), step=step, tokens_seen=tokens_seen, best_val_loss=best_val,
                                 val_loss=losses["val"], train_loss=losses["train"], elapsed_s=record["elapsed_s"],
                                 train_config=dataclasses.asdict(cfg), data_meta={"source": meta["source"],
                                                                                 "tokenizer": meta["tokenizer"]})
                if checkpoint_due(step, total, cfg):
                    path = save_checkpoint(out_dir / f"step_{step:07d}.pt", saved_model, **state_out)
                    if improved:
                        for src, dst in ((path, out_dir / "best.pt"), (path.with_suffix(".json"), out_dir / "best.json")):
                            link_or_copy(src, dst)
                    elif best_aside is not None:  # a best seen since the last checkpoint: weights only
                        save_checkpoint(out_dir / "best.pt", best_aside[0], **best_aside[1])
                    best_aside = None
                elif improved:  # held in memory until the next checkpoint: no disk write per improvement
                    best_aside = (weights_aside(saved_model, reuse=best_aside and best_aside[0]),
                                  {k: v for k, v in state_out.items() if k != "optimizer"})
                for old in sorted(out_dir.glob("step_*.pt"))[:-cfg.keep_last]:
                    old.unlink()
                    old.with_suffix(".json").unlink(missing_ok=True)
            bar.set_postfix(train=f"{losses['train']:.3f}" if losses["train"] is not None else "-", val=f"{losses['val']:.3f}",
                            tok_s=f"{tps:,.0f}" if tps else "-", refresh=False)
            t_window, tokens_timed = time.time(), 0
        if step >= total:
            break
        lr = lr_at(step, cfg, total)
        for g in optimizer.param_groups:
            g["lr"] = lr
        for micro in range(cfg.grad_accum):
            # every process draws every micro-batch, in the same order, and computes only its own:
            # N processes see exactly the samples one process with the same grad_accum would.
            x, y = get_batch(splits["train"], cfg.block_size, cfg.batch_size, sampler, device) \
                if micro // local_accum == rank else _skip_batch(splits["train"], cfg, sampler)
            if x is None:
                continue
            last_micro = micro // local_accum == rank and (micro + 1) % local_accum == 0
            sync = gradient_sync(model, cfg.parallel if ddp else None, last_micro)
            with sync, autocast:
                if teacher is not None:
                    distill = teacher_batch(teacher, x, cfg)
                    _, loss = model(x, y, distill=distill)
                    kd_sums += torch.stack(distill.parts).float()
                    kd_count += 1
                else:
                    _, loss = model(x, y)
                loss = loss / cfg.grad_accum
            scaler.scale(loss).backward() if not ddp else scaler.scale(loss * world).backward()
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
            if not cfg.eval_train:
                train_sum += loss.detach().float()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        train_steps += 1
        tokens_seen += tokens_per_step
        tokens_timed += tokens_per_step
        if step % cfg.log_interval == 0 or step == total:
            bad = int(first_bad.item())  # the one host sync, every log_interval steps
            if bad >= 0:
                raise FloatingPointError(f"step {bad}: the training loss is NaN or infinite; stopped. The last good "
                                         f"checkpoint is kept in {out_dir}; lower learning_rate or use dtype=bfloat16")
            bar.update(step - bar.n)
    bar.close()
    if ddp:
        dist.destroy_process_group()
    return record


# ---- several processes: DDP and FSDP2 -----------------------------------------------------------
def shard_model(model: GPT, device: torch.device) -> None:
    """FSDP2, in place: each block is one unit and the root holds the rest (embeddings, final norm,
    head), all split across the processes; a block's weights are gathered only while it runs."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    if isinstance(model, GPT):
        blocks = model.transformer.h
    else:  # a transformers model (generic path): its one list of blocks
        from helpers.generic import find_blocks
        blocks = find_blocks(model.hf, "parallel=fsdp")[2]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def make_scaler(device: torch.device, dtype: torch.dtype, sharded: bool):
    """The loss scaler float16 needs (a no-op otherwise). Sharded, an overflow in any process's
    gradient shard must make every process skip the step: ShardedGradScaler agrees on it."""
    if sharded:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        return ShardedGradScaler(device.type, enabled=dtype == torch.float16)
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def gradient_sync(model, parallel: str | None, last_micro: bool):
    """Context of one micro-step: gradients are averaged across processes only on a process's last
    micro-step (parallel None: one process, nothing to average)."""
    if parallel == "fsdp":
        model.set_requires_gradient_sync(last_micro)
        return nullcontext()
    return model.no_sync() if parallel == "ddp" and not last_micro else nullcontext()


class GatheredModel:
    """What save_checkpoint reads of a model (config, provenance, state_dict, num_params), with the
    full weights gathered from an FSDP model's shards: checkpoints keep the one format load_model reads."""

    def __init__(self, model: GPT, state: dict):
        self.config, self.provenance, self._state, self._n = model.config, dict(model.provenance), state, model.num_params()

    def state_dict(self) -> dict:
        return self._state

    def num_params(self) -> int:
        return self._n


def gather_full_state(model: GPT, optimizer) -> tuple[GatheredModel, dict]:
    """(full model, full optimizer state keyed by parameter name) of a sharded model, on the CPU of
    process 0 (empty elsewhere). Every process must call it: the shards are gathered collectively."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    if not optimizer.state:  # before the first step: nothing to gather (and gathering would take an empty AdamW step)
        return GatheredModel(model, weights), optimizer.state_dict()
    return GatheredModel(model, weights), get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(optimizer, model, state: dict, sharded: bool = False) -> None:
    """Restore AdamW's state saved by optimizer.state_dict() (parameters by index) or by an FSDP run
    (parameters by name), into a plain or (sharded=True) an FSDP model: either way round."""
    by_name = any(isinstance(p, str) for g in state["param_groups"] for p in g["params"])
    if not by_name and not sharded:
        optimizer.load_state_dict(state)
        return
    if not state["state"]:
        return  # saved before the first step: nothing to restore (and restoring would take an empty AdamW step)
    if not by_name:  # index i is the i-th parameter in the optimizer's groups: name it
        names = {id(p): n for n, p in model.named_parameters()}
        order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        state = {"state": {order[i]: v for i, v in state["state"].items()},
                 "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def torchrun_command(cfg: TrainConfig, nproc_per_node: int) -> list[str]:
    """The command that trains `cfg` with `nproc_per_node` processes on this machine (one per GPU;
    on a machine without GPUs, CPU processes talking through gloo)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
            "-m", "helpers.train", *cfg.to_args()]


def launch(cfg: TrainConfig, nproc_per_node: int | None = None) -> list[str]:
    """Run torchrun_command (nproc_per_node None: one process per visible GPU), printing the exact
    command line first and the processes' output as it comes; returns the command."""
    import shlex
    import subprocess
    n = nproc_per_node if nproc_per_node is not None else max(1, torch.cuda.device_count())
    if n < 1:
        raise ConfigError(f"nproc_per_node={nproc_per_node} must be at least 1")
    cmd = torchrun_command(cfg, n)
    print(shlex.join(cmd), flush=True)
    env = dict(os.environ)  # the processes import this very copy of helpers
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        print(line, end="", flush=True)
    if proc.wait() != 0:
        raise subprocess.CalledProcessError(proc.returncode, shlex.join(cmd))
    return cmd


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


def checkpoint_due(step: int, total: int, cfg: TrainConfig) -> bool:
    """Whether the evaluation at `step` also writes a resumable checkpoint (weights + optimizer)."""
    if step >= total or cfg.ckpt_interval is None:
        return True
    return cfg.ckpt_interval > 0 and step % cfg.ckpt_interval == 0


def link_or_copy(src: Path, dst: Path) -> None:
    """dst becomes a hard link to src (no second gigabyte on disk), or a copy where links fail."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy(src, tmp)
    os.replace(tmp, dst)


def _skip_batch(data, cfg: TrainConfig, sampler: torch.Generator):
    """Advance the sampler exactly as get_batch would, without reading data (another rank's batch)."""
    torch.randint(len(data) - cfg.block_size - 1, (cfg.batch_size,), generator=sampler)
    return None, None


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records written after the checkpoint we resume from."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write(path, lambda f: f.write(("\n".join(keep) + "\n" if keep else "").encode()))


def main(argv=None):
    try:
        cfg = parse_cli(sys.argv[1:] if argv is None else argv)
        record = train(cfg)
    except HelpersError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if record:
        print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
