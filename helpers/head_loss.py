"""The fused head loss for CPU training: cross-entropy of x @ weight.T computed block by block over
the vocabulary, with both gradients taken during the forward pass.

`GPT.forward` calls `linear_cross_entropy` in one place (training on the CPU, in float32 or under
autocast to bfloat16); torch.compile and GPUs keep the standard head + F.cross_entropy. Also here:
`cross_entropy_sum`, the loss alone without gradient for evaluation (no (tokens, vocab) logits
kept), and knowledge distillation (`Distill`, passed to `GPT.forward`): fused block by block on the
CPU (`LinearDistillation`), from full logits elsewhere (`distillation_loss`).

In bfloat16 (`head_dtype`: autocast's dtype, or the weights' own) the vocabulary blocks are
bfloat16 matrix products (float32 accumulation inside the product, rounded to bfloat16 on output,
as any bfloat16 matmul); every log-sum-exp, loss and gradient sum is accumulated in float32, and the
gradients come back in the dtype of x and of the weight (float32 master weights stay float32).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class Workspace:
    """Scratch buffers kept between training steps, so that the fused head's (tokens, vocab)
    buffer is not a fresh allocation (hundreds of MB of page faults) at every step; one per `slot`
    (the bfloat16 logits and a float32 scratch are two). Never copied, pickled or saved."""

    def __init__(self):
        self.bufs: dict[str, torch.Tensor] = {}

    def get(self, numel: int, dtype: torch.dtype, device, slot: str = "main") -> torch.Tensor:
        b = self.bufs.get(slot)
        if b is None or b.numel() < numel or b.dtype != dtype or b.device != torch.device(device):
            self.bufs[slot] = b = torch.empty(numel, dtype=dtype, device=device)
        return b[:numel]

    @property
    def buf(self) -> torch.Tensor | None:
        """The main buffer (the logits blocks)."""
        return self.bufs.get("main")

    def cast(self, t: torch.Tensor, dtype: torch.dtype, slot: str) -> torch.Tensor:
        """t in dtype: t itself, or a copy into this workspace's buffer `slot`."""
        return t if t.dtype == dtype else self.get(t.numel(), dtype, t.device, slot).view(t.shape).copy_(t)

    def __deepcopy__(self, memo):
        return Workspace()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.bufs = {}


def amp_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes matrix products in on this device type; None outside autocast."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def head_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype of the head's matrix products: autocast's, else the wider of x's and the weight's."""
    return amp_dtype(x.device.type) or torch.promote_types(x.dtype, weight.dtype)


def check_targets(targets: torch.Tensor, vocab: int) -> None:
    """An IndexError as F.cross_entropy's for a target outside the vocabulary (-1 is ignored)."""
    bad = targets[(targets < -1) | (targets >= vocab)]
    if bad.numel():
        raise IndexError(f"Target {int(bad[0])} is out of bounds (vocabulary of {vocab}).")


