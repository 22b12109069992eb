"""The smoke preset end to end, in three runs, one of each kind (conftest.py holds the first two,
which test_readme.py reads too):
- `plain_run`: the plain comparison (child and scratch, the untrained child evaluated too), with the
  README's explicit `layers` setting, at a tiny budget, on a tiny Llama folder whose tokenizer is
  Llama 2's SentencePiece tokenizer.json (the OpenLLaMA / Llama 2 case);
- `compare_run`: four arms (the inherited child, another strategy, scratch, scratch with KD) and
  the comparison table;
- the paper's grow loop, from compare_run's parent.
Every notebook executed by papermill, records and figures written, and the evaluation numbers equal
to a direct call of helpers.evaluate."""
import json

import pytest

from helpers.errors import ConfigError
from helpers.pipeline import main, run


def notebook_errors(out, names):
    for name in names:
        nb = json.loads((out / name).read_text())
        errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, name
        assert nb["metadata"]["papermill"]["exception"] is not True


def test_every_notebook_ran_without_error(plain_run, compare_run):
    _, out = plain_run
    names = sorted(p.name for p in out.glob("*.ipynb"))
    assert names == ["01_data.ipynb", "02_inherit.ipynb", "03_train_child.ipynb", "03_train_scratch.ipynb",
                     "04_eval.ipynb", "05_plots.ipynb"]  # a folder parent: nothing is pre-trained
    notebook_errors(out, names)
    _, out = compare_run
    names = sorted(p.name for p in out.glob("*.ipynb"))
    assert names == ["01_data.ipynb", "02_inherit.ipynb", "03_train_angular.ipynb", "03_train_child.ipynb",
                     "03_train_parent.ipynb", "03_train_scratch+kd.ipynb", "03_train_scratch.ipynb", "04_eval.ipynb",
                     "05_plots.ipynb"]
    notebook_errors(out, names)


def test_plots_and_metrics_are_written(plain_run):
    _, out = plain_run
    pngs = {p.name: p.stat().st_size for p in (out / "images").glob("*.png")}
    assert {"loss_curves.png", "val_loss_vs_params.png"} <= set(pngs) and all(v > 5000 for v in pngs.values())
    executed = json.loads((out / "05_plots.ipynb").read_text())
    assert any("image/png" in o.get("data", {}) for c in executed["cells"] for o in c.get("outputs", []))
    for run_dir in ("child", "scratch"):
        rows = [json.loads(l) for l in (out / run_dir / "metrics.jsonl").read_text().splitlines()]
        assert rows and all({"step", "tokens", "lr", "train_loss", "val_loss", "elapsed_s"} <= set(r) for r in rows)
        assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)


def test_eval_numbers_equal_a_direct_call(plain_run, compare_run):
    from helpers.evaluate import val_loss_full
    from helpers.checkpoint import load_model
    summary, out = plain_run
    by_name = {r["model"]: r for r in summary["results"]}
    assert set(by_name) == {"parent", "child, inherited (untrained)", "child, inherited + trained", "scratch, trained"}
    direct = val_loss_full(load_model(out / "child"), out / "data", block_size=64, batch_size=8)
    assert by_name["child, inherited + trained"]["val_loss"] == pytest.approx(direct["val_loss"], rel=1e-6)
    assert by_name["child, inherited + trained"]["val_tokens"] == direct["val_tokens"]
    # the comparison the project exists for, at toy scale: inheritance beats scratch on equal tokens
    # (on the run with a parent trained long enough to have something to give)
    by_name = {r["model"]: r for r in compare_run[0]["results"]}
    assert by_name["child, inherited + trained"]["val_loss"] < by_name["scratch, trained"]["val_loss"]
    assert by_name["child, inherited + trained"]["tokens_seen"] == by_name["scratch, trained"]["tokens_seen"]


