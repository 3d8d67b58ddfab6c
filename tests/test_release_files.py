"""The shard writers on the odd files the real releases hold: a bad file is skipped and counted
(never an abort), an undefined moment is repaired (never a drop), an image in another format
than its name says is kept, and a file name in two sources is reported.

    pytest tests/test_release_files.py
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_shards import check_schema, convert, jsonl, picture, samples, write_zip
from vlds.data.prep.shards import main as shards_main


def corrupt_member(path, name: str) -> None:
    """Flip one byte inside a stored zip member's data: its CRC no longer matches."""
    with zipfile.ZipFile(path) as z:
        data = z.read(name)
    raw = bytearray(path.read_bytes())
    at = raw.find(data) + len(data) // 2
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


def vqa_release(root):
    """VQAv2 in its official format: 4 val2014 images in a zip (one member with a bad CRC)
    and a folder holding a truncated copy of another; one question per image."""
    root.mkdir(parents=True, exist_ok=True)
    names = [f"COCO_val2014_{i:012d}.jpg" for i in range(1, 5)]
    write_zip(
        root / "val2014.zip", {f"val2014/{n}": picture(i, "JPEG") for i, n in enumerate(names)}
    )
    corrupt_member(root / "val2014.zip", f"val2014/{names[1]}")
    (root / "dup").mkdir()
    (root / "dup" / names[2]).write_bytes(picture(2, "JPEG")[:200])  # a truncated copy
    qs = [{"image_id": i, "question": f"what is {i}?", "question_id": i * 10} for i in range(1, 5)]
    anns = [
        {
            "question_id": i * 10,
            "image_id": i,
            "question_type": "what is",
            "answer_type": "other",
            "multiple_choice_answer": "red",
            "answers": [
                {"answer": "red", "answer_confidence": "yes", "answer_id": j} for j in range(1, 11)
            ],
        }
        for i in range(1, 5)
    ]
    q = root / "v2_OpenEnded_mscoco_val2014_questions.json"
    a = root / "v2_mscoco_val2014_annotations.json"
    q.write_text(json.dumps({"data_subtype": "val2014", "questions": qs}))
    a.write_text(json.dumps({"annotations": anns}))
    return ["vqa", "--questions", q, "--annotations", a, "--split", "val"]


def test_bad_zip_member_skipped_and_duplicates_reported(tmp_path, capsys):
    base = vqa_release(tmp_path)
    zip_, dup = tmp_path / "val2014.zip", tmp_path / "dup"
    # the folder listed first: its truncated copy of image 3 hides the zip's good one
    s = convert(*base, "--out", tmp_path / "a", "--images", dup, zip_)
    assert s["samples"] == 2 and s["skipped"] == {"unreadable file": 1, "undecodable image": 1}
    assert s["duplicates"] == {
        "count": 1,
        "examples": ["COCO_val2014_000000000003.jpg"],
        "kept": "first",
    }
    assert s["skip_examples"]["unreadable file"] == [
        f"{zip_}:val2014/COCO_val2014_000000000002.jpg"
    ]
    assert sorted(samples(tmp_path / "a", "vqa", "val")) == ["vqa-10", "vqa-40"]
    # --duplicates last: the zip's good copy wins; only the bad-CRC member is lost
    s = convert(*base, "--out", tmp_path / "b", "--images", dup, zip_, "--duplicates", "last")
    assert s["samples"] == 3 and s["skipped"] == {"unreadable file": 1}
    assert sorted(samples(tmp_path / "b", "vqa", "val")) == ["vqa-10", "vqa-30", "vqa-40"]
    # the printed summary names the skipped file and the duplicate
    shards_main([str(a) for a in (*base, "--out", tmp_path / "c", "--images", dup, zip_)])
    out = capsys.readouterr().out
    assert "skipped (unreadable file): " in out and "COCO_val2014_000000000002.jpg" in out
    assert "1 file name(s) found in more than one source" in out


FORMATS = {0: "PNG", 1: "WEBP", 2: "TIFF", 3: "GIF", 4: "ICO", 5: "JPEG"}


