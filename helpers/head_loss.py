"""The fused head loss for CPU float32 training: cross-entropy of x @ weight.T computed block by
block over the vocabulary, with both gradients taken during the forward pass.

`GPT.forward` calls `linear_cross_entropy` in one place (training on the CPU in float32); autocast,
torch.compile and GPUs keep the standard head + F.cross_entropy. Also here: `cross_entropy_sum`, the
loss alone without gradient for evaluation (no (tokens, vocab) logits kept), and knowledge
distillation (`Distill`, passed to `GPT.forward`): fused block by block on the CPU
(`LinearDistillation`), from full logits elsewhere (`distillation_loss`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class Workspace:
    """A scratch buffer kept between training steps, so that the fused head's (tokens, vocab)
    buffer is not a fresh allocation (hundreds of MB of page faults) at every step. Never copied,
    pickled or saved."""

    def __init__(self):
        self.buf: torch.Tensor | None = None

    def get(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        b = self.buf
        if b is None or b.numel() < numel or b.dtype != like.dtype or b.device != like.device:
            self.buf = b = torch.empty(numel, dtype=like.dtype, device=like.device)
        return b[:numel]

    def __deepcopy__(self, memo):
        return Workspace()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.buf = None


class LinearCrossEntropy(torch.autograd.Function):
    """mean cross-entropy(x @ weight.T, targets), ignoring targets of -1, with both gradients
    computed during the forward pass.

    The usual head + F.cross_entropy allocates three (tokens, vocab) float32 tensors per step
    (logits, log-probabilities, their gradient) and sweeps them half a dozen times. Here the
    logits are computed in blocks of the vocabulary into a buffer kept between steps; a first
    sweep takes each block's log-sum-exp while the block is still in cache, a second turns each
    block into its softmax in place and feeds it straight into the two gradient matmuls.
    Same FLOPs; on a 2-core CPU the head's forward + backward takes ~40% less time (the blocked
    matmuls are also faster than one (tokens, vocab) product). Used for training on the CPU in
    float32 (see GPT.forward); autocast and torch.compile keep the standard path."""

    @staticmethod
    def forward(ctx, x, weight, targets, workspace, token_chunk, vocab_chunk):
        n, vocab = x.shape[0], weight.shape[0]
        if n:  # as F.cross_entropy does (a cheap check: this path only runs on the CPU)
            bad = targets[(targets < -1) | (targets >= vocab)]
            if bad.numel():
                raise IndexError(f"Target {int(bad[0])} is out of bounds (vocabulary of {vocab}).")
        valid = targets != -1
        scale = valid.to(x.dtype) / valid.sum()  # 1/n for counted tokens, 0 for ignored ones
        safe = targets.clamp(min=0)
        gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        gw = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        bounds = [(a, min(a + vocab_chunk, vocab)) for a in range(0, vocab, vocab_chunk)]
        loss = x.new_zeros(())
        # loss_i = lse_i - x_i . w[t_i]; d/d logits = softmax - one-hot. The one-hot part is done on
        # the small side: -w[t_i] for x_i's gradient, -x_i added into row t_i of the weight's.
        for s in range(0, n, token_chunk):
            e = min(s + token_chunk, n)
            c, xc, t, sc = e - s, x[s:e], safe[s:e], scale[s:e]
            wt = weight[t]  # (c, C): the target tokens' rows
            space, blocks = workspace.get(c * vocab, x), []
            for a, b in bounds:  # sweep 1: logits block by block, and each block's log-sum-exp
                logits = space[a * c:b * c].view(c, b - a)
                torch.mm(xc, weight[a:b].t(), out=logits)
                blocks.append((logits, torch.logsumexp(logits, dim=1)))
            lse = torch.logsumexp(torch.stack([l for _, l in blocks], dim=1), dim=1)
            loss += ((lse - (xc * wt).sum(1)) * sc).sum()
            xs = xc * sc[:, None]  # the 1/n goes on the small (c, C) side of the gradient matmuls
            for j, ((logits, _), (a, b)) in enumerate(zip(blocks, bounds)):  # sweep 2
                p = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                if gx is not None:
                    torch.mm(p, weight[a:b], out=gx[s:e]) if j == 0 else gx[s:e].addmm_(p, weight[a:b])
                if gw is not None:
                    torch.mm(p.t(), xs, out=gw[a:b]) if s == 0 else gw[a:b].addmm_(p.t(), xs)
            if gx is not None:
                gx[s:e].sub_(wt).mul_(sc[:, None])
            if gw is not None:
                gw.index_add_(0, t, xs, alpha=-1.0)
        ctx.save_for_backward(gx, gw)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        gx, gw = ctx.saved_tensors  # used once: scaled in place, no new (vocab, C) allocation
        return (gx.mul_(grad) if gx is not None else None), (gw.mul_(grad) if gw is not None else None), \
            None, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         workspace: Workspace | None = None, vocab_chunk: int = 2048) -> torch.Tensor:
    """x: (N, C), weight: (V, C), targets: (N,) with -1 ignored -> mean loss, as
    F.cross_entropy(x @ weight.T, targets, ignore_index=-1), computed by LinearCrossEntropy."""
    token_chunk = max(1, 2 ** 28 // weight.shape[0])  # a (tokens, vocab) float32 buffer of at most 1 GiB
    return LinearCrossEntropy.apply(x, weight, targets, workspace or Workspace(), token_chunk, vocab_chunk)


# ---- the loss only, no gradient: evaluation -------------------------------------------------------
@torch.no_grad()
def cross_entropy_sum(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      workspace: Workspace | None = None, token_chunk: int | None = None,
                      vocab_chunk: int = 2048) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropy(x @ weight.T, targets) over targets != -1, their count), without ever
    holding the batch's (tokens, vocab) logits. x: (N, C), weight: (V, C), targets: (N,).

    On the CPU in float32: `token_chunk` tokens at a time (default 2,048: the head's weight is
    read once per chunk) times `vocab_chunk` vocabulary rows, into one (token_chunk, vocab_chunk)
    buffer kept between calls, whose log-sum-exp is taken in place while it is in cache (no copy
    of the block, as torch.logsumexp makes); the target's logit is x . w[t], on the small side.
    Measured for the SmolLM2 child's head: ~12% faster than torch.logsumexp on blocks of a
    (1,365, vocab) buffer; 64-token chunks were 1.7x slower (small matmuls).
    Elsewhere (GPUs, autocast, bfloat16 weights): chunks of at most 256 MiB of logits, F.linear in
    x's dtype, then the log-sum-exp and the sum in float32."""
    vocab = weight.shape[0]
    bad = targets[(targets < -1) | (targets >= vocab)]
    if bad.numel():
        raise IndexError(f"Target {int(bad[0])} is out of bounds (vocabulary of {vocab}).")
    keep = targets != -1
    x, targets = x[keep], targets[keep]  # ignored tokens cost nothing
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    plain = x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    token_chunk = token_chunk or (2048 if plain else max(64, 2 ** 26 // vocab))
    if plain:
        space = (workspace or Workspace()).get(min(token_chunk, x.shape[0]) * min(vocab_chunk, vocab), x)
    for s in range(0, x.shape[0], token_chunk):
        xc, t = x[s:s + token_chunk], targets[s:s + token_chunk]
        if plain:
            c, lse = xc.shape[0], []
            for a in range(0, vocab, vocab_chunk):
                block = space[:c * (min(a + vocab_chunk, vocab) - a)].view(c, -1)
                torch.mm(xc, weight[a:a + vocab_chunk].t(), out=block)
                m = block.amax(dim=1, keepdim=True)
                lse.append(block.sub_(m).exp_().sum(dim=1).log_().add_(m[:, 0]))  # this block's log-sum-exp
            target_logit = (xc * weight[t]).sum(1)
            total += (torch.logsumexp(torch.stack(lse, dim=1), dim=1) - target_logit).sum()
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
    token (student, student at T, teacher at T); sweep 2 turns each block into the gradient
    (1 - alpha) * softmax(z) + alpha * T * (p - q) in place and feeds it to the two matmuls. The
    teacher gets no gradient. Returns (total, ce, kd); only total is differentiable."""

    @staticmethod
    def forward(ctx, x, weight, targets, tx, tweight, alpha, temperature, workspace, token_chunk, vocab_chunk):
        n, vocab = x.shape[0], weight.shape[0]
        if n:
            bad = targets[(targets < -1) | (targets >= vocab)]
            if bad.numel():
                raise IndexError(f"Target {int(bad[0])} is out of bounds (vocabulary of {vocab}).")
        a, T, inv = float(alpha), float(temperature), 1.0 / float(temperature)
        valid = targets != -1
        scale = valid.to(x.dtype) / valid.sum()
        safe = targets.clamp(min=0)
        gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        gw = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        bounds = [(lo, min(lo + vocab_chunk, vocab)) for lo in range(0, vocab, vocab_chunk)]
        ce_sum, kd_sum = x.new_zeros(()), x.new_zeros(())
        for s in range(0, n, token_chunk):
            e = min(s + token_chunk, n)
            c, xc, txc, t, sc = e - s, x[s:e], tx[s:e], safe[s:e], scale[s:e]
            wt = weight[t]
            space = workspace.get(c * (2 * vocab + vocab_chunk), x)
            scratch = space[2 * c * vocab:]
            blocks = []
            for lo, hi in bounds:  # sweep 1: both models' logits, and per block three log-sum-exps
                z = space[lo * c:hi * c].view(c, hi - lo)
                zt = space[(vocab + lo) * c:(vocab + hi) * c].view(c, hi - lo)
                torch.mm(xc, weight[lo:hi].t(), out=z)
                torch.mm(txc, tweight[lo:hi].t(), out=zt)
                if T != 1.0:
                    zt.mul_(inv)  # the teacher only ever appears at temperature T
                    zT = torch.mul(z, inv, out=scratch[:z.numel()].view_as(z))
                blocks.append((z, zt, torch.logsumexp(z, 1), torch.logsumexp(zT, 1) if T != 1.0 else None,
                               torch.logsumexp(zt, 1)))
            lse = torch.logsumexp(torch.stack([b[2] for b in blocks], 1), 1)
            lse_s = torch.logsumexp(torch.stack([b[3] for b in blocks], 1), 1) if T != 1.0 else lse
            lse_t = torch.logsumexp(torch.stack([b[4] for b in blocks], 1), 1)
            ce_sum += ((lse - (xc * wt).sum(1)) * sc).sum()
            # KL(q || p) = sum_v q_v (zt_v - z_v) / T - lse_t + lse_s (zt already divided by T)
            dot = torch.zeros_like(lse)
            xs = xc * sc[:, None]
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
                    torch.mm(g, weight[lo:hi], out=gx[s:e]) if j == 0 else gx[s:e].addmm_(g, weight[lo:hi])
                if gw is not None:
                    torch.mm(g.t(), xs, out=gw[lo:hi]) if s == 0 else gw[lo:hi].addmm_(g.t(), xs)
            kd_sum += ((dot - lse_t + lse_s) * sc).sum() * T * T
            if gx is not None:  # the one-hot part of the hard term, on the small side
                gx[s:e].sub_(wt, alpha=1 - a).mul_(sc[:, None])
            if gw is not None:
                gw.index_add_(0, t, xs, alpha=-(1 - a))
        ctx.save_for_backward(gx, gw)
        ce, kd = ce_sum, kd_sum
        ctx.mark_non_differentiable(ce, kd)
        return (1 - a) * ce + a * kd, ce, kd

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _ce, _kd):
        gx, gw = ctx.saved_tensors
        return (gx.mul_(grad) if gx is not None else None), (gw.mul_(grad) if gw is not None else None), \
            None, None, None, None, None, None, None, None


def linear_distillation(x, weight, targets, teacher_x, teacher_weight, alpha: float, temperature: float,
                        workspace: Workspace | None = None, vocab_chunk: int = 2048):
    """(total, ce, kd) as distillation_loss(x @ weight.T, teacher_x @ teacher_weight.T, ...), computed
    by LinearDistillation without (tokens, vocab) tensors beyond one chunk's buffer."""
    if teacher_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"teacher vocabulary {teacher_weight.shape[0]} != student vocabulary {weight.shape[0]}")
    token_chunk = max(1, 2 ** 27 // weight.shape[0])  # two (tokens, vocab) float32 buffers of at most 512 MiB
    return LinearDistillation.apply(x, weight, targets, teacher_x.detach(), teacher_weight.detach(), alpha,
                                    temperature, workspace or Workspace(), token_chunk, vocab_chunk)
