"""Tests of the shapes world (vlds/data/synthetic/): schema, determinism, correctness, caching.

    pytest tests/test_synthetic.py

Answers are checked two ways: against independent oracles that re-read the scene behind each
question, and against the rendered pixels (colours at object centres, motion of colour blobs).
"""

from __future__ import annotations

import gzip
import io
import json
import multiprocessing
import random
import re
import socket
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlds.data import synthetic as S
from vlds.data.prep.shardwrite import SCHEMA_VERSION
from vlds.data.shardio import load_index, read_records
from vlds.data.synthetic import package
from vlds.data.synthetic.language import _rng
from vlds.data.tasks import ALL_TASKS, IMAGE_TASKS, TASKS, majority_answer
from vlds.eval.grounding import text_prior_and_majority

SMALL = S.SyntheticSpec(
    train_per_task=20,
    val_per_task=10,
    video_train_per_task=8,
    video_val_per_task=6,
    samples_per_shard=8,
    image_size=48,
    num_frames=4,
)
QA = {"question": str, "choices": list, "answer_idx": int, "subtitles": str, "ts": list,
      "vid_name": str}  # fmt: skip
VIDEO_CAPTION = {"captions": list, "subtitles": str, "ts": list, "vid_name": str}
FIELDS = {  # tasks.py's table; yc2c also carries ts
    "vqa": {
        "question": str,
        "answers": list,
        "answer_type": str,
        "question_type": str,
        "image_id": int,
    },
    "gqa": {"question": str, "answer": str, "image_id": int},
    "nlvr": {"sentence": str, "label": bool, "identifier": str},
    "caption": {"captions": list, "image_id": int},
    "tvqa": QA,
    "how2qa": QA,
    "tvc": VIDEO_CAPTION,
    "yc2c": VIDEO_CAPTION,
}
PAYLOAD = {"vqa": {"png"}, "gqa": {"png"}, "caption": {"png"}, "nlvr": {"img0.png", "img1.png"}}
KIND_OF = {**{k: k for k in S.SHAPES}, **{p: k for k, p in S.PLURAL.items()}}
WORD_NUMBER = {w: i for i, w in enumerate(S.NUMBER_WORDS)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return S.ensure_synthetic(tmp_path_factory.mktemp("cache"), SMALL)


def tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def split_samples(root: Path, task: str, split: str) -> dict[str, dict[str, bytes]]:
    index = json.loads((root / task / f"{split}.index.json").read_text())
    out = {}
    for shard in index["shards"]:
        out.update(tar_samples(root / task / shard["url"]))
    return out


def color_mask(pixels: np.ndarray, color: str, tol: int = 8) -> np.ndarray:
    """Pixels within tol of a palette colour (the sparse noise is at most 6 levels)."""
    diff = np.abs(pixels.astype(int) - np.array(S.COLORS[color])).max(axis=-1)
    return diff <= tol


def cell(o: S.Shape) -> tuple[int, int]:  # independent of Shape.cell on purpose
    return int(o.y * 3), int(o.x * 3)


# --- files: determinism, index, schema -----------------------------------------------------


@pytest.mark.parametrize("task", ["vqa", "nlvr", "tvqa"])
def test_same_spec_gives_identical_bytes(tmp_path, task):
    a = S.write_task_split(tmp_path / "a", task, "val", 10, SMALL)
    b = S.write_task_split(tmp_path / "b", task, "val", 10, SMALL)
    c = S.write_task_split(
        tmp_path / "c", task, "val", 10, S.SyntheticSpec(**{**vars(SMALL), "seed": 1})
    )
    assert a == b == c and [s["samples"] for s in a["shards"]] == [8, 2]
    for shard in a["shards"]:
        url = shard["url"]
        assert (tmp_path / "a" / task / url).read_bytes() == (
            tmp_path / "b" / task / url
        ).read_bytes()
        assert (tmp_path / "a" / task / url).read_bytes() != (
            tmp_path / "c" / task / url
        ).read_bytes()


def test_index_matches_tar_contents(dataset):
    for task in ALL_TASKS:
        for split, n in (
            (("train", 20), ("val", 10)) if task in IMAGE_TASKS else (("train", 8), ("val", 6))
        ):
            index = json.loads((dataset / task / f"{split}.index.json").read_text())
            assert set(index) == {"task", "split", "total", "schema_version", "shards"}
            assert (index["task"], index["split"], index["total"]) == (task, split, n)
            assert index["schema_version"] == SCHEMA_VERSION == 2
            counts = [len(tar_samples(dataset / task / s["url"])) for s in index["shards"]]
            assert counts == [s["samples"] for s in index["shards"]] and sum(counts) == n
            # sentences: the training samples with one per caption (5 per image, 3 per clip)
            per_record = {"caption": 5, "tvc": 3, "yc2c": 3}.get(task, 1)
            assert [s["sentences"] for s in index["shards"]] == [per_record * c for c in counts]


@pytest.mark.parametrize("task", ALL_TASKS)
def test_schema(dataset, task):
    size, frames = SMALL.image_size, SMALL.num_frames
    for split in ("train", "val"):
        samples = split_samples(dataset, task, split)
        ids = set()
        for key, sample in samples.items():
            assert key.startswith(f"{task}-{split}-")
            rec = json.loads(sample.pop("json"))
            assert set(rec) == set(FIELDS[task]) | {"task", "id"}, key
            assert rec["task"] == task and isinstance(rec["id"], str)
            for field, kind in FIELDS[task].items():
                assert type(rec[field]) is kind, (key, field)
            ids.add(rec["id"])
            assert set(sample) == PAYLOAD.get(task, {"frames.npy.gz"})
            if task in IMAGE_TASKS:
                for data in sample.values():
                    img = Image.open(io.BytesIO(data))
                    assert img.format == "PNG" and img.mode == "RGB" and img.size == (size, size)
            else:
                video = np.load(
                    io.BytesIO(gzip.decompress(sample["frames.npy.gz"])), allow_pickle=False
                )
                assert video.dtype == np.uint8 and video.shape == (frames, size, size, 3)
                start, end = rec["ts"]
                assert isinstance(start, float) and isinstance(end, float) and 0 <= start < end
                assert rec["subtitles"] and rec["vid_name"].startswith(f"{task}_{split}_")
            if task == "vqa":
                assert len(rec["answers"]) == 10 and all(isinstance(a, str) for a in rec["answers"])
                assert rec["answer_type"] in {"yes/no", "number", "other"}
                assert rec["question"].startswith(rec["question_type"])
            if task in ("tvqa", "how2qa"):
                assert len(rec["choices"]) == len(set(rec["choices"])) == 5
                assert 0 <= rec["answer_idx"] < 5
            if task == "nlvr":
                assert rec["id"] == rec["identifier"]
            if "captions" in rec:
                want = 5 if task == "caption" else 2
                assert len(set(rec["captions"])) == len(rec["captions"]) >= want
        assert len(ids) == len(samples), "ids must be unique within a split"


def test_webdataset_reads_the_shards(dataset):
    """vlds' shards are plain WebDataset tars: webdataset's own pipeline (with the options a
    multi-rank reader passes) yields every sample the index counts, with the documented members
    per task kind (docs/data.md), and the same records as vlds' reader."""
    import webdataset as wds

    from vlds.data.shardio import SkipCounter, load_index, read_samples
    from vlds.data.tasks import get_task

    members = {"image": {"png"}, "pair": {"img0.png", "img1.png"}, "video": {"frames.npy.gz"}}
    for task in ("vqa", "nlvr", "tvqa", "caption"):
        index = load_index(dataset, task, "val")
        urls = [path for path, _ in index.shards]
        ds = wds.WebDataset(
            urls, shardshuffle=False, nodesplitter=wds.split_by_node, empty_check=False
        )
        samples = list(ds)
        assert len(samples) == index.total, task
        want = {"__key__", "__url__", "json"} | members[get_task(task).kind]
        assert all(want <= set(s) for s in samples), (task, set(samples[0]))
        ours = [s for path in urls for s in read_samples(path, SkipCounter())]
        assert [s["json"] for s in samples] == [s["json"] for s in ours]


# --- answers are right -------------------------------------------------------------------


def test_render_scene_colours_at_centres():
    objects = [
        S.Shape("circle", "red", "large", 1 / 6, 1 / 6),
        S.Shape("cross", "green", "small", 0.5, 0.5),
        S.Shape("triangle", "yellow", "large", 5 / 6, 5 / 6),
        S.Shape("diamond", "purple", "small", 5 / 6, 1 / 6),
        S.Shape("square", "orange", "large", 1 / 6, 5 / 6),
    ]
    clean = np.asarray(S.render_scene(S.Scene(tuple(objects), (30, 30, 30)), 96))
    noisy = np.asarray(S.render_scene(S.Scene(tuple(objects), (30, 30, 30), noise_seed=3), 96))
    assert clean.shape == (96, 96, 3) and clean.dtype == np.uint8
    for o in objects:
        x, y = int(o.x * 96), int(o.y * 96)
        assert tuple(clean[y, x]) == S.COLORS[o.color], o
        assert color_mask(noisy[y - 1 : y + 2, x - 1 : x + 2], o.color).all(), o
    assert tuple(clean[48, 5]) == (30, 30, 30)  # between cells: background
    assert 0 < np.count_nonzero(noisy != clean) < noisy.size * 0.2  # sparse, mild noise
    # A bare object list renders on the default background.
    assert tuple(np.asarray(S.render_scene(objects[:1], 32))[0, 31]) == (225, 225, 225)


def vqa_oracle(scene: S.Scene, question: str) -> str:
    objs = scene.objects
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        (hit,) = [o for o in objs if o.kind == m[1]]  # only asked when unique
        return hit.color
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        (hit,) = [o for o in objs if o.color == m[1]]
        return hit.kind
    if m := re.fullmatch(r"how many (\w+) objects are there\?", question):
        return str(sum(o.color == m[1] for o in objs))
    if m := re.fullmatch(r"how many (\w+) are there\?", question):
        return str(sum(o.kind == KIND_OF[m[1]] for o in objs))
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        return "yes" if any((o.color, o.kind) == (m[1], m[2]) for o in objs) else "no"
    raise AssertionError(f"unexpected question {question!r}")


def test_vqa_hand_checked_scene():
    scene = S.Scene(
        (
            S.Shape("circle", "red", "large", 1 / 6, 1 / 6),
            S.Shape("circle", "red", "small", 0.5, 0.5),
            S.Shape("square", "blue", "large", 5 / 6, 5 / 6),
        )
    )
    expected = {
        "what color is the square?": "blue",
        "what shape is the blue object?": "square",
        "how many circles are there?": "2",
        "how many red objects are there?": "2",
        "how many squares are there?": "1",
        "is there a red circle?": "yes",
        "is there a blue square?": "yes",
    }
    seen = Counter()
    for seed in range(300):
        question, answer, answer_type, question_type = S.vqa_question(scene, random.Random(seed))
        assert question != "what color is the circle?", "two circles: ambiguous"
        assert question != "what shape is the red object?", "two red objects: ambiguous"
        assert answer == expected.get(question, vqa_oracle(scene, question)), question
        assert answer_type == {"how many": "number", "is there a": "yes/no"}.get(
            question_type, "other"
        )
        seen[question_type] += 1
    assert set(seen) == {"what color is the", "what shape is the", "how many", "is there a"}


def records_with_visuals(task: str, n: int, spec=SMALL):
    for i in range(n):
        rec, visual = S.GENERATORS[task](_rng(spec, task, "train", i), task, "train", i, spec)
        # The record must be exactly what make_sample writes.
        assert {"task": task, **rec} == S.make_sample(task, "train", i, spec, render=False)["json"]
        yield rec, visual


def test_vqa_answers_match_scene():
    types = Counter()
    unanimous = 0
    for rec, (scene,) in records_with_visuals("vqa", 300):
        truth = vqa_oracle(scene, rec["question"])
        assert majority_answer(rec["answers"]) == truth
        assert rec["answers"].count(truth) >= 6
        unanimous += len(set(rec["answers"])) == 1
        types[rec["answer_type"]] += 1
    assert 0.03 < unanimous / 300 < 0.25  # most questions give the normaliser work
    assert min(types.values()) > 50


def test_vqa_images_show_the_answer(dataset):
    checked = 0
    for sample in split_samples(dataset, "vqa", "train").values():
        rec = json.loads(sample["json"])
        pixels = np.asarray(Image.open(io.BytesIO(sample["png"])))
        answer = majority_answer(rec["answers"])
        if m := re.fullmatch(r"what color is the \w+\?", rec["question"]):
            assert color_mask(pixels, answer).sum() >= 8
            checked += 1
        if m := re.fullmatch(r"how many (\w+) objects are there\?", rec["question"]):
            assert (color_mask(pixels, m[1]).sum() > 0) == (answer != "0")
            checked += 1
    assert checked > 0


def relation(rel: str, o: S.Shape, ref: S.Shape) -> bool:
    (orow, ocol), (rrow, rcol) = cell(o), cell(ref)
    return {"left of": ocol < rcol, "right of": ocol > rcol, "above": orow < rrow,
            "below": orow > rrow}[rel]  # fmt: skip


def test_gqa_answers_are_unique_and_right():
    rel = r"(left of|right of|above|below)"
    for rec, (scene,) in records_with_visuals("gqa", 200):
        objs, q = scene.objects, rec["question"]

        def named(color, kind, objs=objs):
            (hit,) = [o for o in objs if (o.color, o.kind) == (color, kind)]
            return hit

        if m := re.fullmatch(rf"what (color is the shape|shape is) {rel} the (\w+) (\w+)\?", q):
            ref = named(m[3], m[4])
            (hit,) = [o for o in objs if o is not ref and relation(m[2], o, ref)]
            assert rec["answer"] == (hit.color if m[1].startswith("color") else hit.kind)
        elif m := re.fullmatch(rf"is the (\w+) (\w+) {rel} the (\w+) (\w+)\?", q):
            truth = relation(m[3], named(m[1], m[2]), named(m[4], m[5]))
            assert rec["answer"] == ("yes" if truth else "no")
        else:
            raise AssertionError(q)


def nlvr_oracle(sentence: str, left: S.Scene, right: S.Scene) -> bool:
    def has(scene, kind=None, color=None):
        return any(kind in (None, o.kind) and color in (None, o.color) for o in scene.objects)

    side = {"left": left, "right": right}
    if m := re.fullmatch(r"the (left|right) image contains an? (\w+) (\w+)", sentence):
        return has(side[m[1]], m[3], m[2])
    if m := re.fullmatch(r"the (left|right) image contains an? (\w+)", sentence):
        return has(side[m[1]], m[2])
    if m := re.fullmatch(r"both images contain an? (\w+) object", sentence):
        return has(left, color=m[1]) and has(right, color=m[1])
    if m := re.fullmatch(r"both images contain an? (\w+)", sentence):
        return has(left, m[1]) and has(right, m[1])
    if m := re.fullmatch(r"neither image contains an? (\w+) (\w+)", sentence):
        return not has(left, m[2], m[1]) and not has(right, m[2], m[1])
    raise AssertionError(sentence)


def test_nlvr_labels_right_balanced_and_grouped():
    groups: dict[str, list] = {}
    labels = []
    for rec, (left, right) in records_with_visuals("nlvr", 126):
        assert rec["label"] == nlvr_oracle(rec["sentence"], left, right), rec
        labels.append(rec["label"])
        split, n, pair, k = rec["identifier"].split("-")
        assert split == "train" and k == "0"
        groups.setdefault(f"{split}-{n}", []).append((int(pair), rec["sentence"]))
    assert 0.4 <= sum(labels) / len(labels) <= 0.6
    for members in groups.values():  # 126 = 14 cycles of group sizes 2, 3, 4: none truncated
        assert 2 <= len(members) <= 4
        assert [p for p, _ in members] == list(range(len(members)))
        assert len({s for _, s in members}) == 1, "one statement per group"


def test_caption_references_are_true():
    for rec, (scene,) in records_with_visuals("caption", 100):
        n = len(scene.objects)
        for caption in rec["captions"]:
            if m := re.match(r"there (is|are) (\w+) object", caption):
                assert WORD_NUMBER[m[2]] == n
            for color, kind in re.findall(
                r"(\w+) (circle|square|triangle|diamond|cross)\b", caption
            ):
                if color in S.COLORS:
                    assert any((o.color, o.kind) == (color, kind) for o in scene.objects), caption


def blob_centre(frame: np.ndarray, color: str) -> np.ndarray:
    ys, xs = np.nonzero(color_mask(frame, color))
    assert len(xs) > 0, color
    return np.array([xs.mean(), ys.mean()])


def test_render_clip_moves_shapes():
    clip = S.Clip(
        (
            S.Mover(S.Shape("circle", "red", "large", 0.3, 0.5), "right", 0.4),
            S.Mover(S.Shape("square", "blue", "small", 0.8, 0.3), "down", 0.3),
            S.Mover(S.Shape("cross", "green", "small", 0.2, 0.2), "still", 0.0),
        )
    )
    video = S.render_clip(clip, 64, 5)
    assert video.shape == (5, 64, 64, 3) and video.dtype == np.uint8
    for color, want in (("red", (0.4 * 64, 0)), ("blue", (0, 0.3 * 64)), ("green", (0, 0))):
        moved = blob_centre(video[-1], color) - blob_centre(video[0], color)
        assert np.allclose(moved, want, atol=1.0), (color, moved)


def direction_of(video: np.ndarray, color: str) -> str:
    dx, dy = blob_centre(video[-1], color) - blob_centre(video[0], color)
    if max(abs(dx), abs(dy)) < 2:
        return "still"
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


@pytest.mark.parametrize("task", ["tvqa", "how2qa"])
def test_video_qa_answers_match_frames(dataset, task):
    phrases = S.HOW2_DIRS if task == "how2qa" else S.TVQA_DIRS
    checked = 0
    for sample in split_samples(dataset, task, "train").values():
        rec = json.loads(sample["json"])
        video = np.load(io.BytesIO(gzip.decompress(sample["frames.npy.gz"])), allow_pickle=False)
        answer = rec["choices"][rec["answer_idx"]]
        q = rec["question"]
        if m := re.fullmatch(r"(?:which way does|what happens to) the (\w+) \w+(?: move)?\?", q):
            assert phrases[direction_of(video, m[1])] == answer
            checked += 1
    for rec, clip in records_with_visuals(task, 100):  # every question form, against the clip
        answer = rec["choices"][rec["answer_idx"]]
        moving = [m for m in clip.movers if m.direction != "still"]
        if "how many" in rec["question"]:
            assert answer == S.NUMBER_WORDS[len(moving)]
        elif any(f"the {m.shape.name}" in rec["question"] for m in clip.movers):
            (m,) = [m for m in clip.movers if f"the {m.shape.name}" in rec["question"]]
            assert answer == phrases[m.direction]
        else:  # about the one object moving some way
            (m,) = [m for m in moving if any(p in rec["question"] for p in S.MOVES[m.direction])]
            assert answer in (m.shape.color, m.shape.kind, f"the {m.shape.name}"), rec
    assert checked > 0


# --- tokenizer, cache, baseline -----------------------------------------------------------


def test_tokenizer_round_trips_every_task(dataset):
    from transformers import T5Tokenizer

    tok = T5Tokenizer.from_pretrained(str(dataset / "tokenizer"), extra_ids=0)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert len(tok) <= SMALL.vocab_size
    for task in ALL_TASKS:
        for split in ("train", "val"):
            for sample in split_samples(dataset, task, split).values():
                rec = json.loads(sample["json"])
                for text in [TASKS[task].encoder_text(rec), *TASKS[task].references(rec)]:
                    ids = tok(text).input_ids
                    assert tok.unk_token_id not in ids, text
                    # sentencepiece folds runs of spaces and drops trailing ones ("caption: ").
                    assert tok.decode(ids, skip_special_tokens=True) == " ".join(text.split())


def test_tokenizer_is_reproducible(tmp_path):
    a = S.train_tokenizer(tmp_path / "a", SMALL) / "spiece.model"
    b = S.train_tokenizer(tmp_path / "b", SMALL) / "spiece.model"
    assert a.read_bytes() == b.read_bytes()


def test_ensure_synthetic_is_idempotent_and_survives_a_killed_run(tmp_path):
    spec = S.SyntheticSpec(**{**vars(SMALL), "seed": 7})
    name = f"shapes-{S.spec_hash(spec)}"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    killed = tmp_path / f"{name}.tmp-{host}-{dead.pid}"  # a half-written run of a dead process
    (killed / "vqa").mkdir(parents=True)
    (killed / "vqa" / "train-00000.tar").write_bytes(b"truncated")
    elsewhere = tmp_path / f"{name}.tmp-otherhost-1"  # another host may still be writing it
    elsewhere.mkdir()

    path = S.ensure_synthetic(tmp_path, spec)
    assert path == tmp_path / name and (path / "COMPLETE").is_file()
    assert json.loads((path / "COMPLETE").read_text())["spec"] == vars(spec)
    assert not killed.exists() and elsewhere.exists()
    stamps = {p: p.stat().st_mtime_ns for p in path.rglob("*")}
    assert S.ensure_synthetic(tmp_path, spec, tasks=("vqa",)) == path
    assert {p: p.stat().st_mtime_ns for p in path.rglob("*")} == stamps
    with pytest.raises(ValueError, match="unknown task"):
        S.ensure_synthetic(tmp_path, spec, tasks=("vqa", "coco"))


def test_ensure_synthetic_env_default_and_lost_rename(tmp_path, monkeypatch):
    spec = S.SyntheticSpec(**{**vars(SMALL), "seed": 8})
    monkeypatch.setenv("VLDS_CACHE", str(tmp_path))
    final = tmp_path / f"shapes-{S.spec_hash(spec)}"
    generate = package._generate

    def racing_generate(out, spec, workers):
        # Another host finishes first: its complete copy appears before our rename.
        generate(out, spec, workers)
        generate(final, spec, workers)

    monkeypatch.setattr(package, "_generate", racing_generate)
    assert S.ensure_synthetic(None, spec) == final
    assert (final / "COMPLETE").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name, f"{final.name}.lock"]


