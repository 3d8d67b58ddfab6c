"""WebDataset streaming: shards -> decoded, tokenised, single-task batches, mixed across tasks.

The shards and their index: vlds.data.shardio; decoding: vlds.data.decode; the schedule:
vlds.data.mixing. The loaders around these streams: vlds.data.build.

Training stream, per epoch (everything a pure function of seed, epoch, rank and worker):
1. Schedule: every rank computes the same list of tasks, one entry per step, shuffled with
   (seed, epoch). `data.mixing` sets how often each task appears: "proportional" (the
   reference) `samples // (world x batch)` times; "weights" and "temperature" redistribute the
   same number of steps. So every rank runs the same number of steps and no collective hangs,
   however unevenly the shards divide.
2. Each (rank, worker) slot reads its own slice of every task's shards, shuffled by
   (seed, epoch, round); with `data.caption_samples=sentence` a caption record is one sample
   per reference sentence (the reference's COCO Karpathy / TVC / YC2C training sets), placed
   consecutively and spread by the shuffle buffer. Whole shards go round-robin when there are
   at least as many shards as slots, otherwise every slot reads all shards and keeps every
   n-th sample (correct, but each shard is read by every slot). The slice repeats (new shuffle
   each round) so a slot never runs dry, which is also what lets weighted mixing oversample a
   small task.
3. Step i of the schedule is produced by worker i % num_workers, which is the order torch's
   DataLoader returns worker outputs in: the schedule is kept exactly (on a resume at step k
   the loader's workers are rotated by k, so its first output is still step k).
Resuming at step k of an epoch replays the raw (undecoded) samples of the first k steps. A
sample that fails to decode is replaced by a copy of a good one from the same batch, so the
raw stream never depends on decoding and the replay is exact.

Bad data (a truncated tar, an undecodable image or video, a record missing a field, a member
escaping the shard) is skipped and counted with a rate-limited warning; once more than
`data.max_bad_fraction` of a reader's samples are bad (and at least `MIN_BAD` of them), the
stream raises DataError naming the worst shards.
"""

from __future__ import annotations

import json
import random

import torch

from vlds.data.mixing import epoch_schedule, per_sentence
from vlds.data.shardio import DataError, SkipCounter, TaskIndex, read_samples


def slot_stream(
    index: TaskIndex,
    seed: int,
    epoch: int,
    slot: int,
    slots: int,
    on_error: SkipCounter,
    repeat: bool = True,
    per_sentence: bool = False,
):
    """Raw samples of one (rank, worker) slot, as described in the module docstring; with
    `per_sentence`, one per reference sentence of each record (`sentence_samples`)."""
    rnd = 0
    read = sentence_samples if per_sentence else read_samples
    while True:
        shards = list(index.shards)
        random.Random(f"{seed}-{epoch}-{rnd}-{index.task}").shuffle(shards)
        if len(shards) >= slots:
            for path, n in shards[slot::slots]:
                yield from read(path, on_error, n)
        else:
            i = 0
            for path, n in shards:
                for s in read(path, on_error, n):
                    if i % slots == slot:
                        yield s
                    i += 1
        if not repeat:
            return
        rnd += 1


def sentence_samples(path: str, on_error: SkipCounter, expected: int | None = None):
    """The samples of one shard, each caption record repeated once per reference sentence,
    in order, with "__sentence__" = its index (the Collator trains that copy on that caption;
    the payload bytes are shared, not copied). A record without captions (or an unreadable
    one, counted bad when decoded) stays one sample."""
    for s in read_samples(path, on_error, expected):
        try:
            n = len(json.loads(s["json"]).get("captions") or ())
        except (ValueError, TypeError, AttributeError):
            n = 0
        if not n:
            yield s
        for i in range(n):
            yield {**s, "__sentence__": i}


def reader_split_notes(indexes: dict[str, TaskIndex], world: int, workers: int) -> list[str]:
    """One line per task with fewer shards than readers (ranks x workers): those fall back to
    a per-sample split, where every reader reads every shard."""
    readers = world * max(1, workers)
    return [
        f"task {t}: {len(idx.shards)} shard(s) < {world} rank(s) x {max(1, workers)} worker(s); "
        f"every reader reads all of them and keeps every {readers}-th sample (correct, but "
        f"{readers}x the reading): write >= {readers} shards (smaller --samples-per-shard) "
        f"for large runs"
        for t, idx in indexes.items()
        if len(idx.shards) < readers
    ]


def shuffled(it, bufsize: int, rng: random.Random):
    """Reservoir-style shuffle buffer."""
    buf = []
    for x in it:
        if len(buf) < bufsize:
            buf.append(x)
            continue
        j = rng.randrange(len(buf))
        buf[j], x = x, buf[j]
        yield x
    rng.shuffle(buf)
    yield from buf


