"""vlds' own shard reader against the maintained loaders, on the same WebDataset tars.

    python bench/loaders.py            # the table for bench/RESULTS.md (~1 min on 2 cores)
    python bench/loaders.py --quick    # a small set, one round (seconds)
    /tmp/cmpvenv/bin/python bench/loaders.py   # with the optional libraries (see below)

Two shard sets are written in a temp folder, each as vlds' writers write them (4 shards,
`{key}.json` + payload, `{split}.index.json`): cached features (feats.npy (36, 2048) float16,
the RN101 6x6 grid, ~148 kB a sample) and JPEGs (640x480 photo-like, ~q90, ~100 kB). Each is
read, in this one process (one thread: what one DataLoader worker does), by

- vlds: `vlds.data.shardio.read_samples` over the shards (raw), and the whole training stream
  (`TrainStream`: schedule, shuffle blocks, cursors, record check, decoding; batch 32);
- webdataset: `webdataset.WebDataset(urls, shardshuffle=False)` (its tar reader and grouping);
- wids: `wids.ShardListDataset` indexed by sample (mmap'ed tars), no transformations;
- Megatron-Energon: `get_train_dataset` over a `CrudeWebdataset` made by `energon prepare`
  (its sqlite + .tar.idx index beside the same tars), no decoder, no shuffle;
- MosaicML Streaming: `StreamingDataset` over an MDS copy of the same samples (it reads only
  its own format: the copy is written once, untimed).

Rows "raw" time the reader handing over each sample's bytes; rows "+ decode" add vlds'
`Preprocess` to every reader (json, record check, feats.npy view or JPEG decode + resize to
224), so the difference between readers is the reader's own cost. Samples/s is per wall second
after a warm-up sample, the best of --rounds rounds that visit the readers in turn (the machine
is shared: compare ratios, column "x vlds" = against vlds' raw reader on the same path). MB/s
counts the sample's member bytes. Set-up (wids' index, `energon prepare`, the MDS copy) is
given apart.

The optional libraries are not vlds dependencies; the bench skips any that is not importable,
with a line saying so. A throwaway venv that sees the project's packages:

    python3 -m venv /tmp/cmpvenv
    echo "$PWD/.venv/lib/python3.11/site-packages" \
        > /tmp/cmpvenv/lib/python3.11/site-packages/vlds.pth
    /tmp/cmpvenv/bin/pip install wids streaming-community megatron-energon

(`mosaicml-streaming` 0.13.0 itself pins numpy<2.2 and transformers<5, below vlds'; its fork
`streaming-community` is the same library, `import streaming`.)
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.data_throughput import photo, vqa_rec  # noqa: E402

SHARDS = 4
FEATURE_META = {"kind": "grid", "vision": "RN101", "pretrained": "openai", "grid_pool": 6}


def write_set(root: Path, payloads: list[dict], **extra) -> Path:
    """{root}/vqa/train-0000k.tar (SHARDS of them) + train.index.json, as vlds writes them."""
    from vlds.data.prep import shardwrite

    d = root / "vqa"
    d.mkdir(parents=True)
    per = -(-len(payloads) // SHARDS)
    entries = []
    for s in range(SHARDS):
        url = shardwrite.shard_url("train", s)
        ids = range(s * per, min(len(payloads), (s + 1) * per))
        with shardwrite.open_shard(d / url) as tar:
            for i in ids:
                shardwrite.write_sample(tar, f"s{i:07d}", {"json": vqa_rec(i), **payloads[i]})
        entries.append({"url": url, "samples": len(ids), "sentences": len(ids)})
    shardwrite.write_index(d, "vqa", "train", entries, **extra)
    return root


def feature_set(root: Path, n: int, rng) -> Path:
    feats = rng.standard_normal((8, 36, 2048)).astype(np.float16)
    blobs = []
    for f in feats:
        b = io.BytesIO()
        np.save(b, f)
        blobs.append(b.getvalue())
    return write_set(root, [{"feats.npy": blobs[i % 8]} for i in range(n)], features=FEATURE_META)


def jpeg_set(root: Path, n: int, rng) -> Path:
    jpgs = [photo(rng) for _ in range(min(n, 16))]
    return write_set(root, [{"jpg": jpgs[i % len(jpgs)]} for i in range(n)])


# ---- readers: each a function (index, setup folder) -> an endless iterator of raw samples
# in vlds' sample form ({"__key__", "json", payload ext: bytes}), and its set-up seconds


def forever(epoch_fn):
    while True:
        yield from epoch_fn()


def vlds_raw(index, tmp):
    from vlds.data.shardio import SkipCounter, read_samples

    return forever(lambda: (s for p, _ in index.shards for s in read_samples(p, SkipCounter())))


def webdataset_raw(index, tmp):
    import webdataset as wds

    urls = [p for p, _ in index.shards]
    return forever(lambda: iter(wds.WebDataset(urls, shardshuffle=False, empty_check=False)))


def wids_raw(index, tmp):
    import contextlib
    import os

    import wids

    shards = [{"url": p, "nsamples": n} for p, n in index.shards]
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # prints its shards
        ds = wids.ShardListDataset(shards, transformations=[], cache_dir=str(tmp / "wids"))

    def epoch():
        for i in range(len(ds)):
            s = ds[i]
            out = {k[1:]: v.getvalue() for k, v in s.items() if k.startswith(".")}
            yield {"__key__": s["__key__"], **out}

    return forever(epoch)


def energon_raw(index, tmp):
    from megatron.energon import (
        Cooker,
        DefaultTaskEncoder,
        WorkerConfig,
        get_loader,
        get_train_dataset,
        stateless,
    )

    folder = Path(index.shards[0][0]).parent
    energon = Path(sys.executable).parent / "energon"
    last = len(index.shards) - 1
    subprocess.run(
        [str(energon), "prepare", str(folder), "--non-interactive", "--no-progress"]
        + ["--split-parts", f"train:train-{{00000..{last:05d}}}.tar"]
        + ["--sample-type", "CrudeWebdataset", "--force-overwrite", "--num-workers", "1"],
        check=True,
        capture_output=True,
    )

    @stateless
    def raw(sample):
        return sample

    class Raw(DefaultTaskEncoder):
        decoder = None  # bytes as stored, like every other reader here
        cookers = [Cooker(raw)]

        def encode_sample(self, sample):
            return sample

        def batch(self, samples):
            return samples

    ds = get_train_dataset(
        str(folder),
        worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0),
        batch_size=None,
        shuffle_buffer_size=None,
        max_samples_per_sequence=None,
        task_encoder=Raw(),
    )
    return iter(get_loader(ds))  # repeats by itself


def streaming_raw(index, tmp):
    from streaming import MDSWriter, StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    from vlds.data.shardio import SkipCounter, read_samples

    out = tmp / "mds"
    with MDSWriter(out=str(out), columns={"key": "str", "json": "bytes", "payload": "bytes"}) as w:
        for path, _ in index.shards:
            for s in read_samples(path, SkipCounter()):
                ext = next(k for k in s if k not in ("__key__", "__url__", "__off__", "json"))
                w.write({"key": s["__key__"], "json": s["json"], "payload": s[ext]})
    ext = "feats.npy" if index.features else "jpg"
    clean_stale_shared_memory()
    ds = StreamingDataset(local=str(out), batch_size=1, shuffle=False)

    def epoch():
        for s in ds:
            yield {"__key__": s["key"], "json": s["json"], ext: s["payload"]}

    return forever(epoch)


READERS = {
    "vlds read_samples": ("vlds", vlds_raw),
    "webdataset.WebDataset": ("webdataset", webdataset_raw),
    "wids.ShardListDataset": ("wids", wids_raw),
    "Megatron-Energon": ("megatron.energon", energon_raw),
    "MosaicML Streaming": ("streaming", streaming_raw),
}


def importable(module: str) -> bool:
    import importlib

    try:
        importlib.import_module(module)
        return True
    except Exception:  # not installed, or broken against this environment
        return False


def train_stream(index, preprocess):
    """vlds' whole training stream over the split, batch 32, one epoch after another."""
    from vlds.data.stream import TrainStream

    def epochs():
        epoch = 0
        while True:
            stream = TrainStream(
                {"vqa": index},
                {"vqa": min(32, index.total)},
                preprocess,
                lambda samples, e: {"samples": samples},  # the Collator's work left out
                rank=0,
                world=1,
                seed=0,
                epoch=epoch,
                shuffle_buffer=256,
            )
            for batch in stream:
                yield from batch["samples"]
            epoch += 1

    return epochs()


