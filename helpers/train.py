"""Training: one TrainConfig, a few functions, one visible loop.

    python -m helpers.train [--config FILE.yaml] [key=value ...]
    torchrun --nproc_per_node=2 -m helpers.train key=value ...      (DDP, e.g. Kaggle's 2 x T4)

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
            scratch = GPT(child.config)
            scratch.provenance = {"tokenizer": parent.provenance.get("tokenizer"), "source": "scratch",
                                  "shape_of": f"first {n} layers of {cfg.parent}"}
            child = scratch
        del parent
        model = child
    else:
        model = load_model(cfg.init)
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
                losses[k] = model(x, y)[1].float()
        out[name] = losses.mean().item()
    model.train()
    return out


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
    model.to(device)
    model.train()
    optimizer = configure_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    sampler = torch.Generator().manual_seed(cfg.seed)
    step, tokens_seen, best_val, elapsed_before = 0, 0, float("inf"), 0.0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
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
    if ddp:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    total = total_iters(cfg)
    local_accum = cfg.grad_accum // world
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
    flops_per_step = raw_model.flops_per_token(cfg.block_size) * tokens_per_step
    peak = peak_flops(device)
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
                      "tokens_per_s": tps, "mfu": (tps / tokens_per_step * flops_per_step / peak) if tps and peak else None,
                      "elapsed_s": round(elapsed_before + now - t_start, 3), "init": cfg.init}
            if not all(math.isfinite(v) for v in (losses["train"], losses["val"]) if v is not None):
                raise FloatingPointError(f"step {step}: evaluation loss is {losses}; training diverged. The last "
                                         f"good checkpoint is kept in {out_dir}; lower learning_rate")
            if rank == 0:
                with open(out_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                improved = losses["val"] < best_val
                best_val = min(best_val, losses["val"])
                state_out = dict(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), sampler=sampler.get_state(),
                                 rng=rng_state(), step=step, tokens_seen=tokens_seen, best_val_loss=best_val,
                                 val_loss=losses["val"], train_loss=losses["train"], elapsed_s=record["elapsed_s"],
                                 train_config=dataclasses.asdict(cfg), data_meta={"source": meta["source"],
                                                                                 "tokenizer": meta["tokenizer"]})
                if checkpoint_due(step, total, cfg):
                    path = save_checkpoint(out_dir / f"step_{step:07d}.pt", raw_model, **state_out)
                    if improved:
                        for src, dst in ((path, out_dir / "best.pt"), (path.with_suffix(".json"), out_dir / "best.json")):
                            link_or_copy(src, dst)
                    elif best_aside is not None:  # a best seen since the last checkpoint: weights only
                        save_checkpoint(out_dir / "best.pt", best_aside[0], **best_aside[1])
                    best_aside = None
                elif improved:  # held in memory until the next checkpoint: no disk write per improvement
                    best_aside = (WeightsAside(raw_model), {k: v for k, v in state_out.items() if k != "optimizer"})
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
            sync = model.no_sync() if ddp and not last_micro else nullcontext()
            with sync, autocast:
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


class WeightsAside:
    """A copy of a model's weights on the CPU (tied tensors stay tied), with what save_checkpoint
    reads from a model: config, provenance, state_dict(), num_params()."""

    def __init__(self, model: GPT):
        copies = {}
        self._state = {k: copies.setdefault(v.data_ptr(), v.detach().to("cpu", copy=True))
                       for k, v in model.state_dict().items()}
        self.config, self.provenance, self._n = model.config, dict(model.provenance), model.num_params()

    def state_dict(self):
        return self._state

    def num_params(self):
        return self._n


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