def nlvr2_odd_release(root, broken: bool = True):
    """NLVR2 dev in its official format (identifier, sentence, label, left_url, right_url,
    directory) whose ".png" left images hold FORMATS' bytes; `broken` adds a pair whose left
    file is an HTML error page. Returns (images folder, annotation file)."""
    images = root / "dev"
    images.mkdir()
    rows = []
    for n, fmt in FORMATS.items():
        for img in (0, 1):
            data = picture(n * 2 + img, fmt if img == 0 else "PNG", (64, 48))
            (images / f"dev-{n}-0-img{img}.png").write_bytes(data)
        rows.append(
            {
                "identifier": f"dev-{n}-0-0",
                "sentence": "there is a square",
                "label": "True" if n % 2 else "False",
                "left_url": "http://x/a.png",
                "right_url": "http://x/b.png",
                "directory": str(n),
            }
        )
    if broken:
        (images / "dev-6-0-img0.png").write_bytes(b"<html>404 Not Found</html>")  # no image
        (images / "dev-6-0-img1.png").write_bytes(picture(99, "PNG"))
        rows.append({**rows[0], "identifier": "dev-6-0-0"})
    return images, jsonl(root / "dev.json", rows)


def test_nlvr2_pngs_in_other_formats_are_kept(tmp_path):
    """NLVR2's download script saves raw responses: some ".png" files hold other formats."""
    images, ann = nlvr2_odd_release(tmp_path)
    formats = FORMATS
    s = convert(
        "nlvr2", "--annotations", ann, "--images", images, "--split", "val", "--out", tmp_path
    )
    assert s["samples"] == 6 and s["skipped"] == {"undecodable image": 1}
    assert s["repaired"] == {
        f"image re-encoded to PNG (was {f})": 1 for f in ("WEBP", "TIFF", "GIF", "ICO")
    }
    recs = {r["id"]: r["_payload"] for r in check_schema(tmp_path, "nlvr", "val")}
    for n, fmt in formats.items():
        left = recs[f"dev-{n}-0-0"]
        ext = "jpg" if fmt == "JPEG" else "png"
        assert set(left) == {f"img0.{ext}", "img1.png"}
        src = (images / f"dev-{n}-0-img0.png").read_bytes()
        if fmt in ("PNG", "JPEG"):
            assert left[f"img0.{ext}"] == src  # stored as is
        else:  # re-encoded losslessly: the same pixels as PIL's decode of the original
            got = np.asarray(Image.open(io.BytesIO(left["img0.png"])))
            want = np.asarray(Image.open(io.BytesIO(src)).convert("RGB"))
            assert Image.open(io.BytesIO(left["img0.png"])).format == "PNG"
            assert np.array_equal(got, want)


