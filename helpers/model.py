"""One decoder-only transformer that is exactly GPT-2, Llama, Qwen2, Qwen3 or Mistral, chosen by its config.

Reading order: config, norms and rotary positions, attention, MLP, block, the model.
Module names follow nanoGPT / Hugging Face GPT-2 (`transformer.h.0.attn.c_attn`, ...) so
that GPT-2 and nanoGPT weights load by name. The Llama variant keeps those names: q, k and v
are stored as one matrix in `c_attn`, gate and up as one in `mlp.c_fc` (computed as matmuls on
their row blocks), and `helpers.formats.families` holds the explicit key maps to and from Hugging Face and
GGUF. Qwen2 adds biases to q, k and v; Qwen3 a per-head RMSNorm on q and k; Mistral a sliding window.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from helpers.errors import ConfigError
from helpers.head_loss import Workspace, amp_dtype, cross_entropy_sum, head_dtype, linear_cross_entropy


FAMILIES = ("gpt2", "llama", "qwen2", "qwen3", "mistral")


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest context; size of the learned position table
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None  # None: same as n_head; fewer: grouped-query attention
    intermediate_size: int | None = None  # MLP width; None: 4 * n_embd
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms (GPT-2: True, Llama: False)
    norm: str = "layernorm"  # "layernorm" (GPT-2) or "rmsnorm" (Llama)
    norm_eps: float = 1e-5
    pos: str = "learned"  # "learned" position table (GPT-2) or "rope" (Llama)
    rope_base: float = 10000.0
    mlp: str = "gelu"  # "gelu" (tanh approximation, GPT-2) or "swiglu" (Llama)
    tie_embeddings: bool = True  # output head shares the token embedding matrix
    # families beyond GPT-2 and Llama
    family: str | None = None  # "gpt2", "llama", "qwen2", "qwen3", "mistral"; None: from pos
    head_dim: int | None = None  # None: n_embd // n_head (Qwen3 uses wider heads)
    qkv_bias: bool = False  # biases on the q, k, v projections only (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head of q and k, before RoPE (Qwen3)
    sliding_window: int | None = None  # each token sees itself and the window - 1 before it (Mistral)

    def __post_init__(self):
        kv = self.n_head if self.n_kv_head is None else self.n_kv_head
        if min(self.n_layer, self.n_head, kv) < 1:  # checked before anything divides by them
            raise ConfigError(f"GPTConfig: n_layer, n_head and n_kv_head must be at least 1, got {self.n_layer}, "
                              f"{self.n_head}, {self.n_kv_head}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        if self.head_dim is None:
            self.head_dim = self.n_embd // self.n_head
        if self.family is None:
            self.family = "llama" if self.pos == "rope" else "gpt2"
        checks = [
            (self.norm in ("layernorm", "rmsnorm"), f"norm={self.norm!r}: use 'layernorm' or 'rmsnorm'"),
            (self.pos in ("learned", "rope"), f"pos={self.pos!r}: use 'learned' or 'rope'"),
            (self.mlp in ("gelu", "swiglu"), f"mlp={self.mlp!r}: use 'gelu' or 'swiglu'"),
            (self.n_embd % self.n_head == 0 or self.head_dim != self.n_embd // self.n_head,
             f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}"),
            (self.family in FAMILIES, f"family={self.family!r}: use one of {FAMILIES}"),
            (self.sliding_window is None or self.sliding_window >= 1, "sliding_window must be at least 1"),
            (self.n_head % self.n_kv_head == 0, f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"GPTConfig: {message}")

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"GPTConfig: unknown fields {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def llama_config(**kw) -> GPTConfig:
    """A GPTConfig with Llama's choices filled in (RMSNorm, RoPE, SwiGLU, no biases)."""
    base = dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, norm_eps=1e-6)
    return GPTConfig(**{**base, **kw})


