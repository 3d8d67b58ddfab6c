"""The shapes world on disk: WebDataset shards and their indexes, the spec hash, and the cached
data set that ``ensure_synthetic()`` generates once (under a lock) and then reuses.

    shapes-<hash>/{task}/{split}-00000.tar + {split}.index.json    every task in ALL_TASKS
    shapes-<hash>/tokenizer/spiece.model      T5Tokenizer.from_pretrained(dir, extra_ids=0)
    shapes-<hash>/COMPLETE                    json with the spec; written last

Shard writing runs in a spawn pool, so ``_write_shard`` stays a module-level function.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import socket
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

from vlds.data.prep.shardwrite import SCHEMA_VERSION, shard_url, write_index, write_sample
from vlds.data.shardio import record_sentences
from vlds.data.synthetic.language import make_sample
from vlds.data.synthetic.tokenizer import train_tokenizer
from vlds.data.synthetic.world import GENERATOR_VERSION, SyntheticSpec, _split_sizes
from vlds.data.tasks import ALL_TASKS, get_task

log = logging.getLogger("vlds")

# --- shards -------------------------------------------------------------------------------


def _write_shard(job: tuple) -> tuple[int, int]:
    """Write one shard; returns (samples, sentences) for its index entry."""
    root, task, split, shard, start, stop, spec = job
    sentences = 0
    # Plain tarfile in webdataset's layout ({key}.{ext}, exts sorted): importing webdataset pulls
    # in torch, seconds per worker, and its TarWriter stamps the current time.
    with tarfile.open(
        Path(root) / task / f"{split}-{shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT
    ) as tar:
        for i in range(start, stop):
            sample = make_sample(task, split, i, spec)
            key = sample.pop("__key__")
            sentences += record_sentences(sample["json"])
            sample["json"] = json.dumps(sample["json"]).encode()
            write_sample(tar, key, sample)
    return stop - start, sentences


def _shard_jobs(root: Path, task: str, split: str, n: int, spec: SyntheticSpec) -> list[tuple]:
    step = spec.samples_per_shard
    starts = range(0, n, step)
    return [(str(root), task, split, s, a, min(n, a + step), spec) for s, a in enumerate(starts)]


def _write_index(
    root: Path, task: str, split: str, jobs: list[tuple], sentences: dict[tuple, int]
) -> dict:
    """`sentences`: {(task, split, shard): count}, what `_write_shard` returned."""
    shards = [
        {
            "url": shard_url(split, j[3]),
            "samples": j[5] - j[4],
            "sentences": sentences[task, split, j[3]],
        }
        for j in jobs
    ]
    return write_index(Path(root) / task, task, split, shards)


def write_task_split(root: Path, task: str, split: str, n: int, spec: SyntheticSpec) -> dict:
    """Write samples 0..n-1 as {root}/{task}/{split}-NNNNN.tar plus {split}.index.json (urls
    relative to the task folder); returns the index."""
    get_task(task)
    (Path(root) / task).mkdir(parents=True, exist_ok=True)
    jobs = _shard_jobs(root, task, split, n, spec)
    sentences = {(task, split, j[3]): _write_shard(j)[1] for j in jobs}
    return _write_index(root, task, split, jobs, sentences)


# --- the cached data set ------------------------------------------------------------------


def spec_hash(spec: SyntheticSpec) -> str:
    key = json.dumps([GENERATOR_VERSION, SCHEMA_VERSION, dataclasses.asdict(spec)], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:10]


def _is_complete(path: Path) -> bool:
    return (path / "COMPLETE").is_file()


def cache_root() -> Path:
    """Where the embedded data, tower and language models are cached: $VLDS_CACHE or
    ~/.cache/vlds."""
    return Path(os.environ.get("VLDS_CACHE") or Path.home() / ".cache" / "vlds").expanduser()


@contextlib.contextmanager
def file_lock(path: Path):
    """Best-effort inter-process lock, so ranks on one host wait instead of all generating. On
    file systems without flock the atomic rename alone still keeps the result whole."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with open(path, "a") as f:
        with contextlib.suppress(OSError):
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def build_once(final: Path, ready: Callable[[Path], bool], build: Callable[[Path], None]) -> Path:
    """``final`` (a file or a folder), built first unless ``ready(final)``: once per host, since
    other processes wait on a lock beside it, and whole or not at all: ``build(tmp)`` fills a
    temporary sibling named ``<name>.tmp-<host>-<pid>`` that is renamed into place, and removed
    if the build fails. Hosts sharing a file system each build; the loser of the rename keeps
    the winner's copy. The shapes world, the embedded tower and language models are cached so.
    A ``final`` that exists but is not ready (no build of this function leaves one: something
    else wrote or pruned it) is moved aside and removed first, so that it cannot block the
    rename after a build that may take minutes."""
    if ready(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.parent / f"{final.name}.lock"):
        if ready(final):  # another process finished while we waited
            return final
        tag = f"{socket.gethostname()}-{os.getpid()}"
        if final.exists() or final.is_symlink():
            log.warning("%s is incomplete (not written whole by vlds): building it again", final)
            stale = final.with_name(f"{final.name}.stale-{tag}")
            os.replace(final, stale)
            _remove(stale)
        tmp = final.with_name(f"{final.name}.tmp-{tag}")
        _remove(tmp)
        try:
            build(tmp)
            try:
                os.replace(tmp, final)
            except OSError:  # a folder another host renamed into place first
                if not ready(final):
                    raise
        finally:
            _remove(tmp)
    return final


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove_stale_temps(base: Path, name: str) -> None:
    # Temp folders are named {name}.tmp-{host}-{pid}; one whose process on this host is gone is
    # the leftover of a killed run. Other hosts' folders are left alone (their pids mean nothing).
    host = socket.gethostname()
    for tmp in base.glob(f"{name}.tmp-*"):
        owner, _, pid = tmp.name[len(name) + len(".tmp-") :].rpartition("-")
        if owner == host and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _generate(out: Path, spec: SyntheticSpec, workers: int | None) -> None:
    from tqdm import tqdm

    jobs, splits = [], {}
    for task in ALL_TASKS:
        (out / task).mkdir(parents=True)
        for split, n in _split_sizes(task, spec).items():
            splits[task, split] = _shard_jobs(out, task, split, n, spec)
            jobs += splits[task, split]
    total = sum(j[5] - j[4] for j in jobs)
    if workers is None:  # a pool costs ~1 s to start: only worth it for real sizes
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        workers = 1 if total < 2000 else min(cores or 1, len(jobs))
    # Costliest shards first (clips render 8 frames, NLVR two images) so the pool ends together.
    cost = {"nlvr": 2, "tvqa": 4, "how2qa": 4, "tvc": 4, "yc2c": 4}
    jobs.sort(key=lambda j: -(j[5] - j[4]) * cost.get(j[1], 1))
    sentences = {}  # (task, split, shard) -> count, for the indexes
    with tqdm(total=total, unit="sample", desc="shapes world", smoothing=0) as bar:
        if workers <= 1:
            for job in jobs:
                n, sentences[job[1:4]] = _write_shard(job)
                bar.update(n)
        else:
            # spawn, not fork: the caller may already hold threads (torch, a data loader).
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for job, (n, counted) in zip(jobs, pool.imap(_write_shard, jobs), strict=True):
                    sentences[job[1:4]] = counted
                    bar.update(n)
        bar.set_postfix_str("tokenizer")
        train_tokenizer(out, spec)
    for (task, split), split_jobs in splits.items():
        _write_index(out, task, split, split_jobs, sentences)
    marker = {
        "spec": dataclasses.asdict(spec),
        "generator_version": GENERATOR_VERSION,
        "schema_version": SCHEMA_VERSION,
        "tasks": list(ALL_TASKS),
    }
    (out / "COMPLETE").write_text(json.dumps(marker, indent=1) + "\n")  # last: marks it whole


