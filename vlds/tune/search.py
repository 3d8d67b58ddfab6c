"""Ray Tune search over learning rate x adapter reduction factor (x PEFT method), pruned by
successive halving.

    vlds tune                                  # 16 configurations of the tiny preset, CPU, minutes
    vlds tune --resume                         # continue an interrupted search (same arguments)
    vlds tune --address auto --gpus-per-trial 1 --preset t5-base \\
        --data.root=/data/vl-shards            # on a Ray cluster (slurm/tune.sbatch starts one)

`vlds tune`, `vlds-tune`, `python -m vlds.tune.search` and `python tune/search.py` (a checkout's
script) are the same command; it needs Ray Tune (`pip install "vlds[tune]"`), checked first.

Every trial is a real vlds training run (vlds/tune/trial.py). With one GPU (or one CPU) per trial
it runs inside the trial's process: `vlds.train.run(cfg, on_eval=report)` with its own DeepSpeed
engine and its own rendezvous, reporting after every evaluation. With `--gpus-per-trial K > 1`
(or `--procs-per-trial K` on CPU) the trial starts `torchrun --nproc_per_node K vlds/train.py`
and reports the eval rows of the run's metrics.jsonl as they appear. Any `--section.key=value`
argument goes to every trial.

Synchronous successive halving (vlds/tune/scheduler.py, on Tune's public scheduler interface;
`--scheduler asha` the asynchronous variant, `--scheduler grid` no stopping) trains every
configuration to a rung, waits for all of them, and lets the best 1/eta go on, ranked by the
validation loss averaged over each trial's last evaluations, ties broken by the validation score
(the average of the task metrics, `metrics["average"]`); training steps are its time axis.
At the end, in OUT/NAME: results.csv, heatmap.png (score over lr x reduction factor, a panel per
method), best_config.json (`python vlds/train.py --config best_config.json` trains the winner)
and budget.json (trial-steps spent vs. running every configuration to the end); trial t's run
folder is runs/<t> and its log runs/<t>.log (vlds/tune/results.py). The search space and its
defaults per preset are in vlds/tune/space.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from vlds.config import ConfigError, take_overrides

from . import results, space
from .space import Setup, rungs
from .trial import run_trial, trial_overrides


def rung_rule(rung_metric: str) -> dict:
    """The schedulers' ranking arguments for --rung-metric: that metric (the loss lower is
    better), the other breaking ties (SuccessiveHalving)."""
    tie = "score" if rung_metric == "loss" else "loss"
    return {
        "rung_metric": rung_metric,
        "rung_mode": "min" if rung_metric == "loss" else "max",
        "tie_metric": tie,
        "tie_mode": "max" if tie == "score" else "min",
    }


def build_tuner(args, setup: Setup, exp_dir: Path):
    """A new Tuner, or (--resume) the interrupted experiment in exp_dir restored."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from .scheduler import StrictASHA, SuccessiveHalving

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
    rule = rung_rule(args.rung_metric)
    if args.scheduler == "grid":
        scheduler = FIFOScheduler()
    elif args.scheduler == "asha":
        scheduler = StrictASHA(
            args.max_steps,
            args.grace,
            args.eta,
            rung_metric=rule["rung_metric"],
            rung_mode=rule["rung_mode"],
        )
    else:
        scheduler = SuccessiveHalving(
            args.max_steps,
            args.grace,
            args.eta,
            n_trials=space.n_points(args),
            window=args.rung_window,
            state_file=str(exp_dir / space.HALVING_STATE),
            **rule,
        )
    return tune.Tuner(
        trainable,
        param_space=space.param_space(args),
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

    # Tune saves a trial that successive halving stopped while it waited at a rung as PAUSED:
    # the scheduler's own state says it is out
    halving = exp_dir / space.HALVING_STATE
    out = set(json.loads(halving.read_text())["out"]) if halving.is_file() else set()
    return all(
        t.status in ("TERMINATED", "ERROR") or t.trial_id in out
        for t in ExperimentAnalysis(str(exp_dir)).trials
    )


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--preset", default="tiny")
    add("--address", default=None, help="Ray cluster address ('auto' inside slurm/tune.sbatch)")
    add("--out", default="runs/tune", help="experiments folder")
    add("--name", default="search", help="experiment name: its folder in --out")
    add("--resume", action="store_true", help="continue the interrupted experiment")
    # None: the preset's default (vlds/tune/space.py SPACES)
    add("--lr-range", type=lambda s: [float(x) for x in s.split(",")], default=None)
    add("--lr-points", type=int, default=None, help="grid: learning rates")
    add("--reduction-factors", type=lambda s: [int(x) for x in s.split(",")], default=None)
    add("--methods", type=lambda s: s.split(","), default=space.METHODS)
    add("--samples", type=int, default=0, help="N > 0: random search (log-uniform lr) of N")
    add("--max-steps", type=int, default=None, help="a trial's training steps at most")
    add("--eval-every", type=int, default=None, help="steps between evaluations (and reports)")
    add("--grace", type=int, default=None, help="the first rung (steps; default max-steps / 8)")
    add("--eta", type=int, default=space.ETA, help="the best 1/eta at a rung go on")
    add(
        "--scheduler",
        choices=["halving", "asha", "grid"],
        default="halving",
        help="halving: synchronous successive halving (trials wait at each rung); asha: "
        "asynchronous (no waiting, the first arrivals go on); grid: every configuration to the end",
    )
    add(
        "--rung-window",
        type=int,
        default=space.RUNG_WINDOW,
        help="a rung ranks by the mean of a trial's last N evaluations (halving)",
    )
    add(
        "--rung-metric",
        choices=["score", "loss"],
        default=space.RUNG_METRIC,
        help="what a rung ranks by: the validation score (task average) or loss; the other "
        "breaks ties (halving)",
    )
    add("--cpus-per-trial", type=float, default=1)
    add("--gpus-per-trial", type=int, default=0)
    add("--procs-per-trial", type=int, default=0, help="ranks per trial (default: its GPUs)")
    add("--java-metrics", action="store_true", help="PTBTokenizer + METEOR in every eval")
    add(
        "--seed",
        type=int,
        default=0,
        help="the grid's order and every trial's train.seed (unless --train.seed is given)",
    )
    try:  # vlds overrides first (their keys hold a dot; the search's own flags do not)
        overrides, own = take_overrides(list(argv))
    except ConfigError as e:
        p.error(str(e))
    args, bad = p.parse_known_args(own)
    if bad:
        p.error(
            f"unrecognised arguments {bad}; vlds overrides look like --section.key=value "
            f"or --section.key value"
        )
    args.overrides = overrides
    args.procs_per_trial = args.procs_per_trial or max(1, args.gpus_per_trial)
    for key, value in space.space_of(args.preset).items():
        if getattr(args, key) is None:
            setattr(args, key, list(value) if isinstance(value, tuple) else value)
    if args.grace is None:
        args.grace = space.default_grace(args.max_steps, args.eval_every)
    if args.scheduler != "grid":
        if not (0 < args.grace < args.max_steps and args.eta > 1):
            p.error(
                f"the rungs need 0 < --grace ({args.grace}) < --max-steps ({args.max_steps}) "
                f"and --eta ({args.eta}) > 1"
            )
        for t in rungs(args.grace, args.eta, args.max_steps)[:-1]:
            if t % args.eval_every:
                p.error(f"rung at step {t} is not a multiple of --eval-every {args.eval_every}")
    return args


def make_setup(args, exp_dir: Path) -> Setup:
    """The trials' shared settings; every point is checked as a vlds config here, not in 16
    failing trials."""
    import vlds.engine  # noqa: F401  (registers every config section's check, as train.py does)
    from vlds.config import build_config, validate
    from vlds.data.shardio import load_index

    tiny = args.preset.startswith("tiny")
    overrides = {
        **(space.TINY_SEARCH if tiny else space.BASE_SEARCH),
        **space.TRIAL_RUN,
        "train.seed": args.seed,
        **args.overrides,
    }
    embedded = not build_config(args.preset, overrides).data.root
    if embedded:  # generated here once, not by 16 trials racing for its lock
        from vlds.data.synthetic import ensure_synthetic

        overrides["data.root"] = str(ensure_synthetic())
    setup = Setup(
        args.preset,
        overrides,
        str(exp_dir / "runs"),
        args.max_steps,
        args.eval_every,
        args.procs_per_trial,
        args.java_metrics,
        embedded,
    )
    lr = space.lr_grid(*args.lr_range, args.lr_points)[0]
    for m in args.methods:
        for r in args.reduction_factors:
            point = {"lr": lr, "reduction_factor": r, "method": m}
            cfg = build_config(args.preset, trial_overrides(setup, point, exp_dir / "check"))
            validate(cfg)
    if args.rung_metric == "loss" and not cfg.eval.loss:
        raise ConfigError(
            "--rung-metric loss (the default) ranks by the validation loss, which "
            "eval.loss=false turns off; drop eval.loss=false, or pass --rung-metric score"
        )
    for t in cfg.task_list:  # the shards exist (as vlds/train.py checks before any work)
        for split in (cfg.data.train_split, cfg.data.val_split):
            load_index(cfg.data.root, t, split)
    share_backbone(cfg)  # after every check: a bad argument fails before minutes of work
    return setup


def share_backbone(cfg) -> None:
    """The embedded backbone (`model.lm` / `model.vision_pretrained` "synthetic": the tiny
    tower and T5 pretrained on the shapes world, minutes on a fresh machine) is pretrained here,
    once, before any trial starts; the trials find it cached. Real weights are read by every
    trial from their hub name or path."""
    from vlds.data.build import local_side
    from vlds.model.build import build_tokenizer, lm_weights, tower_weights

    tower_weights(cfg)
    if cfg.model.lm == "synthetic":
        root = local_side(cfg, cfg.data.root, True)  # a URL root: its local cache folder
        lm_weights(cfg, build_tokenizer(cfg, root), root)


def require_tune() -> None:
    """Ray Tune is an extra (`vlds[tune]`): without it every form of the command, `--help`
    included, stops here with the install command (exit 2), before any work."""
    from vlds.cli import MissingExtra, require

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # before Ray is first imported
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        require("ray.tune", "tune", "the search (vlds tune)")
    except MissingExtra as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> dict:
    require_tune()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    exp_dir = (Path(args.out) / args.name).resolve()
    from vlds.config import ConfigError
    from vlds.data.shardio import DataError

    try:
        setup = make_setup(args, exp_dir)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
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
        print(
            f"interrupted after {wall:.0f} s; the state is saved in {exp_dir}: continue with "
            f"the same arguments and --resume"
        )
        return {"interrupted": True, "exp_dir": exp_dir}

    rows = results.collect(result_grid, Path(setup.runs_dir), args.max_steps)
    results.write_csv(rows, exp_dir / "results.csv")
    results.plot_heatmap(
        rows, exp_dir / "heatmap.png", args.lr_range, args.lr_points, args.reduction_factors
    )
    milestones = rungs(args.grace, args.eta, args.max_steps)
    b = {**results.budget(rows, args.max_steps, milestones), "wall_s": round(wall, 1)}
    (exp_dir / "budget.json").write_text(json.dumps(b, indent=2) + "\n")
    best = results.best_row(rows)
    best_file = exp_dir / "best_config.json"
    best_file.write_text(json.dumps(results.best_config(best, setup), indent=2) + "\n")
    print(results.budget_text(b))
    print(
        f"best: score {best['score']:.1f} at step {best['step']}: lr {best['lr']:g}, "
        f"reduction factor {best['reduction_factor']}, {best['method']}"
    )
    print(
        f"{wall:.0f} s; in {exp_dir}: results.csv, heatmap.png, budget.json, best_config.json "
        f"(python vlds/train.py --config {best_file})"
    )
    return {"rows": rows, "budget": b, "best": best, "exp_dir": exp_dir}


if __name__ == "__main__":
    main()
