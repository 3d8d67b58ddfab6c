"""How well the default search chooses: its regret against the full grid, over several seeds.

    python bench/search_regret.py                   # 3 seeds: a grid and a search each (~45 min)
    python bench/search_regret.py --report-only     # re-write the report from finished runs
    python bench/search_regret.py --compare-asha    # and `--scheduler asha` on the same seeds
    python bench/search_regret.py --seeds 0 -- --max-steps 480
    python bench/search_regret.py --report-only --replay  # and other rung rules, replayed

For each seed S (the trials' train.seed: initialisation and data order):

1. Grid: `python tune/search.py --scheduler grid --seed S`: every configuration of the default
   search space trained to the end with the search's own settings.
2. Search: `python tune/search.py --seed S`, the default search (successive halving).
3. Its cost in full runs (trial-steps spent / max steps), the configuration it chose
   (best_config.json), and its regret: the best final score of seed S's grid minus the chosen
   configuration's final score in that grid, the choice against exhaustive search under the
   same training noise (a search's trials train exactly as the grid's runs of their seed, which
   the report checks evaluation by evaluation). Target (issue 17): median regret over the seeds
   <= 1 point of the validation average at <= 5 full runs' cost.

The scale beside it: the spread of each grid (best, median, worst), each configuration's
standard deviation over the seeds (the noise of a single run), and the regret of every choice
measured against the configurations' mean over the seeds, for the searches and for each
single-seed grid itself (what exhaustive search at one seed gets).

Arguments after `--` go to every grid and search. A finished grid or search (its results.csv,
with the same arguments: settings.json) is never redone, so an interrupted benchmark continues
where it stopped and a re-run with other arguments asks for another --out. Output in --result:
report.md, search_regret.png (the seeds' mean grid with each search's pick, and each search's
regret against its cost), results.json (the scores, the searches, the summary, and every grid
run's evaluations as [step, average, loss]: a rung rule replays on them without training).

`--replay` does that for the rung rules in RULES (what a rung ranks by, over how many of a
trial's last evaluations): the search's own scheduler (vlds.tune.scheduler.SuccessiveHalving)
is fed each seed's grid runs' evaluations as their trials would have reported them, and the
report gains each rule's choice, cost and regret per seed. Successive halving is synchronous
(a rung waits for every trial), so its decisions do not depend on the order results arrive in,
and a trial's evaluations equal its grid twin's (checked above): the replay decides as a search
would. The replay of the search's own rule must choose what the real search chose, at its cost
(the report says whether it did).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_REGRET, TARGET_COST = 1.0, 5.0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "search_regret")
    p.add_argument("--result", type=Path, default=REPO / "bench" / "search_regret_result")
    # seeds 0-2 chose the search's defaults (rung window, metric, grace): measured on others
    p.add_argument("--seeds", default="3,4,5", help="comma list: a grid and a search each")
    p.add_argument(
        "--compare-asha",
        action="store_true",
        help="also one `--scheduler asha` search per seed (the previous default), side by side",
    )
    p.add_argument("--report-only", action="store_true")
    p.add_argument(
        "--replay",
        action="store_true",
        help="also replay the rung rules of RULES on each seed's grid (no training)",
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.seeds = [int(x) for x in args.seeds.split(",")]
    args.extra = extra
    return args


def run_search(name: str, argv: list[str], out: Path) -> Path:
    """`python tune/search.py ARGV --out OUT --name NAME` unless it already finished with the
    same ARGV; returns its folder."""
    exp = out / name
    settings = out / f"{name}.settings.json"
    if (exp / "results.csv").is_file():
        saved = json.loads(settings.read_text()) if settings.is_file() else None
        if saved != argv:
            raise SystemExit(
                f"{exp} ran with {saved}, this benchmark asks for {argv}: delete that folder "
                f"to redo it, or pass another --out"
            )
        return exp
    out.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps(argv) + "\n")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "tune/search.py", *argv, "--out", str(out), "--name", name]
    log = out / f"{name}.log"
    t0 = time.time()
    with log.open("w") as f:
        p = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode != 0 or not (exp / "results.csv").is_file():
        tail = log.read_text()[-2000:]
        raise SystemExit(f"{name} failed (exit {p.returncode}); log {log}:\n{tail}")
    budget = json.loads((exp / "budget.json").read_text())
    print(f"{name}: {time.time() - t0:.0f} s, {budget['full_runs_spent']} full runs", flush=True)
    return exp


def read_rows(exp: Path) -> list[dict]:
    with (exp / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["lr"], r["reduction_factor"] = float(r["lr"]), int(r["reduction_factor"])
        r["score"] = float(r["score"]) if r["score"] else None
        r["step"] = int(r["step"])
    return rows


def point(row: dict) -> tuple:
    return (row["method"], row["lr"], row["reduction_factor"])


def evals(run_dir: str) -> dict[int, tuple]:
    """{step: (validation average, validation loss)} of a run's evaluations."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == "eval":
            out[row["step"]] = (row["average"], row.get("loss"))
    return out


