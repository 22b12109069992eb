"""Short training runs to tune the demo's recipe: one arm (strategy or scratch) of the embedded
SmolLM2-135M child, trained with helpers.train.train, then its loss over the first --val-tokens
tokens of the val split. Losses are deterministic (fixed seeds), so runs compare exactly; wall
times are only indicative on a shared machine. Each run appends one JSON line to --log.

    python bench/tune_demo.py --data runs/demo/data --strategy block-influence --n-layers 15 \
        --lr 3e-4 --steps 40 --batch 4
"""
import argparse
import json
import tempfile
import time

from _common import ROOT  # noqa: F401 (puts the repository on sys.path)

from helpers.evaluate import val_loss_full
from helpers.checkpoint import load_model
from helpers.train import TrainConfig, read_metrics, train


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="prepared stdlib tokens in the SmolLM2 tokenizer (notebook 01)")
    ap.add_argument("--strategy", default="first", help="a strategy, 'scratch', or comma-separated block indices")
    ap.add_argument("--n-layers", type=int, default=15)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--val-tokens", type=int, default=4096)
    ap.add_argument("--log", default=str(ROOT / "bench" / "tune_demo.jsonl"))
    args = ap.parse_args()
    arm = dict(init="scratch") if args.strategy == "scratch" else \
        dict(layers=[int(i) for i in args.strategy.split(",")], n_layers=None) if args.strategy[0].isdigit() else \
        dict(strategy=args.strategy)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(parent="smollm2-135m", n_layers=args.n_layers, data_dir=args.data, out_dir=out,
                          max_iters=args.steps, batch_size=args.batch, block_size=args.block,
                          learning_rate=args.lr, min_lr=args.lr * args.min_lr_ratio, warmup_iters=args.warmup,
                          eval_interval=args.steps, eval_iters=1, ckpt_interval=0, eval_train=False,
                          calib_batches=args.calib, progress=False, **arm)
        cfg.validate()
        t = time.time()
        train(cfg)
        train_s = time.time() - t
        m = read_metrics(out)
        model = load_model(out)
        layers = model.provenance.get("layers")
        val = val_loss_full(model, args.data, args.block, max_tokens=args.val_tokens)["val_loss"]
    row = {"strategy": args.strategy, "n_layers": args.n_layers, "layers": layers, "lr": args.lr, "steps": args.steps,
           "batch": args.batch, "block": args.block, "tokens": int(m["tokens"].iloc[-1]), "val_loss": round(val, 4),
           "val_tokens": args.val_tokens, "train_s": round(train_s, 1),
           "tokens_per_s": round(float(m["tokens_per_s"].dropna().iloc[-1]), 1)}
    print(json.dumps(row))
    with open(args.log, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
