"""Shard writers for the public releases (python -m vlds.data.prep.shards): tiny inputs in each
format (json/jsonl annotations, PIL-made images in folders, zips and tars, PyAV-made videos,
feature files) are converted, and the shards are checked against vlds/data/tasks.py, read by
the stream, and trained on.

    pytest tests/test_shards.py
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import train_run
from vlds.data.decode import Collator, Preprocess
from vlds.data.prep.shards import main as shards_main
from vlds.data.shardio import GROUP, SkipCounter, load_index, read_samples
from vlds.data.stream import TrainStream
from vlds.data.tasks import ALL_TASKS, TASKS

REPO = Path(__file__).resolve().parent.parent
FIELDS = {  # tasks.py's table (+ "task", "id"); yc2c/tvc also carry ts when the release has it
    "vqa": {"question", "answers", "answer_type", "question_type", "image_id"},
    "gqa": {"question", "answer", "image_id"},
    "nlvr": {"sentence", "label", "identifier"},
    "caption": {"captions", "image_id"},
    "tvqa": {"question", "choices", "answer_idx", "subtitles", "ts", "vid_name"},
    "how2qa": {"question", "choices", "answer_idx", "subtitles", "ts", "vid_name"},
    "tvc": {"captions", "subtitles", "ts", "vid_name"},
    "yc2c": {"captions", "subtitles", "ts", "vid_name"},
}
COLORS = ["red", "green", "blue", "yellow"]


def picture(i: int, fmt: str, size=(120, 90)) -> bytes:
    rng = np.random.default_rng(i)
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[...] = rng.integers(0, 255, 3, dtype=np.uint8)
    arr[10:40, 20:60] = rng.integers(0, 255, 3, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def write_zip(path: Path, files: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)


def write_tar(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_release(root: Path) -> dict:
    """Every public format in miniature. COCO: 12 images, train2014 ids 1-8 (a folder; id 7 is
    missing, id 8 is not a JPEG), val2014 ids 101-104 (a zip); Karpathy: 1-4 train, 5-8
    restval, 101-102 val, 103-104 test. 2 questions per image."""
    p: dict = {}
    coco = root / "coco"
    (coco / "train2014").mkdir(parents=True)
    for i in range(1, 9):
        if i != 7:
            data = picture(i, "JPEG") if i != 8 else b"\xff\xd8 not really a jpeg"
            (coco / "train2014" / f"COCO_train2014_{i:012d}.jpg").write_bytes(data)
    write_zip(
        coco / "val2014.zip",
        {f"val2014/COCO_val2014_{i:012d}.jpg": picture(i, "JPEG") for i in range(101, 105)},
    )
    p["coco_images"] = [coco / "train2014", coco / "val2014.zip"]
    split_of = {
        **{i: "train" for i in range(1, 5)},
        **{i: "restval" for i in range(5, 9)},
        101: "val",
        102: "val",
        103: "test",
        104: "test",
    }
    karpathy = {
        "images": [
            {
                "filepath": "train2014" if i < 100 else "val2014",
                "cocoid": i,
                "split": s,
                "filename": f"COCO_{'train' if i < 100 else 'val'}2014_{i:012d}.jpg",
                "sentences": [
                    {"raw": f"a {c} thing number {i}. ", "tokens": []} for c in COLORS[:3]
                ],
            }
            for i, s in split_of.items()
        ]
    }
    p["karpathy"] = root / "dataset_coco.json"
    p["karpathy"].write_text(json.dumps(karpathy))
    for sub, ids in (("train2014", range(1, 9)), ("val2014", range(101, 105))):
        qs, anns = [], []
        for i in ids:
            for k in range(2):
                qid = i * 10 + k
                qs.append(
                    {"image_id": i, "question": f"what color is thing {k}?", "question_id": qid}
                )
                answers = [COLORS[(i + k) % 4]] * 7 + ["pink"] * 3
                anns.append(
                    {
                        "question_id": qid,
                        "image_id": i,
                        "question_type": "what color",
                        "answer_type": "other",
                        "multiple_choice_answer": answers[0],
                        "answers": [
                            {"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                            for j, a in enumerate(answers)
                        ],
                    }
                )
        p[f"q_{sub}"] = root / f"v2_OpenEnded_mscoco_{sub}_questions.json"
        p[f"q_{sub}"].write_text(json.dumps({"data_subtype": sub, "questions": qs}))
        p[f"a_{sub}"] = root / f"v2_mscoco_{sub}_annotations.json"
        p[f"a_{sub}"].write_text(json.dumps({"annotations": anns[:-1]}))  # last: no annotation

    # GQA: images in an uncompressed tar, one escaping member ("../evil.jpg")
    gqa = {
        f"images/{n}.jpg": picture(200 + i, "JPEG")
        for i, n in enumerate(["2354786", "2375429", "n161313", "2400001"])
    }
    gqa["../evil.jpg"] = picture(299, "JPEG")
    p["gqa_images"] = root / "gqa_images.tar"
    write_tar(p["gqa_images"], gqa)
    for split, ids in (("train", ["2354786", "2375429", "n161313", "2400001"]), ("val", None)):
        ids = ids or ["2400001", "n161313", "2354786", "missing9"]
        qs = {
            f"{split}{j:05d}": {
                "imageId": im,
                "question": f"is the sky {COLORS[j % 4]}?",
                "answer": "yes" if j % 2 else "no",
                "fullAnswer": "...",
            }
            for j, im in enumerate(ids * 2)
        }
        p[f"gqa_{split}"] = root / f"{split}_balanced_questions.json"
        p[f"gqa_{split}"].write_text(json.dumps(qs))

    # NLVR2: png pairs in nested folders (the train release has numbered subfolders)
    nl = root / "nlvr2" / "images"
    for split in ("train", "dev"):
        rows = []
        for n in range(4):
            for pair in range(2):
                d = nl / split / str(n % 2)
                d.mkdir(parents=True, exist_ok=True)
                for img in (0, 1):
                    (d / f"{split}-{n}-{pair}-img{img}.png").write_bytes(
                        picture(1000 + n * 10 + pair * 2 + img, "PNG", (100, 80))
                    )
                rows.append(
                    {
                        "identifier": f"{split}-{n}-{pair}-0",
                        "sentence": f"statement {n}",
                        "label": "True" if (n + pair) % 2 else "False",
                        "left_url": "http://x",
                        "right_url": "http://y",
                    }
                )
        p[f"nlvr_{split}"] = jsonl(root / f"nlvr_{split}.json", rows)
    p["nlvr_images"] = [nl]
    p.update(make_video_release(root))
    return p


def make_video_release(root: Path) -> dict:
    """VALUE-style jsonl for the four video tasks, a subtitle jsonl, 6 two-second mp4 clips
    (one truncated) and per-video feature files (.npy and .npz)."""
    from vlds.data.prep.video import encode_video

    p: dict = {}
    vids = root / "videos"
    feats = root / "features"
    vids.mkdir()
    feats.mkdir()
    names = [f"show_s01e0{i}_clip" for i in range(6)]
    for i, name in enumerate(names):
        frames = np.zeros((20, 48, 64, 3), np.uint8)
        frames[..., i % 3] = (np.arange(20) * 12)[:, None, None]  # brightness encodes time
        encode_video(vids / f"{name}.mp4", frames, fps=10)
        arr = np.random.default_rng(i).standard_normal((5 + i, 16)).astype(np.float32)
        if i % 2:
            np.savez(feats / f"{name}.npz", features=arr)
        else:
            np.save(feats / f"{name}.npy", arr)
    data = (vids / f"{names[5]}.mp4").read_bytes()
    (vids / f"{names[5]}.mp4").write_bytes(data[: len(data) // 3])  # truncated: undecodable
    subs = [
        {
            "vid_name": n,
            "sub": [
                {"start": 0.0, "end": 0.9, "text": f"Alice: hi {i}"},
                {"start": 1.0, "end": 2.0, "text": "Bob: bye"},
            ],
        }
        for i, n in enumerate(names)
    ]
    p["subtitles"] = jsonl(root / "subtitles.jsonl", subs)
    for task in ("tvqa", "how2qa"):
        n_choices = 5 if task == "tvqa" else 4
        rows = [
            {
                "qid": 100 + i,
                "q": f"what does Alice say {i}?",
                "vid_name": n,
                "ts": [0.5, 1.5] if i % 2 else "0.2-1.8",
                "answer_idx": i % n_choices,
                **{f"a{k}": f"answer {k}" for k in range(n_choices)},
            }
            for i, n in enumerate(names)
        ]
        rows.append({**rows[0], "qid": 999, "vid_name": "../../etc/passwd"})
        p[task] = jsonl(root / f"{task}_train.jsonl", rows)
    for task in ("tvc", "yc2c"):
        rows = [
            {
                "vid_name": n,
                "clip_id": 500 + i,
                "ts": [0.0, 2.0],
                "duration": 2.0,
                "descs": [{"desc": f"someone does thing {i}"}, {"desc": "a second one"}],
            }
            for i, n in enumerate(names)
        ]
        p[task] = jsonl(root / f"{task}_train.jsonl", rows)
    p["videos"], p["features"] = vids, feats
    return p


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_release(tmp_path_factory.mktemp("release"))


def convert(*argv) -> dict:
    workers = [] if "--workers" in argv else ["--workers", "1"]  # a spawn pool costs seconds
    return shards_main([str(a) for a in argv] + ["--quiet", *workers])


def samples(root: Path, task: str, split: str) -> dict[str, dict]:
    """{key: {ext: bytes}} of a split as training reads it (shared-image groups expanded)."""
    out = {}
    for path, n in load_index(root, task, split).shards:
        errors = SkipCounter()
        for s in read_samples(path, errors, n):
            out[s["__key__"]] = {
                k: v for k, v in s.items() if k not in ("__key__", "__url__", "__off__")
            }
        assert errors.count == 0
    return out


def check_schema(root: Path, task: str, split: str) -> list[dict]:
    recs = []
    for key, s in samples(root, task, split).items():
        rec = json.loads(s.pop("json"))
        assert rec["task"] == task and isinstance(rec["id"], str) and key.startswith(task)
        assert set(rec) - {"task", "id"} == FIELDS[task], (task, set(rec))
        t = TASKS[task]
        assert t.encoder_text(rec).startswith(t.prompt) and t.references(rec)
        recs.append({**rec, "_payload": s})
    assert len({r["id"] for r in recs}) == len(recs)
    return recs


def image_args(release, task: str, split: str) -> list:
    r = release
    if task == "vqa":
        return [
            "vqa",
            "--questions",
            r["q_train2014"],
            r["q_val2014"],
            "--annotations",
            r["a_train2014"],
            r["a_val2014"],
            "--karpathy",
            r["karpathy"],
            "--images",
            *r["coco_images"],
        ]
    if task == "gqa":
        return ["gqa", "--questions", r[f"gqa_{split}"], "--images", r["gqa_images"]]
    if task == "nlvr":
        return [
            "nlvr2",
            "--annotations",
            r["nlvr_dev" if split == "val" else "nlvr_train"],
            "--images",
            *r["nlvr_images"],
        ]
    return ["coco-caption", "--karpathy", r["karpathy"], "--images", *r["coco_images"]]


@pytest.fixture(scope="module")
def image_shards(release, tmp_path_factory):
    """The four image tasks converted, train and val, 5 samples per shard."""
    out = tmp_path_factory.mktemp("image-shards")
    summaries = {}
    for task in ("vqa", "gqa", "nlvr", "caption"):
        for split in ("train", "val"):
            args = image_args(release, task, split)
            summaries[task, split] = convert(
                *args, "--split", split, "--out", out, "--samples-per-shard", 5
            )
    return out, summaries


def test_vqa_karpathy_split_records_and_original_bytes(release, image_shards):
    out, summaries = image_shards
    recs = check_schema(out, "vqa", "train")
    # Karpathy train + restval = images 1-8; image 7 is missing, 8 does not decode, and the
    # last question (81, of image 8) has no annotation
    assert sorted(int(r["id"]) for r in recs) == [
        i * 10 + k for i in (1, 2, 3, 4, 5, 6) for k in (0, 1)
    ]
    assert summaries["vqa", "train"]["skipped"] == {
        "image not found": 2,
        "undecodable image": 1,
        "no annotation": 1,
    }
    r = next(x for x in recs if x["id"] == "31")
    assert r["answers"] == ["red"] * 7 + ["pink"] * 3 and r["image_id"] == 3
    assert (r["answer_type"], r["question_type"]) == ("other", "what color")
    src = release["coco_images"][0] / "COCO_train2014_000000000003.jpg"
    assert r["_payload"] == {"jpg": src.read_bytes()}  # stored as is, no re-encode
    val = check_schema(out, "vqa", "val")  # Karpathy val: images 101-102, from the zip
    assert sorted(int(x["id"]) for x in val) == [1010, 1011, 1020, 1021]
    # each image stored once with its two questions: 5 images (10 questions) per shard
    index = json.loads((out / "vqa" / "train.index.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [10, 2] and index["total"] == 12
    with tarfile.open(out / "vqa" / index["shards"][0]["url"]) as tar:
        names = tar.getnames()
    assert names[:2] == ["vqa-10-group.group.json", "vqa-10-group.jpg"] and len(names) == 10
    with tarfile.open(out / "vqa" / index["shards"][0]["url"]) as tar:
        group = json.loads(tar.extractfile(f"vqa-30-group.{GROUP}").read())
    assert [g["id"] for g in group] == ["30", "31"] and group[1] == {
        k: v for k, v in r.items() if k != "_payload"
    }


def test_vqa_official_split_without_karpathy(release, tmp_path):
    r = release
    s = convert(
        "vqa",
        "--split",
        "val",
        "--out",
        tmp_path,
        "--questions",
        r["q_val2014"],
        "--annotations",
        r["a_val2014"],
        "--images",
        *r["coco_images"],
    )
    assert s["samples"] == 7 and s["skipped"] == {"no annotation": 1}


def test_gqa_nlvr_caption_schema(release, image_shards):
    out, summaries = image_shards
    gqa = check_schema(out, "gqa", "train")
    assert len(gqa) == 8 and all(set(x["_payload"]) == {"jpg"} for x in gqa)
    assert {x["image_id"] for x in gqa} == {2354786, 2375429, "n161313", 2400001}
    assert summaries["gqa", "val"]["skipped"] == {
        "image not found": 2,
        "archive/folder entries outside the dataset root": 1,
    }
    nlvr = check_schema(out, "nlvr", "train")
    assert len(nlvr) == 8 and all(set(x["_payload"]) == {"img0.png", "img1.png"} for x in nlvr)
    x = next(x for x in nlvr if x["id"] == "train-2-1-0")
    assert x["label"] is True and x["identifier"] == x["id"] and x["sentence"] == "statement 2"
    src = release["nlvr_images"][0] / "train" / "0" / "train-2-1-img1.png"
    assert x["_payload"]["img1.png"] == src.read_bytes()
    caps = check_schema(out, "caption", "train")
    assert sorted(int(c["id"]) for c in caps) == [1, 2, 3, 4, 5, 6]
    assert caps[0]["captions"][0].startswith("a red thing") and len(caps[0]["captions"]) == 3
    assert summaries["caption", "val"]["samples"] == 2


def test_video_tasks_from_videos_and_feature_files(release, tmp_path):
    r, out = release, tmp_path
    common = ["--subtitles", r["subtitles"], "--out", out, "--split", "train"]
    s = convert(
        "tvqa",
        "--annotations",
        r["tvqa"],
        "--videos",
        r["videos"],
        "--num-frames",
        4,
        "--frame-size",
        32,
        "--window",
        "ts",
        *common,
    )
    assert s["samples"] == 5 and s["skipped"] == {
        "undecodable video": 1,
        "path outside the dataset root": 1,
    }
    recs = check_schema(out, "tvqa", "train")
    x = next(x for x in recs if x["id"] == "101")
    assert x["ts"] == [0.5, 1.5] and len(x["choices"]) == 5 and x["answer_idx"] == 1
    assert x["subtitles"] == "Alice: hi 1 Bob: bye"
    frames = np.load(io.BytesIO(x["_payload"]["frames.npy"]))
    assert frames.shape == (4, 32, 32, 3) and frames.dtype == np.uint8
    level = frames[:, 16, 16, 1].astype(int)  # clip 1 ramps green; window 0.5-1.5 s
    assert np.all(np.diff(level) > 0) and 40 < level[0] < level[-1] < 200
    assert next(x for x in recs if x["id"] == "100")["ts"] == [0.2, 1.8]  # "0.2-1.8" parsed

    s = convert(
        "how2qa",
        "--annotations",
        r["how2qa"],
        "--videos",
        r["videos"],
        "--num-frames",
        2,
        "--frame-size",
        24,
        "--gzip-frames",
        *common,
    )
    h = check_schema(out, "how2qa", "train")
    assert all(len(x["choices"]) == 4 and set(x["_payload"]) == {"frames.npy.gz"} for x in h)

    for task in ("tvc", "yc2c"):
        s = convert(
            task,
            "--annotations",
            r[task],
            "--features",
            r["features"],
            "--feature-vision",
            "vlds-tiny-rn",
            "--feature-pretrained",
            "",
            *common,
        )
        assert s["samples"] == 6 and not s["skipped"]
        recs = check_schema(out, task, "train")
        x = next(x for x in recs if x["id"] == "503")
        assert x["captions"] == ["someone does thing 3", "a second one"]
        feats = np.load(io.BytesIO(x["_payload"]["feats.npy"]))
        want = np.random.default_rng(3).standard_normal((8, 16)).astype(np.float16)
        assert feats.dtype == np.float16 and np.array_equal(feats, want)  # from the .npz
        index = load_index(out, task, "train")
        assert index.features == {
            "kind": "frames",
            "vision": "vlds-tiny-rn",
            "pretrained": "",
            "dim": 16,
            "dtype": "float16",
            "source": "files",
        }


def test_rerun_resumes_and_refuses_different_arguments(release, tmp_path, capsys):
    args = [
        *image_args(release, "nlvr", "train"),
        "--split",
        "train",
        "--out",
        tmp_path,
        "--samples-per-shard",
        3,
    ]
    first = convert(*args)
    task = tmp_path / "nlvr"
    tars = sorted(task.glob("train-*.tar"))
    stamps = {p: p.stat().st_mtime_ns for p in tars}
    assert first["shards"] == 3 and convert(*args)["resumed_shards"] == 3
    assert {p: p.stat().st_mtime_ns for p in tars} == stamps  # nothing rewritten
    # a run killed after two shards: the third is missing from the progress file
    progress = task / "train.progress.jsonl"
    lines = progress.read_text().splitlines()
    progress.write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])  # a cut last line
    (task / tars[-1].name).unlink()
    (task / "train.index.json").unlink()
    again = convert(*args)
    assert again["resumed_shards"] == 2 and again["samples"] == first["samples"]
    assert {p: p.stat().st_mtime_ns for p in tars[:2]} == {p: stamps[p] for p in tars[:2]}
    with pytest.raises(SystemExit) as e:
        convert(*args[:-1], 4)  # another shard size: refused, names the change
    assert e.value.code == 2
    assert "samples_per_shard: 3 -> 4" in capsys.readouterr().err
    assert convert(*args[:-1], 4, "--overwrite")["shards"] == 2
    (tmp_path / "gqa").mkdir()
    (tmp_path / "gqa" / "train-00000.tar").write_bytes(b"")
    with pytest.raises(SystemExit):
        convert(*image_args(release, "gqa", "train"), "--split", "train", "--out", tmp_path)
    assert "did not record" in capsys.readouterr().err


def test_parallel_writers_give_the_same_bytes(release, tmp_path):
    args = [*image_args(release, "vqa", "train"), "--split", "train", "--samples-per-shard", 4]
    convert(*args, "--out", tmp_path / "one", "--workers", 1)
    convert(*args, "--out", tmp_path / "two", "--workers", 2)
    one, two = (sorted((tmp_path / d / "vqa").glob("*.tar")) for d in ("one", "two"))
    assert len(one) == 2 and [p.read_bytes() for p in one] == [p.read_bytes() for p in two]


def test_stream_reads_converted_shards(image_shards, release, tmp_path, tokenizer):
    out, _ = image_shards
    idx = {t: load_index(out, t, "train") for t in ("vqa", "nlvr")}

    def stream(skip_steps=0):
        return TrainStream(
            idx,
            {"vqa": 4, "nlvr": 2},
            Preprocess(96),
            Collator(tokenizer, ["vqa", "nlvr"], 40, 20),
            rank=0,
            world=1,
            seed=0,
            epoch=0,
            shuffle_buffer=4,
            skip_steps=skip_steps,
        )

    batches = list(stream())
    assert len(batches) == 3 + 4
    # VQA's questions come from shared-image groups: a stream resumed at step 3 gives exactly
    # the batches from step 3 on (the raw groups are replayed, expanded the same way)
    assert [b["ids"] for b in stream(skip_steps=3)] == [b["ids"] for b in batches[3:]]
    assert sorted(i for b in batches if b["task"] == "vqa" for i in b["ids"]) == sorted(
        json.loads(s["json"])["id"] for s in samples(out, "vqa", "train").values()
    )
    shapes = {b["task"]: b["images"].shape for b in batches}
    assert shapes == {"vqa": (4, 1, 3, 96, 96), "nlvr": (2, 2, 3, 96, 96)}
    r = release
    convert(
        "tvc",
        "--annotations",
        r["tvc"],
        "--videos",
        r["videos"],
        "--num-frames",
        3,
        "--frame-size",
        40,
        "--subtitles",
        r["subtitles"],
        "--out",
        tmp_path,
        "--split",
        "train",
    )
    # the converter's index counts one training sample per caption (data.caption_samples=
    # sentence, the default): the stream trains every caption of every clip
    tvc = load_index(tmp_path, "tvc", "train")
    recs = [json.loads(s["json"]) for s in samples(tmp_path, "tvc", "train").values()]
    assert tvc.sentences == sum(len(r["captions"]) for r in recs) > tvc.total
    stream = TrainStream(
        {"tvc": tvc},
        {"tvc": 2},
        Preprocess(96),
        Collator(tokenizer, ["tvc"], 40, 20),
        rank=0,
        world=1,
        seed=0,
        epoch=0,
        shuffle_buffer=4,
    )
    assert [b["frames"].shape for b in stream] == [(2, 3, 3, 96, 96)] * (tvc.sentences // 2)


def test_feature_extraction_keeps_shared_images_grouped(image_shards, tmp_path):
    """Caching CLIP features runs the tower once per stored image and keeps its questions
    together: the feature shards expand to the same records as the pixel shards."""
    from vlds.data.prep.extract import main as extract_main

    out, _ = image_shards
    argv = ["--shards", out, "--tasks", "vqa", "--splits", "train", "--out", tmp_path]
    argv += ["--vision", "vlds-tiny-rn", "--vision-pretrained", "", "--grid-pool", 2]
    extract_main([str(a) for a in (*argv, "--workers", 0, "--quiet")])
    feats = samples(tmp_path, "vqa", "train")
    pixels = samples(out, "vqa", "train")
    assert load_index(tmp_path, "vqa", "train").total == 12 and feats.keys() == pixels.keys()
    assert all(feats[k]["json"] == pixels[k]["json"] for k in feats)
    with tarfile.open(load_index(tmp_path, "vqa", "train").shards[0][0]) as tar:
        names = tar.getnames()
    assert names[:2] == ["vqa-10-group.feats.npy", "vqa-10-group.group.json"] and len(names) == 10
    a, b = (
        np.load(io.BytesIO(feats[k]["feats.npy"])) for k in ("vqa-10-group#0", "vqa-10-group#1")
    )
    assert a.shape == (4, a.shape[1]) and np.array_equal(a, b)  # one image, one feature array


def test_converted_shards_train(image_shards, shapes_root, tmp_path):
    """The real entry point trains 2 steps on the four converted image tasks and evaluates."""
    out, _ = image_shards
    run = tmp_path / "run"
    args = [
        f"--data.root={out}",
        f"--train.out_dir={run}",
        f"--model.tokenizer={shapes_root / 'tokenizer'}",
        "--model.lm=random",  # no pretraining of the embedded model for these converted shards
        "--data.batch_size=2",
        "--data.num_workers=1",
        "--train.max_steps=2",
        "--eval.max_samples=2",
        "--eval.batch_size=2",
        "--eval.caption_beams=1",
        "--eval.java_metrics=false",  # the JVM scorers are tested in test_eval_metrics.py
        "--train.log_every=1",
    ]
    train_run(args, timeout=300)
    result = json.loads((run / "metrics.json").read_text())
    assert result["step"] == 2 and set(result["metrics"]) == {
        "vqa",
        "gqa",
        "nlvr",
        "caption",
        "average",
        "shuffled_average",
        "loss",
    }


def test_every_registry_task_has_a_converter():
    from vlds.data.prep.converters import ALIASES, converters

    table = converters()
    assert sorted(c.task for c in table.values()) == sorted(ALL_TASKS)
    assert {ALIASES.get(a, a) for a in ("nlvr", "caption")} <= set(table)
