"""The search space: learning rate x adapter reduction factor (x PEFT method), its defaults per
preset (the per-trial step budget and the rungs included), and `Setup`, the settings every trial
shares.

The grid takes the geometric centres of equal log-bins of the learning-rate range (`lr_grid`);
the heatmap bins trials the same way (`lr_bin`). `--samples N` draws N random points instead.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

METHODS = ["single_adapter"]  # any of vlds.peft.METHODS that uses peft.reduction_factor

# ---- the space and the per-trial budget (training steps), per preset ---------------------------
# lr_range: log-uniform, the grid takes the geometric centres of lr_points equal log-bins;
# reduction factors: bottleneck = d_model / r, each must divide d_model; max_steps: a trial that
# survives every rung trains this long (it sizes the LR schedule); eval_every: an evaluation (and
# a checkpoint) every so many steps, the rungs' resolution.
SPACES = {
    # the tiny presets (the embedded default, d_model 64): 16 configurations, minutes on 2 cores
    "tiny": {
        "lr_range": (1e-3, 4e-2),
        "lr_points": 4,
        "reduction_factors": [2, 4, 8, 16],
        "max_steps": 960,
        "eval_every": 60,
    },
    # the real image presets (d_model 768): around the recipe's adapter learning rate (1e-3,
    # vlds.recipe, the middle point) and the paper's r = 8; a trial trains about two epochs of
    # the four image tasks at the recipe's batch. Not run by the project (no GPUs here).
    "base": {
        "lr_range": (3.2e-4, 3.2e-3),
        "lr_points": 3,
        "reduction_factors": [4, 8, 16, 32],
        "max_steps": 8000,
        "eval_every": 500,
    },
    # the real video preset: around the recipe's video learning rate (3e-4)
    "base-video": {
        "lr_range": (1e-4, 1e-3),
        "lr_points": 3,
        "reduction_factors": [4, 8, 16, 32],
        "max_steps": 4000,
        "eval_every": 250,
    },
}
ETA = 4  # the best 1/ETA at a rung go on
# successive halving's state, in the experiment folder (a subfolder: vlds/tune/scheduler.py)
HALVING_STATE = "halving/state.json"
# A rung ranks by the validation loss (the other, the score, breaks ties), averaged over the
# trial's last 3 evaluations (the tiny search: 180 steps). Replayed on the full grids of seeds
# 3-5 (bench/search_regret.py --replay), the loss chose within 0.3 / 0.0 / 1.2 points of each
# grid's best, the validation average 6.9 / 0.0 / 7.6 points: early in training the average
# (exact-match answers, CIDEr) is still coarse where the loss already ranks the configurations.
RUNG_METRIC = "loss"
RUNG_WINDOW = 3
GRACE_FRACTION = 8  # the first rung: 1/8 of max_steps, rounded up to an evaluation


def space_of(preset: str) -> dict:
    """The defaults of a preset's search (SPACES)."""
    if preset.startswith("tiny"):
        return SPACES["tiny"]
    return SPACES["base-video" if "video" in preset else "base"]


def default_grace(max_steps: int, eval_every: int) -> int:
    """The first rung: max_steps / GRACE_FRACTION, rounded up to a multiple of eval_every."""
    return max(eval_every, math.ceil(max_steps / GRACE_FRACTION / eval_every) * eval_every)


def rungs(grace: int, eta: int, max_steps: int) -> list[int]:
    """ASHA's milestones (grace * eta^k below max_steps), then the end (max_steps)."""
    out, t = [], grace
    while t < max_steps:
        out.append(t)
        t *= eta
    return [*out, max_steps]


# A tiny-preset search (the default) also gives every trial: micro-batch 16 (twice the steps per
# second of the preset's 32 on 2 cores, and as much learning per step), one data process per
# 1-CPU trial, an evaluation of the whole validation split (300 samples per task on the embedded
# default: at 64 the scores' noise hid the configurations' differences) without the
# shuffled-image pass, greedy captions. Command-line overrides win.
TINY_SEARCH = {
    "data.batch_size": 16,
    "data.num_workers": 0,
    "eval.max_samples": 0,
    "eval.caption_beams": 1,
    "eval.shuffled_images": False,
}
# A real preset's search: each rung ranks on 2,000 validation samples per task
BASE_SEARCH = {"eval.max_samples": 2000}
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


def n_points(args) -> int:
    """The number of configurations the search tries."""
    if args.samples:
        return args.samples
    return args.lr_points * len(args.reduction_factors) * len(args.methods)


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
