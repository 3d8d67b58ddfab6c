"""Reading shards during training: the split index, a lean tar reader, bad-data counting.

Layout on disk (written by vlds.data.synthetic, vlds.data.prep.shards and
vlds.data.prep.extract): `{root}/{task}/{split}-*.tar` plus `{root}/{task}/{split}.index.json`
with per-shard sample and sentence counts (`record_sentences`; indexes written before the
latter are completed by python -m vlds.data.prep.recount) and, for feature shards, a
"features" entry saying which CLIP tower made them. A sample is webdataset's grouping of tar
members: `{key}.json` (the record) plus its visual payload (`{key}.jpg`,
`.img0.png`/`.img1.png`, `.frames.npy[.gz]`, `.feats.npy`).

Bad data (a truncated tar, a member escaping the shard, a sample without a record) is skipped
and counted by a `SkipCounter`; once more than `data.max_bad_fraction` of a reader's samples
are bad (and at least `MIN_BAD` of them), it raises DataError naming the worst shards.

Written by hand rather than with webdataset's tar reader: one read per member and no copies
(about 5x faster than tarfile's stream mode for cached features), members outside ALLOWED_EXTS
never read, and a shard that ends early counted against its index.
"""

from __future__ import annotations

import ast
import gzip
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlds.data import remote

log = logging.getLogger(__name__)

# Shard members we decode; anything else (e.g. .pyd/.pickle) is never read, let alone unpickled.
ALLOWED_EXTS = {
    "json",
    "group.json",
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
MIN_BAD = 10  # bad samples a reader tolerates before the fraction is judged
# A tar sample whose visual payload several records share (VQA's ~5.4 questions per COCO
# image, GQA's ~13) stores the payload once and the records as a json list in this member;
# readers expand it into one sample per record (`expand_group`), which is what indexes count.
GROUP = "group.json"


class DataError(ValueError):
    """Missing or malformed data, reported with the path and what to do about it."""


class ShardError(ValueError):
    """A shard that cannot be read, or a writer refusing to run (different arguments, foreign
    files), with the fix."""


@dataclass(frozen=True)
class TaskIndex:
    task: str
    split: str
    shards: tuple[tuple[str, int], ...]  # (absolute path, samples)
    # "features" for feature shards: {"kind": "grid" | "frames", "vision", "pretrained", ...}
    meta: dict = field(default_factory=dict, compare=False)
    # Training samples with one per reference sentence (`record_sentences` summed over the
    # records): the shards' "sentences" counts, None for an index written before they were
    # recorded (python -m vlds.data.prep.recount adds them).
    sentences: int | None = field(default=None, compare=False)

    @property
    def total(self) -> int:
        return sum(n for _, n in self.shards)

    @property
    def features(self) -> dict | None:
        return self.meta.get("features")

    @property
    def labelled(self) -> bool:
        """False for a split written from unlabelled release files (a test split)."""
        return self.meta.get("labelled", True)


def load_index(root: str | Path, task: str, split: str) -> TaskIndex:
    """The split's index under a local folder or a URL (vlds.data.remote). A remote index's
    shards are not looked up one by one (a request each): one that is missing is a read
    error, skipped and counted like a truncated shard."""
    root = remote.location(root)
    if remote.is_url(root):
        return _remote_index(root, task, split)
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
            f"python -m vlds.data.synthetic or python -m vlds.data.prep.shards {task} (a converter "
            f"still running writes the index last), or drop {task} from --data.tasks"
        )
    idx = _parse_index(f.read_bytes(), f)
    shards = []
    for s in idx["shards"]:
        if remote.is_url(s["url"]):
            shards.append((_remote_shard(s["url"], f), int(s["samples"])))
            continue
        p = (d / s["url"]).resolve()
        if d.resolve() not in p.parents:
            raise DataError(f"{f}: shard {s['url']!r} is outside the task folder {d}; refusing it")
        if not p.is_file():
            raise DataError(f"{f} lists {p}, which is missing; re-run the shard writer")
        shards.append((str(p), int(s["samples"])))
    return _task_index(task, split, idx, shards, f)


def _parse_index(data: bytes, where) -> dict:
    try:
        idx = json.loads(data)
        if not isinstance(idx.get("shards"), list):
            raise ValueError("no 'shards' list")
        return idx
    except ValueError as e:
        raise DataError(
            f"{remote.redact(where)} is not a shard index ({e}); re-run the shard writer"
        ) from e


