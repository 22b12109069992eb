"""Everything a training run holds before its first step: the device, the data, the model (inherited,
scratch, resumed or loaded), the teacher, the optimizer and, on resume, the state it stopped in.
`start_run(cfg)` returns it all as one `Run`, which the loop (helpers.train) then advances.
Floor "training": uses config, parallel, trackers, inherit, checkpoint, data, tokenizer, lora.
"""
from __future__ import annotations

import dataclasses
import math
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from helpers.checkpoint import load_lora, load_model, load_training_state, looks_local, open_weights, resolve
from helpers.config import TrainConfig
from helpers.data import open_split, prepare, read_meta
from helpers.errors import CheckpointError, ConfigError, DataError, HelpersError
from helpers.files import lock_folder, unwritable_reason
from helpers.generic import scratch_like
from helpers.inherit import SCORE_OF, calibration_tokens, inherit_from
from helpers.lora import LoraSettings, attach, import_peft, normalize_targets, not_inherited
from helpers.model import GPT
from helpers.parallel import (Processes, agree, finish_processes, init_processes, load_optimizer_state, make_scaler, processes_from_env,
                              shard_model, where, wrap_for_training)
from helpers.records import truncate_metrics
from helpers.tokenizer import get_encoding
from helpers.trackers import check_installed, open_tracker


# ---- settings read off the config --------------------------------------------------------------
def total_iters(cfg: TrainConfig) -> int:
    if cfg.max_iters is not None:
        return cfg.max_iters
    return math.ceil(cfg.max_tokens / (cfg.batch_size * cfg.block_size * cfg.grad_accum))


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 products natively: AVX512-BF16 (Intel Cooper Lake, Sapphire
    Rapids and later, whose AMX goes further; AMD Zen 4 and later)."""
    return getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()


def resolve_device(cfg: TrainConfig) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of cfg. A dtype other than float32 trains in mixed precision: float32
    weights and AdamW state, matrix products in dtype under torch.autocast (start_run).

    dtype=auto: bfloat16 on a GPU that has it, else float16; on the CPU float32, even where the CPU
    has native bfloat16 (2-4x faster products): the same config then gives the same losses on every
    CPU (the development machines change from day to day, with and without it), and a run resumed
    on another machine keeps its dtype, so resume stays bit-identical. bfloat16 on the CPU is asked
    for by name (dtype=bfloat16), and refused where the CPU would only emulate it (no AVX512-BF16:
    slower than float32)."""
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
    if device.type == "cpu" and dtype == torch.bfloat16 and not native_bf16():
        raise ConfigError("dtype=bfloat16: this CPU has no native bfloat16 (no avx512_bf16 in /proc/cpuinfo), so "
                          "torch would emulate it, slower than float32; use dtype=float32 (or auto) here")
    return device, dtype


def configure_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, biases). Fused on GPUs, and on the CPU in
    bfloat16 runs (~15% faster steps there, measured in bench/bf16.py); float32 CPU runs keep the
    unfused update, whose arithmetic every earlier float32 result was computed with."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda" or device.type == "cpu" and cfg.dtype == "bfloat16"
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)


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


# ---- the model -------------------------------------------------------------------------------
def build_model(cfg: TrainConfig) -> tuple[GPT, dict | None]:
    """(model, training state to resume from or None) for cfg.init."""
    if cfg.init == "resume":
        ck = latest_checkpoint(cfg.out_dir)
        if ck is None:
            raise ConfigError(f"init=resume: no checkpoint in out_dir={cfg.out_dir}; start with init=inherit or scratch")
        state = load_training_state(ck)
        check_lora_resume(cfg, state.get("lora"))
        return (load_lora(ck) if state.get("lora") else load_model(ck)), state
    if cfg.init in ("inherit", "scratch"):
        model = inherit_or_scratch(cfg)
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
    if cfg.lora_r:
        heal_with_lora(model, cfg)
    return model, None


def lora_settings(cfg: TrainConfig) -> LoraSettings:
    return LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                        targets=normalize_targets(cfg.lora_targets), norms=cfg.lora_norms, base_dtype=cfg.base_dtype)


