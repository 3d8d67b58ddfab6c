"""Rank, local rank and world size from torchrun, the deepspeed launcher or SLURM, and the
process group set-up that vlds/train.py uses under each (or for a bare `python` run).

    torchrun --nproc_per_node 2 vlds/train.py ...     # RANK / LOCAL_RANK / WORLD_SIZE set
    deepspeed --num_gpus 2 vlds/train.py ...          # same variables, plus --local_rank
    srun python vlds/train.py ...                     # SLURM_PROCID / SLURM_NTASKS / nodelist
    sbatch slurm/train.sbatch ...                     # the above on N nodes, with requeueing
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


def expand_nodelist(nodelist: str) -> list[str]:
    """Hostnames of a SLURM node list, in order, as `scontrol show hostnames` prints them:
    'gpu[003-005,009],cpu1' -> ['gpu003', 'gpu004', 'gpu005', 'gpu009', 'cpu1'].

    Handles zero-padded ranges, several bracket groups per name ('rack[1-2]-n[01-02]') and
    hyphens outside brackets ('a-b[1-2]' -> ['a-b1', 'a-b2']).
    """
    hosts: list[str] = []
    for entry in _split_top_level(nodelist.strip()):
        names = [""]
        for literal, ranges in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", entry):
            parts = [literal + x for x in _expand_ranges(ranges, nodelist)] if ranges else [literal]
            names = [n + x for n in names for x in parts]
        hosts += names
    if not hosts or not all(hosts):
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    """Split on the commas that are outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in nodelist:
        depth += (ch == "[") - (ch == "]")
        if depth not in (0, 1):
            raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    return [*parts, cur] if cur or parts else []


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    """'003-005,009' -> ['003', '004', '005', '009'] (the padding of the range's start kept)."""
    out = []
    for item in ranges.split(","):
        lo, _, hi = item.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"cannot parse SLURM node list {nodelist!r} (range {item!r})")
        out += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi or lo) + 1)]
    return out


def first_host(nodelist: str) -> str:
    """First hostname of a SLURM node list: 'gpu[003-005,009],cpu1' -> 'gpu003'."""
    return expand_nodelist(nodelist)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_info_from_env() -> WorldInfo:
    """Normalise the launcher's environment so torch.distributed's env:// init finds it.

    torchrun and the deepspeed launcher set RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*; under `srun`
    only SLURM_* exist, so we derive them (master = first node of the job step). A bare
    `python` run becomes a world of one on a free local port. Variables already set win, so a
    batch script may export MASTER_ADDR/MASTER_PORT itself (slurm/train.sbatch does).
    """
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:
        # One process per task: `srun --ntasks-per-node=G python vlds/train.py` (never a bare
        # `python` in the batch script itself: it sees the job's task count, not one task).
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        if env["WORLD_SIZE"] != "1":
            nodes = env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
            env.setdefault("MASTER_ADDR", first_host(nodes))
            # Same port on every task of the job: derived from the job id, overridable.
            env.setdefault("MASTER_PORT", str(slurm_port(env.get("SLURM_JOB_ID", "0"))))
        # A single task (`srun -n1`, an interactive allocation) rendezvouses with itself on
        # a free local port below: no node name to resolve, no port shared with other jobs.
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


def local_world_size() -> int:
    """Processes of this job on this node: torchrun's LOCAL_WORLD_SIZE, the deepspeed
    launcher's LOCAL_SIZE, or SLURM's tasks per node ("8", "8(x2)"; the most of any node);
    1 when none is set (a bare `python` run)."""
    env = os.environ
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if env.get(key, "").isdigit():
            return max(1, int(env[key]))
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", ""))
    counts = [int(n) for n in re.findall(r"(\d+)(?:\(x\d+\))?", per_node)]
    return max(counts, default=1)


def slurm_port(job_id: str | int) -> int:
    """The rendezvous port of a SLURM job: 20000 + job id mod 20000 (as slurm/train.sbatch)."""
    return 20000 + int(job_id) % 20000


def import_deepspeed():
    """`import deepspeed`, without mlflow. DeepSpeed's autotuner imports mlflow at module level
    whenever it is installed (the `trackers` extra installs it): 2.3 s of DeepSpeed's 2.9 s
    import on a 2-core machine, paid by every rank and every test run, for a feature vlds never
    uses. mlflow is hidden for that one import unless something already imported it; vlds'
    own mlflow tracker imports it later, as usual."""
    import sys

    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed

        return deepspeed
    sys.modules["mlflow"] = None  # `import mlflow` raises ImportError; the autotuner allows it
    try:
        import deepspeed
    finally:
        del sys.modules["mlflow"]
    return deepspeed


def init_distributed(info: WorldInfo):
    """Initialise DeepSpeed's process group: NCCL on GPUs, gloo on CPU. Returns the device."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import_deepspeed()
    import deepspeed.ops

    # The shared-memory CPU collective would JIT-compile a C++ op (20-40 s); gloo is enough.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if torch.cuda.is_available():
        # local_rank indexes the visible GPUs; under `srun --gpus-per-task=1` (or a GPU
        # binding) each task sees only its own, which is then device 0.
        count = torch.cuda.device_count()
        index = 0 if count == 1 else info.local_rank
        if index >= count:
            raise RuntimeError(
                f"local rank {info.local_rank} but only {count} visible GPU(s): launch at most "
                f"one process per GPU (srun --ntasks-per-node = GPUs per node)"
            )
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return device
