"""Write training shards from the public releases: one task split per command.

    python -m vlds.data.prep.shards vqa --split train --out /data/vl-shards \
        --questions v2_OpenEnded_mscoco_{train,val}2014_questions.json \
        --annotations v2_mscoco_{train,val}2014_annotations.json \
        --karpathy dataset_coco.json --images /data/coco/train2014 /data/coco/val2014
    python -m vlds.data.prep.shards gqa|nlvr2|coco-caption|tvqa|how2qa|tvc|yc2c --help

Output: `{out}/{task}/{split}-NNNNN.tar` + `{split}.index.json`, with task the registry name
(vqa, gqa, nlvr, caption, tvqa, how2qa, tvc, yc2c) and every sample a `json` record as
vlds/data/tasks.py defines it, plus its payload: the original jpg/png bytes (named by their
real format; any other format PIL decodes is re-encoded once to PNG), `img0.*`/`img1.*` for
NLVR2, `frames.npy` (T, S, S, 3) uint8 decoded from videos, or `feats.npy` (T, D) float16 from
per-video feature files. Records that share their images (VQA's ~5.4 questions per COCO
image) are one tar sample: the payload once, the records in a `group.json` list, expanded into
one sample per record by every reader (vlds.data.shardio), so indexes, mixing and resume
count records as before. `--samples-per-shard` counts payloads.

The plan (which sample goes into which shard) is computed first, from the annotation files and
the file names in --images/--videos/--features; samples that cannot be planned are counted by
reason. Shards are then written in parallel (--workers processes), each to a temp name renamed
when whole; images are checked to decode, videos decoded, and any per-file failure (an archive
member with a bad CRC, a truncated file, an image, video or feature file its decoder rejects)
skips that sample, counted by reason with the first files named. Only what makes the split
meaningless aborts: a missing or unparsable annotation file, an unwritable output. A split
whose records have no labels (a test split) is written and marked unlabelled. The index is
written last, so training never sees a half-written split.

Re-running over the same output is safe: `{split}.manifest.json` records the arguments, the
input files' sizes and times and the plan's hash. Same -> finished shards are kept and the rest
written (a killed run resumes); different -> refused with the differences (--overwrite starts
the split again). Exit codes: 0 done, 2 refused or bad arguments.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from vlds.cli import MissingExtra
from vlds.data import remote
from vlds.data.prep import shardwrite
from vlds.data.prep.converters import ALIASES, Converter, Item, converters
from vlds.data.prep.converters.sources import Sources, read, ref_name
from vlds.data.shardio import GROUP, record_sentences

# samples per shard by payload: ~150 MB of COCO jpgs; frames 32 x 224^2 x 3 = 4.8 MB a sample
DEFAULT_SHARD = {"image": 1000, "frames": 32, "features": 1000}


class Skip(Exception):
    """A sample the writer drops, with the reason counted in the summary."""


def image_payload(data: bytes) -> tuple[str, bytes, str | None]:
    """(member extension, bytes, repair note) of an image, whatever its file name says.

    JPEG and PNG are kept as they are (JPEGs checked at reduced size in draft mode: cheap).
    Any other format PIL decodes (NLVR2's ".png" files that hold TIFF, WebP, GIF or ICO
    bytes) is re-encoded once, losslessly, to an RGB PNG: the training decoder then meets only
    the two formats it is tested on. Skip when PIL cannot decode it."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        if fmt == "JPEG":
            img.draft("RGB", (64, 64))
        img.load()
        if fmt in ("JPEG", "PNG"):
            return ("jpg" if fmt == "JPEG" else "png"), data, None
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="PNG")  # a GIF's or an ICO's first frame
    except Exception as e:  # any decoder failure (truncated, bomb, odd mode) skips this file
        raise Skip("undecodable image") from e
    return "png", buf.getvalue(), f"image re-encoded to PNG (was {fmt})"


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _read(ref) -> bytes:
    """A referenced file's bytes; Skip for anything per-file (a zip member with a bad CRC, a
    truncated archive, an unreadable file)."""
    try:
        return read(ref)
    except Exception as e:  # zipfile.BadZipFile, zlib.error, EOFError, OSError, ...
        raise Skip("unreadable file") from e


