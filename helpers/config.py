"""The training configuration: one dataclass, TrainConfig, whose fields are notebook 03's
parameters, the command line's key=value pairs (`python -m helpers.train`) and the YAML keys of
`--config`; `coerce` turns user text into each field's type, and nothing else parses it (the
pipeline's settings too); `TrainConfig.to_args` and `to_text` write a config back as that text.
Floor "training": uses the errors, helpers.inherit (the strategy names), helpers.lora (the projections'
names) and helpers.trackers (report_to's names).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from helpers.errors import ConfigError
from helpers.inherit import COPY_MODES, STRATEGIES
from helpers.lora import BASE_DTYPES, normalize_targets
from helpers.trackers import REPORT_TO


def default_root() -> str:
    """Where outputs go by default: Kaggle's working folder on Kaggle (/kaggle/working, or
    $INHERITUNE_KAGGLE_WORKING where a test stands in for it), the current folder elsewhere."""
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):
        return os.environ.get("INHERITUNE_KAGGLE_WORKING", "/kaggle/working")
    return "."


@dataclass
class TrainConfig:
    parent: str = "smollm2-135m"  # any source load_model accepts
    n_layers: int | None = None  # blocks the child keeps; None: half of the parent's
    init: str = "inherit"  # inherit | scratch | resume | path of a checkpoint to continue from
    data_dir: str | None = None  # None: the embedded default corpus in the parent's tokens, prepared if missing
    out_dir: str | None = None  # None: runs/train (under /kaggle/working on Kaggle)
    max_iters: int | None = 100  # optimizer steps; or set max_tokens instead
    max_tokens: int | None = None
    batch_size: int = 4  # sequences per micro-step (per process)
    block_size: int = 256
    grad_accum: int = 1  # micro-steps per optimizer step, across all processes
    learning_rate: float = 6e-4
    min_lr: float = 6e-5
    warmup_iters: int = 10
    lr_decay_iters: int | None = None  # None: the whole budget
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables
    dropout: float = 0.0
    eval_interval: int = 25
    eval_iters: int = 10
    log_interval: int = 10  # steps between progress-bar updates (the only host syncs)
    keep_last: int = 2  # step checkpoints kept, besides best.pt
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto (bf16 on GPUs that have it, else fp16; fp32 on CPU) | float32 | bfloat16 (on CPUs: AVX512-BF16 only) | float16
    compile: bool = False
    grad_checkpointing: bool = False  # recompute each block in the backward pass: activations stop growing with depth
    seed: int = 1337
    progress: bool = True
    report_to: str = "none"  # none | tensorboard | wandb: each metrics.jsonl line mirrored there too (helpers.trackers)
    # multi-process training (torchrun): how the processes share the model
    parallel: str = "ddp"  # ddp: a full copy per process | fsdp: weights, gradients and AdamW state sharded (FSDP2)
    # which blocks the child keeps (helpers.inherit)
    strategy: str = "first"  # first | first+last | block-influence | angular
    layers: list[int] | None = None  # explicit parent block indices instead of a strategy, e.g. [0, 1, 2, 29]
    copy: str = "all"  # all | paper (the paper's code: position table and final norm left at fresh init)
    calib_batches: int = 8  # train-split sequences of block_size tokens the scored strategies read
    # checkpoint cadence and cheap evaluation
    ckpt_interval: int | None = None  # steps between resumable checkpoints, at evaluations; None: every one; 0: the last only
    eval_train: bool = True  # False: train_loss is the mean loss of the training steps since the last evaluation
    # knowledge distillation (helpers.head_loss): loss = (1 - kd_alpha) * CE + kd_alpha * T^2 * KL(teacher || student)
    teacher: str | None = None  # None (no distillation) | "parent" | any source load_model accepts
    kd_alpha: float = 0.6  # the soft term's weight (0.6: the paper's KD baseline); 0: the teacher is not even loaded
    kd_temperature: float = 1.0  # T, dividing both models' logits in the soft term
    # LoRA healing (helpers.lora, through peft): the inherited weights frozen, low-rank adapters trained
    lora_r: int = 0  # rank of the adapters; 0: no LoRA, every weight trains
    lora_alpha: float = 16.0  # the adapters' output is scaled by lora_alpha / lora_r
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_targets: list[str] | None = None  # q, k, v, o, gate, up, down (or q_proj ...); None: every projection the model has
    lora_norms: bool = False  # True: the norms train too
    base_dtype: str = "float32"  # the frozen projections held in float32 | bfloat16 | float16 (16-bit: dtype must be too)

    def __post_init__(self):
        self.auto_data = self.data_dir is None  # only then may training prepare the data itself
        if self.data_dir is None:
            self.data_dir = f"{default_root()}/data/stdlib-{Path(str(self.parent)).stem}"
        if self.out_dir is None:
            self.out_dir = f"{default_root()}/runs/train"

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_args(self) -> list[str]:
        """Every field as one `key=value` argument that `parse_cli` reads back to an equal config
        (the launch line of `torchrun -m helpers.train`). The default data folder is passed as
        None, so the launched processes may prepare it as this config would."""
        args = []
        for f in dataclasses.fields(self):
            value = None if f.name == "data_dir" and self.auto_data else getattr(self, f.name)
            args.append(f"{f.name}={to_text(value)}")
        return args

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from user values (strings allowed: papermill -r, the command line, YAML)."""
        unknown = sorted(set(d) - set(cls.field_names()))
        if unknown:
            raise ConfigError(f"unknown TrainConfig keys {unknown}; valid keys: {', '.join(cls.field_names())}")
        hints = typing.get_type_hints(cls)
        cfg = cls(**{k: coerce(k, hints[k], v) for k, v in d.items()})
        cfg.validate()
        return cfg

    def validate(self):
        positive = ["batch_size", "block_size", "grad_accum", "eval_interval", "eval_iters", "log_interval", "keep_last"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        if self.max_iters is None and self.max_tokens is None:
            raise ConfigError("set max_iters or max_tokens (the training budget)")
        for name in ("max_iters", "max_tokens", "n_layers"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name}={v} must be at least 1 (or None)")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout} must lie in [0, 1)")
        if self.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"parallel={self.parallel!r}: use ddp (a full copy per process) or fsdp (sharded)")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype={self.dtype!r}: use auto, float32, bfloat16 or float16")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy={self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if self.copy not in COPY_MODES:
            raise ConfigError(f"copy={self.copy!r}: choose one of {', '.join(COPY_MODES)}")
        if self.report_to not in REPORT_TO:
            raise ConfigError(f"report_to={self.report_to!r}: choose one of {', '.join(REPORT_TO)}")
        if self.layers is not None and self.strategy != "first":
            raise ConfigError(f"layers={self.layers} and strategy={self.strategy!r}: give one of them, not both")
        if self.layers is not None and self.n_layers is not None and self.n_layers != len(self.layers):
            raise ConfigError(f"n_layers={self.n_layers} but layers lists {len(self.layers)} blocks; drop n_layers")
        if self.calib_batches < 1:
            raise ConfigError(f"calib_batches={self.calib_batches} must be at least 1")
        if self.ckpt_interval is not None and (self.ckpt_interval < 0 or self.ckpt_interval % self.eval_interval):
            raise ConfigError(f"ckpt_interval={self.ckpt_interval}: checkpoints are written at evaluations; give a "
                              f"multiple of eval_interval={self.eval_interval}, 0 (the last step only) or None (every one)")
        if self.learning_rate <= 0 or self.min_lr < 0 or self.min_lr > self.learning_rate:
            raise ConfigError(f"learning rates: need 0 <= min_lr ({self.min_lr}) <= learning_rate ({self.learning_rate})")
        if not 0 <= self.kd_alpha <= 1:
            raise ConfigError(f"kd_alpha={self.kd_alpha} must lie in [0, 1] (the soft term's weight)")
        if not 0 < self.kd_temperature < math.inf:
            raise ConfigError(f"kd_temperature={self.kd_temperature} must be a positive number")
        self.validate_lora()

    def validate_lora(self):
        normalize_targets(self.lora_targets)  # a name that is no projection is refused even without LoRA
        if self.base_dtype not in BASE_DTYPES:
            raise ConfigError(f"base_dtype={self.base_dtype!r}: choose one of {', '.join(BASE_DTYPES)}")
        if self.lora_r < 0 or not 0 < self.lora_alpha < math.inf or not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_r={self.lora_r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}: "
                              "need lora_r >= 0 (0: no LoRA), lora_alpha > 0 and lora_dropout in [0, 1)")
        if self.lora_r and self.init == "scratch":
            raise ConfigError(f"lora_r={self.lora_r} with init=scratch: a random model has nothing to heal; LoRA "
                              "adapts an inherited child (init=inherit) or a checkpoint; drop lora_r or change init")
        if self.lora_r and self.parallel == "fsdp":
            raise ConfigError(f"lora_r={self.lora_r} with parallel=fsdp: LoRA trains with parallel=ddp (the frozen base "
                              "has no gradients or AdamW state to shard; base_dtype=bfloat16 halves its weights)")

    @property
    def distilling(self) -> bool:
        """Whether training distils from a teacher (teacher set and kd_alpha > 0)."""
        return self.teacher is not None and self.kd_alpha > 0


