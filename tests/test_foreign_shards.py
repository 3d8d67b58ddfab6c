"""Shards written by another tool (webdataset.TarWriter, `{key}.jpg` + `{key}.json`, any shard
names) train after `python -m vlds.data.prep.index ROOT TASK SPLIT`: the index load_index reads,
the same records and image bytes out of vlds' training stream, and errors that name the shard,
the sample and what it lacks."""

from __future__ import annotations

import io
import json

import pytest
import torch

from vlds.data.prep.index import main as index_main
from vlds.data.shardio import DataError, SkipCounter, load_index, read_samples


def jpeg(i: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40 + i, 32), (20 * i % 256, 90, 200)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def vqa_rec(i: int) -> dict:  # the fields vlds' VQA writers give a record (vlds/data/tasks.py)
    return {
        "task": "vqa",
        "id": f"{i}001",
        "question": f"what color is shape {i}?",
        "answers": ["red"] * 7 + ["blue"] * 3,
        "answer_type": "other",
        "question_type": "what color",
        "image_id": i,
    }


def caption_rec(i: int) -> dict:
    return {
        "task": "caption",
        "id": str(i),
        "captions": [f"a shape number {i} seen {k} ways" for k in range(1 + i % 3)],
        "image_id": i,
    }


def write_foreign(path, samples) -> None:
    """What another tool writes: webdataset's own writer, its own member order and headers."""
    import webdataset as wds

    with wds.TarWriter(str(path)) as w:
        for key, members in samples:
            w.write({"__key__": key, **members})


def foreign_split(root, task, make_rec, shards: dict[str, range]) -> dict[str, tuple]:
    """{key: (record, jpg bytes)} written as `{key}.jpg` + `{key}.json` into ROOT/TASK/NAME."""
    (root / task).mkdir(parents=True, exist_ok=True)
    written = {}
    for name, ids in shards.items():
        samples = [(f"img{i:05d}", {"jpg": jpeg(i), "json": make_rec(i)}) for i in ids]
        write_foreign(root / task / name, samples)
        written.update({k: (m["json"], m["jpg"]) for k, m in samples})
    return written


def test_foreign_shards_index_and_stream_as_written(tmp_path, capsys):
    from vlds.config import build_config
    from vlds.data.build import preprocess_and_collate
    from vlds.data.stream import TrainStream

    root = tmp_path / "foreign"
    vqa = foreign_split(
        root, "vqa", vqa_rec, {"coco-a.tar": range(0, 5), "coco-b.tar.gz": range(5, 9)}
    )
    caps = foreign_split(root, "caption", caption_rec, {"caps-000.tar": range(6)})
    # a val split beside it, named the usual way: the default for train leaves it alone
    foreign_split(root, "vqa", vqa_rec, {"val-000.tar": range(20, 23)})
    index_main([str(root), "vqa", "val"])
    index_main([str(root), "vqa", "train"])
    index_main([str(root), "caption", "train"])
    out = capsys.readouterr().out
    assert "vqa/train.index.json written: 2 shard(s), 9 samples, 9 sentences" in out, out

    idx = load_index(root, "vqa", "train")
    assert [(p.rsplit("/", 1)[1], n) for p, n in idx.shards] == [
        ("coco-a.tar", 5),
        ("coco-b.tar.gz", 4),
    ]
    assert idx.labelled and idx.features is None and idx.sentences == 9
    cap_idx = load_index(root, "caption", "train")
    assert cap_idx.total == 6
    assert cap_idx.sentences == sum(len(rec["captions"]) for rec, _ in caps.values())

    # vlds' reader: every sample, the records and image bytes as written
    got = {s["__key__"]: s for p, _ in idx.shards for s in read_samples(p, SkipCounter())}
    assert {k: (json.loads(s["json"]), s["jpg"]) for k, s in got.items()} == vqa

    # the training stream: one epoch at batch 1 visits every record once (captions once per
    # sentence), decoded exactly as the written bytes decode
    cfg = build_config("tiny", {"data.root": str(root), "data.tasks": "vqa,caption"})
    pre, _ = preprocess_and_collate(cfg, None, 32)  # training's decoding (no tokenising here)
    stream = TrainStream(
        {"vqa": idx, "caption": cap_idx},
        {"vqa": 1, "caption": 1},
        pre,
        lambda samples, epoch: {"samples": samples},
        rank=0,
        world=1,
        seed=0,
        epoch=0,
        shuffle_buffer=1,  # blocks of one: an epoch reads each record once, in order
    )
    seen = {"vqa": [], "caption": []}
    for batch in stream:
        (s,) = batch["samples"]
        seen[s["task"]].append(s)
        rec, jpg = {"vqa": vqa, "caption": caps}[s["task"]][s["key"]]
        assert s["rec"] == rec
        assert torch.equal(s["visual"][0], pre.image(jpg))
    assert sorted(s["key"] for s in seen["vqa"]) == sorted(vqa)
    assert len(seen["caption"]) == cap_idx.sentences
    assert {s["key"] for s in seen["caption"]} == set(caps)

    # re-running finds the same shards and leaves the index alone; a changed set is refused
    index_main([str(root), "vqa", "train"])
    assert "vqa/train.index.json unchanged" in capsys.readouterr().out
    foreign_split(root, "vqa", vqa_rec, {"coco-c.tar": range(30, 32)})
    with pytest.raises(SystemExit) as e:
        index_main([str(root), "vqa", "train"])
    assert e.value.code == 2
    assert "pass --force" in capsys.readouterr().err
    index_main([str(root), "vqa", "train", "--force"])
    assert load_index(root, "vqa", "train").total == 11