def _remote_shard(url: str, where) -> str:
    if url.startswith("pipe:"):
        raise DataError(
            f"{remote.redact(where)} names a pipe: shard ({remote.redact(url)}); an index file "
            f"must not run commands: give pipe: on the command line (--data.root='pipe:CMD {{}}')"
        )
    return remote.location(url)


def _remote_index(root: str, task: str, split: str) -> TaskIndex:
    f = remote.join(root, task, f"{split}.index.json")
    try:
        data = remote.read_bytes(f)
    except remote.RemoteError as e:
        fix = (
            f"; write the shards there with --out {remote.redact(root)} (python -m "
            f"vlds.data.synthetic, vlds.data.prep.shards {task}, vlds.data.prep.extract) or drop "
            f"{task} from --data.tasks"
            if getattr(e, "kind", "") == "missing"
            else ""
        )
        raise DataError(f"no shard index for task {task!r} split {split!r}: {e}{fix}") from e
    idx = _parse_index(data, f)
    shards = []
    for s in idx["shards"]:
        u = s["url"]
        if remote.is_url(u):
            shards.append((_remote_shard(u, f), int(s["samples"])))
        elif u.startswith("/") or ".." in u.split("/"):
            raise DataError(f"{remote.redact(f)}: shard {u!r} is outside the task folder")
        else:
            shards.append((str(remote.join(root, task, u)), int(s["samples"])))
    return _task_index(task, split, idx, shards, f)


def _task_index(task: str, split: str, idx: dict, shards: list, where) -> TaskIndex:
    if not shards:
        raise DataError(f"{remote.redact(where)} lists no shards; re-run the shard writer")
    meta = {k: v for k, v in idx.items() if k not in ("shards", "task", "split", "total")}
    counted = all("sentences" in s for s in idx["shards"])
    sentences = sum(int(s["sentences"]) for s in idx["shards"]) if counted else None
    return TaskIndex(task, split, tuple(shards), meta, sentences)


# ---- samples and records ---------------------------------------------------------------


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
            log.warning(
                "skipped %d bad sample(s) of %d read; latest: %r", self.count, self.seen, exn
            )
        if self.count >= self.min_bad and self.count > self.max_fraction * self.seen:
            worst = ", ".join(f"{remote.redact(s)} ({n})" for s, n in self.by_shard.most_common(5))
            raise DataError(
                f"{self.count} of {self.seen} samples read were bad "
                f"({self.count / self.seen:.1%} > data.max_bad_fraction={self.max_fraction}); "
                f"shards with bad samples: {worst}; latest error: {exn!r}. Re-write or remove "
                f"those shards (python -m vlds.data.prep.shards), or raise data.max_bad_fraction"
            )
        return True  # continue

    def read(self) -> None:
        self.seen += 1


def record_sentences(rec) -> int:
    """The training samples a record makes with one sample per reference sentence: its
    number of captions for a caption record, else 1 (one record, one sample)."""
    caps = rec.get("captions") if isinstance(rec, dict) else None
    return len(caps) if isinstance(caps, list) and caps else 1


def sample_sentences(member: str, data: bytes) -> int:
    """`record_sentences` summed over the records of a tar sample's json (or GROUP) member."""
    recs = json.loads(data)
    return sum(map(record_sentences, recs)) if member == GROUP else record_sentences(recs)


def expand_group(sample: dict) -> list[dict]:
    """One sample per record of a GROUP sample (the payload members shared, keys
    "{key}#{i}"); any other sample as it is."""
    if GROUP not in sample:
        return [sample]
    recs = json.loads(sample[GROUP])
    if not isinstance(recs, list) or not recs:
        raise ValueError(f"{sample['__key__']}.{GROUP} is not a non-empty list of records")
    shared = {k: v for k, v in sample.items() if k != GROUP}
    return [
        {**shared, "__key__": f"{sample['__key__']}#{i}", "json": json.dumps(r).encode()}
        for i, r in enumerate(recs)
    ]


