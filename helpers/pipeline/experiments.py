"""The experiments: one comparison (01 data -> 02 inherit -> 03 per arm -> 04 evaluate -> 05 plots)
or the paper's grow loop (Algorithm 2), each step an executed notebook in the run folder; and the
command line that starts them.
Floor "pipeline", the top: uses everything below through checkpoint, plots and the notebooks."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from helpers.checkpoint import open_weights, read_sidecar, save_checkpoint
from helpers.config import TrainConfig
from helpers.errors import ConfigError, HelpersError
from helpers.model import GPT, GPTConfig
from helpers.pipeline.notebooks import REPO, run_notebook
from helpers.pipeline.report import machine, summarize, write_readme_results
from helpers.pipeline.settings import (ARMS, PRESETS, PROMPTS, arm_label, arm_names, arm_settings, settings,
                                       train_settings, untrained_label)
from helpers.plots import plot_grow
from helpers.startup import resolve_device


def run(preset: str = "demo", out: str | Path | None = None, overrides: dict | None = None,
        update_readme: bool = False) -> dict:
    s = settings(preset, overrides or {})
    device, dtype = resolve_device(TrainConfig.from_dict({k: s[k] for k in ("device", "dtype") if k in s}))
    s["dtype"] = str(dtype).removeprefix("torch.")  # what dtype=auto picks here, named in the table's recipe
    print(f"[pipeline] {preset}: training in {s['dtype']} on {device.type}", flush=True)
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
                                                 **arm_settings(arm, s), "out_dir": str(run_dir / arm)}, tag=arm)
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
        shutil.copy(run_dir / "images" / "layer_scores.png", images / "layer_scores.png")
    summary = summarize(run_dir, preset, s, time.time() - t0, images, table)
    if update_readme:
        write_readme_results(summary)
    print(f"[pipeline] finished in {summary['elapsed_s']:.0f} s; results in {run_dir}")
    return summary


def compare_table(run_dir: Path, s: dict, arms: list[str]):
    """One row per strategy and per arm: kept blocks, parameters, tokens trained, val loss before and
    after training (whole val split: notebook 02's untrained children, notebook 04's trained ones);
    written to compare.csv."""
    strategies = pd.read_csv(run_dir / "child_init_strategies.csv", index_col="strategy")
    results = pd.read_csv(run_dir / "eval" / "eval.csv").set_index("model")
    rows = [{"model": "parent", "blocks": "all", "params": int(results.loc["parent", "params"]), "tokens_trained": None,
             "untrained_val_loss": None, "val_loss": float(results.loc["parent", "val_loss"])}]
    chosen = "layers" if s["layers"] is not None else s["strategy"]  # what the `child` arm kept
    # the child of each strategy trained plainly; trained another way (a teacher, adapters) it gets a row of its own
    plain = [a for a in arms if ARMS[a].get("init") == "inherit" and set(ARMS[a]) <= {"init", "strategy"}]
    trained = {ARMS[a].get("strategy", chosen): a for a in plain}
    child_params = int(results.loc[arm_label(arms[0]), "params"])
    for strategy, row in strategies.iterrows():
        arm = trained.get(strategy)
        label = arm_label(arm) if arm else f"inherited ({strategy}), untrained"
        rows.append({"model": label, "blocks": row["layers"], "params": child_params,
                     "tokens_trained": int(results.loc[label, "tokens_seen"]) if arm else None,
                     "untrained_val_loss": float(row["val_loss"]),
                     "val_loss": float(results.loc[label, "val_loss"]) if arm else None})
    if "layers" in trained:  # an explicit list: not one of the strategies notebook 02 compared
        label = arm_label(trained["layers"])
        rows.append({"model": label, "blocks": str(s["layers"]), "params": child_params,
                     "tokens_trained": int(results.loc[label, "tokens_seen"]), "untrained_val_loss": None,
                     "val_loss": float(results.loc[label, "val_loss"])})
    for arm in arms:
        if arm not in plain:  # scratch arms, and the child trained another way
            label = arm_label(arm)
            blocks = "random init" if ARMS[arm].get("init") != "inherit" else \
                strategies.loc[chosen, "layers"] if chosen in strategies.index else str(s["layers"])
            rows.append({"model": label, "blocks": blocks, "params": int(results.loc[label, "params"]),
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
    depth = open_weights(parent).model.config.n_layer  # the config alone: no weights read
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
