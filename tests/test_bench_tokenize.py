"""bench/tokenize_prep.py runs end to end on a few files (its numbers are the README's only on a
full run: `python bench/tokenize_prep.py`)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_tokenizers_data_preparation_bench_runs(tmp_path):
    pytest.importorskip("datasets")
    out = tmp_path / "tokenize_prep.json"
    res = subprocess.run([sys.executable, "bench/tokenize_prep.py", "--files", "30", "--gb", "0.01", "--repeats", "1",
                          "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data["tokens_per_s"]) == {"limit", "ours", "datasets"} and min(data["tokens_per_s"].values()) > 0
    assert data["documents"] == 30 and 0 < data["stream"]["rss_mb"] < 1000
    assert "of the limit" in res.stdout