def grid_scores(exp: Path, seed: int) -> dict[tuple, dict]:
    """{point: {"score": final score, "run_dir"}} of one grid; every run trained to the end."""
    table = {}
    for r in read_rows(exp):
        if r["status"] != "finished":
            raise SystemExit(f"grid seed {seed}: {point(r)} ended {r['status']}; see {exp}")
        table[point(r)] = {"score": r["score"], "run_dir": r["run_dir"]}
    return table


def search_row(seed: int, exp: Path, grid: dict, mean: dict) -> dict:
    """One search against its seed's grid (and against the seeds' mean)."""
    best = json.loads((exp / "best_config.json").read_text())
    chosen = (best["peft"]["method"], best["train"]["lr"], best["peft"]["reduction_factor"])
    if chosen not in grid:
        raise SystemExit(f"search seed {seed} chose {chosen}, which is not in the grid")
    rows = read_rows(exp)
    budget = json.loads((exp / "budget.json").read_text())
    # every evaluation a search's trial made equals its grid twin's at that step
    compared = differ = 0
    for r in rows:
        twin = evals(grid[point(r)]["run_dir"])
        for step, values in evals(r["run_dir"]).items():
            compared += 1
            differ += twin.get(step) != values
    top = max(c["score"] for c in grid.values())
    return {
        "seed": seed,
        "cost_full_runs": budget["full_runs_spent"],
        "reached": budget["reached"],
        "wall_s": budget.get("wall_s"),
        "chosen": list(chosen),
        "search_score": next(r["score"] for r in rows if point(r) == chosen),
        "grid_best": top,
        "grid_best_point": list(max(grid, key=lambda p: grid[p]["score"])),
        "grid_score": grid[chosen]["score"],
        "regret": top - grid[chosen]["score"],
        "regret_vs_mean": max(mean.values()) - mean[chosen],
        "grid_pick_regret_vs_mean": max(mean.values())
        - mean[max(grid, key=lambda p: grid[p]["score"])],
        "evaluations_compared": compared,
        "evaluations_differing": differ,
    }


def summary(grids: dict, mean: dict, searches: list[dict]) -> dict:
    finals = {s: sorted((c["score"] for c in g.values()), reverse=True) for s, g in grids.items()}
    stds = [
        statistics.stdev([g[p]["score"] for g in grids.values()]) if len(grids) > 1 else 0.0
        for p in mean
    ]
    regrets = [s["regret"] for s in searches]
    costs = [s["cost_full_runs"] for s in searches]
    med = statistics.median(regrets)
    return {
        "grid_spread": {
            str(s): {"best": f[0], "median": statistics.median(f), "worst": f[-1]}
            for s, f in finals.items()
        },
        "run_std_median": statistics.median(stds),
        "median_regret": med,
        "max_regret": max(regrets),
        "median_regret_vs_mean": statistics.median(s["regret_vs_mean"] for s in searches),
        "median_grid_pick_regret_vs_mean": statistics.median(
            s["grid_pick_regret_vs_mean"] for s in searches
        ),
        "median_cost": statistics.median(costs),
        "max_cost": max(costs),
        "identical_trajectories": all(s["evaluations_differing"] == 0 for s in searches),
        "pass": med <= TARGET_REGRET and max(costs) <= TARGET_COST,
    }


