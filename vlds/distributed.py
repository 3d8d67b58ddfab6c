"""Rank, local rank and world size from torchrun, the deepspeed launcher or SLURM, and the
process group set-up that vlds/train.py uses under each (or for a bare `python` run).

    torchrun --nproc_per_node 2 vlds/train.py ...     # RANK / LOCAL_RANK / WORLD_SIZE set
    deepspeed --num_gpus 2 vlds/train.py ...          # same variables, plus --local_rank
    srun python vlds/train.py ...                     # SLURM_PROCID / SLURM_NTASKS / nodelist
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """First hostname of a SLURM node list: 'gpu[03-05,09],cpu1' -> 'gpu03'."""
    m = re.match(r"([^\[,]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_info_from_env() -> WorldInfo:
    """Normalise the launcher's environment so torch.distributed's env:// init finds it.

    torchrun and the deepspeed launcher set RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*; under `srun`
    only SLURM_* exist, so we derive them (master = first node of the allocation). A bare
    `python` run becomes a world of one on a free local port.
    """
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env.get("SLURM_NTASKS", "1")
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        # Same port on every task of the job: derived from the job id, overridable.
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    env.setdefault("RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        if env["WORLD_SIZE"] != "1":
            raise RuntimeError(
                "WORLD_SIZE > 1 but MASTER_PORT is unset; launch with torchrun, "
                "deepspeed or srun, or export MASTER_ADDR/MASTER_PORT"
            )
        env["MASTER_PORT"] = str(free_port())
    return WorldInfo(int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"]))


def init_distributed(info: WorldInfo):
    """Initialise DeepSpeed's process group: NCCL on GPUs, gloo on CPU. Returns the device."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    # The shared-memory CPU collective would JIT-compile a C++ op (20-40 s); gloo is enough.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        device = torch.device("cuda", info.local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return device
