"""The benchmark scripts run: the GPU one has no GPU here, so its code runs in its CPU smoke mode."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_benchmark_runs_end_to_end_in_its_cpu_smoke_mode(tmp_path):
    out = tmp_path / "gpu.json"
    res = subprocess.run([sys.executable, "bench/gpu.py", "--device", "cpu", "--tiny", "--steps", "1", "--seq", "32",
                          "--no-compile", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    runs = data["results"]["tiny (2L)"]
    assert set(runs) == {"ours", "transformers"} and all(r["tokens_per_s"] > 0 for r in runs.values())
    assert data["gpu"] == "cpu" and "MFU" in res.stdout


def test_gpu_benchmark_refuses_a_missing_gpu_with_the_way_out():
    res = subprocess.run([sys.executable, "bench/gpu.py", "--device", "cuda"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode != 0 and "--device cpu --tiny" in res.stderr


def test_memory_table_counts_and_bytes_per_parameter(tmp_path):
    """The README's fit table: child sizes counted from the parents' shapes (the SmolLM2 child has the
    81.4 M parameters the demo's loaded child has) and bytes per GPU from 16 B/param."""
    out = tmp_path / "memory.json"
    res = subprocess.run([sys.executable, "bench/memory.py", "--json", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    smol, llama = data["children"]["SmolLM2-135M"], data["children"]["OpenLLaMA-3B"]
    assert round(smol["params"] / 1e6, 1) == 81.4
    assert llama["params"] == llama["root"] + 13 * llama["block"]
    fits = llama["fits"]
    assert fits["A100-40GB one GPU"]["gb_per_gpu"] == round(16 * llama["params"] / 1e9, 1)
    assert fits["2 x T4 ddp"]["gb_per_gpu"] == round(20 * llama["params"] / 1e9, 1)
    assert fits["2 x T4 fsdp"]["gb_per_gpu"] == round((8 * llama["params"] + 8 * (llama["root"] + 2 * llama["block"])) / 1e9, 1)
    assert data["most_layers"]["OpenLLaMA-3B"]["2 x T4 fsdp"] > data["most_layers"]["OpenLLaMA-3B"]["2 x T4 ddp"]
    # LoRA (rank 8 on every projection): the frozen child at 4 (or, its blocks' projections, 2) B/param, the adapters at 16
    seven = data["children"]["OpenLLaMA-7B"]
    projections, adapters = 16 * seven["block_projections"], 16 * seven["block_adapters"]
    c, inter = 4096, 11008  # c_attn holds q, k, v (a rank block each), c_fc gate and up
    assert seven["block_adapters"] == 8 * (3 * (c + 3 * c) + (c + c) + 2 * (c + 2 * inter) + (inter + c))
    assert seven["fits"]["T4 lora"]["gb_per_gpu"] == round((4 * seven["params"] + 16 * adapters) / 1e9, 1)
    assert seven["fits"]["T4 lora 16-bit base"]["gb_per_gpu"] == round(
        (4 * seven["params"] - 2 * projections + 16 * adapters) / 1e9, 1)
    assert seven["fits"]["T4 lora 16-bit base"]["fits"] and not seven["fits"]["T4 lora"]["fits"]


def test_loop_benchmark_times_the_loop_against_the_bare_step(tmp_path):
    import torch
    from helpers.checkpoint import save_checkpoint
    from helpers.data import prepare
    from helpers.model import GPT, GPTConfig
    torch.manual_seed(0)
    parent = GPT(GPTConfig(n_layer=4, n_head=2, n_embd=32, vocab_size=50257, block_size=64))
    parent.provenance = {"tokenizer": "gpt2"}
    save_checkpoint(tmp_path / "parent.pt", parent)
    prepare("stdlib", tmp_path / "data", max_docs=20, val_fraction=0.2, progress=False)
    out = tmp_path / "loop.json"
    res = subprocess.run([sys.executable, "bench/loop.py", "--data", str(tmp_path / "data"), "--parent",
                          str(tmp_path / "parent.pt"), "--steps", "4", "--bare-steps", "2", "--batch", "2", "--block", "32",
                          "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["ratio"] > 0 and data["bench_tokens_per_s"] > 0 and data["checkpoint_writes"] >= 1
    assert "step_0000004.pt" in data["checkpoint_files"] and "training loop" in res.stdout
