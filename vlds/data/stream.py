"""WebDataset streaming: shards -> decoded, tokenised, single-task batches, mixed across tasks.

Layout on disk (written by vlds.data.synthetic, vlds.data.shards and vlds.data.extract):
`{root}/{task}/{split}-*.tar` plus `{root}/{task}/{split}.index.json` with per-shard sample
counts (and, for feature shards, a "features" entry saying which CLIP tower made them).

Training stream, per epoch (everything a pure function of seed, epoch, rank and worker):
1. Schedule: every rank computes the same list of tasks, one entry per step, shuffled with
   (seed, epoch). `data.mixing` sets how often each task appears: "proportional" (the
   reference) `samples // (world x batch)` times; "weights" and "temperature" redistribute the
   same number of steps. So every rank runs the same number of steps and no collective hangs,
   however unevenly the shards divide.
2. Each (rank, worker) slot reads its own slice of every task's shards, shuffled by
   (seed, epoch, round): whole shards round-robin when there are at least as many shards as
   slots, otherwise every slot reads all shards and keeps every n-th sample (correct, but each
   shard is read by every slot). The slice repeats (new shuffle each round) so a slot never
   runs dry, which is also what lets weighted mixing oversample a small task.
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

import gzip
import io
import json
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vlds.data.shardio import ShardError, load_npy, tar_files
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
MIXING = ("proportional", "weights", "temperature")
FEATURE_MODES = ("auto", "true", "false")
MIN_BAD = 10  # bad samples a reader tolerates before the fraction is judged


class DataError(ValueError):
    """Missing or malformed data, reported with the path and what to do about it."""


@dataclass(frozen=True)
class TaskIndex:
    task: str
    split: str
    shards: tuple[tuple[str, int], ...]  # (absolute path, samples)
    # "features" for feature shards: {"kind": "grid" | "frames", "vision", "pretrained", ...}
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def total(self) -> int:
        return sum(n for _, n in self.shards)

    @property
    def features(self) -> dict | None:
        return self.meta.get("features")


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
            f"python -m vlds.data.synthetic or python -m vlds.data.shards {task} (a converter "
            f"still running writes the index last), or drop {task} from --data.tasks"
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
    meta = {k: v for k, v in idx.items() if k not in ("shards", "task", "split", "total")}
    return TaskIndex(task, split, tuple(shards), meta)


# ---- decoding ---------------------------------------------------------------------------

_CHECK_RNG = random.Random(0)  # targets drawn only to validate the record


def check_record(rec: dict) -> None:
    """The record has what its task's prompt, target and metric read (else DataError)."""
    try:
        task = get_task(rec["task"])
        str(rec["id"])
        task.encoder_text(rec)
        task.target(rec, _CHECK_RNG)
        task.references(rec)
    except (KeyError, IndexError, TypeError, ValueError) as e:
        name = rec.get("id", "?")
        raise DataError(f"record {name!r} is missing or has a bad field: {e!r}") from None


