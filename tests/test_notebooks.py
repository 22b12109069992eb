"""The numbered notebooks run headless under papermill with small parameters."""
import json
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def run_notebook(name, where, **params):
    """Execute a notebook in the folder `where` (its relative paths start there); the executed copy."""
    import papermill
    out = Path(where) / f"executed_{name}"
    papermill.execute_notebook(str(NOTEBOOKS / name), str(out), parameters=params, progress_bar=False,
                               cwd=str(where))
    nb = json.loads(out.read_text())
    errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    return nb


@pytest.fixture(scope="session")
def gpt2_vocab_parent(tmp_path_factory):
    """A tiny random GPT-2 with GPT-2's real vocabulary, so GPT-2 tokens fit."""
    from conftest import make_hf_gpt2
    path = tmp_path_factory.mktemp("parent")
    make_hf_gpt2(path, vocab_size=50257, n_embd=64, n_head=2)
    return path


def test_notebooks_are_committed_without_outputs():
    for p in NOTEBOOKS.glob("*.ipynb"):
        nb = json.loads(p.read_text())
        assert not any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), p
        assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in nb["cells"]), p


def test_02_inherit_runs_under_papermill(gpt2_vocab_parent, tmp_path):
    run_notebook("02_inherit.ipynb", tmp_path, parent=str(gpt2_vocab_parent), n_layers=2, out="child.pt")
    from helpers.checkpoint import load_model, read_sidecar
    child = load_model(tmp_path / "child.pt")
    assert child.config.n_layer == 2
    assert read_sidecar(tmp_path / "child.pt")["provenance"]["layers"] == [0, 1]


@pytest.fixture(scope="session")
def tiny_run_inputs(train_inputs):
    return train_inputs


@pytest.mark.slow
def test_03_launches_ddp_on_kaggle_layout(tiny_run_inputs, tmp_path, monkeypatch):
    """As on Kaggle (KAGGLE_KERNEL_RUN_TYPE set; the working root stood in for by a temporary folder):
    launch_ddp=True with nproc_per_node=2 prints the exact torchrun line, really trains in 2 CPU
    processes (gloo), writes under the working root, and logs the losses of 1 process with grad_accum=2."""
    import shlex
    from helpers.train import TrainConfig, read_metrics, torchrun_command, train
    root = tmp_path / "kaggle working"
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    monkeypatch.setenv("INHERITUNE_KAGGLE_WORKING", str(root))
    params = dict(parent=str(tiny_run_inputs / "parent.pt"), n_layers=2, data_dir=str(tiny_run_inputs / "data"),
                  max_iters=4, batch_size=2, block_size=32, grad_accum=2, eval_interval=2, eval_iters=2,
                  log_interval=1, warmup_iters=2, device="cpu", progress=False)
    nb = run_notebook("03_train.ipynb", tmp_path, **params, launch_ddp=True, nproc_per_node=2)
    printed = "".join("".join(o["text"]) for c in nb["cells"] for o in c.get("outputs", []) if o.get("name") == "stdout")
    cfg = TrainConfig.from_dict(params)
    assert cfg.out_dir == f"{root}/runs/train"
    assert shlex.join(torchrun_command(cfg, 2)) in printed.splitlines()
    assert "--nproc_per_node=2" in printed and (root / "runs" / "train" / "metrics.jsonl").is_file()
    one = train(TrainConfig.from_dict({**params, "out_dir": str(tmp_path / "one")}))
    two = read_metrics(root / "runs" / "train")
    assert list(two["step"]) == [0, 2, 4] and one["step"] == 4
    for name in ("train_loss", "val_loss"):
        assert list(two[name]) == pytest.approx(list(read_metrics(tmp_path / "one")[name]), rel=1e-5)


