"""Caption training samples per reference sentence (data.caption_samples) and task prompts
(data.task_prompts): the stream, the epoch schedule, resume, rank splits, the indexes' sentence
counts, and the prompt rule per method as the reference's scripts set --use_tasks_prompts.

    pytest tests/test_caption_samples.py
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import pytest
import torch

from tests.helpers import byte_tokenizer
from vlds.config import ConfigError, build_config, validate
from vlds.data.decode import Collator, Preprocess
from vlds.data.mixing import epoch_schedule, train_samples
from vlds.data.prep.recount import needs_recount, recount
from vlds.data.shardio import DataError, SkipCounter, load_index
from vlds.data.stream import TrainStream, consumed_state, slot_stream
from vlds.data.synthetic import SyntheticSpec, write_task_split
from vlds.data.tasks import TASKS, uses_task_prompts

CAPTIONS_PER_RECORD = (1, 3, 5)  # 9 sentences


def _rewrite_records(shard, change):
    """Rewrite a tar with change(record) applied to every json member."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            if m.name.endswith(".json"):
                data = json.dumps(change(json.loads(data))).encode()
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


@pytest.fixture(scope="module")
def caption_root(tmp_path_factory):
    """caption/train: 3 records with 1, 3 and 5 captions in 2 shards (2 + 1 records), its
    index recounted after the captions were cut; vqa/train: 16 records in 2 shards."""
    root = tmp_path_factory.mktemp("captions")
    write_task_split(root, "caption", "train", 3, SyntheticSpec(samples_per_shard=2))
    keep = dict(zip(("0", "1", "2"), CAPTIONS_PER_RECORD, strict=True))
    for shard in sorted((root / "caption").glob("train-*.tar")):
        _rewrite_records(shard, lambda r: {**r, "captions": r["captions"][: keep[r["id"]]]})
    recount_after_edit(root / "caption" / "train.index.json")
    write_task_split(root, "vqa", "train", 16, SyntheticSpec(samples_per_shard=8))
    return root


def recount_after_edit(index_file):
    index = json.loads(index_file.read_text())
    for s in index["shards"]:
        del s["sentences"]
    index_file.write_text(json.dumps(index))
    assert needs_recount(index_file)
    recount(index_file)
    assert not needs_recount(index_file)


def _stream(root, tok, tasks=("caption",), bs=3, rank=0, world=1, epoch=0, skip=0, buf=4, **kw):
    return TrainStream(
        {t: load_index(root, t, "train") for t in tasks},
        {t: bs for t in tasks},
        Preprocess(96),
        Collator(tok, list(tasks), 40, 200),
        rank=rank,
        world=world,
        seed=0,
        epoch=epoch,
        shuffle_buffer=buf,
        skip_steps=skip,
        **kw,
    )


def _pairs(tok, loader):
    """[(task, ((id, target text), ...)), ...] per batch."""
    out = []
    for b in loader:
        labels = b["labels"].masked_fill(b["labels"] < 0, tok.pad_token_id)
        texts = tok.batch_decode(labels, skip_special_tokens=True)
        out.append((b["task"], tuple(zip(b["ids"], texts, strict=True))))
    return out


def _records(root):
    recs = {}
    for path, _ in load_index(root, "caption", "train").shards:
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    r = json.loads(tar.extractfile(m).read())
                    recs[r["id"]] = r
    return recs


def test_records_with_1_3_5_captions_are_9_samples_each_caption_once(caption_root):
    tok = byte_tokenizer()
    idx = load_index(caption_root, "caption", "train")
    assert (idx.total, idx.sentences) == (3, 9)
    want = Counter((i, c) for i, r in _records(caption_root).items() for c in r["captions"])
    assert sorted(Counter(i for i, _ in want).values()) == [1, 3, 5] and len(want) == 9
    # the raw stream: each round over the shards (an epoch's worth) has every sentence once
    for epoch in (0, 1):
        raw = slot_stream(idx, 0, epoch, 0, 1, SkipCounter(), per_sentence=True)
        rounds = [[next(raw) for _ in range(9)] for _ in range(2)]
        for r in rounds:
            recs = [(json.loads(s["json"]), s["__sentence__"]) for s in r]
            assert Counter((x["id"], x["captions"][i]) for x, i in recs) == want
    # the batches: 3 steps of 3; with a shuffle buffer of 1 the epoch is exactly one round (a
    # larger buffer reads ahead into the next round, for images and sentences alike)
    for epoch in (0, 1):
        got = _pairs(tok, _stream(caption_root, tok, epoch=epoch, buf=1))
        assert len(got) == 9 // 3 and all(len(p) == 3 for _, p in got)
        assert Counter(p for _, b in got for p in b) == want  # every caption once an epoch
    # "image": 3 samples, one batch, each record once with one of its captions
    (task, batch), *rest = _pairs(tok, _stream(caption_root, tok, caption_samples="image"))
    assert not rest and sorted(i for i, _ in batch) == ["0", "1", "2"]
    assert all((i, c) in want for i, c in batch)