def test_an_incomplete_cached_folder_is_rebuilt_not_a_dead_end(tmp_path, caplog):
    # A cached language model's folder once held its tokenizer files but no config.json (how is
    # unknown: vlds' builds rename whole folders). A 15-minute build then failed at its rename
    # with ENOTEMPTY; now the leftover is cleared first and the build lands
    final = tmp_path / "lms" / "t5-tiny"
    final.mkdir(parents=True)
    (final / "tokenizer.json").write_text("{}")
    built = []

    def build(tmp: Path) -> None:
        built.append(tmp.name)
        tmp.mkdir()
        (tmp / "config.json").write_text('{"d_model": 64}')

    ready = lambda p: (p / "config.json").is_file()  # noqa: E731
    with caplog.at_level("WARNING", logger="vlds"):
        assert package.build_once(final, ready, build) == final
    assert sorted(p.name for p in final.iterdir()) == ["config.json"]
    assert "incomplete" in caplog.text and str(final) in caplog.text
    assert sorted(p.name for p in final.parent.iterdir()) == ["t5-tiny", "t5-tiny.lock"]
    assert package.build_once(final, ready, build) == final and len(built) == 1  # ready: kept


def _ensure(root: str) -> str:
    return str(S.ensure_synthetic(Path(root), S.SyntheticSpec(**{**vars(SMALL), "seed": 9})))


