"""The data loaders' shared memory: what a rank needs, and the start-up check against /dev/shm.

A DataLoader worker hands each batch to the main process through shared memory (/dev/shm on
Linux), and up to data.num_workers x data.prefetch_factor batches of a loader wait there. An
evaluation runs while the training loader's workers keep their prefetched batches, so a rank
needs at most

    workers x prefetch x (largest training batch + largest evaluation batch)

bytes, each batch as the workers hand it over: uint8 pixels (B x images or frames x 3 x S x S),
or cached features, and the token tensors. A container's /dev/shm is often small (Docker gives
64 MB unless run with --shm-size), and a worker that cannot allocate its batch dies with a bus
error mid-epoch; DataBuilder checks the need against the free space at start-up instead, and
fails naming the fix.

    python bench/scale.py --quick     # the need at the bart-base preset on 8 ranks
"""

from __future__ import annotations

import math
import os
import shutil
from contextlib import closing

import torch

from vlds.data.shardio import DataError, SkipCounter, TaskIndex, read_samples

SHM = "/dev/shm"


def loader_shm_need(
    workers: int, prefetch: int, train_batches: dict[str, int], eval_batches: dict[str, int]
) -> int:
    """Bytes of shared memory a rank's loaders hold at most: workers x prefetch x (the largest
    training batch + the largest evaluation batch), each {task: bytes of one batch}. 0 without
    worker processes (batches are built in the main process)."""
    if workers == 0:
        return 0
    largest = max(train_batches.values(), default=0) + max(eval_batches.values(), default=0)
    return workers * prefetch * largest


def sample_bytes(index: TaskIndex, preprocess, collate) -> int | None:
    """Bytes one sample adds to a batch as the workers hand it over: the first sample of the
    split's first shard that decodes, collated alone (its pixels or features exactly, its token
    tensors padded to its own length). None when none of its first 8 samples decodes (the
    stream reports bad samples itself)."""
    path = index.shards[0][0]
    try:
        with closing(read_samples(path, SkipCounter())) as samples:
            for _, raw in zip(range(8), samples, strict=False):
                try:
                    batch = collate([preprocess(raw)])
                except Exception:  # noqa: BLE001 - a bad sample: try the next
                    continue
                return sum(v.nbytes for v in batch.values() if torch.is_tensor(v))
    except Exception:  # noqa: BLE001 - an unreadable shard: the stream names it
        return None
    return None


def _largest(batches: dict[str, int]) -> str:
    if not batches:
        return "0 MB"
    task = max(batches, key=batches.get)
    return f"{batches[task] / 1e6:.1f} MB ({task})"


def shm_free(path: str = SHM) -> int | None:
    """Free bytes of the shared-memory file system, None where there is none (not Linux)."""
    return shutil.disk_usage(path).free if os.path.isdir(path) else None


def check_shm(
    workers: int,
    prefetch: int,
    train_batches: dict[str, int],
    eval_batches: dict[str, int],
    local_ranks: int,
    free: int | None,
) -> str:
    """The line DataBuilder logs: the need per rank and the free space of /dev/shm (`free`
    bytes, None: no /dev/shm, not checked). DataError, naming the fix, when the free space is
    less than the need of every rank on this node (`local_ranks`)."""
    need = loader_shm_need(workers, prefetch, train_batches, eval_batches)
    line = (
        f"loader shared memory: {workers} workers x prefetch {prefetch} x (training batch "
        f"{_largest(train_batches)} + evaluation batch {_largest(eval_batches)}) = "
        f"{need / 1e9:.2f} GB per rank"
    )
    if free is None:
        return f"{line}; no {SHM} here: not checked"
    line += f"; {SHM} has {free / 1e9:.2f} GB free for {local_ranks} rank(s) on this node"
    if free < need * local_ranks:
        size = math.ceil(1.25 * need * local_ranks / 2**30)
        raise DataError(
            f"{line}: too small, the data workers would die with a bus error. Lower "
            f"--data.num_workers, --data.prefetch_factor, --data.batch_size or --eval.batch_size, "
            f"or give the container a larger {SHM} (docker run --shm-size={size}g; Kubernetes: "
            f"an emptyDir with medium: Memory mounted at {SHM})"
        )
    return line