def test_schedule_counts_sentences(caption_root, tmp_path):
    idx = {t: load_index(caption_root, t, "train") for t in ("caption", "vqa")}
    sizes = {"caption": 2, "vqa": 2}
    sched = epoch_schedule(idx, sizes, world=2, seed=0, epoch=0)
    assert Counter(sched) == {"caption": 9 // (2 * 2), "vqa": 16 // (2 * 2)}
    image = epoch_schedule(idx, {"caption": 1, "vqa": 2}, 2, 0, 0, caption_samples="image")
    assert Counter(image) == {"caption": 3 // (2 * 1), "vqa": 4}
    # the writers record sentences: 5 captions per shapes-world image, 1 per vqa record
    write_task_split(tmp_path, "caption", "train", 13, SyntheticSpec(samples_per_shard=5))
    shapes = load_index(tmp_path, "caption", "train")
    assert (shapes.total, shapes.sentences) == (13, 65)
    assert train_samples(shapes, "sentence") == 65 and train_samples(shapes, "image") == 13
    assert Counter(epoch_schedule({"caption": shapes}, {"caption": 4}, 2, 0, 0)) == {
        "caption": 65 // (2 * 4)
    }
    assert train_samples(idx["vqa"], "sentence") == idx["vqa"].total == 16


def test_an_index_without_sentence_counts_is_refused_with_the_fix(caption_root, tmp_path):
    write_task_split(tmp_path, "caption", "train", 4, SyntheticSpec(samples_per_shard=4))
    f = tmp_path / "caption" / "train.index.json"
    index = json.loads(f.read_text())
    for s in index["shards"]:
        del s["sentences"]  # as written before the counts were recorded
    f.write_text(json.dumps(index))
    old = load_index(tmp_path, "caption", "train")
    assert old.sentences is None
    with pytest.raises(DataError, match="python -m vlds.data.prep.recount .* --tasks caption"):
        epoch_schedule({"caption": old}, {"caption": 2}, 1, 0, 0)
    assert epoch_schedule({"caption": old}, {"caption": 2}, 1, 0, 0, caption_samples="image")
    recount(f)
    assert load_index(tmp_path, "caption", "train").sentences == 20


def test_resume_at_step_k_gives_the_remaining_batches(caption_root):
    """From the batches' cursors (which stop inside a record's sentences) and by replay; in
    one process and with two workers (each reads its own slice: another run)."""
    tok = byte_tokenizer()
    tasks = ("caption", "vqa")

    def stream(skip=0):
        return _stream(caption_root, tok, tasks, bs=2, epoch=1, skip=skip)

    def loader(ds, workers):
        return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)

    full = {0: list(stream()), 2: list(loader(stream(), 2))}
    assert [b["task"] for b in full[0]].count("caption") == 9 // 2
    for k in (1, 3, 5):
        for workers, batches in full.items():
            for cursors in (True, False):
                ds = stream(skip=k)
                state = consumed_state(ds, batches, k, workers) if cursors else None
                assert ds.resume_from(state, workers) == cursors
                resumed = _pairs(tok, loader(ds, workers) if workers else ds)
                assert resumed == _pairs(tok, batches[k:]), (k, workers, cursors)


@pytest.mark.parametrize("split", ["shard", "global"])
def test_two_ranks_keep_equal_step_counts(caption_root, split):
    tok = byte_tokenizer()
    tasks = ("caption", "vqa")
    runs = [
        _pairs(tok, _stream(caption_root, tok, tasks, bs=2, rank=r, world=2, split=split))
        for r in (0, 1)
    ]
    steps = 9 // 4 + 16 // 4
    assert len(runs[0]) == len(runs[1]) == steps
    assert [t for t, _ in runs[0]] == [t for t, _ in runs[1]]
    assert all(len(b) == 2 for run in runs for _, b in run)
    if split == "global":  # rank 0 holds the first half of each global batch, rank 1 the rest
        one = _pairs(tok, _stream(caption_root, tok, tasks, bs=4, world=1, split=split))
        assert [(t, a + b) for (t, a), (_, b) in zip(*runs, strict=True)] == one


# ---- task prompts ---------------------------------------------------------------------------

# hand-listed from VL-T5/scripts/{image,video}/*.sh: which pass --use_tasks_prompts
IMAGE_SCRIPTS = {
    "full_finetune": False,  # full_finetuning.sh
    "hyperformer": False,  # hyperformer.sh
    "multiple_adapters": False,  # multiple_adapters.sh
    "multiple_compacters": False,  # multiple_compacters.sh
    "multiple_lora": False,  # multiple_lora.sh
    "multiple_prompts": False,  # multiple_prompts.sh
    "single_adapter": True,  # single_adapter.sh
    "single_compacter": True,  # single_compacter.sh
    "single_lora": True,  # single_lora.sh
    "single_prompt": True,  # single_prompt.sh
    # no script: no flag
    "half_shared_adapter": False,
    "visual_only": False,
    "visual_ln": False,
}
VIDEO_SCRIPTS = {
    "full_finetune": True,  # video/full_finetuning.sh sets it, unlike the image one
    "single_adapter": True,
    "single_lora": True,
    "single_prompt": True,
    "hyperformer": False,  # no video script
    "multiple_adapters": False,
    "multiple_lora": False,
}


@pytest.mark.parametrize(
    ("preset", "table"), [("bart-base", IMAGE_SCRIPTS), ("tiny-video", VIDEO_SCRIPTS)]
)
def test_auto_prompts_follow_the_reference_scripts(preset, table):
    for method, prompted in table.items():
        cfg = build_config(preset, {"peft.method": method})
        assert cfg.data.task_prompts == "auto"
        assert uses_task_prompts(cfg) is prompted, method
        for mode in ("true", "false"):
            forced = build_config(preset, {"peft.method": method, "data.task_prompts": mode})
            assert uses_task_prompts(forced) is (mode == "true")


def test_bad_modes_fail_naming_the_valid_values():
    with pytest.raises(ConfigError, match="data.task_prompts='yes'; valid: auto, true, false"):
        validate(build_config("tiny", {"data.task_prompts": "yes"}))
    with pytest.raises(ConfigError, match="data.caption_samples='all'; valid: sentence"):
        validate(build_config("tiny", {"data.caption_samples": "all"}))
    assert build_config("bart-base").data.caption_samples == "sentence"


RECS = {
    "vqa": {"task": "vqa", "id": "1", "question": "what is red?", "answers": ["circle"] * 10},
    "caption": {"task": "caption", "id": "2", "captions": ["a red circle", "a circle"]},
    "tvc": {
        "task": "tvc",
        "id": "3",
        "captions": ["it moves"],
        "subtitles": "hi there",
        "ts": [1.0, 2.5],
        "vid_name": "v",
    },
}
WITH = {
    "vqa": "vqa: what is red?",
    "caption": "caption: ",
    "tvc": "tvc: [Subs] hi there [TS] (1.0-2.5)",
}
WITHOUT = {"vqa": "what is red?", "caption": "", "tvc": "[Subs] hi there [TS] (1.0-2.5)"}


@pytest.mark.parametrize("task", list(RECS))
def test_encoder_texts_with_and_without_prompts(task):
    tok = byte_tokenizer()
    rec = RECS[task]
    assert TASKS[task].encoder_text(rec) == WITH[task]
    assert TASKS[task].encoder_text(rec, prompt=False) == WITHOUT[task]
    sample = {"task": task, "id": rec["id"], "rec": rec, "visual": torch.zeros(1, 3, 8, 8)}
    if task == "tvc":
        sample["visual"] = torch.zeros(2, 3, 8, 8)
    for prompts, want in ((True, WITH[task]), (False, WITHOUT[task])):
        batch = Collator(tok, [task], 100, 20, prompts=prompts)([{**sample, "key": "k"}])
        assert batch["input_ids"][0].tolist() == tok(want).input_ids
    # the reference encodes a caption without prompt as "" -> the end-of-sequence token only
    if task == "caption":
        empty = Collator(tok, [task], 100, 20, prompts=False)([{**sample, "key": "k"}])
        assert empty["input_ids"][0].tolist() == [tok.eos_token_id]


def test_the_run_collator_uses_the_config_rule():
    from vlds.data.build import preprocess_and_collate

    tok = byte_tokenizer()
    for method, prompted in (("single_adapter", True), ("multiple_adapters", False)):
        cfg = build_config("tiny", {"peft.method": method})
        assert preprocess_and_collate(cfg, tok, 96)[1].prompts is prompted


def test_a_cached_world_without_counts_gets_them_once(tmp_path):
    """ensure_synthetic completes the indexes of a shapes world cached before the writers
    recorded sentences (regenerating it would retrain the language model cached in it)."""
    import vlds.data.synthetic as S

    spec = SyntheticSpec(
        train_per_task=6,
        val_per_task=3,
        video_train_per_task=3,
        video_val_per_task=2,
        samples_per_shard=4,
        image_size=48,
        vocab_size=256,
    )
    root = S.ensure_synthetic(tmp_path, spec)
    f = root / "caption" / "train.index.json"
    fresh = f.read_text()
    old = json.loads(fresh)
    for s in old["shards"]:
        del s["sentences"]
    f.write_text(json.dumps(old))
    assert load_index(root, "caption", "train").sentences is None
    assert S.ensure_synthetic(tmp_path, spec) == root
    assert json.loads(f.read_text()) == json.loads(fresh)
    assert load_index(root, "caption", "train").sentences == 30
