"""Collective operations and host reads per training step of vlds' training loop, on 2 CPU ranks.

    python bench/collectives.py                                   # ZeRO-2 and ZeRO-3, preset tiny
    python bench/collectives.py --zero 3 --threshold 1e6 1e7 --preset t5-base-random \\
        --batch 2 --warmup 2 --steps 4                            # the persistence threshold
    git worktree add /tmp/before <commit>
    python bench/collectives.py --before /tmp/before              # before/after columns

What is counted: every call of a torch.distributed collective (all_reduce, all_gather,
all_gather_into_tensor, reduce_scatter(_tensor), broadcast, barrier, the *_object ones,
all_to_all, reduce, gather, scatter, send/recv, ...) on each rank during `--steps` training
steps of the real loop (vlds.train.run: the Trainer, its DeepSpeed engine from ds_configs/,
the embedded shapes world), after `--warmup` steps. Each rank's process replaces those
functions in torch.distributed (and torch.distributed.distributed_c10d) with counting wrappers
before DeepSpeed or vlds is imported: DeepSpeed's comm backend (deepspeed/comm/torch.py) looks
`torch.distributed.<fn>` up at call time, and binds its all-gather / reduce-scatter functions
when the process group is set up, after the wrappers are in place. A collective that calls
another one inside torch (all_gather_object) counts once, as the outer call. Each call is put
down to its caller: the first frame outside torch and deepspeed/comm, a vlds/ frame ("vlds")
or a deepspeed/ frame ("deepspeed"); its call site is kept in the JSON.

A step is one iteration of the training loop: from entering Trainer.train_step to entering the
next one (the loop's own bookkeeping after the step included); the run stops as Trainer.finish
is entered (no final checkpoint or evaluation). Evaluation and checkpoints are off during the
steps (eval.every=0, train.save_every=0, train.save_every_minutes=0, fewer steps than an epoch)
and every step is logged (train.log_every=1). Host reads: calls of Tensor.item, .tolist,
bool(), float() and int() on a tensor in the same steps, outside the data loader's __next__
(each one is a device-to-host copy and a sync when the tensor lives on a GPU; on CPU they are
only counted). MB/step: the largest tensor (or tensor list) argument of each collective, summed.

Warm-up: at least 2 steps under ZeRO-3, which records its parameter-fetch trace at step 1 and
checks it against rank 0's at step 2 (broadcasts and hundreds of .item() calls, once). A ZeRO-3
parameter below stage3_param_persistence_threshold elements (--threshold: extra ZeRO-3 runs
with it raised) stays whole on every rank and is re-gathered after each optimizer step, one
all_gather_into_tensor per tensor, frozen ones included; the larger ones are fetched in
coalesced buckets.

--before DIR runs the same count on another checkout (a `git worktree` of an earlier commit):
the ranks are started from DIR with DIR first on PYTHONPATH, so they import its vlds (checked:
vlds.__file__), with the same DeepSpeed JSONs; the counting needs nothing of vlds' API but
Trainer.train_step and Trainer.finish (a config key the older tree lacks is left out, and
listed). Results: a Markdown table (--sites N adds each row's busiest call sites) and
bench/collectives_result.json (per rank: counts by op and caller, bytes, call sites, step
times); --merge keeps the file's rows of other presets and configs. Tiny: ~10 s per config and
tree on 2 cores; t5-base-random: ~25-35 s. The shapes world is the embedded default's (its
language model pretrained on first use) unless --data-root names another.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "all_gather_object",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "monitored_barrier",
    "all_to_all",
    "all_to_all_single",
    "reduce",
    "gather",
    "gather_object",
    "scatter",
    "scatter_object_list",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
)
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__")
PRESET_BATCH = {"tiny": 4, "t5-base-random": 2}  # micro-batch per rank when --batch is 0
DEFAULT_JSON = REPO / "bench" / "collectives_result.json"


# ---- rank side: the counters (installed before DeepSpeed or vlds is imported) ------------


class Counts:
    """Per-rank tallies; `on` between the start of the first measured step and Trainer.finish."""

    def __init__(self):
        self.on = False
        self.paused = 0  # > 0 inside the data loader's __next__ (host reads not counted)
        self.tls = threading.local()  # depth: a collective inside a collective counts once
        self.ops: Counter = Counter()  # (op, caller)
        self.nbytes: Counter = Counter()  # op
        self.sites: Counter = Counter()  # (op, caller, "file:line function")
        self.reads: Counter = Counter()  # (method, caller)
        self.read_sites: Counter = Counter()
        self.dirs: dict[str, str] = {}  # package name -> its directory (with a trailing /)

    def caller(self, frame) -> tuple[str, str]:
        """(vlds | deepspeed | transformers | torch | other, 'pkg/file.py:line function') of
        the first frame outside torch, deepspeed/comm and this file."""
        ds = self.dirs["deepspeed"]
        skip = (self.dirs["torch"], ds + "comm/", ds + "utils/nvtx.py", __file__)
        first = None
        while frame is not None:
            name = frame.f_code.co_filename
            if not name.startswith(skip):
                break
            first = first or frame
            frame = frame.f_back
        frame = frame or first
        if frame is None:
            return "other", "?"
        who, site = self.where(frame)
        if who != "vlds":  # the vlds code that led to it, if any: "... via vlds/model/vl.py:80 f"
            outer = frame.f_back
            while outer is not None and not outer.f_code.co_filename.startswith(self.dirs["vlds"]):
                outer = outer.f_back
            if outer is not None:
                site += " via " + self.where(outer)[1]
        return who, site

    def where(self, frame) -> tuple[str, str]:
        name = frame.f_code.co_filename
        for pkg, d in self.dirs.items():
            if name.startswith(d):
                short = pkg + "/" + name[len(d) :]
                return pkg, f"{short}:{frame.f_lineno} {frame.f_code.co_name}"
        return "other", f"{name}:{frame.f_lineno} {frame.f_code.co_name}"

    def collective(self, op: str, args, kwargs, frame) -> None:
        who, site = self.caller(frame)
        self.ops[op, who] += 1
        self.sites[op, who, site] += 1
        self.nbytes[op] += max((_nbytes(v) for v in (*args, *kwargs.values())), default=0)

    def read(self, method: str, frame) -> None:
        who, site = self.caller(frame)
        self.reads[method, who] += 1
        self.read_sites[method, who, site] += 1


COUNTS = Counts()


def _nbytes(x) -> int:
    import torch

    if torch.is_tensor(x):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(t.numel() * t.element_size() for t in x if torch.is_tensor(t))
    return 0


def install_counters() -> None:
    """Counting wrappers around torch.distributed's collectives, the host reads of Tensor and a
    pause in the data loader's __next__. Must run before DeepSpeed and vlds are imported."""
    assert "deepspeed" not in sys.modules and "vlds" not in sys.modules, "install first"
    import importlib.util

    import torch
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d
    import torch.utils.data.dataloader as dl

    for pkg in ("torch", "deepspeed", "transformers", "vlds"):
        spec = importlib.util.find_spec(pkg)  # vlds: the one on sys.path (--before: its tree)
        COUNTS.dirs[pkg] = str(Path(spec.origin).parent) + "/"

    def counted(op, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            tls = COUNTS.tls
            if not COUNTS.on or getattr(tls, "depth", 0):
                return fn(*args, **kwargs)
            COUNTS.collective(op, args, kwargs, sys._getframe(1))
            tls.depth = 1
            try:
                return fn(*args, **kwargs)
            finally:
                tls.depth = 0

        return wrapper

    for op in COLLECTIVES:
        original = getattr(c10d, op, None) or getattr(dist, op, None)
        if original is None:
            continue
        wrapped = counted(op, original)
        for module in (dist, c10d):
            if hasattr(module, op):
                setattr(module, op, wrapped)

    def read_counted(method, fn):
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            if COUNTS.on and not COUNTS.paused:
                COUNTS.read(method, sys._getframe(1))
            return fn(self, *args, **kwargs)

        return wrapper

    for method in HOST_READS:
        setattr(torch.Tensor, method, read_counted(method, getattr(torch.Tensor, method)))

    next_batch = dl._BaseDataLoaderIter.__next__

    @functools.wraps(next_batch)
    def paused_next(self):
        COUNTS.paused += 1
        try:
            return next_batch(self)
        finally:
            COUNTS.paused -= 1

    dl._BaseDataLoaderIter.__next__ = paused_next


class _Done(Exception):
    """Raised at Trainer.finish on every rank: the measured steps are over."""


def run_rank(spec: dict) -> dict:
    """One rank of a job: the counters, then vlds.train.run on the spec's config."""
    repo = Path(spec["repo"]).resolve()
    sys.path.insert(0, str(repo))
    install_counters()
    import vlds

    where = Path(vlds.__file__).resolve()
    if repo not in where.parents:
        raise RuntimeError(f"imported vlds from {where}, not from {repo}")
    import vlds.engine  # noqa: F401  (registers every config section's check)
    from vlds.config import build_config
    from vlds.train import run
    from vlds.trainer import Trainer

    probe = build_config(spec["preset"])  # the fields this tree's Config has
    overrides = {  # a key the tree does not know (an older checkout) is left out, and listed
        k: v
        for k, v in spec["overrides"].items()
        if hasattr(getattr(probe, k.split(".")[0]), k.split(".")[1])
    }
    cfg = build_config(spec["preset"], overrides)
    warmup, steps = spec["warmup"], spec["steps"]
    entered: list[float] = []
    train_step = Trainer.train_step

    def counted_step(self, batch):
        if self.step == warmup:
            COUNTS.on = True
        if COUNTS.on:
            entered.append(time.perf_counter())
        return train_step(self, batch)

    def counted_finish(self, *args, **kwargs):
        if COUNTS.on:
            entered.append(time.perf_counter())
        COUNTS.on = False
        raise _Done

    Trainer.train_step, Trainer.finish = counted_step, counted_finish
    t0 = time.time()
    try:
        run(cfg, spec["ds_config"])
        raise RuntimeError("the run ended without reaching Trainer.finish")
    except _Done:
        pass
    measured = len(entered) - 1
    if measured != steps:
        raise RuntimeError(f"measured {measured} steps, expected {steps}")
    gaps = [b - a for a, b in zip(entered, entered[1:], strict=False)]

    def nested(counter: Counter) -> dict:
        out: dict = defaultdict(dict)
        for (name, who), n in sorted(counter.items()):
            out[name][who] = n
        return dict(out)

    def sites(counter: Counter) -> list:  # the 40 busiest
        return [[name, who, site, n] for (name, who, site), n in counter.most_common(40)]

    return {
        "rank": int(os.environ["RANK"]),
        "vlds_file": str(where),
        "overrides_applied": overrides,
        "overrides_unknown": sorted(set(spec["overrides"]) - set(overrides)),
        "steps": measured,
        "collectives": nested(COUNTS.ops),
        "collective_bytes": dict(COUNTS.nbytes),
        "collective_sites": sites(COUNTS.sites),
        "host_reads": nested(COUNTS.reads),
        "host_read_sites": sites(COUNTS.read_sites),
        "step_s": gaps,
        "rank_wall_s": round(time.time() - t0, 1),
    }


# ---- parent: jobs of 2 ranks, the table ----------------------------------------------------


def git_commit(repo: Path) -> str:
    p = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return (p.stdout.strip() or "?") + ("+changes" if dirty else "")


def ds_variants(args, tmp: Path) -> list[tuple[str, Path, dict]]:
    """(name, JSON path, what was changed) per DeepSpeed config: this checkout's ds_configs/
    zero{2,3}.json, and zero3.json with each --threshold as stage3_param_persistence_threshold."""
    out = []
    for z in args.zero:
        out.append((f"zero{z}", REPO / "ds_configs" / f"zero{z}.json", {}))
    for t in args.threshold:
        ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
        value = int(float(t))
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = value
        path = tmp / f"zero3_threshold_{value}.json"
        path.write_text(json.dumps(ds, indent=2))
        out.append((f"zero3 threshold {t}", path, {"stage3_param_persistence_threshold": value}))
    return out


def launch(args, repo: Path, preset: str, ds_path: Path, tmp: Path, label: str) -> list[dict]:
    """Start `args.ranks` rank processes of this script from `repo` (it first on PYTHONPATH)
    and collect their results."""
    from vlds.distributed import free_port

    batch = args.batch or PRESET_BATCH.get(preset, 4)
    out_dir = tmp / f"run-{label}"
    spec = {
        "repo": str(repo),
        "preset": preset,
        "ds_config": str(ds_path),
        "warmup": args.warmup,
        "steps": args.steps,
        "overrides": {
            "data.batch_size": batch,
            "data.num_workers": 0,
            "train.max_steps": args.warmup + args.steps,
            "train.out_dir": str(out_dir),
            "train.log_every": 1,
            "train.save_every": 0,
            "train.save_every_minutes": 0.0,
            "eval.every": 0,
            **({"peft.method": args.method} if args.method else {}),
            **({"data.root": str(args.data_root.resolve())} if args.data_root else {}),
        },
    }
    port = str(free_port())
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    procs, logs = [], []
    for r in range(args.ranks):
        env = {
            **base,
            "RANK": str(r),
            "LOCAL_RANK": str(r),
            "WORLD_SIZE": str(args.ranks),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(repo), base.get("PYTHONPATH", "")]).rstrip(
                os.pathsep
            ),
        }
        log = open(tmp / f"{label}-rank{r}.log", "w")  # noqa: SIM115 (closed below)
        logs.append(log)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--rank-spec", json.dumps(spec)]
        cmd += ["--rank-out", str(tmp / f"{label}-rank{r}.json")]
        procs.append(subprocess.Popen(cmd, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        deadline = time.time() + args.timeout
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    results = []
    for r, p in enumerate(procs):
        path = tmp / f"{label}-rank{r}.json"
        if p.returncode != 0 or not path.is_file():
            tail = (tmp / f"{label}-rank{r}.log").read_text()[-4000:]
            raise RuntimeError(f"{label}: rank {r} failed ({p.returncode}):\n{tail}")
        results.append(json.loads(path.read_text()))
    return results


def summarise(ranks: list[dict]) -> dict:
    """Per-step figures of rank 0, and whether every rank made the same collectives."""
    r0 = ranks[0]
    n = r0["steps"]
    by_caller, by_op = Counter(), Counter()
    for op, callers in r0["collectives"].items():
        for who, c in callers.items():
            by_caller[who] += c / n
            by_op[op] += c / n
    reads = Counter()
    for _, callers in r0["host_reads"].items():
        for who, c in callers.items():
            reads[who] += c / n
    times = sorted(r0["step_s"])
    return {
        "collectives_per_step": dict(by_caller),
        "collectives_per_step_by_op": dict(by_op),
        "collective_mb_per_step": sum(r0["collective_bytes"].values()) / n / 1e6,
        "host_reads_per_step": dict(reads),
        "step_median_s": times[len(times) // 2] if times else None,
        "ranks_agree": all(r["collectives"] == r0["collectives"] for r in ranks),
    }


def fmt(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".") if x else "0"


def table(rows: list[dict], before: bool) -> str:
    head = ["config", "preset"] + (["tree"] if before else [])
    head += ["collectives/step (vlds)", "collectives/step (DeepSpeed)", "by op", "MB/step"]
    head += ["host reads/step (vlds / all)", "step median (s)"]
    body = []
    for r in rows:
        s = r["summary"]
        c, h = s["collectives_per_step"], s["host_reads_per_step"]
        other = sum(v for k, v in c.items() if k not in ("vlds", "deepspeed"))
        ops = ", ".join(
            f"{op} {fmt(v)}" for op, v in sorted(s["collectives_per_step_by_op"].items())
        )
        cells = [r["config"], r["preset"]] + ([f"{r['tree']} {r['commit']}"] if before else [])
        cells += [fmt(c.get("vlds", 0)), fmt(c.get("deepspeed", 0))]
        cells[-1] += f" (+{fmt(other)} other)" if other else ""
        cells += [ops or "-", f"{s['collective_mb_per_step']:.2f}"]
        cells += [f"{fmt(h.get('vlds', 0))} / {fmt(sum(h.values()))}"]
        cells += [f"{s['step_median_s']:.3f}" + ("" if s["ranks_agree"] else " (ranks differ!)")]
        body.append(cells)
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), rule] + [line(b) for b in body])


