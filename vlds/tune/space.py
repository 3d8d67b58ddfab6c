"""The search space: learning rate x adapter reduction factor (x PEFT method), its defaults (the
per-trial step budget and ASHA's rungs included), and `Setup`, the settings every trial shares.

The grid takes the geometric centres of equal log-bins of the learning-rate range (`lr_grid`);
the heatmap bins trials the same way (`lr_bin`). `--samples N` draws N random points instead.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

LR_RANGE = (1e-3, 4e-2)  # log-uniform; the grid takes the geometric centres of equal log-bins
LR_POINTS = 4
REDUCTION_FACTORS = [2, 4, 8, 16]  # bottleneck = d_model / r: each must divide d_model (64 tiny)
METHODS = ["single_adapter"]  # any of vlds.peft.METHODS that uses peft.reduction_factor

# ---- ASHA and the per-trial budget (training steps) --------------------------------------------
MAX_STEPS = 960  # a trial that survives every rung trains this long (sizes its LR schedule)
GRACE = 120  # first rung: every trial trains at least this long
ETA = 4  # ASHA's reduction factor: the top 1/ETA at a rung go on (rungs at 120, 480)
EVAL_EVERY = 120  # must divide the rungs; a checkpoint is written at the same steps (resume)


def rungs(grace: int, eta: int, max_steps: int) -> list[int]:
    """ASHA's milestones (grace * eta^k below max_steps), then the end (max_steps)."""
    out, t = [], grace
    while t < max_steps:
        out.append(t)
        t *= eta
    return [*out, max_steps]


# A tiny-preset search (the default) also gives every trial: micro-batch 16 (twice the steps per
# second of the preset's 32 on 2 cores, and as much learning per step), one data process per
# 1-CPU trial, a small evaluation. Command-line overrides win.
TINY_SEARCH = {
    "data.batch_size": 16,
    "data.num_workers": 0,
    "eval.max_samples": 64,
    "eval.caption_beams": 1,
}
TRIAL_RUN = {"train.keep_last": 1, "train.log_every": 20}  # every search


def lr_edges(lo: float, hi: float, n: int) -> list[float]:
    """The n + 1 edges of n equal log-bins of [lo, hi]."""
    a, b = math.log10(lo), math.log10(hi)
    return [10 ** (a + i * (b - a) / n) for i in range(n + 1)]


def lr_grid(lo: float, hi: float, n: int) -> list[float]:
    """Geometric centres of n equal log-bins of [lo, hi], 2 significant digits."""
    e = lr_edges(lo, hi, n)
    return [float(f"{math.sqrt(x * y):.2g}") for x, y in zip(e, e[1:], strict=False)]


def lr_bin(lr: float, lo: float, hi: float, n: int) -> int:
    """The log-bin of [lo, hi] (n bins) that holds lr; out-of-range values go to an end bin."""
    return min(n - 1, max(0, int(n * math.log(lr / lo) / math.log(hi / lo))))


@dataclass
class Setup:
    """Everything a trial needs besides its point (sent to every trial)."""

    preset: str
    overrides: dict  # TINY_SEARCH / TRIAL_RUN + command-line overrides, data.root resolved
    runs_dir: str  # trial t writes its vlds run into runs_dir/t
    max_steps: int
    eval_every: int
    procs: int = 1  # ranks per trial; > 1 launches torchrun in a subprocess
    java_metrics: bool = False
    embedded_data: bool = False  # data.root is the shapes world generated on this machine


def param_space(args) -> dict:
    """Tune's param_space: a shuffled grid of points, or (--samples N) distributions to draw."""
    from ray import tune

    if args.samples:  # random search: log-uniform learning rate, reduction factor from the list
        return {
            "lr": tune.loguniform(*args.lr_range),
            "reduction_factor": tune.choice(args.reduction_factors),
            "method": tune.choice(args.methods),
        }
    # The grid in a shuffled, fixed order: asynchronous halving always promotes the first
    # arrivals at a rung, so with few concurrent trials a sorted grid would run its lowest
    # learning rates to the end.
    lrs = lr_grid(*args.lr_range, args.lr_points)
    points = [
        {"lr": lr, "reduction_factor": r, "method": m}
        for m in args.methods
        for lr in lrs
        for r in args.reduction_factors
    ]
    random.Random(args.seed).shuffle(points)
    return {"point": tune.grid_search(points)}