def problems_of(root, *argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        index_main([str(root), *argv])
    assert e.value.code == 2
    return capsys.readouterr().err


def test_bad_records_and_samples_are_named_and_nothing_is_written(tmp_path, capsys):
    root = tmp_path / "foreign"
    (root / "vqa").mkdir(parents=True)
    no_question = {k: v for k, v in vqa_rec(1).items() if k != "question"}
    no_answers = {k: v for k, v in vqa_rec(2).items() if k != "answers"}
    samples = [
        ("s0", {"jpg": jpeg(0), "json": vqa_rec(0)}),
        ("s1", {"jpg": jpeg(1), "json": no_question}),
        ("s2", {"jpg": jpeg(2), "json": no_answers}),
        ("s3", {"json": vqa_rec(3)}),  # no image
        ("s4", {"jpg": jpeg(4), "json": {**vqa_rec(4), "task": "gqa"}}),
        ("s5", {"jpg": jpeg(5)}),  # no record
    ]
    write_foreign(root / "vqa" / "mine.tar", samples)
    err = problems_of(root, "vqa", "train", capsys=capsys)
    assert "mine.tar: sample s1: the record lacks the field 'question'" in err, err
    assert "mine.tar: sample s2: the record lacks the field 'answers'" in err, err
    assert "sample s3: no jpg, jpeg or png member (a vqa sample needs its image)" in err, err
    assert "mine.tar: sample s4: a 'gqa' record in vqa/" in err, err
    assert "mine.tar: sample s5: no json record (has jpg)" in err, err
    assert "nothing written" in err and "docs/data.md" in err
    assert not (root / "vqa" / "train.index.json").exists()
    with pytest.raises(DataError, match="no shard index"):
        load_index(root, "vqa", "train")


def test_unlabelled_split_features_and_refusals(tmp_path, capsys):
    root = tmp_path / "foreign"
    (root / "gqa").mkdir(parents=True)
    test = [
        (f"t{i}", {"png": jpeg(i), "json": {"task": "gqa", "id": f"t{i}", "question": "q?"}})
        for i in range(3)
    ]
    write_foreign(root / "gqa" / "test-0.tar", test)
    index_main([str(root), "gqa", "test"])
    assert not load_index(root, "gqa", "test").labelled  # training refuses it, eval predicts

    # feature shards need the tower named; then the index carries it for check_features
    import numpy as np

    feats = io.BytesIO()
    np.save(feats, np.zeros((4, 8), np.float16))
    rec = {"task": "gqa", "id": "f0", "question": "q?", "answer": "yes"}
    sample = ("f0", {"feats.npy": feats.getvalue(), "json": rec})
    write_foreign(root / "gqa" / "feat-0.tar", [sample])
    err = problems_of(root, "gqa", "train", "--shards", "feat-*.tar", capsys=capsys)
    assert "--features" in err
    tower = '{"kind": "grid", "vision": "RN101", "pretrained": "openai", "grid_pool": 6}'
    index_main([str(root), "gqa", "train", "--shards", "feat-*.tar", "--features", tower])
    assert load_index(root, "gqa", "train").features["vision"] == "RN101"

    # a shard another split lists, an unknown task, keys with dots
    err = problems_of(root, "gqa", "val", "--shards", "test-0.tar", capsys=capsys)
    assert "test-0.tar: split 'test' lists it" in err
    assert "unknown task" in problems_of(root, "vqq", "train", capsys=capsys)
    write_foreign(root / "gqa" / "dots.tar", [("a.b", {"png": jpeg(0), "json": rec})])
    err = problems_of(root, "gqa", "dots", "--shards", "dots.tar", capsys=capsys)
    assert "first dot" in err