def in_place_ok(x: torch.Tensor, dtypes: tuple = (torch.float32,)) -> bool:
    """Whether the forward may take its fewer-pass, in-place paths for x: no autograd graph to keep,
    on the CPU, x in one of `dtypes` (RoPE and SwiGLU also take bfloat16, as under autocast; RMSNorm
    only float32). Together (RMSNorm, RoPE, SwiGLU) they made the SmolLM2 child's no-grad forward
    ~7% faster on a 2-core CPU in float32 (BENCHMARKS.md); training and GPUs (which fuse such ops)
    keep the plain ops."""
    return not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype in dtypes


BF16_TOO = (torch.float32, torch.bfloat16)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm; without autograd, on the CPU in float32, in three passes over x (its norm, the
    scale, the weight) instead of F.rms_norm's five, measured 1.7x faster for the SmolLM2 child."""

    def forward(self, x):
        if not in_place_ok(x):
            return super().forward(x)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        scale = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        return (x * scale).mul_(self.weight)


def to_amp(t: torch.Tensor | None) -> torch.Tensor | None:
    """t in autocast's dtype while autocast is on (else t): cast once, not by autocast at each matmul
    that reads it (a norm's output read by q, k and v; a weight stored as one matrix and used as
    row blocks, whose gradient then comes back as one cast of the whole, not one per block)."""
    low = None if t is None else amp_dtype(t.device.type)
    return t if low is None else t.to(low)


