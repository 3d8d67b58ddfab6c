"""VQAv2, GQA, NLVR2 and COCO Karpathy captions -> Items (records + image references).

    python -m vlds.data.prep.shards vqa --split train --out /data/vl-shards \
        --questions v2_OpenEnded_mscoco_train2014_questions.json \
                    v2_OpenEnded_mscoco_val2014_questions.json \
        --annotations v2_mscoco_train2014_annotations.json v2_mscoco_val2014_annotations.json \
        --karpathy dataset_coco.json --images /data/coco/train2014 /data/coco/val2014.zip
    python -m vlds.data.prep.shards gqa --split testdev --out /data/vl-shards \
        --questions testdev_balanced_questions.json --images /data/gqa/images
    python -m vlds.data.prep.shards nlvr2 --split train --out /data/vl-shards \
        --annotations train.json --images /data/nlvr2/images/train
    python -m vlds.data.prep.shards coco-caption --split val --out /data/vl-shards \
        --karpathy dataset_coco.json --images /data/coco/val2014

Karpathy splits (VQA with --karpathy, and captions): `--split train` takes Karpathy's "train"
and "restval" images, "val" and "test" their own; `--karpathy-splits` names them explicitly.
Without --karpathy, VQA keeps every question of the given files (the official split).

Test splits without labels are written as they are, marked unlabelled in their index (VQA
test-dev / test-std: no --annotations; GQA test-balanced: no "answer"; NLVR2 without "label"):

    python -m vlds.data.prep.shards vqa --split test-dev --out /data/vl-shards \
        --questions v2_OpenEnded_mscoco_test-dev2015_questions.json --images /data/coco/test2015
"""

from __future__ import annotations

import json
from collections import Counter

from vlds.data.prep.converters import Converter, Item, safe_key
from vlds.data.prep.converters.sources import safe_name

KARPATHY = {"train": "train,restval", "val": "val", "test": "test"}


def load_json(path) -> object:
    """An annotation file; a missing or unparsable one aborts the split (ValueError naming the
    file: nothing can be planned without it)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"annotation file {path} is not valid JSON ({e}); is it truncated? download it again"
        ) from None
    except UnicodeDecodeError as e:
        raise ValueError(
            f"annotation file {path} is not UTF-8 text ({e}); is it compressed?"
        ) from None


def read_jsonl(path):
    """The records of a jsonl annotation file (a bad line aborts, naming the file and line)."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f"annotation file {path} line {n} is not valid JSON ({e}); is the file "
                        f"truncated or not jsonl (one JSON object per line)?"
                    ) from None


def karpathy_splits(args) -> set[str]:
    names = args.karpathy_splits or KARPATHY.get(args.split)
    if not names:
        raise ValueError(
            f"--split {args.split!r} is not a Karpathy split name (train, val, test); say which "
            f"Karpathy splits it takes with --karpathy-splits, e.g. --karpathy-splits val"
        )
    return {s.strip() for s in names.split(",") if s.strip()}


def _karpathy_images(args) -> dict[int, dict]:
    """cocoid -> Karpathy image entry, for the images of this split."""
    keep = karpathy_splits(args)
    return {
        int(im["cocoid"]): im for im in load_json(args.karpathy)["images"] if im["split"] in keep
    }


def _image(sources, name: str, skipped: Counter):
    if not safe_name(name):
        skipped["path outside the dataset root"] += 1
        return None
    ref = sources.lookup(name)
    if ref is None:
        skipped["image not found"] += 1
    return ref


# ---- VQAv2 --------------------------------------------------------------------------------


def _vqa_args(p) -> None:
    p.add_argument("--questions", nargs="+", required=True, help="v2_OpenEnded_*_questions.json")
    p.add_argument(
        "--annotations",
        nargs="*",
        default=[],
        help="v2_mscoco_*_annotations.json (none for test-dev / test: an unlabelled split)",
    )
    p.add_argument("--images", nargs="+", required=True, help="folders / .zip / .tar of images")
    p.add_argument("--karpathy", help="dataset_coco.json: keep the questions of its split")
    p.add_argument("--karpathy-splits", help="e.g. 'train,restval' (default from --split)")


def _vqa_inputs(args) -> list[str]:
    return [*args.questions, *args.annotations, *([args.karpathy] if args.karpathy else [])]


def _vqa_plan(args, sources, skipped: Counter):
    images = sources["images"]
    answers = {}
    for f in args.annotations:
        for a in load_json(f)["annotations"]:
            answers[a["question_id"]] = a
    karpathy = _karpathy_images(args) if args.karpathy else None
    for f in args.questions:
        data = load_json(f)
        # the release names its images COCO_{subtype}_{id:012d}.jpg (subtype train2014, ...)
        subtypes = [data["data_subtype"]] if data.get("data_subtype") else ["train2014", "val2014"]
        for q in data["questions"]:
            image_id, qid = int(q["image_id"]), q["question_id"]
            if karpathy is not None and image_id not in karpathy:
                continue  # another Karpathy split's image
            ann = answers.get(qid) or {}
            if karpathy is not None:
                names = [karpathy[image_id]["filename"]]
            else:
                names = [f"COCO_{s}_{image_id:012d}.jpg" for s in subtypes]
            refs = [images.lookup(n) for n in names if safe_name(n)]
            ref = next((r for r in refs if r is not None), None)
            if ref is None:
                _image(images, names[0], skipped)
                continue
            rec = {"task": "vqa", "id": str(qid), "question": q["question"]}
            if ann.get("answers"):
                rec["answers"] = [a["answer"] for a in ann["answers"]]
                rec["answer_type"] = ann.get("answer_type", "")
                rec["question_type"] = ann.get("question_type", "")
            rec["image_id"] = image_id
            missing = "" if "answers" in rec else "no annotation"
            yield Item(f"vqa-{safe_key(qid)}", rec, images=(("", ref),), unlabelled=missing)


