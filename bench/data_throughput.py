"""Data loading throughput per worker, and the loader's share of a tiny-preset training step.

    python bench/data_throughput.py                 # the table for bench/RESULTS.md
    python bench/data_throughput.py --seconds 2     # shorter timing windows

Rows (each a single process with one torch thread: what one DataLoader worker does):
- JPEG: 640x480 photos-like JPEGs (~q90) -> 224 px CLIP tensors, Preprocess.image alone, with
  a full decode and in PIL's draft mode (the default, data.jpeg_draft), and the whole stream
  (tar read, json, decode, tokenise, collate) at 224 px.
- video frames: frames.npy (8, 224, 224, 3) uint8 -> (8, 3, 224, 224) tensors, through the
  stream; plus PyAV decoding 8 frames from a 10 s 640x360 clip (the shard writer's cost).
- cached features: feats.npy (36, 2048) float16 (RN101 6x6 grid) through the stream, decoding
  only and whole batches (tokenised, collated).
- step share: the tiny preset's training step (visual_inputs + forward + backward + AdamW, no
  DeepSpeed) on the embedded shapes world with data.num_workers = 1 (the README's setting for
  it): the time the loop waits on the loader, and one batch's loader work, vs the step.

Rates are given per wall second and per CPU second of the process (time.process_time): on a
shared machine the wall rate also measures the neighbours, the CPU rate is the per-core cost.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

TARGETS = {"jpeg": 300, "features": 20_000, "share": 0.05}


def rate(fn, seconds: float, per_call: int = 1) -> tuple[float, float]:
    """(items per wall second, items per CPU second) of calling fn repeatedly."""
    fn()  # warm-up (imports, caches)
    n, w0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - w0 < seconds:
        fn()
        n += per_call
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return n / wall, n / max(cpu, 1e-9)


def photo(rng, w=640, h=480) -> bytes:
    """A JPEG with photo-like statistics: smooth regions, edges and sensor noise (~100 kB)."""
    from PIL import Image

    small = rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.int16)
    img = (img + rng.normal(0, 6, img.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_split(root: Path, task: str, payloads: list[dict], recs: list[dict], **extra) -> None:
    from vlds.data.prep import shardwrite

    d = root / task
    d.mkdir(parents=True, exist_ok=True)
    with shardwrite.open_shard(d / "train-00000.tar") as tar:
        for i, (payload, rec) in enumerate(zip(payloads, recs, strict=True)):
            shardwrite.write_sample(tar, f"{task}-{i:07d}", {"json": rec, **payload})
    shardwrite.write_index(
        d, task, "train", [{"url": "train-00000.tar", "samples": len(recs)}], **extra
    )


def vqa_rec(i: int) -> dict:
    return {
        "task": "vqa",
        "id": str(i),
        "question": f"what color is the thing number {i}?",
        "answers": ["red"] * 6 + ["blue"] * 4,
        "answer_type": "other",
        "question_type": "what color",
        "image_id": i,
    }


def stream_rate(root, task, tok, batch, seconds, decode_only=False, loader=False):
    """Samples/s of TrainStream (one process) over a split: whole batches, or (decode_only) the
    raw read + Preprocess of samples without tokenising/collating, or (loader) whole batches
    through a DataLoader with one worker process (wall rate only: the work is in the worker)."""
    from vlds.data.decode import Collator, Preprocess
    from vlds.data.shardio import SkipCounter, load_index
    from vlds.data.stream import TrainStream, slot_stream

    idx = load_index(root, task, "train")
    pre = Preprocess(224)
    if decode_only:
        raw = slot_stream(idx, 0, 0, 0, 1, SkipCounter())
        return rate(lambda: [pre(next(raw)) for _ in range(batch)], seconds, batch)
    col = Collator(tok, [task], 40, 20, max_frames=8)

    def batches():
        epoch = 0
        while True:
            yield from TrainStream(
                {task: idx},
                {task: batch},
                pre,
                col,
                rank=0,
                world=1,
                seed=0,
                epoch=epoch,
                shuffle_buffer=64,
            )
            epoch += 1

    if not loader:
        it = batches()
        return rate(lambda: next(it), seconds, batch)

    class Epochs(torch.utils.data.IterableDataset):
        def __iter__(self):
            return batches()

    it = iter(
        torch.utils.data.DataLoader(Epochs(), batch_size=None, num_workers=1, prefetch_factor=4)
    )
    wall, _ = rate(lambda: next(it), seconds, batch)
    return wall, float("nan")


def bench_jpeg(root, tok, seconds, rng) -> list:
    from vlds.data.decode import Preprocess

    jpgs = [photo(rng) for _ in range(64)]
    full, draft = (Preprocess(224, draft=d) for d in (False, True))
    cycle = iter(jpgs * 10**6)
    rows = [
        (
            "JPEG 640x480 -> 224 tensor, full decode",
            rate(lambda: full.image(next(cycle)), seconds),
            "images",
            TARGETS["jpeg"],
        ),
        (
            "JPEG 640x480 -> 224 tensor, draft mode (default)",
            rate(lambda: draft.image(next(cycle)), seconds),
            "images",
            TARGETS["jpeg"],
        ),
    ]
    n = 512
    write_split(
        root, "vqa", [{"jpg": jpgs[i % 64]} for i in range(n)], [vqa_rec(i) for i in range(n)]
    )
    rows.append(
        (
            "JPEG stream: tar + json + draft decode + tokenise + collate (batch 32)",
            stream_rate(root, "vqa", tok, 32, seconds),
            "samples",
            TARGETS["jpeg"],
        )
    )
    rows.append(
        (
            "JPEG stream through a DataLoader, 1 worker process (batch 32)",
            stream_rate(root, "vqa", tok, 32, seconds, loader=True),
            "samples",
            TARGETS["jpeg"],
        )
    )
    print(f"  jpeg: {np.mean([len(j) for j in jpgs]) / 1e3:.0f} kB average", file=sys.stderr)
    return rows


def bench_video(root, tok, seconds, rng) -> list:
    from vlds.data.prep.video import decode_frames, encode_video

    n, t = 64, 8
    frames = [rng.integers(0, 255, (t, 224, 224, 3), dtype=np.uint8) for _ in range(4)]
    recs = [
        {
            "task": "tvc",
            "id": str(i),
            "captions": ["someone moves"],
            "subtitles": "hi",
            "ts": [0.0, 1.0],
            "vid_name": f"v{i}",
        }
        for i in range(n)
    ]
    buf = []
    for i in range(n):
        b = io.BytesIO()
        np.save(b, frames[i % 4])
        buf.append({"frames.npy": b.getvalue()})
    write_split(root, "tvc", buf, recs)
    rows = [
        (
            "video frames.npy (8 x 224^2) -> tensors, stream (batch 8)",
            stream_rate(root, "tvc", tok, 8, seconds),
            "clips",
            None,
        )
    ]
    clip = Path(root) / "clip.mp4"
    base = rng.integers(0, 255, (23, 40, 3), dtype=np.uint8)
    from PIL import Image

    big = np.asarray(Image.fromarray(base).resize((640, 360), Image.BICUBIC))
    encode_video(clip, np.stack([np.roll(big, 4 * k, axis=1) for k in range(100)]), fps=10)
    rows.append(
        (
            "PyAV: 8 frames from a 10 s 640x360 clip (shard writer)",
            rate(lambda: decode_frames(clip, 8, 224), seconds),
            "clips",
            None,
        )
    )
    return rows


def bench_features(root, tok, seconds, rng) -> list:
    from vlds.data.shardio import load_npy

    n = 1024
    feats = rng.standard_normal((8, 36, 2048)).astype(np.float16)
    payloads = []
    for i in range(n):
        b = io.BytesIO()
        np.save(b, feats[i % 8])
        payloads.append({"feats.npy": b.getvalue()})
    meta = {
        "kind": "grid",
        "vision": "RN101",
        "pretrained": "openai",
        "grid_pool": 6,
        "dim": 2048,
        "dtype": "float16",
    }
    write_split(root / "f", "vqa", payloads, [vqa_rec(i) for i in range(n)], features=meta)
    one = payloads[0]["feats.npy"]
    return [
        (
            "feats.npy (36 x 2048 fp16) header + view alone",
            rate(lambda: load_npy(one), seconds),
            "samples",
            None,
        ),
        (
            "cached features: tar + json + feats (decode only)",
            stream_rate(root / "f", "vqa", tok, 64, seconds, decode_only=True),
            "samples",
            TARGETS["features"],
        ),
        (
            "cached features: whole batches (tokenise + collate, batch 64)",
            stream_rate(root / "f", "vqa", tok, 64, seconds),
            "samples",
            TARGETS["features"],
        ),
        (
            "cached features through a DataLoader, 1 worker process (batch 64)",
            stream_rate(root / "f", "vqa", tok, 64, seconds, loader=True),
            "samples",
            TARGETS["features"],
        ),
    ]


def bench_tokenizers(fast, seconds) -> list:
    """The Collator's tokenisation alone (encoder texts and targets of a VQA batch of 64)."""
    from transformers import T5Tokenizer

    slow = T5Tokenizer.from_pretrained(fast.name_or_path, extra_ids=0)
    texts, targets = [f"vqa: what color is the thing number {i}?" for i in range(64)], ["red"] * 64

    def tokenise(tok):  # exactly the Collator's two calls
        def call():
            tok(texts, max_length=40, truncation=True, padding=True, return_tensors="pt")
            tok(targets, max_length=20, truncation=True, padding=True, return_tensors="pt")

        return call

    return [
        (
            "tokenise a batch, T5TokenizerFast (real presets)",
            rate(tokenise(fast), seconds, 64),
            "samples",
            None,
        ),
        (
            "tokenise a batch, sentencepiece T5Tokenizer (tiny preset)",
            rate(tokenise(slow), seconds, 64),
            "samples",
            None,
        ),
    ]