def build_sample(item: Item, opts: dict) -> tuple[dict, list[str]]:
    """An Item -> ({member ext: bytes | record}, repair notes); raises Skip(reason) for any
    failure that concerns this sample's own files only."""
    from vlds.data.prep.video import decode_frames, load_feature_file

    sample: dict = {"json": item.rec}
    notes = list(item.notes)
    for prefix, ref in item.images:
        ext, data, note = image_payload(_read(ref))
        sample[f"{prefix}.{ext}" if prefix else ext] = data
        notes += [note] if note else []
    try:
        if item.video is not None:
            src = item.video[1] if item.video[0] == "file" else _read(item.video)
            start, end = item.window or (None, None)
            frames = decode_frames(src, opts["num_frames"], opts["frame_size"], start, end)
            if opts.get("gzip_frames"):
                sample["frames.npy.gz"] = gzip.compress(_npy(frames), compresslevel=3, mtime=0)
            else:
                sample["frames.npy"] = _npy(frames)
        if item.feats is not None:
            data = _read(item.feats)
            sample["feats.npy"] = _npy(load_feature_file(data, ref_name(item.feats)))
    except (Skip, MissingExtra):
        raise
    except Exception as e:  # VideoError or any decoder failure: this file's, not the split's
        raise Skip("undecodable video" if item.video else "unreadable features") from e
    return sample, notes


def _item_name(item: Item) -> str:
    refs = [r for _, r in item.images] + [item.video, item.feats]
    return ", ".join(ref_name(r) for r in refs if r) or item.key


def group_items(items: list[Item]) -> list[list[Item]]:
    """Items that share their images (VQA's questions about one COCO image, GQA's about one
    scene, NLVR2's sentences about one pair), in order of first appearance: each group is
    one tar sample, its payload stored once (a GROUP member lists the records). Video and
    feature items stay one per sample."""
    groups: dict = {}
    for it in items:
        key = it.images if it.images and it.video is None and it.feats is None else it.key
        groups.setdefault(key, []).append(it)
    return list(groups.values())


def write_shard(job: tuple) -> dict:
    """Write one planned shard (a list of item groups); returns its stats for the progress
    file: "samples" counts records (what the index and the stream count), "payloads" the
    tar samples."""
    task_dir, split, shard, groups, opts = job
    url = shardwrite.shard_url(split, shard)
    skipped, repaired, written, payloads, size, dims = Counter(), Counter(), 0, 0, 0, set()
    sentences = 0  # training samples with one per caption (record_sentences)
    examples: dict[str, list[str]] = {}  # the first few files skipped for each reason
    with shardwrite.open_shard(Path(task_dir) / url) as tar:
        for group in groups:
            first = group[0]
            try:
                sample, notes = build_sample(first, opts)
            except Skip as e:
                skipped[str(e)] += len(group)
                names = examples.setdefault(str(e), [])
                if len(names) < shardwrite.EXAMPLES:
                    names.append(_item_name(first))
                continue
            for it in group[1:]:
                notes += list(it.notes)
            repaired.update(notes)
            if "feats.npy" in sample:
                dims.add(int(np.load(io.BytesIO(sample["feats.npy"])).shape[1]))
            key = first.key
            if len(group) > 1:
                del sample["json"]
                sample[GROUP] = [it.rec for it in group]
                key = f"{first.key}-group"
            size += shardwrite.write_sample(tar, key, sample)
            written += len(group)
            sentences += sum(record_sentences(it.rec) for it in group)
            payloads += 1
    file_bytes = (Path(task_dir) / url).stat().st_size
    return {
        "shard": shard,
        "url": url,
        "samples": written,
        "sentences": sentences,
        "payloads": payloads,
        "items": sum(len(g) for g in groups),
        "bytes": size,
        "file_bytes": file_bytes,
        "skipped": dict(skipped),
        "skip_examples": examples,
        "repaired": dict(repaired),
        "dims": sorted(dims),
    }


