"""The training configuration: one dataclass, TrainConfig, whose fields are notebook 03's
parameters, the command line's key=value pairs (`python -m helpers.train`) and the YAML keys of
`--config`; `coerce` turns user text into each field's type, and nothing else parses it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path

from helpers.errors import ConfigError


def default_root() -> str:
    """Where outputs go by default: /kaggle/working on Kaggle, the current folder elsewhere."""
    return "/kaggle/working" if os.environ.get("KAGGLE_KERNEL_RUN_TYPE") else "."


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
    dtype: str = "auto"  # auto (bf16 on GPUs that have it, else fp16; fp32 on CPU) | float32 | bfloat16 | float16
    compile: bool = False
    seed: int = 1337
    progress: bool = True
    # knowledge distillation (helpers.head_loss): loss = (1 - kd_alpha) * CE + kd_alpha * T^2 * KL(teacher || student)
    teacher: str | None = None  # None (no distillation) | "parent" | any source load_model accepts
    kd_alpha: float = 0.6  # the soft term's weight (0.6: the paper's KD baseline); 0: the teacher is not even loaded
    kd_temperature: float = 1.0  # T, dividing both models' logits in the soft term

    def __post_init__(self):
        self.auto_data = self.data_dir is None  # only then may training prepare the data itself
        if self.data_dir is None:
            self.data_dir = f"{default_root()}/data/stdlib-{Path(str(self.parent)).stem}"
        if self.out_dir is None:
            self.out_dir = f"{default_root()}/runs/train"

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

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
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype={self.dtype!r}: use auto, float32, bfloat16 or float16")
        if self.learning_rate <= 0 or self.min_lr < 0 or self.min_lr > self.learning_rate:
            raise ConfigError(f"learning rates: need 0 <= min_lr ({self.min_lr}) <= learning_rate ({self.learning_rate})")
        if not 0 <= self.kd_alpha <= 1:
            raise ConfigError(f"kd_alpha={self.kd_alpha} must lie in [0, 1] (the soft term's weight)")
        if not 0 < self.kd_temperature < math.inf:
            raise ConfigError(f"kd_temperature={self.kd_temperature} must be a positive number")

    @property
    def distilling(self) -> bool:
        """Whether training distils from a teacher (teacher set and kd_alpha > 0)."""
        return self.teacher is not None and self.kd_alpha > 0


def coerce(name: str, typ, value):
    """`value` as the field's type; strings are parsed ("none" -> None, "true"/"false" -> bool)."""
    args = typing.get_args(typ)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), typ) if args else typ
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"{name}: None is not allowed; give a {base.__name__}")
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
    raise ConfigError(f"{name}={value!r} is not a valid {base.__name__}{' or None' if optional else ''}")


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