def bench_step_share(steps: int) -> list:
    """The tiny preset's step with num_workers=1: loader wait and loader work vs step time."""
    from vlds.config import build_config
    from vlds.data.build import DataBuilder
    from vlds.data.synthetic import ensure_synthetic
    from vlds.engine import param_groups
    from vlds.model.build import build_model, build_tokenizer, build_tower

    cfg = build_config("tiny")
    root = ensure_synthetic()
    tok = build_tokenizer(cfg, root)
    tower = build_tower(cfg)  # seeds torch with train.seed (0)
    model = build_model(cfg, tok, tower, root)
    opt = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=1e-3)
    info = type("Info", (), {"rank": 0, "world_size": 1, "is_main": False})()
    data = DataBuilder(cfg, root, tok, tower.image_size, info)
    it = iter(data.train_loader(0))
    wait = step = 0.0
    for i in range(steps + 5):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        loss = model(tower.visual_inputs(batch, cfg.model.max_frames))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if i >= 5:  # the first batches include worker start-up
            wait, step = wait + t1 - t0, step + t2 - t1
    stream = data._stream(1)  # one batch's work in this process = the worker's cost per batch
    gen = iter(stream)
    next(gen)
    w0 = time.perf_counter()
    for _ in range(10):
        next(gen)
    work = (time.perf_counter() - w0) / 10
    n = cfg.data.num_workers
    return [
        (f"tiny step (batch {cfg.data.batch_size}): compute, ms", step / steps * 1e3),
        (f"tiny step: waiting on the loader ({n} worker), ms", wait / steps * 1e3),
        ("loader share of the step (wait / (wait + compute))", wait / (wait + step)),
        ("one batch's loader work (in-process), ms", work * 1e3),
        ("loader work / compute (< 1: one worker keeps up)", work / (step / steps)),
    ]