def decode_batch(raw, preprocess, errors: SkipCounter, more, want: int) -> list[dict]:
    """Decode a batch; undecodable samples are replaced by copies of good ones of the same
    batch (the raw stream position stays independent of decoding); only a batch with no good
    sample at all draws more from `more`."""
    samples = []
    for s in raw:
        try:
            samples.append(preprocess(s))
        except Exception as e:
            errors(e, s.get("__url__"))
    while not samples:
        s = next(more)
        try:
            samples.append(preprocess(s))
        except Exception as e:
            errors(e, s.get("__url__"))
    k = len(samples)
    return samples + [samples[i % k] for i in range(want - k)]


class TrainStream(torch.utils.data.IterableDataset):
    """Mixed single-task batches of one epoch for one rank (see the module docstring)."""

    def __init__(
        self,
        indexes,
        sizes,
        preprocess,
        collate,
        *,
        rank,
        world,
        seed,
        epoch,
        shuffle_buffer,
        skip_steps=0,
        split="shard",
        mixing="proportional",
        mixing_weights="",
        mixing_temperature=1.0,
        max_bad_fraction=0.01,
        caption_samples="sentence",
    ):
        super().__init__()
        if split not in ("shard", "global"):
            raise DataError(f"data.split={split!r}; valid: shard, global")
        self.caption_samples = caption_samples
        self.split = split
        self.indexes, self.sizes = indexes, sizes
        self.preprocess, self.collate = preprocess, collate
        self.rank, self.world, self.seed, self.epoch = rank, world, seed, epoch
        self.shuffle_buffer, self.skip_steps = shuffle_buffer, skip_steps
        self.max_bad_fraction = max_bad_fraction
        self.schedule = epoch_schedule(
            indexes,
            sizes,
            world,
            seed,
            epoch,
            mixing,
            mixing_weights,
            mixing_temperature,
            caption_samples,
        )

    def __len__(self) -> int:
        return len(self.schedule) - self.skip_steps

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        # The DataLoader returns outputs round-robin from its worker 0: resumed at step k,
        # loader worker j plays worker (j + k) % nw, so step k still comes first.
        w = (w + self.skip_steps) % nw
        slot, slots = self.rank * nw + w, self.world * nw
        # "global": every reader walks the same sample stream and takes its slice of each global
        # batch, so the global batch does not depend on the world size (more reading, exact
        # 1-rank / N-rank equivalence); "shard": each reader has its own shards (less I/O).
        glob = self.split == "global"
        if glob:
            slot, slots = 0, 1
        errors = SkipCounter(max_fraction=self.max_bad_fraction)
        streams = {}
        for t, idx in self.indexes.items():
            rng = random.Random(f"buf-{self.seed}-{self.epoch}-{slot}-{t}")
            sent = per_sentence(t, self.caption_samples)
            raw = slot_stream(idx, self.seed, self.epoch, slot, slots, errors, per_sentence=sent)
            streams[t] = shuffled(raw, self.shuffle_buffer, rng)
        for i, task in enumerate(self.schedule):
            b = self.sizes[task]
            if glob:  # every step's global batch is consumed by every reader
                raw = [next(streams[task]) for _ in range(b * self.world)]
                raw = raw[self.rank * b : (self.rank + 1) * b]
            if i % nw != w:
                continue
            if not glob:
                raw = [next(streams[task]) for _ in range(b)]
            if i < self.skip_steps:
                continue  # resume: consume the same raw samples, skip the decoding
            samples = decode_batch(raw, self.preprocess, errors, streams[task], b)
            yield self.collate(samples, self.epoch)


class EvalStream(torch.utils.data.IterableDataset):
    """One task's validation samples; sample i goes to slot i % slots, so each counts once."""

    def __init__(
        self,
        index: TaskIndex,
        preprocess,
        collate,
        *,
        rank,
        world,
        batch_size,
        max_samples=0,
        max_bad_fraction=0.01,
    ):
        super().__init__()
        self.index, self.preprocess, self.collate = index, preprocess, collate
        self.rank, self.world, self.bs, self.max_samples = rank, world, batch_size, max_samples
        self.max_bad_fraction = max_bad_fraction

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        slot, slots = self.rank * nw + w, self.world * nw
        errors, batch, i = SkipCounter(max_fraction=self.max_bad_fraction), [], 0
        for path, n in self.index.shards:
            for s in read_samples(path, errors, n):
                if self.max_samples and i >= self.max_samples:
                    break
                if i % slots == slot:
                    try:
                        batch.append(self.preprocess(s))
                    except Exception as e:
                        errors(e, path)
                    if len(batch) == self.bs:
                        yield self.collate(batch)
                        batch = []
                i += 1
        if batch:
            yield self.collate(batch)
