"""LoRA healing (Hu et al., arXiv 2106.09685) through peft: the inherited child's weights frozen,
low-rank adapters trained on its attention and MLP projections, and the tensors it did not inherit
(as with copy=paper) trained in full.

Which projections: `lora_targets` names them by role, with the same seven names for every family:
q, k, v, o (attention) and gate, up, down (MLP); peft's spellings q_proj ... down_proj work too.
Our GPT stores q, k and v as one matrix (c_attn) and gate and up as one (c_fc). Such a matrix gets
one peft adapter whose rank is lora_r for each projection it serves, each projection with its own
block of the rank: a mask keeps the other blocks of B at zero, so the adapter is exactly separate
adapters of rank lora_r on q_proj, k_proj and v_proj (what export_hf writes for transformers). A
transformers model (helpers.generic) gets adapters on its own modules (q_proj, GPT-NeoX's
query_key_value, ...); a matrix that holds several projections there takes all of them or none.

A run saves the trainable part (`trainable_state`) and the `record`, never the frozen base: the
base is rebuilt from the parent (`base_state`: the kept blocks renumbered, as helpers.inherit cut
them) and checked against the record's fingerprint; `merged_model` adds scaling * B @ A to each
base weight and gives a plain model again (no peft needed), `unmerged_model` the model as it trained.
Floor "models": uses the models and the errors; peft is imported where adapters are attached.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from helpers.errors import CheckpointError, ConfigError
from helpers.generic import HFCausalLM, build, config_from_dict, find_blocks
from helpers.model import GPT, GPTConfig

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
BASE_DTYPES = ("float32", "bfloat16", "float16")

# our GPT: the projections of a block (relative name -> the roles its rows hold, in row order)
NATIVE = {"attn.c_attn": ("q", "k", "v"), "attn.c_proj": ("o",), "mlp.c_fc": ("gate", "up"), "mlp.c_proj": ("down",)}
# transformers models: a projection's own name -> its roles, inside attention and elsewhere (the MLP)
GENERIC_ATTENTION = {"q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "o_proj": ("o",), "out_proj": ("o",),
                     "dense": ("o",), "c_proj": ("o",), "qkv_proj": ("q", "k", "v"), "query_key_value": ("q", "k", "v"),
                     "c_attn": ("q", "k", "v"), "Wqkv": ("q", "k", "v")}
GENERIC_MLP = {"gate_proj": ("gate",), "up_proj": ("up",), "down_proj": ("down",), "gate_up_proj": ("gate", "up"),
               "fc1": ("up",), "fc_in": ("up",), "dense_h_to_4h": ("up",), "c_fc": ("up",), "fc2": ("down",),
               "fc_out": ("down",), "dense_4h_to_h": ("down",), "c_proj": ("down",)}


@dataclass
class LoraSettings:
    """What TrainConfig's lora_* fields and base_dtype ask for."""
    r: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | None = None  # roles (ROLES); None: every projection the model has
    norms: bool = False  # the norms' weights trained too
    base_dtype: str = "float32"  # the frozen projections of the blocks held in this dtype

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def normalize_targets(names) -> list[str] | None:
    """lora_targets as roles (q_proj -> q), in the order of ROLES; one ConfigError for a name that is
    none of them."""
    if names is None:
        return None
    given = [str(n).strip().lower().removesuffix("_proj") for n in names]
    unknown = [n for n, g in zip(names, given) if g not in ROLES]
    if unknown or not given:
        what = f"no projection is called {' or '.join(map(repr, unknown))}" if unknown else "the list is empty"
        raise ConfigError(f"lora_targets: {what}; valid names: {', '.join(ROLES)} (or q_proj ... down_proj), "
                          "or None for every projection")
    return [r for r in ROLES if r in given]


def import_peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("lora_r > 0 needs peft, which is not installed: pip install -e '.[lora]'") from None
    return peft


# ---- where the adapters go -------------------------------------------------------------------
def blocks_of(model) -> tuple[str, int]:
    """(qualified name of the model's list of blocks, its length)."""
    if isinstance(model, GPT):
        return "transformer.h", model.config.n_layer
    _, _, blocks = find_blocks(model.hf, "LoRA")
    return "hf." + next(n for n, m in model.hf.named_modules() if m is blocks), len(blocks)


