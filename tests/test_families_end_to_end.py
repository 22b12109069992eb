"""Parents with SentencePiece tokenizers, end to end without the whole pipeline: data preparation in
the parent's own tokenizer, `python -m helpers.train`, evaluation, export to Hugging Face and the
exported tokenizer's ids, for Mistral (our model) with Mistral's tokenizer.json. Mistral and Gemma 2
(transformers' model through the generic path, with Gemma's tokenizer) run the whole pipeline in
test_family_pipelines, the Llama 2 / OpenLLaMA case in conftest.plain_run. And the paper's Llama experiment (`--preset openllama`) on a
tiny stand-in of OpenLLaMA: a Llama folder whose only tokenizer is SentencePiece's tokenizer.model.
Everything is built here; nothing is downloaded."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import make_hf_family
from helpers.checkpoint import load_model
from helpers.data import open_split, prepare
from helpers.evaluate import evaluate_models
from helpers.export import export_hf
from helpers.tokenizer import SentencePieceEncoding, TokenizersEncoding, get_encoding
from test_sentencepiece import STRESS
from test_tokenizer import MULTILINGUAL, corpus

pytest.importorskip("sentencepiece")

FAMILIES = {  # name: (config class, its settings, tokenizer folder of conftest.spm_tokenizers, BOS id, path)
    "mistral": ("MistralConfig", {"sliding_window": 16}, "mistral", 1, "native"),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 16, "pad_token_id": 0}, "gemma", 2, "generic"),
}


def train_cli(*args: str) -> None:
    """`python -m helpers.train key=value ...` as a user runs it."""
    done = subprocess.run([sys.executable, "-m", "helpers.train", *args, "progress=false"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]


def exported_tokenizer_encodes_like_ours(folder, source) -> None:
    """AutoTokenizer on an exported folder gives get_encoding(source)'s ids on the stress text (texts
    that start with spaces included) and puts the family's BOS first when asked for special tokens."""
    from transformers import AutoTokenizer
    hf, enc = AutoTokenizer.from_pretrained(str(folder)), get_encoding(source)
    texts = STRESS + corpus(10)
    assert [hf(t, add_special_tokens=False)["input_ids"] for t in texts] == [enc.encode_ordinary(t) for t in texts]
    assert hf("def f():")["input_ids"] == [enc.bos_id] + enc.encode_ordinary("def f():")


@pytest.fixture(scope="module")
def stdlib_text(tmp_path_factory):
    """A small corpus: 40 documents, each the first 2,000 characters of a standard-library file
    (about 25 K tokens in all: whole-split evaluation stays short)."""
    folder = tmp_path_factory.mktemp("docs")
    for i, text in enumerate(corpus(40)[len(MULTILINGUAL):]):  # corpus(n): the multilingual lines, then n files
        (folder / f"d{i:02d}.py").write_text(text[:2000], encoding="utf-8")
    return folder


