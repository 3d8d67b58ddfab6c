"""Multi-task mixing: the task of every step of an epoch, identical on every rank.

Every rank computes the same list of tasks, one entry per step, shuffled with (seed, epoch).
`data.mixing` sets how often each task appears: "proportional" (the reference)
`samples // (world x batch)` times; "weights" and "temperature" redistribute the same number of
steps. So every rank runs the same number of steps and no collective hangs, however unevenly
the shards divide. A caption task's samples are its reference sentences with
`data.caption_samples=sentence` (the reference: COCO's ~5 per image), from the split's index.
"""

from __future__ import annotations

import math
import random

from vlds.config import ConfigError, config_check, global_batch
from vlds.data.shardio import DataError, TaskIndex
from vlds.recipe import parse_scale

MIXING = ("proportional", "weights", "temperature")
CAPTION_SAMPLES = ("sentence", "image")


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
    try:
        task_batch_sizes(tasks, d.batch_size, d.task_batch_scale)
    except DataError as e:
        raise ConfigError(str(e)) from None
    if d.mixing == "temperature" and not d.mixing_temperature > 0:
        raise ConfigError(f"data.mixing_temperature={d.mixing_temperature} must be > 0 (e.g. 2)")
    if d.caption_samples not in CAPTION_SAMPLES:
        raise ConfigError(
            f"data.caption_samples={d.caption_samples!r}; valid: sentence (one training sample "
            f"per reference caption, the reference), image (one per image)"
        )


def per_sentence(task: str, caption_samples: str) -> bool:
    """Whether `task`'s training stream has one sample per reference sentence."""
    from vlds.data.tasks import get_task

    if caption_samples not in CAPTION_SAMPLES:
        raise DataError(f"data.caption_samples={caption_samples!r}; valid: sentence, image")
    return caption_samples == "sentence" and get_task(task).generative_caption


def train_samples(index: TaskIndex, caption_samples: str) -> int:
    """Training samples of a split per epoch: its records, or for a caption task with
    caption_samples="sentence" its reference sentences, read from the index (the writers
    record them; the shards are not read)."""
    if not per_sentence(index.task, caption_samples):
        return index.total
    if index.sentences is None:
        raise DataError(
            f"the {index.task}/{index.split} index was written before shard writers recorded "
            f"sentence counts, which data.caption_samples=sentence sizes the epoch from; add "
            f"them with python -m vlds.data.prep.recount DATA_ROOT --tasks {index.task} (reads "
            f"only the json members), or train one sample per image with "
            f"--data.caption_samples=image"
        )
    return index.sentences


def task_batch_sizes(tasks: list[str], batch_size: int, scale: str) -> dict[str, int]:
    """Each task's micro-batch: int(batch_size x factor), as the reference's int(batch x 100/60)
    (a factor may be a fraction, vlds.recipe.parse_scale), at least 1."""
    try:
        factors = parse_scale(scale)
    except ValueError as e:
        raise DataError(str(e)) from None
    from vlds.data.tasks import TASKS

    # a known task this run does not train is ignored (the recipe's scales stay valid when
    # data.tasks picks some of its tasks), an unknown name is an error
    unknown = [name for name in factors if name not in tasks and name not in TASKS]
    if unknown:
        raise DataError(f"data.task_batch_scale names {unknown[0]!r}, not a task; valid: {tasks}")
    # the epsilon keeps 60 x 100/60 at 100 where float division lands just below
    return {t: max(1, int(batch_size * factors.get(t, 1.0) + 1e-9)) for t in tasks}


def run_batch_sizes(cfg, world: int) -> dict[str, int]:
    """Each task's micro-batch in a run of `world` ranks. With train.global_batch_size, each
    task's global batch is the reference's int(global x factor), shared over world x
    accumulation (rounded); so 8 ranks of bart-base take GQA 833 / 8 -> 104, not int(62 x 100 /
    60) = 103, and the step shares stay the reference's. Without it, int(micro x factor)."""
    _, accum, micro = global_batch(cfg, world)
    tasks, scale = cfg.task_list, cfg.data.task_batch_scale
    target = cfg.train.global_batch_size
    if target <= 0:
        return task_batch_sizes(tasks, micro, scale)
    share = world * accum
    return {t: max(1, round(n / share)) for t, n in task_batch_sizes(tasks, target, scale).items()}


def task_batches(totals: dict[str, int], sizes: dict[str, int], world: int) -> dict[str, int]:
    """Proportional steps per task: its samples // one global batch of it (world x micro)."""
    return {t: n // (world * sizes[t]) for t, n in totals.items()}


def step_shares(
    totals: dict[str, int], sizes: dict[str, int], world: int, data
) -> dict[str, float]:
    """Each task's % of an epoch's steps under the run's mixing (`data`: a DataConfig)."""
    counts = mixing_counts(
        task_batches(totals, sizes, world),
        data.mixing,
        data.mixing_weights,
        data.mixing_temperature,
    )
    total = sum(counts.values())
    return {t: 100.0 * n / total for t, n in counts.items()}


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
    caption_samples: str = "sentence",
) -> list[str]:
    """The task of every step of an epoch, identical on every rank; a task's batches count
    its `train_samples` (a caption task's sentences with caption_samples="sentence")."""
    totals = {t: train_samples(idx, caption_samples) for t, idx in indexes.items()}
    batches = task_batches(totals, sizes, world)
    for t, n in batches.items():
        if n == 0:
            raise DataError(
                f"task {t!r} has {totals[t]} samples, fewer than one global batch "
                f"({world} ranks x {sizes[t]}); lower data.batch_size or add data"
            )
    sched = []
    for t, n in mixing_counts(batches, mixing, weights, temperature).items():
        sched += [t] * n
    random.Random(f"schedule-{seed}-{epoch}").shuffle(sched)
    return sched
