"""Guards of a long run: preemption signals and non-finite steps, agreed on by every rank.

- SIGTERM / SIGUSR1 (SLURM's warning signal, a scheduler's preemption) set a flag; after the
  current step every rank learns whether any rank was signalled, and all of them save a
  checkpoint and exit 0 together, so a requeued job resumes with `--train.resume=latest`.
- A non-finite loss on any rank skips the step on every rank (no backward, no optimizer step);
  a non-finite gradient with a finite loss is caught by DeepSpeed's gradient-norm check, which
  discards the update. Both are counted; `train.max_bad_steps` in a row stop the run with an
  error, the last good checkpoint untouched.
"""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

log = logging.getLogger("vlds")


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row."""


def any_rank(flag: bool, device) -> bool:
    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class Preemption:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, signals=SIGNALS):
        self.received: int | None = None
        for sig in signals:
            signal.signal(sig, self._handler)

    def _handler(self, signum, _frame):
        self.received = signum  # acted on at the next step boundary, never mid-step

    def requested(self, device) -> bool:
        return any_rank(self.received is not None, device)


class NonFiniteGuard:
    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.total = 0

    def loss_is_finite(self, loss: torch.Tensor, device) -> bool:
        """True when the loss is finite on every rank (one collective per step)."""
        return not any_rank(not bool(torch.isfinite(loss.detach()).all()), device)

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
