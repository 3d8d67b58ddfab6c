"""bench/search_regret.py's arithmetic on hand-made grids and searches (the real benchmark runs
Ray for most of an hour): each search's regret against its seed's grid and against the seeds'
mean, the grids' spread, the check that a search's evaluations equal its grid twin's, the
report's verdict line and the plot."""

import csv
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import search_regret  # noqa: E402

POINTS = [(0.01, 4), (0.01, 8), (0.02, 4)]
# final scores per seed: seed 3's best is (0.01, 8); seed 4's is (0.02, 4)
FINAL = {3: [80.0, 90.0, 85.0], 4: [70.0, 75.0, 78.0]}


def _experiment(folder: Path, seed: int, steps: dict, finals: dict, chosen=None, cost=16.0):
    """A search folder as tune/search.py leaves it: results.csv, run folders with their
    metrics.jsonl, budget.json and best_config.json."""
    rows = []
    for (lr, r), step in steps.items():
        run = folder / "runs" / f"t{lr}-{r}"
        run.mkdir(parents=True)
        final = finals[(lr, r)]
        # a run's evaluations depend on its seed and point only, not on where it stopped
        evals = [(s, final - (6 - s) / 10, 1.0 - s / 1000) for s in range(2, step + 1, 2)]
        run.joinpath("metrics.jsonl").write_text(
            "".join(
                json.dumps({"kind": "eval", "step": s, "average": a, "loss": x}) + "\n"
                for s, a, x in evals
            )
        )
        status = "finished" if step == 6 else "stopped"
        rows.append(
            {
                "method": "single_adapter",
                "lr": lr,
                "reduction_factor": r,
                "score": evals[-1][1],
                "best_score": evals[-1][1],
                "step": step,
                "status": status,
                "trial_id": run.name,
                "run_dir": str(run),
            }
        )
    with (folder / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    reached = {"2": len(steps), "6": sum(s == 6 for s in steps.values())}
    budget = {"full_runs_spent": cost, "reached": reached, "wall_s": 10.0}
    (folder / "budget.json").write_text(json.dumps(budget))
    if chosen:
        best = {"peft": {"method": "single_adapter", "reduction_factor": chosen[1]}}
        best["train"] = {"lr": chosen[0]}
        (folder / "best_config.json").write_text(json.dumps(best))


def test_regret_against_the_seeds_grid_and_the_seeds_mean(tmp_path):
    out, result = tmp_path / "runs", tmp_path / "result"
    for seed, finals in FINAL.items():
        finals = dict(zip(POINTS, finals, strict=True))
        _experiment(out / f"grid-seed{seed}", seed, dict.fromkeys(POINTS, 6), finals)
        chosen = (0.01, 8)  # both searches choose it: seed 3's best, not seed 4's
        steps = {p: 6 if p == chosen else 2 for p in POINTS}
        _experiment(out / f"search-seed{seed}", seed, steps, finals, chosen, cost=1.5)
    # seed 4's search evaluated (0.02, 4) differently from its grid twin at step 2
    twin = out / "search-seed4" / "runs" / "t0.02-4" / "metrics.jsonl"
    twin.write_text(twin.read_text().replace('"loss": 0.998', '"loss": 0.5'))
    got = search_regret.main(
        ["--out", str(out), "--result", str(result), "--seeds", "3,4", "--report-only"]
    )
    by_seed = {r["seed"]: r for r in got["searches"]}
    assert by_seed[3]["regret"] == 0.0 and by_seed[4]["regret"] == pytest.approx(78 - 75)
    # the seeds' mean: (0.01, 4) 75, (0.01, 8) 82.5, (0.02, 4) 81.5: the choice is the best
    assert by_seed[3]["regret_vs_mean"] == 0.0
    # seed 4's grid alone would pick (0.02, 4): 1 point below the best mean
    assert by_seed[4]["grid_pick_regret_vs_mean"] == pytest.approx(1.0)
    assert (by_seed[3]["evaluations_differing"], by_seed[4]["evaluations_differing"]) == (0, 1)
    assert by_seed[3]["evaluations_compared"] == 3 + 1 + 1  # 6 / 2 evaluations + 2 stopped
    s = got["summary"]
    assert s["median_regret"] == pytest.approx(1.5) and s["max_cost"] == 1.5
    assert not s["pass"] and not s["identical_trajectories"]
    assert s["grid_spread"]["3"] == {"best": 90.0, "median": 85.0, "worst": 80.0}
    report = (result / "report.md").read_text()
    assert report.rstrip().endswith(
        "search_regret: median regret 1.50 (max 3.00) at 1.50 full runs (max 1.50); "
        "target <= 1 at <= 5: FAIL"
    )
    png = (result / "search_regret.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((result / "results.json").read_text())
    assert saved["summary"] == s
    # every grid run's evaluations, kept for replaying rung rules: [step, average, loss]
    assert saved["grid_histories"]["lr 0.02, r 4"]["4"] == [
        [k, 78.0 - (6 - k) / 10, 1.0 - k / 1000] for k in (2, 4, 6)
    ]
    assert {len(h) for h in saved["grid_histories"].values()} == {2}  # both seeds


def test_a_finished_experiment_with_other_arguments_is_not_reused(tmp_path):
    exp = tmp_path / "grid-seed3"
    exp.mkdir()
    (exp / "results.csv").write_text("method\n")
    (tmp_path / "grid-seed3.settings.json").write_text(json.dumps(["--seed", "3"]))
    assert search_regret.run_search("grid-seed3", ["--seed", "3"], tmp_path) == exp
    with pytest.raises(SystemExit, match="delete that folder"):
        search_regret.run_search("grid-seed3", ["--seed", "3", "--max-steps", "9"], tmp_path)


# [step, average, loss]: c is the best at the end and has the lowest loss from the start, but
# the lowest averages early; a leads on the average until step 4
HISTORIES = {
    "a": [[2, 30, 2.0], [4, 35, 1.9], [6, 40, 1.8], [8, 50, 1.7]],
    "b": [[2, 28, 1.9], [4, 33, 1.85], [6, 45, 1.6], [8, 55, 1.5]],
    "c": [[2, 10, 1.2], [4, 12, 1.0], [6, 60, 0.8], [8, 90, 0.6]],
    "d": [[2, 5, 1.5], [4, 8, 1.4], [6, 20, 1.3], [8, 30, 1.2]],
}


@pytest.mark.parametrize(
    ("metric", "window", "chosen"),
    [("score", 1, "a"), ("score", 3, "a"), ("loss", 1, "c"), ("loss", 3, "c")],
)
def test_replay_decides_as_the_search_scheduler(metric, window, chosen):
    """Rungs at 2 and 4 (eta 2): 4 trials to step 2, the best 2 to 4, the best 1 to 8. By the
    average a and b survive step 2 and a step 4; by the loss c and d, then c."""
    from vlds.tune.scheduler import halving_cost

    got = search_regret.replay(HISTORIES, metric, window, max_steps=8, grace=2, eta=2)
    assert got["chosen"] == chosen
    assert got["cost_full_runs"] == (4 * 2 + 2 * 2 + 1 * 4) / 8 == halving_cost(4, 2, 2, 8) / 8


def test_replay_in_the_report_and_checked_against_the_real_searches(tmp_path):
    out, result = tmp_path / "runs", tmp_path / "result"
    # the search's rule on these runs: rungs at 2 and 6 (grace 2, eta 4), one of 3 goes on
    # from step 2 (the highest average there: each grid's best), cost (3 x 2 + 4) / 6
    picks = {3: (0.01, 8), 4: (0.02, 4)}
    for seed, finals in FINAL.items():
        finals = dict(zip(POINTS, finals, strict=True))
        _experiment(out / f"grid-seed{seed}", seed, dict.fromkeys(POINTS, 6), finals)
        steps = {p: 6 if p == picks[seed] else 2 for p in POINTS}
        _experiment(out / f"search-seed{seed}", seed, steps, finals, picks[seed], cost=1.67)
    args = ["--out", str(out), "--result", str(result), "--seeds", "3,4", "--report-only"]
    search_args = ["--", "--max-steps", "6", "--eval-every", "2", "--grace", "2"]
    search_regret.main([*args, "--replay", *search_args])
    saved = json.loads((result / "results.json").read_text())
    rules = [(r["rule"]["rung_metric"], r["rule"]["window"]) for r in saved["replays"]]
    assert rules == search_regret.RULES
    own = next(r for r in saved["replays"] if r["default"])
    assert own["rule"] == {"rung_metric": "loss", "window": 3}
    assert own["seeds"]["3"] == {"chosen": "lr 0.01, r 8", "cost_full_runs": 1.67, "regret": 0.0}
    # the loss depends on the step alone here: every trial ties on it, and the average (the
    # tie metric) decides, as ranking by the average does
    score = next(r for r in saved["replays"] if r["rule"] == {"rung_metric": "score", "window": 1})
    assert score["seeds"] == own["seeds"]
    report = (result / "report.md").read_text()
    assert "| validation loss, last 3 (the search's) | lr 0.01, r 8 (0.0), 1.67 |" in report
    assert "chose as the real searches, at their cost: yes, on every seed." in report
    # a search that chose otherwise than its replay is reported
    best = out / "search-seed4" / "best_config.json"
    best.write_text(best.read_text().replace('"reduction_factor": 4', '"reduction_factor": 8')
                    .replace('"lr": 0.02', '"lr": 0.01'))  # fmt: skip
    search_regret.main([*args, "--replay", *search_args])
    assert "NO: the replay is not faithful" in (result / "report.md").read_text()