def heal_with_lora(model, cfg: TrainConfig) -> None:
    """lora_r > 0: the model's weights frozen, peft's adapters on its projections (helpers.lora.attach),
    and the tensors an inherited child did not inherit trained in full. The record names the base
    as a checkpoint rebuilds it: the parent and the kept blocks, or the checkpoint of init."""
    source = cfg.parent if cfg.init == "inherit" else cfg.init
    if Path(str(source)).expanduser().exists():  # a local file or folder: the very file, wherever the run resumes
        source = str(Path(resolve(Path(str(source)).expanduser())[1]).resolve())
    base = {"source": str(source), "layers": model.provenance.get("layers") if cfg.init == "inherit" else None}
    attach(model, lora_settings(cfg), base, cfg.seed, full=not_inherited(model) if cfg.init == "inherit" else ())


def check_lora_resume(cfg: TrainConfig, record: dict | None) -> None:
    """A run resumes as it trained: with adapters (the same settings) or without."""
    if record is None:
        if cfg.lora_r:
            raise ConfigError(f"init=resume with lora_r={cfg.lora_r}: the run in out_dir={cfg.out_dir} trains every "
                              "weight (no adapters); resume it without lora_r")
        return
    given = dataclasses.asdict(lora_settings(cfg))
    if given != record["settings"]:
        saved = " ".join(f"{'lora_' if k != 'base_dtype' else ''}{k}={v}" for k, v in record["settings"].items())
        raise ConfigError(f"init=resume: the run in out_dir={cfg.out_dir} trains LoRA adapters ({saved}); resume it "
                          "with those settings")