def test_02_scores_strategies_and_figure(gpt2_vocab_parent, tmp_path):
    from helpers.checkpoint import read_sidecar
    from helpers.data import prepare
    prepare("stdlib", tmp_path / "data", max_docs=20, val_fraction=0.3, progress=False)
    nb = run_notebook("02_inherit.ipynb", tmp_path, parent=str(gpt2_vocab_parent), n_layers=2, strategy="angular",
                      data_dir=str(tmp_path / "data"), calib_batches=2, calib_block_size=32, val_tokens=256,
                      out="child.pt", images_dir="img")
    assert (tmp_path / "img" / "layer_scores.png").stat().st_size > 5000
    assert any("image/png" in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", []))
    import pandas as pd
    table = pd.read_csv(tmp_path / "child_strategies.csv", index_col="strategy")
    assert list(table.index) == ["first", "first+last", "block-influence", "angular"] and table["val_loss"].notna().all()
    scores = json.loads((tmp_path / "child_scores.json").read_text())
    side = read_sidecar(tmp_path / "child.pt")["provenance"]
    assert side["selection"]["strategy"] == "angular" and side["selection"]["scores"] == scores
    assert str(side["layers"]) == table.loc["angular", "layers"]


# ---- every notebook on a one-file corpus and on the embedded one (issue 18) -----------------------
def outputs(nb, kind=None):
    return [o for c in nb["cells"] for o in c.get("outputs", []) if kind is None or o.get("output_type") == kind]


def printed(nb, stream="stdout"):
    return "".join("".join(o["text"]) for o in outputs(nb, "stream") if o.get("name") == stream)


def has_figure(nb):
    return any("image/png" in o.get("data", {}) for o in outputs(nb))


@pytest.fixture(scope="module")
def chain(train_inputs, tmp_path_factory):
    """01 -> 05 under papermill with a tiny parent on one text file as the whole corpus (the classic
    input.txt, split by position: no end-of-text in its train split). The embedded corpus goes
    through every notebook in the pipeline tests (conftest's compare_run)."""
    import argparse
    base = tmp_path_factory.mktemp("chain")
    source = "input.txt"
    (base / "input.txt").write_text(Path(argparse.__file__).read_text()[:40_000])
    parent = str(train_inputs / "parent.pt")
    nbs = {"01": run_notebook("01_data.ipynb", base, source=source, out_dir="data", max_docs=20, val_fraction=0.2)}
    nbs["02"] = run_notebook("02_inherit.ipynb", base, parent=parent, n_layers=2, strategy="block-influence", data_dir="data",
                             calib_batches=2, calib_block_size=32, val_tokens=256, out="child_init.pt", images_dir="images",
                             max_new_tokens=4)
    nbs["03"] = run_notebook("03_train.ipynb", base, parent=parent, n_layers=2, data_dir="data", out_dir="child",
                             max_iters=4, batch_size=2, block_size=32, eval_interval=2, eval_iters=1, log_interval=1,
                             warmup_iters=1, device="cpu", strategy="block-influence", calib_batches=2)
    nbs["04"] = run_notebook("04_eval.ipynb", base, models=json.dumps({"parent": parent, "child": "child"}), data_dir="data",
                             out_dir="eval", block_size=32, attention_tokens=16, max_new_tokens=4, prompts=["def f():"])
    nbs["05"] = run_notebook("05_plots.ipynb", base, runs=json.dumps({"child": "child"}), eval_dir="eval", images_dir="images",
                             untrained=json.dumps({"child, untrained": 9.5}))
    return source, base, nbs


def test_the_pipeline_streams_a_notebooks_output_as_it_runs(tmp_path, capfd, monkeypatch):
    """helpers.pipeline's run_notebook passes the cells' stdout and stderr through to the terminal
    (once each), and asks the kernel for text progress bars (helpers.records.progress_bar); the
    executed notebook keeps the output too."""
    import os
    from helpers.pipeline import run_notebook as pipeline_notebook
    from helpers.records import PROGRESS_ENV
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    (tmp_path / "input.txt").write_text("".join(f"line {i}: some text to learn from\n" for i in range(2000)))
    out = pipeline_notebook("01_data.ipynb", tmp_path, {"source": "input.txt", "out_dir": "data"})
    terminal = capfd.readouterr()
    assert terminal.out.count("source 'input.txt' -> data") == 1 and "split by position" in terminal.out
    assert "documents:" in terminal.err  # the tokenizer's progress, as text on the terminal
    assert "source 'input.txt' -> data" in printed(json.loads(out.read_text()))
    assert PROGRESS_ENV not in os.environ  # set for the kernel only


@pytest.mark.slow
def test_01_runs_on_one_text_file(chain):
    """The classic input.txt as the whole corpus: split by position, so the train split holds no
    end-of-text; the document-length histogram shows its one document (it used to crash)."""
    source, base, nbs = chain
    meta = json.loads((base / "data" / "meta.json").read_text())
    assert source == "input.txt" and meta["split"]["method"] == "position"
    assert has_figure(nbs["01"]) and "split by position" in printed(nbs["01"])
    # the tokenizer's progress bar is a widget (ipywidgets is installed with the project), not a warning
    assert "IProgress not found" not in printed(nbs["01"], "stderr")
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs(nbs["01"]))


@pytest.mark.slow
def test_02_chooses_by_block_influence(chain):
    from helpers.checkpoint import read_sidecar
    _, base, nbs = chain
    side = read_sidecar(base / "child_init.pt")["provenance"]
    assert side["selection"]["strategy"] == "block-influence" and len(side["layers"]) == 2
    assert has_figure(nbs["02"]) and (base / "images" / "layer_scores.png").is_file()
    assert "max |child - truncated parent|" in printed(nbs["02"])


@pytest.mark.slow
def test_03_trains_and_shows_a_widget_bar_not_a_warning(chain):
    _, base, nbs = chain
    rows = [json.loads(line) for line in (base / "child" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4] and has_figure(nbs["03"])
    assert "IProgress not found" not in printed(nbs["03"], "stderr")
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs(nbs["03"]))


@pytest.mark.slow
def test_04_and_05_evaluate_and_plot(chain):
    import pandas as pd
    _, base, nbs = chain
    table = pd.read_csv(base / "eval" / "eval.csv").set_index("model")
    assert table.loc["child", "tokens_seen"] == 4 * 2 * 32 and pd.isna(table.loc["parent", "tokens_seen"])
    assert set(pd.read_csv(base / "eval" / "attention_summary.csv")["model"]) == {"parent", "child"}
    assert {"loss_curves.png", "val_loss_vs_params.png", "attention_child.png"} <= {p.name for p in (base / "images").glob("*.png")}
    assert has_figure(nbs["04"]) and has_figure(nbs["05"])
