"""Index tar shards written by other tools, so that vlds trains on them.

    python -m vlds.data.prep.index /data/foreign vqa train
    python -m vlds.data.prep.index /data/foreign caption val --shards 'coco-val-*.tar'

Any WebDataset writer (webdataset.TarWriter, img2dataset, tar itself) that stores each sample
as `{key}.json` (the record, with the task's fields: docs/data.md) plus a visual payload vlds
reads (`{key}.jpg|jpeg|png`, `.img0.*`/`.img1.*` for NLVR2, `.frames.npy[.gz]`, `.feats.npy`)
makes shards vlds can train on; what they lack is `{root}/{task}/{split}.index.json`, the
per-shard sample and sentence counts training sizes its epoch from. This command writes it.

Shards: those matching `--shards` (globs relative to {root}/{task}, repeatable), else the
folder's `{split}-*.tar[.gz]` when there are any, else every `*.tar` / `*.tar.gz` there that no
other split's index lists; any names are fine, the index lists them (in name order). Each shard
is read once, json members only (payloads are listed, never read), and every record is checked
as training will check it (vlds.data.decode.check_record): a record lacking a field its task
needs, a sample without a payload the task reads, a record of another task, a duplicate id or
a shard another split already lists is reported with its shard, key and field, and nothing is
written. A split whose records all lack the label field (a test split) is indexed as
unlabelled; feature shards (`feats.npy` only) need `--features JSON` naming the tower, as
vlds.data.prep.extract records it. The index is written atomically; an existing one that
differs is kept unless --force. Exit codes: 0 written or unchanged, 2 refused.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import Counter
from pathlib import Path

from vlds.data.shardio import (
    ALLOWED_EXTS,
    GROUP,
    DataError,
    ShardError,
    record_sentences,
    tar_files,
)

RECORDS = frozenset({"json", GROUP})
# the members that give each task kind its pixels (any one of these sets)
PIXELS = {
    "image": ({"jpg"}, {"jpeg"}, {"png"}),
    "pair": tuple({f"img0.{a}", f"img1.{b}"} for a in ("jpg", "png") for b in ("jpg", "png")),
    "video": ({"frames.npy"}, {"frames.npy.gz"}),
}
SHOWN = 10  # problems printed in full


def tar_samples(path: Path, other: Counter):
    """(key, {ext: bytes | None}) per tar sample, grouped as vlds.data.shardio.read_samples
    groups them (consecutive members sharing the name up to the first dot of the file name;
    only ALLOWED_EXTS): records read, payload members listed by name and seeked over. Members
    of other extensions are counted in `other` by extension."""

    def select(name: str) -> bool:
        if name.startswith("/") or ".." in name.split("/"):
            raise ShardError(f"member {name!r} escapes the shard")
        return ext_of(name) in RECORDS

    key, members = None, {}
    with open(path, "rb") as raw:
        f = gzip.GzipFile(fileobj=raw) if raw.peek(2)[:2] == b"\x1f\x8b" else raw
        for name, data, _ in tar_files(f, str(path), select, unselected=True):
            ext = ext_of(name)
            if ext not in ALLOWED_EXTS:
                other[ext or "(no extension)"] += 1
                continue
            head, _, base = name.rpartition("/")
            stem = base.partition(".")[0]
            k = f"{head}/{stem}" if head else stem
            if k != key and members:
                yield key, members
                members = {}
            key = k
            members[ext] = data
    if members:
        yield key, members


def ext_of(name: str) -> str:
    return name.rsplit("/", 1)[-1].partition(".")[2].lower()


def find_shards(task_dir: Path, split: str, patterns: list[str]) -> list[Path]:
    """The shards to index (see the module docstring), in name order."""
    if patterns:
        found = sorted({p for pat in patterns for p in task_dir.glob(pat) if p.is_file()})
        if not found:
            raise ShardError(f"no file in {task_dir} matches --shards {' '.join(patterns)}")
        return found
    tars = sorted(p for ext in ("*.tar", "*.tar.gz") for p in task_dir.glob(ext) if p.is_file())
    named = [p for p in tars if p.name.startswith(f"{split}-")]
    if named:
        return named
    taken = dict(other_splits(task_dir, split))
    free = [p for p in tars if p.resolve() not in taken]
    if not free:
        raise ShardError(
            f"no .tar or .tar.gz shards in {task_dir} that another split's index does not list; "
            f"put the shards there or name them with --shards GLOB"
        )
    return free


def other_splits(task_dir: Path, split: str):
    """(resolved shard path, split) of every other split's index in the folder."""
    for f in sorted(task_dir.glob("*.index.json")):
        other = f.name[: -len(".index.json")]
        if other != split:
            for s in json.loads(f.read_text()).get("shards", []):
                yield (task_dir / s["url"]).resolve(), other


