"""vlds/tune/ (the search and its parts; `python tune/search.py` is its script) on CPU: the
strict-ASHA scheduler driven by scripted results (no Ray cluster), best_config's keys, and end to
end a 4-configuration ASHA search, interrupted and resumed, then its CSV, heatmap, budget report
and best configuration (which vlds/train.py must accept)."""

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from vlds.config import build_config, keys_with_role, parse_cli, validate
from vlds.tune import results, space
from vlds.tune.scheduler import (
    CONTINUE,
    PAUSE,
    STOP,
    StrictASHA,
    SuccessiveHalving,
    halving_cost,
)
from vlds.tune.space import rungs

REPO = Path(__file__).resolve().parent.parent


def _asha(max_steps, grace, eta, names, ray=False):
    """Strict ASHA (ray: Ray's, same rungs) and fake trials (only trial_id is read: no cluster)."""
    from ray.tune.schedulers import ASHAScheduler

    s = StrictASHA(max_steps, grace, eta)
    if ray:
        s = ASHAScheduler(
            "step",
            max_t=max_steps - 1,
            grace_period=grace,
            reduction_factor=eta,
            stop_last_trials=False,
        )
    assert s.set_search_properties("score", "max")
    trials = {n: SimpleNamespace(trial_id=n) for n in names}
    for t in trials.values():
        s.on_trial_add(None, t)
    return s, trials


def test_strict_asha_decisions_on_a_scripted_sequence_ties_stop():
    assert rungs(120, 4, 960) == [120, 480, 960] and rungs(2, 3, 6) == [2, 6]
    (ours, trials), (ray_asha, _) = (_asha(960, 120, 4, "abcdefg", ray=r) for r in (0, 1))
    assert ours.milestones == [120, 480] and not ours.set_search_properties("score", None)
    script = [  # (trial, step, score, ours, Ray's); cutoff: the 75th percentile at the rung
        ("a", 60, 10.0, CONTINUE, CONTINUE),  # below the first rung: nothing recorded
        ("a", 120, 50.0, CONTINUE, CONTINUE),  # first at the rung: no cutoff yet, goes on
        ("b", 120, 50.0, STOP, CONTINUE),  # [50] -> 50: a tie stops
        ("c", 120, 40.0, STOP, STOP),  # [50, 50] -> 50
        ("d", 120, 60.0, CONTINUE, CONTINUE),  # [40, 50, 50] -> 50
        ("e", 120, 52.5, STOP, CONTINUE),  # [40, 50, 50, 60] -> 52.5: a tie stops
        ("f", 120, 55.0, CONTINUE, CONTINUE),  # [40, 50, 50, 52.5, 60] -> 52.5
        ("g", 120, 54.0, STOP, STOP),  # [40, 50, 50, 52.5, 55, 60] -> 54.375
        ("a", 240, 0.0, CONTINUE, CONTINUE),  # between rungs: decided at 120 already
        ("d", 480, 30.0, CONTINUE, CONTINUE),  # first at rung 480
        ("a", 480, 30.0, STOP, CONTINUE),  # [30] -> 30: a tie stops
        ("d", 960, 0.0, CONTINUE, CONTINUE),  # the last report is never cut (no rung there)
        ("f", 600, 20.0, STOP, STOP),  # a first report past 480 counts at 480: [30, 30] -> 30
    ]
    cutoffs = []
    for name, step, score, want, want_ray in script:
        cutoffs += [ours.cutoff(120)] if step == 120 else []
        result = {"step": step, "score": score}
        assert ours.on_trial_result(None, trials[name], result) == want, (name, step)
        assert ray_asha.on_trial_result(None, trials[name], result) == want_ray, (name, step)
    assert cutoffs == [None, 50.0, 50.0, 50.0, 52.5, 52.5, 54.375]
    assert ours.on_trial_result(None, trials["b"], {"step": 480}) == CONTINUE  # no score: no-op
    assert ours.cutoff(480) == 30.0 and "num_stopped=6" in ours.debug_string()
    ours.on_trial_complete(None, trials["b"], {"step": 480, "score": 100.0})  # counts at 480
    assert ours.cutoff(480) == 47.5  # [20, 30, 30, 100]
    with pytest.raises(ValueError, match="metric"):  # neither given here nor by TuneConfig
        StrictASHA(960, 120, 4).on_trial_add(None, trials["a"])