# ---- GQA ----------------------------------------------------------------------------------


def _gqa_args(p) -> None:
    p.add_argument("--questions", nargs="+", required=True, help="{split}_balanced_questions.json")
    p.add_argument("--images", nargs="+", required=True, help="folders / .zip / .tar of images")


def _gqa_plan(args, sources, skipped: Counter):
    for f in args.questions:
        for qid, q in load_json(f).items():
            image_id = str(q["imageId"])
            ref = _image(sources["images"], f"{image_id}.jpg", skipped)
            if ref is None:
                continue
            rec = {"task": "gqa", "id": str(qid), "question": q["question"]}
            if "answer" in q:  # test-balanced has none
                rec["answer"] = q["answer"]
            rec["image_id"] = int(image_id) if image_id.isdigit() else image_id
            missing = "" if "answer" in rec else "no answer"
            yield Item(f"gqa-{safe_key(qid)}", rec, images=(("", ref),), unlabelled=missing)


# ---- NLVR2 --------------------------------------------------------------------------------


def _nlvr_args(p) -> None:
    p.add_argument("--annotations", nargs="+", required=True, help="{split}.json (jsonl)")
    p.add_argument("--images", nargs="+", required=True, help="folders / .zip / .tar of images")


def _label(value) -> bool | None:
    if isinstance(value, bool):
        return value
    return {"true": True, "false": False}.get(str(value).strip().lower())


def _nlvr_plan(args, sources, skipped: Counter):
    for f in args.annotations:
        for r in read_jsonl(f):
            ident, label = r.get("identifier"), _label(r.get("label"))
            if not ident or "sentence" not in r:
                skipped["missing field"] += 1
                continue
            # identifier "{split}-{set}-{pair}-{sentence}": the pair's images are
            # "{split}-{set}-{pair}-img0.png" and "-img1.png"
            prefix = ident.rsplit("-", 1)[0]
            refs = [_image(sources["images"], f"{prefix}-img{i}.png", skipped) for i in (0, 1)]
            if None in refs:
                continue
            rec = {"task": "nlvr", "id": ident, "sentence": r["sentence"]}
            if label is not None:
                rec["label"] = label
            rec["identifier"] = ident
            pair = (("img0", refs[0]), ("img1", refs[1]))
            missing = "" if label is not None else "no label"
            yield Item(f"nlvr-{safe_key(ident)}", rec, images=pair, unlabelled=missing)


# ---- COCO captions (Karpathy) -------------------------------------------------------------


def _caption_args(p) -> None:
    p.add_argument("--karpathy", required=True, help="dataset_coco.json")
    p.add_argument("--images", nargs="+", required=True, help="folders / .zip / .tar of images")
    p.add_argument("--karpathy-splits", help="e.g. 'train,restval' (default from --split)")


def _caption_plan(args, sources, skipped: Counter):
    for cocoid, im in sorted(_karpathy_images(args).items()):
        captions = [s["raw"].strip() for s in im.get("sentences", ()) if s.get("raw", "").strip()]
        ref = _image(sources["images"], im["filename"], skipped)
        if ref is None:
            continue
        rec = {"task": "caption", "id": str(cocoid)}
        rec |= {"captions": captions} if captions else {}
        rec["image_id"] = cocoid
        missing = "" if captions else "no captions"
        yield Item(f"caption-{cocoid}", rec, images=(("", ref),), unlabelled=missing)


def _files(*names):
    """The annotation files named by these arguments (a path or a list of paths)."""

    def inputs(args) -> list[str]:
        out = []
        for n in names:
            value = getattr(args, n) or []
            out += [value] if isinstance(value, str) else list(value)
        return out

    return inputs


CONVERTERS = (
    Converter(
        "vqa",
        "vqa",
        "image",
        "VQAv2 questions + annotations (Karpathy split optional)",
        _vqa_args,
        _vqa_inputs,
        _vqa_plan,
        ("images",),
    ),
    Converter(
        "gqa",
        "gqa",
        "image",
        "GQA balanced questions",
        _gqa_args,
        _files("questions"),
        _gqa_plan,
        ("images",),
    ),
    Converter(
        "nlvr2",
        "nlvr",
        "image",
        "NLVR2 jsonl + image pairs",
        _nlvr_args,
        _files("annotations"),
        _nlvr_plan,
        ("images",),
    ),
    Converter(
        "coco-caption",
        "caption",
        "image",
        "COCO captions, Karpathy dataset_coco.json",
        _caption_args,
        _files("karpathy"),
        _caption_plan,
        ("images",),
    ),
)
