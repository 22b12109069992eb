"""The pipeline's settings: presets, the arms a comparison trains, the paper's recipe, and the one
parser of key=value overrides (helpers.config.coerce, as the training command line).
Floor "pipeline": uses config, startup (native bfloat16), checkpoint (embedded parents) and the errors."""
from __future__ import annotations

import typing
from pathlib import Path

import torch

from helpers.checkpoint import EMBEDDED
from helpers.config import TrainConfig, coerce
from helpers.errors import ConfigError
from helpers.startup import native_bf16

PROMPTS = ["def fibonacci(n):\n", "import os\n\n\ndef main():\n", "The standard library"]

PRESETS: dict[str, dict] = {
    # The README's main command: a real pretrained parent (SmolLM2-135M, shipped in a wheel), half of
    # its layers chosen three ways (first half, block influence) and scratch at one budget, the
    # Python standard library as data, 2-core CPU in < 15 min. The recipe was tuned with short runs
    # (bench/tune_demo.py, table in BENCHMARKS.md): a low lr keeps what the child inherited.
    "demo": dict(parent="smollm2-135m", n_layers=None, source="stdlib", tokenizer="smollm2-135m",
                 max_tokens=1_000_000, max_docs=None, val_fraction=0.015, max_iters=32, batch_size=4,
                 block_size=256, grad_accum=1, learning_rate=3e-4, min_lr=3e-5, warmup_iters=5,
                 eval_interval=8, eval_iters=1, eval_block_size=256, attention_tokens=128, max_new_tokens=24,
                 compare="first,block-influence,scratch", strategy="block-influence", calib_batches=8,
                 ckpt_interval=0, eval_train=False, dtype="float32",
                 # On a CPU with native bfloat16 (bench/bf16.py: a step ~2x float32 there) the demo trains
                 # in bfloat16 and spends the time saved on twice the steps (BENCHMARKS.md, "The demo in
                 # bfloat16"); dtype=float32 on the command line gives the float32 demo anywhere.
                 cpu_bf16=dict(dtype="bfloat16", max_iters=64),
                 gpu=dict(max_iters=600, batch_size=16, block_size=512, eval_interval=50, eval_iters=20,
                          eval_block_size=512, max_tokens=20_000_000, val_fraction=0.01)),
    # The same path at toy sizes for the tests; the parent is pre-trained here from scratch.
    "smoke": dict(parent="pretrain", parent_shape=dict(n_layer=4, n_head=2, n_embd=64, block_size=128,
                                                       vocab_size=50257),
                  parent_iters=40, n_layers=2, source="stdlib", tokenizer="gpt2", max_tokens=30_000, max_docs=None,
                  val_fraction=0.1, max_iters=20, batch_size=8, block_size=64, grad_accum=1,
                  learning_rate=2e-3, min_lr=2e-4, warmup_iters=2, eval_interval=10, eval_iters=2,
                  eval_block_size=64, attention_tokens=32, max_new_tokens=8),
    # The original Kaggle setting (GPU): GPT-2 medium from the hub, an OpenWebText subset.
    "gpt2-owt": dict(parent="gpt2-medium", n_layers=16, source="owt:0", tokenizer="gpt2", max_tokens=None,
                     max_docs=None, val_fraction=0.005, max_iters=5000, batch_size=8, block_size=1024,
                     grad_accum=4, learning_rate=3e-4, min_lr=3e-5, warmup_iters=200, eval_interval=250,
                     eval_iters=50, eval_block_size=1024, attention_tokens=256, max_new_tokens=32),
    # The paper's Llama experiment (GPU), as its repository's lit-gpt/Training/train.py ran it:
    # OpenLLaMA-3B's first 13 of 26 blocks; AdamW lr 3e-4 with torch's default betas (0.9, 0.999),
    # weight decay 0.01, no gradient clipping, linear warm-up over 1,000 steps and then constant
    # (min_lr = learning_rate); 8 sequences of 2,048 tokens per step (micro-batch 1 x 8 accumulation
    # steps); its 191,000 micro-steps are 23,875 steps = 391 M tokens; bf16; the RedPajama sample in
    # the parent's SentencePiece tokenizer; only the child is trained (the paper had no scratch arm).
    "openllama": dict(parent="openlm-research/open_llama_3b", n_layers=13,
                      source="hf:togethercomputer/RedPajama-Data-1T-Sample", tokenizer="openlm-research/open_llama_3b",
                      max_tokens=None, max_docs=None, val_fraction=0.002, max_iters=23_875, batch_size=1,
                      block_size=2048, grad_accum=8, learning_rate=3e-4, min_lr=3e-4, warmup_iters=1000,
                      weight_decay=0.01, beta1=0.9, beta2=0.999, grad_clip=0.0, dtype="bfloat16", copy="paper",
                      compare="child", eval_interval=1000, eval_iters=50, eval_block_size=2048,
                      attention_tokens=256, max_new_tokens=32),
}