# rung rules replayed by --replay: (what a rung ranks by, evaluations averaged); the other
# metric breaks ties, as in tune/search.py
RULES = [("score", 3), ("score", 1), ("loss", 3), ("loss", 1)]


class _Trial:
    """What SuccessiveHalving reads of one of Tune's trials."""

    def __init__(self, trial_id: str):
        self.trial_id, self.status, self.is_saving = trial_id, "RUNNING", False


class _Controller:
    """What SuccessiveHalving calls on Tune's controller."""

    def __init__(self, trials: list[_Trial]):
        self.trials = trials

    def get_trials(self) -> list[_Trial]:
        return self.trials

    def stop_trial(self, trial: _Trial) -> None:
        trial.status = "TERMINATED"


def replay(histories: dict[str, list], rung_metric: str, window: int, max_steps: int,
           grace: int, eta: int) -> dict:  # fmt: skip
    """Successive halving over recorded evaluations {label: [[step, average, loss], ...]}
    (every trial's to max_steps): {"chosen": the label a search would report best (the highest
    final score among the trials that reached max_steps), "cost_full_runs": trial-steps spent /
    max_steps}. The scheduler is tune/search.py's, configured as it configures it."""
    from vlds.tune.scheduler import CONTINUE, PAUSE, STOP, SuccessiveHalving
    from vlds.tune.search import rung_rule

    sched = SuccessiveHalving(
        max_steps, grace, eta, n_trials=len(histories), metric="score", mode="max",
        window=window, **rung_rule(rung_metric),
    )  # fmt: skip
    trials = {name: _Trial(name) for name in histories}
    controller = _Controller(list(trials.values()))
    for t in trials.values():
        sched.on_trial_add(controller, t)
    fed = dict.fromkeys(histories, 0)  # evaluations reported so far
    while True:
        # a trial runs when it is not stopped, not waiting at an undecided rung and not done
        ready = [
            n for n, t in trials.items()
            if t.status != "TERMINATED" and sched.waiting_at(n) is None
            and fed[n] < len(histories[n])
        ]  # fmt: skip
        if not ready:
            break
        for name in ready:
            t, action = trials[name], CONTINUE
            t.status = "RUNNING"
            while action == CONTINUE and fed[name] < len(histories[name]):
                step, average, loss = histories[name][fed[name]]
                fed[name] += 1
                result = {"step": step, "score": average, "loss": loss}
                action = sched.on_trial_result(controller, t, result)
            if action == STOP:
                t.status = "TERMINATED"
            elif action == PAUSE:
                t.status = "PAUSED"
            else:  # trained to the end
                t.status = "TERMINATED"
                sched.on_trial_complete(controller, t, result)
    spent = {n: histories[n][fed[n] - 1][0] if fed[n] else 0 for n in histories}
    done = [n for n in histories if spent[n] >= max_steps]
    if not done:
        raise ValueError(f"no trial reached step {max_steps}: the histories end at {spent}")
    return {
        "chosen": max(done, key=lambda n: histories[n][-1][1]),
        "cost_full_runs": round(sum(spent.values()) / max_steps, 2),
    }


