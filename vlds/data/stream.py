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
   Each slot's raw samples of a task are shuffled in consecutive blocks of
   `data.shuffle_buffer` samples, each block by its own seeded RNG (`BlockShuffle`).
3. Step i of the schedule is produced by worker i % num_workers, which is the order torch's
   DataLoader returns worker outputs in: the schedule is kept exactly (on a resume at step k
   the loader's workers are rotated by k, so its first output is still step k).

Resume in O(1): every batch carries its reader's cursor (`CURSOR`: the worker, the step, and
per task the shuffle block's number, where that block starts - round, position in the round's
shard order, byte offset of the tar sample, entries of it already taken, the round's sample
counter - and how many of the block were handed out). The trainer keeps the cursor of the last
batch it consumed from each worker and saves them with the checkpoint; a resumed worker seeks
straight to its block's start, re-reads that one block (at most `data.shuffle_buffer` samples
per task) and goes on. Without cursors that fit (a checkpoint written before them, or a
different world size, number of workers, shard set or split), resuming at step k replays the
raw (undecoded) samples of the first k steps instead, with a warning: exact too, but it reads
everything before step k. A sample that fails to decode is replaced by a copy of a good one
from the same batch, so the raw stream never depends on decoding and both ways are exact.

Bad data (a truncated tar, an undecodable image or video, a record missing a field, a member
escaping the shard) is skipped and counted with a rate-limited warning; once more than
`data.max_bad_fraction` of a reader's samples are bad (and at least `MIN_BAD` of them), the
stream raises DataError naming the worst shards.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import random

import torch

from vlds.data.mixing import epoch_schedule, per_sentence
from vlds.data.shardio import DataError, SkipCounter, TaskIndex, read_range, read_samples

log = logging.getLogger(__name__)

CURSOR = "stream_cursor"  # the batch entry holding its reader's cursor (the trainer pops it)
# A reader's position: (round, position in the round's shard order, byte offset of a tar
# sample, entries of that tar sample already taken, the round's entry counter).
START = (0, 0, 0, 0, 0)


def consumed_state(stream: TrainStream, batches: list[dict], k: int, workers: int) -> dict:
    """The stream state a trainer saves after consuming `batches[:k]` of `stream`'s epoch (as
    `vlds.trainer.Trainer` does: the last cursor of each worker); `TrainStream.resume_from`
    takes it. For tests and benchmarks, which hold the batches."""
    last = {b[CURSOR]["worker"]: b[CURSOR] for b in batches[:k]}
    return {
        "epoch": stream.epoch,
        "step_in_epoch": k,
        "fingerprint": stream.fingerprint(workers),
        "cursors": list(last.values()),
    }


class SlotReader:
    """Raw samples of one (rank, worker) slot of one task, as described in the module
    docstring (with `per_sentence`, one per reference sentence of each record:
    `sentence_samples`), started at position `pos` (a `pos` read earlier) and keeping `pos`
    = the position after the last sample it yielded."""

    def __init__(
        self,
        index: TaskIndex,
        seed: int,
        epoch: int,
        slot: int,
        slots: int,
        on_error: SkipCounter,
        repeat: bool = True,
        per_sentence: bool = False,
        pos: tuple = START,
    ):
        self.index, self.key, self.slot, self.slots = index, f"{seed}-{epoch}", slot, slots
        self.on_error, self.repeat, self.per_sentence = on_error, repeat, per_sentence
        self.pos = tuple(pos)

    def shards(self, rnd: int) -> list[tuple[str, int]]:
        """The shards this slot reads in round `rnd`, in order: whole shards round-robin when
        there are at least as many as slots, otherwise all of them (every n-th sample kept)."""
        shards = list(self.index.shards)
        random.Random(f"{self.key}-{rnd}-{self.index.task}").shuffle(shards)
        return shards[self.slot :: self.slots] if len(shards) >= self.slots else shards

    def __iter__(self):
        read = sentence_samples if self.per_sentence else read_samples
        every = len(self.index.shards) < self.slots
        rnd, j, off, skip, i = self.pos
        while True:
            shards = self.shards(rnd)
            while j < len(shards):
                path, n = shards[j]
                at, taken = off, 0
                for s in read(path, self.on_error, n, start=off):
                    if s["__off__"] != at:
                        at, taken = s["__off__"], 0
                    taken += 1
                    if skip:  # taken before the position we started from
                        skip -= 1
                        continue
                    k, i = i, i + 1
                    if every and k % self.slots != self.slot:
                        continue
                    self.pos = (rnd, j, at, taken, i)
                    yield s
                j, off, skip = j + 1, 0, 0
            if not self.repeat:
                return
            rnd, j, i = rnd + 1, 0, 0


def slot_stream(index: TaskIndex, seed, epoch, slot, slots, on_error, repeat=True, **kw):
    """The raw samples of a `SlotReader` from the start of the epoch."""
    return iter(SlotReader(index, seed, epoch, slot, slots, on_error, repeat, **kw))


