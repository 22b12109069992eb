"""Which inherited children fit which GPUs for training: an estimate from bytes per parameter.

    python bench/memory.py [--json FILE]

Per GPU, with AdamW and float32 master weights (autocast computes in bf16/fp16 but stores fp32):
  weights 4 + gradients 4 + AdamW's two moments 8 = 16 bytes per parameter;
  one GPU:  16 B/param;
  DDP:      16 B/param + 4 B/param for DDP's gradient buckets (a second copy of the gradients);
  FSDP:     16 B/param / n_gpus, plus the units gathered whole while they compute: the root
            (embeddings, final norm, head) and two blocks (one computing, one prefetched), each
            with fp32 weights and gradients (8 B/param).
  LoRA:     the frozen child's weights, 4 B/param (2 B/param for the blocks' projections with
            base_dtype=bfloat16 or float16), no gradients or AdamW state for them, plus adapters of
            rank 8 on every projection at 16 B/param (copy=all: nothing else trains).
A child "fits" when this is at most 80% of the GPU's memory: the rest is for activations (they grow
with batch_size x block_size; lower batch_size and raise grad_accum to fit), the CUDA context and
the allocator. Shapes are those of the parents' published config.json files; counts come from
building each child on the meta device (no memory, no download).
"""
import argparse
import json

import torch

from _common import SMOLLM2_SHAPE  # (also puts the repository on sys.path)
from helpers.lora import adapter_params
from helpers.model import GPT, GPTConfig, llama_config

BYTES_PER_PARAM = 16
DDP_BUCKETS = 4
GATHERED = 8
LORA_R = 8
USABLE = 0.8

PARENTS = {  # name: (config of the parent, layers the child keeps, why this child)
    "SmolLM2-135M": (llama_config(**SMOLLM2_SHAPE), 15, "the demo's child"),
    "GPT-2 medium": (GPTConfig(n_layer=24, n_embd=1024, n_head=16), 16, "the paper's GPT-2 child"),
    "GPT-2 xl": (GPTConfig(n_layer=48, n_embd=1600, n_head=25), 24, "half of GPT-2 xl"),
    "OpenLLaMA-3B": (llama_config(n_layer=26, n_embd=3200, n_head=32, intermediate_size=8640, vocab_size=32000,
                                  block_size=2048, tie_embeddings=False), 13, "the paper's Llama child"),
    "OpenLLaMA-7B": (llama_config(n_layer=32, n_embd=4096, n_head=32, intermediate_size=11008, vocab_size=32000,
                                  block_size=2048, tie_embeddings=False), 16, "half of a 7B parent"),
}
MACHINES = {"2 x T4": (2, 16), "P100": (1, 16), "A100-40GB": (1, 40), "2 x A100-40GB": (2, 40)}  # GPUs, GB each
LORA_MACHINES = {"T4": 16}  # LoRA (lora_r=8) on one GPU: float32 base and 16-bit base


