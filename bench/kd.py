"""What distillation costs per training step on the CPU: a plain step of the child (fused
cross-entropy head), a KD step (teacher forward without gradient + the fused block-by-block KD head),
the same KD step through the plain logits path, and the teacher's forward alone; float32, the
contenders alternated, with warm-up and medians.

    python bench/kd.py --family gpt2    # child 6L/384d of a 12L/384d teacher, vocab 50257, batch 8 x 256
    python bench/kd.py --family llama   # the 15-layer child of the embedded SmolLM2-135M, the 30-layer parent as teacher
"""
import argparse

import torch

from _common import alternate, print_table, smollm2_parent, write_json

from helpers.head_loss import Distill
from helpers.inherit import inherit
from helpers.model import GPT, GPTConfig


def build(args) -> tuple[GPT, GPT, str]:
    torch.manual_seed(0)
    if args.family == "gpt2":
        teacher = GPT(GPTConfig(n_layer=12, n_embd=384, n_head=6, block_size=1024, vocab_size=50257))
        what = "GPT-2 12L/384d teacher, 6L child"
    else:
        teacher, what = smollm2_parent()
        what = f"{what} teacher (30L), 15L child"
    return inherit(teacher, teacher.config.n_layer // 2), teacher.eval().requires_grad_(False), what


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", choices=["gpt2", "llama"], default="gpt2")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=0.6)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None, help="default bench/kd_<family>.json")
    args = ap.parse_args()
    student, teacher, what = build(args)
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, student.config.vocab_size, (args.batch, args.seq + 1), generator=g)
    inp, tgt = x[:, :-1], x[:, 1:].contiguous()

    def step(kd: bool, fused: bool = True):
        def run():
            student.fused_loss = fused
            if kd:
                with torch.no_grad():
                    d = Distill(teacher.hidden(inp), teacher.lm_head.weight, args.alpha, args.temperature)
                loss = student(inp, tgt, distill=d)[1]
            else:
                loss = student(inp, tgt)[1]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    @torch.no_grad()
    def teacher_forward():
        teacher.hidden(inp)

    contenders = {"plain step": step(False), "KD step (fused head)": step(True),
                  "KD step (plain logits path)": step(True, fused=False), "teacher forward (no grad)": teacher_forward}
    res = alternate(contenders, rounds=args.rounds, repeats=args.repeats)
    base = res["plain step"]
    rows = [[name, f"{t * 1000:,.0f}", f"{t / base:.2f}x"] for name, t in res.items()]
    write_json(args.json or f"bench/kd_{args.family}.json",
               {"model": what, "config": vars(args),
                "results": {name: {"s": t, "vs_plain_step": t / base} for name, t in res.items()}})
    print_table(f"{what}, context {args.seq}, batch {args.batch}, float32, alpha {args.alpha}, T {args.temperature}",
                ["case", "ms", "vs plain step"], rows)


if __name__ == "__main__":
    main()
