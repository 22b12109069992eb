"""Activation checkpointing (grad_checkpointing=true) against keeping every activation: peak memory
and step time of a training step of the SmolLM2 child (its first 15 of 30 blocks), side by side in
one run. Each contender runs in its own fresh process, so that its peak resident memory (VmHWM) is
its own; the contenders alternate over `--rounds` rounds and the best median of each is kept.

    python bench/grad_checkpointing.py                      # batch 8 x 512, as the issue asks
    python bench/grad_checkpointing.py --batch 2 --block 256 --steps 2   # a quick look
"""
import argparse
import json
import multiprocessing as mp
import statistics
import time

import torch

from _common import ROOT, print_table, smollm2_parent, write_json

from helpers.inherit import inherit
from helpers.startup import enable_grad_checkpointing


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(l for l in f if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def one_contender(checkpointing: bool, batch: int, block: int, steps: int, queue) -> None:
    torch.manual_seed(0)
    parent, _ = smollm2_parent()
    child = inherit(parent, parent.config.n_layer // 2)
    del parent
    child.train()
    if checkpointing:
        enable_grad_checkpointing(child)
    opt = torch.optim.AdamW(child.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, child.config.vocab_size, (batch, block + 1), generator=g)
    before = peak_rss_mb()
    times = []
    for i in range(steps + 1):  # the first step warms up (and allocates AdamW's state)
        t = time.perf_counter()
        _, loss = child(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t)
    queue.put({"step_s": statistics.median(times), "peak_rss_mb": peak_rss_mb(), "rss_before_steps_mb": before,
               "loss": loss.item()})


def run(checkpointing: bool, args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=one_contender, args=(checkpointing, args.batch, args.block, args.steps, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "grad_checkpointing.json"))
    args = ap.parse_args()
    results = {"off": [], "on": []}
    for _ in range(args.rounds):
        for name in results:
            results[name].append(run(name == "on", args))
    best = {name: min(r, key=lambda d: d["step_s"]) | {"peak_rss_mb": max(d["peak_rss_mb"] for d in r)}
            for name, r in results.items()}
    tokens = args.batch * args.block
    rows = [[name, f"{b['step_s']:.2f}", f"{tokens / b['step_s']:,.0f}", f"{b['peak_rss_mb']:,.0f}",
             f"{b['peak_rss_mb'] - b['rss_before_steps_mb']:,.0f}"] for name, b in best.items()]
    print_table(f"SmolLM2 child (15 blocks), batch {args.batch} x {args.block}, CPU float32",
                ["grad_checkpointing", "step s", "tokens/s", "peak RSS MB", "of it in the steps MB"], rows)
    ratio_time = best["on"]["step_s"] / best["off"]["step_s"]
    saved = (best["off"]["peak_rss_mb"] - best["on"]["peak_rss_mb"]) / best["off"]["peak_rss_mb"]
    print(f"\nstep time with / without: {ratio_time:.2f}x; peak memory saved: {100 * saved:.0f}%")
    write_json(args.out, {"batch": args.batch, "block": args.block, "steps": args.steps, "rounds": args.rounds,
                          "results": best, "time_ratio": round(ratio_time, 3), "peak_saved": round(saved, 3)})


if __name__ == "__main__":
    main()
