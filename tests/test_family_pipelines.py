"""`python -m helpers.pipeline --preset smoke` with, as parent, a tiny folder of each SentencePiece
family: data in the parent's own tokenizer, layer scores, inheritance, training, evaluation, plots,
and the trained child exported to Hugging Face. The Llama 2 / OpenLLaMA case (Llama 2's
tokenizer.json) is conftest.plain_run, tested in test_pipeline.py; here Mistral (our model) with
Mistral's tokenizer.json and Gemma 2 (transformers' model through the generic path) with Gemma's.

One run per family, at the smallest budget that still goes through every step (2 of 4 blocks, only
the child trained, 4 steps); the tests share it. Everything is built here; nothing is downloaded."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_hf_family
from helpers.checkpoint import load_model, read_sidecar
from helpers.data import open_split, read_meta
from helpers.evaluate import val_loss_full
from helpers.export import export_hf
from helpers.generic import HFCausalLM
from test_families_end_to_end import (exported_tokenizer_encodes_like_ours,
                                      harness_scores_the_child_as_its_own_log_likelihoods)
from test_pipeline import notebook_errors
from test_tokenizer import MULTILINGUAL, corpus

pytest.importorskip("sentencepiece")

# name: (config class, its settings, tokenizer folder of conftest.spm_tokenizers, BOS id, pipeline settings)
FAMILIES = {
    "mistral": ("MistralConfig", {"sliding_window": 16}, "mistral", 1, {"strategy": "first"}),
    # a generic parent has no layer scores: first or first+last (or explicit layers)
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 16, "pad_token_id": 0}, "gemma", 2,
               {"strategy": "first+last"}),
}
TINY = {"n_layers": 2, "compare": "child", "max_iters": 4, "eval_interval": 2, "eval_iters": 1, "calib_batches": 2,
        "val_fraction": 0.1}


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """20 documents, each the first 1,000 characters of a standard-library file: about 10 K tokens, of
    which about 2 K (4 documents) go to val (every whole-split evaluation of the run stays short)."""
    folder = tmp_path_factory.mktemp("small_corpus")
    texts = [t for t in corpus(80)[len(MULTILINGUAL):] if len(t) >= 1000][:20]  # corpus(n): the multilingual lines, then n files
    for i, text in enumerate(texts):
        (folder / f"d{i:02d}.py").write_text(text[:1000], encoding="utf-8")
    return folder


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_run(request, tmp_path_factory, spm_tokenizers, small_corpus):
    """(family, parent folder, run folder, summary) of one smoke pipeline on that family's parent."""
    from helpers.pipeline import run
    family = request.param
    arch, extra, tokenizer, _, chosen = FAMILIES[family]
    base = tmp_path_factory.mktemp(f"{family}_pipeline")
    parent = make_hf_family(base / "parent", arch, getattr(spm_tokenizers, tokenizer), **extra)
    summary = run("smoke", base / "run", {"parent": str(parent), "tokenizer": str(parent), "source": str(small_corpus),
                                          **chosen, **TINY})
    return family, parent, base / "run", summary


