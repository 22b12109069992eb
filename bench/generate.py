"""Generation speed with the KV cache against without it (same model, same prompt, greedy), and a
check that both produce the same tokens.

    python bench/generate.py [--parent smollm2-135m] [--prompt-tokens 64] [--new-tokens 128]
"""
import argparse
import time

import torch

from _common import print_table, write_json

from helpers.checkpoint import CheckpointError, load_model
from helpers.model import GPT, GPTConfig


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parent", default="smollm2-135m", help="any load_model source; a random GPT-2 small if missing")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--json", default="bench/generate.json")
    args = ap.parse_args()
    try:
        model, what = load_model(args.parent), args.parent
    except CheckpointError:
        torch.manual_seed(0)
        model, what = GPT(GPTConfig()).eval(), "random GPT-2 small"
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    model.generate(prompt, 4, temperature=0)  # warm-up
    timings, outputs = {}, {}
    for use_cache in (True, False, True, False):
        t = time.perf_counter()
        outputs[use_cache] = model.generate(prompt, args.new_tokens, temperature=0, use_cache=use_cache)
        timings.setdefault(use_cache, []).append(time.perf_counter() - t)
    same = torch.equal(outputs[True], outputs[False])
    rate = {k: args.new_tokens / min(v) for k, v in timings.items()}
    write_json(args.json, {"model": what, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                           "tokens_per_s_cache": rate[True], "tokens_per_s_no_cache": rate[False],
                           "speedup": rate[True] / rate[False], "identical_greedy_output": same})
    print_table(f"{what}: greedy generation of {args.new_tokens} tokens after {args.prompt_tokens} (identical: {same})",
                ["mode", "tokens/s", "speedup"],
                [["KV cache", f"{rate[True]:.1f}", f"{rate[True] / rate[False]:.2f}x"],
                 ["no cache", f"{rate[False]:.1f}", "1.00x"]])


if __name__ == "__main__":
    main()
