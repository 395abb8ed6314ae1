"""Process-group set-up from torchrun or SLURM variables, and the few collective helpers the trainer needs.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Under SLURM without torchrun
(``srun python -m davit train ...``), SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID give rank, world size and
local rank; MASTER_ADDR must then be set (e.g. to the first host of ``scontrol show hostnames``), MASTER_PORT
defaults to 29500. Backend: NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "init_distributed",
    "cleanup",
    "all_reduce_mean",
    "all_reduce_sum",
    "all_gather_objects",
    "barrier",
    "broadcast_object",
    "env_rank_world",
    "pick_device",
    "world_size",
]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_rank_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables, else SLURM's, else (0, 1, 0)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def pick_device(device: str, local_rank: int) -> torch.device:
    """``auto`` (a GPU if there is one), ``cpu`` or ``cuda`` -> this process's device (GPU ``local_rank``);
    shared by the trainer and the eval/predict commands of every task."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(device)


def init_distributed(device: str = "auto") -> DistInfo:
    rank, world, local = env_rank_world()
    dev = pick_device(device, local)
    if world > 1 and not dist.is_initialized():
        if "SLURM_PROCID" in os.environ and "MASTER_ADDR" not in os.environ:
            raise RuntimeError(
                "SLURM run without torchrun: set MASTER_ADDR to the first node's host name, e.g. "
                "export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1)"
            )
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("LOCAL_RANK", str(local))
        # on GPUs NCCL for the model's tensors plus gloo for the small CPU tensors the loops reduce (loss and
        # stop flags, metric counts): NCCL alone rejects CPU tensors ("No backend type associated with
        # device type cpu")
        backend = "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo"
        kw = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **kw)
    return DistInfo(rank, world, local, dev)


def cleanup() -> None:
    if dist.is_initialized():
        # FSDP2's module hooks and device meshes can hold the process group in reference cycles; freed now,
        # while the interpreter is alive, its gloo threads are joined here and not at interpreter exit
        gc.collect()
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """The number of processes of the default group (1 when not distributed)."""
    return dist.get_world_size() if _active() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _active():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if _active():
        return all_reduce_sum(t) / dist.get_world_size()
    return t


def all_gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` when not distributed)."""
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _active():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
