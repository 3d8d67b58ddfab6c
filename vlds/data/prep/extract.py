"""Cache the frozen CLIP tower's outputs: pixel shards -> feature shards, same layout.

    python -m vlds.data.prep.extract --shards /data/vl-shards --tasks vqa,gqa,nlvr,caption \
        --splits train,val --out /data/vl-feats --vision RN101 --vision-pretrained openai \
        --grid-pool 6
    python -m vlds.data.prep.extract --shards /data/value-shards --tasks tvqa,how2qa,tvc,yc2c \
        --out /data/value-feats --vision ViT-B-32 --vision-pretrained openai
    deepspeed vlds/train.py --preset bart-base --data.root=/data/vl-feats   # auto-detected

Every sample keeps its key and its json bytes and gets `feats.npy` instead of pixels:
(n_tok, C) grid tokens per image (ResNet layer4 max-pooled to grid_pool^2; ViT patch tokens),
NLVR2's two images stacked (2 n_tok, C), or (T, D) pooled frame embeddings for video. Shards
keep their names and order; `{split}.index.json` gains a "features" entry naming the tower
(vision, pretrained, grid_pool, dim, dtype) and, for images, the resize mode (`--resize`, as
data.image_resize), which training checks against its config. Boxes
are not stored: grid cells and time slices follow from the token count (vlds.model.vision).

The tower runs batched (`--batch-size` images or frames at once) on the GPU when there is one;
`--workers` processes decode and resize pixels. Like the shard writers, a re-run with the same
arguments skips finished shards and a different one is refused (--overwrite to redo).
With `--vision-pretrained ""` the tower is random, built by vlds.model.build.build_tower with
`train.seed=seed`, so it is the tower a run with `--train.seed=seed` builds.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vlds.config import build_config
from vlds.data import remote
from vlds.data.decode import Preprocess
from vlds.data.prep import shardwrite
from vlds.data.shardio import (
    GROUP,
    DataError,
    SkipCounter,
    expand_group,
    load_index,
    read_samples,
    sample_sentences,
)
from vlds.data.tasks import get_task
from vlds.model.build import build_tower
from vlds.model.vision import VisionTower


class ShardFeed(torch.utils.data.IterableDataset):
    """Decoded pixels of whole shards, one shard per worker at a time, in shard order:
    {"shard", "key", "member", "json", "n", "visual"} per tar sample (a GROUP sample stays one:
    its payload is run once and its records, n of them, are copied as they are), then
    {"shard", "end", "bad"}."""

    def __init__(self, shards: list[tuple[int, str]], preprocess: Preprocess):
        super().__init__()
        self.shards, self.preprocess = shards, preprocess

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        for k, path in self.shards[w::nw]:
            errors = SkipCounter(every=10)
            for s in read_samples(path, errors, expand=False):
                member = GROUP if GROUP in s else "json"
                try:
                    records = expand_group(s)
                    visual = self.preprocess(records[0])["visual"]
                except Exception as e:
                    errors(e, path)
                    continue
                yield {
                    "shard": k,
                    "key": s["__key__"],
                    "member": member,
                    "json": s[member],
                    "n": len(records),
                    "visual": visual,
                }
            yield {"shard": k, "end": True, "bad": errors.count}


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


class Extractor:
    """Runs the tower over pending samples in batches and writes them to their shards."""

    def __init__(self, tower: VisionTower, kind: str, batch_size: int, dtype, device):
        self.tower, self.kind, self.bs = tower, kind, batch_size
        self.dtype, self.device = dtype, device
        self.pending: list[dict] = []

    @torch.no_grad()
    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) uint8 pixels (the tower normalises them on its device) -> (N, n_tok, C)
        grid tokens, or (N, D) frame embeddings."""
        outs = []
        for i in range(0, len(x), self.bs):
            chunk = x[i : i + self.bs].to(self.device)
            if self.kind == "video":
                outs.append(self.tower.frame_embeddings(chunk[None])[0].float().cpu())
            else:
                outs.append(self.tower.grid_tokens(chunk)[0].float().cpu())
        return torch.cat(outs)

    def flush(self, writers: dict) -> None:
        if not self.pending:
            return
        counts = [p["visual"].shape[0] for p in self.pending]  # images or frames per sample
        out = self._run(torch.cat([p["visual"] for p in self.pending]))
        for p, feats in zip(self.pending, out.split(counts), strict=True):
            feats = feats.reshape(-1, feats.shape[-1]).numpy().astype(self.dtype)  # (n, C)
            w = writers[p["shard"]]
            w["bytes"] += shardwrite.write_sample(
                w["tar"], p["key"], {p["member"]: p["json"], "feats.npy": _npy(feats)}
            )
            w["samples"] += p["n"]
            w["sentences"] += sample_sentences(p["member"], p["json"])
        self.pending = []


