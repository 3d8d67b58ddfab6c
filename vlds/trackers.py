"""Experiment trackers behind `train.report_to` (comma list of tensorboard | wandb | mlflow).

metrics.jsonl and curves.png are always written; the trackers get the same scalars under the
same names ("train/loss", "eval/vqa/score", ...), the resolved config once per start and the
final metrics once. Only rank 0 creates them (vlds.trainer.RunLog).

Why these: TensorBoard is the dependency-free default (it ships with the base install); W&B and
MLflow are the two trackers most VL/PEFT codebases and clusters already use, one hosted and one
self-hosted, both with an offline/local mode. Each is configured the way its users already
configure it, from its own environment variables (WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY,
WANDB_API_KEY, ...; MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, ...), with vlds' defaults only
where nothing is set: W&B project "vlds", files under out_dir, run name = out_dir's name; MLflow
experiment "vlds", a local file store `out_dir/mlruns`. A resumed run continues its W&B and
MLflow runs: their ids are kept in out_dir/trackers.json. wandb and mlflow are imported only
when a run creates that tracker; `pip install "vlds[trackers]"` installs both.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time
from pathlib import Path

from vlds.config import ConfigError, config_check

EXTRA = 'pip install "vlds[trackers]" (in a checkout: pip install -e ".[trackers]")'
# name -> (the module it imports, how to install it)
TRACKERS = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", EXTRA),
    "mlflow": ("mlflow", EXTRA),
}
STATE_FILE = "trackers.json"  # in out_dir: what a resumed run needs to continue its tracker runs


def tracker_names(report_to: str) -> list[str]:
    """`train.report_to` -> tracker names in order; "" or "none" = no tracker."""
    names = list(dict.fromkeys(n.strip().lower() for n in report_to.split(",") if n.strip()))
    return [] if names == ["none"] else names


@config_check
def check_report_to(cfg) -> None:
    names = tracker_names(cfg.train.report_to)
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ConfigError(
            f"train.report_to={cfg.train.report_to!r}: unknown tracker {', '.join(unknown)}; "
            f"valid: a comma list of {', '.join(TRACKERS)} (or none)"
        )
    for name in names:
        module, install = TRACKERS[name]
        if importlib.util.find_spec(module) is None:  # finds without importing (wandb is slow)
            raise ConfigError(
                f"train.report_to includes {name}, but the {module} package is not installed; "
                f"install it with: {install}, or drop {name} from train.report_to"
            )


def flatten(d: dict, sep: str, prefix: str = "") -> dict:
    """{"peft": {"method": "x"}} -> {"peft.method": "x"} (sep=".")."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        out.update(flatten(v, sep, key) if isinstance(v, dict) else {key: v})
    return out


class Tracker:
    """One experiment tracker. `state` (JSON) is what a resumed run needs to continue it."""

    state: dict = {}

    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def log_config(self, cfg: dict) -> None: ...

    def log_final(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self, status: str = "FINISHED") -> None:  # | "KILLED" (preempted) | "FAILED"
        ...


class TensorBoard(Tracker):
    def __init__(self, out_dir: Path, prior: dict | None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out_dir / "tb"))

    def log(self, scalars, step):
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def log_config(self, cfg):  # the Text tab; a markdown code block keeps the layout
        self.writer.add_text("config", "    " + json.dumps(cfg, indent=2).replace("\n", "\n    "))

    def close(self, status="FINISHED"):
        self.writer.close()