def test_a_sentencepiece_parent_runs_in_its_own_tokenizer(plain_run, spm_llama):
    """The plain run's parent is a Llama folder with Llama 2's SentencePiece tokenizer.json: the data
    are its ids, each document after its BOS (meta.json says so), and the trained child exported to
    Hugging Face carries a tokenizer that transformers loads and that encodes as get_encoding does."""
    from transformers import AutoTokenizer

    from helpers.checkpoint import load_model
    from helpers.data import open_split, read_meta
    from helpers.export import export_hf
    from helpers.tokenizer import TokenizersEncoding, get_encoding
    from test_sentencepiece import STRESS
    from test_tokenizer import corpus
    _, out = plain_run
    enc = get_encoding(spm_llama)
    assert isinstance(enc, TokenizersEncoding) and enc.n_vocab == 800
    meta = read_meta(out / "data")
    assert (meta["tokenizer"]["framing"], meta["tokenizer"]["bos"], meta["tokenizer"]["eot"]) == ("bos", 1, None)
    train = open_split(out / "data", "train")
    assert train[0] == 1 and train.max() < 800
    child = load_model(out / "child")
    assert child.config.family == "llama" and child.provenance["tokenizer"] == str(spm_llama)
    export_hf(child, out / "child_hf")
    hf = AutoTokenizer.from_pretrained(str(out / "child_hf"))
    texts = STRESS + corpus(10)
    assert [hf(t, add_special_tokens=False)["input_ids"] for t in texts] == [enc.encode_ordinary(t) for t in texts]
    assert hf("def f():")["input_ids"] == [1] + enc.encode_ordinary("def f():")


def test_a_failing_notebook_names_its_executed_copy(tmp_path, capsys):
    code = main(["--preset", "smoke", "--out", str(tmp_path / "bad"), "source=/nonexistent/corpus.tar"])
    err = capsys.readouterr().err
    assert code == 1 and "01_data.ipynb failed" in err and str(tmp_path / "bad" / "01_data.ipynb") in err
    assert "no such file or folder" in err


def test_unknown_preset_and_setting(tmp_path, capsys):
    assert main(["--preset", "nope", "--out", str(tmp_path / "x")]) == 1
    assert main(["--preset", "smoke", "--out", str(tmp_path / "y"), "bogus=1"]) == 1
    assert "unknown pipeline settings" in capsys.readouterr().err


def test_settings_parse_like_the_training_command_line():
    """One key=value parser (helpers.config.coerce): numbers, None, text, and true/false for switches."""
    from helpers.pipeline import settings
    s = settings("smoke", {"max_iters": "5", "learning_rate": "1e-3", "n_layers": "none", "source": "my corpus.txt",
                           "max_tokens": "2e4", "launch_ddp": "true", "parallel": "fsdp", "nproc_per_node": "2"})
    assert s["max_iters"] == 5 and s["learning_rate"] == 1e-3 and s["n_layers"] is None
    assert s["source"] == "my corpus.txt" and s["max_tokens"] == 20_000 and isinstance(s["max_tokens"], int)
    assert s["launch_ddp"] is True and s["parallel"] == "fsdp" and s["nproc_per_node"] == 2
    with pytest.raises(ConfigError, match="launch_ddp='maybe' is not a valid bool"):
        settings("smoke", {"launch_ddp": "maybe"})


@pytest.mark.parametrize("native", [True, False])
def test_demo_trains_in_bf16_with_more_steps_where_the_cpu_has_it(native, monkeypatch):
    """The demo's dtype is decided by the machine: on a CPU with native bfloat16 it trains in bfloat16
    for twice the steps; elsewhere, or when the user names a dtype, it keeps the float32 recipe."""
    import torch
    from helpers.pipeline import settings
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    s = settings("demo", {})
    assert (s["dtype"], s["max_iters"]) == (("bfloat16", 64) if native else ("float32", 32))
    assert (settings("demo", {"dtype": "float32"})["dtype"], settings("demo", {"dtype": "float32"})["max_iters"]) == ("float32", 32)
    assert settings("smoke", {}).get("dtype", "auto") == "auto"  # presets without the variant are unchanged


def test_summary_json_has_null_not_nan(tmp_path):
    """The parent's row has no token count (NaN in pandas): summary.json must still be strict JSON."""
    from helpers.pipeline import summarize
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval.csv").write_text("model,layers,params,tokens_seen,val_loss,perplexity\n"
                                                "parent,4,100,,3.5,33.1\nchild,2,50,1000,3.9,49.4\n")
    summarize(tmp_path, "smoke", {"lr": float("nan")}, 1.0, tmp_path)

    def refuse(name):
        raise ValueError(f"bare {name} in summary.json")
    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)
    assert summary["results"][0]["tokens_seen"] is None and summary["results"][1]["tokens_seen"] == 1000
    assert summary["settings"]["lr"] is None


