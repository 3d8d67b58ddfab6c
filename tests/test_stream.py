"""The streaming pipeline: schedules, rank/worker splits, resume, eval partitioning."""

import io
import json
import re
import tarfile
from pathlib import Path

import pytest
import torch

from vlds.data.decode import Collator, Preprocess
from vlds.data.mixing import epoch_schedule, task_batch_sizes
from vlds.data.shardio import DataError, load_index
from vlds.data.stream import EvalStream, TrainStream, consumed_state
from vlds.data.synthetic import SyntheticSpec, write_task_split


@pytest.fixture(scope="module")
def uneven_root(tmp_path_factory):
    """vqa: 3 shards of 20, 20 and 10 samples; gqa: 1 shard of 30."""
    root = tmp_path_factory.mktemp("uneven")
    write_task_split(root, "vqa", "train", 50, SyntheticSpec(samples_per_shard=20))
    write_task_split(root, "gqa", "train", 30, SyntheticSpec(samples_per_shard=30))
    return root


def _stream(
    root,
    tokenizer,
    rank=0,
    world=1,
    epoch=0,
    skip=0,
    bs=4,
    tasks=("vqa", "gqa"),
    split="shard",
    max_bad=1.0,
    mixing="proportional",
):
    idx = {t: load_index(root, t, "train") for t in tasks}
    return TrainStream(
        idx,
        {t: bs for t in tasks},
        Preprocess(96),
        Collator(tokenizer, list(tasks), 40, 20),
        rank=rank,
        world=world,
        seed=0,
        epoch=epoch,
        shuffle_buffer=8,
        skip_steps=skip,
        split=split,
        max_bad_fraction=max_bad,
        mixing=mixing,
        mixing_temperature=3.0,
    )


def _ids(loader):
    return [(b["task"], tuple(b["ids"])) for b in loader]


