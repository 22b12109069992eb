"""Data preparation throughput and memory, side by side in one run.

1. Tokens/s of helpers.data.prepare (threaded batch encoding, incremental writes) against a plain
   single-thread `encode_ordinary` loop over the same documents (the Kaggle student's approach,
   minus its one giant string), on the embedded default corpus.
2. Peak resident memory of prepare on a generated stream of --gb gigabytes of text, measured in a
   child process (ru_maxrss), to show it stays bounded whatever the corpus size.

    python bench/data_prep.py [--gb 2] [--json bench/data_prep.json]
"""
import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from helpers.data import prepare, stdlib_files  # noqa: E402
from helpers.tokenizer import gpt2_encoding  # noqa: E402


def baseline(files) -> tuple[int, float]:
    enc = gpt2_encoding()
    t = time.perf_counter()
    n = 0
    for f in files:
        n += len(enc.encode_ordinary(f.read_bytes().decode("utf-8", errors="replace"))) + 1
    return n, time.perf_counter() - t


def ours(out: Path) -> tuple[int, float]:
    t = time.perf_counter()
    meta = prepare("stdlib", out, overwrite=True, progress=False)
    return sum(s["tokens"] for s in meta["splits"].values()), time.perf_counter() - t


def generate_corpus(folder: Path, gigabytes: float, seed=0) -> int:
    """Files of shuffled stdlib lines, 8 MB each, adding up to `gigabytes`."""
    _, files = stdlib_files()
    lines = [l for f in files[:300] for l in f.read_text(errors="replace").splitlines(keepends=True)]
    rng = random.Random(seed)
    written, i = 0, 0
    target = int(gigabytes * 1e9)
    while written < target:
        rng.shuffle(lines)
        text = "".join(lines)[: 8_000_000]
        (folder / f"doc{i:05d}.txt").write_text(text)
        written += len(text.encode())
        i += 1
    return written


def peak_rss_of_prepare(src: Path, out: Path) -> tuple[float, float, dict]:
    code = ("import sys, json, resource, time; from helpers.data import prepare; t=time.perf_counter(); "
            "m = prepare(sys.argv[1], sys.argv[2], overwrite=True, progress=False); "
            "print(json.dumps({'s': time.perf_counter()-t, 'rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024, "
            "'tokens': sum(v['tokens'] for v in m['splits'].values()), 'chars': sum(v['characters'] for v in m['splits'].values())}))")
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, "-c", code, str(src), str(out)], capture_output=True, text=True, cwd=root, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.0, help="size of the generated stream for the memory test")
    ap.add_argument("--json", default="bench/data_prep.json")
    args = ap.parse_args()
    _, files = stdlib_files()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = {"baseline": [], "ours": []}
        for _ in range(5):  # alternate the contenders, keep the median
            n_base, t_base = baseline(files)
            n_ours, t_ours = ours(tmp / "stdlib")
            runs["baseline"].append(n_base / t_base)
            runs["ours"].append(n_ours / t_ours)
        med = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
        rows.append(("stdlib corpus, single-thread encode_ordinary loop", f"{med['baseline'] / 1e6:.2f} M tok/s", ""))
        rows.append(("stdlib corpus, helpers.data.prepare", f"{med['ours'] / 1e6:.2f} M tok/s",
                     f"{med['ours'] / med['baseline']:.2f}x"))
        gen = tmp / "gen"
        gen.mkdir()
        size = generate_corpus(gen, args.gb)
        r = peak_rss_of_prepare(gen, tmp / "gen_out")
        rows.append((f"generated stream {size / 1e9:.2f} GB, prepare", f"{r['tokens'] / r['s'] / 1e6:.2f} M tok/s",
                     f"peak RSS {r['rss_mb']:.0f} MB"))
    result = {"tokens_per_s": med, "speedup": med["ours"] / med["baseline"], "stream_bytes": size,
              "stream": r, "files": len(files)}
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"\n{'case':58s} {'throughput':>16s}  note")
    for row in rows:
        print(f"{row[0]:58s} {row[1]:>16s}  {row[2]}")


if __name__ == "__main__":
    main()
