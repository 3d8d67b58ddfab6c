"""Multi-task mixing: the task of every step of an epoch, identical on every rank.

Every rank computes the same list of tasks, one entry per step, shuffled with (seed, epoch).
`data.mixing` sets how often each task appears: "proportional" (the reference)
`samples // (world x batch)` times; "weights" and "temperature" redistribute the same number of
steps. So every rank runs the same number of steps and no collective hangs, however unevenly
the shards divide.
"""

from __future__ import annotations

import math
import random

from vlds.config import ConfigError, config_check
from vlds.data.shardio import DataError, TaskIndex

MIXING = ("proportional", "weights", "temperature")


@config_check
def check_mixing(cfg) -> None:
    """data.mixing, its weights and temperature, and the per-task batch scales."""
    d, tasks = cfg.data, cfg.task_list
    if d.mixing not in MIXING:
        raise ConfigError(f"data.mixing={d.mixing!r}; valid: {', '.join(MIXING)}")
    if d.mixing == "weights":
        try:
            parse_mixing_weights(d.mixing_weights, tasks)
        except DataError as e:
            raise ConfigError(str(e)) from None
    elif d.mixing_weights:
        raise ConfigError(
            f"data.mixing_weights is set but data.mixing={d.mixing!r}; add --data.mixing=weights"
        )
    if d.mixing == "temperature" and not d.mixing_temperature > 0:
        raise ConfigError(f"data.mixing_temperature={d.mixing_temperature} must be > 0 (e.g. 2)")


def task_batch_sizes(tasks: list[str], batch_size: int, scale: str) -> dict[str, int]:
    sizes = {t: batch_size for t in tasks}
    for item in filter(None, (s.strip() for s in scale.split(","))):
        name, _, factor = item.partition("=")
        if name not in sizes:
            raise DataError(f"data.task_batch_scale names {name!r}, not one of the tasks {tasks}")
        sizes[name] = max(1, round(batch_size * float(factor)))
    return sizes


def parse_mixing_weights(spec: str, tasks: list[str]) -> dict[str, float]:
    """ "vqa=2,gqa=1" -> {"vqa": 2.0, "gqa": 1.0}; every task needs a weight > 0. A weight for
    a known task this run does not train is ignored (a preset's weights stay valid when
    data.tasks picks some of its tasks); an unknown name is an error."""
    from vlds.data.tasks import TASKS

    weights = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, eq, value = (x.strip() for x in item.partition("="))
        if name not in tasks and name not in TASKS:
            raise DataError(f"data.mixing_weights names {name!r}, not one of the tasks {tasks}")
        try:
            w = float(value) if eq else float("nan")
        except ValueError:
            w = float("nan")
        if not (w > 0 and math.isfinite(w)):
            raise DataError(f"data.mixing_weights: {item!r} needs a weight > 0, e.g. {name}=2")
        if name in tasks:
            weights[name] = w
    missing = [t for t in tasks if t not in weights]
    if missing:
        raise DataError(
            f"data.mixing_weights gives no weight to {missing}; give every task of data.tasks "
            f"one, e.g. --data.mixing_weights={','.join(f'{t}=1' for t in tasks)}"
        )
    return weights


def mixing_counts(
    batches: dict[str, int], mixing: str, weights: str = "", temperature: float = 1.0
) -> dict[str, int]:
    """Steps per task in an epoch. `batches` are the proportional counts; "weights" and
    "temperature" keep their total and share it by weight, or by batches^(1/T) (T = 1 is
    proportional, large T uniform), rounding by largest remainder (deterministic)."""
    if mixing == "proportional":
        return dict(batches)
    if mixing == "weights":
        p = parse_mixing_weights(weights, list(batches))
    elif mixing == "temperature":
        if not temperature > 0:
            raise DataError(f"data.mixing_temperature={temperature} must be > 0")
        p = {t: n ** (1.0 / temperature) for t, n in batches.items()}
    else:
        raise DataError(f"data.mixing={mixing!r}; valid: {', '.join(MIXING)}")
    total, z = sum(batches.values()), sum(p.values())
    exact = {t: total * p[t] / z for t in batches}
    counts = {t: math.floor(x) for t, x in exact.items()}
    order = sorted(batches, key=lambda t: counts[t] - exact[t])  # largest remainder first
    for t in order[: total - sum(counts.values())]:
        counts[t] += 1
    return counts


def epoch_schedule(
    indexes: dict[str, TaskIndex],
    sizes: dict[str, int],
    world: int,
    seed: int,
    epoch: int,
    mixing: str = "proportional",
    weights: str = "",
    temperature: float = 1.0,
) -> list[str]:
    """The task of every step of an epoch, identical on every rank."""
    batches = {}
    for t, idx in indexes.items():
        batches[t] = idx.total // (world * sizes[t])
        if batches[t] == 0:
            raise DataError(
                f"task {t!r} has {idx.total} samples, fewer than one global batch "
                f"({world} ranks x {sizes[t]}); lower data.batch_size or add data"
            )
    sched = []
    for t, n in mixing_counts(batches, mixing, weights, temperature).items():
        sched += [t] * n
    random.Random(f"schedule-{seed}-{epoch}").shuffle(sched)
    return sched