def missing_payload(task: str, kind: str, members: dict, features: bool) -> str | None:
    """What a sample lacks for its task to be trained on, or None."""
    if features:
        return None if "feats.npy" in members else "no feats.npy member (--features was given)"
    if "feats.npy" in members or any(want <= members.keys() for want in PIXELS[kind]):
        return None
    names, what = {
        "image": ("jpg, jpeg or png", "its image"),
        "pair": ("img0.(jpg|png) and img1.(jpg|png)", "its two images"),
        "video": ("frames.npy or frames.npy.gz", "its frames"),
    }[kind]
    return f"no {names} member (a {task} sample needs {what})"


class Problems:
    """What makes a split untrainable: counted by kind, the first SHOWN given in full."""

    def __init__(self):
        self.shown: list[str] = []
        self.kinds: Counter = Counter()

    def __call__(self, kind: str, where: str, what: str) -> None:
        self.kinds[kind] += 1
        if len(self.shown) < SHOWN:
            self.shown.append(f"{where}: {what}")

    def raise_any(self, task_dir: Path, task: str, split: str) -> None:
        if not self.kinds:
            return
        more = sum(self.kinds.values()) - len(self.shown)
        counts = ", ".join(f"{n} {k}" for k, n in self.kinds.most_common())
        raise DataError(
            f"{task_dir}: the shards of split {split!r} cannot be trained on as they are "
            f"({counts}); nothing written.\n  "
            + "\n  ".join(self.shown)
            + (f"\n  ... and {more} more" if more > 0 else "")
            + f'\nEvery {task} record needs "task": "{task}", an "id" and its task\'s '
            f"fields (docs/data.md, 'Tasks: prompts, targets, record fields'), and every sample "
            f"a payload member vlds reads; fix the writer or the shards and re-run"
        )


def check_records(task: str, recs, where: str, problem) -> list[dict]:
    """The records of one tar sample that training can use; the others reported."""
    from vlds.data.decode import check_record

    good = []
    for rec in recs:
        if not isinstance(rec, dict):
            problem("bad records", where, f"the record is a {type(rec).__name__}, not an object")
        elif "task" not in rec:
            problem("records without a field", where, "the record lacks the field 'task'")
        elif rec["task"] != task:
            problem("records of another task", where, f"a {rec['task']!r} record in {task}/")
        else:
            try:
                check_record(rec)
                good.append(rec)
            except DataError as e:
                cause = e.__context__  # check_record raises `from None`: the lookup that failed
                if isinstance(cause, KeyError):
                    what = f"the record lacks the field {cause.args[0]!r}"
                    problem("records without a field", where, what)
                else:
                    problem("bad records", where, f"the record has a bad field: {cause!r}")
    return good


def index_split(root: Path, task: str, split: str, patterns=(), features=None) -> dict:
    """Read and check the shards; returns {"shards": [{"url", "samples", "sentences"}],
    "labelled": bool, "ignored": Counter of other members' extensions}, or raises DataError
    listing the problems found (ShardError for a folder or shard set it refuses)."""
    from vlds.data.tasks import LABEL, get_task

    kind = get_task(task).kind
    label = LABEL[task]
    task_dir = Path(root) / task
    if not task_dir.is_dir():
        raise ShardError(f"{task_dir} does not exist; put the task's shards in {root}/{task}/")
    if (task_dir / f"{split}.manifest.json").exists():
        raise ShardError(
            f"{task_dir}/{split}.manifest.json: a vlds shard writer is writing (or was killed "
            f"writing) this split; re-run that writer, which writes the index itself"
        )
    shards = find_shards(task_dir, split, list(patterns))
    listed = dict(other_splits(task_dir, split))
    problem, ignored = Problems(), Counter()
    ids: dict[str, str] = {}
    labelled, unlabelled, feature_samples = 0, [], 0
    entries = []
    for path in shards:
        url = path.relative_to(task_dir).as_posix()
        if path.resolve() in listed:
            problem("shards of another split", url, f"split {listed[path.resolve()]!r} lists it")
            continue
        n = sentences = 0
        try:
            for key, members in tar_samples(path, ignored):
                where = f"{url}: sample {key}"
                if not RECORDS & members.keys():
                    got = ", ".join(sorted(members))
                    problem("samples without a record", where, f"no json record (has {got})")
                    continue
                if lack := missing_payload(task, kind, members, features is not None):
                    problem("samples without a payload", where, lack)
                feature_samples += "feats.npy" in members
                member = GROUP if GROUP in members else "json"
                try:
                    recs = json.loads(members[member])
                except ValueError as e:
                    problem("bad records", where, f"{key}.{member} is not JSON ({e})")
                    continue
                recs = recs if member == GROUP else [recs]
                if not isinstance(recs, list) or not recs:
                    problem("bad records", where, f"{key}.{GROUP} is not a non-empty list")
                    continue
                n += len(recs)  # what read_samples yields, and what the stream counts against
                for rec in check_records(task, recs, where, problem):
                    if label in rec:
                        labelled += 1
                    else:
                        unlabelled.append(where)
                    rid = str(rec["id"])
                    if rid in ids:
                        problem("repeated ids", where, f"id {rid!r} is also {ids[rid]}'s")
                    ids.setdefault(rid, where)
                    sentences += record_sentences(rec)
        except (OSError, EOFError, ValueError) as e:  # ShardError too: a broken shard
            problem("unreadable shards", url, f"unreadable: {e}")
            continue
        entries.append({"url": url, "samples": n, "sentences": sentences})
    if labelled and unlabelled:
        problem(
            "records without a field",
            unlabelled[0],
            f"the record lacks the field {label!r} ({len(unlabelled)} of "
            f"{labelled + len(unlabelled)} records lack it; a labelled split needs it in each)",
        )
    if feature_samples and features is None:
        problem(
            "feature samples",
            f"{task}/{split}",
            f"{feature_samples} sample(s) carry feats.npy: index feature shards with --features "
            f'JSON naming the tower that made them (the "features" entry that '
            f"vlds.data.prep.extract writes)",
        )
    if not problem.kinds and not sum(e["samples"] for e in entries):
        dotted = any(e.endswith(("json", "jpg", "png")) for e in ignored)
        why = " (keys end at the first dot of a member's name, as in webdataset)" if dotted else ""
        problem("empty splits", f"{task}/{split}", f"no sample with a json record{why}")
    problem.raise_any(task_dir, task, split)
    return {"shards": entries, "labelled": not unlabelled, "ignored": ignored}