@pytest.mark.slow
def test_every_step_ran_in_the_parents_tokenizer(family_run):
    """Every notebook ran; the data are the parent's ids with the family's BOS before each document;
    the child kept its strategy's blocks, trained 4 steps, and its whole-split val loss in the
    comparison table equals a direct evaluation."""
    family, _, out, summary = family_run
    _, _, _, bos, chosen = FAMILIES[family]
    names = sorted(p.name for p in out.glob("*.ipynb"))
    assert names == ["01_data.ipynb", "02_inherit.ipynb", "03_train_child.ipynb", "04_eval.ipynb", "05_plots.ipynb"]
    notebook_errors(out, names)
    # data: the parent's ids, each document after the family's BOS
    meta = read_meta(out / "data")
    assert (meta["tokenizer"]["framing"], meta["tokenizer"]["bos"]) == ("bos", bos)
    splits = {split: open_split(out / "data", split) for split in ("train", "val")}
    assert all(ids[0] == bos and ids.max() < 800 for ids in splits.values())
    assert sum(int((ids == bos).sum()) for ids in splits.values()) == sum(s["documents"] for s in meta["splits"].values())
    # inherit: the strategy's blocks, recorded in the child's sidecar
    kept = [0, 1] if chosen["strategy"] == "first" else [0, 3]
    side = read_sidecar(out / "child_init.pt")["provenance"]
    assert side["layers"] == kept and side["selection"]["strategy"] == chosen["strategy"]
    # train: 4 steps of the child, finite losses
    rows = [json.loads(line) for line in (out / "child" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4] and all(np.isfinite(r["val_loss"]) for r in rows)
    # evaluation and the comparison table: parent and trained child over the whole val split
    table = pd.read_csv(out / "compare.csv").set_index("model")
    evaluated = {r["model"]: r for r in summary["results"]}
    assert set(evaluated) == {"parent", "child, inherited + trained"}
    direct = val_loss_full(load_model(out / "child"), out / "data", block_size=64)
    assert table.loc["child, inherited + trained", "val_loss"] == pytest.approx(direct["val_loss"], rel=1e-6)
    assert table.loc["parent", "val_loss"] == pytest.approx(evaluated["parent"]["val_loss"])
    assert table.loc["child, inherited + trained", "blocks"] == str(kept)
    assert evaluated["child, inherited + trained"]["tokens_seen"] == 4 * 8 * 64 and direct["val_tokens"] > 1000
    assert (out / "images" / "loss_curves.png").stat().st_size > 5000


@pytest.mark.slow
def test_scores_where_the_parent_has_them(family_run):
    """Our Mistral is scored and every strategy's untrained child measured; Gemma 2 (generic path) has
    no scores, notebook 02 says so, and only the strategies that need none are measured."""
    family, _, out, _ = family_run
    strategies = pd.read_csv(out / "child_init_strategies.csv", index_col="strategy")
    assert strategies["val_loss"].notna().all()
    nb = json.loads((out / "02_inherit.ipynb").read_text())
    printed = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    if family == "mistral":
        assert list(strategies.index) == ["first", "first+last", "block-influence", "angular"]
        scores = json.loads((out / "child_init_scores.json").read_text())
        assert len(scores["block_influence"]) == 4
        assert (out / "images" / "layer_scores.png").stat().st_size > 5000
    else:
        assert list(strategies.index) == ["first", "first+last"]
        assert "a gemma2 parent of the generic path: no scores" in printed
        assert not (out / "child_init_scores.json").exists()
    assert "max |child - truncated parent| = " in printed  # the check of the child against its parent ran


@pytest.mark.slow
def test_trained_child_exports_with_its_tokenizer(family_run, tmp_path):
    """The trained child, exported: transformers loads it with our logits, and its tokenizer encodes as
    get_encoding on the parent does. The Gemma 2 child (generic path) also goes through
    lm-evaluation-harness on a local task, scored as its own log-likelihoods say."""
    from transformers import AutoModelForCausalLM

    from helpers.tokenizer import get_encoding
    family, parent, out, _ = family_run
    bos = FAMILIES[family][3]
    child = load_model(out / "child").eval()
    assert isinstance(child, HFCausalLM) == (family == "gemma2") and child.config.n_layer == 2
    export_hf(child, tmp_path / "export")
    enc = get_encoding(parent)
    ids = torch.tensor([[bos, *enc.encode_ordinary("def f(x):\n    return x")]])
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()(ids).logits
        assert torch.allclose(child(ids)[0][0, -1], theirs[0, -1], atol=1e-4)
    exported_tokenizer_encodes_like_ours(tmp_path / "export", parent)
    if family == "gemma2":
        (tmp_path / "child").symlink_to(out / "child")  # where the harness check reads the child
        harness_scores_the_child_as_its_own_log_likelihoods(child, enc, tmp_path)


def test_the_truncation_check_of_a_generic_parent(spm_tokenizers, tmp_path):
    """Notebook 02's check on a generic parent (its pipeline run above only shows that it passes): the
    child equals the parent run with its other blocks skipped, past Gemma 2's sliding window, and
    differs from it when the child claims other blocks; blocks out of order are refused by name (the
    check runs the parent's own loop). The sidecar names the choice as a native child's does."""
    from helpers.inherit import inherit, truncation_error
    from helpers.tokenizer import get_encoding
    arch, extra, tokenizer, bos, _ = FAMILIES["gemma2"]
    folder = make_hf_family(tmp_path / "parent", arch, getattr(spm_tokenizers, tokenizer), **extra)
    parent = load_model(folder)
    ids = torch.tensor([[bos, *get_encoding(folder).encode_ordinary("def f(x):\n    return [x] * 2  # past the window")]])
    assert ids.size(1) > 16
    child = inherit(parent, 2, strategy="first+last")
    assert child.provenance["selection"] == {"strategy": "first+last", "copy": "all"}
    assert child.provenance["layers"] == [0, 3] and truncation_error(parent, child, ids) < 1e-5
    child.provenance["layers"] = [0, 2]
    assert truncation_error(parent, child, ids) > 1e-2
    assert inherit(parent, 2, layers=[0, 2]).provenance["selection"]["strategy"] == "layers"
    with pytest.raises(ValueError, match=r"layers=\[3, 0\]: .* generic \(gemma2\) parent keeps its blocks in order"):
        truncation_error(parent, inherit(parent, 2, layers=[3, 0]), ids)