def test_strict_asha_matches_rays_asha_without_ties():
    """Random asynchronous arrivals, scores that never tie: the same decisions as Ray's ASHA."""
    rng, decisions = random.Random(0), 0
    for _ in range(200):
        eta, grace = rng.choice([2, 3, 4]), rng.choice([1, 2, 120])
        max_steps = grace * eta ** rng.randint(1, 3) + rng.choice([0, 1, grace])
        names = [f"t{i}" for i in range(rng.randint(1, 12))]
        (ours, trials), (ray_asha, _) = (_asha(max_steps, grace, eta, names, r) for r in (0, 1))
        steps = dict.fromkeys(names, 0)
        while steps:
            name = rng.choice(sorted(steps))
            steps[name] += grace
            result = {"step": steps[name], "score": rng.uniform(0, 100)}
            decision = ours.on_trial_result(None, trials[name], result)
            assert decision == ray_asha.on_trial_result(None, trials[name], result)
            decisions += 1
            if decision == STOP or steps[name] >= max_steps:
                del steps[name]
    assert decisions > 1000


def test_best_config_leaves_out_run_keys_and_the_embedded_data_root():
    old_run_keys = {
        "train.keep_last",
        "train.log_every",
        "data.num_workers",
        "eval.max_samples",
        "eval.caption_beams",
        "eval.every",
        "train.out_dir",
        "train.resume",
        "train.save_every",
    }  # the hand-kept list keys_with_role replaced
    assert old_run_keys <= set(keys_with_role("run"))
    overrides = {
        **space.TINY_SEARCH,
        **space.TRIAL_RUN,
        "data.root": "/shapes",
        "eval.batch_size": "8",
        "train.warmup_ratio": "0.2",
    }
    row = {"lr": 0.0014, "reduction_factor": 4, "method": "single_adapter"}
    want = {
        "preset": "tiny",
        "data": {"batch_size": 16},
        "peft": {"method": "single_adapter", "reduction_factor": 4},
        "train": {"lr": 0.0014, "max_steps": 6, "warmup_ratio": 0.2},
    }
    for embedded in (True, False):
        want["data"].update({} if embedded else {"root": "/shapes"})
        setup = space.Setup("tiny", overrides, "/runs", 6, 2, embedded_data=embedded)
        assert results.best_config(row, setup) == want


def test_trial_config_from_overrides_equals_the_torchrun_argv():
    """One overrides dict: a Config in the trial's process, torchrun's argv (signals differ)."""
    from vlds.tune import search  # the entry imports (its modules, package-relative)

    point = {"lr": 0.0014, "reduction_factor": 4, "method": "single_adapter"}
    for procs, java in ((1, False), (2, True)):
        setup = space.Setup("tiny", {"data.batch_size": "8"}, "/runs", 6, 2, procs, java)
        overrides = search.trial_overrides(setup, point, Path("/runs/t1"))
        cfg = build_config("tiny", overrides)
        validate(cfg)
        argv = ["--preset", "tiny", *(f"--{k}={v}" for k, v in overrides.items())]
        assert parse_cli(argv) == (cfg, [])  # what torchrun's ranks parse
        assert (cfg.train.handle_signals, cfg.eval.java_metrics) == (procs > 1, java)
        assert (cfg.train.lr, cfg.peft.reduction_factor, cfg.data.batch_size) == (0.0014, 4, 8)
        assert (cfg.train.max_steps, cfg.eval.every, cfg.train.save_every) == (6, 2, 2)
        assert (cfg.train.out_dir, cfg.train.resume) == ("/runs/t1", "latest")