class Preprocess:
    """Raw shard sample -> {task, id, rec, visual}: CLIP resize/crop/normalise for pixels, or
    the cached feature array as stored (`features`: "auto" uses feats.npy when a sample has
    it, "true" requires it, "false" reads pixels only).

    JPEGs are decoded in PIL's draft mode when `draft`: the decoder scales by 1/2, 1/4 or 1/8
    in the DCT (the largest factor that keeps both sides >= image_size), about 2-3x faster
    than a full decode, before the same bicubic resize; `draft=False` decodes fully."""

    def __init__(self, image_size: int, mean, std, *, features: str = "auto", draft: bool = True):
        if features not in FEATURE_MODES:
            raise DataError(f"data.features={features!r}; valid: {', '.join(FEATURE_MODES)}")
        self.size, self.features, self.draft = image_size, features, draft
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        # (x / 255 - mean) / std == x * scale - shift, two in-place passes
        self.scale = 1.0 / (255.0 * self.std)
        self.shift = self.mean / self.std

    def _to_tensor(self, arr: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(arr).permute(2, 0, 1).float()  # (3, S, S)
        return x.mul_(self.scale).sub_(self.shift)

    def image(self, data: bytes) -> torch.Tensor:
        from PIL import Image

        img = Image.open(io.BytesIO(data))
        s = self.size
        if self.draft and img.format == "JPEG":
            img.draft("RGB", (s, s))
        if img.mode != "RGB":
            img = img.convert("RGB")
        w, h = img.size
        if (w, h) != (s, s):
            # shorter side -> s (bicubic), centre crop: only the kept region is resampled
            scale = s / min(w, h)
            rw, rh = max(s, round(w * scale)), max(s, round(h * scale))
            left, top = (rw - s) // 2, (rh - s) // 2
            box = (left * w / rw, top * h / rh, (left + s) * w / rw, (top + s) * h / rh)
            img = img.resize((s, s), Image.BICUBIC, box=box)
        return self._to_tensor(np.array(img))  # a writable copy

    def frames(self, data: bytes, gzipped: bool = False) -> torch.Tensor:
        if gzipped:
            data = gzip.decompress(data)
        arr = load_npy(data)  # (T, H, W, 3) uint8
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise DataError(f"frames.npy is {arr.dtype} {arr.shape}, expected (T, H, W, 3) uint8")
        x = torch.from_numpy(arr.astype(np.float32)).permute(0, 3, 1, 2)  # (T, 3, H, W)
        x = x / 255.0
        if x.shape[-2:] != (self.size, self.size):
            x = torch.nn.functional.interpolate(
                x, size=(self.size, self.size), mode="bicubic", align_corners=False
            ).clamp(0, 1)
        return (x - self.mean) / self.std  # (T, 3, S, S)

    def feats(self, data: bytes, kind: str) -> np.ndarray:
        arr = load_npy(data)  # (n_img * n_tok, C) for images, (T, D) for video
        if arr.ndim != 2 or arr.shape[0] == 0 or (kind == "pair" and arr.shape[0] % 2):
            raise DataError(f"feats.npy has shape {arr.shape}, not (tokens, dim) for a {kind}")
        return arr

    def __call__(self, sample: dict) -> dict:
        rec = json.loads(sample["json"])
        check_record(rec)
        task = get_task(rec["task"])
        use_feats = self.features == "true" or (self.features == "auto" and "feats.npy" in sample)
        if use_feats:
            if "feats.npy" not in sample:
                raise DataError(
                    f"{sample.get('__url__')}: sample {sample['__key__']} has no feats.npy "
                    f"(data.features=true needs shards written by python -m vlds.data.extract)"
                )
            visual = self.feats(sample["feats.npy"], task.kind)
        elif task.kind == "image":
            data = sample.get("jpg") or sample.get("jpeg") or sample.get("png")
            if data is None:
                raise DataError(f"sample {sample['__key__']} has no jpg/png")
            visual = self.image(data).unsqueeze(0)  # (1, 3, S, S)
        elif task.kind == "pair":
            imgs = [sample.get(f"img{i}.jpg") or sample.get(f"img{i}.png") for i in (0, 1)]
            if None in imgs:
                raise DataError(f"sample {sample['__key__']} lacks img0/img1")
            visual = torch.stack([self.image(b) for b in imgs])  # (2, 3, S, S)
        else:
            gz = "frames.npy.gz" in sample
            if not gz and "frames.npy" not in sample:
                raise DataError(f"sample {sample['__key__']} has no frames.npy")
            visual = self.frames(sample["frames.npy.gz" if gz else "frames.npy"], gz)
        return {
            "task": task.name,
            "id": str(rec["id"]),
            "rec": rec,
            "visual": visual,
            "feats": use_feats,
            "key": sample["__key__"],
        }


# ---- bad data ---------------------------------------------------------------------------


class SkipCounter:
    """Counts read and skipped samples of one reader, per shard; warns on the first skip and
    every `every`-th after; raises DataError once the bad fraction passes `max_fraction`
    (judged from `min_bad` bad samples on; max_fraction >= 1 never stops)."""

    def __init__(self, every: int = 100, max_fraction: float = 1.0, min_bad: int = MIN_BAD):
        self.count, self.seen, self.every = 0, 0, every
        self.max_fraction, self.min_bad = max_fraction, min_bad
        self.by_shard: Counter = Counter()

    def __call__(self, exn: Exception, shard: str | None = None) -> bool:
        self.count += 1
        self.seen = max(self.seen, self.count)
        self.by_shard[shard or "?"] += 1
        if self.count == 1 or self.count % self.every == 0:
            log.warning("skipped %d bad sample(s) of %d read; latest: %r", self.count,
                        self.seen, exn)  # fmt: skip
        if self.count >= self.min_bad and self.count > self.max_fraction * self.seen:
            worst = ", ".join(f"{s} ({n})" for s, n in self.by_shard.most_common(5))
            raise DataError(
                f"{self.count} of {self.seen} samples read were bad "
                f"({self.count / self.seen:.1%} > data.max_bad_fraction={self.max_fraction}); "
                f"shards with bad samples: {worst}; latest error: {exn!r}. Re-write or remove "
                f"those shards (python -m vlds.data.shards), or raise data.max_bad_fraction"
            )
        return True  # continue

    def read(self) -> None:
        self.seen += 1


def _raw_samples(path: str, on_error: SkipCounter, expected: int | None = None):
    """The samples of one shard as dicts {"__key__", "__url__", ext: bytes} (webdataset's
    grouping: consecutive members sharing the name up to the first dot of the file name).
    Only ALLOWED_EXTS are read. A shard that ends early (truncated: an error, or a cut at a
    member boundary) counts its samples missing from the index's count as bad."""
    escaped = []

    def select(name: str) -> bool:
        if name.startswith("/") or ".." in name.split("/"):  # a member escaping the shard
            escaped.append(name)
            return False
        base = name.rsplit("/", 1)[-1]
        return "." in base and base.split(".", 1)[1].lower() in ALLOWED_EXTS

    def report_escaped():
        while escaped:
            on_error(DataError(f"{path}: member {escaped.pop()!r} escapes the dataset root"), path)

    def emit(sample):
        on_error.read()
        if "json" not in sample:
            on_error(DataError(f"{path}: sample {sample['__key__']} has no json record"), path)
            return False
        return True

    n, cur = 0, None
    try:
        with open(path, "rb") as raw:
            f = gzip.GzipFile(fileobj=raw) if raw.peek(2)[:2] == b"\x1f\x8b" else raw
            for name, data in tar_files(f, path, select):
                report_escaped()
                head, _, base = name.rpartition("/")
                stem, _, ext = base.partition(".")
                key = f"{head}/{stem}" if head else stem
                if cur is not None and cur["__key__"] != key:
                    n += 1
                    if emit(cur):
                        yield cur
                    cur = None
                if cur is None:
                    cur = {"__key__": key, "__url__": path}
                ext = ext.lower()
                if ext in cur:
                    on_error(DataError(f"{path}: {name} appears twice in sample {key}"), path)
                cur[ext] = data
    except (OSError, EOFError, ValueError) as e:  # a broken shard (ShardError): stop reading it
        on_error(DataError(str(e) if isinstance(e, ShardError) else f"{path}: {e!r}"), path)
    # the last sample holds only whole members (a cut one raises before it is added); one
    # missing its payload fails in Preprocess and is counted there
    if cur is not None:
        n += 1
        if emit(cur):
            yield cur
    report_escaped()
    for _ in range((expected or 0) - n):
        on_error.read()
        msg = f"{path}: {n} of the {expected} samples its index lists (truncated?)"
        on_error(DataError(msg), path)


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
            for path, n in shards[slot::slots]:
                yield from _raw_samples(path, on_error, n)
        else:
            i = 0
            for path, n in shards:
                for s in _raw_samples(path, on_error, n):
                    if i % slots == slot:
                        yield s
                    i += 1
        if not repeat:
            return
        rnd += 1


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


# ---- batches ----------------------------------------------------------------------------

# Record fields the metrics and the submission formats need besides "id" (VQA breakdowns, NLVR2
# consistency groups, official ids); eval batches carry them as "meta", one dict per sample.
META_FIELDS = ("answer_type", "question_type", "identifier", "image_id", "qid", "vid_name")


def stack(items: list) -> torch.Tensor:
    """Stack same-shaped arrays or tensors into one tensor. In a DataLoader worker the result
    is allocated in shared memory, as torch's default_collate does, so handing the batch to
    the main process does not copy it again (a 64-sample RN101 feature batch is 9 MB)."""
    first = items[0]
    dtype = first.dtype if torch.is_tensor(first) else torch.from_numpy(first[:0].copy()).dtype
    shape = (len(items), *first.shape)
    if torch.utils.data.get_worker_info() is not None:
        proto = torch.empty(0, dtype=dtype)
        out = proto.new(proto._typed_storage()._new_shared(math.prod(shape))).resize_(shape)
    else:
        out = torch.empty(shape, dtype=dtype)
    if torch.is_tensor(first):
        return torch.stack(items, out=out)
    np.stack(items, out=out.numpy())
    return out


class _LazyRandom:
    """random.Random(seed) created on first use: most targets never draw (string seeding
    costs ~10 us a sample), captions draw exactly what Random(seed) would."""

    def __init__(self, seed: str):
        self._seed, self._rng = seed, None

    def __getattr__(self, name):  # only for what the instance lacks: the Random's methods
        if name.startswith("_"):
            raise AttributeError(name)
        if self._rng is None:
            self._rng = random.Random(self._seed)
        return getattr(self._rng, name)


def feature_inputs(feats: list[np.ndarray], kind: str, max_frames: int) -> dict:
    """Cached features of one task's samples -> the vis_* inputs VisionTower.visual_inputs
    would have computed from pixels (it passes them through): grid tokens with their cell
    boxes and image-order ids (NLVR2: the two images' tokens stacked, ids 0 then 1), or frame
    embeddings resampled to max_frames with time boxes and a mask."""
    from vlds.model.vision import grid_boxes, resample_frames, time_boxes

    b = len(feats)
    if kind == "video":
        out = [resample_frames(torch.from_numpy(f.astype(np.float32))[None], max_frames)
               for f in feats]  # fmt: skip
        vis = torch.cat([x for x, _ in out])  # (B, max_frames, D)
        mask = torch.cat([m for _, m in out])  # (B, max_frames)
        boxes = time_boxes(max_frames).expand(b, -1, -1)
        order = torch.zeros(b, max_frames, dtype=torch.long)
        return {"vis_feats": vis, "vis_boxes": boxes, "vis_order": order, "vis_mask": mask}
    n_img = 2 if kind == "pair" else 1
    if len({f.shape for f in feats}) != 1:
        raise DataError(f"feature shapes differ within a batch: {sorted({f.shape for f in feats})}")
    vis = stack(feats)  # (B, n_img * t, C), as stored (float16 / 32)
    t = vis.shape[1] // n_img
    g = math.isqrt(t)
    if g * g != t:
        raise DataError(f"{t} feature tokens per image is not a square grid")
    boxes = grid_boxes(g).repeat(n_img, 1).expand(b, -1, -1)  # (B, n_img * t, 5)
    order = torch.arange(n_img).repeat_interleave(t).expand(b, -1)
    mask = torch.ones(b, n_img * t, dtype=torch.long)
    return {"vis_feats": vis, "vis_boxes": boxes, "vis_order": order, "vis_mask": mask}


class Collator:
    """Decoded samples of one task -> a padded batch of tensors."""

    def __init__(
        self, tokenizer, tasks: list[str], max_text_len: int, max_target_len: int, max_frames=64
    ):
        self.tok = tokenizer
        self.task_ids = {t: i for i, t in enumerate(tasks)}
        self.max_text, self.max_target = max_text_len, max_target_len
        self.max_frames = max_frames

    def __call__(self, samples: list[dict], epoch: int = 0) -> dict:
        task = get_task(samples[0]["task"])
        texts = [task.encoder_text(s["rec"]) for s in samples]
        # The caption reference trained on is drawn per (sample, epoch): reproducible on resume.
        targets = [task.target(s["rec"], _LazyRandom(f"{s['key']}-{epoch}")) for s in samples]
        enc = self.tok(
            texts, max_length=self.max_text, truncation=True, padding=True, return_tensors="pt"
        )
        lab = self.tok(
            targets, max_length=self.max_target, truncation=True, padding=True, return_tensors="pt"
        )
        labels = lab.input_ids.masked_fill(lab.attention_mask == 0, -100)
        if all(s.get("feats") for s in samples):
            visual = feature_inputs([s["visual"] for s in samples], task.kind, self.max_frames)
        elif any(s.get("feats") for s in samples):
            raise DataError(f"a {task.name} batch mixes cached features and pixels")
        else:  # images (B, n_img, 3, S, S) | frames (B, T, 3, S, S)
            key = "frames" if task.kind == "video" else "images"
            visual = {key: stack([s["visual"] for s in samples])}
        return {
            "task": task.name,
            "task_ids": torch.full((len(samples),), self.task_ids[task.name], dtype=torch.long),
            "input_ids": enc.input_ids,
            "attention_mask": enc.attention_mask,
            "labels": labels,
            **visual,
            "ids": [s["id"] for s in samples],
            "refs": [task.references(s["rec"]) for s in samples],
            "meta": [{k: s["rec"][k] for k in META_FIELDS if k in s["rec"]} for s in samples],
        }


# ---- multi-task mixing ------------------------------------------------------------------


def task_batch_sizes(tasks: list[str], batch_size: int, scale: str) -> dict[str, int]:
    sizes = {t: batch_size for t in tasks}
    for item in filter(None, (s.strip() for s in scale.split(","))):
        name, _, factor = item.partition("=")
        if name not in sizes:
            raise DataError(f"data.task_batch_scale names {name!r}, not one of the tasks {tasks}")
        sizes[name] = max(1, round(batch_size * float(factor)))
    return sizes


def parse_mixing_weights(spec: str, tasks: list[str]) -> dict[str, float]:
    """ "vqa=2,gqa=1" -> {"vqa": 2.0, "gqa": 1.0}; every task needs a weight > 0."""
    weights = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, eq, value = (x.strip() for x in item.partition("="))
        if name not in tasks:
            raise DataError(f"data.mixing_weights names {name!r}, not one of the tasks {tasks}")
        try:
            w = float(value) if eq else float("nan")
        except ValueError:
            w = float("nan")
        if not (w > 0 and math.isfinite(w)):
            raise DataError(f"data.mixing_weights: {item!r} needs a weight > 0, e.g. {name}=2")
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


# ---- streams ----------------------------------------------------------------------------


def _decode_batch(raw, preprocess, errors: SkipCounter, more, want: int) -> list[dict]:
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
    ):
        super().__init__()
        if split not in ("shard", "global"):
            raise DataError(f"data.split={split!r}; valid: shard, global")
        self.split = split
        self.indexes, self.sizes = indexes, sizes
        self.preprocess, self.collate = preprocess, collate
        self.rank, self.world, self.seed, self.epoch = rank, world, seed, epoch
        self.shuffle_buffer, self.skip_steps = shuffle_buffer, skip_steps
        self.max_bad_fraction = max_bad_fraction
        self.schedule = epoch_schedule(
            indexes, sizes, world, seed, epoch, mixing, mixing_weights, mixing_temperature
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
            samples = _decode_batch(raw, self.preprocess, errors, streams[task], b)
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
            for s in _raw_samples(path, errors, n):
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
