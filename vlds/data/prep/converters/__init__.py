"""Readers of the public releases, one module per family: `images.py` (VQAv2, GQA, NLVR2, COCO
Karpathy captions) and `value.py` (the VALUE video tasks TVQA, How2QA, TVC, YC2C).

A converter turns annotation files into a deterministic list of `Item`s: the json record that
`vlds.data.tasks` defines (with "task" and "id") plus references to its visual payload inside
the user's image/video folders or archives (`sources.Sources`). It never reads pixels: the
shard writer (`vlds.data.prep.shards`) reads, checks and writes them in parallel. Items that cannot
be planned (no annotation, image not found, a path outside the dataset root, ...) are counted
under a reason in `skipped` instead. A record without its label (answer, caption) is planned
with `unlabelled` set: the writer keeps such records only when no record of the split has
one, and marks the split unlabelled (a test split, predicted but never trained or scored).
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from vlds.data.prep.converters.sources import Ref, Sources


@dataclass(frozen=True)
class Item:
    key: str  # tar key: no '.' or '/'
    rec: dict  # the json record, exactly the fields of vlds.data.tasks + "task" and "id"
    images: tuple[tuple[str, Ref], ...] = ()  # (member prefix: "" | "img0" | "img1", image)
    video: Ref | None = None  # a video file to sample frames from
    window: tuple[float, float] | None = None  # decode only this time window (seconds)
    feats: Ref | None = None  # a per-video feature file ((T, D) frame features)
    notes: tuple[str, ...] = ()  # repairs made while planning ("ts repaired: NaN -> ..."), counted
    # rec lacks its label (vlds.data.tasks.LABEL): the skip reason used when other records of
    # the split have theirs; when none has, the split is written unlabelled (a test split)
    unlabelled: str = ""


@dataclass(frozen=True)
class Converter:
    name: str  # CLI name (vqa, gqa, nlvr2, coco-caption, tvqa, how2qa, tvc, yc2c)
    task: str  # registry name = output folder (vqa, gqa, nlvr, caption, ...)
    kind: str  # "image" | "video"
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    inputs: Callable[[argparse.Namespace], list[str]]  # annotation files (fingerprinted)
    plan: Callable[[argparse.Namespace, dict[str, Sources], Counter], Iterator[Item]]
    sources: tuple[str, ...] = field(default=())  # argument names holding Sources paths


def safe_key(text: str) -> str:
    return str(text).replace(".", "_").replace("/", "_").replace("\\", "_")


def converters() -> dict[str, Converter]:
    from vlds.data.prep.converters import images, value

    table = {c.name: c for c in (*images.CONVERTERS, *value.CONVERTERS)}
    return table


# registry names accepted as aliases of the CLI names
ALIASES = {"nlvr": "nlvr2", "caption": "coco-caption"}