def timed(it, seconds: float) -> tuple[float, float]:
    """(samples per wall second, per CPU second of the process, its threads included) of
    `it` after one warm-up sample."""
    next(it)
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds or n < 8:
        next(it)
        n += 1
    return n / (time.perf_counter() - t0), n / max(time.process_time() - c0, 1e-9)


def keep_best(best: dict, key: tuple, rates: tuple[float, float]) -> None:
    """The round with the best wall rate (the least disturbed by the neighbours)."""
    if rates[0] > best.get(key, (0.0, 0.0))[0]:
        best[key] = rates


def run_path(name: str, root: Path, tmp: Path, readers: dict, rounds: int, seconds: float):
    from vlds.config import build_config
    from vlds.data.build import preprocess_and_collate
    from vlds.data.shardio import SkipCounter, load_index, read_samples

    index = load_index(root, "vqa", "train")
    pre, _ = preprocess_and_collate(build_config("tiny"), None, 224)  # training's decoding
    first = next(read_samples(index.shards[0][0], SkipCounter()))
    sample_bytes = sum(len(v) for k, v in first.items() if not k.startswith("__"))
    makers, setup = {}, {}
    for label, fn in readers.items():
        t0 = time.perf_counter()
        try:
            it = fn(index, tmp / label.split()[0].split(".")[0])
            next(it)  # the set-up a reader does on its first sample counts as set-up
        except Exception as e:  # a library that fails on these shards is reported, not fatal
            print(f"  {label} on {name}: failed ({e!r:.200}); left out", file=sys.stderr)
            continue
        setup[label] = time.perf_counter() - t0
        makers[label] = it
    best: dict[tuple, tuple[float, float]] = {}
    for _ in range(rounds):
        for label, it in makers.items():
            keep_best(best, (label, "raw"), timed(it, seconds))
            keep_best(best, (label, "decode"), timed((pre(s) for s in it), seconds))
        keep_best(best, ("vlds TrainStream", "decode"), timed(train_stream(index, pre), seconds))
    return best, setup, sample_bytes