# Gemma 2 (the generic path) runs the same steps as a whole pipeline in test_family_pipelines, which
# covers Mistral's too, but through the notebooks: here Mistral's run goes through the command line.
@pytest.mark.parametrize("family", ["mistral"])
def test_data_train_evaluate_export_on_a_sentencepiece_parent(family, spm_tokenizers, stdlib_text, tmp_path):
    arch, extra, tokenizer, bos, path = FAMILIES[family]
    parent = make_hf_family(tmp_path / "parent", arch, getattr(spm_tokenizers, tokenizer), **extra)
    enc = get_encoding(parent)
    assert isinstance(enc, TokenizersEncoding) and enc.bos_id == bos
    # data: documents framed as the family trained, BOS first
    meta = prepare(str(stdlib_text), tmp_path / "data", tokenizer=str(parent), val_fraction=0.2, progress=False)
    assert meta["tokenizer"]["framing"] == "bos" and meta["tokenizer"]["bos"] == bos
    tokens = np.concatenate([open_split(tmp_path / "data", s) for s in ("train", "val")])
    assert (tokens == bos).sum() == 40 and tokens.max() < 800
    # train: the command line, a tiny budget
    train_cli(f"parent={parent}", "n_layers=2", f"data_dir={tmp_path / 'data'}", f"out_dir={tmp_path / 'child'}",
              "max_iters=4", "batch_size=4", "block_size=32", "eval_interval=2", "eval_iters=1", "warmup_iters=1",
              "learning_rate=1e-3", "min_lr=1e-4")
    rows = [json.loads(line) for line in (tmp_path / "child" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4] and all(np.isfinite(r["val_loss"]) for r in rows)
    child = load_model(tmp_path / "child")
    assert child.config.n_layer == 2 and child.provenance["layers"] == [0, 1]
    assert (child.config.family == "mistral") == (path == "native")
    # evaluation: parent and child on the val split (its first 2,048 tokens: whole-split runs in plain_run)
    table = evaluate_models({"parent": str(parent), "child": str(tmp_path / "child")}, tmp_path / "data",
                            block_size=64, max_tokens=2048).set_index("model")
    assert table.loc["child", "layers"] == 2 and table.loc["parent", "layers"] == 4
    assert np.isfinite(table["val_loss"]).all() and table.loc["child", "tokens_seen"] == 4 * 4 * 32
    # export: transformers loads the child with our logits, and its tokenizer encodes as ours
    from transformers import AutoModelForCausalLM
    export_hf(child, tmp_path / "export")
    ids = torch.tensor([[bos, *enc.encode_ordinary("def f(x):\n    return x")]])
    ours = child.eval()(ids)
    ours = ours[0] if isinstance(ours, tuple) else ours
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()(ids).logits
    assert torch.allclose(ours[0, -1], theirs[0, -1], atol=1e-4)
    exported_tokenizer_encodes_like_ours(tmp_path / "export", parent)
    if family == "mistral":
        harness_scores_the_child_as_its_own_log_likelihoods(child, enc, tmp_path)


def harness_scores_the_child_as_its_own_log_likelihoods(child, enc, tmp_path) -> None:
    """lm-evaluation-harness on a local multiple-choice task (test_downstream's): its accuracy equals
    the one computed from our model's own log-likelihoods of each answer after BOS + question."""
    pytest.importorskip("lm_eval")
    from helpers.evaluate import downstream
    from helpers.tokenizer import encode_prompt
    from test_downstream import MC_YAML, QUESTIONS
    items, right = [], 0
    with torch.no_grad():
        for i, (question, choices) in enumerate(QUESTIONS):
            lls = []
            for choice in choices:  # the harness's split: context ids, then the rest of the whole text's ids
                context, whole = encode_prompt(enc, question), encode_prompt(enc, f"{question} {choice}")
                logits = child(torch.tensor([whole]))
                logp = (logits[0] if isinstance(logits, tuple) else logits)[0].log_softmax(-1)
                lls.append(sum(logp[j - 1, whole[j]].item() for j in range(len(context), len(whole))))
            best = max(range(len(choices)), key=lls.__getitem__)
            answer = best if i % 2 == 0 else (best + 1) % len(choices)
            right += answer == best
            items.append({"question": question, "choices": choices, "answer": answer})
    (tmp_path / "mc.json").write_text(json.dumps(items))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(MC_YAML.format(path=tmp_path / "mc.json"))
    scores = downstream({"child": str(tmp_path / "child")}, ["tiny_mc"], include_path=tmp_path / "tasks", batch_size=2)
    assert right == 2 and scores.loc[0, "acc"] == pytest.approx(right / 4) and scores.loc[0, "n"] == 4


def test_llama2s_tokenizer_class_is_replaced_in_the_export(spm_tokenizers, tmp_path):
    """Why export_hf names PreTrainedTokenizerFast for SentencePiece tokenizers: Llama 2's folder names
    LlamaTokenizer, whose pipeline transformers 5 rebuilds (Metaspace) instead of running Meta's
    tokenizer.json, and then encodes some texts that start with a space otherwise than the file (and
    we) do. The exported child names the generic class and encodes as we do. Mistral's and Gemma's
    folders (transformers' own conversion) encode alike with either class: the export changes nothing."""
    from transformers import AutoTokenizer
    texts = STRESS + corpus(10)
    for name, differs in (("llama2", True), ("mistral", False), ("gemma", False)):
        folder = getattr(spm_tokenizers, name)
        hf, enc = AutoTokenizer.from_pretrained(str(folder)), get_encoding(folder)
        differ = [t for t in texts if hf(t, add_special_tokens=False)["input_ids"] != enc.encode_ordinary(t)]
        assert bool(differ) == differs and all(t.startswith(" ") for t in differ), name
    parent = make_hf_family(tmp_path / "llama", "LlamaConfig", spm_tokenizers.llama2)
    export_hf(load_model(parent), tmp_path / "export")
    config = json.loads((tmp_path / "export" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["bos_token"] == "<s>"
    exported_tokenizer_encodes_like_ours(tmp_path / "export", parent)


# ---- the paper's Llama experiment: --preset openllama ----------------------------------------
def test_openllama_preset_is_the_papers_recipe():
    """lit-gpt/Training/train.py of the paper's repository: 13 layers, lr 3e-4 with 1,000 warm-up steps
    and no decay, 8 x 2048 tokens per step as micro-batch 1 x 8, 191,000 micro-steps, weight decay 0.01,
    bf16, the RedPajama sample; as valid TrainConfig values."""
    from helpers.config import TrainConfig
    from helpers.pipeline import arm_names, settings, train_settings
    from helpers.train import lr_at
    s = settings("openllama", {})
    assert (s["parent"], s["tokenizer"], s["n_layers"]) == ("openlm-research/open_llama_3b",) * 2 + (13,)
    assert s["source"] == "hf:togethercomputer/RedPajama-Data-1T-Sample" and arm_names(s) == ["child"]
    common = train_settings(s, "data")
    cfg = TrainConfig.from_dict({**common, "parent": s["parent"], "n_layers": s["n_layers"], "out_dir": "child"})
    assert (cfg.batch_size, cfg.grad_accum, cfg.block_size) == (1, 8, 2048)
    assert cfg.max_iters * cfg.grad_accum == 191_000 - 191_000 % 8 == 191_000
    assert cfg.max_iters * cfg.grad_accum * cfg.batch_size * cfg.block_size == 391_168_000  # tokens
    assert (cfg.weight_decay, cfg.beta1, cfg.beta2, cfg.grad_clip, cfg.dtype) == (0.01, 0.9, 0.999, 0.0, "bfloat16")
    # linear warm-up over 1,000 steps, then constant at 3e-4 to the end
    lrs = [lr_at(step, cfg, cfg.max_iters) for step in range(cfg.max_iters)]
    assert lrs[0] < lrs[500] < lrs[999] < 3e-4 and lrs[499] == pytest.approx(1.5e-4, rel=1e-3)
    assert set(lrs[1000:]) == {3e-4}
    assert cfg.copy == "paper"
    two_gpus = settings("openllama", {"launch_ddp": "true", "parallel": "fsdp", "nproc_per_node": "2"})
    assert (two_gpus["launch_ddp"], two_gpus["parallel"], two_gpus["grad_accum"]) == (True, "fsdp", 8)


def test_openllama_recipe_trains_a_tiny_stand_in(spm_tokenizers, stdlib_text, tmp_path):
    """The preset's recipe at a tiny budget on OpenLLaMA's kind of parent: a Llama folder whose only
    tokenizer is SentencePiece's tokenizer.model (encoded by sentencepiece itself), 4 layers -> 2."""
    from helpers.config import TrainConfig
    from helpers.pipeline import settings, train_settings
    from helpers.train import train
    folder = tmp_path / "open_llama"
    folder.mkdir()
    shutil.copy(spm_tokenizers.bpe, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
                                                              "bos_token": "<s>", "eos_token": "</s>"}))
    parent = make_hf_family(tmp_path / "model", "LlamaConfig", folder)
    assert not (parent / "tokenizer.json").exists()
    enc = get_encoding(parent)
    assert isinstance(enc, SentencePieceEncoding) and enc.bos_id == 1
    s = settings("openllama", {"parent": str(parent), "tokenizer": str(parent), "source": str(stdlib_text)})
    meta = prepare(s["source"], tmp_path / "data", tokenizer=s["tokenizer"], val_fraction=0.2, progress=False)
    assert meta["tokenizer"]["framing"] == "bos" and meta["tokenizer"]["bos"] == 1
    native_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    tiny = dict(max_iters=6, block_size=32, warmup_iters=3, eval_interval=3, eval_iters=1, progress=False,
                dtype="bfloat16" if native_bf16 else "float32")  # bf16 where this CPU runs it natively
    cfg = TrainConfig.from_dict({**train_settings(s, tmp_path / "data"), **tiny, "parent": s["parent"], "n_layers": 2,
                                 "out_dir": str(tmp_path / "child")})
    assert (cfg.batch_size, cfg.grad_accum, cfg.learning_rate, cfg.min_lr, cfg.copy) == (1, 8, 3e-4, 3e-4, "paper")
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "child" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6 and rows[-1]["tokens"] == 6 * 8 * 32 and np.isfinite(rows[-1]["val_loss"])
    assert [r["lr"] for r in rows] == pytest.approx([3e-4 / 4, 3e-4, 3e-4])  # warm-up, then constant
    child = load_model(tmp_path / "child")
    assert child.provenance["selection"]["copy"] == "paper" and child.provenance["layers"] == [0, 1]
    export_hf(child, tmp_path / "export")  # tokenizer.model becomes a tokenizer.json that encodes as sentencepiece
    exported_tokenizer_encodes_like_ours(tmp_path / "export", parent)