class WandB(Tracker):
    def __init__(self, out_dir: Path, prior: dict | None):
        import wandb

        env = os.environ
        resume_id = (prior or {}).get("id")
        self.run = wandb.init(
            project=None if "WANDB_PROJECT" in env else "vlds",
            name=None if "WANDB_NAME" in env else out_dir.resolve().name,
            dir=None if "WANDB_DIR" in env else str(out_dir),
            id=resume_id,  # None: WANDB_RUN_ID or a new id
            resume="allow" if resume_id else None,
            reinit="create_new",  # this object's run only (Ray Tune may run trials in one process)
        )
        self.state = {"id": self.run.id}

    def log(self, scalars, step):
        self.run.log(scalars, step=step)

    def log_config(self, cfg):
        self.run.config.update(cfg, allow_val_change=True)  # a resume may change "run" fields

    def log_final(self, metrics, step):
        self.run.summary.update(metrics)

    def close(self, status="FINISHED"):
        if status == "KILLED":
            self.run.mark_preempting()
        self.run.finish(exit_code=1 if status == "FAILED" else None)


class MLflow(Tracker):
    """Through an MlflowClient, not mlflow's global active run and tracking URI (two Ray Tune
    trials in one process would share those)."""

    def __init__(self, out_dir: Path, prior: dict | None):
        from mlflow.tracking import MlflowClient

        env = os.environ
        uri = env.get("MLFLOW_TRACKING_URI") or (out_dir / "mlruns").resolve().as_uri()
        if "MLFLOW_TRACKING_URI" not in env:  # MLflow 3 wants this opt-in for a file store
            env.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = c = MlflowClient(tracking_uri=uri)
        prior = prior if prior and prior.get("tracking_uri") == uri else {}
        self.run_id = prior.get("run_id") or env.get("MLFLOW_RUN_ID")
        if self.run_id:
            c.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = c.create_run(
                self._experiment(c), run_name=out_dir.resolve().name
            ).info.run_id
        self.state = {"run_id": self.run_id, "tracking_uri": uri}

    @staticmethod
    def _experiment(c) -> str:
        if os.environ.get("MLFLOW_EXPERIMENT_ID"):
            return os.environ["MLFLOW_EXPERIMENT_ID"]
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "vlds"
        found = c.get_experiment_by_name(name)
        if found is None:
            try:
                return c.create_experiment(name)
            except Exception:  # another run created it first
                found = c.get_experiment_by_name(name)
                if found is None:
                    raise
        return found.experiment_id

    def log(self, scalars, step):
        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        metrics = [Metric(self.name(k, scalars), float(v), ms, step) for k, v in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    @staticmethod
    def name(key: str, batch: dict) -> str:
        """MLflow allows [\\w-. /] in names (VQA question types may hold "'"), and its file store
        keeps a metric in a file named by its path, so "train/loss" cannot also be a folder:
        a name whose parent is a metric too gets "_" for its last "/" ("train/loss_vqa")."""
        parent, _, leaf = key.rpartition("/")
        return re.sub(r"[^\w\-. /]", "_", f"{parent}_{leaf}" if parent in batch else key)

    def log_config(self, cfg):
        from mlflow.entities import Param

        # params are write-once: a resumed run adds new keys and keeps the first start's values
        have = self.client.get_run(self.run_id).data.params
        params = [Param(k, str(v)) for k, v in flatten(cfg, ".").items() if k not in have]
        self.client.log_batch(self.run_id, params=params)

    def log_final(self, metrics, step):
        self.log(metrics, step)

    def close(self, status="FINISHED"):
        self.client.set_terminated(self.run_id, status=status)


CLASSES = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


def open_trackers(report_to: str, out_dir: Path, cfg: dict, resumed: bool) -> list[Tracker]:
    """Create the trackers of `report_to`, continuing a resumed run's tracker runs, store their
    state in out_dir/trackers.json and log the resolved config to each."""
    state_file = out_dir / STATE_FILE
    prior = json.loads(state_file.read_text()) if resumed and state_file.is_file() else {}
    trackers = {n: CLASSES[n](out_dir, prior.get(n)) for n in tracker_names(report_to)}
    state = {n: t.state for n, t in trackers.items() if t.state}
    if state:
        state_file.write_text(json.dumps({**prior, **state}, indent=2) + "\n")
    for t in trackers.values():
        t.log_config(cfg)
    return list(trackers.values())