def inherit_or_scratch(cfg: TrainConfig) -> GPT:
    """The inherited child of cfg.parent, or (init=scratch) a random model of its shape. Of the parent
    only the child's tensors are read (a scored strategy runs it one block at a time first)."""
    weights = open_weights(cfg.parent)
    parent = weights.model
    n = cfg.n_layers or (len(cfg.layers) if cfg.layers else max(1, parent.config.n_layer // 2))
    try:
        if cfg.init == "scratch":  # the shape is all that counts
            child = inherit_from(weights, n)
        else:
            scored = cfg.strategy in SCORE_OF and cfg.layers is None
            tokens = calibration_tokens(cfg.data_dir, cfg.calib_batches, min(cfg.block_size, parent.config.block_size),
                                        cfg.seed) if scored else None
            child = inherit_from(weights, n, cfg.layers, cfg.strategy, cfg.copy, tokens)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.init == "scratch":
        torch.manual_seed(cfg.seed)
        scratch = GPT(child.config) if isinstance(child, GPT) else scratch_like(child, cfg.seed)
        scratch.provenance = {"tokenizer": parent.provenance.get("tokenizer"), "source": "scratch",
                              "shape_of": f"first {n} layers of {cfg.parent}"}
        child = scratch
    return child


def enable_grad_checkpointing(model) -> None:
    """Activation checkpointing: each block's activations are recomputed in the backward pass
    instead of kept, so they no longer grow with depth (one block's at a time, plus the residual
    stream between blocks). Ours, and any transformers model that supports it."""
    if isinstance(model, GPT):
        model.grad_checkpointing = True
        return
    if not getattr(model.hf, "supports_gradient_checkpointing", False):
        raise ConfigError(f"grad_checkpointing=true: the {model.config.family} model ({type(model.hf).__name__}) cannot "
                          "recompute its blocks; train without grad_checkpointing")
    model.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


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


# ---- data and output folder ----------------------------------------------------------------------
def ensure_data(cfg: TrainConfig) -> dict:
    """meta.json of cfg.data_dir; the default folder is prepared on the spot from the embedded corpus."""
    if (Path(cfg.data_dir) / "meta.json").is_file():
        return read_meta(cfg.data_dir)
    if cfg.auto_data:
        return prepare("stdlib", cfg.data_dir, tokenizer=cfg.parent, progress=cfg.progress)
    raise DataError(f"{cfg.data_dir}: no prepared data; run first: papermill notebooks/01_data.ipynb out.ipynb "
                    f"-p out_dir {cfg.data_dir} -p tokenizer {cfg.parent}")


def unseen_inputs(cfg: TrainConfig, procs: Processes, data: bool = False) -> HelpersError | None:
    """The error for an input this process cannot see (on several machines: put it on a filesystem
    every node sees, or copy it to each): the parent or the checkpoint to start from, given as a
    local path; with data=True (after process 0 prepared it) the prepared data_dir. One process needs
    no such check: loading and ensure_data say what is missing, and how to make it."""
    if not procs.ddp:
        return None
    if data or not cfg.auto_data:
        if not (Path(cfg.data_dir) / "meta.json").is_file():
            return DataError(f"data_dir={cfg.data_dir}: no prepared data on {where(procs)}; put the data on a "
                             "filesystem every node sees, or prepare it on each node first (notebook 01)")
    if data:
        return None
    source = cfg.parent if cfg.init in ("inherit", "scratch") else None if cfg.init == "resume" else cfg.init
    path = Path(str(source)).expanduser() if source is not None else None
    if path is not None and (path.is_absolute() or looks_local(path)) and not path.exists():
        return CheckpointError(f"{'parent' if source == cfg.parent else 'init'}={source}: not found on "
                               f"{where(procs)}; put it on a filesystem every node sees, or copy it to each node")
    return None


def attempt(fn, *args) -> HelpersError | None:
    """None when fn(*args) succeeds, else the user error it raised (for `agree`)."""
    try:
        fn(*args)
    except HelpersError as e:
        return e
    return None


def check_out_dir(out_dir: Path, model: GPT) -> None:
    reason = unwritable_reason(out_dir)
    if reason:
        raise ConfigError(f"out_dir={out_dir}: not writable ({reason}); choose another out_dir")
    # weights + two AdamW moments of what trains (LoRA: the adapters alone), twice (a checkpoint and its successor)
    need = sum(p.numel() for p in model.parameters() if p.requires_grad) * 4 * 3 * 2
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise ConfigError(f"out_dir={out_dir}: {free / 1e9:.2f} GB free, a checkpoint needs about {need / 2e9:.2f} GB "
                          "(twice that while replacing one); free some space or choose another out_dir")


def lock_out_dir(out_dir: Path):
    """The lock that makes a run the only one writing out_dir: a second run, resumed or not, is
    refused while the first lives (its process holds the lock until it ends, however it ends)."""
    lock, holder = lock_folder(out_dir)
    if holder is not None:
        raise ConfigError(f"out_dir={out_dir} is in use by another run (process {holder}); wait for it to end or "
                          "stop it, or choose another out_dir")
    return lock


def finish_run(run: Run, failed: bool = False) -> None:
    """Close the tracker (a run `failed` by an error shows so there), leave the process group and
    let go of out_dir."""
    if run.tracker is not None:
        run.tracker.close(failed)
        run.tracker = None
    finish_processes(run.procs)
    if run.lock is not None:
        run.lock.close()
        run.lock = None


# ---- the run ---------------------------------------------------------------------------------
@dataclass
class Run:
    """One training run between steps: what it trains, with what, and where it stands."""
    cfg: TrainConfig
    procs: Processes
    device: torch.device
    out_dir: Path
    meta: dict
    splits: dict  # {"train": memmap, "val": memmap}
    raw_model: GPT  # the model itself (sharded in place under FSDP)
    model: torch.nn.Module  # what the loop calls: raw_model, compiled and/or inside DDP
    teacher: GPT | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: object  # a torch.autocast context, or nullcontext in float32
    sampler: torch.Generator  # draws the training batches; saved and restored with the run
    dtype: torch.dtype  # what the matrix products compute in (float32 weights and AdamW state either way)
    total: int  # optimizer steps of the whole run
    step: int = 0
    tokens_seen: int = 0
    best_val: float = float("inf")
    elapsed_before: float = 0.0  # seconds the run had trained before this process resumed it
    resumed_at: int | None = None  # the step a resumed run starts from (its evaluation is on record)
    best_aside: object = None  # (weights, state) of the best evaluation since the last checkpoint, not on disk
    # since the last evaluation: tokens trained, training losses (eval_train=False), KD parts (ce, kd)
    t_start: float = field(default_factory=time.time)
    t_window: float = field(default_factory=time.time)
    tokens_timed: int = 0
    train_sum: torch.Tensor | None = None
    train_steps: int = 0
    kd_sums: torch.Tensor | None = None
    kd_count: int = 0
    first_bad: torch.Tensor | None = None  # step of the first non-finite loss, kept on the device
    lock: object = None  # the open lock file of out_dir (process 0), held until the run ends
    tracker: object = None  # where process 0 mirrors the metrics lines (report_to), or None

    @property
    def sharded(self) -> bool:
        return self.procs.ddp and self.cfg.parallel == "fsdp"

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.block_size * self.cfg.grad_accum


def start_run(cfg: TrainConfig) -> Run:
    """Processes, data, model, teacher and optimizer for cfg; on init=resume, the state of the run
    in out_dir, so that the next step is the one that checkpoint's run would have taken."""
    procs = processes_from_env()
    if cfg.grad_accum % procs.world:
        raise ConfigError(f"grad_accum={cfg.grad_accum} must be a multiple of the {procs.world} processes")
    if procs.rank == 0:
        check_installed(cfg.report_to)  # before the model loads
    device, dtype = resolve_device(cfg)
    if cfg.lora_r:
        import_peft()  # before the model loads
        if cfg.base_dtype != "float32" and dtype == torch.float32:
            raise ConfigError(f"base_dtype={cfg.base_dtype}: frozen weights in 16 bits need 16-bit products; set "
                              f"dtype={cfg.base_dtype} (dtype=auto picks a 16-bit one on a GPU) or base_dtype=float32")
    device = init_processes(procs, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    # the data before the model (scored strategies read train tokens): every node must see the parent
    # and data_dir; process 0 prepares the default corpus. A failure anywhere stops every process.
    agree(procs, unseen_inputs(cfg, procs))
    agree(procs, attempt(ensure_data, cfg) if procs.rank == 0 else None)
    agree(procs, unseen_inputs(cfg, procs, data=True))
    meta = read_meta(cfg.data_dir)
    model, state = build_model(cfg)
    check_data_fits_model(meta, model, cfg.data_dir)
    if cfg.block_size > model.config.block_size:
        raise ConfigError(f"block_size={cfg.block_size} exceeds the model's context of {model.config.block_size}")
    lock = None
    if procs.rank == 0:
        check_out_dir(out_dir, model)
        lock = lock_out_dir(out_dir)
    try:
        splits = {"train": open_split(cfg.data_dir, "train"), "val": open_split(cfg.data_dir, "val")}
        if cfg.grad_checkpointing:
            enable_grad_checkpointing(model)
        sharded = procs.ddp and cfg.parallel == "fsdp"
        if sharded:
            shard_model(model, device)
        model.to(device)
        model.train()
        teacher = load_teacher(cfg, model, device) if cfg.distilling else None
        optimizer = configure_optimizer(model, cfg, device)
        run = Run(cfg=cfg, procs=procs, device=device, out_dir=out_dir, meta=meta, splits=splits, raw_model=model,
                  model=model, teacher=teacher, optimizer=optimizer, scaler=make_scaler(device, dtype, sharded),
                  autocast=torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext(),
                  sampler=torch.Generator().manual_seed(cfg.seed), dtype=dtype, total=total_iters(cfg),
                  train_sum=torch.zeros((), device=device), kd_sums=torch.zeros(2, device=device),
                  first_bad=torch.tensor(-1, device=device), lock=lock)
        if state is not None:
            resume_state(run, state)
        elif procs.rank == 0 and (out_dir / "metrics.jsonl").exists():
            if latest_checkpoint(out_dir) is not None or (out_dir / "metrics.jsonl").stat().st_size:
                raise ConfigError(f"out_dir={out_dir} already holds a run; use init=resume to continue it, or another out_dir")
        run.model = wrap_for_training(model, cfg, procs, device)
        if procs.rank == 0:
            run.tracker = open_tracker(cfg.report_to, out_dir, dataclasses.asdict(cfg), run.resumed_at)
    except BaseException:
        if lock is not None:
            lock.close()  # a run that never started leaves out_dir free
        raise
    run.t_start = run.t_window = time.time()
    return run


def resume_state(run: Run, state: dict) -> None:
    """Optimizer, loss scaler, sampler, random generators and counters as a checkpoint saved them;
    metrics.jsonl loses the lines written after it."""
    load_optimizer_state(run.optimizer, run.raw_model, state["optimizer"], run.sharded)
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.sampler.set_state(state["sampler"])
    set_rng_state(state["rng"])
    run.step, run.tokens_seen = state["step"], state["tokens_seen"]
    run.best_val, run.elapsed_before = state.get("best_val_loss", run.best_val), state.get("elapsed_s", 0.0)
    run.resumed_at = run.step
    since = state.get("since_eval")  # a run stopped between two evaluations resumes its sums too
    if since:
        run.train_sum.fill_(since["train_sum"])
        run.kd_sums.copy_(torch.tensor(since["kd_sums"]))
        run.train_steps, run.kd_count = since["train_steps"], since["kd_count"]
    if run.procs.rank == 0:
        truncate_metrics(run.out_dir / "metrics.jsonl", run.step)