def plan_items(conv: Converter, args, sources: dict) -> tuple[list[Item], Counter]:
    """(items, skipped reasons) of the plan; a second item with an id already planned is
    skipped, and so is a record without its label when others have theirs (all without: an
    unlabelled test split). Repair notes are counted when a sample is written: a repaired
    item may still be skipped for its files."""
    skipped = Counter()
    items, seen = [], set()
    for item in conv.plan(args, sources, skipped):
        if item.key in seen:
            skipped["duplicate id"] += 1
            continue
        seen.add(item.key)
        items.append(item)
        if args.limit and len(items) >= args.limit:
            break
    outside = sum(s.outside for s in sources.values())
    if outside:
        skipped["archive/folder entries outside the dataset root"] += outside
    if any(not it.unlabelled for it in items):  # a labelled split: drop records without one
        skipped.update(it.unlabelled for it in items if it.unlabelled)
        items = [it for it in items if not it.unlabelled]
    return items, skipped


def duplicate_report(sources: dict) -> dict:
    """File names found in more than one place across a converter's sources."""
    n = sum(s.duplicates for s in sources.values())
    names = [x for s in sources.values() for x in s.duplicate_names][: Sources.EXAMPLES]
    prefer = next((s.prefer for s in sources.values()), "first")
    return {"count": n, "examples": names, "kept": prefer} if n else {}


def plan_hash(items: list[Item]) -> str:
    h = hashlib.sha256()
    for it in items:
        refs = [r for _, r in it.images] + [it.video, it.feats]
        h.update(
            json.dumps(
                [it.key, it.rec, [ref_name(r) for r in refs if r], it.window], sort_keys=True
            ).encode()
        )
    return h.hexdigest()


OPTION_KEYS = ("num_frames", "frame_size", "gzip_frames")
NOT_IN_MANIFEST = {"workers", "overwrite", "quiet", "command", "out"}


def run(args, out: Path | None = None) -> dict:
    """Write the split under `out` (default --out; its staging folder when --out is a URL)."""
    conv = converters()[args.command]
    t0 = time.perf_counter()
    sources = {
        name: Sources(getattr(args, name), prefer=args.duplicates)
        for name in conv.sources
        if getattr(args, name, None)
    }
    items, planned_skips = plan_items(conv, args, sources)
    kind = conv.kind if conv.kind == "image" else ("features" if args.features else "frames")
    if kind == "frames":
        from vlds.data.prep.video import require_av

        require_av()  # before any work: decoding video needs the [video] extra
    per_shard = args.samples_per_shard or DEFAULT_SHARD[kind]
    groups = [[it] for it in items] if args.no_group else group_items(items)
    chunks = [groups[i : i + per_shard] for i in range(0, len(groups), per_shard)]
    task_dir = (out or Path(args.out)) / conv.task
    if not items:
        raise shardwrite.ShardError(
            f"no {conv.task} sample could be planned from the inputs (skipped: "
            f"{dict(planned_skips) or 'none'}); check the annotation files and --split"
        )
    norm = {k: _resolved(k, v) for k, v in vars(args).items() if k not in NOT_IN_MANIFEST}
    spec = {
        "converter": conv.name,
        "task": conv.task,
        "split": args.split,
        "args": norm,
        "inputs": shardwrite.fingerprint(conv.inputs(args)),
        "plan": {
            "items": len(items),
            "payloads": len(groups),
            "shards": len(chunks),
            "sha256": plan_hash(items),
            "skipped": dict(planned_skips),
        },
    }
    done = shardwrite.begin_split(task_dir, args.split, spec, overwrite=args.overwrite)
    opts = {k: getattr(args, k, None) for k in OPTION_KEYS}
    jobs = [
        (str(task_dir), args.split, k, chunk, opts)
        for k, chunk in enumerate(chunks)
        if k not in done
    ]
    stats = dict(done)
    _run_jobs(jobs, args, stats, task_dir, len(items))
    ordered = [stats[k] for k in sorted(stats)]
    unlabelled = all(it.unlabelled for it in items)
    extra = {"labelled": False} if unlabelled else {}
    if kind == "features":
        dims = sorted({d for s in ordered for d in s.get("dims", ())})
        if len(dims) > 1:
            raise shardwrite.ShardError(f"feature files of different widths {dims} in one split")
        extra["features"] = {
            "kind": "frames",
            "vision": args.feature_vision,
            "pretrained": args.feature_pretrained,
            "dim": dims[0] if dims else 0,
            "dtype": "float16",
            "source": "files",
        }
    shardwrite.write_index(
        task_dir, conv.task, args.split, [s for s in ordered if s["samples"]], **extra
    )
    summary = shardwrite.summarize(ordered)  # shards left empty by skips still hold counts
    summary["skipped"] = dict(Counter(summary["skipped"]) + planned_skips)
    summary["duplicates"] = duplicate_report(sources)
    summary["labelled"] = not unlabelled
    summary["resumed_shards"] = len(done)
    if not args.quiet:
        shardwrite.print_summary([(conv.task, args.split, summary)], time.perf_counter() - t0)
        print(
            f"-> {remote.redact(remote.join(args.out, conv.task, args.split + '.index.json'))}"
            + (f" ({len(done)} shard(s) kept from an earlier run)" if done else "")
        )
        if unlabelled:
            print(
                f"{conv.task}/{args.split} has no labels (a test split): training refuses it; "
                f"python -m vlds.evaluate --checkpoint RUN --shards {args.out} --split "
                f"{args.split} writes its submission file"
            )
    return summary