def is_projection(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # transformers' GPT-2 layer


def projections(model) -> dict[str, tuple[str, ...]]:
    """A block's projections: name inside the block -> the roles its rows hold."""
    if isinstance(model, GPT):
        return {**NATIVE, "mlp.c_fc": NATIVE["mlp.c_fc"] if model.config.mlp == "swiglu" else ("up",)}
    prefix, _ = blocks_of(model)
    found = {}
    for name, module in model.get_submodule(prefix)[0].named_modules():
        *scope, leaf = name.split(".")
        attention = any("attn" in s.lower() or "attention" in s.lower() for s in scope)
        roles = (GENERIC_ATTENTION if attention else GENERIC_MLP).get(leaf)
        if roles and is_projection(module):
            found[name] = roles
    return found


def plan(model, targets) -> dict[str, list[str]]:
    """Block-relative module -> its parts, one rank block of lora_r each: the roles asked for, one
    by one on our fused matrices; on a transformers model one part per module ("q+k+v" for a fused one)."""
    available = projections(model)
    have = [r for r in ROLES if any(r in roles for roles in available.values())]
    wanted = have if targets is None else normalize_targets(targets)
    missing = [t for t in wanted if t not in have]
    family = model.config.family
    if not have:
        raise ConfigError(f"lora_r > 0: this {family} model has no projection LoRA knows by name "
                          f"({', '.join(GENERIC_ATTENTION)}, {', '.join(GENERIC_MLP)}); train without lora_r")
    if missing:
        raise ConfigError(f"lora_targets: {', '.join(missing)} match(es) no module of this {family} model; "
                          f"valid here: {', '.join(have)}")
    modules = {}
    for name, roles in available.items():
        parts = [r for r in roles if r in wanted]
        if not parts:
            continue
        if not isinstance(model, GPT):
            if len(parts) < len(roles):
                raise ConfigError(f"lora_targets: this {family} model holds {', '.join(roles)} in one matrix ({name}); "
                                  "name all of them or none")
            parts = ["+".join(parts)]
        modules[name] = parts
    return modules


def row_blocks(cfg: GPTConfig, module: str) -> list[tuple[str, int, int]]:
    """(role, first row, end row) of each projection inside one of our fused matrices."""
    roles = NATIVE[module] if module in NATIVE and (module != "mlp.c_fc" or cfg.mlp == "swiglu") else ()
    sizes = {"attn.c_attn": [cfg.n_head * cfg.head_dim] + [cfg.n_kv_head * cfg.head_dim] * 2,
             "mlp.c_fc": [cfg.intermediate_size] * 2}.get(module, [])
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(r, s, s + n) for r, s, n in zip(roles, starts, sizes)] if len(roles) > 1 else []


def norm_parameters(model) -> list[str]:
    """Names of every norm's parameters (in the blocks and the final norm)."""
    return [f"{m}.{p}" if m else p for m, module in model.named_modules()
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "Norm" in type(module).__name__
            for p, _ in module.named_parameters(recurse=False)]


def not_inherited(model) -> list[str]:
    """Parameters an inherited child holds at fresh initialisation, not copied from its parent: what
    helpers.inherit leaves fresh with copy="paper" (position table, final norm, an untied token embedding)."""
    if not isinstance(model, GPT) or model.provenance.get("selection", {}).get("copy") != "paper":
        return []
    fresh = ("transformer.wpe.", "transformer.ln_f.") + (() if model.config.tie_embeddings else ("transformer.wte.",))
    return [n for n, _ in model.named_parameters() if n.startswith(fresh)]


def adapter_params(model, r: int, targets=None) -> int:
    """Parameters the adapters of rank r add (the model may live on the meta device)."""
    prefix, n_blocks = blocks_of(model)
    block = model.get_submodule(f"{prefix}.0")
    total = 0
    for name, parts in plan(model, targets).items():
        out_features, in_features = block.get_submodule(name).weight.shape
        total += r * len(parts) * (in_features + out_features)
    return total * n_blocks


