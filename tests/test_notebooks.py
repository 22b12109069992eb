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
