"""One Tune trial: a real vlds training run that reports after every evaluation.

With one process per trial the run happens inside the trial's process: the trial's overrides
become a `vlds.config.Config` (`build_config`) and `vlds.train.run(cfg, on_eval=report)` trains
it with its own DeepSpeed engine and its own rendezvous (RANK=0, WORLD_SIZE=1, a free
MASTER_PORT). With K > 1 processes the trial starts `torchrun --standalone --nproc_per_node K
vlds/train.py ...` with the same overrides as arguments (torchrun picks a free port; the ranks
use the GPUs Ray assigned to the trial) and reports the eval rows of the run's metrics.jsonl as
they appear.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from .space import Setup

# K ranks run the script form, as `torchrun ... vlds/train.py` does: this package's train.py
# (the checkout's in an editable install), from the folder that holds the package.
TRAIN_PY = Path(__file__).resolve().parent.parent / "train.py"
REPO = TRAIN_PY.parent.parent


def trial_overrides(setup: Setup, point: dict, out_dir: Path) -> dict:
    """The vlds overrides of one trial: the search's, the point, its step budget, its folder."""
    return {
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
        # Each caption evaluation would start two JVMs (PTBTokenizer, METEOR): ~10 s on 2 cores,
        # more than the training between rungs. CIDEr, the caption score, needs neither.
        "eval.java_metrics": setup.java_metrics,
        # A 1-process trial runs in Tune's worker thread, where signal handlers cannot be
        # installed (Tune stops and restores trials itself); torchrun's ranks keep theirs:
        # SIGTERM from a stopped trial makes them save a checkpoint and exit.
        "train.handle_signals": setup.procs > 1,
    }


def run_trial(point: dict, setup: Setup) -> None:
    """The Tune trainable: one vlds training run, reporting after every evaluation."""
    from ray import tune

    out_dir = Path(setup.runs_dir) / tune.get_context().get_trial_id()
    overrides = trial_overrides(setup, point, out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    log_file = out_dir.parent / f"{out_dir.name}.log"
    if setup.procs > 1:
        argv = ["--preset", setup.preset, *(f"--{k}={v}" for k, v in overrides.items())]
        return _run_subprocess(argv, out_dir, log_file, setup.procs)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    # The trial's own world of one: ignore the launcher variables a Ray worker may have
    # inherited (srun sets SLURM_PROCID / SLURM_NTASKS) and rendezvous on a free port.
    from vlds.distributed import free_port

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    from vlds.config import build_config
    from vlds.train import run

    def report(step, metrics, cfg):
        tasks = {t: float(m["score"]) for t, m in metrics.items() if isinstance(m, dict)}
        loss = {"loss": float(metrics["loss"])} if metrics.get("loss") is not None else {}
        tune.report({"step": step, "score": float(metrics["average"]), **loss, **tasks})

    run(build_config(setup.preset, overrides), on_eval=report)


def _run_subprocess(argv: list[str], out_dir: Path, log_file: Path, procs: int) -> None:
    """K ranks per trial: torchrun in a subprocess; report the eval rows of its metrics.jsonl.
    Tested on CPU (gloo, --procs-per-trial 2); not on GPUs."""
    import ctypes
    import signal

    from ray import tune

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={procs}",
        str(TRAIN_PY),
        *argv,
    ]
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    prctl = ctypes.CDLL(None).prctl  # looked up before the fork, only called after it

    def die_with_parent():  # the ranks must not outlive a trial that Tune kills
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG; SIGTERM = save a checkpoint, exit

    with log_file.open("a") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
        )
        reported, metrics_file = 0, out_dir / "metrics.jsonl"
        try:
            while True:
                done = proc.poll() is not None
                text = metrics_file.read_text() if metrics_file.is_file() else ""
                lines = text.split("\n")[:-1]  # the part after the last newline may be partial
                for line in lines[reported:]:
                    row = json.loads(line)
                    if row["kind"] == "eval":  # {"average": .., "vqa/score": .., ...}
                        tasks = {
                            k[: -len("/score")]: v for k, v in row.items() if k.endswith("/score")
                        }
                        loss = {"loss": row["loss"]} if row.get("loss") is not None else {}
                        tune.report({"step": row["step"], "score": row["average"], **loss, **tasks})
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