def site_lines(row: dict, top: int) -> list[str]:
    r0 = row["ranks"][0]
    n = r0["steps"]
    out = [f"{row['config']} {row['preset']} ({row['tree']}): call sites per step, rank 0"]
    for op, who, site, c in r0["collective_sites"][:top]:
        out.append(f"  {fmt(c / n):>6} {op:<24} {who:<10} {site}")
    reads = [x for x in r0["host_read_sites"] if x[1] in ("vlds", "deepspeed")][:top]
    for method, who, site, c in reads:
        out.append(f"  {fmt(c / n):>6} {'Tensor.' + method:<24} {who:<10} {site}")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--zero", type=int, nargs="*", default=[2, 3], choices=[2, 3])
    p.add_argument(
        "--threshold",
        nargs="*",
        default=[],
        help="extra ZeRO-3 runs with this stage3_param_persistence_threshold (e.g. 1e6 1e7)",
    )
    p.add_argument("--preset", nargs="+", default=["tiny"], help="vlds presets (tiny, ...)")
    p.add_argument("--steps", type=int, default=5, help="measured steps")
    p.add_argument("--warmup", type=int, default=2, help="steps before the measured ones")
    p.add_argument("--batch", type=int, default=0, help="micro-batch per rank (0: per preset)")
    p.add_argument("--method", default="", help="peft.method (default: the preset's)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument(
        "--data-root",
        type=Path,
        help="a shapes world (data.root) with the preset's language model under lms/ "
        "(default: the embedded default, pretrained first on a cold cache: ~15 min)",
    )
    p.add_argument("--before", type=Path, help="another checkout: its figures beside these")
    p.add_argument("--before-only", action="store_true", help="count the --before tree only")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where the rows go")
    p.add_argument(
        "--merge", action="store_true", help="keep the JSON's rows of other presets/configs"
    )
    p.add_argument("--sites", type=int, default=0, help="print the N busiest call sites per row")
    p.add_argument("--timeout", type=float, default=900, help="seconds per job")
    hidden = argparse.SUPPRESS
    p.add_argument("--rank-spec", default="", help=hidden)
    p.add_argument("--rank-out", default="", help=hidden)
    args = p.parse_args(argv)
    if args.rank_spec:
        return args
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1 (the first step builds DeepSpeed's state)")
    if args.warmup < 2 and (3 in args.zero or args.threshold):
        p.error("ZeRO-3 needs --warmup >= 2 (step 2 checks its fetch trace against rank 0's)")
    if not args.zero and not args.threshold:
        p.error("nothing to run: give --zero and/or --threshold")
    if args.before_only and not args.before:
        p.error("--before-only needs --before DIR")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.rank_spec:  # one rank of a job (started by the parent below)
        result = run_rank(json.loads(args.rank_spec))
        Path(args.rank_out).write_text(json.dumps(result) + "\n")
        return [result]
    sys.path.insert(0, str(REPO))
    from bench.machine import cpu_model

    trees = [] if args.before_only else [("after", REPO)]
    if args.before:
        trees.append(("before", args.before.resolve()))
    print(
        f"{cpu_model()} ({os.cpu_count()} cores); {args.ranks} ranks (gloo); "
        f"{args.warmup} warm-up + {args.steps} measured steps; trees: "
        + ", ".join(f"{name} {t} ({git_commit(t)})" for name, t in trees),
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="vlds-collectives-") as tmp_name:
        tmp = Path(tmp_name)
        for preset in args.preset:
            for config, ds_path, changed in ds_variants(args, tmp):
                for tree, repo in trees:
                    label = f"{preset}-{config.replace(' ', '_')}-{tree}"
                    t0 = time.time()
                    ranks = launch(args, repo, preset, ds_path, tmp, label)
                    wall = time.time() - t0
                    row = {
                        "config": config,
                        "ds_changes": changed,
                        "preset": preset,
                        "tree": tree,
                        "repo": str(repo),
                        "commit": git_commit(repo),
                        "vlds_file": ranks[0]["vlds_file"],
                        "micro_batch": args.batch or PRESET_BATCH.get(preset, 4),
                        "job_wall_s": round(wall, 1),
                        "summary": summarise(ranks),
                        "ranks": ranks,
                    }
                    rows.append(row)
                    s = row["summary"]
                    print(
                        f"  {config} {preset} {tree}: {wall:.0f} s; collectives/step "
                        f"{ {k: round(v, 2) for k, v in s['collectives_per_step'].items()} } "
                        f"(vlds from {row['vlds_file']})",
                        flush=True,
                    )
    print()
    print(table(rows, bool(args.before)))
    print()
    print(
        "per step = one loop iteration, rank 0 (every rank makes the same collectives unless "
        "marked); host reads = Tensor.item/tolist/bool/float/int calls outside the data loader"
    )
    for row in rows if args.sites else []:
        print("\n".join(["", *site_lines(row, args.sites)]))
    run = {
        "machine": f"{cpu_model()} ({os.cpu_count()} cores)",
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "command": "python bench/collectives.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "warmup": args.warmup,
        "steps": args.steps,
        "ranks": args.ranks,
    }
    for row in rows:
        row["run"] = run
    if args.merge and args.json.is_file():  # keep the file's other rows (other presets, trees)
        key = lambda r: (r["preset"], r["config"], r["tree"])  # noqa: E731
        new = {key(r) for r in rows}
        old = json.loads(args.json.read_text())["rows"]
        rows = [r for r in old if key(r) not in new] + rows
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print(f"\nwrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
