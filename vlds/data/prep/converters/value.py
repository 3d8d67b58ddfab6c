"""The VALUE video tasks (TVQA, How2QA, TVC, YC2C) -> Items: jsonl annotations, a subtitle
jsonl, and either video files (frames are decoded by the writer) or per-video feature files.

    python -m vlds.data.prep.shards tvqa --split train --out /data/value-shards \
        --annotations tvqa_train.jsonl --subtitles tv_subtitles.jsonl \
        --features /data/value/clip-vit-b32       # {vid_name}.npy (T, 512), or .npz
    python -m vlds.data.prep.shards yc2c --split val --out /data/value-shards \
        --annotations yc2c_val.jsonl --subtitles yc2_subtitles.jsonl \
        --videos /data/yc2/videos.zip --num-frames 32 --frame-size 224

Annotations: TVQA / How2QA `{qid, q, a0.., answer_idx, ts, vid_name}` (How2QA has four
choices, TVQA five: all present are kept); TVC / YC2C `{vid_name, clip_id, ts, descs:
[{desc}]}`. `ts` is [start, end] or "start-end" in seconds. Subtitles: one line per video,
`{vid_name, sub: [{start, end, text}]}`; by default the whole video's subtitles are kept,
`--subs-window ts` keeps those overlapping the moment. Videos and feature files are found by
name: `{vid_name}.mp4` (.mkv .webm .avi .mov .m4v) or `{vid_name}.npy` / `.npz`.

A moment the release leaves undefined ("NaN-NaN", missing, unparsable) is repaired, never
dropped, and counted in the summary: TVQA's as its own preprocessing does (jayleicn/TVQA
`convert_ts`: [10, 30] seconds); How2QA's and TVC's become the whole clip, [0, duration] from
the record's `duration`, else up to the end of its last subtitle, else TVQA's window (nothing
tells the clip's length). YC2C's prompt shows no moment, so there is nothing to repair.
"""

from __future__ import annotations

import math
from collections import Counter

from vlds.data.prep.converters import Converter, Item, safe_key
from vlds.data.prep.converters.images import read_jsonl
from vlds.data.prep.converters.sources import safe_name
from vlds.data.prep.video import FEATURE_EXTS, VIDEO_EXTS
from vlds.data.tasks import labelled

QA_TASKS = ("tvqa", "how2qa")
TVQA_NAN_TS = [10.0, 30.0]  # jayleicn/TVQA preprocessing.py, convert_ts


def _args(p) -> None:
    p.add_argument("--annotations", nargs="+", required=True, help="{task}_{split}.jsonl")
    p.add_argument("--subtitles", nargs="*", default=[], help="subtitle jsonl (vid_name, sub)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--videos", nargs="+", help="folders / .zip / .tar of video files")
    src.add_argument("--features", nargs="+", help="folders / archives of {vid_name}.npy|.npz")
    p.add_argument("--num-frames", type=int, default=32, help="frames sampled per video")
    p.add_argument("--frame-size", type=int, default=224, help="frame side after resize + crop")
    p.add_argument(
        "--window",
        choices=("video", "ts"),
        default="video",
        help="sample frames over the whole video or only the moment ts",
    )
    p.add_argument("--subs-window", choices=("video", "ts"), default="video")
    p.add_argument("--gzip-frames", action="store_true", help="frames.npy.gz instead of .npy")
    p.add_argument(
        "--feature-vision",
        default="ViT-B-32",
        help="the open_clip tower the feature files came from (checked at training)",
    )
    p.add_argument("--feature-pretrained", default="openai")


def _inputs(args) -> list[str]:
    return [*args.annotations, *args.subtitles]


def parse_ts(value) -> list[float] | None:
    """[start, end] from [a, b] or "a-b"; None when missing or not finite."""
    try:
        if isinstance(value, str):
            a, b = value.split("-", 1)
        else:
            a, b = value
        ts = [float(a), float(b)]
    except (TypeError, ValueError):
        return None
    return ts if all(math.isfinite(x) for x in ts) else None


def _finite(x) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) and x > 0 else None


