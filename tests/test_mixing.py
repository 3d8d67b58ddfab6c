"""Multi-task mixing (data.mixing = proportional | weights | temperature), rank agreement, equal
batch counts with workers, the shards-vs-readers fallback, and the config checks.

    pytest tests/test_mixing.py
"""

from __future__ import annotations

import logging
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from vlds.config import ConfigError, build_config, validate
from vlds.data.build import DataBuilder
from vlds.data.decode import Collator, Preprocess
from vlds.data.mixing import epoch_schedule, mixing_counts
from vlds.data.shardio import DataError, load_index
from vlds.data.stream import TrainStream, reader_split_notes
from vlds.data.synthetic import SyntheticSpec, write_task_split

TASKS = ("vqa", "gqa", "nlvr")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """vqa: 5 shards (10, 10, 10, 10, 8 samples); gqa: 1 shard of 24; nlvr: 2 (16, 8)."""
    r = tmp_path_factory.mktemp("mix")
    write_task_split(r, "vqa", "train", 48, SyntheticSpec(samples_per_shard=10))
    write_task_split(r, "gqa", "train", 24, SyntheticSpec(samples_per_shard=24))
    write_task_split(r, "nlvr", "train", 24, SyntheticSpec(samples_per_shard=16))
    return r


def indexes(root, tasks=TASKS):
    return {t: load_index(root, t, "train") for t in tasks}


def stream(root, tok, rank=0, world=1, epoch=0, **mix):
    return TrainStream(
        indexes(root),
        {t: 4 for t in TASKS},
        Preprocess(96),
        Collator(tok, list(TASKS), 40, 20),
        rank=rank,
        world=world,
        seed=0,
        epoch=epoch,
        shuffle_buffer=8,
        **mix,
    )


def test_mixing_counts():
    batches = {"vqa": 60, "gqa": 30, "nlvr": 10}
    assert mixing_counts(batches, "proportional") == batches
    assert mixing_counts(batches, "weights", "vqa=1,gqa=1,nlvr=2") == {
        "vqa": 25,
        "gqa": 25,
        "nlvr": 50,
    }
    # temperature: T = 1 is proportional, larger T flattens towards uniform; total kept
    assert mixing_counts(batches, "temperature", temperature=1.0) == batches
    t2 = mixing_counts(batches, "temperature", temperature=2.0)
    assert t2 == {"vqa": 47, "gqa": 34, "nlvr": 19}  # 100 x sqrt(n) / sum sqrt(n), rounded
    flat = mixing_counts(batches, "temperature", temperature=1000.0)
    assert max(flat.values()) - min(flat.values()) <= 1
    # largest-remainder rounding: always the same total
    odd = mixing_counts({"a": 7, "b": 5, "c": 1}, "weights", "a=1,b=1,c=1")
    assert sum(odd.values()) == 13 and sorted(odd.values()) == [4, 4, 5]
    with pytest.raises(DataError, match="gives no weight to \\['nlvr'\\]"):
        mixing_counts(batches, "weights", "vqa=2,gqa=1")
    with pytest.raises(DataError, match="needs a weight > 0"):
        mixing_counts(batches, "weights", "vqa=2,gqa=0,nlvr=1")
    with pytest.raises(DataError, match="names 'coco'"):
        mixing_counts(batches, "weights", "vqa=2,coco=1,gqa=1,nlvr=1")


@pytest.mark.parametrize(
    "mix",
    [
        {},
        {"mixing": "weights", "weights": "vqa=1,gqa=3,nlvr=1"},
        {"mixing": "temperature", "temperature": 3.0},
    ],
)
def test_every_rank_computes_the_same_schedule(root, mix):
    idx, sizes = indexes(root), {t: 4 for t in TASKS}
    per_rank = [epoch_schedule(idx, sizes, 2, 0, 0, **mix) for _ in range(2)]
    assert per_rank[0] == per_rank[1]
    proportional = epoch_schedule(idx, sizes, 2, 0, 0)
    assert len(per_rank[0]) == len(proportional) == 48 // 8 + 24 // 8 + 24 // 8
    if mix.get("mixing") == "weights":
        # 12 x (1, 3, 1) / 5 = (2.4, 7.2, 2.4): the remainder step goes to the first tie
        assert Counter(per_rank[0]) == {"vqa": 3, "gqa": 7, "nlvr": 2}


