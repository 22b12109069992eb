"""A model file opened, its tensors read one at a time into a model built without memory.

A loader (hf, gguf, torch_files) reads a file's config and index of tensors, builds our model on the
meta device (`gpt_on_meta`: no memory, no random numbers drawn) and checks every tensor the model
needs against the index (names, shapes) before reading any. `Weights.read` then reads what it is
asked for, each tensor into memory of its own that becomes the parameter: everything
(`load_model`), the root (embeddings, final norm, head) and the blocks a child keeps (`blocks=`:
the others are never read), or one block at a time (`each_block`: the scores run a parent held
one block at a time). So loading costs one copy of the weights, where building a random model,
reading the whole file and concatenating q, k, v cost three.

Safetensors and GGUF tensors are read with plain reads straight into their new memory, not through
a memory map: the pages a process maps and touches count in its resident memory for as long as the
map lives, a second copy of everything read. Torch files (`torch.load` has only the map) are
memory-mapped and their tensors taken as they are, without a copy.
Floor "formats": uses the models and the errors.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from helpers.errors import CheckpointError
from helpers.model import GPT

BLOCK_NAME = re.compile(r"transformer\.h\.(\d+)\.")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class NoDrawsOnMeta(TorchFunctionMode):
    """normal_ on the meta device runs torch's Python reference, whose first use imports sympy (70 MB
    and a second per process): with nothing to draw there, gpt_on_meta skips it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.normal_ or func is nn.init.normal_:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def gpt_on_meta(cfg) -> GPT:
    """A GPT of cfg whose parameters take no memory (on the meta device, not initialised: no random
    numbers drawn) and whose rotary tables are real (GPT computes them on the CPU): the loaders put
    the weights they read in place, one tensor at a time."""
    with torch.device("meta"), NoDrawsOnMeta():
        return GPT(cfg)


def read_exact(path: Path, offset: int, out: torch.Tensor) -> None:
    """The bytes of `path` from `offset` into the contiguous tensor `out`, with no copy in between."""
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    with open(path, "rb") as f:
        f.seek(offset)
        done = 0
        while done < len(view):  # one read returns at most ~2 GB
            n = f.readinto(view[done:])
            if not n:
                raise CheckpointError(f"{path}: ends inside a tensor; the file is truncated, download it again")
            done += n


class SafetensorsFiles:
    """The tensors of one or more .safetensors files (a sharded folder) by name: dtypes and shapes from
    each file's JSON header, the bytes read only when a tensor is asked for."""

    def __init__(self, files: list[Path]):
        self.index = {}  # name -> (file, dtype, shape, offset of its first byte)
        for f in files:
            try:
                self.index.update(self._header(f))
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{f}: cannot read weights ({type(e).__name__}: {str(e)[:120]}); the file "
                                      "is truncated or corrupt, download it again") from None

    @staticmethod
    def _header(f: Path) -> dict:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n <= size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(fh.read(n))
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype, shape = SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"])
            begin, end = info["data_offsets"]
            numel = 1
            for d in shape:
                numel *= d
            if end - begin != numel * dtype.itemsize or 8 + n + end > size:
                raise ValueError(f"{name} needs bytes {begin}..{end} past the header; the file has {size - 8 - n}")
            out[name] = (f, dtype, shape, 8 + n + begin)
        return out

    def names(self) -> set[str]:
        return set(self.index)

    def shape(self, name: str) -> tuple | None:
        return self.index[name][2] if name in self.index else None

    def read(self, name: str) -> torch.Tensor:
        f, dtype, shape, offset = self.index[name]
        out = torch.empty(shape, dtype=dtype)
        read_exact(f, offset, out)
        return out

    def read_into(self, name: str, out: torch.Tensor) -> bool:
        """Fill `out` straight from the file where it is the tensor's dtype and contiguous (else False)."""
        f, dtype, shape, offset = self.index[name]
        if out.dtype != dtype or not out.is_contiguous():
            return False
        read_exact(f, offset, out)
        return True