def replays(args, grids: dict, searches: list[dict]) -> list[dict]:
    """Each rule of RULES replayed on each seed's grid: [{"rule", "default", "seeds": {seed:
    {"chosen", "cost_full_runs", "regret"}}, "median_regret", "max_cost"}]."""
    from vlds.tune.search import parse_args as search_args

    sa = search_args(args.extra)
    rows = []
    for metric, window in RULES:
        per = {}
        for seed, grid in grids.items():
            histories = {label(p): evals_list(c["run_dir"]) for p, c in grid.items()}
            got = replay(histories, metric, window, sa.max_steps, sa.grace, sa.eta)
            top = max(c["score"] for c in grid.values())
            chosen = next(c for p, c in grid.items() if label(p) == got["chosen"])
            per[seed] = {**got, "regret": round(top - chosen["score"], 2)}
        rows.append(
            {
                "rule": {"rung_metric": metric, "window": window},
                "default": (metric, window) == (sa.rung_metric, sa.rung_window),
                "seeds": per,
                "median_regret": statistics.median(r["regret"] for r in per.values()),
                "max_cost": max(r["cost_full_runs"] for r in per.values()),
            }
        )
    own = next((r for r in rows if r["default"]), None)
    for s in searches if own else ():
        mine = own["seeds"][s["seed"]]
        s["replay_agrees"] = (
            mine["chosen"] == label(s["chosen"])
            and abs(mine["cost_full_runs"] - s["cost_full_runs"]) < 0.01
        )
    return rows


def replay_table(rows: list[dict], searches: list[dict]) -> list[str]:
    seeds = list(rows[0]["seeds"])
    lines = [
        "| rung rule | " + " | ".join(f"seed {x}: choice (regret), cost" for x in seeds)
        + " | median regret | max cost |",
        "|---|" + "---|" * len(seeds) + "---:|---:|",
    ]  # fmt: skip
    for r in rows:
        what = {"score": "validation average", "loss": "validation loss"}[r["rule"]["rung_metric"]]
        name = f"{what}, last {r['rule']['window']}" + (" (the search's)" if r["default"] else "")
        cells = [
            f"{c['chosen']} ({c['regret']:.1f}), {c['cost_full_runs']:.2f}"
            for c in r["seeds"].values()
        ]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {r['median_regret']:.1f} | "
            f"{r['max_cost']:.2f} |"
        )
    agree = [s.get("replay_agrees") for s in searches]
    if any(a is not None for a in agree):
        verdict = "yes, on every seed" if all(agree) else "NO: the replay is not faithful"
        lines += ["", f"The replay of the search's own rule chose as the real searches, at their "
                      f"cost: {verdict}."]  # fmt: skip
    return lines


def evals_list(run_dir: str) -> list[list]:
    return [[k, *v] for k, v in sorted(evals(run_dir).items())]


def label(p) -> str:
    return f"lr {p[1]:g}, r {p[2]}" + ("" if p[0] == "single_adapter" else f", {p[0]}")


