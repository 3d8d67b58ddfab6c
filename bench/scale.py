"""Streaming at cluster scale: what a resume, an evaluation and the loader's memory cost a rank.

    python bench/scale.py --quick     # 10k samples only, under 2 minutes on 2 cores
    python bench/scale.py             # 10k, 100k and 1M samples (the 1M set: ~1.3 GB, temp dir)

For each size, a VQA-like split is written in a temp folder (small payloads so it runs on 2
cores: a 200-byte record and a 300-byte image member per sample; 100 samples per shard, 1,000
at 1M, so every simulated reader has shards of its own) and read by vlds' own stream in this
process (data.num_workers=0), for simulated worlds of 1, 8 and 64 readers (ranks):

- resume: rank 0 is stopped at 10 %, 50 % and 90 % of an epoch (micro-batch 8, shuffle blocks
  of 256, the config's default) and a new stream resumes there, from the batches' cursors (what
  a checkpoint holds) and, for comparison, by the replay that was vlds' only way before: bytes
  read (the process's read_chars) and seconds until the first batch. Target: resume bytes do
  not grow with the step (at 90 % at most 1.5x those at 10 %) and stay within one shuffle
  block and one shard per task and reader (a resumed reader re-reads the block it was in).
- eval: bytes each of ranks 0, world/2 and world-1 reads to score the split as a validation
  split (the most of the three), against split bytes / world. Target: <= split / world + one
  shard.
- shm: the loaders' shared-memory need per rank at the bart-base preset on 8 ranks, as training
  logs and checks it at start-up (vlds.data.shm): workers x prefetch x (the largest training
  batch + the largest evaluation batch, which waits beside it during an evaluation), pixels as
  the workers hand them over (uint8; the token tensors, < 1 %, left out). Target: <= 2 GB per
  rank.

Ends with one line: `scale: resume <bytes at 90 %>/<bytes at 10 %> = <ratio>; eval <bytes per
rank>/<split bytes / world> = <ratio>; shm <GB> GB/rank: PASS|FAIL` (the largest world of the
largest size run; PASS only when all three targets hold).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402

SIZES = (10_000, 100_000, 1_000_000)
WORLDS = (1, 8, 64)
POINTS = (0.1, 0.5, 0.9)
BATCH, BLOCK = 8, 256
SHM_TARGET_GB = 2.0


def write_split(root: Path, n: int) -> Path:
    """{root}/vqa/train-*.tar and train.index.json, as vlds' writers lay them out."""
    per_shard = 100 if n <= 100_000 else 1000
    folder = root / "vqa"
    folder.mkdir(parents=True)
    shards = []
    payload = bytes(range(256)) + bytes(44)
    for s in range(0, n, per_shard):
        name = f"train-{s // per_shard:06d}.tar"
        with tarfile.open(folder / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(s, min(n, s + per_shard)):
                rec = {
                    "id": str(i),
                    "question": "what color is the big circle?",
                    "answers": ["red"] * 10,
                }
                for ext, data in (("json", json.dumps(rec).encode()), ("jpg", payload)):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append({"url": name, "samples": min(per_shard, n - s)})
    index = {"task": "vqa", "split": "train", "total": n, "shards": shards}
    (folder / "train.index.json").write_text(json.dumps(index))
    return root


def _stream(index, rank, world, skip=0):
    from vlds.data.stream import TrainStream

    return TrainStream(
        {"vqa": index},
        {"vqa": BATCH},
        lambda s: s["__key__"],  # no decoding: the bench measures reading
        lambda samples, epoch: {"keys": samples},
        rank=rank,
        world=world,
        seed=0,
        epoch=0,
        shuffle_buffer=BLOCK,
        skip_steps=skip,
    )


def _read(fn):
    """(bytes this process read, seconds, result) of fn()."""
    me = psutil.Process()
    b0, t0 = me.io_counters().read_chars, time.perf_counter()
    out = fn()
    return me.io_counters().read_chars - b0, time.perf_counter() - t0, out


def resume_costs(index, world: int) -> list[dict]:
    """Rank 0 of `world`, resumed at each of POINTS of the epoch: bytes and seconds to its
    first batch, from cursors and by replay; the batch must be the uninterrupted one."""
    from vlds.data.stream import consumed_state

    full = _stream(index, 0, world)
    steps = len(full.schedule)
    stops = sorted({max(1, min(steps - 1, round(p * steps))) for p in POINTS})
    batches, it = [], iter(full)
    rows = []
    for k in stops:
        while len(batches) < k + 1:
            batches.append(next(it))
        for how in ("cursors", "replay"):
            ds = _stream(index, 0, world, skip=k)
            state = consumed_state(ds, batches, k, 0) if how == "cursors" else None
            ds.resume_from(state, 0)
            nbytes, secs, first = _read(lambda ds=ds: next(iter(ds)))
            assert first["keys"] == batches[k]["keys"], "resumed stream differs"
            rows.append({"step": k, "of": steps, "how": how, "bytes": nbytes, "s": secs})
    return rows


def eval_cost(index, world: int) -> dict:
    from vlds.data.stream import EvalStream

    worst, shard_bytes = 0, [Path(p).stat().st_size for p, _ in index.shards]
    for rank in sorted({0, world // 2, world - 1}):
        ds = EvalStream(
            index, lambda s: s["__key__"], lambda b: b, rank=rank, world=world, batch_size=64
        )
        nbytes, _, _ = _read(lambda ds=ds: sum(1 for _ in ds))
        worst = max(worst, nbytes)
    split = sum(shard_bytes)
    return {"bytes": worst, "split": split, "share": split / world, "shard": max(shard_bytes)}


def shm_need(world: int = 8) -> dict:
    """The loaders' shared memory per rank at the bart-base preset (vlds.data.shm), uint8
    pixels: {"workers", "prefetch", "train": {task: batch bytes}, "eval": {...}, "bytes"}."""
    from vlds.config import build_config
    from vlds.data.mixing import run_batch_sizes
    from vlds.data.shm import loader_shm_need
    from vlds.data.tasks import get_task

    cfg = build_config(preset="bart-base")
    sizes = run_batch_sizes(cfg, world)
    image = 224  # RN101's input (CLIP's preprocessing)
    images = {"image": 1, "pair": 2}  # NLVR2's two images; video presets are not bart-base's
    one = {t: images[get_task(t).kind] * 3 * image * image for t in sizes}  # uint8 bytes
    train = {t: b * one[t] for t, b in sizes.items()}
    evals = {t: cfg.eval.batch_size * one[t] for t in sizes}
    d = cfg.data
    need = loader_shm_need(d.num_workers, d.prefetch_factor, train, evals)
    return {
        "workers": d.num_workers,
        "prefetch": d.prefetch_factor,
        "batch": sizes,
        "eval_batch": cfg.eval.batch_size,
        "train": train,
        "eval": evals,
        "bytes": need,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the 10k size only")
    args = p.parse_args(argv)
    import logging

    from vlds.data.shardio import load_index

    logging.getLogger("vlds.data.stream").setLevel(logging.ERROR)  # the replays' warnings

    from bench.machine import cpu_model

    sizes = SIZES[:1] if args.quick else SIZES
    last = None
    print(f"<!-- {cpu_model()}, {psutil.cpu_count()} cores -->")
    print("| samples | readers | resume at | from cursors: bytes | s | by replay: bytes | s |")
    print("|---|---|---|---|---|---|---|")
    evals = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            index = load_index(write_split(Path(tmp), n), "vqa", "train")
            print(f"<!-- {n} samples written in {time.perf_counter() - t0:.1f} s -->", flush=True)
            for world in WORLDS:
                rows = resume_costs(index, world)
                for k in sorted({r["step"] for r in rows}):
                    c, r = (
                        next(x for x in rows if x["step"] == k and x["how"] == h)
                        for h in ("cursors", "replay")
                    )
                    print(
                        f"| {n:,} | {world} | step {k} of {c['of']} | {c['bytes']:,} | "
                        f"{c['s']:.3f} | {r['bytes']:,} | {r['s']:.3f} |",
                        flush=True,
                    )
                e = eval_cost(index, world)
                evals.append((n, world, e))
                last = (rows, e)
    print()
    print("| samples | ranks | eval bytes per rank (most) | split / world | one shard | ratio |")
    print("|---|---|---|---|---|---|")
    for n, world, e in evals:
        print(
            f"| {n:,} | {world} | {e['bytes']:,} | {e['share']:,.0f} | {e['shard']:,} | "
            f"{e['bytes'] / e['share']:.2f} |"
        )
    shm = shm_need()
    gb = shm["bytes"] / 1e9
    print()
    tr, ev = (max(shm[k], key=shm[k].get) for k in ("train", "eval"))
    print(
        f"shm at bart-base on 8 ranks: {shm['workers']} workers x prefetch {shm['prefetch']} x "
        f"(training batch {shm['train'][tr] / 1e6:.1f} MB ({tr}, {shm['batch'][tr]} samples; "
        f"batches {shm['batch']}) + evaluation batch {shm['eval'][ev] / 1e6:.1f} MB ({ev}, "
        f"{shm['eval_batch']} samples)) of uint8 pixels = {gb:.2f} GB per rank"
    )
    rows, e = last
    cursors = [r for r in rows if r["how"] == "cursors"]
    b10, b90 = cursors[0]["bytes"], cursors[-1]["bytes"]
    block = BLOCK * e["split"] / n  # the bytes of one shuffle block
    resume_ok = b90 <= 1.5 * max(b10, 1) and b90 <= block + e["shard"]
    eval_ok = e["bytes"] <= e["share"] + e["shard"]
    shm_ok = gb <= SHM_TARGET_GB
    verdict = "PASS" if resume_ok and eval_ok and shm_ok else "FAIL"
    print(
        f"scale: resume {b90}/{b10} = {b90 / max(b10, 1):.2f}; eval {e['bytes']}/"
        f"{e['share']:.0f} = {e['bytes'] / e['share']:.2f}; shm {gb:.2f} GB/rank: {verdict}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
