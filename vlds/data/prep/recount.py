"""Add the per-shard sentence counts to split indexes written before writers recorded them.

    python -m vlds.data.prep.recount /data/vl-shards                # every {task}/{split}
    python -m vlds.data.prep.recount /data/vl-shards --tasks caption --splits train

Training with `data.caption_samples=sentence` (the default: one sample per reference
sentence, as the reference trains captions) sizes its epoch from the index's "sentences"
counts, without reading the shards. An index that lacks them is refused with this command as
the fix: it reads only the json members of each shard (payloads are skipped by seeking, so a
COCO caption split takes seconds), counts `record_sentences` per shard and rewrites the index
atomically, everything else unchanged. Indexes that have the counts are left alone.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from vlds.data.shardio import (
    GROUP,
    ShardError,
    SkipCounter,
    read_samples,
    sample_sentences,
)


def needs_recount(index_file: Path) -> bool:
    return any("sentences" not in s for s in json.loads(index_file.read_text())["shards"])


def recount(index_file: Path) -> dict:
    """Add "sentences" to every shard entry of `index_file` (json members only); returns the
    rewritten index. A shard holding a different number of records than its entry says is
    refused: the shards changed since the index was written."""
    index_file = Path(index_file)
    index = json.loads(index_file.read_text())
    for entry in index["shards"]:
        path = index_file.parent / entry["url"]
        errors, records, sentences = SkipCounter(), 0, 0
        for s in read_samples(str(path), errors, only=frozenset({"json"}), expand=False):
            member = GROUP if GROUP in s else "json"
            records += len(json.loads(s[member])) if member == GROUP else 1
            sentences += sample_sentences(member, s[member])
        if errors.count or records != entry["samples"]:
            raise ShardError(
                f"{path}: {records} records read ({errors.count} bad), its index "
                f"{index_file} lists {entry['samples']}; re-write the split with its shard "
                f"writer instead of recounting it"
            )
        entry["sentences"] = sentences
    tmp = index_file.with_name(index_file.name + ".tmp")
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(tmp, index_file)
    return index


def recount_root(root: Path, tasks=None, splits=None, quiet: bool = False) -> list[Path]:
    """Recount every {task}/{split}.index.json under `root` that lacks the counts (of the
    given tasks and splits only, when given); returns the files rewritten."""
    done = []
    for f in sorted(Path(root).glob("*/*.index.json")):
        task, split = f.parent.name, f.name[: -len(".index.json")]
        if (tasks and task not in tasks) or (splits and split not in splits):
            continue
        if needs_recount(f):
            index = recount(f)
            done.append(f)
            if not quiet:
                n = sum(s["sentences"] for s in index["shards"])
                print(f"{f}: {index['total']} records, {n} sentences")
    return done


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m vlds.data.prep.recount", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("root", help="data root holding {task}/{split}.index.json")
    p.add_argument("--tasks", default="", help="comma-separated; default: every task folder")
    p.add_argument("--splits", default="", help="comma-separated; default: every split")
    args = p.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    splits = [s for s in args.splits.split(",") if s]
    if not recount_root(Path(args.root), tasks, splits):
        print(f"every index under {args.root} already has its sentence counts")


if __name__ == "__main__":
    main()
