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
