"""The training loop against the bare training step: how much of the step's speed survives the
loop's evaluations, logging and checkpoints.

Both run on the same model and batch, each in a fresh process: the bare step is forward + backward +
gradient clipping + AdamW on batches of the train split, timed with warm-up and a median, once before
and once after the loop (their mean is the reference: this VM's speed drifts by several percent over
the two minutes the loop takes, and a reference taken on one side of it tilted the ratio); the
loop is helpers.train.train with the demo's cadence (evaluations, checkpoints at ckpt_interval,
the final one included), timed from its first step to its last evaluation (the clock of its
metrics starts once the model, data and optimizer are set up) plus its checkpoint writes.

    python bench/loop.py --data runs/demo/data            # the demo's setting (pipeline preset)
    python bench/loop.py --data DIR --steps 40 --ckpt-interval none   # the old cadence: a checkpoint per evaluation
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _common import ROOT, print_table, write_json

import helpers.saving
from helpers.data import get_batch, open_split
from helpers.pipeline import PRESETS
from helpers.train import TrainConfig, build_model, configure_optimizer, read_metrics, train


def bare_steps(cfg: TrainConfig, steps: int) -> float:
    """Median seconds of one training step of the model cfg builds, on train-split batches."""
    torch.manual_seed(cfg.seed)
    model, _ = build_model(cfg)
    model.train()
    opt = configure_optimizer(model, cfg, torch.device("cpu"))
    data = open_split(cfg.data_dir, "train")
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + 1):
        x, y = get_batch(data, cfg.block_size, cfg.batch_size, g)
        t = time.perf_counter()
        model(x, y)[1].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first is warm-up
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def timed_loop(cfg: TrainConfig):
    """helpers.train.train(cfg) with its checkpoint writes timed: (seconds of the call, seconds of
    each write, the metrics, the checkpoint files left)."""
    spent = []
    save = helpers.saving.save_checkpoint

    def timed_save(*a, **kw):
        t0 = time.perf_counter()
        try:
            return save(*a, **kw)
        finally:
            spent.append(time.perf_counter() - t0)

    helpers.saving.save_checkpoint = timed_save
    t = time.perf_counter()
    try:
        train(cfg)
    finally:
        helpers.saving.save_checkpoint = save
    return time.perf_counter() - t, spent, read_metrics(cfg.out_dir), sorted(p.name for p in Path(cfg.out_dir).glob("*.pt"))


def in_fresh_process(fn, *args):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main():
    demo = PRESETS["demo"]
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="the demo's prepared data (SmolLM2 tokens of the stdlib corpus)")
    ap.add_argument("--steps", type=int, default=demo["max_iters"], help="loop steps (default: the demo's)")
    ap.add_argument("--bare-steps", type=int, default=5)
    ap.add_argument("--ckpt-interval", default=str(demo.get("ckpt_interval")), help="none: a checkpoint per evaluation")
    ap.add_argument("--eval-train", default=str(demo.get("eval_train", True)))
    ap.add_argument("--parent", default=demo["parent"])
    ap.add_argument("--batch", type=int, default=demo["batch_size"])
    ap.add_argument("--block", type=int, default=demo["block_size"])
    ap.add_argument("--json", default=str(ROOT / "bench" / "loop.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as out:
        fields = {k: demo[k] for k in ("n_layers", "batch_size", "block_size", "grad_accum", "learning_rate", "min_lr",
                                       "warmup_iters", "eval_interval", "eval_iters", "strategy", "calib_batches")
                  if k in demo}
        strategy = [a for a in str(demo.get("compare", "")).split(",") if a not in ("", "scratch", "child")]
        values = {**fields, "parent": args.parent, "batch_size": args.batch, "block_size": args.block, "data_dir": args.data, "out_dir": out, "max_iters": args.steps,
                  "ckpt_interval": args.ckpt_interval, "eval_train": args.eval_train, "progress": False,
                  "log_interval": 5, **({"strategy": strategy[-1]} if strategy else {})}
        cfg = TrainConfig.from_dict(values)
        # every run in its own fresh process, and this one holds no model: a fresh process started
        # while another held ~3 GB ran its steps 10-15% slower on this VM, and the second of two
        # contenders in one process ran ~17% slower
        step_before = in_fresh_process(bare_steps, cfg, args.bare_steps)
        total_s, spent, m, ckpts = in_fresh_process(timed_loop, cfg)
        step_after = in_fresh_process(bare_steps, cfg, args.bare_steps)
        step_s = (step_before + step_after) / 2
        # the loop: from its first step (the record's clock starts after the model, data and optimizer
        # are set up) to its last evaluation, plus the checkpoint writes (the final one comes after it)
        loop_s = float(m["elapsed_s"].iloc[-1]) + sum(spent)
    tokens = int(m["tokens"].iloc[-1])
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
    bench_tps, loop_tps = tokens_per_step / step_s, tokens / loop_s
    ckpt_share = sum(spent) / loop_s
    rows = [["bare step (bench)", f"{bench_tps:,.1f}", "1.00"], ["training loop", f"{loop_tps:,.1f}", f"{loop_tps / bench_tps:.2f}"]]
    print_table(f"{cfg.strategy} child of {cfg.parent}, {cfg.n_layers or 'half the'} layers, batch {cfg.batch_size} x "
                f"{cfg.block_size}, {args.steps} steps, eval every {cfg.eval_interval} ({cfg.eval_iters} batches, "
                f"eval_train={cfg.eval_train}), ckpt_interval={cfg.ckpt_interval}; {len(spent)} checkpoint writes "
                f"({sum(spent):.1f} s, {100 * ckpt_share:.1f}% of the loop); files {ckpts}; bare step "
                f"{step_before:.3f} s before the loop, {step_after:.3f} s after",
                ["case", "tokens/s", "ratio"], rows)
    write_json(args.json, {"setting": {k: v for k, v in values.items() if k not in ("out_dir", "data_dir")},
                           "bare_step_s": round(step_s, 3), "bare_step_before_s": round(step_before, 3),
                           "bare_step_after_s": round(step_after, 3), "bench_tokens_per_s": round(bench_tps, 1),
                           "loop_s": round(loop_s, 1), "train_call_s": round(total_s, 1), "loop_tokens_per_s": round(loop_tps, 1),
                           "ratio": round(loop_tps / bench_tps, 3), "checkpoint_files": ckpts,
                           "checkpoint_writes": len(spent), "checkpoint_s": round(sum(spent), 2),
                           "checkpoint_share": round(ckpt_share, 4)})
    print(json.dumps({"ratio": round(loop_tps / bench_tps, 3)}))


if __name__ == "__main__":
    main()