class TensorDict:
    """Tensors already at hand by name (a torch file's, memory-mapped) behind the same interface."""

    def __init__(self, tensors: dict):
        self.tensors = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}

    def names(self) -> set[str]:
        return set(self.tensors)

    def shape(self, name: str) -> tuple | None:
        return tuple(self.tensors[name].shape) if name in self.tensors else None

    def read(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def read_into(self, name: str, out: torch.Tensor) -> bool:
        return False


def check_names(model: GPT, names, where) -> dict[str, list[str]]:
    """{our name: [the same name]} for a state dict in our own names (a torch file): every tensor the
    model needs (a tied head may be absent) and no other."""
    expected = needed(model)
    names = set(names) - ({"lm_head.weight"} if model.config.tie_embeddings else set())
    missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
    if missing:
        raise CheckpointError(f"{where}: missing weights {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    if unexpected:
        raise CheckpointError(f"{where}: unexpected weights {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
    return {k: [k] for k in expected}


def needed(model: GPT) -> dict[str, tuple]:
    """{name: shape} of every tensor a model's weights must provide (a tied head is the embedding)."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()
            if not (k == "lm_head.weight" and model.config.tie_embeddings)}


class Weights:
    """A model whose parameters are read from its file on demand.

    model: ours, built on the meta device, config and provenance set; plan: our name -> the file's
    tensors whose rows make it, in order (q, k, v -> c_attn); source: SafetensorsFiles, TensorDict
    or a format's own reader (names, shape, read, read_into); transposed: the file's tensors stored
    as (in, out) (GPT-2's Conv1D layers)."""

    def __init__(self, model, plan: dict[str, list[str]], source, where, transposed: frozenset = frozenset()):
        self.model, self.plan, self.source, self.where, self.transposed = model, plan, source, where, transposed
        self.done: set[str] = set() if plan else set(model.state_dict())  # names read (all: a model read whole)
        if plan:
            self._check_shapes()

    @classmethod
    def loaded(cls, model) -> "Weights":
        """A model read whole already (transformers' own loader, the generic path): nothing left to read."""
        return cls(model, {}, None, None)

    def _part_shape(self, name: str) -> tuple:
        shape = self.source.shape(name)
        return tuple(reversed(shape)) if name in self.transposed else shape

    def _check_shapes(self) -> None:
        for ours, shape in needed(self.model).items():
            parts = [self._part_shape(p) for p in self.plan[ours]]
            odd = [p for p in parts if p[1:] != shape[1:]]  # rows are concatenated: the rest must agree
            got = odd[0] if odd else parts[0] if len(parts) == 1 else (sum(p[0] for p in parts), *shape[1:])
            if got != shape:
                raise CheckpointError(f"{self.where}: {ours} has shape {got}, the config needs {shape}")

    # ---- reading --------------------------------------------------------------------------
    def read(self, blocks=None):
        """Read the root and `blocks` (None: every block), what is not read already; returns the model.
        Blocks not asked for stay on the meta device: no memory, and running them fails loudly."""
        keep = None if blocks is None else set(blocks)
        for ours in self.plan:
            m = BLOCK_NAME.match(ours)
            if ours not in self.done and (keep is None or m is None or int(m.group(1)) in keep):
                self._put(ours, self._tensor(ours))
                self.done.add(ours)
        self._tie()
        return self.model

    def each_block(self):
        """The model's blocks in order, each read just before it is yielded and dropped right after
        (blocks read already stay): a forward pass over the whole parent holding one block at a time."""
        for i, block in enumerate(self.model.transformer.h):
            names = [k for k in self.plan if k.startswith(f"transformer.h.{i}.")]
            fresh = [k for k in names if k not in self.done]
            for k in fresh:
                self._put(k, self._tensor(k))
            try:
                yield block
            finally:
                for k in fresh:
                    p = self.model.get_parameter(k)
                    self._put(k, torch.empty(p.shape, dtype=p.dtype, device="meta"))

    def unread_blocks(self) -> list[int]:
        if not self.plan:
            return []
        return sorted({int(m.group(1)) for k in self.plan if k not in self.done and (m := BLOCK_NAME.match(k))})

    def to(self, device, dtype):
        """The model on `device` in `dtype`; blocks not read stay on the meta device."""
        h = self.model.transformer.h if isinstance(self.model, GPT) else None
        unread = {i: h[i] for i in self.unread_blocks()}
        for i in unread:
            h[i] = nn.Identity()  # nothing to move (a meta tensor cannot be copied)
        try:
            self.model.to(device=device, dtype=dtype)
        finally:
            for i, block in unread.items():
                h[i] = block
        return self.model

    def _tensor(self, ours: str) -> torch.Tensor:
        """Our tensor, float32, in memory of its own: one file tensor taken as it comes, or several
        read into the row blocks of one new tensor."""
        parts = self.plan[ours]
        if len(parts) == 1 and parts[0] not in self.transposed:
            return self.source.read(parts[0]).to(torch.float32).contiguous()
        shape = self.model.get_parameter(ours).shape
        out = torch.empty(shape, dtype=torch.float32)
        row = 0
        for name in parts:
            target = out[row:row + self._part_shape(name)[0]]
            if name in self.transposed:
                target.copy_(self.source.read(name).t())
            elif not self.source.read_into(name, target):
                target.copy_(self.source.read(name))
            row += target.shape[0]
        return out

    def _put(self, ours: str, tensor: torch.Tensor) -> None:
        owner, _, attr = ours.rpartition(".")
        module = self.model.get_submodule(owner)
        setattr(module, attr, nn.Parameter(tensor, requires_grad=getattr(module, attr).requires_grad))

    def _tie(self) -> None:
        if isinstance(self.model, GPT) and self.model.config.tie_embeddings:
            self.model.lm_head.weight = self.model.transformer.wte.weight