def counts(cfg: GPTConfig, n_layers: int) -> dict:
    """Parameters of the child, of one block and of the root (all but the blocks); of one block's
    projections (what base_dtype holds in 16 bits) and of its LoRA adapters of rank LORA_R."""
    import dataclasses
    with torch.device("meta"):
        child = GPT(dataclasses.replace(cfg, n_layer=n_layers))
    total = child.num_params()
    block = sum(p.numel() for p in child.transformer.h[0].parameters())
    norms = sum(p.numel() for m in (child.transformer.h[0].ln_1, child.transformer.h[0].ln_2) for p in m.parameters())
    return {"params": total, "block": block, "root": total - n_layers * block, "n_layers": n_layers,
            "block_projections": block - norms, "block_adapters": adapter_params(child, LORA_R) // n_layers}


def bytes_per_gpu(c: dict, n_gpus: int, parallel: str) -> float:
    if parallel.startswith("lora"):  # the frozen child, and adapters trained as any weight is
        projections, adapters = c["n_layers"] * c["block_projections"], c["n_layers"] * c["block_adapters"]
        base_bytes = 2 if "16-bit" in parallel else 4
        return base_bytes * projections + 4 * (c["params"] - projections) + BYTES_PER_PARAM * adapters
    if n_gpus == 1:
        return BYTES_PER_PARAM * c["params"]
    if parallel == "ddp":
        return (BYTES_PER_PARAM + DDP_BUCKETS) * c["params"]
    return BYTES_PER_PARAM * c["params"] / n_gpus + GATHERED * (c["root"] + 2 * c["block"])


def setups():
    """(column name, GPUs, GB per GPU, parallel) for every machine and the ways it can train."""
    for machine, (gpus, gb) in MACHINES.items():
        for parallel in (("ddp", "fsdp") if gpus > 1 else ("one GPU",)):
            yield f"{machine} {parallel}", gpus, gb, parallel
    for machine, gb in LORA_MACHINES.items():
        for parallel in ("lora", "lora 16-bit base"):
            yield f"{machine} {parallel}", 1, gb, parallel


def table() -> dict:
    rows = {}
    for name, (cfg, n, why) in PARENTS.items():
        c = counts(cfg, n)
        row = {"child": f"{name}, first {n} of {cfg.n_layer}", "why": why, **c, "fits": {}}
        for column, gpus, gb, parallel in setups():
            need = bytes_per_gpu(c, gpus, parallel) / 1e9
            row["fits"][column] = {"gb_per_gpu": round(need, 1), "fits": need <= USABLE * gb}
        rows[name] = row
    return rows


def most_layers() -> dict:
    """For each parent and machine: the most leading layers whose child still fits."""
    out = {}
    for name, (cfg, _, _) in PARENTS.items():
        out[name] = {}
        one = counts(cfg, 1)  # a child of n layers has root + n * block parameters
        sizes = {n: {**one, "params": one["root"] + n * one["block"], "n_layers": n} for n in range(1, cfg.n_layer + 1)}
        for column, gpus, gb, parallel in setups():
            fit = [n for n, c in sizes.items() if bytes_per_gpu(c, gpus, parallel) <= USABLE * gb * 1e9]
            out[name][column] = max(fit, default=0)
    return out


# Activations kept for the backward pass, per sequence and layer, in 16-bit: about 34 x T x C bytes
# with fused attention (Korthikanti et al.'s count without the attention matrix). With activation
# checkpointing a block keeps only its input (2 x T x C bytes), and one block at a time is recomputed
# with all of its activations.
ACTIVATION_BYTES, CHECKPOINTED_BYTES = 34, 2


def activations(cfg: GPTConfig, n_layers: int, tokens: int, grad_checkpointing: bool) -> float:
    """Bytes of activations kept for one sequence of `tokens` tokens."""
    per_layer = tokens * cfg.n_embd
    if grad_checkpointing:
        return CHECKPOINTED_BYTES * per_layer * n_layers + ACTIVATION_BYTES * per_layer
    return ACTIVATION_BYTES * per_layer * n_layers


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="also write the table as JSON here")
    args = ap.parse_args()
    rows = table()
    cols = list(next(iter(rows.values()))["fits"])
    print("| child | parameters | " + " | ".join(cols) + " |")
    print("|---|---:|" + "---:|" * len(cols))
    for r in rows.values():
        cells = [f"{'✓' if f['fits'] else '✗'} {f['gb_per_gpu']:.1f} GB" for f in r["fits"].values()]
        print(f"| {r['child']} | {r['params'] / 1e6:,.0f} M | " + " | ".join(cells) + " |")
    layers = most_layers()
    print("\n| parent (layers) | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for name, fits in layers.items():
        print(f"| {name} ({PARENTS[name][0].n_layer}) | " + " | ".join(str(v) for v in fits.values()) + " |")
    acts = {}
    print("\n| child | activations per sequence of 2,048 tokens | with grad_checkpointing=true |")
    print("|---|---:|---:|")
    for name, (cfg, n, _) in PARENTS.items():
        off, on = (activations(cfg, n, 2048, gc) / 1e9 for gc in (False, True))
        acts[name] = {"off_gb": round(off, 2), "on_gb": round(on, 2)}
        print(f"| {name}, first {n} of {cfg.n_layer} | {off:.2f} GB | {on:.2f} GB |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"children": rows, "most_layers": layers, "activations_per_2048_tokens": acts}, f, indent=1)


if __name__ == "__main__":
    main()
