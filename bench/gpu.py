"""GPU training throughput and model-FLOPs utilisation, ours against transformers, in one 5-minute run.

GPT-2-small-shaped (12 layers, 768 dims) and GPT-2-medium-shaped children (16 of 24 layers, 1024
dims) at context 1024 in bf16 autocast with fused AdamW and TF32, torch.compile off and on, our GPT
against transformers' GPT2LMHeadModel (sdpa) with the same weights. MFU = achieved training FLOPs
(6 N + 12 L d T per token) / the GPU's dense bf16 peak (helpers.train.PEAK_FLOPS).

    python bench/gpu.py [--steps 10] [--no-compile] [--json bench/gpu.json]
    python bench/gpu.py --device cpu --tiny --steps 1 --no-compile   # a smoke run of the same code
                                                                     # (the test suite runs it)
"""
import argparse
import tempfile
import time

import torch

from _common import print_table, write_json

from helpers.checkpoint import export_hf
from helpers.model import GPT, GPTConfig
from helpers.train import peak_flops

SHAPES = {"gpt2-small-shaped (12L)": dict(n_layer=12, n_embd=768, n_head=12, batch=16),
          "gpt2-medium child (16L)": dict(n_layer=16, n_embd=1024, n_head=16, batch=12)}
TINY = {"tiny (2L)": dict(n_layer=2, n_embd=64, n_head=2, batch=2)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(model, is_ours, batch, seq, steps, device):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.randint(0, 50257, (batch, seq + 1), device=device)
    inp, tgt = x[:, :-1], x[:, 1:].contiguous()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(inp, tgt)[1] if is_ours else model(input_ids=inp, labels=inp).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up (and compilation)
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch * seq * steps / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", default="bench/gpu.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model: checks the script, measures nothing useful")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU (or --device cpu --tiny for a smoke run)")
    import transformers
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    peak = peak_flops(device)
    name_of_device = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"  # the device measured
    rows, data = [], {}
    for label, shape in (TINY if args.tiny else SHAPES).items():
        cfg = GPTConfig(n_layer=shape["n_layer"], n_embd=shape["n_embd"], n_head=shape["n_head"],
                        block_size=max(1024, args.seq))
        torch.manual_seed(0)
        base = GPT(cfg)
        flops_per_token = base.flops_per_token(args.seq)
        with tempfile.TemporaryDirectory() as tmp:
            export_hf(base, tmp)
            hf = transformers.GPT2LMHeadModel.from_pretrained(tmp, attn_implementation="sdpa")
        for compiled in ([False] if args.no_compile else [False, True]):
            for name, model, is_ours in (("ours", base, True), ("transformers", hf, False)):
                m = model.to(device).train()
                runner = torch.compile(m) if compiled else m
                started = time.time()
                tps = measure(runner, is_ours, shape["batch"], args.seq, args.steps, device)
                mfu = tps * flops_per_token / peak if peak else None
                key = f"{name}{'+compile' if compiled else ''}"
                data.setdefault(label, {})[key] = {"tokens_per_s": tps, "mfu": mfu, "wall_s": time.time() - started}
                rows.append([label, key, f"{tps:,.0f}", f"{100 * mfu:.1f}%" if mfu else "n/a"])
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    write_json(args.json, {"gpu": name_of_device, "peak_flops": peak, "seq": args.seq, "results": data})
    print_table(f"{name_of_device}: training, bf16 autocast, context {args.seq}",
                ["shape", "model", "tokens/s", "MFU"], rows)


if __name__ == "__main__":
    main()
