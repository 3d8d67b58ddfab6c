"""`train.report_to`: W&B (offline) and MLflow (local file store) get the run's scalars, config and
final metrics from a real `deepspeed vlds/train.py` run, a resume continues the same tracker runs,
and a bad or uninstalled tracker is refused before any work."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.test_train import REPO, launch, tiny_args
from vlds.config import ConfigError, build_config, validate

pytest.importorskip("wandb")
pytest.importorskip("mlflow")


def tracker_env(monkeypatch):
    """W&B offline with vlds' defaults (nothing of the user's W&B/MLflow setup), as a user
    without a tracking server would run."""
    for k in list(os.environ):
        if k.startswith(("WANDB_", "MLFLOW_")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def wandb_records(run_file) -> dict[str, list[dict]]:
    """{"history": [row, ...], "config": [update, ...], "summary": [update, ...]} of an offline
    run's .wandb file (a LevelDB-format log of wandb Record protos; offline runs write no
    config.yaml or wandb-summary.json)."""
    from wandb.proto import wandb_internal_pb2 as pb

    def items(its):
        return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in its}

    out = {"history": [], "config": [], "summary": []}
    data, chunk, pos, block = run_file.read_bytes(), b"", 7, 32768  # 7-byte W&B file header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            rec = pb.Record()
            rec.ParseFromString(chunk)
            chunk = b""
            which = rec.WhichOneof("record_type")
            if which == "history":
                out["history"].append(items(rec.history.item))
            elif which in ("config", "summary"):
                out[which].append(items(getattr(rec, which).update))
    return out


def test_trackers_get_a_real_run_and_a_resume_continues_them(shapes_root, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    tracker_env(monkeypatch)
    out = tmp_path / "run"
    args = tiny_args(
        shapes_root,
        out,
        "--train.report_to=tensorboard,wandb,mlflow",
        "--train.save_every=2",
        "--eval.every=2",
        "--eval.max_samples=8",
        "--eval.java_metrics=false",
    )
    launch([*args, "--train.max_steps=4"])
    state = json.loads((out / "trackers.json").read_text())
    assert any((out / "tb").iterdir()) and (out / "curves.png").is_file()
    train_steps = [
        r["step"]
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "train"
    ]
    assert train_steps == [1, 2, 3, 4]

    # W&B offline: out/wandb/offline-run-*-{id}/ with the run log, config and summary
    wid = state["wandb"]["id"]
    (run_dir,) = (out / "wandb").glob(f"offline-run-*-{wid}")
    records = wandb_records(run_dir / f"run-{wid}.wandb")
    history = records["history"]
    assert [r["_step"] for r in history if "train/loss" in r] == [1, 2, 3, 4]
    assert {r["_step"] for r in history if "eval/vqa/score" in r} == {2, 4}
    config = {k: v for update in records["config"] for k, v in update.items()}
    assert config["peft"]["method"] == "single_adapter"
    assert config["train"]["report_to"] == "tensorboard,wandb,mlflow"
    summary = {k: v for update in records["summary"] for k, v in update.items()}
    metrics = json.loads((out / "metrics.json").read_text())
    assert summary["final/average"] == pytest.approx(metrics["metrics"]["average"])
    assert summary["final/vqa/score"] == pytest.approx(metrics["metrics"]["vqa"]["score"])
    assert "train/loss" in summary and summary["_step"] == 4

    # MLflow: the local file store out/mlruns, read back through MLflow's own client
    assert state["mlflow"]["tracking_uri"] == (out / "mlruns").resolve().as_uri()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=state["mlflow"]["tracking_uri"])
    run = client.get_run(state["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "vlds"
    assert run.data.params["peft.method"] == "single_adapter"
    assert run.data.params["train.report_to"] == "tensorboard,wandb,mlflow"
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    jsonl = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in jsonl if r["kind"] == "train"]
    assert [m.step for m in loss] == [r["step"] for r in logged] == [1, 2, 3, 4]
    assert [m.value for m in loss] == pytest.approx([r["loss"] for r in logged])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/average")] == [2, 4]
    # train/loss/{task} in the other trackers: a file store cannot hold train/loss as a folder too
    tasks = {r["step"]: k for r in jsonl for k in r if k.startswith("loss/")}
    assert tasks and all(f"train/loss_{k[5:]}" in run.data.metrics for k in tasks.values())
    assert run.data.metrics["final/average"] == pytest.approx(metrics["metrics"]["average"])
    assert run.data.metrics["final/params/trainable"] == metrics["params"]["trainable"]

    # a resume continues the same W&B run (offline: a new folder with the same id) and MLflow run
    launch([*args, "--train.max_steps=6", "--train.resume=latest"])
    state2 = json.loads((out / "trackers.json").read_text())
    assert state2 == state
    runs = sorted((out / "wandb").glob(f"offline-run-*-{wid}"))
    assert len(runs) == 2
    resumed = wandb_records(runs[-1] / f"run-{wid}.wandb")["history"]
    assert [r["_step"] for r in resumed if "train/loss" in r] == [5, 6]
    loss = client.get_metric_history(state["mlflow"]["run_id"], "train/loss")
    assert sorted(m.step for m in loss) == [1, 2, 3, 4, 5, 6]
    assert client.get_run(state["mlflow"]["run_id"]).info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_an_unknown_tracker_fails_before_any_work(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "vlds/train.py", f"--train.out_dir={out}", "--train.report_to=comet"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "train.report_to='comet'" in p.stderr
    assert "tensorboard, wandb, mlflow" in p.stderr
    assert not out.exists()


@pytest.mark.parametrize("missing", ["wandb", "mlflow"])
def test_an_uninstalled_tracker_names_the_extra(monkeypatch, missing):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == missing else find_spec(name, *a),
    )
    validate(build_config("tiny", {"train.report_to": "tensorboard"}))  # the default needs neither
    with pytest.raises(ConfigError, match=rf"{missing}.*pip install \"vlds\[trackers\]\""):
        validate(build_config("tiny", {"train.report_to": f"tensorboard,{missing}"}))


def test_report_to_names_are_parsed():
    from vlds.trackers import tracker_names

    assert tracker_names("tensorboard, WandB,wandb,") == ["tensorboard", "wandb"]
    assert tracker_names("none") == tracker_names("") == []
    validate(build_config("tiny", {"train.report_to": "none"}))
    with pytest.raises(ConfigError, match="valid: a comma list of tensorboard, wandb, mlflow"):
        validate(build_config("tiny", {"train.report_to": "wandb,none"}))


def test_mlflow_continues_its_run_only_on_resume_and_marks_preemption(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from vlds.trackers import MLflow, open_trackers

    tracker_env(monkeypatch)
    cfg = build_config("tiny", {"train.report_to": "mlflow"}).to_dict()
    (t,) = open_trackers("mlflow", tmp_path, cfg, resumed=False)
    t.log({"train/loss": 2.0, "train/loss/vqa": 2.0, "eval/vqa/what's": 1.0}, step=3)
    t.close("KILLED")  # preempted
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    run = client.get_run(t.run_id)
    assert run.info.status == "KILLED"
    assert set(run.data.metrics) == {"train/loss", "train/loss_vqa", "eval/vqa/what_s"}

    cfg["train"]["max_steps"] = 9  # a resume may change "run" fields; params keep the first
    (again,) = open_trackers("mlflow", tmp_path, cfg, resumed=True)
    assert again.run_id == t.run_id
    assert client.get_run(t.run_id).info.status == "RUNNING"
    assert client.get_run(t.run_id).data.params["train.max_steps"] == "0"
    again.close()
    (fresh,) = open_trackers("mlflow", tmp_path, cfg, resumed=False)  # a new run: a new MLflow run
    assert fresh.run_id != t.run_id
    assert json.loads((tmp_path / "trackers.json").read_text())["mlflow"]["run_id"] == fresh.run_id
    fresh.close()
    assert MLflow.name("final/vqa/per_answer_type/yes/no", {}) == "final/vqa/per_answer_type/yes/no"
