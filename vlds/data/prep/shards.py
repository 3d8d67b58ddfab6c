"""Write training shards from the public releases: one task split per command.

    python -m vlds.data.prep.shards vqa --split train --out /data/vl-shards \
        --questions v2_OpenEnded_mscoco_{train,val}2014_questions.json \
        --annotations v2_mscoco_{train,val}2014_annotations.json \
        --karpathy dataset_coco.json --images /data/coco/train2014 /data/coco/val2014
    python -m vlds.data.prep.shards gqa|nlvr2|coco-caption|tvqa|how2qa|tvc|yc2c --help

Output: `{out}/{task}/{split}-NNNNN.tar` + `{split}.index.json`, with task the registry name
(vqa, gqa, nlvr, caption, tvqa, how2qa, tvc, yc2c) and every sample a `json` record as
vlds/data/tasks.py defines it, plus its payload: the original jpg/png bytes (never
re-encoded; named by their real format), `img0.*`/`img1.*` for NLVR2, `frames.npy` (T, S, S, 3)
uint8 decoded from videos, or `feats.npy` (T, D) float16 from per-video feature files.

The plan (which sample goes into which shard) is computed first, from the annotation files and
the file names in --images/--videos/--features; samples that cannot be planned are counted by
reason. Shards are then written in parallel (--workers processes), each to a temp name renamed
when whole; images are checked to decode, videos decoded, and a sample that fails is skipped
and counted. The index is written last, so training never sees a half-written split.

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
from vlds.data.prep import shardwrite
from vlds.data.prep.converters import ALIASES, Converter, Item, converters
from vlds.data.prep.converters.sources import Sources, read, ref_name

# samples per shard by payload: ~150 MB of COCO jpgs; frames 32 x 224^2 x 3 = 4.8 MB a sample
DEFAULT_SHARD = {"image": 1000, "frames": 32, "features": 1000}


class Skip(Exception):
    """A sample the writer drops, with the reason counted in the summary."""


def image_payload(data: bytes) -> str:
    """The member extension for an image's real format (jpg / png), after checking that it
    decodes (JPEGs at reduced size in draft mode: cheap); Skip otherwise."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        if fmt == "JPEG":
            img.draft("RGB", (64, 64))
        img.load()
    except Exception as e:
        raise Skip("undecodable image") from e
    if fmt not in ("JPEG", "PNG"):
        raise Skip(f"unsupported image format {fmt}")
    return "jpg" if fmt == "JPEG" else "png"


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def build_sample(item: Item, opts: dict) -> dict:
    """An Item -> {member ext: bytes | record}; raises Skip(reason)."""
    from vlds.data.prep.video import VideoError, decode_frames, load_feature_file

    sample: dict = {"json": item.rec}
    try:
        for prefix, ref in item.images:
            data = read(ref)
            ext = image_payload(data)
            sample[f"{prefix}.{ext}" if prefix else ext] = data
        if item.video is not None:
            src = item.video[1] if item.video[0] == "file" else read(item.video)
            start, end = item.window or (None, None)
            frames = decode_frames(src, opts["num_frames"], opts["frame_size"], start, end)
            if opts.get("gzip_frames"):
                sample["frames.npy.gz"] = gzip.compress(_npy(frames), compresslevel=3, mtime=0)
            else:
                sample["frames.npy"] = _npy(frames)
        if item.feats is not None:
            sample["feats.npy"] = _npy(load_feature_file(read(item.feats), ref_name(item.feats)))
    except VideoError as e:
        raise Skip("undecodable video" if item.video else "unreadable features") from e
    except OSError as e:
        raise Skip("unreadable file") from e
    return sample


def write_shard(job: tuple) -> dict:
    """Write one planned shard; returns its stats for the progress file."""
    task_dir, split, shard, items, opts = job
    url = shardwrite.shard_url(split, shard)
    skipped, written, size, dims = Counter(), 0, 0, set()
    with shardwrite.open_shard(Path(task_dir) / url) as tar:
        for item in items:
            try:
                sample = build_sample(item, opts)
            except Skip as e:
                skipped[str(e)] += 1
                continue
            if "feats.npy" in sample:
                dims.add(int(np.load(io.BytesIO(sample["feats.npy"])).shape[1]))
            size += shardwrite.write_sample(tar, item.key, sample)
            written += 1
    file_bytes = (Path(task_dir) / url).stat().st_size
    return {
        "shard": shard,
        "url": url,
        "samples": written,
        "items": len(items),
        "bytes": size,
        "file_bytes": file_bytes,
        "skipped": dict(skipped),
        "dims": sorted(dims),
    }


def plan_items(conv: Converter, args, sources: dict) -> tuple[list[Item], Counter]:
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
    return items, skipped


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


def run(args) -> dict:
    conv = converters()[args.command]
    t0 = time.perf_counter()
    sources = {
        name: Sources(getattr(args, name)) for name in conv.sources if getattr(args, name, None)
    }
    items, planned_skips = plan_items(conv, args, sources)
    kind = conv.kind if conv.kind == "image" else ("features" if args.features else "frames")
    if kind == "frames":
        from vlds.data.prep.video import require_av

        require_av()  # before any work: decoding video needs the [video] extra
    per_shard = args.samples_per_shard or DEFAULT_SHARD[kind]
    chunks = [items[i : i + per_shard] for i in range(0, len(items), per_shard)]
    task_dir = Path(args.out) / conv.task
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
    extra = {}
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
    summary = shardwrite.summarize([s for s in ordered if s["samples"]])
    summary["skipped"] = dict(Counter(summary["skipped"]) + planned_skips)
    for s in ordered:  # shards left empty by skips still hold skip counts
        if not s["samples"]:
            summary["skipped"] = dict(Counter(summary["skipped"]) + Counter(s["skipped"]))
    summary["resumed_shards"] = len(done)
    if not args.quiet:
        shardwrite.print_summary([(conv.task, args.split, summary)], time.perf_counter() - t0)
        print(
            f"-> {task_dir}/{args.split}.index.json"
            + (f" ({len(done)} shard(s) kept from an earlier run)" if done else "")
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
        initial=total - sum(len(j[3]) for j in jobs),
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
        q.add_argument("--out", required=True, help="shard root; writes OUT/{task}/")
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
        conv.add_args(q)
    return p


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    args.command = ALIASES.get(args.command, args.command)
    try:
        return run(args)
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


if __name__ == "__main__":
    main()
