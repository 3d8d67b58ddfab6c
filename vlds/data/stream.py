"""WebDataset streaming: shards -> decoded, tokenised, single-task batches, mixed across tasks.

Layout on disk (written by vlds.data.synthetic and the converters): `{root}/{task}/{split}-*.tar`
plus `{root}/{task}/{split}.index.json` with per-shard sample counts.

Training stream, per epoch (everything a pure function of seed, epoch, rank and worker):
1. Schedule: every rank computes the same list of tasks, one entry per step, each task appearing
   `samples // (world x batch)` times (the reference's proportional mixing), shuffled with
   (seed, epoch). So every rank runs the same number of steps and no collective hangs, however
   unevenly the shards divide.
2. Each (rank, worker) slot reads its own slice of every task's shards, shuffled by
   (seed, epoch, round): whole shards round-robin when there are at least as many shards as
   slots, otherwise every slot reads all shards and keeps every n-th sample. The slice repeats
   (new shuffle each round) so a slot never runs dry.
3. Step i of the schedule is produced by worker i % num_workers, which is the order torch's
   DataLoader returns worker outputs in: the schedule is kept exactly.
Resuming at step k of an epoch replays the raw (undecoded) samples of the first k steps.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlds.data.tasks import get_task

log = logging.getLogger(__name__)

# Shard members we decode; anything else (e.g. .pyd/.pickle) is never read, let alone unpickled.
ALLOWED_EXTS = {
    "json",
    "jpg",
    "jpeg",
    "png",
    "img0.jpg",
    "img1.jpg",
    "img0.png",
    "img1.png",
    "frames.npy",
    "frames.npy.gz",
    "feats.npy",
}


class DataError(ValueError):
    """Missing or malformed data, reported with the path and what to do about it."""


@dataclass(frozen=True)
class TaskIndex:
    task: str
    split: str
    shards: tuple[tuple[str, int], ...]  # (absolute path, samples)

    @property
    def total(self) -> int:
        return sum(n for _, n in self.shards)


def load_index(root: str | Path, task: str, split: str) -> TaskIndex:
    d = Path(root) / task
    f = d / f"{split}.index.json"
    if not Path(root).is_dir():
        raise DataError(
            f"data folder {root} does not exist; point --data.root at a folder of shards "
            f"(python -m vlds.data.synthetic writes one) or leave it empty for the embedded data"
        )
    if not f.is_file():
        raise DataError(
            f"no shard index {f} for task {task!r} split {split!r}; write the shards with "
            f"python -m vlds.data.synthetic (or the converter for {task}), or drop {task} from "
            f"--data.tasks"
        )
    idx = json.loads(f.read_text())
    shards = []
    for s in idx["shards"]:
        p = (d / s["url"]).resolve()
        if d.resolve() not in p.parents:
            raise DataError(f"{f}: shard {s['url']!r} is outside the task folder {d}; refusing it")
        if not p.is_file():
            raise DataError(f"{f} lists {p}, which is missing; re-run the shard writer")
        shards.append((str(p), int(s["samples"])))
    if not shards:
        raise DataError(f"{f} lists no shards; re-run the shard writer")
    return TaskIndex(task, split, tuple(shards))


class Preprocess:
    """Raw shard sample -> {task, id, rec, visual tensor}; CLIP resize/crop/normalise."""

    def __init__(self, image_size: int, mean, std):
        self.size = image_size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def _to_tensor(self, arr: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0
        return (x - self.mean) / self.std  # (3, S, S)

    def image(self, data: bytes) -> torch.Tensor:
        from PIL import Image

        img = Image.open(io.BytesIO(data)).convert("RGB")
        w, h = img.size
        scale = self.size / min(w, h)  # shorter side -> size (bicubic), then centre crop
        if (w, h) != (self.size, self.size):
            img = img.resize(
                (max(self.size, round(w * scale)), max(self.size, round(h * scale))), Image.BICUBIC
            )
            w, h = img.size
            left, top = (w - self.size) // 2, (h - self.size) // 2
            img = img.crop((left, top, left + self.size, top + self.size))
        return self._to_tensor(np.array(img))  # a writable copy

    def frames(self, data: bytes, gzipped: bool = False) -> torch.Tensor:
        if gzipped:
            data = gzip.decompress(data)
        arr = np.load(io.BytesIO(data), allow_pickle=False)  # (T, H, W, 3) uint8
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise DataError(f"frames.npy has shape {arr.shape}, expected (T, H, W, 3)")
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0  # (T, 3, H, W)
        if x.shape[-2:] != (self.size, self.size):
            x = torch.nn.functional.interpolate(
                x, size=(self.size, self.size), mode="bicubic", align_corners=False
            ).clamp(0, 1)
        return (x - self.mean) / self.std  # (T, 3, S, S)

    def __call__(self, sample: dict) -> dict:
        rec = json.loads(sample["json"])
        task = get_task(rec["task"])
        if task.kind == "image":
            data = sample.get("jpg") or sample.get("jpeg") or sample.get("png")
            visual = self.image(data).unsqueeze(0)  # (1, 3, S, S)
        elif task.kind == "pair":
            imgs = [sample.get(f"img{i}.jpg") or sample.get(f"img{i}.png") for i in (0, 1)]
            visual = torch.stack([self.image(b) for b in imgs])  # (2, 3, S, S)
        else:
            gz = "frames.npy.gz" in sample
            visual = self.frames(sample["frames.npy.gz" if gz else "frames.npy"], gz)
        return {
            "task": task.name,
            "id": str(rec["id"]),
            "rec": rec,
            "visual": visual,
            "key": sample["__key__"],
        }


class SkipCounter:
    """Counts skipped samples; warns at most every `every` skips (rate-limited)."""

    def __init__(self, every: int = 100):
        self.count, self.every = 0, every

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        if self.count == 1 or self.count % self.every == 0:
            log.warning("skipped %d bad sample(s); latest: %r", self.count, exn)
        return True  # continue


def _raw_samples(path: str, on_error: SkipCounter):
    import webdataset as wds

    def select(name: str) -> bool:
        if name.startswith("/") or ".." in name.split("/"):  # a member escaping the shard
            on_error(DataError(f"{path}: member {name!r} escapes the dataset root; skipped"))
            return False
        return name.split(".", 1)[-1] in ALLOWED_EXTS if "." in name else False

    src = [{"url": path}]
    for s in wds.tariterators.tarfile_samples(src, handler=on_error, select_files=select):
        if "json" in s:
            yield s
        else:
            on_error(DataError(f"{path}: sample {s.get('__key__')} has no json record"))


def slot_stream(
    index: TaskIndex,
    seed: int,
    epoch: int,
    slot: int,
    slots: int,
    on_error: SkipCounter,
    repeat: bool = True,
):
    """Raw samples of one (rank, worker) slot, as described in the module docstring."""
    rnd = 0
    while True:
        shards = list(index.shards)
        random.Random(f"{seed}-{epoch}-{rnd}-{index.task}").shuffle(shards)
        if len(shards) >= slots:
            for path, _ in shards[slot::slots]:
                yield from _raw_samples(path, on_error)
        else:
            i = 0
            for path, _ in shards:
                for s in _raw_samples(path, on_error):
                    if i % slots == slot:
                        yield s
                    i += 1
        if not repeat:
            return
        rnd += 1


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


# Record fields the metrics and the submission formats need besides "id" (VQA breakdowns, NLVR2
# consistency groups, official ids); eval batches carry them as "meta", one dict per sample.
META_FIELDS = ("answer_type", "question_type", "identifier", "image_id", "qid", "vid_name")


class Collator:
    """Decoded samples of one task -> a padded batch of tensors."""

    def __init__(self, tokenizer, tasks: list[str], max_text_len: int, max_target_len: int):
        self.tok = tokenizer
        self.task_ids = {t: i for i, t in enumerate(tasks)}
        self.max_text, self.max_target = max_text_len, max_target_len

    def __call__(self, samples: list[dict], epoch: int = 0) -> dict:
        task = get_task(samples[0]["task"])
        texts = [task.encoder_text(s["rec"]) for s in samples]
        # The caption reference trained on is drawn per (sample, epoch): reproducible on resume.
        targets = [task.target(s["rec"], random.Random(f"{s['key']}-{epoch}")) for s in samples]
        enc = self.tok(
            texts, max_length=self.max_text, truncation=True, padding=True, return_tensors="pt"
        )
        lab = self.tok(
            targets, max_length=self.max_target, truncation=True, padding=True, return_tensors="pt"
        )
        labels = lab.input_ids.masked_fill(lab.attention_mask == 0, -100)
        visual = torch.stack([s["visual"] for s in samples])
        key = "frames" if task.kind == "video" else "images"
        return {
            "task": task.name,
            "task_ids": torch.full((len(samples),), self.task_ids[task.name], dtype=torch.long),
            "input_ids": enc.input_ids,
            "attention_mask": enc.attention_mask,
            "labels": labels,
            key: visual,  # images (B, n_img, 3, S, S) | frames (B, T, 3, S, S)
            "ids": [s["id"] for s in samples],
            "refs": [task.references(s["rec"]) for s in samples],
            "meta": [{k: s["rec"][k] for k in META_FIELDS if k in s["rec"]} for s in samples],
        }


def task_batch_sizes(tasks: list[str], batch_size: int, scale: str) -> dict[str, int]:
    sizes = {t: batch_size for t in tasks}
    for item in filter(None, (s.strip() for s in scale.split(","))):
        name, _, factor = item.partition("=")
        if name not in sizes:
            raise DataError(f"data.task_batch_scale names {name!r}, not one of the tasks {tasks}")
        sizes[name] = max(1, round(batch_size * float(factor)))
    return sizes


def epoch_schedule(
    indexes: dict[str, TaskIndex], sizes: dict[str, int], world: int, seed: int, epoch: int
) -> list[str]:
    """The task of every step of an epoch, identical on every rank."""
    sched = []
    for t, idx in indexes.items():
        n = idx.total // (world * sizes[t])
        if n == 0:
            raise DataError(
                f"task {t!r} has {idx.total} samples, fewer than one global batch "
                f"({world} ranks x {sizes[t]}); lower data.batch_size or add data"
            )
        sched += [t] * n
    random.Random(f"schedule-{seed}-{epoch}").shuffle(sched)
    return sched


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
    ):
        super().__init__()
        if split not in ("shard", "global"):
            raise DataError(f"data.split={split!r}; valid: shard, global")
        self.split = split
        self.indexes, self.sizes = indexes, sizes
        self.preprocess, self.collate = preprocess, collate
        self.rank, self.world, self.seed, self.epoch = rank, world, seed, epoch
        self.shuffle_buffer, self.skip_steps = shuffle_buffer, skip_steps
        self.schedule = epoch_schedule(indexes, sizes, world, seed, epoch)

    def __len__(self) -> int:
        return len(self.schedule) - self.skip_steps

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        slot, slots = self.rank * nw + w, self.world * nw
        # "global": every reader walks the same sample stream and takes its slice of each global
        # batch, so the global batch does not depend on the world size (more reading, exact
        # 1-rank / N-rank equivalence); "shard": each reader has its own shards (less I/O).
        glob = self.split == "global"
        if glob:
            slot, slots = 0, 1
        errors = SkipCounter()
        streams = {}
        for t, idx in self.indexes.items():
            rng = random.Random(f"buf-{self.seed}-{self.epoch}-{slot}-{t}")
            raw = slot_stream(idx, self.seed, self.epoch, slot, slots, errors)
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
            samples = []
            for s in raw:
                try:
                    samples.append(self.preprocess(s))
                except Exception as e:  # undecodable sample: skip and count, keep the step
                    errors(e)
            # refill so the batch shape stays fixed (in "global" mode only an empty batch is
            # refilled: refilling from the shared stream would shift every later batch)
            while len(samples) < (1 if glob else b):
                try:
                    samples.append(self.preprocess(next(streams[task])))
                except Exception as e:
                    errors(e)
            yield self.collate(samples, self.epoch)


class EvalStream(torch.utils.data.IterableDataset):
    """One task's validation samples; sample i goes to slot i % slots, so each counts once."""

    def __init__(
        self, index: TaskIndex, preprocess, collate, *, rank, world, batch_size, max_samples=0
    ):
        super().__init__()
        self.index, self.preprocess, self.collate = index, preprocess, collate
        self.rank, self.world, self.bs, self.max_samples = rank, world, batch_size, max_samples

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        slot, slots = self.rank * nw + w, self.world * nw
        errors, batch, i = SkipCounter(), [], 0
        for path, _ in self.index.shards:
            for s in _raw_samples(path, errors):
                if self.max_samples and i >= self.max_samples:
                    break
                if i % slots == slot:
                    try:
                        batch.append(self.preprocess(s))
                    except Exception as e:
                        errors(e)
                    if len(batch) == self.bs:
                        yield self.collate(batch)
                        batch = []
                i += 1
        if batch:
            yield self.collate(batch)