def write(root: Path, task: str, split: str, found: dict, features, force: bool) -> str:
    """Write the index unless an identical one exists; "written" or "unchanged". A different
    existing index is refused without `force`."""
    from vlds.data.prep.shardwrite import write_index

    extra = {} if found["labelled"] else {"labelled": False}
    if features is not None:
        extra["features"] = features
    path = Path(root) / task / f"{split}.index.json"
    if path.exists():
        old = json.loads(path.read_text())
        same = old.get("shards") == found["shards"] and all(
            old.get(k) == extra.get(k) for k in ("labelled", "features")
        )
        if same:
            return "unchanged"
        if not force:
            raise ShardError(
                f"{path} exists and differs from the shards found ({len(old.get('shards', []))} "
                f"shard(s), {old.get('total')} samples listed; now {len(found['shards'])}, "
                f"{sum(s['samples'] for s in found['shards'])}); pass --force to replace it"
            )
    write_index(path.parent, task, split, found["shards"], **extra)
    return "written"


def parse_features(text: str | None, task: str) -> dict | None:
    if not text:
        return None
    from vlds.data.tasks import get_task

    try:
        feats = json.loads(text)
    except ValueError as e:
        raise ShardError(f"--features is not JSON: {e}") from None
    want = "frames" if get_task(task).kind == "video" else "grid"
    missing = [k for k in ("kind", "vision", "pretrained") if k not in feats]
    if missing or feats.get("kind") != want:
        raise ShardError(
            f"--features needs at least kind ({want!r} for {task}), vision and pretrained, "
            f'e.g. \'{{"kind": "{want}", "vision": "RN101", "pretrained": "openai", '
            f'"grid_pool": 6, "resize": "squash"}}\''
        )
    return feats


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vlds.data.prep.index",
        description=__doc__.split("\n\n")[0],
        epilog="Then train with --data.root=ROOT (docs/data.md, 'Shards written by other tools').",
    )
    p.add_argument("root", help="data root: the shards are in ROOT/TASK/")
    p.add_argument("task", help="task registry name (vqa, gqa, nlvr, caption, tvqa, ...)")
    p.add_argument("split", help="split to index (train, val, test, ...): writes SPLIT.index.json")
    p.add_argument(
        "--shards",
        nargs="+",
        default=[],
        metavar="GLOB",
        help="shard files relative to ROOT/TASK (globs; default: SPLIT-*.tar[.gz], else every "
        "unindexed .tar/.tar.gz there)",
    )
    p.add_argument("--features", help="feature shards: the index's 'features' entry, as JSON")
    p.add_argument("--force", action="store_true", help="replace an existing, different index")
    return p


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    root = Path(args.root)
    try:
        features = parse_features(args.features, args.task)
        found = index_split(root, args.task, args.split, args.shards, features)
        done = write(root, args.task, args.split, found, features, args.force)
    except (DataError, ShardError, ValueError) as e:  # ValueError: an unknown task
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    shards = found["shards"]
    if found["ignored"]:
        exts = ", ".join(f"{n} .{e}" for e, n in found["ignored"].most_common())
        print(f"members vlds does not read (left alone): {exts}")
    print(
        f"{root / args.task / args.split}.index.json {done}: {len(shards)} shard(s), "
        f"{sum(s['samples'] for s in shards)} samples, {sum(s['sentences'] for s in shards)} "
        f"sentences{'' if found['labelled'] else ', unlabelled'}; train with "
        f"--data.root={root}"
    )
    return found


if __name__ == "__main__":
    main()
