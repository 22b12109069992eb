"""One weight-name table per model family, shared by the Hugging Face and GGUF loaders and by
export: our name -> the names it is made of in each format (row blocks concatenated in order).

Our modules keep nanoGPT's names (`transformer.h.{i}.attn.c_attn`, ...): q, k and v live in one
matrix `c_attn`, gate and up in one `mlp.c_fc`.
Floor "formats": uses the errors only.
"""
from __future__ import annotations

from helpers.errors import CheckpointError

# GPT-2: Hugging Face names are ours without the `transformer.` prefix; these four are Conv1D
# layers there, stored as (in, out), so they are transposed on the way in and out.
GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# Llama: ours (under transformer.h.{i}.) -> [(Hugging Face under model.layers.{i}., GGUF under blk.{i}.)]
LLAMA_LAYER = {
    "ln_1.weight": [("input_layernorm.weight", "attn_norm.weight")],
    "attn.c_attn.weight": [("self_attn.q_proj.weight", "attn_q.weight"), ("self_attn.k_proj.weight", "attn_k.weight"),
                           ("self_attn.v_proj.weight", "attn_v.weight")],
    "attn.c_proj.weight": [("self_attn.o_proj.weight", "attn_output.weight")],
    "ln_2.weight": [("post_attention_layernorm.weight", "ffn_norm.weight")],
    "mlp.c_fc.weight": [("mlp.gate_proj.weight", "ffn_gate.weight"), ("mlp.up_proj.weight", "ffn_up.weight")],
    "mlp.c_proj.weight": [("mlp.down_proj.weight", "ffn_down.weight")],
}
# Qwen2 adds biases to q, k and v; Qwen3 an RMSNorm over each head of q and k. Mistral is Llama's table.
QWEN2_QKV_BIAS = {"attn.c_attn.bias": [("self_attn.q_proj.bias", "attn_q.bias"), ("self_attn.k_proj.bias", "attn_k.bias"),
                                       ("self_attn.v_proj.bias", "attn_v.bias")]}
QWEN3_QK_NORM = {"attn.q_norm.weight": [("self_attn.q_norm.weight", "attn_q_norm.weight")],
                 "attn.k_norm.weight": [("self_attn.k_norm.weight", "attn_k_norm.weight")]}
# Outside the blocks: ours -> (Hugging Face, GGUF)
LLAMA_TOP = {"transformer.wte.weight": ("model.embed_tokens.weight", "token_embd.weight"),
             "transformer.ln_f.weight": ("model.norm.weight", "output_norm.weight"),
             "lm_head.weight": ("lm_head.weight", "output.weight")}
HF, GGUF = 0, 1  # column of each format in the tables


def layer_table(cfg) -> dict[str, list[tuple[str, str]]]:
    """The per-block table of a Llama-like config (Llama, Mistral, Qwen2, Qwen3)."""
    table = dict(LLAMA_LAYER)
    if cfg.qkv_bias:
        table.update(QWEN2_QKV_BIAS)
    if cfg.qk_norm:
        table.update(QWEN3_QK_NORM)
    return table


def top_table(cfg) -> dict[str, tuple[str, str]]:
    """The table outside the blocks; a tied head has no weight of its own."""
    return {k: v for k, v in LLAMA_TOP.items() if not (k == "lm_head.weight" and cfg.tie_embeddings)}


def row_splits(cfg) -> dict[str, list[int]]:
    """Row sizes of the pieces a fused weight of ours is made of."""
    q, kv, inter = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.intermediate_size
    return {"attn.c_attn.weight": [q, kv, kv], "attn.c_attn.bias": [q, kv, kv], "mlp.c_fc.weight": [inter, inter]}


def plan(cfg, column: int, layer_prefix: str) -> dict[str, list[str]]:
    """Our name -> the names of the format in `column` (HF or GGUF) whose rows make it, in order,
    for a Llama-like config; the format's block names start with layer_prefix.format(i)."""
    out = {ours: [names[column]] for ours, names in top_table(cfg).items()}
    table = layer_table(cfg)
    for i in range(cfg.n_layer):
        for ours, parts in table.items():
            out[f"transformer.h.{i}.{ours}"] = [layer_prefix.format(i) + p[column] for p in parts]
    return out


def scatter(cfg, sd: dict, column: int, layer_prefix: str) -> dict:
    """The inverse of `plan`: our state dict -> {name in the format: tensor}."""
    out = {names[column]: sd[ours] for ours, names in top_table(cfg).items()}
    splits, table = row_splits(cfg), layer_table(cfg)
    for i in range(cfg.n_layer):
        for ours, parts in table.items():
            tensor = sd[f"transformer.h.{i}.{ours}"]
            pieces = tensor.split(splits[ours], dim=0) if ours in splits else [tensor]
            for p, piece in zip(parts, pieces):
                out[layer_prefix.format(i) + p[column]] = piece
    return out


def assign_state(model, sd: dict, where) -> None:
    """Copy `sd` into `model` (ours or a helpers.generic one), checking names and shapes first;
    our tied head may be absent."""
    expected = model.state_dict()
    sd = dict(sd)
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing:
        raise CheckpointError(f"{where}: missing weights {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    if unexpected:
        raise CheckpointError(f"{where}: unexpected weights {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{where}: {k} has shape {tuple(v.shape)}, the config needs {tuple(expected[k].shape)}")
    model.load_state_dict(sd, strict=False)
