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