def device_line() -> str:
    from bench.machine import cpu_model

    cpu = cpu_model()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu}, {cores} cores (load average {load:.1f} at start), torch {torch.__version__}"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=4.0, help="timing window per row")
    p.add_argument("--steps", type=int, default=40, help="timed tiny training steps")
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # a DataLoader worker runs with one torch thread
    rng = np.random.default_rng(0)
    from transformers import T5TokenizerFast

    from vlds.data.synthetic import ensure_synthetic

    # The fast tokenizer, as the real presets get (AutoTokenizer); same ids as the tiny
    # preset's sentencepiece T5Tokenizer, whose cost the tokeniser rows show.
    tok = T5TokenizerFast.from_pretrained(str(ensure_synthetic() / "tokenizer"), extra_ids=0)
    print(f"device: {device_line()}; date: {time.strftime('%Y-%m-%d')}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows += bench_jpeg(root, tok, args.seconds, rng)
        rows += bench_video(root, tok, args.seconds, rng)
        rows += bench_features(root, tok, args.seconds, rng)
        rows += bench_tokenizers(tok, args.seconds)
    print("\n| per worker (1 process, 1 thread) | unit | per wall s | per CPU s | target |")
    print("|---|---|---:|---:|---|")
    out = {"rows": [], "step": []}
    for name, (wall, cpu), unit, target in rows:
        best = wall if cpu != cpu else cpu  # loader rows: wall only (nan CPU)
        met = "" if target is None else f">= {target:,} ({'met' if best >= target else 'missed'})"
        cpu_text = "-" if cpu != cpu else f"{cpu:,.0f}"
        print(f"| {name} | {unit}/s | {wall:,.0f} | {cpu_text} | {met} |")
        out["rows"].append({"name": name, "unit": unit, "wall": wall, "cpu": cpu})
    torch.set_num_threads(2)
    step_rows = bench_step_share(args.steps)
    print("\n| tiny preset, data.num_workers=1 | value |\n|---|---:|")
    for name, value in step_rows:
        print(f"| {name} | {value:.3f} |" if value < 10 else f"| {name} | {value:.1f} |")
        out["step"].append({"name": name, "value": value})
    share = step_rows[2][1]
    print(f"\nloader share target < {TARGETS['share']:.0%}: {'met' if share < 0.05 else 'missed'}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