def read_samples(
    path: str,
    on_error: SkipCounter,
    expected: int | None = None,
    only: frozenset | None = None,
    expand: bool = True,
    start: int = 0,
):
    """The samples of one shard as dicts {"__key__", "__url__", "__off__", ext: bytes}
    (webdataset's grouping: consecutive members sharing the name up to the first dot of the
    file name; "__off__" is the byte offset of the tar sample's first header in the
    uncompressed tar), a GROUP sample expanded into one sample per record unless
    `expand=False`. `start`: begin at that offset (a "__off__" read before), which the resumed
    training stream uses to seek straight to its position; the index's count is then not
    checked (it counts the whole shard).
    Only ALLOWED_EXTS are read (and of those only `only`, when given: the other members are
    skipped by seeking). A shard that ends early (truncated: an error, or a cut at a member
    boundary) counts its samples missing from the index's count as bad."""
    if start:
        expected = None
    escaped = []
    wanted = ALLOWED_EXTS if only is None else ALLOWED_EXTS & (only | only_json(only))

    def select(name: str) -> bool:
        if name.startswith("/") or ".." in name.split("/"):  # a member escaping the shard
            escaped.append(name)
            return False
        base = name.rsplit("/", 1)[-1]
        return "." in base and base.split(".", 1)[1].lower() in wanted

    def report_escaped():
        while escaped:
            on_error(DataError(f"{path}: member {escaped.pop()!r} escapes the dataset root"), path)

    def emit(sample) -> list[dict]:
        """The samples a tar sample stands for; counts them as read (and bad ones)."""
        if "json" not in sample and GROUP not in sample:
            on_error.read()
            on_error(DataError(f"{path}: sample {sample['__key__']} has no json record"), path)
            return [None]
        try:
            out = expand_group(sample) if expand else [sample]
        except ValueError as e:
            on_error.read()
            on_error(DataError(f"{path}: {e}"), path)
            return [None]
        for _ in out:
            on_error.read()
        return out

    n, cur = 0, None
    try:
        with remote.open_read(path) as raw:
            f = gzip.GzipFile(fileobj=raw) if raw.peek(2)[:2] == b"\x1f\x8b" else raw
            if start:  # a gzip or streamed shard reads up to it: at most one shard
                remote.skip(f, start)
            # every member is listed, so that "__off__" is where a sample's first member starts
            # whichever members are read
            key_at = last_key = None
            for name, data, off in tar_files(f, path, select, start, unselected=True):
                report_escaped()
                head, _, base = name.rpartition("/")
                stem, _, ext = base.partition(".")
                key = f"{head}/{stem}" if head else stem
                if key != last_key:
                    last_key, key_at = key, off
                if data is None:
                    continue
                if cur is not None and cur["__key__"] != key:
                    out = emit(cur)
                    n += len(out)
                    yield from (s for s in out if s is not None)
                    cur = None
                if cur is None:
                    cur = {"__key__": key, "__url__": path, "__off__": key_at}
                ext = ext.lower()
                if ext in cur:
                    on_error(DataError(f"{path}: {name} appears twice in sample {key}"), path)
                cur[ext] = data
    except remote.READ_ERRORS as e:  # a broken shard (ShardError): stop reading it
        own = isinstance(e, ShardError | remote.RemoteError)
        on_error(DataError(str(e) if own else f"{remote.redact(path)}: {e!r}"), path)
    # the last sample holds only whole members (a cut one raises before it is added); one
    # missing its payload fails in Preprocess and is counted there
    if cur is not None:
        out = emit(cur)
        n += len(out)
        yield from (s for s in out if s is not None)
    report_escaped()
    for _ in range((expected or 0) - n):
        on_error.read()
        msg = f"{path}: {n} of the {expected} samples its index lists (truncated?)"
        on_error(DataError(msg), path)


def read_range(index: TaskIndex, a: int, b: int, on_error: SkipCounter):
    """Samples a..b-1 of a split (numbered in the index's order: shard by shard, a GROUP's
    records one by one), reading the payloads of those only. In the shard where `a` falls, the
    samples before it are passed over by reading their json members alone (the rest seeked
    over), then reading starts at the tar sample holding sample a."""
    c = 0
    for path, n in index.shards:
        lo, hi = max(a - c, 0), min(b - c, n)
        c += n
        if lo >= hi:
            if c >= b:
                return
            continue
        start = skip = 0
        if lo:
            first = 0
            for k, s in enumerate(read_samples(path, SkipCounter(), only=frozenset({"json"}))):
                if s["__off__"] != start:
                    start, first = s["__off__"], k
                if k == lo:
                    skip = lo - first
                    break
            else:
                continue  # the shard holds fewer samples than its index says (counted below)
        want = hi - lo
        for i, s in enumerate(read_samples(path, on_error, None if lo else n, start=start)):
            if i < skip:
                continue
            yield s
            want -= 1
            if not want:
                break


def only_json(only: frozenset) -> frozenset:
    """A reader of records reads group records too."""
    return frozenset({GROUP}) if "json" in only else frozenset()


