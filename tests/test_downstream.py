"""lm-evaluation-harness scores our model exactly as its own log-likelihoods say: a task defined
here over local JSON files (multiple choice, and a LAMBADA-like next-word item), a tiny model with
its own word-level tokenizer, nothing downloaded."""
import json
import os

import pytest
import torch

from helpers.model import GPT, GPTConfig, llama_config

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the task data are local files
pytest.importorskip("lm_eval")

WORDS = ("the a cat dog sat ran on under mat tree blue red sky sea is was big small old new house car road "
         "and or but then it they we you green fast slow up down left right day night sun moon").split()

MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""
NEXT_WORD_YAML = """task: tiny_next_word
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{text}}}}"
doc_to_target: "{{{{' ' + target}}}}"  # as lambada_openai: the word after a space
metric_list:
  - metric: acc
"""
QUESTIONS = [("the cat sat on", ["the mat", "a tree", "blue sky and sea", "it"]),
             ("they ran up the", ["road", "old house", "hill", "big red car"]),
             ("the sun is", ["big", "blue", "up and then down", "old"]),
             ("we was", ["fast", "slow", "green day", "a small dog"])]
CONTEXTS = ["the dog ran under the", "it was a big", "then they sat on the"]


def word_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["[UNK]", "<eos>", *dict.fromkeys(WORDS + ["hill"])])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>", pad_token="<eos>")
    hf.save_pretrained(str(folder))
    return hf


@torch.no_grad()
def log_likelihoods(model, tok, context, continuation):
    """(sum of log p(continuation | context), whether every continuation token is the argmax)."""
    ctx, cont = tok(context).input_ids, tok(continuation).input_ids
    ids = torch.tensor([ctx + cont])
    logp = model(ids)[0][0].log_softmax(-1)[len(ctx) - 1:-1]  # the positions predicting cont
    target = torch.tensor(cont)
    return logp.gather(1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_harness_accuracy_equals_ours_from_our_log_likelihoods(family, tmp_path):
    from helpers.evaluate import downstream
    tok = word_tokenizer(tmp_path / "tok")
    make = GPTConfig if family == "gpt2" else llama_config
    torch.manual_seed(0)
    model = GPT(make(n_layer=2, n_head=2, n_embd=32, vocab_size=len(tok), block_size=32)).eval()
    model.provenance = {"tokenizer": str(tmp_path / "tok")}

    # answers chosen from our own scores: items 0 and 2 right by log-likelihood, 1 and 3 wrong
    mc, right, right_norm = [], 0, 0
    for i, (question, choices) in enumerate(QUESTIONS):
        lls = [log_likelihoods(model, tok, question, c)[0] for c in choices]
        best = max(range(len(choices)), key=lls.__getitem__)
        answer = best if i % 2 == 0 else (best + 1) % len(choices)
        normed = [ll / len(c) for ll, c in zip(lls, choices)]  # the harness normalises by characters
        right += answer == best
        right_norm += answer == max(range(len(choices)), key=normed.__getitem__)
        mc.append({"question": question, "choices": choices, "answer": answer})
    # next word: one item whose target is our greedy word, one whose target is not
    next_word, greedy_right = [], 0
    for i, context in enumerate(CONTEXTS):
        ids = torch.tensor([tok(context).input_ids])
        ranked = [t for t in model(ids)[0][0, -1].argsort(descending=True).tolist() if t >= 2]  # words only
        word = tok.convert_ids_to_tokens(ranked[0] if i != 1 else ranked[1])
        greedy_right += log_likelihoods(model, tok, context, word)[1]  # the argmax over all ids
        next_word.append({"text": context, "target": word})
    assert greedy_right <= 2

    (tmp_path / "mc.json").write_text(json.dumps(mc))
    (tmp_path / "next.json").write_text(json.dumps(next_word))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(MC_YAML.format(path=tmp_path / "mc.json"))
    (tasks / "tiny_next_word.yaml").write_text(NEXT_WORD_YAML.format(path=tmp_path / "next.json"))

    df = downstream({"tiny": model}, ["tiny_mc", "tiny_next_word"], include_path=tasks, batch_size=2).set_index("task")
    assert right == 2 and df.loc["tiny_mc", "acc"] == pytest.approx(right / 4)
    assert df.loc["tiny_mc", "acc_norm"] == pytest.approx(right_norm / 4)
    assert df.loc["tiny_next_word", "acc"] == pytest.approx(greedy_right / 3)
    assert list(df["n"]) == [4, 3] and (df["model"] == "tiny").all()


def test_scores_merge_into_eval_table_and_plot():
    import pandas as pd

    from helpers.evaluate import merge_downstream
    from helpers.plots import plot_downstream
    scores = pd.DataFrame({"model": ["child", "child", "scratch", "scratch"], "task": ["mc", "word"] * 2,
                           "acc": [0.5, 0.25, 0.75, 0.0], "acc_norm": [0.6, float("nan"), 0.7, float("nan")]})
    results = pd.DataFrame({"model": ["scratch", "child"], "val_loss": [3.0, 2.5]})
    merged = merge_downstream(results, scores).set_index("model")
    assert list(merged.columns) == ["val_loss", "mc_acc", "mc_acc_norm", "word_acc"]
    assert merged.loc["child", "mc_acc_norm"] == 0.6 and merged.loc["scratch", "word_acc"] == 0.0
    fig = plot_downstream(scores)
    heights = [b.get_height() for b in fig.axes[0].patches]
    assert heights == pytest.approx([50, 25, 37.5, 75, 0, 37.5])  # child (mc, word, mean), then scratch


def test_04_scores_tasks_into_its_tables_and_a_chart(train_inputs, tmp_path):
    """Notebook 04 with `tasks` (a local task through task_include_path): downstream.csv one row per
    (model, task), its accuracies merged into eval.csv and eval.json, the bar chart saved and shown."""
    import pandas as pd
    import papermill
    from test_notebooks import NOTEBOOKS
    mc = [{"question": q, "choices": c, "answer": 0} for q, c in QUESTIONS]
    (tmp_path / "mc.json").write_text(json.dumps(mc))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(MC_YAML.format(path=tmp_path / "mc.json"))
    params = dict(models=json.dumps({"parent": str(train_inputs / "parent.pt")}), data_dir=str(train_inputs / "data"),
                  out_dir=str(tmp_path / "eval"), block_size=32, max_new_tokens=2, attention_tokens=16,
                  prompts=["def f():"], tasks=["tiny_mc"], task_include_path=str(tmp_path / "tasks"), batch_size=2)
    nb = papermill.execute_notebook(str(NOTEBOOKS / "04_eval.ipynb"), str(tmp_path / "04.ipynb"), parameters=params,
                                    progress_bar=False, cwd=str(tmp_path))
    scores = pd.read_csv(tmp_path / "eval" / "downstream.csv")
    assert scores[["model", "task"]].values.tolist() == [["parent", "tiny_mc"]] and 0 <= scores["acc"][0] <= 1
    table = pd.read_csv(tmp_path / "eval" / "eval.csv").set_index("model")
    assert table.loc["parent", "tiny_mc_acc"] == pytest.approx(scores["acc"][0])
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())[0]["tiny_mc_acc"] == pytest.approx(scores["acc"][0])
    assert (tmp_path / "eval" / "images" / "downstream.png").stat().st_size > 5000
    assert any("image/png" in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", []))