def test_weighted_mixing_oversamples_a_small_task(root, tokenizer):
    """gqa has 24 samples; weighted 3:1:1 it takes 14 of the 24 steps: its stream repeats."""
    batches = list(stream(root, tokenizer, mixing="weights", mixing_weights="vqa=1,gqa=3,nlvr=1"))
    gqa = [i for b in batches if b["task"] == "gqa" for i in b["ids"]]
    assert len(gqa) == 14 * 4 and len(set(gqa)) == 24  # every sample, then repeats


def test_two_ranks_with_workers_get_equal_batches(root, tokenizer):
    """2 ranks x 2 workers = 4 readers: vqa's 5 uneven shards split 2:1:1:1, gqa's 1 and
    nlvr's 2 shards fall back to the per-sample split; equal batch counts and task order."""
    runs = []
    for rank in (0, 1):
        ds = stream(root, tokenizer, rank=rank, world=2)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        runs.append([(b["task"], tuple(b["ids"])) for b in loader])
    assert len(runs[0]) == len(runs[1]) == 12
    assert [t for t, _ in runs[0]] == [t for t, _ in runs[1]]
    assert all(len(ids) == 4 for run in runs for _, ids in run)
    assert runs[0] != runs[1]


def test_fewer_shards_than_readers_is_explained_once(root, tokenizer, caplog):
    notes = reader_split_notes(indexes(root), world=2, workers=2)
    assert len(notes) == 2 and notes[0].startswith("task gqa: 1 shard(s) < 2 rank(s) x 2")
    assert "every 4-th sample" in notes[0] and notes[1].startswith("task nlvr: 2 shard(s)")
    cfg = build_config(
        "tiny",
        {
            "data.root": str(root),
            "data.tasks": "vqa,gqa,nlvr",
            "data.val_split": "train",
            "data.num_workers": "2",
        },
    )
    with caplog.at_level(logging.INFO, logger="vlds"):
        DataBuilder(cfg, root, tokenizer, 96, SimpleNamespace(rank=0, world_size=2, is_main=True))
        DataBuilder(cfg, root, tokenizer, 96, SimpleNamespace(rank=1, world_size=2, is_main=False))
    assert sum("shard(s) <" in r.message for r in caplog.records) == 2  # rank 0 only


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"data.mixing": "random"}, "data.mixing='random'; valid: proportional, weights"),
        ({"data.mixing": "weights", "data.mixing_weights": "vqa=1"}, "gives no weight to"),
        ({"data.mixing": "weights", "data.mixing_weights": "vqq=1"}, "names 'vqq', not one of"),
        (
            {"data.mixing": "weights", "data.mixing_weights": "vqa=1,gqa=1,nlvr=1,caption=x"},
            "needs a weight > 0",
        ),
        (
            {"data.mixing": "proportional", "data.mixing_weights": "vqa=2"},
            "add --data.mixing=weights",
        ),
        (
            {
                "data.mixing": "temperature",
                "data.mixing_weights": "",
                "data.mixing_temperature": "0",
            },
            "must be > 0",
        ),
        ({"data.features": "yes"}, "data.features='yes'; valid: auto, true, false"),
        ({"data.max_bad_fraction": "2"}, "must be in \\[0, 1\\]"),
    ],
)
def test_config_rejects_bad_data_settings(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(build_config("tiny", overrides))


def test_config_accepts_mixing_settings():
    weights = {"data.mixing": "weights", "data.mixing_weights": "vqa=2,gqa=1,nlvr=1,caption=0.5"}
    validate(build_config("tiny", weights))
    temperature = {"data.mixing": "temperature", "data.mixing_weights": ""}
    validate(build_config("tiny", {**temperature, "data.mixing_temperature": "3"}))
    # the tiny preset's weights (3:3:3:1) serve a run on some of its tasks
    validate(build_config("tiny", {"data.tasks": "vqa,nlvr"}))
