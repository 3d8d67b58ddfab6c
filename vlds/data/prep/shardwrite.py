"""Writing shards: deterministic tar members, atomic shard files, split indexes, and the
manifest that makes a re-run over the same output resume (or refuse) instead of mixing.

Used by every offline writer: the converters of the public releases (vlds.data.prep.shards),
feature extraction (vlds.data.prep.extract) and the embedded shapes world
(vlds.data.synthetic). Training only reads (vlds.data.shardio). Plain tarfile/json: importing
webdataset would pull in torch, seconds per worker process.

A split being written looks like this inside its task folder:

    {split}.manifest.json    the arguments and input fingerprints of the run (written first)
    {split}.progress.jsonl   one line per finished shard: url, samples, bytes, skipped reasons
    {split}-NNNNN.tar        finished shards (written to a temp name, renamed when whole)
    {split}.index.json       per-shard sample and sentence counts, written last: training
                             reads only this
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

from vlds.data.shardio import ShardError

SCHEMA_VERSION = 2  # 2: video frames gzip-compressed (frames.npy.gz) in the synthetic world
MANIFEST_VERSION = 1


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
    "samples", "sentences"}], **extra} (e.g. "features" for feature shards); urls relative to
    task_dir. "sentences" (vlds.data.shardio.record_sentences summed: the training samples with
    one per caption) is kept only when every shard has it (a writer resuming shards recorded
    before it was counted leaves it out; python -m vlds.data.prep.recount adds it)."""
    counted = all("sentences" in s for s in shards)
    shards = [
        {"url": s["url"], "samples": s["samples"]}
        | ({"sentences": s["sentences"]} if counted else {})
        for s in shards
    ]
    index = {
        "task": task,
        "split": split,
        "total": sum(s["samples"] for s in shards),
        "schema_version": SCHEMA_VERSION,
        "shards": shards,
        **extra,
    }
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


EXAMPLES = 3  # files named per skip reason in the summary


def summarize(stats: list[dict]) -> dict:
    """Totals over shard stats: samples, shards and bytes on disk of the shards that hold
    samples (the index's), and over every shard (one emptied by skips too) the skipped
    reasons, the first few files of each, and the repairs."""
    skipped, repaired, examples = Counter(), Counter(), {}
    for s in stats:
        skipped.update(s.get("skipped", {}))
        repaired.update(s.get("repaired", {}))
        for reason, names in s.get("skip_examples", {}).items():
            kept = examples.setdefault(reason, [])
            kept += names[: EXAMPLES - len(kept)]
    full = [s for s in stats if s["samples"]]
    return {
        "samples": sum(s["samples"] for s in full),
        "shards": len(full),
        "bytes": sum(s["file_bytes"] for s in full),
        "skipped": dict(skipped),
        "skip_examples": examples,
        "repaired": dict(repaired),
    }


def print_summary(rows: list[tuple[str, str, dict]], seconds: float, out=None) -> None:
    """rows: (task, split, summarize() dict) -> a table on stdout, then what was repaired,
    which files were skipped, and file names found in more than one source."""
    import sys

    out = out or sys.stdout
    print(f"{'task':<8} {'split':<8} {'samples':>9} {'shards':>7} {'bytes':>15} skipped", file=out)
    for task, split, s in rows:
        skipped = Counter(s.get("skipped", {}))
        reasons = ", ".join(f"{n} {r}" for r, n in skipped.most_common()) or "0"
        print(
            f"{task:<8} {split:<8} {s['samples']:>9} {s['shards']:>7} {s['bytes']:>15,} {reasons}",
            file=out,
        )
    for task, split, s in rows:
        for what, n in Counter(s.get("repaired", {})).most_common():
            print(f"{task}/{split}: repaired {n}: {what}", file=out)
        for reason, names in s.get("skip_examples", {}).items():
            print(f"{task}/{split}: skipped ({reason}): {', '.join(names)} ...", file=out)
        dup = s.get("duplicates")
        if dup:
            print(
                f"{task}/{split}: {dup['count']} file name(s) found in more than one source "
                f"(e.g. {', '.join(dup['examples'])}); kept the {dup['kept']} listed "
                f"(--duplicates first|last)",
                file=out,
            )
    print(f"done in {seconds:.1f} s", file=out)