# A preset's variants by machine: "gpu" where CUDA is visible, "cpu_bf16" on a CPU with native bfloat16.
OVERLAYS = ("gpu", "cpu_bf16")

# Settings every preset has unless it says otherwise. Any TrainConfig field may also be given
# (e.g. weight_decay=0.05); it goes to every training run. Notebook 03 trains in its kernel, or
# launched with torchrun on nproc_per_node processes (None: one per GPU) sharing the model as parallel=ddp|fsdp.
COMMON = dict(launch_ddp=False, nproc_per_node=None, parallel="ddp", strategy="first", copy="all", layers=None, calib_batches=8, strategy_val_tokens=None, compare=None,
              grow=False, grow_start=None, grow_step=2, grow_tolerance=0.0, recipe=None)

# The arms a comparison can train, each a set of TrainConfig overrides; every arm gets the same
# budget and recipe. "child" is the inherited child of the `strategy` setting.
ARMS: dict[str, dict] = {
    "child": {"init": "inherit"},
    "first": {"init": "inherit", "strategy": "first"},
    "first+last": {"init": "inherit", "strategy": "first+last"},
    "block-influence": {"init": "inherit", "strategy": "block-influence"},
    "angular": {"init": "inherit", "strategy": "angular"},
    "scratch": {"init": "scratch"},
    # distillation from the parent (helpers.head_loss): the paper's KD baseline (a scratch child,
    # alpha 0.6, temperature 1) and the inherited child trained with distillation (Minitron)
    "scratch+kd": {"init": "scratch", "teacher": "parent", "kd_alpha": 0.6, "kd_temperature": 1.0},
    "child+kd": {"init": "inherit", "teacher": "parent", "kd_alpha": 0.6, "kd_temperature": 1.0},
    # LoRA healing (helpers.lora): the inherited child frozen, adapters of rank 8 trained on its
    # projections (the pipeline's lora_r setting changes the rank; the other arms train every weight)
    "child+lora": {"init": "inherit", "lora_r": 8},
}

# The paper's GPT-2 recipe (its repository's training script): AdamW (0.9, 0.95), weight decay 0.1,
# lr 2e-4 cosine to 1e-5 after 2,000 warm-up steps, 48 x 1024 = 49,152 tokens per step, bf16,
# 100k steps, and its copy of the weights (blocks, token embedding and head; the rest fresh).
RECIPES: dict[str, dict] = {
    "paper": dict(learning_rate=2e-4, min_lr=1e-5, warmup_iters=2000, max_iters=100_000, batch_size=12,
                  grad_accum=4, block_size=1024, weight_decay=0.1, beta1=0.9, beta2=0.95, dtype="bfloat16",
                  copy="paper", eval_interval=1000, eval_iters=50, eval_block_size=1024),
}


def settings(preset: str, overrides: dict) -> dict:
    if preset not in PRESETS:
        raise ConfigError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
    s = {**COMMON, **{k: v for k, v in PRESETS[preset].items() if k not in OVERLAYS}}
    if torch.cuda.is_available():
        s.update(PRESETS[preset].get("gpu", {}))
    elif native_bf16() and "dtype" not in overrides:  # a dtype given by the user keeps the preset's recipe
        s.update(PRESETS[preset].get("cpu_bf16", {}))
    unknown = sorted(set(overrides) - set(s) - set(TrainConfig.field_names()))
    if unknown:
        raise ConfigError(f"unknown pipeline settings {unknown}; valid: {', '.join(sorted(s))} or any TrainConfig field")
    # the one key=value parser: true/false where the setting is a switch, else None, an int, a float or the text
    parsed = {k: coerce(k, bool if isinstance(s.get(k), bool) else typing.Any, v) if isinstance(v, str) else v
              for k, v in overrides.items()}
    recipe = parsed.get("recipe", s["recipe"])
    if recipe is not None:
        if recipe not in RECIPES:
            raise ConfigError(f"recipe={recipe!r}: choose one of {', '.join(RECIPES)} (or leave it out)")
        s.update(RECIPES[recipe])
    s.update(parsed)
    if isinstance(s["layers"], (str, int)):
        s["layers"] = coerce("layers", list[int] | None, str(s["layers"]))
    arms = arm_names(s)  # rejects unknown arms early
    if s.get("lora_r") and not any(ARMS[a].get("lora_r") for a in arms):
        raise ConfigError(f"lora_r={s['lora_r']}: the pipeline trains LoRA adapters in its child+lora arm only; add it to "
                          "compare (e.g. compare=child,child+lora,scratch)")
    if s["layers"] is not None:
        explicit_layers(s, parsed)
    return absolute_paths(s)


