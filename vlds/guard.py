"""Guards of a long run: preemption signals and non-finite steps, agreed on by every rank.

- SIGTERM / SIGUSR1 (SLURM's warning signal, `scancel`, a scheduler's preemption) set a flag in
  the process that receives them; data-loading workers drop both, but for their parent's own
  SIGTERM (`quiet_worker`: the main process decides, and a group-wide SIGTERM must not kill
  the workers under a running step).
  Every rank learns whether any rank was signalled at its next poll: each training step's one
  bookkeeping all-reduce (`StepSync`), each evaluation batch (vlds.eval.loop), each generated
  token (`stop_criteria`, local: ranks agree at the batch's end) and after each save. Then every
  rank stops together, writes a checkpoint of the last finished step if it has none and exits
  0, so a requeued job resumes with `--train.resume=latest`.
- A non-finite loss on any rank skips the step on every rank (no backward, no optimizer step);
  a non-finite gradient with a finite loss is caught by the optimizer's gradient-norm check
  (ZeRO's, DeepSpeed's bf16 optimizer's, or at stage 0 in fp32 vlds.engine.CheckedAdamW), which
  discards the update. Both are counted; `train.max_bad_steps` in a row stop the run with an
  error, the last good checkpoint untouched.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("vlds")


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row."""


class Preempted(Exception):
    """Every rank agreed to stop (a rank was signalled): save and exit 0. Raised between steps,
    inside evaluation, or by the data loader when a worker was lost while stopping."""


def any_rank(flag: bool, device) -> bool:
    return any_ranks([flag], device)[0]


def any_ranks(flags: list[bool], device) -> list[bool]:
    """Each flag: true on some rank (one all-reduce and one host read for all of them)."""
    if not dist.is_initialized():
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [x > 0 for x in t.tolist()]


class Preemption:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, signals=SIGNALS):
        self.received: int | None = None
        for sig in signals:
            signal.signal(sig, self._handler)

    def _handler(self, signum, _frame):
        self.received = signum  # acted on at the next poll, never mid-step

    @property
    def local(self) -> bool:
        """This process was signalled (no collective: for the loader and generation)."""
        return self.received is not None

    def requested(self, device) -> bool:
        return any_rank(self.local, device)

    def poll(self, device) -> None:
        """Raise Preempted on every rank when any rank was signalled (one collective)."""
        if self.requested(device):
            raise Preempted


def quiet_worker(_worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: the preemption signals are the main process's to act on.
    A worker killed by the group-wide SIGTERM of `scancel` would crash the step it feeds.

    SIGTERM and SIGUSR1 stay blocked in the worker (as `signals_blocked` forked it) and one
    thread takes them with sigwaitinfo: all are dropped except a SIGTERM sent by the parent
    itself, which is how the parent ends a worker (multiprocessing's terminate(): torch's
    shutdown of a stuck worker, and the interpreter's exit, which terminates and then joins
    every daemon child); the worker then dies of it as by default. Ignoring every SIGTERM
    (SIG_IGN) left a parent that exited with a loader still open joined to it forever."""
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, Preemption.SIGNALS)
    # the default action (not the trainer's handler, inherited by the fork) for the one that
    # gets through; a pending signal stays pending (it would be discarded by SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def take():
        while True:
            info = signal.sigwaitinfo(Preemption.SIGNALS)
            if info.si_signo == signal.SIGTERM and info.si_pid == parent:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # this thread's
                os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=take, name="vlds-worker-signals", daemon=True).start()


class signals_blocked:
    """Block the preemption signals while the DataLoader forks its workers: a forked worker
    inherits the mask, so a signal that arrives before its `quiet_worker` runs waits for it
    (and is then dropped). The main process receives what arrived when the block ends."""

    def __enter__(self):
        self.old = signal.pthread_sigmask(signal.SIG_BLOCK, Preemption.SIGNALS)

    def __exit__(self, *exc):
        signal.pthread_sigmask(signal.SIG_SETMASK, self.old)


def stop_criteria(preemption: Preemption | None):
    """A transformers StoppingCriteria that ends generation at the next token once this process
    was signalled (the batch's predictions are then dropped: evaluation raises Preempted)."""
    if preemption is None:
        return None
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full(
                (input_ids.shape[0],), preemption.local, dtype=torch.bool, device=input_ids.device
            )

    return StoppingCriteriaList([_Stop()])


@dataclass
class Agreed:
    """What every rank agreed on after one step's forward pass."""

    loss: float  # the mean over ranks (NaN when a rank's loss was not finite)
    finite: bool  # every rank's loss is finite
    stop: bool  # a rank was signalled
    save: bool  # rank 0's clock says a time-based checkpoint is due
    applied: bool = True  # the step updated the weights (set by the trainer)


def step_sync(loss: torch.Tensor, stop: bool, save: bool, device) -> Agreed:
    """A step's bookkeeping in one all-reduce and one host read: the loss (summed: its mean for
    logging), a non-finite count, the stop flag and the save flag (counted: any rank's)."""
    d = loss.detach().float()
    flags = torch.tensor([float(stop), float(save)], device=device)
    t = torch.cat([d.mean().reshape(1), (~torch.isfinite(d)).any().float().reshape(1), flags])
    world = 1
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        world = dist.get_world_size()
    total, bad, n_stop, n_save = t.tolist()
    return Agreed(total / world, bad == 0, n_stop > 0, n_save > 0)


class NonFiniteGuard:
    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.total = 0

    def record(self, ok: bool, step: int, what: str) -> None:
        if ok:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        log.warning(
            "step %d skipped: %s (%d in a row, %d in total)", step, what, self.in_a_row, self.total
        )
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(
                f"{self.in_a_row} non-finite steps in a row (last: step {step}, {what}); the run "
                f"stopped and its last checkpoint is intact. Lower train.lr, check the data "
                f"(python -m vlds.data.synthetic for a known-good set), or use "
                f"--train.precision=fp32, then resume with --train.resume=latest"
            )