def extract_split(args, tower: VisionTower, task: str, split: str, device, out: Path) -> dict:
    """One split's feature shards into the local folder `out` (the --out root, or its staging
    folder when --out is a URL: vlds.data.remote.staged)."""
    src = load_index(args.shards, task, split)
    if src.features is not None:
        raise DataError(f"{args.shards}/{task}/{split} already holds features, not pixels")
    kind = get_task(task).kind
    feats_meta = {
        "kind": "frames" if kind == "video" else "grid",
        "vision": args.vision,
        "pretrained": args.vision_pretrained,
        "grid_pool": args.grid_pool,
        "resnet": tower.is_resnet,
        "dim": tower.pooled_dim if kind == "video" else tower.grid_dim,
        "dtype": args.dtype,
        "image_size": tower.image_size,
    }
    if kind != "video":  # images only: frames were resized when they were written
        feats_meta["resize"] = args.resize  # checked against data.image_resize
    if not args.vision_pretrained:
        feats_meta["seed"] = args.seed
    index_file = remote.join(args.shards, task, f"{split}.index.json")
    spec = {
        "source": remote.redact(index_file if remote.is_url(index_file) else index_file.resolve()),
        "source_sha256": hashlib.sha256(remote.read_bytes(index_file)).hexdigest(),
        "features": feats_meta,
        "jpeg_draft": not args.no_draft,
    }
    out_dir = out / task
    done = shardwrite.begin_split(out_dir, split, spec, overwrite=args.overwrite)
    urls = [str(p).rsplit("/", 1)[-1] for p, _ in src.shards]
    todo = [(k, p) for k, (p, _) in enumerate(src.shards) if k not in done]
    feed = ShardFeed(
        todo,
        Preprocess(
            tower.image_size,
            features="false",
            draft=not args.no_draft,
            resize=args.resize,
        ),
    )
    loader = torch.utils.data.DataLoader(feed, batch_size=None, num_workers=args.workers)
    ex = Extractor(tower, kind, args.batch_size, np.dtype(args.dtype), device)
    writers, stats = {}, dict(done)
    from tqdm import tqdm

    bar = tqdm(
        total=sum(n for _, n in src.shards),
        initial=sum(s["items"] for s in done.values()),
        unit="sample",
        desc=f"{task}/{split}",
        disable=args.quiet,
    )
    for item in loader:
        k = item["shard"]
        if k not in writers:
            cm = shardwrite.open_shard(out_dir / urls[k])
            writers[k] = {"cm": cm, "tar": cm.__enter__(), "samples": 0, "sentences": 0, "bytes": 0}
        if "end" not in item:
            ex.pending.append(item)
            if sum(p["visual"].shape[0] for p in ex.pending) >= args.batch_size:
                ex.flush(writers)
            continue
        ex.flush(writers)  # the shard's last samples, before it is closed
        w = writers.pop(k)
        w["cm"].__exit__(None, None, None)
        s = {
            "shard": k,
            "url": urls[k],
            "samples": w["samples"],
            "sentences": w["sentences"],
            "items": src.shards[k][1],
            "bytes": w["bytes"],
            "file_bytes": (out_dir / urls[k]).stat().st_size,
            "skipped": {"undecodable sample": item["bad"]} if item["bad"] else {},
        }
        shardwrite.record_shard(out_dir, split, s)
        stats[k] = s
        bar.update(s["items"])
    bar.close()
    kept = [stats[k] for k in sorted(stats) if stats[k]["samples"]]
    shardwrite.write_index(out_dir, task, split, kept, features=feats_meta)
    # synthetic data's own tokenizer, when there is one
    remote.fetch_dir(remote.join(args.shards, "tokenizer"), out / "tokenizer")
    summary = shardwrite.summarize([stats[k] for k in sorted(stats)])
    return summary | {"resumed_shards": len(done)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vlds.data.prep.extract", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--shards", required=True, help="pixel shards root (folder or URL)")
    p.add_argument("--tasks", required=True, help="comma-separated, e.g. vqa,gqa,nlvr,caption")
    p.add_argument("--splits", default="train,val")
    p.add_argument("--out", required=True, help="root for the feature shards: a folder or a URL")
    p.add_argument("--vision", default="RN101", help="open_clip model name")
    p.add_argument("--vision-pretrained", default="openai", help='"openai", a file, or ""')
    p.add_argument("--grid-pool", type=int, default=6, help="ResNet grid -> g x g tokens")
    p.add_argument("--batch-size", type=int, default=256, help="images / frames per forward")
    p.add_argument("--workers", type=int, default=2, help="pixel-decoding processes")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0, help="random tower init (= train.seed)")
    p.add_argument("--no-draft", action="store_true", help="decode JPEGs fully (no draft mode)")
    p.add_argument(
        "--resize",
        choices=("squash", "crop"),
        default="squash",
        help="images to size x size: squash (the reference) or shorter side + centre crop; "
        "training checks it against data.image_resize",
    )
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    t0 = time.perf_counter()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    try:
        for t in tasks:
            get_task(t)
        for t in tasks:  # every input exists before any work
            for s in splits:
                load_index(args.shards, t, s)
        device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu")
            if args.device == "auto"
            else args.device
        )
        # the tower a run with --train.seed=seed builds (build_tower seeds torch itself)
        cfg = build_config(
            "tiny",
            {
                "model.vision": args.vision,
                "train.seed": args.seed,
                "model.vision_pretrained": args.vision_pretrained,
                "model.grid_pool": args.grid_pool,
            },
        )
        tower = build_tower(cfg).to(device)
        rows = []
        with remote.staged(args.out) as out:
            for t in tasks:
                for s in splits:
                    rows.append((t, s, extract_split(args, tower, t, s, device, out)))
    except (DataError, shardwrite.ShardError, ValueError, remote.RemoteError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if not args.quiet:
        shardwrite.print_summary(rows, time.perf_counter() - t0)
        print(f"-> {args.out}: train with --data.root={args.out} (features are auto-detected)")
    return {(t, s): r for t, s, r in rows}


if __name__ == "__main__":
    main()