def to_text(value) -> str:
    """The text `coerce` turns back into `value` for a field of its type: None, true/false, the
    shortest exact float, lists as JSON, and text as itself unless it would read as something else."""
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str) and not _needs_quotes(value):
        return value
    return json.dumps(value)


def _needs_quotes(text: str) -> bool:
    return text.strip().lower() in ("none", "null", "") or (len(text) >= 2 and text[0] == text[-1] == '"')


def coerce(name: str, typ, value):
    """`value` as the field's type; strings are parsed ("none" -> None, "true"/"false" -> bool,
    "[1, 2]" or "1,2" -> a list, '"none"' -> the text none). typ=typing.Any (untyped settings,
    such as the pipeline's) reads text as None, an int, a float, or else the text itself."""
    if typ is typing.Any:
        if isinstance(value, str):
            for kind in (int, float):
                try:
                    return coerce(name, kind | None, value)
                except ConfigError:
                    pass
        return value
    args = typing.get_args(typ) if typing.get_origin(typ) in (typing.Union, types.UnionType) else ()
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), typ) if args else typ
    if base is str and isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)  # quoted text is taken literally: '"none"' is the text none
        except ValueError:
            pass
    if typing.get_origin(base) is list:
        return _coerce_list(name, base, value, optional)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
        if optional:
            return None
        if base is str and isinstance(value, str) and value.strip():
            return value  # a text setting that cannot be None: "none" is its text (report_to=none)
        raise ConfigError(f"{name}: None is not allowed; give a {base.__name__}")
    if typing.get_origin(base) is list and isinstance(value, (str, list, tuple)):  # "0,1,29", "[0, 1]" or a list
        items = value.strip().strip("[]()").replace(",", " ").split() if isinstance(value, str) else value
        return [coerce(f"{name}[{i}]", typing.get_args(base)[0], v) for i, v in enumerate(items)]
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
                return value.strip().lower() in ("true", "1", "yes")
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if base is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            if isinstance(value, str):
                if value.strip().lstrip("+-").isdigit():
                    return int(value)  # exact, however large
                f = float(value)  # accepts "1e6"
                if not f.is_integer():
                    raise ValueError
                return int(f)
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            return str(value)
    except (TypeError, ValueError):
        pass
    kind = getattr(base, "__name__", str(base))
    raise ConfigError(f"{name}={value!r} is not a valid {kind}{' or None' if optional else ''}")