# ---- comparison of strategies and the grow loop (issue 11) ------------------------------------
def test_compare_trains_every_arm_on_the_same_budget(compare_run):
    import pandas as pd
    from helpers.checkpoint import read_sidecar
    summary, out = compare_run
    for arm in ("child", "angular", "scratch"):
        assert (out / f"03_train_{arm}.ipynb").exists()
    table = pd.read_csv(out / "compare.csv").set_index("model")
    trained = table[table["val_loss"].notna() & (table.index != "parent")]
    assert set(trained.index) == {"child, inherited + trained", "inherited (angular) + trained", "scratch, trained",
                                  "scratch + trained with KD"}
    assert trained["tokens_trained"].nunique() == 1 and trained["tokens_trained"].iloc[0] == 20 * 8 * 64
    # every strategy's untrained child is listed, the trained ones with the blocks notebook 02 chose for them
    strategies = pd.read_csv(out / "child_init_strategies.csv", index_col="strategy")
    assert table["untrained_val_loss"].notna().sum() == len(strategies) == 4
    side = read_sidecar(sorted((out / "angular").glob("step_*.pt"))[-1])["provenance"]
    assert str(side["layers"]) == strategies.loc["angular", "layers"] == table.loc["inherited (angular) + trained", "blocks"]
    assert side["selection"]["strategy"] == "angular" and "angular_distance" in side["selection"]["scores"]
    evals = pd.read_csv(out / "eval" / "eval.csv").set_index("model")
    assert table.loc["scratch, trained", "val_loss"] == pytest.approx(evals.loc["scratch, trained", "val_loss"])
    assert (out / "images" / "loss_curves.png").stat().st_size > 5000
    assert (out / "images" / "layer_scores.png").stat().st_size > 5000
    # the paper's KD baseline: a scratch child distilled from the parent, logged as CE and KD parts
    kd = [json.loads(line) for line in (out / "scratch+kd" / "metrics.jsonl").read_text().splitlines()]
    assert kd[-1]["kd_loss"] > 0 and kd[-1]["ce_loss"] > 0
    assert read_sidecar(sorted((out / "scratch+kd").glob("step_*.pt"))[-1])["train_config"]["kd_alpha"] == 0.6
    assert summary["compare"] and len(summary["compare"]) == len(table)


def test_compare_table_goes_to_a_readme(compare_run, tmp_path):
    from helpers.pipeline import write_readme_compare
    summary, _ = compare_run
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nold\n<!-- results:end -->\nrest\n")
    write_readme_compare(summary, readme, readme.read_text(), "<!-- results:start -->", "<!-- results:end -->")
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro") and text.rstrip().endswith("rest")
    assert "| inherited (angular) + trained |" in text and "20 steps x 512 tokens" in text
    assert "gradient clipping 1.0, float32;" in text  # the dtype the runs used (resolved from auto)


def test_unknown_arm_is_refused(tmp_path, capsys):
    assert main(["--preset", "smoke", "--out", str(tmp_path / "z"), "compare=first,best"]) == 1
    assert "unknown arms ['best']" in capsys.readouterr().err


def test_grow_loop_adds_blocks_until_the_parent_is_reached(compare_run, tmp_path):
    from helpers.pipeline import settings
    out = tmp_path / "grow"
    parent = compare_run[1] / "parent"  # pre-trained by the comparison run: the grow loop needs a parent, not a new one
    summary = run("smoke", out, {"grow": "true", "grow_start": 2, "grow_step": 2, "max_iters": 4, "eval_interval": 4,
                                 "parent": str(parent)})
    rounds, parent_val = summary["grow"], summary["parent_val_loss"]
    assert [r["n_layers"] for r in rounds] == [2, 4][:len(rounds)] and rounds
    tol = settings("smoke", {})["grow_tolerance"]
    reached = [r["n_layers"] for r in rounds if r["val_loss"] <= parent_val + tol]
    assert summary["grow_reached"] == (reached[0] if reached else None)
    assert all(r["val_loss"] > parent_val + tol for r in rounds[:-1])  # it stopped at the first success
    for r in rounds:
        folder = out / f"grow_n{r['n_layers']:02d}"
        assert {p.name for p in folder.glob("*.ipynb")} == {"02_inherit.ipynb", "03_train.ipynb", "04_eval.ipynb"}
        assert r["tokens"] == 4 * 8 * 64
    assert (out / "images" / "grow.png").stat().st_size > 5000
    assert json.loads((out / "summary.json").read_text())["grow"] == rounds