# ---- attaching -------------------------------------------------------------------------------
def attach(model, settings: LoraSettings, base: dict, seed: int = 0, full=()) -> dict:
    """Freeze `model` and give the projections settings.targets names, in every block, peft's LoRA
    adapters (A drawn from `seed`, B zero: the model computes what it did); the parameters named in
    `full` (and, with settings.norms, the norms) train in full; the frozen projections of the blocks
    are held in settings.base_dtype. In place. Returns the record a checkpoint keeps (also
    `model.lora_record`); `base` ({"source", "layers"}) says where the frozen weights come from."""
    peft = import_peft()
    modules = plan(model, settings.targets)
    prefix, n_blocks = blocks_of(model)
    full = sorted(set(full) | set(norm_parameters(model) if settings.norms else ()))
    fingerprint = base_fingerprint(model.state_dict(), skip=full)
    wide = {re.escape(m): len(parts) for m, parts in modules.items() if len(parts) > 1}
    config = peft.LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias="none",
                             target_modules=[f"{prefix}.{i}.{m}" for i in range(n_blocks) for m in modules],
                             rank_pattern={m: settings.r * k for m, k in wide.items()},
                             alpha_pattern={m: settings.alpha * k for m, k in wide.items()},
                             fan_in_fan_out=any(type(m).__name__ == "Conv1D" for m in model.modules()))
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft.inject_adapter_in_model(config, model)
    if isinstance(model, GPT):
        for name, parts in modules.items():
            if row_blocks(model.config, name):
                mask = block_mask(model.config, name, parts, settings.r)
                for i in range(n_blocks):
                    keep_blocks(model.get_submodule(f"{prefix}.{i}.{name}"), mask)
    for name in full:
        model.get_parameter(name).requires_grad_(True)
    if settings.base_dtype != "float32":
        low = getattr(torch, settings.base_dtype)
        for name, module in model.named_modules():
            if name.startswith(prefix + ".") and is_projection(module) and ".lora_" not in name:
                for p in module.parameters(recurse=False):
                    if not p.requires_grad:
                        p.data = p.data.to(low)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.lora_record = {"settings": dataclasses.asdict(settings), "modules": modules, "full": full, "base": base,
                         "fingerprint": fingerprint, "trainable_params": trainable,
                         "frozen_params": sum(p.numel() for p in model.parameters()) - trainable,
                         "peft_version": peft.__version__}
    return model.lora_record


def block_mask(cfg: GPTConfig, module: str, parts: list[str], r: int) -> torch.Tensor:
    """(rows, len(parts) * r): 1 where B may differ from zero, the rows of each part's projection
    against that part's block of the rank."""
    blocks = row_blocks(cfg, module)
    mask = torch.zeros(blocks[-1][2], len(parts) * r)
    for j, part in enumerate(parts):
        _, start, end = next(b for b in blocks if b[0] == part)
        mask[start:end, j * r:(j + 1) * r] = 1
    return mask


def keep_blocks(layer: nn.Module, mask: torch.Tensor) -> None:
    """B of one adapter stays zero outside `mask`: it starts so, and its gradient is masked (AdamW
    then never moves those entries). The mask is a buffer, so it follows the model between devices."""
    layer.register_buffer("lora_B_mask", mask, persistent=False)
    weight = layer.lora_B["default"].weight
    with torch.no_grad():
        weight.mul_(mask)
    weight.register_hook(lambda grad: grad * layer.lora_B_mask)


def record_of(model) -> dict | None:
    """The LoRA record of a model with adapters attached (attach), or None."""
    return getattr(model, "lora_record", None)