class BlockShuffle:
    """A shuffle buffer whose state is a position: the reader's samples in consecutive blocks
    of `size`, each shuffled by its own RNG (seeded by `key` and the block's number). `state`
    = (block, reader position at the block's start, samples of the block handed out): a
    reader started at that position, given that state, goes on exactly where this one was.
    (A reservoir buffer mixes across block edges but its state is its whole content.)"""

    def __init__(self, reader: SlotReader, size: int, key: str, block: int = 0, taken: int = 0):
        self.reader, self.size, self.key = reader, max(1, size), key
        self.state = (block, reader.pos, taken)

    def __iter__(self):
        block, _, taken = self.state
        it = iter(self.reader)
        while True:
            start = self.reader.pos
            buf = list(itertools.islice(it, self.size))
            if not buf:
                return
            random.Random(f"{self.key}-{block}").shuffle(buf)
            for x in buf[taken:]:
                taken += 1
                done = taken == len(buf) == self.size
                self.state = (block + 1, self.reader.pos, 0) if done else (block, start, taken)
                yield x
            block, taken = block + 1, 0


def sentence_samples(path: str, on_error: SkipCounter, expected: int | None = None, start: int = 0):
    """The samples of one shard, each caption record repeated once per reference sentence,
    in order, with "__sentence__" = its index (the Collator trains that copy on that caption;
    the payload bytes are shared, not copied). A record without captions (or an unreadable
    one, counted bad when decoded) stays one sample."""
    for s in read_samples(path, on_error, expected, start=start):
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
        self.cursors: dict[int, dict] = {}  # resume: the played worker -> its last cursor
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

    def fingerprint(self, workers: int) -> str:
        """What a cursor's positions depend on besides seed and epoch: the readers (world,
        rank, workers, split), the shards, the schedule and the shuffle blocks."""
        parts = [self.world, self.rank, max(1, workers), self.split, self.shuffle_buffer]
        parts += [self.caption_samples, self.schedule]
        parts += [(t, [n for _, n in idx.shards]) for t, idx in sorted(self.indexes.items())]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    def resume_from(self, state: dict | None, workers: int) -> bool:
        """Start at `skip_steps` from the cursors of `state` (`Trainer`'s saved stream state:
        {"epoch", "step_in_epoch", "fingerprint", "cursors"}) instead of replaying the first
        skip_steps steps. False (with a warning; the replay then runs) when they do not fit."""
        if not self.skip_steps:
            return True
        want = (self.epoch, self.skip_steps, self.fingerprint(workers))
        have = state and (state.get("epoch"), state.get("step_in_epoch"), state.get("fingerprint"))
        if have != want:
            why = (
                "the checkpoint has no stream cursors (written before they were saved)"
                if not state
                else "its stream cursors were written for another position, world size, number "
                "of data workers, shard set or split"
            )
            log.warning(
                "resuming at step %d of epoch %d by replaying the stream from the epoch's start: "
                "%s (exact, but it reads every sample before the step)",
                self.skip_steps,
                self.epoch,
                why,
            )
            return False
        self.cursors = {int(c["worker"]): c for c in state["cursors"]}
        return True

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
        # resumed with cursors: from the step after this worker's last consumed one
        cursor = self.cursors.get(w)
        shuffles, streams = {}, {}
        for t, idx in self.indexes.items():
            block, pos, taken = cursor["tasks"][t] if cursor else (0, START, 0)
            sent = per_sentence(t, self.caption_samples)
            reader = SlotReader(
                idx, self.seed, self.epoch, slot, slots, errors, per_sentence=sent, pos=pos
            )
            key = f"buf-{self.seed}-{self.epoch}-{slot}-{t}"
            shuffles[t] = BlockShuffle(reader, self.shuffle_buffer, key, block, taken)
            streams[t] = iter(shuffles[t])
        first = cursor["step"] + 1 if cursor else 0
        for i in range(first, len(self.schedule)):
            task = self.schedule[i]
            b = self.sizes[task]
            if glob:  # every step's global batch is consumed by every reader
                raw = [next(streams[task]) for _ in range(b * self.world)]
                raw = raw[self.rank * b : (self.rank + 1) * b]
            if i % nw != w:
                continue
            if not glob:
                raw = [next(streams[task]) for _ in range(b)]
            if i < self.skip_steps:
                continue  # resume by replay: consume the same raw samples, skip the decoding
            samples = decode_batch(raw, self.preprocess, errors, streams[task], b)
            batch = self.collate(samples, self.epoch)
            tasks = {t: [s.state[0], list(s.state[1]), s.state[2]] for t, s in shuffles.items()}
            batch[CURSOR] = {"worker": w, "step": i, "tasks": tasks}
            yield batch


class EvalStream(torch.utils.data.IterableDataset):
    """One task's validation samples (the first `max_samples`, or all), cut into one
    contiguous range per (rank, worker) slot, so each counts once and each slot reads the
    payloads of its own range only (`read_range`): a rank reads 1/world of the split, plus
    the json members before its range in the shard where it starts."""

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
        errors, batch = SkipCounter(max_fraction=self.max_bad_fraction), []
        n = self.index.total
        n = min(n, self.max_samples) if self.max_samples else n
        for s in read_range(self.index, slot * n // slots, (slot + 1) * n // slots, errors):
            try:
                batch.append(self.preprocess(s))
            except Exception as e:
                errors(e, s["__url__"])
            if len(batch) == self.bs:
                yield self.collate(batch)
                batch = []
        if batch:
            yield self.collate(batch)
