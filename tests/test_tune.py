"""tune/search.py end to end on CPU: a 4-configuration ASHA search, interrupted and resumed, then
its CSV, heatmap, budget report and best configuration (which vlds/train.py must accept)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlds.config import parse_cli, validate

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tune"))
import search  # noqa: E402


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


@pytest.fixture(scope="module")
def searched(shapes_root, tmp_path_factory):
    """The search, interrupted (SIGINT) once its first trial has finished, then resumed."""
    out = tmp_path_factory.mktemp("tune")
    args = [sys.executable, *_search_args(shapes_root, out)]
    proc = subprocess.Popen(
        args, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    t0 = time.time()
    while not list((out / "t" / "runs").glob("*/metrics.json")):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - t0 < 240, "no trial finished"
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


def test_every_configuration_ran_once_and_stopped_where_asha_says(searched):
    exp, _ = searched
    rows = list(csv.DictReader((exp / "results.csv").open()))
    points = {(float(r["lr"]), int(r["reduction_factor"])) for r in rows}
    assert len(rows) == 4 and points == {
        (lr, rf) for lr in search.lr_grid(1e-3, 4e-2, 2) for rf in (4, 8)
    }
    for r in rows:
        step, run = int(r["step"]), Path(r["run_dir"])
        assert step in (2, 6) and r["status"] == ("finished" if step == 6 else "stopped")
        # the steps ASHA is charged are the steps trained: a stopped trial halts at the report
        assert max(e["step"] for e in _rows(run, "eval")) == step
        assert all(t["step"] <= step for t in _rows(run, "train"))
        assert (run / "metrics.json").is_file() == (step == 6)
        assert float(r["score"]) == _rows(run, "eval")[-1]["average"]
    assert sum(int(r["step"]) == 6 for r in rows) >= 1  # the first arrival always goes on


def test_budget_report_is_consistent(searched):
    exp, stdout = searched
    rows = list(csv.DictReader((exp / "results.csv").open()))
    b = json.loads((exp / "budget.json").read_text())
    spent = sum(int(r["step"]) for r in rows)
    assert b["trial_steps_spent"] == spent and b["trial_steps_all_to_end"] == 4 * 6
    assert b["full_runs_spent"] == round(spent / 6, 2) and b["configurations"] == 4
    assert b["reached"] == {"2": 4, "6": sum(int(r["step"]) == 6 for r in rows)}
    assert search.budget_text(b) in stdout


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
    # everything the winning trial trained with, bar where and how it ran
    trained = json.loads((Path(best["run_dir"]) / "config.json").read_text())
    run_keys = {"out_dir", "resume", "save_every", "keep_last", "log_every", "num_workers"}
    for section in ("model", "peft", "data", "train"):
        ours = {k: v for k, v in getattr(cfg, section).__dict__.items() if k not in run_keys}
        assert ours == {k: v for k, v in trained[section].items() if k not in run_keys}, section
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
    p = run("--data.root=/nonexistent/shards")
    assert p.returncode == 2 and "data folder /nonexistent/shards does not exist" in p.stderr
    p = run("--grace=50")
    assert p.returncode == 2 and "not a multiple of --eval-every" in p.stderr


@pytest.mark.slow
def test_a_trial_on_two_ranks_runs_torchrun_and_reports_from_metrics_jsonl(shapes_root, tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            *_search_args(
                shapes_root,
                tmp_path,
                "--procs-per-trial=2",
                "--lr-points=1",
                "--reduction-factors=4",
            ),
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (row,) = csv.DictReader((tmp_path / "t" / "results.csv").open())
    assert (row["step"], row["status"]) == ("6", "finished")
    state = json.loads(
        (Path(row["run_dir"]) / "checkpoints" / "step6" / "trainer_state.json").read_text()
    )
    assert state["world_size"] == 2