def test_schedule_is_proportional_and_shared_by_all_ranks(uneven_root, tokenizer):
    idx = {t: load_index(uneven_root, t, "train") for t in ("vqa", "gqa")}
    s0 = epoch_schedule(idx, {"vqa": 4, "gqa": 4}, world=2, seed=0, epoch=0)
    assert sorted(s0) == ["gqa"] * (30 // 8) + ["vqa"] * (50 // 8)
    assert s0 == epoch_schedule(idx, {"vqa": 4, "gqa": 4}, world=2, seed=0, epoch=0)
    assert any(epoch_schedule(idx, {"vqa": 4, "gqa": 4}, 2, 0, e) != s0 for e in range(1, 5))
    with pytest.raises(DataError, match="fewer than one global batch"):
        epoch_schedule(idx, {"vqa": 4, "gqa": 40}, world=1, seed=0, epoch=0)


def test_uneven_shards_give_every_rank_the_same_steps(uneven_root, tokenizer):
    """3 vqa shards over 2 ranks: rank 0 reads 2 shards, rank 1 one; same batch count."""
    per_rank = [_ids(_stream(uneven_root, tokenizer, rank=r, world=2)) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == len(_stream(uneven_root, tokenizer, 0, 2))
    assert [t for t, _ in per_rank[0]] == [t for t, _ in per_rank[1]]  # same task each step
    assert all(len(ids) == 4 for _, ids in per_rank[0] + per_rank[1])
    # gqa has one shard < 2 slots: samples are split by index, disjoint between ranks
    g0 = {i for t, ids in per_rank[0] if t == "gqa" for i in ids}
    g1 = {i for t, ids in per_rank[1] if t == "gqa" for i in ids}
    assert g0 and g1 and not g0 & g1


def test_workers_keep_the_schedule_order(uneven_root, tokenizer):
    ds = _stream(uneven_root, tokenizer)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    assert [t for t, _ in _ids(loader)] == ds.schedule


def test_resume_skips_exactly_the_consumed_steps(uneven_root, tokenizer):
    full = _ids(_stream(uneven_root, tokenizer, epoch=1))
    resumed = _ids(_stream(uneven_root, tokenizer, epoch=1, skip=5))
    assert resumed == full[5:]
    assert _ids(_stream(uneven_root, tokenizer, epoch=1)) == full  # deterministic
    assert _ids(_stream(uneven_root, tokenizer, epoch=2)) != full  # reshuffled per epoch


def test_collator_prompts_and_masks(uneven_root, tokenizer):
    batch = next(iter(_stream(uneven_root, tokenizer, tasks=("vqa",))))
    assert batch["images"].shape == (4, 1, 3, 96, 96)
    text = tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True)
    assert text.startswith("vqa: ")
    labels = batch["labels"]
    pad = batch["labels"] == -100
    assert (labels[~pad] >= 0).all() and (batch["task_ids"] == 0).all()
    assert len(batch["refs"][0]) == 10  # the 10 human answers for the metric


def test_eval_stream_counts_every_sample_once(shapes_root, tokenizer):
    idx = load_index(shapes_root, "nlvr", "val")
    pre, col = Preprocess(96), Collator(tokenizer, ["nlvr"], 40, 20)
    seen = []
    for rank in range(3):
        for b in EvalStream(idx, pre, col, rank=rank, world=3, batch_size=5):
            assert b["images"].shape[1:] == (2, 3, 96, 96)
            seen += b["ids"]
    assert len(seen) == len(set(seen)) == idx.total


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_ranges_count_every_sample_once_and_each_rank_reads_its_share(
    uneven_root, tokenizer, workers
):
    """vqa: shards of 20, 20 and 10 samples over 3 ranks (x workers): every sample of the
    split, or of its first 33, exactly once; in one process, a rank reads at most a third of
    the bytes and one shard (its range's payloads, and json members before it in its first
    shard: with payloads this small, the file buffer reads them too); every rank read it all
    before."""
    import psutil

    from vlds.data.shardio import read_records

    idx = load_index(uneven_root, "vqa", "train")
    pre, col = Preprocess(96), Collator(tokenizer, ["vqa"], 40, 20)
    order = [r["id"] for r in read_records(idx)]
    sizes = [Path(p).stat().st_size for p, _ in idx.shards]
    me = psutil.Process()
    for max_samples in (0, 33):
        seen = []
        for rank in range(3):
            ds = EvalStream(
                idx, pre, col, rank=rank, world=3, batch_size=4, max_samples=max_samples
            )
            before = me.io_counters().read_chars
            seen += [i for b in _loader(ds, workers) for i in b["ids"]]
            if not workers and not max_samples:
                assert me.io_counters().read_chars - before <= sum(sizes) / 3 + max(sizes)
        assert sorted(seen) == sorted(order[: max_samples or None]) and len(set(seen)) == len(seen)


def test_undecodable_samples_are_skipped_and_the_batch_refilled(tmp_path, tokenizer):
    root = tmp_path
    write_task_split(root, "vqa", "train", 12, SyntheticSpec(samples_per_shard=12))
    shard = root / "vqa" / "train-00000.tar"
    members = []
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            members.append((m.name, tar.extractfile(m).read()))
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            if name.startswith("vqa-train-0000003."):
                data = b"not a png" if name.endswith(".png") else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    batches = _ids(_stream(root, tokenizer, bs=4, tasks=("vqa",)))
    assert len(batches) == 3 and all(len(ids) == 4 for _, ids in batches)
    assert "3" not in {i for _, ids in batches for i in ids}


def test_missing_data_is_explained(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_index(tmp_path / "nope", "vqa", "train")
    with pytest.raises(DataError, match="no shard index .*vqa/train.index.json"):
        load_index(tmp_path, "vqa", "train")
    (tmp_path / "gqa").mkdir()
    (tmp_path / "gqa" / "train.index.json").write_text(
        json.dumps({"shards": [{"url": "../../etc/passwd", "samples": 1}]})
    )
    with pytest.raises(DataError, match="outside the task folder"):
        load_index(tmp_path, "gqa", "train")


def test_task_batch_scale():
    assert task_batch_sizes(["vqa", "gqa"], 60, "gqa=1.67") == {"vqa": 60, "gqa": 100}
    # a fraction, floored as the reference's int(batch x 100 / 60); an absent known task ignored
    assert task_batch_sizes(["vqa", "gqa"], 500, "gqa=100/60,nlvr=0.5") == {"vqa": 500, "gqa": 833}
    with pytest.raises(DataError, match="names 'nlvr2', not a task"):
        task_batch_sizes(["vqa"], 60, "nlvr2=0.5")
    with pytest.raises(DataError, match="needs a factor > 0, e.g. gqa=100/60"):
        task_batch_sizes(["vqa", "gqa"], 60, "gqa=0")


def test_global_split_makes_batches_independent_of_the_world_size(uneven_root, tokenizer):
    one = _ids(_stream(uneven_root, tokenizer, world=1, bs=8, split="global"))
    two = [
        _ids(_stream(uneven_root, tokenizer, rank=r, world=2, bs=4, split="global")) for r in (0, 1)
    ]
    assert len(two[0]) == len(two[1]) == len(one)
    for (t1, ids1), (t0, a), (_, b) in zip(one, two[0], two[1], strict=True):
        assert t1 == t0 and ids1 == a + b  # rank 0 holds the first half, rank 1 the second


# ---- resume across an epoch boundary, with workers ----------------------------------------


def _steps(root, tokenizer, n, start=(0, 0), workers=2, resume=None):
    """The batches of n steps from (epoch, step in epoch), iterating as the trainer does: one
    loader per epoch, resumed mid-epoch from `resume`'s cursors, or by replay without them.
    Returns (batches, position after, the stream state the trainer would save there)."""
    out, (epoch, k) = [], start
    while len(out) < n:
        ds = _stream(root, tokenizer, epoch=epoch, skip=k)
        assert ds.resume_from(resume, workers) == (resume is not None or k == 0)
        resume, this_epoch = None, []
        for b in _loader(ds, workers):
            out.append(b)
            this_epoch.append(b)
            k += 1
            if len(out) == n:
                break
        else:
            epoch, k = epoch + 1, 0
    state = consumed_state(ds, this_epoch, k, workers) if k and not ds.skip_steps else None
    return out, (epoch, k), state


@pytest.mark.parametrize("how", ["cursors", "replay"])
def test_resume_mid_epoch_across_the_epoch_boundary(uneven_root, tokenizer, how):
    per_epoch = len(_stream(uneven_root, tokenizer))  # 12 vqa + 7 gqa steps
    n = 30  # the first half ends mid epoch 0, the second crosses into epoch 1
    full, _, _ = _steps(uneven_root, tokenizer, n)
    first, pos, state = _steps(uneven_root, tokenizer, n // 2)
    assert pos == (0, n // 2) and n // 2 < per_epoch < n
    state = state if how == "cursors" else None
    second, end, _ = _steps(uneven_root, tokenizer, n - n // 2, start=pos, resume=state)
    assert end == (1, n - per_epoch)
    assert [_key(b) for b in first + second] == [_key(b) for b in full]


# ---- resume from the batches' cursors: no replay --------------------------------------------


def _loader(ds, workers):
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)


def _key(b):
    return b["task"], tuple(b["ids"])


@pytest.mark.parametrize(
    "split, world, rank, mixing",
    [
        ("shard", 1, 0, "proportional"),
        ("global", 2, 1, "proportional"),
        ("shard", 2, 1, "temperature"),
    ],
)
def test_resume_from_cursors_equals_the_uninterrupted_stream(
    uneven_root, tokenizer, split, world, rank, mixing
):
    def stream(skip=0):
        return _stream(
            uneven_root, tokenizer, rank, world, epoch=1, skip=skip, split=split, mixing=mixing
        )

    full = list(_loader(stream(), 2))
    assert len(full) == len(stream().schedule)
    for k in (1, 2, 7, len(full) - 1):
        ds = stream(skip=k)
        assert ds.resume_from(consumed_state(ds, full, k, 2), 2)
        assert len(ds.cursors) == min(k, 2)  # the workers that produced a batch before step k
        assert [_key(b) for b in _loader(ds, 2)] == [_key(b) for b in full[k:]]


def test_resume_reads_a_block_per_task_not_the_steps_before(uneven_root, tokenizer, monkeypatch):
    """In one process (workers=0): the raw samples a resumed stream reads before its first
    batch, from cursors and by replay (the fallback), at three points of the epoch."""
    from vlds.data import stream as stream_mod

    reads = []
    read = stream_mod.read_samples

    def counted(*a, **kw):
        for s in read(*a, **kw):
            reads.append(s["__key__"])
            yield s

    monkeypatch.setattr(stream_mod, "read_samples", counted)
    full = list(_stream(uneven_root, tokenizer))
    n, got = len(full), {}
    for k in (1, n // 2, n - 1):
        for how in ("cursors", "replay"):
            ds = _stream(uneven_root, tokenizer, skip=k)
            state = consumed_state(ds, full, k, 0) if how == "cursors" else None
            assert ds.resume_from(state, 0) == (how == "cursors")
            reads.clear()
            assert _key(next(iter(ds))) == _key(full[k])
            got[k, how] = len(reads)
    # shuffle blocks of 8, batches of 4, 2 tasks: at most a block and a batch per task
    assert all(got[k, "cursors"] <= 2 * (8 + 4) for k in (1, n // 2, n - 1)), got
    assert got[n - 1, "replay"] >= 4 * (n - 1) > 4 * got[n - 1, "cursors"], got


def test_cursors_that_do_not_fit_fall_back_to_the_replay(uneven_root, tokenizer, caplog):
    full = list(_loader(_stream(uneven_root, tokenizer), 2))
    state = consumed_state(_stream(uneven_root, tokenizer, skip=5), full, 5, 2)
    for bad, why in [
        (None, "no stream cursors"),
        ({**state, "step_in_epoch": 4}, "another position"),
        ({**state, "fingerprint": _stream(uneven_root, tokenizer).fingerprint(3)}, "workers"),
    ]:
        ds = _stream(uneven_root, tokenizer, skip=5)
        caplog.clear()
        assert not ds.resume_from(bad, 2) and not ds.cursors
        assert why in caplog.text and "replaying the stream" in caplog.text
        assert [_key(b) for b in _loader(ds, 2)] == [_key(b) for b in full[5:]]


# ---- bad data: skipped, counted, and fatal above data.max_bad_fraction --------------------


def _rewrite(shard, change):
    """Rewrite a tar member by member: change(name, data) -> (name, data) or None to drop."""
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            new = change(name, data)
            if new is not None:
                info = tarfile.TarInfo(new[0])
                info.size = len(new[1])
                tar.addfile(info, io.BytesIO(new[1]))


def test_bad_samples_of_every_kind_are_skipped_and_counted(tmp_path, tokenizer):
    from vlds.data.shardio import SkipCounter, read_samples

    write_task_split(tmp_path, "vqa", "train", 24, SyntheticSpec(samples_per_shard=12))
    write_task_split(tmp_path, "tvqa", "train", 8, SyntheticSpec(samples_per_shard=8))

    def corrupt(name, data):
        if name.startswith("vqa-train-0000001.json"):  # a record missing a field
            rec = json.loads(data)
            del rec["question"]
            return name, json.dumps(rec).encode()
        if name.startswith("vqa-train-0000002."):  # a member escaping the dataset root
            return "../" + name, data
        return name, data

    _rewrite(tmp_path / "vqa" / "train-00000.tar", corrupt)
    second = tmp_path / "vqa" / "train-00001.tar"
    second.write_bytes(second.read_bytes()[: 8 * 1024])  # truncated mid-sample
    _rewrite(
        tmp_path / "tvqa" / "train-00000.tar",
        lambda n, d: (
            (n, b"garbage") if n.startswith("tvqa-train-0000003.") and "frames" in n else (n, d)
        ),
    )
    counter = SkipCounter()
    keys = [s["__key__"] for s in read_samples(str(second), counter, 12)]
    assert 0 < len(keys) < 12 and counter.count >= 12 - len(keys)  # the rest is kept
    batches = _ids(_stream(tmp_path, tokenizer, tasks=("vqa", "tvqa")))
    seen = {i for _, ids in batches for i in ids}
    assert all(len(ids) == 4 for _, ids in batches)  # refilled: fixed batch shape
    assert not seen & {"vqa-train-0000001", "vqa-train-0000002", "tvqa-train-0000003"}
    assert {t for t, _ in batches} == {"vqa", "tvqa"}


def test_too_many_bad_samples_stop_with_the_shard_names(tmp_path, tokenizer):
    from vlds.data.build import _Loader

    write_task_split(tmp_path, "vqa", "train", 48, SyntheticSpec(samples_per_shard=24))
    bad = tmp_path / "vqa" / "train-00001.tar"
    _rewrite(bad, lambda n, d: (n, b"not a png") if n.endswith(".png") else (n, d))
    tolerant = _stream(tmp_path, tokenizer, tasks=("vqa",), bs=4, max_bad=1.0)
    assert len(_ids(tolerant)) == 12  # 1.0: never stops
    strict = TrainStream(
        {"vqa": load_index(tmp_path, "vqa", "train")},
        {"vqa": 4},
        Preprocess(96),
        Collator(tokenizer, ["vqa"], 40, 20),
        rank=0,
        world=1,
        seed=0,
        epoch=0,
        shuffle_buffer=8,
        max_bad_fraction=0.2,
    )
    with pytest.raises(DataError, match=r"data.max_bad_fraction=0.2.*train-00001.tar \(\d+\)"):
        list(strict)
    # raised in a DataLoader worker, it still reaches the user as its own one-line message
    loader = _Loader(torch.utils.data.DataLoader(strict, batch_size=None, num_workers=1))
    with pytest.raises(DataError) as e:
        list(loader)
    assert re.match(r"\d+ of \d+ samples read were bad", str(e.value)), str(e.value)
    assert "Traceback" not in str(e.value) and "train-00001.tar" in str(e.value)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_tar_reader_agrees_with_webdataset(tmp_path, fmt, mode):
    import webdataset as wds

    from vlds.data.shardio import SkipCounter, read_samples

    deep = "d" * 60 + "/" + "e" * 60  # > 100 characters: ustar prefix, GNU/pax long names
    members = [
        ("a.json", b"{}"),
        ("a.png", b"x" * 700),
        ("a.notes.txt", b"skipped"),
        (f"{deep}/b.json", b'{"k": 1}'),
        (f"{deep}/b.img0.jpg", b"y" * 513),
        ("caf\u00e9.json", b"{}"),
        ("c.frames.npy", b"z" * 512),
    ]
    path = tmp_path / "shard.tar"
    with tarfile.open(path, mode, format=fmt) as tar:
        tar.addfile(tarfile.TarInfo("folder"), None)  # a directory-less entry of size 0
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    errors = SkipCounter()
    samples = list(read_samples(str(path), errors))
    ours = [{k: v for k, v in s.items() if k not in ("__url__", "__off__")} for s in samples]
    theirs = [
        {k: v for k, v in s.items() if k in ("__key__", "json", "png", "img0.jpg")}
        for s in wds.tariterators.tarfile_samples([{"url": str(path)}])
        if "json" in s
    ]
    assert ours == theirs and len(ours) == 3 and errors.count == 1  # c: no json
    # "__off__": where the sample's first member's header starts (its long-name header, if
    # any), as tarfile counts it; reading from there gives the same samples
    with tarfile.open(path) as tar:
        first = {}
        for m in tar.getmembers():
            first.setdefault(m.name.split(".", 1)[0], m.offset)
    assert [s["__off__"] for s in samples] == [first[s["__key__"]] for s in samples]
    again = list(read_samples(str(path), SkipCounter(), start=samples[1]["__off__"]))
    assert [s["__key__"] for s in again] == [s["__key__"] for s in samples[1:]]


def test_tar_reader_stops_at_a_corrupt_header(tmp_path):
    from vlds.data.shardio import SkipCounter, read_samples

    write_task_split(tmp_path, "vqa", "train", 4, SyntheticSpec(samples_per_shard=4))
    shard = tmp_path / "vqa" / "train-00000.tar"
    data = bytearray(shard.read_bytes())
    second = data.index(b"vqa-train-0000002.json")  # that member's header
    data[second + 5] ^= 0xFF
    shard.write_bytes(bytes(data))
    errors = SkipCounter()
    keys = [s["__key__"] for s in read_samples(str(shard), errors, 4)]
    assert keys == ["vqa-train-0000000", "vqa-train-0000001"]
    assert errors.count == 1 + 2  # the corrupt header, then samples 2 and 3 missing
