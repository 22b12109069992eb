"""The whole experiment as one command: the numbered notebooks run headless through papermill.

    python -m helpers.pipeline [--preset demo|smoke|gpt2-owt] [--out DIR] [key=value ...]

Steps, each an executed notebook kept in the run folder as the record:
01 data -> (parent pre-trained from scratch here, when the preset says so) -> 02 inherit (layer
scores, every strategy's untrained child) -> 03 once per arm of `compare` (default: the inherited
child and a scratch model of the same shape), all on the same token budget and recipe -> 04
evaluate -> 05 plots. With grow=true, the paper's Algorithm 2 instead: rounds of 02-03-04 with a
growing child until it reaches the parent's val loss. A failing notebook stops the pipeline with
the path of its executed copy and the failing cell's error.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import typing
from pathlib import Path

from helpers.config import coerce
from helpers.errors import ConfigError, HelpersError

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
REPO = NOTEBOOKS.parent

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
                 ckpt_interval=0, eval_train=False,
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
}


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
}

# The paper's GPT-2 recipe (its repository's training script): AdamW (0.9, 0.95), weight decay 0.1,
# lr 2e-4 cosine to 1e-5 after 2,000 warm-up steps, 48 x 1024 = 49,152 tokens per step, bf16,
# 100k steps, and its copy of the weights (blocks, token embedding and head; the rest fresh).
RECIPES: dict[str, dict] = {
    "paper": dict(learning_rate=2e-4, min_lr=1e-5, warmup_iters=2000, max_iters=100_000, batch_size=12,
                  grad_accum=4, block_size=1024, weight_decay=0.1, beta1=0.9, beta2=0.95, dtype="bfloat16",
                  copy="paper", eval_interval=1000, eval_iters=50, eval_block_size=1024),
}


class NotebookFailed(HelpersError):
    pass


def run_notebook(name: str, run_dir: Path, params: dict, tag: str | None = None) -> Path:
    import papermill
    from papermill.exceptions import PapermillExecutionError
    out = run_dir / f"{Path(name).stem}{'_' + tag if tag else ''}.ipynb"
    print(f"[pipeline] {out.name}: {json.dumps(params, default=str)[:200]}", flush=True)
    started = time.time()
    try:
        papermill.execute_notebook(str(NOTEBOOKS / name), str(out), parameters=params, cwd=str(run_dir),
                                   progress_bar=False, log_output=False)
    except PapermillExecutionError as e:
        raise NotebookFailed(f"{name} failed in cell {e.exec_count}: {e.ename}: {e.evalue} — see {out}") from None
    print(f"[pipeline] {out.name} done in {time.time() - started:.0f} s", flush=True)
    return out


def settings(preset: str, overrides: dict) -> dict:
    if preset not in PRESETS:
        raise ConfigError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
    s = {**COMMON, **{k: v for k, v in PRESETS[preset].items() if k != "gpu"}}
    import torch
    if torch.cuda.is_available():
        s.update(PRESETS[preset].get("gpu", {}))
    from helpers.config import TrainConfig
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
    arm_names(s)  # rejects unknown arms early
    return absolute_paths(s)


def absolute_paths(s: dict) -> dict:
    """Local paths among the model and data sources made absolute: the notebooks run inside the run
    folder, where a path relative to the user's folder would point elsewhere. Names that are not
    paths (hub ids, smollm2-135m, stdlib, owt:N, hf:..., parent=pretrain) stay as they are."""
    from helpers.sources import EMBEDDED
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


def run(preset: str = "demo", out: str | Path | None = None, overrides: dict | None = None,
        update_readme: bool = False) -> dict:
    s = settings(preset, overrides or {})
    run_dir = Path(out or REPO / "runs" / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / "summary.json").exists() or (run_dir / "child").exists():
        raise ConfigError(f"--out {run_dir} already holds a pipeline run; pass another --out or delete it")
    t0 = time.time()
    data_dir = run_dir / "data"
    run_notebook("01_data.ipynb", run_dir, dict(source=s["source"], out_dir=str(data_dir), tokenizer=s["tokenizer"],
                                                val_fraction=s["val_fraction"], max_tokens=s["max_tokens"],
                                                max_docs=s["max_docs"]))
    train_common = {**train_settings(s, data_dir), "launch_ddp": s["launch_ddp"],
                    "nproc_per_node": s["nproc_per_node"]}
    parent = s["parent"]
    if parent == "pretrain":  # Algorithm 2: pre-train the parent here, from scratch
        from helpers.checkpoint import save_checkpoint
        from helpers.model import GPT, GPTConfig
        import torch
        torch.manual_seed(0)
        model = GPT(GPTConfig(**s["parent_shape"]))
        model.provenance = {"tokenizer": s["tokenizer"], "source": "random parent (pipeline)"}
        save_checkpoint(run_dir / "parent_init.pt", model)
        run_notebook("03_train.ipynb", run_dir, {**train_common, "init": str(run_dir / "parent_init.pt"),
                                                 "out_dir": str(run_dir / "parent"), "max_iters": s["parent_iters"],
                                                 "strategy": "first", "layers": None},
                     tag="parent")
        parent = str(run_dir / "parent")
    if s["grow"]:
        return run_grow(run_dir, preset, s, parent, data_dir, train_common, t0, update_readme)
    n_layers = s["n_layers"]
    compare = s["compare"] is not None
    run_notebook("02_inherit.ipynb", run_dir, dict(parent=parent, n_layers=n_layers, strategy=s["strategy"],
                                                   layers=s["layers"], copy=s["copy"], data_dir=str(data_dir),
                                                   calib_batches=s["calib_batches"], calib_block_size=s["block_size"],
                                                   val_tokens=s["strategy_val_tokens"], out=str(run_dir / "child_init.pt"),
                                                   images_dir=str(run_dir / "images"),
                                                   prompt=PROMPTS[0], max_new_tokens=s["max_new_tokens"]))
    arms = arm_names(s)
    for arm in arms:
        run_notebook("03_train.ipynb", run_dir, {**train_common, "parent": parent, "n_layers": n_layers,
                                                 **ARMS[arm], "out_dir": str(run_dir / arm)}, tag=arm)
    labels = {arm: arm_label(arm) for arm in arms}
    models = {"parent": parent}
    if not compare:  # the untrained child is in 02's strategies table too; evaluated again here as before
        models["child, inherited (untrained)"] = str(run_dir / "child_init.pt")
    models.update({labels[arm]: str(run_dir / arm) for arm in arms})
    run_notebook("04_eval.ipynb", run_dir, dict(models=models, data_dir=str(data_dir), out_dir=str(run_dir / "eval"),
                                                block_size=s["eval_block_size"], prompts=PROMPTS,
                                                max_new_tokens=s["max_new_tokens"], attention_tokens=s["attention_tokens"]))
    images = REPO / "images" if update_readme else run_dir / "images"
    table = compare_table(run_dir, s, arms) if compare else None
    from helpers.checkpoint import read_sidecar
    kept = read_sidecar(run_dir / "child_init.pt")["provenance"]
    parent_name = Path(s["parent"]).name if s["parent"] != "pretrain" else "parent pre-trained here"
    if compare:
        title = f"{preset}: {parent_name}, {len(kept['layers'])} of {kept['parent_n_layer']} layers kept, same budget"
    else:
        title = f"{preset}: {parent_name}, first {len(kept['layers'])} of {kept['parent_n_layer']} layers, vs scratch"
    untrained = {} if table is None else {untrained_label(r["model"]): r["untrained_val_loss"] for r in table.to_dict("records")
                                          if r["untrained_val_loss"] == r["untrained_val_loss"] and r["model"] != "parent"}
    run_notebook("05_plots.ipynb", run_dir, dict(runs={labels[arm]: str(run_dir / arm) for arm in arms},
                                                 eval_dir=str(run_dir / "eval"), images_dir=str(images), title=title,
                                                 untrained=untrained,
                                                 compare_csv=str(run_dir / "compare.csv") if compare else None))
    if update_readme and (run_dir / "images" / "layer_scores.png").exists():
        import shutil
        shutil.copy(run_dir / "images" / "layer_scores.png", images / "layer_scores.png")
    summary = summarize(run_dir, preset, s, time.time() - t0, images, table)
    if update_readme:
        write_readme_results(summary)
    print(f"[pipeline] finished in {summary['elapsed_s']:.0f} s; results in {run_dir}")
    return summary


def train_settings(s: dict, data_dir) -> dict:
    """Notebook 03's parameters common to every training run: the settings that are TrainConfig
    fields (the pipeline's own max_tokens caps the data, not training)."""
    from helpers.config import TrainConfig
    skip = {"parent", "n_layers", "init", "out_dir", "data_dir", "max_tokens"}
    common = {k: s[k] for k in TrainConfig.field_names() if k in s and k not in skip}
    return {"data_dir": str(data_dir), "log_interval": 5, **common}


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
    return f"inherited ({arm}) + trained" if ARMS[arm].get("init") == "inherit" else f"{arm}, trained"


def compare_table(run_dir: Path, s: dict, arms: list[str]):
    """One row per strategy and per arm: kept blocks, parameters, tokens trained, val loss before and
    after training (whole val split: notebook 02's untrained children, notebook 04's trained ones);
    written to compare.csv."""
    import pandas as pd
    strategies = pd.read_csv(run_dir / "child_init_strategies.csv", index_col="strategy")
    results = pd.read_csv(run_dir / "eval" / "eval.csv").set_index("model")
    rows = [{"model": "parent", "blocks": "all", "params": int(results.loc["parent", "params"]), "tokens_trained": None,
             "untrained_val_loss": None, "val_loss": float(results.loc["parent", "val_loss"])}]
    trained = {ARMS[a].get("strategy", s["strategy"]) if ARMS[a].get("init") == "inherit" else None: a for a in arms}
    child_params = int(results.loc[arm_label(arms[0]), "params"])
    for strategy, row in strategies.iterrows():
        arm = trained.get(strategy)
        label = arm_label(arm) if arm else f"inherited ({strategy}), untrained"
        rows.append({"model": label, "blocks": row["layers"], "params": child_params,
                     "tokens_trained": int(results.loc[label, "tokens_seen"]) if arm else None,
                     "untrained_val_loss": float(row["val_loss"]),
                     "val_loss": float(results.loc[label, "val_loss"]) if arm else None})
    for arm in arms:
        if ARMS[arm].get("init") != "inherit":
            label = arm_label(arm)
            rows.append({"model": label, "blocks": "random init", "params": int(results.loc[label, "params"]),
                         "tokens_trained": int(results.loc[label, "tokens_seen"]), "untrained_val_loss": None,
                         "val_loss": float(results.loc[label, "val_loss"])})
    table = pd.DataFrame(rows)
    table.to_csv(run_dir / "compare.csv", index=False)
    return table


def run_grow(run_dir: Path, preset: str, s: dict, parent: str, data_dir: Path, train_common: dict, t0: float,
             update_readme: bool) -> dict:
    """The paper's Algorithm 2: train a child of n blocks; if its whole-split val loss is not at or
    below the parent's (+ grow_tolerance), start again from the parent with n + grow_step, until n
    reaches the parent's depth. Each round is a folder of executed notebooks."""
    import pandas as pd
    from helpers.checkpoint import load_model
    from helpers.plots import plot_grow
    depth = load_model(parent).config.n_layer
    n = s["grow_start"] or max(1, depth // 2)
    if not 1 <= n <= depth or s["grow_step"] < 1:
        raise ConfigError(f"grow_start={n}, grow_step={s['grow_step']}: need 1 <= grow_start <= {depth} and grow_step >= 1")
    eval_params = dict(data_dir=str(data_dir), block_size=s["eval_block_size"], prompts=PROMPTS[:1],
                       max_new_tokens=s["max_new_tokens"], attention_tokens=s["attention_tokens"])
    run_notebook("04_eval.ipynb", run_dir, dict(models={"parent": parent}, out_dir=str(run_dir / "eval"), **eval_params),
                 tag="parent")
    parent_val = float(pd.read_csv(run_dir / "eval" / "eval.csv")["val_loss"].iloc[0])
    rounds, reached = [], None
    while True:
        folder = run_dir / f"grow_n{n:02d}"
        folder.mkdir(exist_ok=True)
        run_notebook("02_inherit.ipynb", folder, dict(parent=parent, n_layers=n, strategy=s["strategy"], copy=s["copy"],
                                                      data_dir=str(data_dir) if s["strategy"] in ("block-influence", "angular") else None,
                                                      calib_batches=s["calib_batches"], calib_block_size=s["block_size"],
                                                      out=str(folder / "child_init.pt"), images_dir=str(folder / "images"),
                                                      prompt=PROMPTS[0], max_new_tokens=s["max_new_tokens"]))
        run_notebook("03_train.ipynb", folder, {**train_common, "parent": parent, "n_layers": n, "init": "inherit",
                                                "out_dir": str(folder / "child")})
        run_notebook("04_eval.ipynb", folder, dict(models={f"child, {n} blocks": str(folder / "child")},
                                                   out_dir=str(folder / "eval"), **eval_params))
        result = pd.read_csv(folder / "eval" / "eval.csv").iloc[0]
        rounds.append({"n_layers": n, "val_loss": float(result["val_loss"]), "tokens": int(result["tokens_seen"])})
        print(f"[pipeline] grow: {n} blocks -> val loss {result['val_loss']:.3f} (parent {parent_val:.3f})", flush=True)
        if result["val_loss"] <= parent_val + s["grow_tolerance"]:
            reached = n
            break
        if n >= depth:
            break
        n = min(depth, n + s["grow_step"])
    images = REPO / "images" if update_readme else run_dir / "images"
    plot_grow(rounds, parent_val, path=images / "grow.png",
              title=f"{preset}: the paper's Algorithm 2, +{s['grow_step']} blocks per round")
    summary = {"preset": preset, "settings": s, "elapsed_s": round(time.time() - t0, 1), "machine": machine(),
               "date": time.strftime("%Y-%m-%d"), "parent_val_loss": parent_val, "grow": rounds,
               "grow_reached": reached, "images": [str(images / "grow.png")]}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"[pipeline] grow finished in {summary['elapsed_s']:.0f} s: "
          f"{'reached the parent at ' + str(reached) + ' blocks' if reached else 'did not reach the parent'}")
    return summary


def summarize(run_dir: Path, preset: str, s: dict, elapsed: float, images: Path, table=None) -> dict:
    import pandas as pd
    results = pd.read_csv(run_dir / "eval" / "eval.csv")
    summary = {"preset": preset, "settings": s, "elapsed_s": round(elapsed, 1), "machine": machine(),
               "date": time.strftime("%Y-%m-%d"), "results": results.to_dict(orient="records"),
               "images": sorted(str(p) for p in images.glob("*.png"))}
    if table is not None:
        summary["compare"] = json.loads(table.to_json(orient="records"))
    (run_dir / "summary.json").write_text(json.dumps(finite_or_null(summary), indent=1, default=str, allow_nan=False))
    return summary


def finite_or_null(value):
    """`value` with every NaN or infinite float replaced by None: JSON has no NaN, and most readers
    refuse the bare `NaN` Python writes (pandas gives NaN for a run without a token count)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def machine() -> str:
    """The machine in words, for records of runs and benchmarks: the GPU's name, or the CPU's."""
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{cpu_name() or platform.machine()}, {torch.get_num_threads()} CPU threads, no GPU"


def cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def write_readme_results(summary: dict) -> None:
    """Replace the README's generated results section with this run's table and figure."""
    readme = REPO / "README.md"
    text = readme.read_text()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    if start not in text or end not in text:
        raise ConfigError(f"{readme}: no {start} ... {end} section to fill")
    if summary.get("compare"):
        return write_readme_compare(summary, readme, text, start, end)
    rows = ["| model | layers | parameters | tokens trained | val loss | perplexity |", "|---|---:|---:|---:|---:|---:|"]
    for r in summary["results"]:
        seen = "" if r.get("tokens_seen") in (None, "") or r["tokens_seen"] != r["tokens_seen"] else f"{int(r['tokens_seen']):,}"
        ppl = f"{r['perplexity']:.3g}" if r["perplexity"] >= 1e5 else f"{r['perplexity']:.1f}"
        rows.append(f"| {r['model']} | {r['layers']} | {r['params'] / 1e6:.1f} M | {seen} | {r['val_loss']:.3f} | {ppl} |")
    s = summary["settings"]
    body = "\n".join([
        start,
        f"Generated by `python -m helpers.pipeline --preset {summary['preset']} --update-readme` on {summary['date']}, "
        f"{summary['machine']}, in {summary['elapsed_s'] / 60:.1f} minutes. Val loss is over the whole validation split "
        f"({summary['results'][0]['val_tokens']:,} tokens); both trained models saw the same "
        f"{s['max_iters']} steps x {s['batch_size'] * s['block_size'] * s['grad_accum']:,} tokens (the parent's own "
        "pre-training is not counted).",
        "", *rows, "", "![loss curves](images/loss_curves.png)", end])
    readme.write_text(text[:text.index(start)] + body + text[text.index(end) + len(end):])


def write_readme_compare(summary: dict, readme: Path, text: str, start: str, end: str) -> None:
    """The README's results section for a comparison: one row per strategy and arm, the recipe, the figures."""
    s = summary["settings"]
    num = lambda v, f="{:.3f}": "" if v is None or v != v else f.format(v)  # noqa: E731
    rows = ["| model | blocks kept | parameters | tokens trained | val loss, untrained | val loss, trained |",
            "|---|---|---:|---:|---:|---:|"]
    for r in summary["compare"]:
        trained = num(r["val_loss"]) if r["model"] != "parent" else ""
        untrained = num(r["untrained_val_loss"]) if r["model"] != "parent" else num(r["val_loss"])
        rows.append(f"| {r['model']} | {r['blocks']} | {r['params'] / 1e6:.1f} M | {num(r['tokens_trained'], '{:,.0f}')} | "
                    f"{untrained} | {trained} |")
    tokens_per_step = s["batch_size"] * s["block_size"] * s["grad_accum"]
    val_tokens = summary["results"][0]["val_tokens"]
    body = "\n".join([
        start,
        f"Generated by `python -m helpers.pipeline --preset {summary['preset']} --update-readme` on {summary['date']}, "
        f"{summary['machine']}, in {summary['elapsed_s'] / 60:.1f} minutes (whole pipeline: data, scores, every "
        f"notebook, evaluation and plots). Val loss is over the whole validation split ({val_tokens:,} tokens); the "
        f"parent's is in the untrained column. Every trained arm ran the same recipe: {s['max_iters']} steps x "
        f"{tokens_per_step:,} tokens ({s['batch_size']} x {s['block_size']}), AdamW lr {s['learning_rate']:g} "
        f"(warm-up {s['warmup_iters']} steps, cosine to {s['min_lr']:g}), weight decay "
        f"{s.get('weight_decay', 0.1):g}, gradient clipping 1.0, float32; scores from {s['calib_batches']} x "
        f"{s['block_size']} train-split tokens.",
        "", *rows, "", "![loss curves](images/loss_curves.png)", "", "![layer scores](images/layer_scores.png)", end])
    readme.write_text(text[:text.index(start)] + body + text[text.index(end) + len(end):])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo", help=f"one of {', '.join(PRESETS)}")
    ap.add_argument("--out", default=None, help="run folder (default runs/<preset>-<date>-<time>)")
    ap.add_argument("--update-readme", action="store_true", help="write images/ and the README results section")
    ap.add_argument("overrides", nargs="*", help="key=value settings of the preset")
    args = ap.parse_args(argv)
    try:
        overrides = dict(kv.split("=", 1) for kv in args.overrides)
    except ValueError:
        print("error: settings are key=value", file=sys.stderr)
        return 2
    try:
        run(args.preset, args.out, overrides, args.update_readme)
    except HelpersError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
