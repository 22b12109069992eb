"""Training and evaluation throughput: our GPT against transformers (sdpa attention), same weights.

Training steps (forward + backward + AdamW), no-grad forward passes, and the loss alone as the
whole-split validation loss computes it (ours: final hidden states + helpers.head_loss's loss-only
head, no (tokens, vocab) logits kept; transformers: its `labels=` path), float32 on CPU, the
contenders alternated, with warm-up and medians.

    python bench/throughput.py --family gpt2    # GPT2LMHeadModel at (6 layers, 384 dims, 6 heads,
                                                # context 256, vocab 50257, batch 8): the issue's setting
    python bench/throughput.py --family llama   # LlamaForCausalLM on the 15-layer child of the embedded
                                                # SmolLM2-135M (random weights of that shape if missing)
    add --compile to time torch.compile'd versions of both too
"""
import argparse
import tempfile

import torch

from _common import alternate, print_table, smollm2_parent, write_json

from helpers.checkpoint import export_hf
from helpers.inherit import inherit
from helpers.model import GPT, GPTConfig


def build(args) -> tuple[GPT, str]:
    torch.manual_seed(0)
    if args.family == "gpt2":
        cfg = GPTConfig(n_layer=args.layers or 6, n_embd=args.dim, n_head=args.heads, block_size=1024, vocab_size=50257)
        return GPT(cfg), f"GPT-2 {cfg.n_layer}L/{cfg.n_embd}d/{cfg.n_head}h"
    layers = args.layers or 15
    parent, what = smollm2_parent()
    return inherit(parent, layers), f"{what}, first {layers} layers"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", choices=["gpt2", "llama"], default="gpt2")
    ap.add_argument("--layers", type=int, default=None, help="default 6 (gpt2) or 15 (llama)")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4, help="alternations of the contenders; the best round counts")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd versions of both")
    ap.add_argument("--cases", default="train,forward,val", help="comma-separated subset of train,forward,val")
    ap.add_argument("--json", default=None, help="default bench/throughput_<family>.json")
    args = ap.parse_args()
    import transformers
    ours, what = build(args)
    hf_class = transformers.GPT2LMHeadModel if args.family == "gpt2" else transformers.LlamaForCausalLM
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(ours, tmp)
        theirs = hf_class.from_pretrained(tmp, attn_implementation="sdpa")
    vocab = ours.config.vocab_size
    x = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    inp, tgt = x[:, :-1], x[:, 1:].contiguous()
    with torch.no_grad():
        diff = (ours.eval()(inp)[0] - theirs.eval()(inp).logits).abs().max().item()
    contenders = {"ours": ours, "transformers": theirs}
    if args.compile:
        contenders.update({"ours+compile": torch.compile(ours), "transformers+compile": torch.compile(theirs)})
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-5) for k, m in contenders.items()}

    def loss_of(name, model):
        if name.startswith("ours"):
            return model(inp, tgt)[1]
        # transformers shifts labels itself: pass the inputs' own window
        return model(input_ids=inp, labels=inp).loss

    def train_fn(name, model):
        def step():
            model.train()
            loss_of(name, model).backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
        return step

    def eval_fn(name, model):
        @torch.no_grad()
        def step():
            model.eval()
            return model(inp)[0] if name.startswith("ours") else model(input_ids=inp).logits
        return step

    def val_loss_fn(name, model):
        @torch.no_grad()
        def step():
            model.eval()
            if name.startswith("ours"):  # what helpers.evaluate.val_loss_full computes per batch
                return getattr(model, "_orig_mod", model).loss_sum(inp, tgt)
            return model(input_ids=inp, labels=inp).loss
        return step

    tokens = args.batch * args.seq
    cases = {"train": ("training step", train_fn), "forward": ("no-grad forward", eval_fn),
             "val": ("val loss (loss only)", val_loss_fn)}
    rows, data = [], {}
    for case in args.cases.split(","):
        kind, fn = cases[case]
        res = alternate({k: fn(k, m) for k, m in contenders.items()}, rounds=args.rounds, repeats=args.repeats)
        base = res["transformers"]
        for name, t in res.items():
            rows.append([kind, name, f"{tokens / t:,.0f}", f"{base / t:.2f}x"])
            data.setdefault(kind, {})[name] = {"tokens_per_s": tokens / t, "vs_transformers": base / t}
    write_json(args.json or f"bench/throughput_{args.family}.json",
               {"model": what, "config": vars(args), "max_logit_diff": diff, "results": data})
    print_table(f"{what}, context {args.seq}, batch {args.batch}, float32 (max |logit diff| {diff:.1e})",
                ["case", "model", "tokens/s", "vs transformers"], rows)


if __name__ == "__main__":
    main()
