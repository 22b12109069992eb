"""Several processes (torchrun): DDP, where each process holds the whole model, and FSDP2, where
weights, gradients and AdamW state are sharded. The training loop calls these and nothing of
torch.distributed directly. Floor "training": uses the models and the config.

Every process draws every micro-batch in the same order and computes only its own share, so N
processes see exactly the samples one process with the same grad_accum would.
"""
from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from helpers import errors
from helpers.config import TrainConfig
from helpers.errors import ConfigError, HelpersError
from helpers.generic import find_blocks
from helpers.model import GPT


@dataclass
class Processes:
    """This process's place among the torchrun processes (one process: rank 0 of 1, ddp False)."""
    ddp: bool = False
    rank: int = 0
    world: int = 1


def processes_from_env() -> Processes:
    """The rank and world size torchrun sets (WORLD_SIZE > 1 means several processes)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return Processes(True, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    return Processes()


def init_processes(procs: Processes, device: torch.device) -> torch.device:
    """Join the process group (nccl on GPUs, gloo on CPUs); each process takes the GPU of its local
    rank. Returns the device this process trains on."""
    if not procs.ddp:
        return device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(device)
    return device


def where(procs: Processes) -> str:
    """This process in words, for errors that differ from node to node: host, node and process rank."""
    if not procs.ddp:
        return f"this machine ({socket.gethostname()})"
    return f"node {socket.gethostname()} (node rank {os.environ.get('GROUP_RANK', '?')}, process rank {procs.rank})"


def agree(procs: Processes, error: HelpersError | None) -> None:
    """Raise `error` here, and under torchrun make every process raise it: one process failing alone
    would leave the others waiting at the next collective. A process without an error of its own
    raises the first one reported, of the same type, with the same one-line message."""
    if procs.ddp:
        reports = [None] * procs.world
        dist.all_gather_object(reports, None if error is None else (type(error).__name__, str(error)))
        first = next((r for r in reports if r is not None), None)
        if error is None and first is not None:
            error = getattr(errors, first[0], HelpersError)(first[1])
    if error is not None:
        raise error


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every process when `flag` is true on any (one all-reduce of one number)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def finish_processes(procs: Processes) -> None:
    if procs.ddp:
        dist.destroy_process_group()


def shard_model(model: GPT, device: torch.device) -> None:
    """FSDP2, in place: each block is one unit and the root holds the rest (embeddings, final norm,
    head), all split across the processes; a block's weights are gathered only while it runs."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # ours, or a transformers model (generic path) with its one list of blocks
    blocks = model.transformer.h if isinstance(model, GPT) else find_blocks(model.hf, "parallel=fsdp")[2]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def is_sharded(model) -> bool:
    """Whether `model` has been sharded by FSDP2's fully_shard."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def wrap_for_training(model, cfg: TrainConfig, procs: Processes, device: torch.device):
    """The module the loop calls: torch.compile'd when asked, inside DistributedDataParallel under
    DDP (an FSDP model is already sharded in place)."""
    if cfg.compile:
        model = torch.compile(model)
    if procs.ddp and cfg.parallel != "fsdp":
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def make_scaler(device: torch.device, dtype: torch.dtype, sharded: bool):
    """The loss scaler float16 needs (a no-op otherwise). Sharded, an overflow in any process's
    gradient shard must make every process skip the step: ShardedGradScaler agrees on it."""
    if sharded:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        return ShardedGradScaler(device.type, enabled=dtype == torch.float16)
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def gradient_sync(model, parallel: str | None, last_micro: bool):
    """Context of one micro-step: gradients are averaged across processes only on a process's last
    micro-step (parallel None: one process, nothing to average)."""
    if parallel == "fsdp":
        model.set_requires_gradient_sync(last_micro)
        return nullcontext()
    return model.no_sync() if parallel == "ddp" and not last_micro else nullcontext()


def skip_batch(data, cfg: TrainConfig, sampler: torch.Generator):
    """Advance the sampler exactly as get_batch would, without reading data (another rank's batch)."""
    torch.randint(len(data) - cfg.block_size - 1, (cfg.batch_size,), generator=sampler)
    return None, None


class GatheredModel:
    """What save_checkpoint reads of a model (config, provenance, state_dict, num_params), with the
    full weights gathered from an FSDP model's shards: checkpoints keep the one format load_model reads."""

    def __init__(self, model: GPT, state: dict):
        self.config, self.provenance, self._state, self._n = model.config, dict(model.provenance), state, model.num_params()

    def state_dict(self) -> dict:
        return self._state

    def num_params(self) -> int:
        return self._n


def gather_full_state(model: GPT, optimizer) -> tuple[GatheredModel, dict]:
    """(full model, full optimizer state keyed by parameter name) of a sharded model, on the CPU of
    process 0 (empty elsewhere). Every process must call it: the shards are gathered collectively."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    if not optimizer.state:  # before the first step: nothing to gather (and gathering would take an empty AdamW step)
        return GatheredModel(model, weights), optimizer.state_dict()
    return GatheredModel(model, weights), get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(optimizer, model, state: dict, sharded: bool = False) -> None:
    """Restore AdamW's state saved by optimizer.state_dict() (parameters by index) or by an FSDP run
    (parameters by name), into a plain or (sharded=True) an FSDP model: either way round."""
    by_name = any(isinstance(p, str) for g in state["param_groups"] for p in g["params"])
    if not by_name and not sharded:
        optimizer.load_state_dict(state)
        return
    if not state["state"]:
        return  # saved before the first step: nothing to restore (and restoring would take an empty AdamW step)
    if not by_name:  # index i is the i-th parameter in the optimizer's groups: name it
        names = {id(p): n for n, p in model.named_parameters()}
        order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        state = {"state": {order[i]: v for i, v in state["state"].items()},
                 "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def torchrun_command(cfg: TrainConfig, nproc_per_node: int) -> list[str]:
    """The command that trains `cfg` with `nproc_per_node` processes on this machine (one per GPU;
    on a machine without GPUs, CPU processes talking through gloo)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
            "-m", "helpers.train", *cfg.to_args()]


def launch(cfg: TrainConfig, nproc_per_node: int | None = None) -> list[str]:
    """Run torchrun_command (nproc_per_node None: one process per visible GPU), printing the exact
    command line first and the processes' output as it comes; returns the command."""
    n = nproc_per_node if nproc_per_node is not None else max(1, torch.cuda.device_count())
    if n < 1:
        raise ConfigError(f"nproc_per_node={nproc_per_node} must be at least 1")
    cmd = torchrun_command(cfg, n)
    print(shlex.join(cmd), flush=True)
    env = dict(os.environ)  # the processes import this very copy of helpers
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        print(line, end="", flush=True)
    if proc.wait() != 0:
        raise subprocess.CalledProcessError(proc.returncode, shlex.join(cmd))
    return cmd