def exp_rows_(work: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Turns each row of work into exp(scale * (row - row max)) in place; returns (the log-sum-exp of
    scale * row, scale * row max), both float32. One sweep over a block while it is in cache."""
    m = work.amax(dim=1, keepdim=True)
    work.sub_(m)
    if scale != 1.0:
        work.mul_(scale)
    total = work.exp_().sum(dim=1, dtype=torch.float32)
    m = m[:, 0].float() * scale
    return total.log_().add_(m), m


def copy_into(scratch: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """block copied into the float32 buffer scratch (at least block.numel()), as block's shape.
    bfloat16 blocks are worked on in float32 this way: exact differences, float32 exponentials and
    sums; on the CPU a copy there and back costs less than one op that mixes the two dtypes."""
    return scratch[:block.numel()].view(block.shape).copy_(block)


def target_logits(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x_i . rows_i for each row, in float32 from x's dtype, rounded to it as the head's own matmul
    rounds its logits: the target's logit exactly as the blocks saw it."""
    return (x.float() * rows.float()).sum(1).to(x.dtype).float()


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool, tmp: torch.Tensor) -> None:
    """out = a @ b (first) or out += a @ b: the product in a's dtype, the sum in out's; `tmp` holds
    the product when the two differ (bfloat16 products into float32 gradients)."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out) if first else out.addmm_(a, b)
    else:
        prod = torch.mm(a, b, out=tmp[:out.numel()].view(out.shape))
        out.copy_(prod) if first else out.add_(prod)


class LinearCrossEntropy(torch.autograd.Function):
    """mean cross-entropy(x @ weight.T, targets), ignoring targets of -1, with both gradients
    computed during the forward pass.

    The usual head + F.cross_entropy allocates three (tokens, vocab) float32 tensors per step
    (logits, log-probabilities, their gradient) and sweeps them half a dozen times. Here the
    logits are computed in blocks of the vocabulary into a buffer kept between steps; a first
    sweep takes each block's log-sum-exp while the block is still in cache (`exp_rows_`, which
    leaves exp(logits - row max) behind), a second scales each block into its softmax in place and
    feeds it straight into the two gradient matmuls. Same FLOPs; on a 2-core CPU the head's forward
    + backward takes ~40% less time (the blocked matmuls are also faster than one (tokens, vocab)
    product). `compute` is the matmuls' dtype (float32, or bfloat16: see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, targets, workspace, token_chunk, vocab_chunk, compute=None):
        n, vocab = x.shape[0], weight.shape[0]
        if n:  # as F.cross_entropy does (a cheap check: this path only runs on the CPU)
            check_targets(targets, vocab)
        compute = compute or torch.promote_types(x.dtype, weight.dtype)
        valid = targets != -1
        scale = valid.float() / valid.sum()  # 1/n for counted tokens, 0 for ignored ones
        safe = targets.clamp(min=0)
        gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        gw = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        bounds = [(a, min(a + vocab_chunk, vocab)) for a in range(0, vocab, vocab_chunk)]
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        xl, wl = x.to(compute), workspace.cast(weight, compute, "weight")  # the matmuls' operands
        # loss_i = lse_i - x_i . w[t_i]; d/d logits = softmax - one-hot. The one-hot part is done on
        # the small side: -w[t_i] for x_i's gradient, -x_i added into row t_i of the weight's.
        with torch.autocast(x.device.type, enabled=False):  # the dtypes here are chosen by hand
            for s in range(0, n, token_chunk):
                e = min(s + token_chunk, n)
                c, xc, t, sc = e - s, xl[s:e], safe[s:e], scale[s:e]
                space = workspace.get(c * vocab + max(c, vocab_chunk) * x.shape[1], compute, x.device)
                tmp, blocks = space[c * vocab:], []
                scratch = None if compute == torch.float32 else \
                    workspace.get(c * vocab_chunk, torch.float32, x.device, "scratch")
                for a, b in bounds:  # sweep 1: logits block by block, and each block's log-sum-exp
                    logits = space[a * c:b * c].view(c, b - a)
                    torch.mm(xc, wl[a:b].t(), out=logits)
                    work = logits if scratch is None else copy_into(scratch, logits)
                    blocks.append((logits, *exp_rows_(work)))  # the block now holds exp(logits - row max)
                    if work is not logits:
                        logits.copy_(work)
                lse = torch.logsumexp(torch.stack([l for _, l, _ in blocks], dim=1), dim=1)
                loss += ((lse - target_logits(xc, wl[t])) * sc).sum()
                xs = (x[s:e].float() * sc[:, None])  # the 1/n goes on the small (c, C) side of the gradient matmuls
                xsl = xs.to(compute)
                for j, ((p, _, m), (a, b)) in enumerate(zip(blocks, bounds)):  # sweep 2
                    p.mul_((m - lse).exp_().to(p.dtype)[:, None])  # exp(logits - m) * exp(m - lse): the softmax
                    if gx is not None:
                        mm_into(gx[s:e], p, wl[a:b], j == 0, tmp)
                    if gw is not None:
                        mm_into(gw[a:b], p.t(), xsl, s == 0, tmp)
                if gx is not None:
                    gx[s:e].sub_(weight[t]).mul_(sc[:, None])
                if gw is not None:
                    gw.index_add_(0, t, xs.to(gw.dtype), alpha=-1.0)
        ctx.save_for_backward(gx, gw)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        gx, gw = ctx.saved_tensors  # used once: scaled in place, no new (vocab, C) allocation
        return (gx.mul_(grad) if gx is not None else None), (gw.mul_(grad) if gw is not None else None), \
            None, None, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         workspace: Workspace | None = None, vocab_chunk: int = 2048) -> torch.Tensor:
    """x: (N, C), weight: (V, C), targets: (N,) with -1 ignored -> mean loss (float32), as
    F.cross_entropy(x @ weight.T, targets, ignore_index=-1) with the products in head_dtype(x, weight),
    computed by LinearCrossEntropy."""
    token_chunk = max(1, 2 ** 28 // weight.shape[0])  # a (tokens, vocab) buffer of at most 1 GiB in float32
    return LinearCrossEntropy.apply(x, weight, targets, workspace or Workspace(), token_chunk, vocab_chunk,
                                    head_dtype(x, weight))


# ---- the loss only, no gradient: evaluation -------------------------------------------------------
@torch.no_grad()
def cross_entropy_sum(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      workspace: Workspace | None = None, token_chunk: int | None = None,
                      vocab_chunk: int = 2048) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropy(x @ weight.T, targets) over targets != -1, as a float32 scalar; their
    count), without ever holding the batch's (tokens, vocab) logits. x: (N, C), weight: (V, C),
    targets: (N,).

    On the CPU in float32 or bfloat16 (head_dtype: autocast's, else x's and weight's): `token_chunk`
    tokens at a time (default 2,048: the head's weight is read once per chunk) times `vocab_chunk`
    vocabulary rows, into one (token_chunk, vocab_chunk) buffer kept between calls, whose
    log-sum-exp is taken while it is in cache (`exp_rows_`: in place in float32, no copy of the
    block as torch.logsumexp makes; a bfloat16 block through a float32 scratch, `copy_into`, so
    that the exponentials are not rounded to bfloat16 before the sum); the target's logit is
    x . w[t] (`target_logits`), on the small side. Measured for the SmolLM2 child's head in
    float32: ~12% faster than torch.logsumexp on blocks of a (1,365, vocab) buffer; 64-token chunks
    were 1.7x slower (small matmuls). In bfloat16: bench/bf16.py (BENCHMARKS.md).
    Elsewhere (GPUs, float16): chunks of at most 256 MiB of logits, F.linear in x's dtype, then
    the log-sum-exp and the sum in float32."""
    vocab = weight.shape[0]
    check_targets(targets, vocab)
    keep = targets != -1
    x, targets = x[keep], targets[keep]  # ignored tokens cost nothing
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    compute = head_dtype(x, weight)
    blocked = x.device.type == "cpu" and compute in (torch.float32, torch.bfloat16)
    token_chunk = token_chunk or (2048 if blocked else max(64, 2 ** 26 // vocab))
    x = x.to(compute)
    if blocked:
        workspace = workspace or Workspace()
        weight = workspace.cast(weight, compute, "weight")
        space = workspace.get(min(token_chunk, x.shape[0]) * min(vocab_chunk, vocab), compute, x.device)
        # bfloat16 blocks: exp(logits - max) in a float32 scratch, not rounded to bfloat16 before the sum
        scratch = None if compute == torch.float32 else \
            workspace.get(space.numel(), torch.float32, x.device, "scratch")
    else:
        weight = weight.to(compute)
    with torch.autocast(x.device.type, enabled=False):
        for s in range(0, x.shape[0], token_chunk):
            xc, t = x[s:s + token_chunk], targets[s:s + token_chunk]
            if blocked:
                c, lse = xc.shape[0], []
                for a in range(0, vocab, vocab_chunk):
                    block = space[:c * (min(a + vocab_chunk, vocab) - a)].view(c, -1)
                    torch.mm(xc, weight[a:a + vocab_chunk].t(), out=block)
                    lse.append(exp_rows_(block if scratch is None else copy_into(scratch, block))[0])
                total += (torch.logsumexp(torch.stack(lse, dim=1), dim=1) - target_logits(xc, weight[t])).sum()
            else:
                logits = F.linear(xc, weight).float()
                total += (torch.logsumexp(logits, dim=1) - logits.gather(1, t[:, None])[:, 0]).sum()
    return total, int(x.shape[0])


# ---- knowledge distillation ---------------------------------------------------------------------
# loss = (1 - alpha) * CE(z, t) + alpha * T^2 * KL(q || p), with q = softmax(z_teacher / T) and
# p = softmax(z / T), both means over the tokens whose target is not -1 (Hinton et al. 2015; the T^2
# keeps the soft term's gradient, (alpha * T) * (p - q), on the scale of the hard one).

class Distill:
    """What the student's forward pass needs to distil one batch: the teacher's final hidden
    states (B, T, C_teacher, taken without gradient) and its head (vocab, C_teacher). After the
    loss is computed, `parts` holds (ce, kd), detached, for logging. (A plain class, not a
    dataclass: DistributedDataParallel would rebuild a dataclass argument and lose `parts`.)"""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, alpha: float, temperature: float):
        self.hidden, self.weight, self.alpha, self.temperature = hidden, weight, alpha, temperature
        self.parts: tuple | None = None

    def loss(self, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, workspace: Workspace | None,
             fused: bool) -> torch.Tensor:
        """The total loss of the student's final hidden states x (B, T, C) under head `weight`."""
        x, h, t = x.reshape(-1, x.size(-1)), self.hidden.reshape(-1, self.hidden.size(-1)), targets.reshape(-1)
        if fused:
            total, ce, kd = linear_distillation(x, weight, t, h, self.weight, self.alpha, self.temperature, workspace)
        else:
            total, ce, kd = distillation_loss(F.linear(x, weight), F.linear(h, self.weight), t,
                                              self.alpha, self.temperature)
        self.parts = (ce.detach(), kd.detach())
        return total


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, alpha: float,
                      temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, ce, kd) from full logits (N, V) of student and teacher: the plain path (GPUs, autocast,
    torch.compile), computed in float32."""
    wide = torch.promote_types(logits.dtype, torch.float32)  # half precision is widened, float64 kept
    z, zt = logits.to(wide), teacher_logits.to(wide)
    ce = F.cross_entropy(z, targets, ignore_index=-1)
    keep = targets != -1
    log_p = F.log_softmax(z[keep] / temperature, dim=-1)
    log_q = F.log_softmax(zt[keep] / temperature, dim=-1)
    kd = temperature ** 2 * F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")
    return (1 - alpha) * ce + alpha * kd, ce, kd


class LinearDistillation(torch.autograd.Function):
    """The distillation loss of x @ weight.T against the teacher's tx @ tweight.T, computed block by
    block as LinearCrossEntropy computes cross-entropy: the student's and the teacher's logits for a
    chunk of tokens go into one buffer kept between steps; sweep 1 takes three log-sum-exps per
    token (student, student at T, teacher at T; in float32, each through a float32 copy of the
    block: `copy_into`, `exp_rows_`); sweep 2 turns each block into the gradient (1 - alpha) * softmax(z) + alpha * T *
    (p - q) in place and feeds it to the two matmuls. The teacher gets no gradient. Returns (total,
    ce, kd), float32; only total is differentiable. `compute`: as LinearCrossEntropy's."""

    @staticmethod
    def forward(ctx, x, weight, targets, tx, tweight, alpha, temperature, workspace, token_chunk, vocab_chunk,
                compute=None):
        n, vocab = x.shape[0], weight.shape[0]
        if n:
            check_targets(targets, vocab)
        compute = compute or torch.promote_types(x.dtype, weight.dtype)
        a, T, inv = float(alpha), float(temperature), 1.0 / float(temperature)
        valid = targets != -1
        scale = valid.float() / valid.sum()
        safe = targets.clamp(min=0)
        gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        gw = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        bounds = [(lo, min(lo + vocab_chunk, vocab)) for lo in range(0, vocab, vocab_chunk)]
        ce_sum, kd_sum = (torch.zeros((), dtype=torch.float32, device=x.device) for _ in range(2))
        xl, txl = x.to(compute), tx.to(compute)
        wl, twl = workspace.cast(weight, compute, "weight"), workspace.cast(tweight, compute, "teacher_weight")
        with torch.autocast(x.device.type, enabled=False):  # the dtypes here are chosen by hand
            for s in range(0, n, token_chunk):
                e = min(s + token_chunk, n)
                c, xc, txc, t, sc = e - s, xl[s:e], txl[s:e], safe[s:e], scale[s:e]
                space = workspace.get(2 * c * vocab + max(c, vocab_chunk) * x.shape[1], compute, x.device)
                tmp = space[2 * c * vocab:]
                scratch = workspace.get(c * vocab_chunk, torch.float32, x.device, "scratch")
                blocks = []
                for lo, hi in bounds:  # sweep 1: both models' logits, and per block three log-sum-exps
                    z = space[lo * c:hi * c].view(c, hi - lo)
                    zt = space[(vocab + lo) * c:(vocab + hi) * c].view(c, hi - lo)
                    torch.mm(xc, wl[lo:hi].t(), out=z)
                    torch.mm(txc, twl[lo:hi].t(), out=zt)
                    if T != 1.0:
                        zt.mul_(inv)  # the teacher only ever appears at temperature T
                    blocks.append((z, zt, exp_rows_(copy_into(scratch, z))[0],
                                   exp_rows_(copy_into(scratch, z), inv)[0] if T != 1.0 else None,
                                   exp_rows_(copy_into(scratch, zt))[0]))
                lse = torch.logsumexp(torch.stack([b[2] for b in blocks], 1), 1)
                lse_s = torch.logsumexp(torch.stack([b[3] for b in blocks], 1), 1) if T != 1.0 else lse
                lse_t = torch.logsumexp(torch.stack([b[4] for b in blocks], 1), 1)
                ce_sum += ((lse - target_logits(xc, wl[t])) * sc).sum()
                # KL(q || p) = sum_v q_v (zt_v - z_v) / T - lse_t + lse_s (zt already divided by T)
                dot = torch.zeros_like(lse)
                xs = x[s:e].float() * sc[:, None]
                xsl = xs.to(compute)
                for j, ((z, zt, *_), (lo, hi)) in enumerate(zip(blocks, bounds)):  # sweep 2
                    d = torch.sub(zt, z, alpha=inv, out=scratch[:z.numel()].view_as(z))
                    q = zt.sub_(lse_t[:, None]).exp_()  # teacher probabilities at T, in place
                    dot += d.mul_(q).sum(1)
                    if T == 1.0:  # (1 - a) p + a (p - q) = p - a q
                        g = z.sub_(lse[:, None]).exp_().sub_(q, alpha=a)
                    else:
                        pT = torch.mul(z, inv, out=scratch[:z.numel()].view_as(z)).sub_(lse_s[:, None]).exp_()
                        g = z.sub_(lse[:, None]).exp_().mul_(1 - a).add_(pT, alpha=a * T).sub_(q, alpha=a * T)
                    if gx is not None:
                        mm_into(gx[s:e], g, wl[lo:hi], j == 0, tmp)
                    if gw is not None:
                        mm_into(gw[lo:hi], g.t(), xsl, s == 0, tmp)
                kd_sum += ((dot - lse_t + lse_s) * sc).sum() * T * T
                if gx is not None:  # the one-hot part of the hard term, on the small side
                    gx[s:e].sub_(weight[t], alpha=1 - a).mul_(sc[:, None])
                if gw is not None:
                    gw.index_add_(0, t, xs.to(gw.dtype), alpha=-(1 - a))
        ctx.save_for_backward(gx, gw)
        ce, kd = ce_sum, kd_sum
        ctx.mark_non_differentiable(ce, kd)
        return (1 - a) * ce + a * kd, ce, kd

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _ce, _kd):
        gx, gw = ctx.saved_tensors
        return (gx.mul_(grad) if gx is not None else None), (gw.mul_(grad) if gw is not None else None), \
            None, None, None, None, None, None, None, None, None


def linear_distillation(x, weight, targets, teacher_x, teacher_weight, alpha: float, temperature: float,
                        workspace: Workspace | None = None, vocab_chunk: int = 2048):
    """(total, ce, kd) as distillation_loss(x @ weight.T, teacher_x @ teacher_weight.T, ...), computed
    by LinearDistillation without (tokens, vocab) tensors beyond one chunk's buffer."""
    if teacher_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"teacher vocabulary {teacher_weight.shape[0]} != student vocabulary {weight.shape[0]}")
    token_chunk = max(1, 2 ** 27 // weight.shape[0])  # two (tokens, vocab) float32 buffers of at most 512 MiB
    return LinearDistillation.apply(x, weight, targets, teacher_x.detach(), teacher_weight.detach(), alpha,
                                    temperature, workspace or Workspace(), token_chunk, vocab_chunk,
                                    head_dtype(x, weight))
