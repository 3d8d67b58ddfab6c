"""The command line: generate (or find) the cached shapes world and print a table of its shards.

python -m vlds.data.synthetic --out /tmp/vlds --seed 1 --train-per-task 200
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

from vlds.data import synthetic
from vlds.data.synthetic.package import ensure_synthetic
from vlds.data.synthetic.world import SyntheticSpec
from vlds.data.tasks import ALL_TASKS


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m vlds.data.synthetic", description=synthetic.__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--out", type=Path, help="cache root (default $VLDS_CACHE or ~/.cache/vlds)"
    )
    parser.add_argument("--workers", type=int, help="processes (default: all cores)")
    for f in dataclasses.fields(SyntheticSpec):
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default
        )
    args = parser.parse_args(argv)
    spec = SyntheticSpec(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(SyntheticSpec)}
    )
    start = time.perf_counter()
    path = ensure_synthetic(args.out, spec, workers=args.workers)
    seconds = time.perf_counter() - start
    print(f"{'task':<8} {'split':<6} {'samples':>8} {'shards':>7} {'bytes':>13}")
    total = 0
    for task in ALL_TASKS:
        for split in ("train", "val"):
            index = json.loads((path / task / f"{split}.index.json").read_text())
            size = sum((path / task / s["url"]).stat().st_size for s in index["shards"])
            total += size
            print(f"{task:<8} {split:<6} {index['total']:>8} {len(index['shards']):>7} {size:>13,}")
    print(f"{path}: {total / 1e6:.1f} MB of shards, ready in {seconds:.1f} s")
    return path


if __name__ == "__main__":
    main()