def value_release(root):
    """VALUE jsonl with undefined moments ("NaN-NaN", missing) and feature files, one .npz
    truncated and one whose compressed member is corrupt."""
    feats = root / "features"
    feats.mkdir()
    names = [f"friends_s01e0{i}_seg02_clip_0{i}" for i in range(5)]
    for i, n in enumerate(names):
        np.savez_compressed(feats / f"{n}.npz", features=np.full((4, 8), i, np.float32))
    data = (feats / f"{names[3]}.npz").read_bytes()
    (feats / f"{names[3]}.npz").write_bytes(data[: len(data) // 2])  # truncated
    raw = bytearray((feats / f"{names[4]}.npz").read_bytes())
    raw[60:80] = b"\x00" * 20  # inside the deflate stream: zlib.error or a bad CRC
    (feats / f"{names[4]}.npz").write_bytes(bytes(raw))
    subs = jsonl(
        root / "subs.jsonl",
        [
            {"vid_name": n, "sub": [{"start": 1.0, "end": 7.5, "text": f"line {i}"}]}
            for i, n in enumerate(names)
        ],
    )
    ts = ["NaN-NaN", "12.3-20.1", None, "NaN-NaN", "1-2"]
    qa = [
        {
            "qid": 7000 + i,
            "q": "what happens?",
            "vid_name": n,
            "answer_idx": 1,
            **{f"a{k}": f"choice {k}" for k in range(5)},
            **({"ts": ts[i]} if ts[i] else {}),
        }
        for i, n in enumerate(names)
    ]
    tvc = [
        {
            "vid_name": n,
            "clip_id": 9000 + i,
            "descs": [{"desc": f"someone talks {i}"}],
            **({"ts": ts[i]} if ts[i] else {}),
            **({"duration": 61.6} if i == 0 else {}),
        }
        for i, n in enumerate(names)
    ]
    return feats, subs, jsonl(root / "tvqa_val.jsonl", qa), jsonl(root / "tvc_val.jsonl", tvc)


def test_undefined_moments_repaired_and_bad_feature_files_skipped(tmp_path):
    feats, subs, tvqa, tvc = value_release(tmp_path)
    common = ["--features", feats, "--subtitles", subs, "--split", "val", "--out", tmp_path]
    s = convert("tvqa", "--annotations", tvqa, *common)
    assert s["samples"] == 3 and s["skipped"] == {"unreadable features": 2}
    assert s["repaired"] == {"ts repaired: undefined -> [10, 30] (TVQA's preprocessing)": 2}
    got = {r["id"]: r["ts"] for r in check_schema(tmp_path, "tvqa", "val")}
    assert got == {"7000": [10.0, 30.0], "7001": [12.3, 20.1], "7002": [10.0, 30.0]}
    s = convert("tvc", "--annotations", tvc, *common)
    assert s["samples"] == 3 and s["skipped"] == {"unreadable features": 2}
    assert s["repaired"] == {
        "ts repaired: undefined -> the whole clip (duration)": 1,
        "ts repaired: undefined -> the whole clip (subtitles)": 1,
    }
    recs = {r["id"]: r for r in check_schema(tmp_path, "tvc", "val")}
    assert {k: r["ts"] for k, r in recs.items()} == {
        "9000": [0.0, 61.6],
        "9001": [12.3, 20.1],
        "9002": [0.0, 7.5],
    }
    feats2 = np.load(io.BytesIO(recs["9002"]["_payload"]["feats.npy"]))
    assert feats2.dtype == np.float16 and np.all(feats2 == 2)


def test_unlabelled_test_splits_are_written_and_refused_for_training(tmp_path, capsys):
    import vlds.engine  # noqa: F401  (registers the config checks)
    from tests.helpers import byte_tokenizer
    from vlds.config import build_config
    from vlds.data.build import DataBuilder
    from vlds.data.shardio import DataError, load_index
    from vlds.distributed import WorldInfo

    images = tmp_path / "images"
    images.mkdir()
    for n in ("n15740", "2400001"):
        (images / f"{n}.jpg").write_bytes(picture(len(n), "JPEG"))
    for i in (1, 2):
        (images / f"COCO_test2015_{i:012d}.jpg").write_bytes(picture(i, "JPEG"))
    # GQA test-balanced: string ids with leading zeros, no "answer"
    gqa = {
        "0201971": {"imageId": "n15740", "question": "what is it?", "isBalanced": True},
        "0201972": {"imageId": "2400001", "question": "is it red?", "isBalanced": True},
    }
    (tmp_path / "test_balanced_questions.json").write_text(json.dumps(gqa))
    common = ["--images", images, "--split", "test", "--out", tmp_path / "out"]
    s = convert("gqa", "--questions", tmp_path / "test_balanced_questions.json", *common)
    assert (s["samples"], s["labelled"], s["skipped"]) == (2, False, {})
    recs = {r["id"]: r for r in check_schema_unlabelled(tmp_path / "out", "gqa", "test")}
    assert set(recs) == {"0201971", "0201972"} and "answer" not in recs["0201971"]
    assert recs["0201972"]["image_id"] == 2400001
    assert load_index(tmp_path / "out", "gqa", "test").labelled is False
    # a labelled split keeps its rule: a question without an answer is skipped
    gqa["0201972"]["answer"] = "no"
    (tmp_path / "val_balanced_questions.json").write_text(json.dumps(gqa))
    s = convert(
        "gqa",
        "--questions",
        tmp_path / "val_balanced_questions.json",
        *common[:3],
        "val",
        *common[4:],
    )
    assert (s["samples"], s["labelled"], s["skipped"]) == (1, True, {"no answer": 1})
    assert load_index(tmp_path / "out", "gqa", "val").labelled is True
    # VQA test-dev: the questions file alone
    qs = [{"image_id": i, "question": "why?", "question_id": i * 1000 + 7} for i in (1, 2)]
    q = tmp_path / "v2_OpenEnded_mscoco_test-dev2015_questions.json"
    q.write_text(json.dumps({"data_subtype": "test2015", "questions": qs}))
    s = convert("vqa", "--questions", q, *common)
    assert (s["samples"], s["labelled"]) == (2, False)
    vqa = check_schema_unlabelled(tmp_path / "out", "vqa", "test")
    assert sorted(r["id"] for r in vqa) == ["1007", "2007"] and "answers" not in vqa[0]
    # TVQA's public test file: no answer_idx
    feats = tmp_path / "feats"
    feats.mkdir()
    np.save(feats / "castle_s01e01_seg02_clip_00.npy", np.ones((3, 8), np.float32))
    row = {"qid": 12, "q": "who?", "vid_name": "castle_s01e01_seg02_clip_00", "ts": "1.5-4"}
    tvqa = jsonl(tmp_path / "tvqa_test_public.jsonl", [{**row, **{f"a{k}": "x" for k in range(5)}}])
    s = convert(
        "tvqa",
        "--annotations",
        tvqa,
        "--features",
        feats,
        "--split",
        "test",
        "--out",
        tmp_path / "out",
    )
    assert (s["samples"], s["labelled"]) == (1, False)
    assert "no labels (a test split)" in shards_printed(tvqa, feats, tmp_path, capsys)
    # training (and validating) on such a split fails before any model is built
    cfg = build_config(
        "tiny", {"data.tasks": "gqa", "data.train_split": "test", "data.val_split": "val"}
    )
    with pytest.raises(DataError, match="gqa/test has no labels .* --split test"):
        DataBuilder(cfg, tmp_path / "out", byte_tokenizer(), 64, WorldInfo(0, 0, 1))
    cfg = build_config(
        "tiny", {"data.tasks": "gqa", "data.train_split": "val", "data.val_split": "test"}
    )
    with pytest.raises(DataError, match="gqa/test has no labels"):
        DataBuilder(cfg, tmp_path / "out", byte_tokenizer(), 64, WorldInfo(0, 0, 1))
    # the evaluator reads it (it writes predictions, tests/test_evaluate.py)
    evaluating = DataBuilder(
        cfg, tmp_path / "out", byte_tokenizer(), 64, WorldInfo(0, 0, 1), train=False
    )
    assert evaluating.val_idx["gqa"].labelled is False


def check_schema_unlabelled(root, task: str, split: str) -> list[dict]:
    from vlds.data.tasks import LABEL, TASKS

    recs = []
    for s in samples(root, task, split).values():
        rec = json.loads(s["json"])
        assert rec["task"] == task and LABEL[task] not in rec
        assert TASKS[task].encoder_text(rec).startswith(TASKS[task].prompt)
        recs.append(rec)
    return recs


def shards_printed(tvqa, feats, tmp_path, capsys) -> str:
    capsys.readouterr()
    argv = ["tvqa", "--annotations", tvqa, "--features", feats, "--split", "test2", "--out"]
    shards_main([str(a) for a in (*argv, tmp_path / "out", "--workers", "1")])
    return capsys.readouterr().out


def test_what_makes_a_split_meaningless_aborts_naming_the_file(tmp_path, capsys):
    base = vqa_release(tmp_path)
    images = ["--images", tmp_path / "val2014.zip"]
    q = Path(base[2])
    q.write_text(q.read_text()[:-40])  # a truncated download
    with pytest.raises(SystemExit) as e:
        convert(*base, *images, "--out", tmp_path / "out")
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"annotation file {q} is not valid JSON" in err
    nl = jsonl(tmp_path / "train.json", [{"identifier": "train-1-0-0", "sentence": "x"}])
    nl.write_text(nl.read_text() + '{"identifier": "train-1\n')
    with pytest.raises(SystemExit):
        convert("nlvr2", "--annotations", nl, *images, "--split", "train", "--out", tmp_path)
    assert f"annotation file {nl} line 2 is not valid JSON" in capsys.readouterr().err
    # an output that cannot be written (a path through a file)
    vqa_release(tmp_path / "ok")
    (tmp_path / "file").write_text("")
    ok = [tmp_path / "ok" / Path(x).name if str(x).endswith(".json") else x for x in base]
    with pytest.raises(SystemExit) as e:
        convert(*ok, "--images", tmp_path / "ok" / "val2014.zip", "--out", tmp_path / "file" / "o")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "is writable" in err and str(tmp_path / "file") in err
