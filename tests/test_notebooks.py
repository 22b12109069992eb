"""The numbered notebooks run headless under papermill with small parameters."""
import json
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def run_notebook(name, out_dir, **params):
    import papermill
    out = Path(out_dir) / f"executed_{name}"
    papermill.execute_notebook(str(NOTEBOOKS / name), str(out), parameters=params, progress_bar=False,
                               cwd=str(out_dir))
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