def _resolved(key: str, value):
    """Path arguments as absolute paths, so a manifest compares the same from any cwd."""
    if isinstance(value, list):
        return [str(Path(x).resolve()) for x in value]
    return str(Path(value).resolve()) if key == "karpathy" and value else value


def _run_jobs(jobs, args, stats: dict, task_dir: Path, total: int) -> None:
    from tqdm import tqdm

    workers = args.workers or min(len(jobs), len(os.sched_getaffinity(0)))
    bar = tqdm(
        total=total,
        initial=total - sum(len(g) for j in jobs for g in j[3]),
        unit="sample",
        desc=f"{task_dir.name}/{args.split}",
        disable=args.quiet,
        smoothing=0,
    )
    skipped = 0

    def done(s: dict) -> None:
        nonlocal skipped
        shardwrite.record_shard(task_dir, args.split, s)
        stats[s["shard"]] = s
        skipped += sum(s["skipped"].values())
        bar.update(s["items"])
        bar.set_postfix(skipped=skipped)

    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            done(write_shard(job))
    else:
        # spawn: the caller may hold threads; each worker opens the archives it reads itself
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for s in pool.imap_unordered(write_shard, jobs):
                done(s)
    bar.close()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vlds.data.prep.shards",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="TASK")
    for conv in converters().values():
        q = sub.add_parser(
            conv.name,
            help=conv.help,
            description=conv.help,
            aliases=[a for a, c in ALIASES.items() if c == conv.name],
        )
        q.add_argument("--split", required=True, help="output split name (train, val, test, ...)")
        q.add_argument(
            "--out", required=True, help="shard root (a folder or a URL); writes OUT/{task}/"
        )
        q.add_argument(
            "--samples-per-shard",
            type=int,
            default=0,
            help="default: 1000 images/feature files, 32 decoded videos",
        )
        q.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
        q.add_argument("--limit", type=int, default=0, help="only the first N planned samples")
        q.add_argument("--overwrite", action="store_true", help="delete this split's files first")
        q.add_argument("--quiet", action="store_true", help="no progress bar or summary")
        q.add_argument(
            "--no-group",
            action="store_true",
            help="one tar sample per record, shared images repeated (for other webdataset "
            "readers; vlds reads either)",
        )
        q.add_argument(
            "--duplicates",
            choices=("first", "last"),
            default="first",
            help="a file name found in several sources: keep the one listed first or last",
        )
        conv.add_args(q)
    return p


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    args.command = ALIASES.get(args.command, args.command)
    try:
        with remote.staged(args.out) as out:
            return run(args, out)
    except (shardwrite.ShardError, FileNotFoundError, ValueError, MissingExtra) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyError as e:
        print(
            f"error: an annotation record lacks the field {e}; is it the right file for "
            f"{args.command}?",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    except remote.RemoteError as e:  # uploading to a URL --out
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:  # per-sample read errors are skips: this is an annotation or the output
        print(
            f"error: {e.filename or args.out}: {e.strerror or e}; check that the annotation files "
            f"are readable and --out is writable, with space for the shards",
            file=sys.stderr,
        )
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
