"""The helpers the notebooks call instead of computing in their cells: document lengths and the
split table (01), the strategies' choices and the truncation check (02), the run's table (03), the
evaluation and attention tables (04), the reference line and the attention figures (05)."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from helpers.data import document_lengths, prepare, split_summary
from helpers.evaluate import attention_report, compare_models, slug, task_list
from helpers.inherit import child_depth, chosen_layers, inherit, kept_by_strategy, truncation_error
from helpers.model import GPT, GPTConfig
from helpers.plots import plot_attention_tables, plot_document_lengths, read_eval
from helpers.records import best_val_loss, from_json_text, metrics_table

TEXT = "".join(f"def f{i}(x):\n    return x * {i}  # line {i}\n" for i in range(400))  # about 8,000 tokens


@pytest.fixture(scope="module")
def one_file(tmp_path_factory):
    """One text file as the corpus (the classic input.txt): split by position, no end-of-text in train."""
    base = tmp_path_factory.mktemp("one_file")
    (base / "input.txt").write_text(TEXT)
    return base / "data", prepare(str(base / "input.txt"), base / "data", val_fraction=0.1, progress=False)


@pytest.fixture(scope="module")
def three_files(tmp_path_factory):
    base = tmp_path_factory.mktemp("three_files")
    (base / "docs").mkdir()
    for i, n in enumerate((50, 120, 300)):
        (base / "docs" / f"doc{i}.txt").write_text(TEXT[: n * 20])
    return base / "data", prepare(str(base / "docs"), base / "data", val_fraction=0.3, seed=3, progress=False)


def test_one_document_is_one_length_with_no_end_of_text(one_file):
    data_dir, meta = one_file
    assert meta["split"]["method"] == "position"
    lengths = document_lengths(data_dir)
    assert lengths.tolist() == [meta["splits"]["train"]["tokens"]]  # the train part of the one document
    assert document_lengths(data_dir, max_tokens=100).tolist() == [100]


def test_document_lengths_add_up_to_the_split(three_files):
    data_dir, meta = three_files
    lengths = document_lengths(data_dir)
    train = meta["splits"]["train"]
    assert lengths.sum() == train["tokens"]
    if meta["split"]["method"] == "hash":  # every train document ends with its end-of-text
        assert len(lengths) == train["documents"]
    cut = document_lengths(data_dir, max_tokens=int(lengths[0]) + 5)  # a document cut short counts as one
    assert cut.tolist() == [lengths[0], 5]


def test_split_summary_leaves_characters_per_token_empty_without_characters(one_file, three_files):
    table = split_summary(one_file[1])
    assert list(table.index) == ["train", "val"] and np.isnan(table.loc["val", "chars_per_token"])
    assert table.loc["train", "chars_per_token"] == pytest.approx(len(TEXT) / one_file[1]["splits"]["train"]["tokens"], abs=0.01)
    assert split_summary(three_files[1])["tokens"].sum() == sum(s["tokens"] for s in three_files[1]["splits"].values())


def test_document_length_histogram_of_one_document_and_of_none(tmp_path):
    fig = plot_document_lengths(np.array([17_662]), path=tmp_path / "one.png")
    assert fig.axes[0].get_title() == "1 train document (median 17,662 tokens)"
    assert sum(p.get_height() for p in fig.axes[0].patches) == 1 and (tmp_path / "one.png").stat().st_size > 1000
    assert plot_document_lengths(np.array([], dtype=np.int64)).axes[0].get_title() == "no train documents"
    many = plot_document_lengths(np.array([3, 30, 300, 300]))
    assert many.axes[0].get_title() == "4 train documents (median 165 tokens)"


# ---- 02 ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parent():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=6, n_head=2, n_embd=32, vocab_size=300, block_size=32))
    model.provenance = {"tokenizer": "gpt2", "source": "tiny"}
    return model.eval()


def test_child_depth(parent):
    assert child_depth(parent) == 3 and child_depth(parent, 4) == 4 and child_depth(parent, None, [0, 5]) == 2


def test_chosen_layers_names_an_explicit_list_layers(parent):
    assert chosen_layers(parent, 3) == ("first", [0, 1, 2])
    assert chosen_layers(parent, 3, strategy="first+last") == ("first+last", [0, 1, 5])
    assert chosen_layers(parent, 2, [4, 1]) == ("layers", [4, 1])


def test_kept_by_strategy_puts_the_child_first(parent):
    table = pd.DataFrame({"strategy": ["first", "first+last"], "layers": [[0, 1, 2], [0, 1, 5]]}).set_index("strategy")
    assert list(kept_by_strategy("first+last", [0, 1, 5], table).items()) == [("first+last", [0, 1, 5]), ("first", [0, 1, 2])]
    assert list(kept_by_strategy("layers", [0, 5], table)) == ["layers", "first", "first+last"]


def test_truncation_error_is_zero_for_a_copy_and_not_for_a_fresh_norm(parent):
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(0))  # longer than block_size: cut
    assert truncation_error(parent, inherit(parent, 3, layers=[0, 2, 5]), ids) < 1e-5
    fresh = inherit(parent, 3, layers=[0, 2, 5], copy="paper")
    with torch.no_grad():
        fresh.transformer.ln_f.weight.mul_(2.0)
    assert truncation_error(parent, fresh, ids) > 1e-3


# ---- 03 ------------------------------------------------------------------------------------------
def test_metrics_table_shows_distillation_columns_only_when_logged():
    plain = pd.DataFrame({"step": [0, 2, 4], "tokens": [0, 64, 128], "lr": [0.1] * 3, "train_loss": [5.0, 4.0, 3.5],
                          "val_loss": [5.1, 3.9, 4.2], "tokens_per_s": [None, 10.0, 11.0], "elapsed_s": [0, 1, 2]})
    assert list(metrics_table(plain).columns) == ["step", "tokens", "lr", "train_loss", "val_loss", "tokens_per_s"]
    assert len(metrics_table(plain, last=2)) == 2 and best_val_loss(plain) == 3.9
    kd = plain.assign(ce_loss=1.0, kd_loss=2.0, total_loss=3.0)
    assert list(metrics_table(kd).columns)[5:8] == ["ce_loss", "kd_loss", "total_loss"]


def test_json_text_parameters():
    assert from_json_text('{"child": "runs/child"}') == {"child": "runs/child"}
    assert from_json_text(' ["a"]') == ["a"]
    assert from_json_text({"a": 1}) == {"a": 1} and from_json_text("runs/child") == "runs/child"
    assert from_json_text(None) is None


# ---- 04 ------------------------------------------------------------------------------------------
def test_task_list():
    assert task_list("arc_easy, piqa") == ["arc_easy", "piqa"] and task_list('["sciq"]') == ["sciq"]
    assert task_list("") == [] and task_list([]) == [] and task_list(None) == [] and task_list(["a"]) == ["a"]


def test_compare_models_and_attention_report(parent, one_file, tmp_path):
    from helpers.checkpoint import save_checkpoint
    data_dir, _ = one_file
    big = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=50257, block_size=32))
    big.provenance = {"tokenizer": "gpt2"}
    save_checkpoint(tmp_path / "trained.pt", big, tokens_seen=1234)
    loaded = {"trained one": big, "generic": object()}
    results = compare_models({"trained one": big}, {"trained one": str(tmp_path / "trained.pt")}, data_dir,
                             tmp_path / "eval", block_size=32)
    assert results["tokens_seen"].tolist() == [1234]
    assert pd.read_csv(tmp_path / "eval" / "eval.csv")["val_loss"].tolist() == pytest.approx(results["val_loss"].tolist())
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())[0]["tokens_seen"] == 1234
    ids = torch.randint(0, 50257, (1, 48), generator=torch.Generator().manual_seed(1))
    summary, tables = attention_report(loaded, ids, tmp_path / "eval")
    assert list(tables) == ["trained one"] and summary["model"].tolist() == ["trained one"]  # the generic one skipped
    assert summary.loc[0, "heads"] == 4 and (tmp_path / "eval" / f"attention_{slug('trained one')}.csv").is_file()
    assert pd.read_csv(tmp_path / "eval" / "attention_summary.csv")["model"].tolist() == ["trained one"]


# ---- 05 ------------------------------------------------------------------------------------------
def test_read_eval_and_attention_figures(tmp_path):
    assert read_eval(None) == (None, {})
    (tmp_path / "eval.csv").write_text("model,val_loss\nchild,3.0\nparent,2.5\n")
    results, reference = read_eval(tmp_path)
    assert len(results) == 2 and reference == {"parent val loss": 2.5}
    (tmp_path / "eval.csv").write_text("model,val_loss\nchild,3.0\n")
    assert read_eval(tmp_path)[1] == {}
    table = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "rank_frac": [0.1, 0.2, 0.3, 0.05],
                          "lazy": [False, False, True, True]})
    table.to_csv(tmp_path / "attention_child.csv", index=False)
    pd.DataFrame({"model": ["child"]}).to_csv(tmp_path / "attention_summary.csv", index=False)
    paths = plot_attention_tables(tmp_path, tmp_path / "images")
    assert [p.name for p in paths] == ["attention_child.png"] and paths[0].stat().st_size > 1000


def test_progress_bar_is_text_when_asked(monkeypatch):
    import tqdm.std
    from helpers.records import PROGRESS_ENV, progress_bar
    monkeypatch.setenv(PROGRESS_ENV, "text")
    bar = progress_bar(total=3, disable=True)
    assert type(bar) is tqdm.std.tqdm
    monkeypatch.delenv(PROGRESS_ENV)
    assert isinstance(progress_bar(total=3, disable=True), tqdm.std.tqdm)  # outside a kernel: text as well