def ensure_synthetic(
    root: Path | None = None,
    spec: SyntheticSpec = SyntheticSpec(),  # noqa: B008 (frozen, so immutable)
    tasks: Sequence[str] = ALL_TASKS,
    workers: int | None = None,
) -> Path:
    """Return {root}/shapes-<spec hash>, generating it first if needed (root defaults to
    $VLDS_CACHE or ~/.cache/vlds). All eight tasks and the tokenizer are always written, so the
    folder for a spec is the same whatever ``tasks`` asks for; ``tasks`` is only validated.

    Generation goes to a temp sibling that is renamed into place once complete, so a killed run
    never leaves a folder that looks finished. Racing processes on one host queue on a lock;
    across hosts each generates and the loser of the rename discards its copy (same bytes)."""
    for task in tasks:
        get_task(task)
    final = Path(root or cache_root()).expanduser() / f"shapes-{spec_hash(spec)}"

    def generate(tmp: Path) -> None:
        if final.exists():
            raise RuntimeError(f"{final} exists without a COMPLETE marker; delete it to regenerate")
        _remove_stale_temps(final.parent, final.name)
        _generate(tmp, spec, workers)

    path = build_once(final, _is_complete, generate)
    _add_sentence_counts(path)
    return path


def _add_sentence_counts(path: Path) -> None:
    """A world cached before the indexes recorded sentence counts gets them, once, under its
    lock (json members only: seconds). Regenerating it instead would also retrain the language
    model cached inside it."""
    from vlds.data.prep.recount import needs_recount, recount

    if any(needs_recount(f) for f in path.glob("*/*.index.json")):
        with file_lock(path.parent / f"{path.name}.lock"):
            for f in sorted(path.glob("*/*.index.json")):
                if needs_recount(f):
                    recount(f)