def test_two_processes_racing_get_the_same_folder(tmp_path):
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        a, b = pool.map(_ensure, [str(tmp_path)] * 2)
    assert a == b and (Path(a) / "COMPLETE").is_file()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_majority_baseline(dataset):
    def records(task, split):
        return list(read_records(load_index(dataset, task, split)))

    train = Counter(majority_answer(r["answers"]) for r in records("vqa", "train"))
    constant = train.most_common(1)[0][0]
    val = [r["answers"] for r in records("vqa", "val")]
    # official VQA accuracy by hand: mean over the 10 leave-one-out subsets of min(1, matches/3)
    per_q = [
        sum(
            min(1.0, sum(a == constant for j, a in enumerate(ans) if j != i) / 3) for i in range(10)
        )
        / 10
        for ans in val
    ]

    def majority(task):
        return text_prior_and_majority(task, records(task, "train"), records(task, "val"))[1]

    assert majority("vqa") == pytest.approx(100 * sum(per_q) / len(per_q))
    assert 0.0 <= majority("nlvr") <= 100
    assert majority("caption") is None  # no majority answer for captions


def test_cli_prints_a_summary(tmp_path, capsys):
    path = S.main(["--out", str(tmp_path), "--train-per-task", "4", "--val-per-task", "2",
                   "--video-train-per-task", "2", "--video-val-per-task", "2",
                   "--image-size", "32", "--num-frames", "2"])  # fmt: skip
    out = capsys.readouterr().out
    assert path.parent == tmp_path and str(path) in out
    assert len([line for line in out.splitlines() if line.split()[0] in ALL_TASKS]) == 16