def test_paper_recipe_is_one_switch_away():
    from helpers.config import TrainConfig
    from helpers.errors import ConfigError
    from helpers.pipeline import settings, train_settings
    s = settings("gpt2-owt", {"recipe": "paper"})
    common = train_settings(s, "data")
    assert common["batch_size"] * common["block_size"] * common["grad_accum"] == 49_152
    assert (common["learning_rate"], common["min_lr"], common["warmup_iters"], common["max_iters"]) == (2e-4, 1e-5, 2000, 100_000)
    assert (common["weight_decay"], common["beta1"], common["beta2"], common["dtype"], common["copy"]) == (0.1, 0.9, 0.95, "bfloat16", "paper")
    TrainConfig.from_dict({**common, "out_dir": "x"})  # every value is a valid TrainConfig field
    assert settings("gpt2-owt", {"recipe": "paper", "max_iters": "10"})["max_iters"] == 10  # explicit settings win
    with pytest.raises(ConfigError, match="recipe='nanogpt'"):
        settings("gpt2-owt", {"recipe": "nanogpt"})


def test_local_sources_are_made_absolute_for_the_notebooks(tmp_path, monkeypatch):
    """The notebooks run inside the run folder: a parent, corpus or teacher given relative to the
    user's folder must reach them as absolute paths; names that are not paths stay as they are."""
    from helpers.pipeline import settings
    (tmp_path / "models" / "parent").mkdir(parents=True)
    (tmp_path / "corpus.txt").write_text("text")
    monkeypatch.chdir(tmp_path)
    s = settings("smoke", {"parent": "models/parent", "source": "corpus.txt", "teacher": "models/parent"})
    assert s["parent"] == s["teacher"] == str(tmp_path / "models" / "parent")
    assert s["source"] == str(tmp_path / "corpus.txt")
    assert settings("smoke", {"source": "docs/*.txt"})["source"] == str(tmp_path / "docs" / "*.txt")
    kept = settings("demo", {"source": "owt:0"})
    assert (kept["parent"], kept["source"], kept["tokenizer"]) == ("smollm2-135m", "owt:0", "smollm2-135m")
    assert settings("smoke", {})["parent"] == "pretrain"


def test_compare_table_names_an_explicit_layers_child_by_its_blocks(tmp_path):
    """layers=[0, 1, 3] with extra arms: the trained child is the explicit list, not the `first`
    strategy's untrained child that notebook 02 also measured."""
    from helpers.pipeline import compare_table
    (tmp_path / "eval").mkdir()
    (tmp_path / "child_init_strategies.csv").write_text('strategy,layers,val_loss\nfirst,"[0, 1, 2]",7.5\n')
    (tmp_path / "eval" / "eval.csv").write_text(
        "model,layers,params,tokens_seen,val_loss\nparent,4,100,,3.0\nchild, inherited + trained,3,80,512,4.0\n"
        "scratch + trained with KD,3,80,512,6.0\n".replace("child, inherited + trained", '"child, inherited + trained"')
        .replace("scratch + trained with KD", '"scratch + trained with KD"'))
    table = compare_table(tmp_path, {"layers": [0, 1, 3], "strategy": "first"}, ["child", "scratch+kd"]).set_index("model")
    assert table.loc["inherited (first), untrained", "blocks"] == "[0, 1, 2]"
    assert pd_isnull(table.loc["inherited (first), untrained", "val_loss"])
    child = table.loc["child, inherited + trained"]
    assert (child["blocks"], child["val_loss"], child["tokens_trained"]) == ("[0, 1, 3]", 4.0, 512)


def pd_isnull(value) -> bool:
    return value is None or value != value
