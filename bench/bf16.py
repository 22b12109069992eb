"""bfloat16 on the CPU against float32, side by side in one run, each row as a fraction of the
machine's measured bfloat16 matrix-product limit.

1. the limit: a 2048 x 2048 x 2048 matrix product in float32 and in bfloat16 (GFLOP/s);
2. a training step (forward + backward + AdamW) of the 15-layer child of SmolLM2-135M (batch 4 x
   256): ours in float32, ours in bfloat16 (torch.autocast, float32 master weights, the fused
   bfloat16 head), the same with AdamW(fused=True) (the training loop's optimizer is the unfused
   one on the CPU: helpers.startup.configure_optimizer), and transformers' LlamaForCausalLM on the
   same weights under torch.autocast("cpu", bfloat16) (its `labels=` loss), all with plain AdamW
   unless named;
3. the whole-split validation loss as helpers.measures.val_loss_full computes it per batch
   (GPT.loss_sum: the loss-only head; batch 8 x 256), float32 against bfloat16.
Contenders alternate, with warm-up and medians; achieved GFLOP/s counts the model's FLOPs
(GPT.flops_per_token: 6 per weight per token in training, 2 in the no-grad forward, plus attention).

    python bench/bf16.py                  # writes bench/bf16.json
    python bench/bf16.py --rounds 1 --repeats 2   # quicker, noisier
    python bench/bf16.py --threads 1      # one core: less disturbed by other processes
"""
import argparse
import tempfile

import torch

from _common import alternate, print_table, smollm2_parent, write_json

from helpers.checkpoint import export_hf
from helpers.inherit import inherit


def gemm_gflops(rounds: int, repeats: int, n: int = 2048) -> dict:
    """GFLOP/s of an n x n x n product in float32 and bfloat16, alternated."""
    mats = {dt: (torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)) for dt in (torch.float32, torch.bfloat16)}
    res = alternate({str(dt).removeprefix("torch."): (lambda a=a, b=b: torch.mm(a, b)) for dt, (a, b) in mats.items()},
                    rounds=rounds, repeats=repeats)
    return {name: 2 * n ** 3 / t / 1e9 for name, t in res.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=15)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4, help="training batch")
    ap.add_argument("--val-batch", type=int, default=8, help="validation batch (val_loss_full's default)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the contenders; the best round counts")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--json", default="bench/bf16.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    print(f"native bfloat16 (AVX512-BF16): {native}, AMX: {amx}, {torch.get_num_threads()} threads")
    gemm = gemm_gflops(args.rounds, args.repeats * 3)
    limit = gemm["bfloat16"]

    import transformers
    torch.manual_seed(0)
    parent, what = smollm2_parent()
    ours = inherit(parent, args.layers)
    del parent
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(ours, tmp)
        theirs = transformers.LlamaForCausalLM.from_pretrained(tmp, attn_implementation="sdpa",
                                                               torch_dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    vocab = ours.config.vocab_size
    x = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=g)
    inp, tgt = x[:, :-1], x[:, 1:].contiguous()
    xv = torch.randint(0, vocab, (args.val_batch, args.seq + 1), generator=g)
    vin, vtgt = xv[:, :-1], xv[:, 1:].contiguous()
    bf16 = dict(device_type="cpu", dtype=torch.bfloat16)

    def train_step(name, autocast: bool, fused_adamw: bool = False):
        model = ours if name == "ours" else theirs
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused_adamw)

        def step():
            model.train()
            with torch.autocast(**bf16, enabled=autocast):
                # transformers shifts labels itself: pass the inputs' own window
                loss = ours(inp, tgt)[1] if name == "ours" else theirs(input_ids=inp, labels=inp).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def val_loss(autocast: bool):
        @torch.no_grad()
        def run():
            ours.eval()
            with torch.autocast(**bf16, enabled=autocast):
                return ours.loss_sum(vin, vtgt)
        return run

    # the loss of the validation batch before any step changes the weights
    losses = {}
    for name in ("float32", "bfloat16"):
        total, count = val_loss(name == "bfloat16")()
        losses[name] = (total / count).item()
    train = alternate({"ours float32": train_step("ours", False), "ours bfloat16": train_step("ours", True),
                       "ours bfloat16, fused AdamW": train_step("ours", True, fused_adamw=True),
                       "transformers + autocast bfloat16": train_step("transformers", True)},
                      rounds=args.rounds, repeats=args.repeats)
    val = alternate({"float32": val_loss(False), "bfloat16": val_loss(True)}, rounds=args.rounds, repeats=args.repeats)

    flops_train = ours.flops_per_token(args.seq) * args.batch * args.seq
    flops_val = ours.flops_per_token(args.seq) / 3 * args.val_batch * args.seq
    rows = [["GEMM 2048^3", name, "-", f"{v:,.0f}", f"{v / limit:.2f}", "-"] for name, v in gemm.items()]
    data = {"gemm_gflops": gemm, "training_step": {}, "val_loss": {}}
    for name, t in train.items():
        gf = flops_train / t / 1e9
        rows.append(["training step", name, f"{args.batch * args.seq / t:,.0f}", f"{gf:,.0f}", f"{gf / limit:.2f}",
                     f"{train['ours float32'] / t:.2f}x"])
        data["training_step"][name] = {"s": t, "tokens_per_s": args.batch * args.seq / t, "gflops": gf,
                                       "of_bf16_limit": gf / limit}
    for name, t in val.items():
        gf = flops_val / t / 1e9
        rows.append(["val loss (loss only)", name, f"{args.val_batch * args.seq / t:,.0f}", f"{gf:,.0f}",
                     f"{gf / limit:.2f}", f"{val['float32'] / t:.2f}x"])
        data["val_loss"][name] = {"s": t, "tokens_per_s": args.val_batch * args.seq / t, "gflops": gf,
                                  "of_bf16_limit": gf / limit, "loss": losses[name]}
    ratios = {"train_bf16_vs_fp32": train["ours float32"] / train["ours bfloat16"],
              "train_bf16_vs_transformers_autocast": train["transformers + autocast bfloat16"] / train["ours bfloat16"],
              "val_bf16_vs_fp32": val["float32"] / val["bfloat16"]}
    ratios["train_bf16_fused_adamw_vs_fp32"] = train["ours float32"] / train["ours bfloat16, fused AdamW"]
    write_json(args.json, {"model": f"{what}, first {args.layers} layers", "config": vars(args),
                           "native_bf16": native, "amx": amx, "results": data, "ratios": ratios})
    print_table(f"{what}, first {args.layers} layers, context {args.seq}; bfloat16 GEMM limit {limit:,.0f} GFLOP/s",
                ["case", "contender", "tokens/s", "GFLOP/s", "of bf16 limit", "vs float32"], rows)
    print(f"\nval loss of the batch (random tokens, before training): float32 {losses['float32']:.5f}, "
          f"bfloat16 {losses['bfloat16']:.5f}")
    print("ratios:", {k: round(v, 2) for k, v in ratios.items()})


if __name__ == "__main__":
    main()
