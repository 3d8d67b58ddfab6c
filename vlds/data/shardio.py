"""Shard I/O. Writing: deterministic tar members, atomic shard files, split indexes, and the
manifest that makes a re-run over the same output resume (or refuse) instead of mixing.
Reading: a lean tar member reader and a .npy loader for the training stream's hot path.

Used by the synthetic world (vlds.data.synthetic), the converters of the public releases
(vlds.data.shards), feature extraction (vlds.data.extract) and vlds.data.stream. Everything
here is plain tarfile/json/numpy: importing webdataset would pull in torch, seconds per
worker process.

A split being written looks like this inside its task folder:

    {split}.manifest.json    the arguments and input fingerprints of the run (written first)
    {split}.progress.jsonl   one line per finished shard: url, samples, bytes, skipped reasons
    {split}-NNNNN.tar        finished shards (written to a temp name, renamed when whole)
    {split}.index.json       per-shard sample counts, written last: training reads only this
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import math
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 2  # 2: video frames gzip-compressed (frames.npy.gz) in the synthetic world
MANIFEST_VERSION = 1


class ShardError(ValueError):
    """A shard that cannot be read, or a writer refusing to run (different arguments, foreign
    files), with the fix."""


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # mtime, uid and owner fixed at 0/"" so tars are byte-identical
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def write_sample(tar: tarfile.TarFile, key: str, sample: dict) -> int:
    """One sample in webdataset's layout: `{key}.{ext}` members, exts sorted; a dict or list
    value (the json record) is serialised. Returns the payload bytes written."""
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
    size = 0
    for ext in sorted(sample):
        data = sample[ext]
        if not isinstance(data, bytes):
            data = json.dumps(data, ensure_ascii=False).encode()
        add_member(tar, f"{key}.{ext}", data)
        size += len(data)
    return size


def shard_url(split: str, shard: int) -> str:
    return f"{split}-{shard:05d}.tar"


@contextlib.contextmanager
def open_shard(path: Path):
    """A tar opened for writing under a temp name, renamed to `path` only when closed cleanly:
    a killed writer never leaves a shard that looks finished."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            yield tar
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_index(task_dir: Path, task: str, split: str, shards: list[dict], **extra) -> dict:
    """{split}.index.json: {"task", "split", "total", "schema_version", "shards": [{"url",
    "samples"}], **extra} (e.g. "features" for feature shards); urls relative to task_dir."""
    shards = [{"url": s["url"], "samples": s["samples"]} for s in shards]
    index = {"task": task, "split": split, "total": sum(s["samples"] for s in shards),
             "schema_version": SCHEMA_VERSION, "shards": shards, **extra}  # fmt: skip
    path = Path(task_dir) / f"{split}.index.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(tmp, path)
    return index


def fingerprint(paths) -> dict[str, list[int]]:
    """(size, mtime) of input files: a changed annotation file makes a resume refuse."""
    out = {}
    for p in paths:
        st = Path(p).stat()
        out[str(Path(p).resolve())] = [st.st_size, st.st_mtime_ns]
    return out


def _split_files(task_dir: Path, split: str) -> list[Path]:
    names = [f"{split}.index.json", f"{split}.manifest.json", f"{split}.progress.jsonl"]
    files = [task_dir / n for n in names if (task_dir / n).exists()]
    return files + sorted(task_dir.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9].tar*"))


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            diffs.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return diffs