def explicit_layers(s: dict, given: dict) -> None:
    """An explicit `layers` list is the inherited child, whatever the preset's strategy: the strategy
    becomes "first" (notebooks 02 and 03 take a list or a strategy, not both), n_layers the list's
    length, and the arms of `compare` that are strategies collapse into one `child` arm trained on
    exactly those blocks. Where that leaves the default two arms (child, scratch), the run is the
    plain comparison, which also evaluates the untrained child. A strategy or n_layers given beside
    the list that disagrees with it is refused, as is grow (which picks the number of blocks itself)."""
    layers = s["layers"]
    if given.get("strategy", "first") != "first":
        raise ConfigError(f"layers={layers} and strategy={given['strategy']!r}: give one of them, not both")
    if given.get("n_layers") is not None and given["n_layers"] != len(layers):
        raise ConfigError(f"n_layers={given['n_layers']} but layers lists {len(layers)} blocks; drop n_layers")
    if s["grow"]:
        raise ConfigError(f"grow=true picks the number of blocks itself; drop layers={layers}")
    arms = list(dict.fromkeys("child" if "strategy" in ARMS[a] else a for a in arm_names(s)))
    s.update(strategy="first", n_layers=len(layers), compare=None if arms == ["child", "scratch"] else ",".join(arms))


def absolute_paths(s: dict) -> dict:
    """Local paths among the model and data sources made absolute: the notebooks run inside the run
    folder, where a path relative to the user's folder would point elsewhere. Names that are not
    paths (hub ids, smollm2-135m, stdlib, owt:N, hf:..., parent=pretrain) stay as they are."""
    out = dict(s)
    for key in ("parent", "source", "teacher", "tokenizer"):
        v = out.get(key)
        if not isinstance(v, str) or v in EMBEDDED or v in ("stdlib", "pretrain", "parent", "gpt2") \
                or v.startswith(("owt:", "hf:")) or Path(v).is_absolute():
            continue
        path = Path(v).expanduser()
        if path.exists() or any(c in v for c in "*?["):  # a file, a folder, or a glob of files
            out[key] = str(Path.cwd() / path) if not path.is_absolute() else str(path)
    return out


def arm_names(s: dict) -> list[str]:
    """The arms to train: the `compare` setting (comma-separated names of ARMS), default child and scratch."""
    names = [a.strip() for a in str(s["compare"] or "child,scratch").split(",") if a.strip()]
    unknown = [a for a in names if a not in ARMS]
    if unknown or not names:
        raise ConfigError(f"compare={s['compare']!r}: unknown arms {unknown}; choose among {', '.join(ARMS)}")
    return names


def train_settings(s: dict, data_dir) -> dict:
    """Notebook 03's parameters common to every training run: the settings that are TrainConfig
    fields (the pipeline's own max_tokens caps the data, not training)."""
    skip = {"parent", "n_layers", "init", "out_dir", "data_dir", "max_tokens", "lora_r"}  # lora_r: arm_settings
    common = {k: s[k] for k in TrainConfig.field_names() if k in s and k not in skip}
    return {"data_dir": str(data_dir), "log_interval": 5, **common}


def arm_settings(arm: str, s: dict) -> dict:
    """An arm's TrainConfig overrides (ARMS); a LoRA arm takes the rank of the lora_r setting when given."""
    lora_r = s.get("lora_r")
    return {**ARMS[arm], **({"lora_r": lora_r} if ARMS[arm].get("lora_r") and lora_r else {})}


def untrained_label(model: str) -> str:
    """A compare-table row's name for its model before training: 'inherited (angular), untrained'."""
    name = model.removesuffix(" + trained")
    return name if name.endswith("untrained") else f"{name}, untrained"


def arm_label(arm: str) -> str:
    """The name of an arm's trained model in tables and figures (the default two keep their old names)."""
    if arm == "child":
        return "child, inherited + trained"
    if arm == "scratch":
        return "scratch, trained"
    if ARMS[arm].get("teacher"):
        return f"{'child, inherited' if ARMS[arm]['init'] == 'inherit' else 'scratch'} + trained with KD"
    if ARMS[arm].get("lora_r"):
        return "child, inherited + trained with LoRA"
    return f"inherited ({arm}) + trained" if ARMS[arm].get("init") == "inherit" else f"{arm}, trained"