def _coerce_list(name: str, typ, value, optional: bool):
    """A list field from a list, from JSON text ("[0, 1, 5]") or from comma-separated text ("0,1,5")."""
    (item,) = typing.get_args(typ) or (str,)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"{name}: None is not allowed; give a list such as [0, 1]")
    literal = True  # a list or JSON: its strings are text as they stand
    if isinstance(value, str):
        text, literal = value.strip(), value.strip().startswith("[")
        try:
            value = json.loads(text) if literal else [v.strip() for v in text.split(",")]
        except ValueError:
            raise ConfigError(f"{name}={value!r} is not a list; write it as [0, 1, 5] or 0,1,5") from None
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{name}={value!r} is not a list; write it as [0, 1, 5] or 0,1,5")
    return [v if literal and item is str and isinstance(v, str) else coerce(f"{name}[{i}]", item, v)
            for i, v in enumerate(value)]


def parse_cli(argv: list[str]) -> TrainConfig:
    values = {}
    args = list(argv)
    if "--config" in args:
        i = args.index("--config")
        if i + 1 >= len(args):
            raise ConfigError("--config needs a YAML file")
        path = Path(args[i + 1])
        try:
            import yaml
            loaded = yaml.safe_load(path.read_text()) or {}
        except OSError as e:
            raise ConfigError(f"--config {path}: cannot read ({e.strerror})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: expected a mapping of key: value")
        values.update(loaded)
        del args[i:i + 2]
    for a in args:
        if "=" not in a:
            raise ConfigError(f"argument {a!r}: write key=value (keys: {', '.join(TrainConfig.field_names())})")
        k, v = a.split("=", 1)
        values[k.strip().removeprefix("--")] = v
    return TrainConfig.from_dict(values)