def _search_args(root, out, *extra):
    return [
        "tune/search.py",
        f"--out={out}",
        "--name=t",
        "--lr-points=2",
        "--reduction-factors=4,8",
        "--max-steps=6",
        "--grace=2",
        "--eta=3",
        "--eval-every=2",
        f"--data.root={root}",
        "--data.batch_size=8",
        "--eval.max_samples=8",
        "--eval.batch_size=8",
        *extra,
    ]


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1"}


def _rows(run: Path, kind: str) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def _waiting(state_file: Path) -> int:
    """Trials waiting at the first rung, undecided (0 while the state is being written)."""
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return 0
    return 0 if state["decided"] else len(state["values"]["2"])


@pytest.fixture(scope="module")
def searched(shapes_root, tmp_path_factory):
    """The default search (successive halving), interrupted (SIGINT) while two trials wait at
    its rung, then resumed."""
    out = tmp_path_factory.mktemp("tune")
    args = [sys.executable, *_search_args(shapes_root, out)]
    proc = subprocess.Popen(
        args, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    t0 = time.time()
    while _waiting(out / "t" / space.HALVING_STATE) < 2:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - t0 < 240, "no two trials reached the rung"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    first = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, first[-3000:]
    assert "continue with the same arguments and --resume" in first, first[-3000:]
    p = subprocess.run(
        [*args, "--resume"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out / "t", p.stdout


def test_every_configuration_ran_once_and_the_best_at_the_rung_went_on(searched):
    exp, _ = searched
    rows = list(csv.DictReader((exp / "results.csv").open()))
    points = {(float(r["lr"]), int(r["reduction_factor"])) for r in rows}
    assert len(rows) == 4 and points == {
        (lr, rf) for lr in space.lr_grid(1e-3, 4e-2, 2) for rf in (4, 8)
    }
    state = json.loads((exp / space.HALVING_STATE).read_text())
    at_rung = state["values"]["2"]  # [-loss, score] per trial, as each reported at the rung
    assert len(at_rung) == 4  # every trial reached the rung, the interrupted ones included
    for r in rows:
        step, run = int(r["step"]), Path(r["run_dir"])
        # a stopped trial halts at the rung; one that was waiting there when the search was
        # interrupted may be restarted by Tune on resume and train one more evaluation before
        # it waits again. The steps charged are the steps trained.
        assert step in (2, 4, 6) and r["status"] == ("finished" if step == 6 else "stopped")
        assert max(e["step"] for e in _rows(run, "eval")) == step
        assert all(t["step"] <= step for t in _rows(run, "train"))
        assert (run / "metrics.json").is_file() == (step == 6)
        assert float(r["score"]) == _rows(run, "eval")[-1]["average"]
        neg_loss, score = at_rung[r["trial_id"]]  # what the rung ranked: an evaluation's
        assert any((-e["loss"], e["average"]) == (neg_loss, score) for e in _rows(run, "eval"))
    # 4 // 3 = 1 goes on: the best at the rung by loss, then by score
    best = max(at_rung, key=lambda t: at_rung[t])
    assert [r["trial_id"] for r in rows if r["step"] == "6"] == [best] == state["decided"]["2"]


def test_budget_report_is_consistent(searched):
    exp, stdout = searched
    rows = list(csv.DictReader((exp / "results.csv").open()))
    b = json.loads((exp / "budget.json").read_text())
    spent = sum(int(r["step"]) for r in rows)
    assert b["trial_steps_spent"] == spent and b["trial_steps_all_to_end"] == 4 * 6
    assert b["full_runs_spent"] == round(spent / 6, 2) and b["configurations"] == 4
    assert b["reached"] == {"2": 4, "6": sum(int(r["step"]) == 6 for r in rows)}
    assert results.budget_text(b) in stdout


def test_heatmap_is_a_png(searched):
    exp, _ = searched
    png = (exp / "heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_best_config_is_a_config_file_train_py_accepts(searched, shapes_root):
    exp, stdout = searched
    rows = list(csv.DictReader((exp / "results.csv").open()))
    best = max((r for r in rows if r["status"] == "finished"), key=lambda r: float(r["score"]))
    cfg, rest = parse_cli(["--config", str(exp / "best_config.json")])
    assert rest == []
    validate(cfg)
    assert cfg.train.lr == float(best["lr"])
    assert cfg.peft.reduction_factor == int(best["reduction_factor"])
    assert (cfg.train.max_steps, cfg.data.batch_size, cfg.data.root) == (6, 8, str(shapes_root))
    # everything the winning trial trained with, bar where and how it ran (the "run" fields)
    trained = json.loads((Path(best["run_dir"]) / "config.json").read_text())
    assert (trained["train"]["handle_signals"], trained["eval"]["java_metrics"]) == (False, False)
    sections = ("model", "peft", "data", "train")
    run_keys = {
        "data.num_workers",
        "data.prefetch_factor",
        "train.out_dir",
        "train.resume",
        "train.save_every",
        "train.save_every_minutes",
        "train.keep_last",
        "train.log_every",
        "train.handle_signals",
        "train.report_to",
    }
    assert run_keys == {k for k in keys_with_role("run") if k.split(".")[0] in sections}
    for section in sections:
        ours = {
            k: v
            for k, v in getattr(cfg, section).__dict__.items()
            if f"{section}.{k}" not in run_keys
        }
        assert ours == {
            k: v for k, v in trained[section].items() if f"{section}.{k}" not in run_keys
        }, section
    assert f"--config {exp / 'best_config.json'}" in stdout


def test_bad_search_arguments_fail_before_ray_starts(shapes_root, tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, "tune/search.py", f"--out={tmp_path}", *args],
            cwd=REPO,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )

    p = run("--reduction-factors=3", f"--data.root={shapes_root}")
    assert p.returncode == 2 and "peft.reduction_factor=3 does not divide d_model=64" in p.stderr
    p = run("--data.root", "/nonexistent/shards")  # both override forms are read
    assert p.returncode == 2 and "data folder /nonexistent/shards does not exist" in p.stderr
    p = run("--data.root")
    assert p.returncode == 2 and "needs a value" in p.stderr
    p = run("--grace=50")
    assert p.returncode == 2 and "not a multiple of --eval-every" in p.stderr
    p = run("--grace=960")  # the default --max-steps: no rung left
    assert p.returncode == 2 and "the rungs need 0 < --grace (960) < --max-steps (960)" in p.stderr
    p = run("--eval.loss=false", f"--data.root={shapes_root}")  # the default ranks by it
    assert p.returncode == 2 and "eval.loss=false turns off" in p.stderr
    assert "or pass --rung-metric score" in p.stderr


@pytest.mark.slow
def test_a_trial_on_two_ranks_runs_torchrun_and_reports_from_metrics_jsonl(shapes_root, tmp_path):
    args = _search_args(
        shapes_root, tmp_path, "--procs-per-trial=2", "--lr-points=1", "--reduction-factors=4"
    )
    p = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (row,) = csv.DictReader((tmp_path / "t" / "results.csv").open())
    assert (row["step"], row["status"]) == ("6", "finished")
    state = json.loads(
        (Path(row["run_dir"]) / "checkpoints" / "step6" / "trainer_state.json").read_text()
    )
    assert state["world_size"] == 2


# ---- synchronous successive halving ---------------------------------------------------------


class FakeController:
    """The part of Tune's controller the scheduler uses: its trials and stop_trial (which tells
    the scheduler about a paused or pending trial, as Tune does). No cluster."""

    def __init__(self, scheduler, names):
        from ray.tune.experiment import Trial

        self.T, self.s = Trial, scheduler
        self.trials = [
            SimpleNamespace(trial_id=n, status=Trial.PENDING, is_saving=False) for n in names
        ]
        for t in self.trials:
            scheduler.on_trial_add(self, t)

    def get_trials(self):
        return self.trials

    def trial(self, name):
        return next(t for t in self.trials if t.trial_id == name)

    def stop_trial(self, t):
        if t.status in (self.T.PENDING, self.T.PAUSED):
            self.s.on_trial_remove(self, t)
        t.status = self.T.TERMINATED

    def report(self, name, step, score, loss=1.0):
        """A result of a running trial; its status follows the decision, as in Tune."""
        t = self.trial(name)
        t.status = self.T.RUNNING
        action = self.s.on_trial_result(self, t, {"step": step, "score": score, "loss": loss})
        t.status = {CONTINUE: self.T.RUNNING, STOP: self.T.TERMINATED, PAUSE: self.T.PAUSED}[action]
        return action

    def status(self):
        return {t.trial_id: t.status for t in self.trials}


def _halving(names, eta=2, state_file=None, rung_metric="score"):
    loss_ranks = rung_metric == "loss"
    s = SuccessiveHalving(
        8,
        2,
        eta,
        n_trials=len(names),
        rung_metric=rung_metric,
        rung_mode="min" if loss_ranks else "max",
        tie_metric="score" if loss_ranks else "loss",
        tie_mode="max" if loss_ranks else "min",
        state_file=state_file,
    )
    assert s.set_search_properties("score", "max")
    return s, FakeController(s, names)


SCORES = dict(zip("abcdefgh", [5.0, 9.0, 1.0, 7.0, 3.0, 8.0, 2.0, 6.0], strict=True))


def test_successive_halving_waits_for_the_whole_rung_then_keeps_the_best():
    s, tc = _halving("abcdefgh")
    assert s.milestones == [2, 4]
    assert halving_cost(8, 2, 2, 8) == 8 * 2 + 4 * 2 + 2 * 4
    assert halving_cost(16, 120, 4, 960) == 16 * 120 + 4 * 360 + 1 * 480  # 4.0 full runs
    assert tc.report("a", 1, 0.0) == CONTINUE  # below the first rung
    for i, name in enumerate("abcdefg"):  # everyone but h reports at rung 2: they wait there
        assert tc.report(name, 2, SCORES[name]) == PAUSE
        assert s.waiting_at(name) == 2
        assert s.choose_trial_to_run(tc).trial_id == "abcdefgh"[i + 1]  # not a waiting one
    # h completes the rung: the best 8 // 2 are b 9, f 8, d 7 and h 6, which goes straight on
    assert tc.report("h", 2, SCORES["h"]) == CONTINUE
    st = tc.status()
    assert {n for n in st if st[n] == "TERMINATED"} == set("aceg")  # the waiting losers
    assert s.choose_trial_to_run(tc).trial_id == "b"  # the winners start again, as added
    # rung 4: b 10, d and f tie on score and loss (identical predictions): both go on with
    # b, so 3 of 4 go on instead of 2, and h stops; nothing is decided by arrival order
    assert tc.report("h", 4, 4.0, 0.5) == PAUSE
    assert tc.report("b", 4, 10.0, 0.9) == PAUSE
    assert tc.report("d", 4, 8.0, 0.5) == PAUSE
    assert tc.report("f", 4, 8.0, 0.5) == CONTINUE
    assert tc.status()["h"] == "TERMINATED" and s.choose_trial_to_run(tc).trial_id == "b"
    assert tc.report("f", 6, 1.0) == CONTINUE and tc.report("f", 8, 1.0) == CONTINUE  # to the end
    assert "step 4: 4 of 4 reported, 3 went on" in s.debug_string()


def test_successive_halving_breaks_score_ties_by_the_loss():
    s, tc = _halving("abcd", eta=2)
    for name, loss in zip("abc", [0.8, 0.6, 0.7], strict=True):  # four equal scores
        assert tc.report(name, 2, 50.0, loss) == PAUSE
    assert tc.report("d", 2, 50.0, 0.9) == STOP  # the best 2: lowest losses b 0.6, c 0.7
    assert tc.status() == {"a": "TERMINATED", "b": "PAUSED", "c": "PAUSED", "d": "TERMINATED"}
    s, tc = _halving("abcd", eta=2, rung_metric="loss")  # ranked by loss, score breaks ties
    for name, score, loss in [("a", 1.0, 0.5), ("b", 9.0, 0.5), ("c", 5.0, 0.4)]:
        assert tc.report(name, 2, score, loss) == PAUSE
    assert tc.report("d", 2, 99.0, 0.7) == STOP
    assert {n for n, v in tc.status().items() if v == "PAUSED"} == {"b", "c"}


def test_successive_halving_decides_the_same_whatever_the_arrival_order():
    rng = random.Random(0)
    for _ in range(20):
        order = rng.sample("abcdefgh", 8)
        s, tc = _halving("abcdefgh")
        actions = {n: tc.report(n, 2, SCORES[n]) for n in order}
        assert all(a == PAUSE for n, a in actions.items() if n != order[-1])
        went_on = {n for n, v in tc.status().items() if v != "TERMINATED"}
        assert went_on == set("bfdh")


def test_successive_halving_rung_completes_when_a_trial_errors_and_resumes_from_its_state(
    tmp_path,
):
    import pickle

    state = tmp_path / "halving_state.json"
    s, tc = _halving("abcd", state_file=str(state))
    for name in "abc":
        assert tc.report(name, 2, SCORES[name]) == PAUSE
    # the search is interrupted: Tune restores the scheduler from its pickle (made before any
    # trial ran, here after: the state file wins either way) and re-adds every trial, PENDING
    fresh = pickle.loads(pickle.dumps(SuccessiveHalving(8, 2, 2, 4, state_file=str(state))))
    fresh.set_search_properties("score", "max")
    tc2 = FakeController(fresh, "abcd")
    assert fresh.waiting_at("a") == 2 and fresh.choose_trial_to_run(tc2).trial_id == "d"
    # d fails before the rung: the rung is decided without it (a 5, b 9, c 1: keep 1, b)
    tc2.trial("d").status = "ERROR"
    fresh.on_trial_error(tc2, tc2.trial("d"))
    assert {n for n, v in tc2.status().items() if v == "TERMINATED"} == {"a", "c"}
    assert fresh.choose_trial_to_run(tc2).trial_id == "b"
    assert json.loads(state.read_text())["decided"] == {"2": ["b"]}
    # a loser Tune restarted anyway (it starts restored pending trials itself) stops at once
    assert tc2.report("a", 4, 99.0) == STOP
    with pytest.raises(ValueError, match="resume with the same arguments"):
        SuccessiveHalving(16, 2, 2, 4, state_file=str(state))  # rungs 2, 4, 8: not these


def test_successive_halving_ranks_by_the_mean_of_the_last_evaluations():
    s = SuccessiveHalving(8, 2, 2, n_trials=2, rung_metric="score", window=2)
    assert s.set_search_properties("score", "max")
    tc = FakeController(s, "ab")
    # a: 0 then 10 (mean 5); b: 6 then 6 (mean 6): b goes on although a scores more at the rung
    assert tc.report("a", 1, 0.0) == CONTINUE and tc.report("b", 1, 6.0) == CONTINUE
    assert tc.report("a", 2, 10.0) == PAUSE
    assert tc.report("b", 2, 6.0) == CONTINUE and tc.status()["a"] == "TERMINATED"
    assert json.loads(json.dumps(s._values)) == {"2": {"a": [5.0, 0.0], "b": [6.0, 0.0]}, "4": {}}
    with pytest.raises(ValueError, match="window"):
        SuccessiveHalving(8, 2, 2, n_trials=2, window=0)