def make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(cfg: GPTConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (block_size, head_dim), laid out for `rotate_half` (Hugging Face's)."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
    t = torch.arange(cfg.block_size, dtype=torch.float32, device=device)
    angles = torch.outer(t, inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hd)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, nh, T, hd); cos/sin: (T, hd). Rotates the two halves of each head as one complex pair.
    half = x.shape[-1] // 2
    # where no graph is kept, the same sums without the rotated copy: 2x faster
    if in_place_ok(x, BF16_TOO) and cos.dtype == x.dtype:
        out = x * cos
        out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
        out[..., half:].addcmul_(x[..., :half], sin[..., half:])
        return out
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated to max_len positions."""

    def __init__(self, cfg: GPTConfig, batch_size: int, device, dtype, max_len: int | None = None):
        self.max_len = min(cfg.block_size, max_len or cfg.block_size)
        shape = (batch_size, cfg.n_kv_head, self.max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.pos = 0  # number of positions already stored


def attention_mask(T: int, start: int, device, window: int | None = None) -> torch.Tensor | None:
    """Which keys the T new queries at positions start.. may see, as a (T, start + T) boolean mask:
    causal (offset by a cached prefix) and, with a sliding window, only the last `window` positions.
    None where SDPA needs none: a chunk from position 0 (is_causal) or one token (sees all)."""
    if (start == 0 or T == 1) and (window is None or start + T <= window):
        return None
    q_pos = torch.arange(start, start + T, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(start + T, device=device)[None, :]  # (1, start + T)
    mask = k_pos <= q_pos
    return mask if window is None else mask & (k_pos > q_pos - window)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        qkv_out = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, qkv_out, bias=cfg.bias or cfg.qkv_bias)
        self.c_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        self.qk_norm, self.window = cfg.qk_norm, cfg.sliding_window
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.dropout = cfg.dropout

    def _split(self, t):
        q, kv = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        return t.split([q, kv, kv], dim=0) if t is not None else (None, None, None)

    def heads(self, x, rope=None, start: int = 0):
        """q (B, nh, T, hd), k and v (B, nkv, T, hd) of x (B, T, C) at positions start.., rotated."""
        B, T, _ = x.shape
        if isinstance(self.c_attn, nn.Linear):
            # q, k and v are stored as one matrix (one tensor to load and save) but computed as three
            # matmuls on its row blocks: contiguous outputs make RoPE and attention's backward ~5% faster.
            weights, biases = self._split(to_amp(self.c_attn.weight)), self._split(to_amp(self.c_attn.bias))
            q, k, v = (F.linear(x, w, b) for w, b in zip(weights, biases))
        else:  # with LoRA adapters (helpers.lora) its .weight is the frozen base alone: call it whole
            q_size, kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
            q, k, v = self.c_attn(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope[0][start:start + T], rope[1][start:start + T]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def forward(self, x, rope=None, cache: KVCache | None = None, layer: int = 0):
        B, T, _ = x.shape
        start = cache.pos if cache is not None else 0
        q, k, v = self.heads(x, rope, start)
        if cache is not None:
            cache.k[layer][:, :, start:start + T] = k
            cache.v[layer][:, :, start:start + T] = v
            k, v = cache.k[layer][:, :, :start + T], cache.v[layer][:, :, :start + T]
        mask = attention_mask(T, start, x.device, self.window)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)  # (B, T, nh * hd)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        width = cfg.intermediate_size
        self.c_fc = nn.Linear(cfg.n_embd, 2 * width if self.swiglu else width, bias=cfg.bias)
        self.c_proj = nn.Linear(width, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        if self.swiglu:
            # gate and up are stored as one matrix but computed as two matmuls on its row blocks:
            # contiguous outputs, measured ~2% faster for the whole no-grad forward than one
            # matmul and a split, and no slower in training. split, not slicing: the gradients of
            # the two halves are concatenated, not each written into a zero matrix of the whole
            if isinstance(self.c_fc, nn.Linear):
                (w_gate, w_up), b = to_amp(self.c_fc.weight).chunk(2), to_amp(self.c_fc.bias)
                b_gate, b_up = b.chunk(2) if b is not None else (None, None)
                gate, up = F.linear(x, w_gate, b_gate), F.linear(x, w_up, b_up)
            else:  # with LoRA adapters (helpers.lora): called whole, as c_attn
                gate, up = self.c_fc(x).chunk(2, dim=-1)
            h = F.silu(gate, inplace=True).mul_(up) if in_place_ok(gate, BF16_TOO) else F.silu(gate) * up
        else:
            h = F.gelu(self.c_fc(x), approximate="tanh")
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope=None, cache=None, layer=0):
        # the residual stream x stays in the weights' dtype (float32 under autocast); the branches
        # compute in autocast's dtype and are added back into it
        x = x + self.attn(to_amp(self.ln_1(x)), rope, cache, layer)
        return x + self.mlp(to_amp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        modules = dict(wte=nn.Embedding(cfg.vocab_size, cfg.n_embd), drop=nn.Dropout(cfg.dropout),
                       h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)), ln_f=make_norm(cfg))
        if cfg.pos == "learned":
            modules["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        if cfg.pos == "rope":  # on the CPU even when built on the meta device (the loaders'): .to() moves them
            cos, sin = rope_tables(cfg, device="cpu")
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.provenance: dict = {}  # where the weights came from; written to checkpoint sidecars
        self._workspace = Workspace()  # the fused training loss's scratch buffer
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def embed(self, idx, start: int = 0):
        """(x, rope): the token (and learned position) embeddings of idx (B, T) at positions
        start.., and the rotary tables the blocks take (None for learned positions)."""
        T = idx.size(1)
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size={self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.pos == "learned":
            return x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device)), None
        low = amp_dtype(idx.device.type)  # under autocast, q and k come in its dtype: so do the tables
        return x, (self.rope_cos, self.rope_sin) if low is None else (self.rope_cos.to(low), self.rope_sin.to(low))

    def hidden(self, idx):
        """The final hidden states (B, T, C) of idx (B, T), after ln_f: what the head reads. The
        loss-only evaluation and the teacher of distillation start here (helpers.head_loss)."""
        x, rope = self.embed(idx)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = self._run_block(block, x, rope, None, i)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, cache: KVCache | None = None, last_only: bool = False, distill=None):
        """Returns (logits, loss). idx: (B, T) token ids; targets: (B, T) or None (-1 is ignored).
        When training on the CPU (float32, or bfloat16 under autocast) the loss comes from the fused
        head (`linear_cross_entropy`) and logits is None; evaluation always returns logits. With `distill`
        (a helpers.head_loss.Distill) the loss is distillation's total and logits is None."""
        start = cache.pos if cache is not None else 0
        x, rope = self.embed(idx, start)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = self._run_block(block, x, rope, cache, i)
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.pos += idx.size(1)
        if targets is None:
            return self.lm_head(x[:, -1:] if last_only else x), None
        if distill is not None:
            return None, distill.loss(x, self.lm_head.weight, targets, self._workspace, self._fused_loss(x))
        if self._fused_loss(x):  # training on the CPU: no logits are materialised (logits is None)
            return None, linear_cross_entropy(x.view(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                              self._workspace)
        logits = self.lm_head(x)  # (B, T, vocab)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def loss_sum(self, idx, targets) -> tuple[torch.Tensor, int]:
        """(sum of the next-token losses of idx (B, T) against targets (B, T), -1 ignored; their
        count) with only the loss computed: no (tokens, vocab) logits kept. What evaluation runs
        (train.estimate_loss, evaluate.val_loss_full); see head_loss.cross_entropy_sum."""
        return cross_entropy_sum(self.hidden(idx).flatten(0, 1), self.lm_head.weight, targets.flatten(), self._workspace)

    fused_loss = True  # set False on an instance to get logits and the plain loss while training
    grad_checkpointing = False  # True (helpers.startup): blocks recomputed in the backward pass

    def _run_block(self, block, x, rope, cache, i):
        """One block; with grad_checkpointing, while a graph is kept, its activations are not stored
        but recomputed in the backward pass (the RNG replayed: dropout draws the same masks)."""
        if self.grad_checkpointing and cache is None and torch.is_grad_enabled():
            return checkpoint(block, x, rope, None, i, use_reentrant=False)
        return block(x, rope, cache, i)

    def _fused_loss(self, x: torch.Tensor) -> bool:
        return (self.fused_loss and x.device.type == "cpu" and torch.is_grad_enabled() and x.requires_grad
                and head_dtype(x, self.lm_head.weight) in (torch.float32, torch.bfloat16)
                and not torch.compiler.is_compiling())

    # ---- sizes and cost -------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, counting a tied head once. non_embedding drops token and position tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel()
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 per weight used in a matmul, plus
        attention scores and values, 12 * n_layer * n_head * head_dim * seq_len (PaLM appendix B)."""
        cfg, T = self.config, seq_len or self.config.block_size
        matmul_params = self.num_params(non_embedding=True) + cfg.vocab_size * cfg.n_embd  # head
        return 6 * matmul_params + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T

    # ---- sampling -------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True):
        """Extend idx (B, T) by max_new_tokens. temperature 0 is greedy. With use_cache the keys and
        values of past tokens are kept (KVCache); once the context fills block_size it falls back
        to recomputing the cropped window, exactly as without the cache."""
        was_training = self.training
        self.eval()
        bs = self.config.block_size
        cache = None
        if use_cache and idx.size(1) < bs:
            cache = KVCache(self.config, idx.size(0), idx.device, self.transformer.wte.weight.dtype,
                            max_len=idx.size(1) + max_new_tokens)
            logits, _ = self(idx, cache=cache, last_only=True)
        for i in range(max_new_tokens):
            if cache is None:
                logits, _ = self(idx[:, -bs:], last_only=True)
            next_id = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            idx = torch.cat([idx, next_id], dim=1)
            if cache is not None and i < max_new_tokens - 1:
                if cache.pos >= cache.max_len:
                    cache = None  # window full: the loop recomputes from here on
                else:
                    logits, _ = self(next_id, cache=cache, last_only=True)
        self.train(was_training)
        return idx


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token id per row from logits (B, vocab)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked before it already hold top_p of the mass
        drop = probs.cumsum(dim=-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