def repair_ts(task: str, r: dict, subs) -> tuple[list[float] | None, str | None, bool]:
    """(ts, repair note or None, whether ts is the whole clip) of an annotation row; see the
    module docstring."""
    ts = parse_ts(r.get("ts"))
    if ts is not None or task == "yc2c":
        return ts, None, False
    if task == "tvqa":
        return list(TVQA_NAN_TS), "ts repaired: undefined -> [10, 30] (TVQA's preprocessing)", False
    duration = _finite(r.get("duration"))
    if duration:
        return [0.0, duration], "ts repaired: undefined -> the whole clip (duration)", True
    last = max((_finite(end) or _finite(start) or 0.0 for start, end, _ in subs), default=0.0)
    if last:
        return [0.0, last], "ts repaired: undefined -> the whole clip (subtitles)", True
    return list(TVQA_NAN_TS), "ts repaired: undefined -> [10, 30] (no clip length known)", False


def load_subtitles(paths) -> dict[str, list[tuple[float, float, str]]]:
    subs = {}
    for path in paths:
        for r in read_jsonl(path):
            lines = r.get("sub", r.get("subs", []))
            if isinstance(lines, str):
                subs[r["vid_name"]] = [(0.0, math.inf, lines)]
                continue
            subs[r["vid_name"]] = [
                (float(s.get("start", 0.0)), float(s.get("end", math.inf)), str(s["text"]).strip())
                for s in lines
                if s.get("text")
            ]
    return subs


def subtitle_text(lines, window: list[float] | None) -> str:
    if window is not None:
        lo, hi = window
        lines = [x for x in lines if x[1] >= lo and x[0] <= hi]
    return " ".join(text for _, _, text in lines)


def _plan(task: str):
    def plan(args, sources, skipped: Counter):
        subs = load_subtitles(args.subtitles)
        files = sources["features" if args.features else "videos"]
        exts = FEATURE_EXTS if args.features else VIDEO_EXTS
        missing = "features not found" if args.features else "video not found"
        for f in args.annotations:
            for line, r in enumerate(read_jsonl(f)):
                vid = r.get("vid_name")
                if not isinstance(vid, str) or not vid:
                    skipped["missing field"] += 1
                    continue
                if not safe_name(vid):
                    skipped["path outside the dataset root"] += 1
                    continue
                ts, note, whole = repair_ts(task, r, subs.get(vid, ()))
                rec = {"task": task}
                if task in QA_TASKS:
                    choices = [str(r[f"a{i}"]) for i in range(5) if f"a{i}" in r]
                    if "q" not in r or len(choices) < 2:
                        skipped["missing field"] += 1
                        continue
                    rec.update(
                        id=str(r.get("qid", f"{vid}-{line}")), question=r["q"], choices=choices
                    )
                    if "answer_idx" in r:  # the test release has none
                        rec["answer_idx"] = int(r["answer_idx"])
                else:
                    descs = r.get("descs") or []
                    caps = [d["desc"] if isinstance(d, dict) else d for d in descs]
                    caps = [c.strip() for c in caps if isinstance(c, str) and c.strip()]
                    rec["id"] = str(r.get("clip_id", f"{vid}-{line}"))
                    rec |= {"captions": caps} if caps else {}
                window = ts if args.subs_window == "ts" else None
                rec["subtitles"] = subtitle_text(subs.get(vid, ()), window)
                if ts is not None:
                    rec["ts"] = ts
                rec["vid_name"] = vid
                ref = files.lookup_stem(vid, exts)
                if ref is None:
                    skipped[missing] += 1
                    continue
                key = f"{task}-{safe_key(rec['id'])}"
                notes = (note,) if note else ()
                missing = "no answer" if task in QA_TASKS else "no captions"
                missing = "" if labelled(rec) else missing
                if args.features:
                    yield Item(key, rec, feats=ref, notes=notes, unlabelled=missing)
                else:
                    clip = tuple(ts) if args.window == "ts" and ts and not whole else None
                    yield Item(key, rec, video=ref, window=clip, notes=notes, unlabelled=missing)

    return plan


CONVERTERS = tuple(
    Converter(
        name,
        name,
        "video",
        f"VALUE {name}: jsonl + subtitles + videos or features",
        _args,
        _inputs,
        _plan(name),
        ("videos", "features"),
    )
    for name in ("tvqa", "how2qa", "tvc", "yc2c")
)