def trainable_state(model) -> dict:
    """What a LoRA run's checkpoint holds of the model: the adapters and the tensors trained in full."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def base_fingerprint(state: dict, skip=()) -> str:
    """A short hash of the frozen weights (a sample of each tensor, its name and shape): a base rebuilt
    from another parent than the one a run trained on does not pass unnoticed."""
    h = hashlib.sha256()
    for key in sorted(state):
        if key in skip or ".lora_" in key:
            continue
        t = state[key].detach().reshape(-1)
        if t.numel() > 4096:
            t = t[torch.linspace(0, t.numel() - 1, 4096, dtype=torch.float64).long()]
        h.update(f"{key}{tuple(state[key].shape)}".encode())
        h.update(t.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ---- the base, rebuilt; merging ------------------------------------------------------------------
def base_state(parent, layers: list[int] | None) -> dict:
    """The parent's state dict as a child keeping blocks `layers` holds it (block layers[i] becomes
    block i; None: the whole model): the frozen weights of a LoRA run, which its checkpoint leaves out."""
    state = parent.state_dict()
    if layers is None:
        return state
    prefix, _ = blocks_of(parent)
    new_index = {old: new for new, old in enumerate(layers)}
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix + "."):
            out[key] = value
            continue
        i, rest = key[len(prefix) + 1:].split(".", 1)
        if int(i) in new_index:
            out[f"{prefix}.{new_index[int(i)]}.{rest}"] = value
    return out


def new_model(model_config: dict, where):
    """An untrained model of a checkpoint's model_config: ours, or a transformers one (its random
    initialisation drawn aside: loading a model leaves the caller's random numbers as they were)."""
    with torch.random.fork_rng(devices=[]):
        if model_config.get("generic"):
            return HFCausalLM(build(config_from_dict(model_config["hf_config"], where), where))
        return GPT(GPTConfig.from_dict(model_config))


def check_fingerprint(found: str, record: dict, where) -> None:
    if found != record["fingerprint"]:
        raise CheckpointError(f"{where}: the base rebuilt from {record['base']['source']} differs from the one this LoRA "
                              "run trained on (another parent under that name?); restore that parent to load the run")


def merged_model(model_config: dict, base: dict, trained: dict, record: dict, provenance: dict, where):
    """A plain model: each adapted weight W of `base` becomes W + scaling * B @ A, the tensors trained
    in full take their trained values. `trained` holds the adapters under peft's names."""
    check_fingerprint(base_fingerprint(base, skip=record["full"]), record, where)
    model = new_model(model_config, where)
    state = {**base, **{k: v for k, v in trained.items() if ".lora_" not in k}}
    scaling = LoraSettings(**record["settings"]).scaling
    for key, a in trained.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0]
        delta = scaling * (trained[key.replace(".lora_A.", ".lora_B.")].float() @ a.float())
        if type(model.get_submodule(module)).__name__ == "Conv1D":  # stored as (in, out)
            delta = delta.T
        state[f"{module}.weight"] = state[f"{module}.weight"].float() + delta
    model.load_state_dict(state)
    model.provenance = {**provenance, "lora_merged": {k: record[k] for k in ("settings", "modules", "base")}}
    return model


def unmerged_model(model_config: dict, base: dict, trained: dict, record: dict, provenance: dict, where):
    """The model as a LoRA run trained it: the base, the adapters attached (peft) and loaded."""
    model = new_model(model_config, where)
    model.load_state_dict(base)
    model.provenance = provenance
    found = attach(model, LoraSettings(**record["settings"]), record["base"], full=record["full"])
    check_fingerprint(found["fingerprint"], record, where)
    expected = set(trainable_state(model))
    if expected != set(trained):
        odd = sorted(expected ^ set(trained))
        raise CheckpointError(f"{where}: the adapters do not fit the model ({odd[:3]}); pass an intact LoRA checkpoint")
    model.load_state_dict(trained, strict=False)
    model.lora_record = record
    return model


def split_state(model) -> tuple[dict, dict]:
    """(base under plain names: frozen and fully trained tensors, adapters under peft's names) of a
    model with adapters."""
    state = model.state_dict()
    base = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    return base, {k: v for k, v in state.items() if ".lora_" in k}


def merge(model):
    """A model with adapters as a plain model (its own weights untouched), in float32."""
    base, adapters = split_state(model)
    record = {**record_of(model), "fingerprint": base_fingerprint(base, skip=record_of(model)["full"])}
    return merged_model(model.config.to_dict(), base, adapters, record, dict(model.provenance), "merge")


def strip(model):
    """The base the adapters of `model` apply to, as a plain model: the frozen weights and the tensors
    trained in full, without the adapters (what export_hf(adapter=True) writes beside them)."""
    base, _ = split_state(model)
    plain = new_model(model.config.to_dict(), "strip")
    plain.load_state_dict(base)
    plain.provenance = dict(model.provenance)
    return plain
