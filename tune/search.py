"""Ray Tune search over learning rate x adapter reduction factor (x PEFT method), pruned by ASHA.

    python tune/search.py                      # 16 configurations of the tiny preset, CPU, minutes
    python tune/search.py --resume             # continue an interrupted search (same arguments)
    python tune/search.py --address auto --gpus-per-trial 1 --preset t5-base \\
        --data.root=/data/vl-shards            # on a Ray cluster (slurm/tune.sbatch starts one)

Every trial is a real vlds training run. With one GPU (or one CPU) per trial it runs inside the
trial's process: `vlds.train.main([...], on_eval=report)` with its own DeepSpeed engine and its
own rendezvous (RANK=0, WORLD_SIZE=1, a free MASTER_PORT), reporting after every evaluation.
With `--gpus-per-trial K > 1` (or `--procs-per-trial K` on CPU) the trial starts
`torchrun --standalone --nproc_per_node K vlds/train.py ...` (torchrun picks a free port; the
ranks use the GPUs Ray assigned to the trial) and reports the eval rows of the run's
metrics.jsonl as they appear. Any `--section.key=value` argument goes to every trial.

ASHA stops the worst trials at each rung on the validation score, the average of the task
metrics (`metrics["average"]`, mode max), with training steps as its time axis. At the end,
in OUT/NAME: results.csv, heatmap.png (score over lr x reduction factor, a panel per method),
best_config.json (`python vlds/train.py --config best_config.json` trains the winner) and
budget.json (trial-steps ASHA spent vs. running every configuration to the end); trial t's run
folder is runs/<t> and its log runs/<t>.log.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# ---- the search space --------------------------------------------------------------------------
LR_RANGE = (1e-3, 4e-2)  # log-uniform; the grid takes the geometric centres of equal log-bins
LR_POINTS = 4
REDUCTION_FACTORS = [2, 4, 8, 16]  # bottleneck = d_model / r: each must divide d_model (64 tiny)
METHODS = ["single_adapter"]  # any of vlds.peft.METHODS that uses peft.reduction_factor

# ---- ASHA and the per-trial budget (training steps) --------------------------------------------
MAX_STEPS = 960  # a trial that survives every rung trains this long (sizes its LR schedule)
GRACE = 120  # first rung: every trial trains at least this long
ETA = 4  # ASHA's reduction factor: the top 1/ETA at a rung go on (rungs at 120, 480)
EVAL_EVERY = 120  # must divide the rungs; a checkpoint is written at the same steps (resume)

# A tiny-preset search (the default) also gives every trial: micro-batch 16 (twice the steps per
# second of the preset's 32 on 2 cores, and as much learning per step), one data process per
# 1-CPU trial, a small evaluation. Command-line overrides win.
TINY_SEARCH = {
    "data.batch_size": 16,
    "data.num_workers": 0,
    "eval.max_samples": 64,
    "eval.caption_beams": 1,
}
TRIAL_RUN = {"train.keep_last": 1, "train.log_every": 20}  # every search
# Keys about where and how a trial runs or is scored, not what it trains: best_config.json
# leaves them out (a run of the winner evaluates with its preset's settings).
RUN_KEYS = {
    *TRIAL_RUN,
    "data.num_workers",
    "eval.max_samples",
    "eval.caption_beams",
    "eval.every",
    "train.out_dir",
    "train.resume",
    "train.save_every",
}


def lr_edges(lo: float, hi: float, n: int) -> list[float]:
    a, b = math.log10(lo), math.log10(hi)
    return [10 ** (a + i * (b - a) / n) for i in range(n + 1)]


def lr_grid(lo: float, hi: float, n: int) -> list[float]:
    """Geometric centres of n equal log-bins of [lo, hi], 2 significant digits."""
    e = lr_edges(lo, hi, n)
    return [float(f"{math.sqrt(x * y):.2g}") for x, y in zip(e, e[1:], strict=False)]


def lr_bin(lr: float, lo: float, hi: float, n: int) -> int:
    return min(n - 1, max(0, int(n * math.log(lr / lo) / math.log(hi / lo))))


@dataclass
class Setup:
    """Everything a trial needs besides its point (sent to every trial)."""

    preset: str
    overrides: dict  # TINY_SEARCH / TRIAL_RUN + command-line overrides, data.root resolved
    runs_dir: str  # trial t writes its vlds run into runs_dir/t
    max_steps: int
    eval_every: int
    procs: int = 1  # ranks per trial; > 1 launches torchrun in a subprocess
    java_metrics: bool = False
    embedded_data: bool = False  # data.root is the shapes world generated on this machine


def trial_argv(setup: Setup, point: dict, out_dir: Path) -> list[str]:
    overrides = {
        **setup.overrides,
        "train.lr": point["lr"],
        "peft.reduction_factor": point["reduction_factor"],
        "peft.method": point["method"],
        "train.max_steps": setup.max_steps,
        "eval.every": setup.eval_every,
        "train.save_every": setup.eval_every,
        "train.out_dir": str(out_dir),
        # always: a restored experiment restarts its unfinished trials, which continue from
        # their last checkpoint; a new trial finds none and starts fresh
        "train.resume": "latest",
    }
    return ["--preset", setup.preset, *(f"--{k}={v}" for k, v in overrides.items())]


def run_trial(point: dict, setup: Setup) -> None:
    """The Tune trainable: one vlds training run, reporting after every evaluation."""
    from ray import tune

    out_dir = Path(setup.runs_dir) / tune.get_context().get_trial_id()
    argv = trial_argv(setup, point, out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    log_file = out_dir.parent / f"{out_dir.name}.log"
    if setup.procs > 1:
        return _run_subprocess(argv, out_dir, log_file, setup.procs)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    # The trial's own world of one: ignore the launcher variables a Ray worker may have
    # inherited (srun sets SLURM_PROCID / SLURM_NTASKS) and rendezvous on a free port.
    from vlds.distributed import free_port

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    import vlds.guard
    from vlds.train import main

    # Tune runs this function in a worker thread, where signal handlers cannot be installed;
    # Tune stops and restores trials itself, so the trainer's preemption handler is not needed.
    vlds.guard.Preemption.SIGNALS = ()
    if not setup.java_metrics:
        import vlds.eval.caption

        # Each caption evaluation would start two JVMs (PTBTokenizer, METEOR): ~10 s on 2 cores,
        # more than the training between rungs. CIDEr, the caption score, needs neither.
        vlds.eval.caption.have_java = lambda: False

    def report(step, metrics, cfg):
        tasks = {t: float(m["score"]) for t, m in metrics.items() if isinstance(m, dict)}
        tune.report({"step": step, "score": float(metrics["average"]), **tasks})

    main(argv, on_eval=report)


def _run_subprocess(argv: list[str], out_dir: Path, log_file: Path, procs: int) -> None:
    """K ranks per trial: torchrun in a subprocess; report the eval rows of its metrics.jsonl.
    Tested on CPU (gloo, --procs-per-trial 2); not on GPUs."""
    import ctypes
    import signal

    from ray import tune

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={procs}", str(REPO / "vlds" / "train.py"), *argv]  # fmt: skip
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    prctl = ctypes.CDLL(None).prctl  # looked up before the fork, only called after it

    def die_with_parent():  # the ranks must not outlive a trial that Tune kills
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG; SIGTERM = save a checkpoint, exit

    with log_file.open("a") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=die_with_parent)  # fmt: skip
        reported, metrics_file = 0, out_dir / "metrics.jsonl"
        try:
            while True:
                done = proc.poll() is not None
                text = metrics_file.read_text() if metrics_file.is_file() else ""
                lines = text.split("\n")[:-1]  # the part after the last newline may be partial
                for line in lines[reported:]:
                    row = json.loads(line)
                    if row["kind"] == "eval":  # {"average": .., "vqa/score": .., ...}
                        tasks = {k[: -len("/score")]: v for k, v in row.items()
                                 if k.endswith("/score")}  # fmt: skip
                        tune.report({"step": row["step"], "score": row["average"], **tasks})
                reported = len(lines)
                if done:
                    break
                time.sleep(1.0)
            if proc.returncode != 0:
                raise RuntimeError(f"torchrun exited with {proc.returncode}; see {log_file}")
        finally:
            if proc.poll() is None:  # Tune stopped the trial: the ranks save and exit
                proc.terminate()
                proc.wait(timeout=600)


# ---- the experiment ----------------------------------------------------------------------------


def param_space(args) -> dict:
    from ray import tune

    if args.samples:  # random search: log-uniform learning rate, reduction factor from the list
        return {
            "lr": tune.loguniform(*args.lr_range),
            "reduction_factor": tune.choice(args.reduction_factors),
            "method": tune.choice(args.methods),
        }
    # The grid in a shuffled, fixed order: asynchronous halving always promotes the first
    # arrivals at a rung, so with few concurrent trials a sorted grid would run its lowest
    # learning rates to the end.
    lrs = lr_grid(*args.lr_range, args.lr_points)
    points = [{"lr": lr, "reduction_factor": r, "method": m}
              for m in args.methods for lr in lrs for r in args.reduction_factors]  # fmt: skip
    random.Random(args.seed).shuffle(points)
    return {"point": tune.grid_search(points)}


def strict_asha(max_steps: int, grace: int, eta: int):
    """Ray's ASHA, except that a score equal to a rung's cutoff stops instead of going on.

    Early in a search many trials tie (on the tiny preset every model still answers at chance
    at the first rung, and NLVR2's constant answer gives one of two averages); Ray promotes
    every trial that ties the cutoff, which here sent 7 of 16 trials on instead of 4. Scores
    strictly above the cutoff go on; the first trial at a rung (no cutoff yet) always does.
    """
    import numpy as np
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.schedulers.async_hyperband import _Bracket

    class StrictBracket(_Bracket):
        def cutoff(self, recorded):
            c = super().cutoff(recorded)
            return None if c is None else float(np.nextafter(c, np.inf))

    scheduler = ASHAScheduler(
        time_attr="step",
        # rungs strictly below the last step, and stop_last_trials=False: a trial that gets
        # there is never cut at its final report and finishes its run (metrics.json, adapter)
        max_t=max_steps - 1,
        grace_period=grace,
        reduction_factor=eta,
        stop_last_trials=False,
    )
    for b in scheduler._brackets:  # one bracket (brackets=1): the same rungs, the strict cutoff
        b.__class__ = StrictBracket
    return scheduler


def build_tuner(args, setup: Setup, exp_dir: Path):
    from ray import tune

    def trainable(config):
        return run_trial(config.get("point", config), setup)

    trainable = tune.with_resources(
        trainable, {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial}
    )
    if args.resume:
        if not tune.Tuner.can_restore(str(exp_dir)):
            sys.exit(f"error: nothing to resume in {exp_dir}; run without --resume first")
        return tune.Tuner.restore(
            str(exp_dir), trainable, resume_unfinished=True, resume_errored=True
        )
    scheduler = strict_asha(args.max_steps, args.grace, args.eta)
    return tune.Tuner(
        trainable,
        param_space=param_space(args),
        tune_config=tune.TuneConfig(
            metric="score", mode="max", scheduler=scheduler, num_samples=args.samples or 1
        ),
        run_config=tune.RunConfig(
            name=exp_dir.name,
            storage_path=str(exp_dir.parent),
            failure_config=tune.FailureConfig(max_failures=1),  # retried from its checkpoint
            verbose=1,
        ),
    )


def search_complete(exp_dir: Path) -> bool:
    """False after an interruption (Ctrl-C, a time limit): the saved state, which --resume
    reads, still has pending trials. (In memory, Tune marks every trial terminated on exit.)"""
    from ray.tune import ExperimentAnalysis

    return all(t.status in ("TERMINATED", "ERROR") for t in ExperimentAnalysis(str(exp_dir)).trials)


def rungs(grace: int, eta: int, max_steps: int) -> list[int]:
    """ASHA's milestones (as Ray computes them for max_t = max_steps - 1), then the end."""
    out, t = [], grace
    while t < max_steps:
        out.append(t)
        t *= eta
    return [*out, max_steps]


def collect(result_grid, runs_dir: Path, max_steps: int) -> list[dict]:
    rows = []
    for res in result_grid:
        point, m = res.config.get("point", res.config), res.metrics or {}
        hist = res.metrics_dataframe
        has_hist = hist is not None and "score" in hist
        step, trial_id = int(m.get("step", 0)), m.get("trial_id") or Path(res.path).name
        rows.append({
            "method": point["method"], "lr": point["lr"],
            "reduction_factor": point["reduction_factor"], "score": m.get("score"),
            "best_score": float(hist["score"].max()) if has_hist else None, "step": step,
            "status": "error" if res.error else "finished" if step >= max_steps else "stopped",
            "trial_id": trial_id, "run_dir": str(runs_dir / trial_id),
        })  # fmt: skip
    return sorted(rows, key=lambda r: (r["method"], r["lr"], r["reduction_factor"]))


def budget(rows: list[dict], max_steps: int, milestones: list[int]) -> dict:
    """Trial-steps ASHA spent (the last step each trial reached: a stopped trial halts at the
    report that stopped it) vs. running every configuration to the end."""
    spent, full = sum(r["step"] for r in rows), len(rows) * max_steps
    return {
        "configurations": len(rows),
        "max_steps": max_steps,
        "trial_steps_spent": spent,
        "trial_steps_all_to_end": full,
        "full_runs_spent": round(spent / max_steps, 2),
        "fraction": round(spent / full, 3) if full else 0.0,
        "reached": {str(t): sum(r["step"] >= t for r in rows) for t in milestones},
    }


def budget_text(b: dict) -> str:
    reached = ", ".join(f"{n} reached step {t}" for t, n in b["reached"].items())
    return (
        f"ASHA budget: {b['trial_steps_spent']:,} trial-steps spent vs "
        f"{b['trial_steps_all_to_end']:,} to run all {b['configurations']} configurations to "
        f"step {b['max_steps']}: {b['full_runs_spent']} full runs' worth "
        f"({100 * b['fraction']:.0f}%); {reached}"
    )


def best_row(rows: list[dict]) -> dict:
    """The highest final score among the trials that trained to the end (ASHA's survivors);
    among all trials when none did."""
    pool = [r for r in rows if r["status"] == "finished" and r["score"] is not None]
    pool = pool or [r for r in rows if r["score"] is not None]
    if not pool:
        raise RuntimeError("no trial reported a score; see the trial logs in runs/")
    return max(pool, key=lambda r: r["score"])


def best_config(row: dict, setup: Setup) -> dict:
    """A --config file for vlds/train.py: the preset, the winning point and every override that
    shaped the trial's training (its step budget included), none about where it ran."""
    from vlds.config import build_config

    skip = RUN_KEYS | ({"data.root"} if setup.embedded_data else set())
    flat = {k: v for k, v in setup.overrides.items() if k not in skip}
    flat.update({"train.lr": row["lr"], "peft.reduction_factor": row["reduction_factor"],
                 "peft.method": row["method"], "train.max_steps": setup.max_steps})  # fmt: skip
    cfg = build_config(setup.preset, flat)  # typed: "16" from the command line -> 16
    nested: dict = {"preset": setup.preset}
    for key in sorted(flat):
        section, _, name = key.partition(".")
        nested.setdefault(section, {})[name] = getattr(getattr(cfg, section), name)
    return nested


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot_heatmap(rows: list[dict], path: Path, lr_range, n_bins: int, rfs: list[int]) -> None:
    """Final score per (lr bin, reduction factor), a panel per method; each cell also names the
    step its trial reached. Random search: the best trial of each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = sorted({r["method"] for r in rows})
    scored = [r["score"] for r in rows if r["score"] is not None] or [0.0]
    lo, hi = min(scored), max(max(scored), min(scored) + 1e-6)  # one colour scale, never empty
    fig, axes = plt.subplots(1, len(methods), squeeze=False,
                             figsize=(2.2 + 1.6 * n_bins * len(methods), 4.4))  # fmt: skip
    for ax, method in zip(axes[0], methods, strict=True):
        grid = np.full((len(rfs), n_bins), np.nan)  # (reduction factor, lr bin)
        steps = np.zeros((len(rfs), n_bins), dtype=int)
        for r in rows:
            if r["method"] == method and r["score"] is not None and r["reduction_factor"] in rfs:
                i, j = rfs.index(r["reduction_factor"]), lr_bin(r["lr"], *lr_range, n_bins)
                if np.isnan(grid[i, j]) or r["score"] > grid[i, j]:
                    grid[i, j], steps[i, j] = r["score"], r["step"]
        im = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto",
                       vmin=lo, vmax=hi)  # fmt: skip
        mid = (lo + hi) / 2
        for i, j in zip(*np.nonzero(~np.isnan(grid)), strict=True):
            ax.text(j, i, f"{grid[i, j]:.1f}\n@{steps[i, j]}", ha="center", va="center",
                    fontsize=8, color="white" if grid[i, j] < mid else "black")  # fmt: skip
        ax.set_xticks(range(n_bins), [f"{x:.2g}" for x in lr_grid(*lr_range, n_bins)])
        ax.set_yticks(range(len(rfs)), [str(r) for r in rfs])
        ax.set(xlabel="learning rate", ylabel="reduction factor (d_model / bottleneck)",
               title=method)  # fmt: skip
    fig.colorbar(im, ax=axes[0].tolist(), label="validation score (task average)")
    fig.suptitle("ASHA search: final score @ step reached")
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- command line ------------------------------------------------------------------------------


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--preset", default="tiny")
    add("--address", default=None, help="Ray cluster address ('auto' inside slurm/tune.sbatch)")
    add("--out", default="runs/tune", help="experiments folder")
    add("--name", default="search", help="experiment name: its folder in --out")
    add("--resume", action="store_true", help="continue the interrupted experiment")
    add("--lr-range", type=lambda s: [float(x) for x in s.split(",")], default=list(LR_RANGE))
    add("--lr-points", type=int, default=LR_POINTS, help="grid: learning rates")
    add("--reduction-factors", type=lambda s: [int(x) for x in s.split(",")],
        default=REDUCTION_FACTORS)  # fmt: skip
    add("--methods", type=lambda s: s.split(","), default=METHODS)
    add("--samples", type=int, default=0, help="N > 0: random search (log-uniform lr) of N")
    add("--max-steps", type=int, default=MAX_STEPS)
    add("--grace", type=int, default=GRACE, help="ASHA's first rung (steps)")
    add("--eta", type=int, default=ETA, help="ASHA's reduction factor")
    add("--eval-every", type=int, default=EVAL_EVERY)
    add("--cpus-per-trial", type=float, default=1)
    add("--gpus-per-trial", type=int, default=0)
    add("--procs-per-trial", type=int, default=0, help="ranks per trial (default: its GPUs)")
    add("--java-metrics", action="store_true", help="PTBTokenizer + METEOR in every eval")
    add("--seed", type=int, default=0, help="the order of the grid")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("--") and "." in a.split("=")[0] and "=" in a)]
    if bad:
        p.error(f"unrecognised arguments {bad}; vlds overrides look like --section.key=value")
    args.overrides = dict(a[2:].split("=", 1) for a in rest)
    args.procs_per_trial = args.procs_per_trial or max(1, args.gpus_per_trial)
    for t in rungs(args.grace, args.eta, args.max_steps)[:-1]:
        if t % args.eval_every:
            p.error(f"ASHA rung at step {t} is not a multiple of --eval-every {args.eval_every}")
    return args


def make_setup(args, exp_dir: Path) -> Setup:
    """The trials' shared settings; every point is checked as a vlds config here, not in 16
    failing trials."""
    from vlds.config import build_config, parse_cli, validate
    from vlds.data.stream import load_index

    tiny = args.preset.startswith("tiny")
    overrides = {**(TINY_SEARCH if tiny else {}), **TRIAL_RUN, **args.overrides}
    embedded = not build_config(args.preset, overrides).data.root
    if embedded:  # generated here once, not by 16 trials racing for its lock
        from vlds.data.synthetic import ensure_synthetic

        overrides["data.root"] = str(ensure_synthetic())
    setup = Setup(args.preset, overrides, str(exp_dir / "runs"), args.max_steps,
                  args.eval_every, args.procs_per_trial, args.java_metrics, embedded)  # fmt: skip
    lr = lr_grid(*args.lr_range, args.lr_points)[0]
    for m in args.methods:
        for r in args.reduction_factors:
            point = {"lr": lr, "reduction_factor": r, "method": m}
            cfg = parse_cli(trial_argv(setup, point, exp_dir / "check"))[0]
            validate(cfg)
    for t in cfg.task_list:  # the shards exist (as vlds/train.py checks before any work)
        for split in (cfg.data.train_split, cfg.data.val_split):
            load_index(cfg.data.root, t, split)
    return setup


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    exp_dir = (Path(args.out) / args.name).resolve()
    from vlds.config import ConfigError
    from vlds.data.stream import DataError

    try:
        setup = make_setup(args, exp_dir)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    t0 = time.time()
    # trial output goes to runs/<trial id>.log; the console shows Tune's status table
    ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
    try:
        result_grid = build_tuner(args, setup, exp_dir).fit()
    finally:
        ray.shutdown()
    wall = time.time() - t0
    if not search_complete(exp_dir):
        print(f"interrupted after {wall:.0f} s; the state is saved in {exp_dir}: continue with "
              f"the same arguments and --resume")  # fmt: skip
        return {"interrupted": True, "exp_dir": exp_dir}

    rows = collect(result_grid, Path(setup.runs_dir), args.max_steps)
    write_csv(rows, exp_dir / "results.csv")
    plot_heatmap(rows, exp_dir / "heatmap.png", args.lr_range, args.lr_points,
                 args.reduction_factors)  # fmt: skip
    milestones = rungs(args.grace, args.eta, args.max_steps)
    b = {**budget(rows, args.max_steps, milestones), "wall_s": round(wall, 1)}
    (exp_dir / "budget.json").write_text(json.dumps(b, indent=2) + "\n")
    best = best_row(rows)
    best_file = exp_dir / "best_config.json"
    best_file.write_text(json.dumps(best_config(best, setup), indent=2) + "\n")
    print(budget_text(b))
    print(f"best: score {best['score']:.1f} at step {best['step']}: lr {best['lr']:g}, "
          f"reduction factor {best['reduction_factor']}, {best['method']}")  # fmt: skip
    print(f"{wall:.0f} s; in {exp_dir}: results.csv, heatmap.png, budget.json, best_config.json "
          f"(python vlds/train.py --config {best_file})")  # fmt: skip
    return {"rows": rows, "budget": b, "best": best, "exp_dir": exp_dir}


if __name__ == "__main__":
    main()
