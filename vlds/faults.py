"""Fault injection for the reliability tests: make a failure happen at a chosen step.

Set VLDS_FAULTS to a comma list of `kind@step` (or `kind@first-last`):
    nan_loss@5        the loss of step 5 is NaN
    nan_grad@5-7      the loss is finite but its gradient is NaN at steps 5..7
    kill_save@4       the process SIGKILLs itself inside the checkpoint save of step 4,
                      after writing the files and before publishing them
    kill_replace@4    ... inside a save of step 4 that replaces an existing step4 folder,
                      after `latest` moved to the new copy and the old folder was removed
    hold@1-6          steps 1..6 each wait up to 10 s for a preemption signal, in a batch
                      job's first start only (SLURM_RESTART_COUNT unset or 0): the first start
                      is still training when SLURM's time-limit warning comes; the requeued
                      start runs at full speed
    slow_save@4       the save of step 4 sleeps 3 s after writing (a signal lands mid-save)
    slow_eval@4       each evaluation batch at step 4 sleeps 1 s (a signal lands mid-eval)
    kill@7            the process SIGKILLs itself as step 7 starts (a crash mid-epoch)
Unset (always, outside tests) every function here is a no-op.
"""

from __future__ import annotations

import os
import signal
import time

import torch

_step = 0


def _active(kind: str) -> bool:
    for item in filter(None, os.environ.get("VLDS_FAULTS", "").split(",")):
        name, _, steps = item.partition("@")
        first, _, last = steps.partition("-")
        if name == kind and int(first) <= _step <= int(last or first):
            return True
    return False


def set_step(step: int) -> None:
    global _step
    _step = step


class _NaNGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def corrupt_loss(loss: torch.Tensor) -> torch.Tensor:
    if _active("nan_loss"):
        return loss * float("nan")
    if _active("nan_grad"):
        return _NaNGrad.apply(loss)
    return loss


def maybe_kill(where: str) -> None:
    """where: "step" (kill@), "save" (kill_save@), "replace" (kill_replace@)."""
    if _active("kill" if where == "step" else f"kill_{where}"):
        os.kill(os.getpid(), signal.SIGKILL)


def hold(signalled) -> None:
    """hold@: wait (up to 10 s, polling `signalled()`) in a job's first start."""
    if _active("hold") and os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
        t0 = time.monotonic()
        while not signalled() and time.monotonic() - t0 < 10:
            time.sleep(0.05)


def maybe_sleep(where: str, seconds: float) -> None:
    """where: "save" (slow_save@), "eval" (slow_eval@)."""
    if _active(f"slow_{where}"):
        time.sleep(seconds)
