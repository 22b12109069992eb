"""Knowledge distillation: the loss and its gradient equal autograd of the formula, kd_alpha=0 is the
plain run, a teacher with another vocabulary is refused, and a killed KD run resumes exactly."""
import json

import pytest
import torch

from conftest import tokens
from helpers.checkpoint import load_model, save_checkpoint
from helpers.errors import ConfigError
from helpers.head_loss import Distill
from helpers.model import GPT, GPTConfig, llama_config
from helpers.train import TrainConfig, load_teacher, train
from test_train import run_killed_and_resumed, setup, tiny  # noqa: F401, F811 (setup is a fixture)


def reference(logits, teacher_logits, targets, alpha, T):
    """(1 - alpha) * CE + alpha * T^2 * KL(q || p), written out from the definitions."""
    keep = targets != -1
    log_p_all = logits - logits.logsumexp(-1, keepdim=True)
    ce = -log_p_all[keep].gather(1, targets[keep][:, None]).mean()
    p_T = torch.softmax(logits[keep] / T, -1)
    q_T = torch.softmax(teacher_logits[keep] / T, -1)
    kl = (q_T * (q_T.log() - p_T.log())).sum(-1).mean()
    return (1 - alpha) * ce + alpha * T ** 2 * kl, ce, T ** 2 * kl


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("alpha,T", [(0.6, 1.0), (0.3, 2.5), (1.0, 0.5)])
def test_kd_loss_and_gradient_equal_autograd_of_the_formula(family, fused, alpha, T):
    """Both paths (the fused CPU head and the plain logits path) against the formula, on a tiny
    student distilled from a wider teacher; one target ignored (-1)."""
    make = (lambda **kw: GPTConfig(**kw)) if family == "gpt2" else (lambda **kw: llama_config(n_kv_head=1, **kw))
    torch.manual_seed(0)
    student = GPT(make(n_layer=2, n_head=2, n_embd=32, vocab_size=300, block_size=32))
    teacher = GPT(make(n_layer=3, n_head=2, n_embd=48, vocab_size=300, block_size=32)).eval()
    student.fused_loss = fused
    x, y = tokens(2, 12, vocab=300, seed=3), tokens(2, 12, vocab=300, seed=4)
    y[0, 5] = -1
    with torch.no_grad():
        d = Distill(teacher.hidden(x), teacher.lm_head.weight, alpha, T)
    logits, loss = student(x, y, distill=d)
    assert logits is None
    grads = torch.autograd.grad(loss, list(student.parameters()))
    ref, ce, kd = reference(student(x)[0].flatten(0, 1), teacher(x)[0].flatten(0, 1).detach(), y.flatten(), alpha, T)
    ref_grads = torch.autograd.grad(ref, list(student.parameters()))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert d.parts[0].item() == pytest.approx(ce.item(), rel=1e-5)
    assert d.parts[1].item() == pytest.approx(kd.item(), rel=1e-4)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-6, rtol=1e-4)


def test_fused_kd_uses_the_blocks(monkeypatch):
    """The fused path really runs block by block over the vocabulary and token chunks (several of each)."""
    from helpers import head_loss
    torch.manual_seed(0)
    x, w, tx, tw = torch.randn(50, 8, requires_grad=True), torch.randn(700, 8), torch.randn(50, 12), torch.randn(700, 12)
    t = torch.randint(0, 700, (50,))
    total, ce, kd = head_loss.LinearDistillation.apply(x, w, t, tx, tw, 0.6, 2.0, head_loss.Workspace(), 16, 128)
    ref, rce, rkd = reference(x @ w.T, tx @ tw.T, t, 0.6, 2.0)
    (g,), (rg,) = torch.autograd.grad(total, [x]), torch.autograd.grad(ref, [x])
    assert total.item() == pytest.approx(ref.item(), rel=1e-5) and torch.allclose(g, rg, atol=1e-6)


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_timing(rows):
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu", "elapsed_s")} for r in rows]