def search_table(rows: list[dict]) -> list[str]:
    lines = [
        "| seed | cost (full runs) | trials at each rung | chosen | its score | seed's best "
        "(grid) | regret | regret vs the seeds' mean (grid's own pick) | evaluations equal "
        "to the grid's | wall (s) |",
        "|---:|---:|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        reached = " / ".join(str(n) for n in r["reached"].values())
        same = r["evaluations_compared"] - r["evaluations_differing"]
        lines.append(
            f"| {r['seed']} | {r['cost_full_runs']:.2f} | {reached} | "
            f"{label(r['chosen'])} | {r['search_score']:.1f} | "
            f"{label(r['grid_best_point'])}: {r['grid_best']:.1f} | {r['regret']:.1f} | "
            f"{r['regret_vs_mean']:.1f} ({r['grid_pick_regret_vs_mean']:.1f}) | "
            f"{same} / {r['evaluations_compared']} | {r['wall_s']:.0f} |"
        )
    return lines


def write_report(args, grids, mean, searches, s, result: Path, asha=(), replayed=()):
    seeds = list(grids)
    lines = [
        "# Search regret: the default search against the full grid",
        "",
        f"Seeds {seeds} (each: a grid and a search with that train.seed); search arguments "
        f"`{' '.join(args.extra) or '(the defaults)'}`. Score: the validation average at the "
        "last step.",
        "",
        "## The grids",
        "",
        "| configuration | " + " | ".join(f"seed {x}" for x in seeds) + " | mean | std |",
        "|---|" + "---:|" * (len(seeds) + 2),
    ]
    for p in sorted(mean, key=lambda q: -mean[q]):
        per = [grids[x][p]["score"] for x in seeds]
        sd = statistics.stdev(per) if len(per) > 1 else 0.0
        lines.append(
            f"| {label(p)} | " + " | ".join(f"{v:.1f}" for v in per) + f" | {mean[p]:.1f} | "
            f"{sd:.1f} |"
        )
    spread = "; ".join(
        f"seed {x}: best {v['best']:.1f}, median {v['median']:.1f}, worst {v['worst']:.1f}"
        for x, v in s["grid_spread"].items()
    )
    lines += [
        "",
        f"Spread of each grid: {spread}. A single run's noise (the median over configurations "
        f"of the std over seeds): {s['run_std_median']:.1f} points.",
        "",
        "## The searches (the default: successive halving)",
        "",
        *search_table(searches),
    ]
    if asha:
        regrets = [r["regret"] for r in asha]
        costs = [r["cost_full_runs"] for r in asha]
        lines += [
            "",
            "## Asynchronous ASHA (`--scheduler asha`, the previous default), same seeds",
            "",
            *search_table(asha),
            "",
            f"Median regret {statistics.median(regrets):.2f} (max {max(regrets):.2f}) at "
            f"{statistics.median(costs):.2f} full runs (max {max(costs):.2f}).",
        ]
    if replayed:
        lines += [
            "",
            "## Rung rules replayed on the grids (`--replay`)",
            "",
            *replay_table(replayed, searches),
        ]
    verdict = "PASS" if s["pass"] else "FAIL"
    lines += [
        "",
        f"Against the seeds' mean, the searches' median regret is "
        f"{s['median_regret_vs_mean']:.1f} and the single-seed grids' own picks' "
        f"{s['median_grid_pick_regret_vs_mean']:.1f}: what one run per configuration can tell.",
        "",
        f"search_regret: median regret {s['median_regret']:.2f} (max {s['max_regret']:.2f}) "
        f"at {s['median_cost']:.2f} full runs (max {s['max_cost']:.2f}); target <= "
        f"{TARGET_REGRET:g} at <= {TARGET_COST:g}: {verdict}",
    ]
    (result / "report.md").write_text("\n".join(lines) + "\n")
    print(lines[-1])


def plot(mean: dict, searches: list[dict], path: Path, asha=()) -> None:
    """Left: the configurations' mean final score over the seeds (lr x reduction factor), each
    search's pick marked; right: each search's regret against its cost, the target shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lrs, rfs = sorted({p[1] for p in mean}), sorted({p[2] for p in mean})
    grid = np.full((len(rfs), len(lrs)), np.nan)
    for p, v in mean.items():
        i, j = rfs.index(p[2]), lrs.index(p[1])
        grid[i, j] = v if np.isnan(grid[i, j]) else max(v, grid[i, j])
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.4), gridspec_kw={"width_ratios": [1.3, 1]})
    im = a.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
    mid = np.nanmean(grid)
    for i, j in zip(*np.nonzero(~np.isnan(grid)), strict=True):
        colour = "white" if grid[i, j] < mid else "black"
        a.text(j, i - 0.2, f"{grid[i, j]:.1f}", ha="center", va="center", color=colour)
    for k, r in enumerate(searches):
        i, j = rfs.index(r["chosen"][2]), lrs.index(r["chosen"][1])
        a.text(j - 0.3 + 0.3 * k, i + 0.22, f"s{r['seed']}", color="red", fontsize=8)
    a.set_xticks(range(len(lrs)), [f"{x:g}" for x in lrs])
    a.set_yticks(range(len(rfs)), [str(x) for x in rfs])
    a.set(xlabel="learning rate", ylabel="reduction factor")
    a.set_title("grid: mean final score over the seeds (red: search picks)", fontsize=10)
    fig.colorbar(im, ax=a, label="validation average")
    b.add_patch(plt.Rectangle((0, 0), TARGET_COST, TARGET_REGRET, color="green", alpha=0.15))
    for n, r in enumerate(searches):
        b.plot(r["cost_full_runs"], r["regret"], "o", color="C0",
               label="halving: vs the seed's grid" if n == 0 else None)  # fmt: skip
        b.plot(r["cost_full_runs"], r["regret_vs_mean"], "x", color="C1",
               label="halving: vs the seeds' mean" if n == 0 else None)  # fmt: skip
    for n, r in enumerate(asha):
        b.plot(r["cost_full_runs"], r["regret"], "s", color="C3", mfc="none",
               label="ASHA: vs the seed's grid" if n == 0 else None)  # fmt: skip
    for r in [*searches, *asha]:
        b.annotate(f"seed {r['seed']}", (r["cost_full_runs"], r["regret"]), fontsize=8,
                   textcoords="offset points", xytext=(6, -3))  # fmt: skip
    every = [*searches, *asha]
    top = max([TARGET_REGRET * 2] + [1.2 * max(r["regret"], r["regret_vs_mean"]) for r in every])
    xmax = 1.15 * max([TARGET_COST] + [r["cost_full_runs"] for r in every])
    b.set(xlim=(0, xmax), ylim=(-0.05 * top, top), xlabel="cost (full runs)",
          ylabel="regret (points)")  # fmt: skip
    b.set_title("regret against cost (green: the target)", fontsize=10)
    b.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.result.mkdir(parents=True, exist_ok=True)
    from vlds.tune import space

    # the rung rule spelled out, so that a search cached under another default is not reused
    rule = ["--rung-metric", space.RUNG_METRIC, "--rung-window", str(space.RUNG_WINDOW)]
    kinds = [("grid", ["--scheduler", "grid"]), ("search", rule)]
    kinds += [("asha", ["--scheduler", "asha", *rule])] if args.compare_asha else []
    exps: dict[str, dict[int, Path]] = {kind: {} for kind, _ in kinds}
    for seed in args.seeds:
        for kind, extra in kinds:
            name = f"{kind}-seed{seed}"
            exp = args.out / name
            if not args.report_only:
                exp = run_search(name, [*extra, "--seed", str(seed), *args.extra], args.out)
            exps[kind][seed] = exp
    grids, found = exps["grid"], exps["search"]
    grids = {seed: grid_scores(exp, seed) for seed, exp in grids.items()}
    points = set.intersection(*(set(g) for g in grids.values()))
    mean = {p: statistics.mean(g[p]["score"] for g in grids.values()) for p in points}
    searches = [search_row(seed, found[seed], grids[seed], mean) for seed in args.seeds]
    asha = [search_row(x, exps["asha"][x], grids[x], mean) for x in exps.get("asha", {})]
    s = summary(grids, mean, searches)
    replayed = replays(args, grids, searches) if args.replay else []
    write_report(args, grids, mean, searches, s, args.result, asha, replayed)
    plot(mean, searches, args.result / "search_regret.png", asha)
    cells = {label(p): {str(x): g[p]["score"] for x, g in grids.items()} for p in points}
    # every evaluation of every grid run, [step, average, loss]: a rung rule (where, on what
    # metric) replays on these without training anything, as the search's trials equal them
    histories = {
        label(p): {str(x): evals_list(g[p]["run_dir"]) for x, g in grids.items()} for p in points
    }
    result = {"grid": cells, "grid_histories": histories, "searches": searches, "asha": asha}
    result["replays"] = replayed
    (args.result / "results.json").write_text(json.dumps({**result, "summary": s}, indent=2) + "\n")
    print(f"report: {args.result / 'report.md'}, plot: {args.result / 'search_regret.png'}")
    return {"grids": grids, "searches": searches, "summary": s}


if __name__ == "__main__":
    main()