def read_records(index: TaskIndex, limit: int = 0):
    """The json records of a split, in shard order; at most `limit`. Only the json members
    are read: images and features are skipped by seeking."""
    n = 0
    for path, _ in index.shards:
        for s in read_samples(path, SkipCounter(), only=frozenset({"json"})):
            if limit and n >= limit:
                return
            yield json.loads(s["json"])
            n += 1


# ---- tar and .npy ----------------------------------------------------------------------

_NPY_HEADERS: dict[bytes, tuple] = {}


def load_npy(data: bytes) -> np.ndarray:
    """A read-only array over the bytes of a .npy file, without np.load's per-call header
    parsing (most of its cost for small arrays: headers repeat, so they are parsed once).
    Object arrays are refused: nothing is ever unpickled."""
    if data[:6] != b"\x93NUMPY":
        raise ShardError("not a .npy file (bad magic)")
    off = 10 if data[6] == 1 else 12
    end = off + int.from_bytes(data[8:off], "little")
    header = data[off:end]
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:
        h = ast.literal_eval(header.decode("latin1"))  # a dict literal: never executed
        dtype = np.dtype(h["descr"])
        if dtype.hasobject:
            raise ShardError(".npy with object dtype refused (it would need unpickling)")
        parsed = (dtype, tuple(h["shape"]), bool(h["fortran_order"]))
        if len(_NPY_HEADERS) < 256:
            _NPY_HEADERS[header] = parsed
    dtype, shape, fortran = parsed
    count = math.prod(shape)
    if len(data) - end < count * dtype.itemsize:
        raise ShardError(f".npy truncated: {len(data) - end} bytes for shape {shape} {dtype}")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=end)
    return arr.reshape(shape, order="F" if fortran else "C")


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field[1:], "big")
    field = field.split(b"\0", 1)[0].strip()
    return int(field, 8) if field else 0


def _pax_path(data: bytes) -> str | None:
    """The "path" record of a pax extended header ("%d path=...\n" records)."""
    for rec in data.split(b"\n"):
        _, _, kv = rec.partition(b" ")
        if kv.startswith(b"path="):
            return kv[5:].decode("utf-8", "replace")
    return None


def tar_files(f, path: str, select, pos: int = 0, unselected: bool = False):
    """(name, bytes, offset) of the regular files of a tar stream, in order, reading only the
    members `select(name)` keeps (the rest are skipped by seeking; with `unselected` they are
    yielded too, as (name, None, offset)); offset: where the member's first header starts (a
    long-name or pax header before it included), counted from `pos`, the stream's position on
    entry. Handles ustar, GNU long names and pax paths; a bad checksum or
    a cut raises ShardError. One read per member and no copies after it: about 5x faster than
    tarfile's stream mode for cached features."""
    name_override, first = None, pos
    while True:
        header = f.read(512)
        if len(header) < 512:
            if header:
                raise ShardError(f"{path}: truncated tar header")
            return  # end of file without the end-of-archive blocks: tolerated, as tarfile does
        if header.count(0) == 512:
            return  # end-of-archive block
        # the checksum counts its own 8 bytes as spaces
        if _octal(header[148:156]) != sum(header) - sum(header[148:156]) + 256:
            raise ShardError(f"{path}: tar header checksum mismatch (corrupt shard)")
        size = _octal(header[124:136])
        padded = (size + 511) & ~511
        kind = header[156:157]
        at, pos = pos, pos + 512 + padded
        if kind in (b"L", b"x"):  # GNU long name / pax header: names the next member
            first = at if name_override is None else first
            data = f.read(padded)[:size]
            if kind == b"L":
                name_override = data.rstrip(b"\0").decode("utf-8", "replace")
            else:
                name_override = _pax_path(data) or name_override
            continue
        name = name_override or header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if not name_override and header[257:263] == b"ustar\0" and header[345] != 0:
            # POSIX ustar splits long names into prefix + name (GNU uses that area otherwise)
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
            name = f"{prefix}/{name}"
        if name_override is None:
            first = at
        name_override = None
        if kind in (b"0", b"\0", b"7") and select(name):
            data = f.read(size)
            if len(data) < size:
                raise ShardError(f"{path}: member {name} cut after {len(data)} of {size} bytes")
            if padded > size:
                remote.skip(f, padded - size)
            yield name, data, first
        else:
            remote.skip(f, padded)
            if unselected and kind in (b"0", b"\0", b"7"):
                yield name, None, first