def test_alpha_zero_is_the_plain_run_and_kd_logs_its_parts(setup, tmp_path):
    plain = train(tiny(setup, tmp_path / "plain", max_iters=4))
    zero = train(tiny(setup, tmp_path / "zero", max_iters=4, teacher="parent", kd_alpha=0.0))
    assert without_timing(records(tmp_path / "zero")) == without_timing(records(tmp_path / "plain"))
    a, b = load_model(tmp_path / "plain" / "step_0000004.pt"), load_model(tmp_path / "zero" / "step_0000004.pt")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert zero["val_loss"] == plain["val_loss"]

    train(tiny(setup, tmp_path / "kd", max_iters=4, teacher="parent", kd_alpha=0.6, kd_temperature=2.0))
    kd, ref = records(tmp_path / "kd"), records(tmp_path / "plain")
    assert kd[0]["val_loss"] == ref[0]["val_loss"]  # same child before training: val_loss is plain CE
    assert kd[0]["ce_loss"] is None and kd[0]["kd_loss"] is None  # no training step yet
    for r in kd[1:]:
        assert r["kd_loss"] > 0 and r["total_loss"] == pytest.approx(0.4 * r["ce_loss"] + 0.6 * r["kd_loss"])
    assert [r["train_loss"] for r in kd[1:]] != [r["train_loss"] for r in ref[1:]]  # KD changed the training


def test_teacher_is_frozen_on_the_students_device_and_dtype(setup, tmp_path):
    cfg = tiny(setup, tmp_path / "t", teacher="parent")
    student = load_model(cfg.parent)
    teacher = load_teacher(cfg, student, torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.lm_head.weight.dtype == student.lm_head.weight.dtype and teacher.config.n_layer == 4


def test_teacher_with_another_vocabulary_is_refused(setup, tmp_path):
    torch.manual_seed(0)
    other = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=1000, block_size=64))
    other.provenance = {"tokenizer": "gpt2"}
    save_checkpoint(tmp_path / "other.pt", other)
    with pytest.raises(ConfigError, match=r"teacher=.*other.pt: its vocabulary \(1,000 ids.*student's \(50,257 ids"):
        train(tiny(setup, tmp_path / "v", teacher=str(tmp_path / "other.pt")))
    assert not (tmp_path / "v" / "metrics.jsonl").exists()


def test_kd_config_is_validated():
    with pytest.raises(ConfigError, match="kd_alpha=1.5"):
        TrainConfig.from_dict({"kd_alpha": 1.5})
    with pytest.raises(ConfigError, match="kd_temperature=0"):
        TrainConfig.from_dict({"kd_temperature": 0})
    assert not TrainConfig.from_dict({"teacher": "parent", "kd_alpha": 0}).distilling
    assert TrainConfig.from_dict({"teacher": "parent"}).distilling and not TrainConfig().distilling


@pytest.mark.slow
def test_sigkill_and_resume_with_kd_logs_the_same_records(setup, tmp_path):
    """As test_train's SIGKILL test, with distillation on (dropout on too): every record, the KD
    parts included, equals the uninterrupted run's."""
    kd = dict(teacher="parent", kd_alpha=0.6, kd_temperature=2.0)
    full, resumed = (without_timing(records(d)) for d in run_killed_and_resumed(setup, tmp_path, **kd))
    for r in full + resumed:
        r.pop("init")  # "resume" after the kill
    assert [r["step"] for r in full] == list(range(0, 41, 2)) and resumed == full
    assert all(r["kd_loss"] > 0 for r in full[1:])


@pytest.mark.slow
def test_compiled_kd_training_matches_eager(setup, tmp_path):
    """compile=True with a teacher: the traced plain KD path trains to the eager (fused) run's losses."""
    pytest.importorskip("torch._inductor")
    kd = dict(teacher="parent", kd_alpha=0.6, kd_temperature=2.0, max_iters=2, eval_interval=2)
    eager = train(tiny(setup, tmp_path / "eager", **kd))
    compiled = train(tiny(setup, tmp_path / "compiled", compile=True, **kd))
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-3)
    assert compiled["kd_loss"] == pytest.approx(eager["kd_loss"], rel=1e-2, abs=1e-5) and eager["kd_loss"] > 0