def lines_of(*paths) -> int:
    return sum(len((REPO / p).read_text().splitlines()) for p in paths)


def commit() -> str:
    p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True)
    return p.stdout.decode().strip() or "?"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sets, one round, short windows")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=1.5, help="timing window per row and round")
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = 1, 0.1
    n_feat, n_jpeg = (64, 8) if args.quick else (1024, 256)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    readers = {}
    for label, (module, fn) in READERS.items():
        if importable(module):
            readers[label] = fn
        else:
            print(f"{label}: not importable here ({module}); skipped")
    from bench.machine import cpu_model

    results = {}
    with tempfile.TemporaryDirectory(prefix="vlds-loaders-") as tmp:
        tmp = Path(tmp)
        for name, build, n in (("features", feature_set, n_feat), ("jpeg", jpeg_set, n_jpeg)):
            root = build(tmp / name, n, rng)
            work = tmp / f"{name}-work"
            best, setup, size = run_path(name, root, work, readers, args.rounds, args.seconds)
            results[name] = {"best": best, "setup": setup, "bytes": size, "samples": n}
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"\n{datetime.date.today()} commit {commit()}, {cpu_model()}, one process, one thread, "
        f"{args.rounds} round(s) x {args.seconds:g} s (best); samples/s per wall second, x vlds "
        f"= that against vlds read_samples raw on the same path; per CPU s: samples per CPU "
        f"second of the process (its threads included)\n"
    )
    print("| reader | path | samples | samples/s | MB/s | x vlds | per CPU s | set-up s |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        base = r["best"].get(("vlds read_samples", "raw"), (0.0,))[0]
        for (label, mode), (rate, cpu) in r["best"].items():
            what = "raw" if mode == "raw" else "+ decode"
            if label == "vlds TrainStream":
                what = "whole stream + decode"
            mb = rate * r["bytes"] / 1e6
            ratio = f"{rate / base:.2f}" if base else "-"
            s = r["setup"].get(label)
            setup = f"{s:.1f}" if s is not None and mode == "raw" else ""
            print(
                f"| {label} | {name} {what} | {r['samples']} | {rate:,.0f} | {mb:,.0f} | "
                f"{ratio} | {cpu:,.0f} | {setup} |"
            )
    kept = lines_of("vlds/data/stream.py", "vlds/data/shardio.py")
    print(f"\nvlds/data/stream.py + vlds/data/shardio.py: {kept} lines")
    if args.json:
        flat = {
            name: {f"{label} {mode}": rates for (label, mode), rates in r["best"].items()}
            for name, r in results.items()
        }
        Path(args.json).write_text(json.dumps(flat, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