def begin_split(task_dir: Path, split: str, spec: dict, overwrite: bool = False) -> dict[int, dict]:
    """Start or resume writing a split whose run is described by `spec` (JSON-able: arguments,
    input fingerprints, the plan's size and hash). Returns the finished shards {shard: stats}.

    Same spec as the manifest on disk: shards recorded in the progress file whose tar is
    present with the recorded size are kept; everything else is rewritten. A different spec,
    or shards without a manifest, refuse with a ShardError naming the differences, unless
    `overwrite` (which deletes the split's files first)."""
    task_dir = Path(task_dir)
    task_dir.mkdir(parents=True, exist_ok=True)
    manifest = task_dir / f"{split}.manifest.json"
    existing = _split_files(task_dir, split)
    if overwrite:
        for f in existing:
            f.unlink()
        existing = []
    wanted = {"version": MANIFEST_VERSION, **spec}
    if existing and not manifest.exists():
        raise ShardError(
            f"{task_dir} already holds files of split {split!r} ({existing[0].name}, ...) that "
            f"this writer did not record; write to another --out, or pass --overwrite to "
            f"delete them"
        )
    if manifest.exists():
        old = json.loads(manifest.read_text())
        diffs = _differences(old, wanted)
        if diffs:
            raise ShardError(
                f"{task_dir}/{split} was written with different arguments or inputs; refusing "
                f"to mix them. Changed: {'; '.join(diffs[:6])}"
                f"{' ...' if len(diffs) > 6 else ''}. Re-run with the earlier arguments to "
                f"resume, use another --out, or pass --overwrite to start the split again"
            )
    else:
        manifest.write_text(json.dumps(wanted, indent=1) + "\n")
    for stale in task_dir.glob(f"{split}-*.tar.tmp-*"):
        stale.unlink()  # a killed run's half-written shard
    done = {}
    progress = task_dir / f"{split}.progress.jsonl"
    if progress.exists():
        for line in progress.read_text().splitlines():
            try:
                stats = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill: that shard is redone
                continue
            tar = task_dir / stats["url"]
            if tar.is_file() and tar.stat().st_size == stats["file_bytes"]:
                done[stats["shard"]] = stats
    return done


def record_shard(task_dir: Path, split: str, stats: dict) -> None:
    """Append a finished shard's stats (shard, url, samples, bytes, file_bytes, skipped)."""
    path = Path(task_dir) / f"{split}.progress.jsonl"
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():  # a line cut by a killed run must not swallow this one
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(json.dumps(stats).encode() + b"\n")


def summarize(stats: list[dict]) -> dict:
    """Totals over shard stats: samples, shards, bytes on disk, skipped reasons."""
    skipped = Counter()
    for s in stats:
        skipped.update(s.get("skipped", {}))
    return {
        "samples": sum(s["samples"] for s in stats),
        "shards": len(stats),
        "bytes": sum(s["file_bytes"] for s in stats),
        "skipped": dict(skipped),
    }


def print_summary(rows: list[tuple[str, str, dict]], seconds: float, out=None) -> None:
    """rows: (task, split, summarize() dict [+ "planned_skipped"]) -> a table on stdout."""
    import sys

    out = out or sys.stdout
    print(f"{'task':<8} {'split':<8} {'samples':>9} {'shards':>7} {'bytes':>15} skipped", file=out)
    for task, split, s in rows:
        skipped = Counter(s.get("skipped", {}))
        reasons = ", ".join(f"{n} {r}" for r, n in skipped.most_common()) or "0"
        print(f"{task:<8} {split:<8} {s['samples']:>9} {s['shards']:>7} {s['bytes']:>15,} "
              f"{reasons}", file=out)  # fmt: skip
    print(f"done in {seconds:.1f} s", file=out)


# ---- reading ----------------------------------------------------------------------------

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


def tar_files(f, path: str, select):
    """(name, bytes) of the regular files of a tar stream, in order, reading only the members
    `select(name)` keeps (the rest are skipped by seeking). Handles ustar, GNU long names and
    pax paths; a bad checksum or a cut raises ShardError. One read per member and no copies
    after it: about 5x faster than tarfile's stream mode for cached features."""
    name_override = None
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
        if kind in (b"L", b"x"):  # GNU long name / pax header: names the next member
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
        name_override = None
        if kind in (b"0", b"\0", b"7") and select(name):
            data = f.read(size)
            if len(data) < size:
                raise ShardError(f"{path}: member {name} cut after {len(data)} of {size} bytes")
            if padded > size:
                f.seek(padded - size, 1)
            yield name, data
        else:
            f.seek(padded, 1)
