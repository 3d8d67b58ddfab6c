"""bench/collectives.py on 2 real CPU ranks (ZeRO-2 and ZeRO-3 at the tiny preset), and
bench/preemption.py's bookkeeping on hand-made trials (its real runs take minutes: RESULTS.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def test_one_bookkeeping_collective_per_step_and_zero3_gathers_in_buckets(tmp_path, shapes_root):
    out = tmp_path / "collectives.json"
    cmd = [sys.executable, "bench/collectives.py", "--zero", "2", "3", "--steps", "3"]
    # the session's shapes world, whose tiny language models are built: the embedded default's
    # (the bench's own default) is pretrained on a cold cache first, 15 minutes on 2 cores
    cmd += ["--data-root", str(shapes_root)]
    # its own session: on a timeout the ranks it started go too (left running, they held the
    # embedded backbone's build lock and slowed every later test)
    p = subprocess.Popen(
        [*cmd, "--json", str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        stdout, stderr = p.communicate()
    assert p.returncode == 0, stdout[-3000:] + stderr[-3000:]
    rows = {r["config"]: r["summary"] for r in json.loads(out.read_text())["rows"]}
    for config in ("zero2", "zero3"):
        s = rows[config]
        assert s["ranks_agree"]
        # vlds' own: the step's one all-reduce and its one host read (vlds.guard.step_sync)
        assert s["collectives_per_step"]["vlds"] == 1 == s["host_reads_per_step"]["vlds"]
    # ZeRO-3 with ds_configs/zero3.json's persistence threshold 0: the parameters fetched in
    # coalesced buckets (one at this size), one reduce-scatter, the norm's all-reduces; with
    # DeepSpeed's default threshold (10,000) each small tensor was re-gathered alone: 93 a step
    ops = rows["zero3"]["collectives_per_step_by_op"]
    assert ops.get("all_gather_into_tensor", 0) <= 2, ops
    assert sum(rows["zero3"]["collectives_per_step"].values()) <= 6


def test_preemption_report_counts_what_a_requeue_needs(tmp_path):
    from bench import preemption as P

    ckpt = tmp_path / "run" / "checkpoints"
    (ckpt / "step7" / "adapter").mkdir(parents=True)
    (ckpt / "latest").write_text("step7")
    (ckpt / "step7" / "trainer_state.json").write_text(json.dumps({"step": 7}))
    assert P.checkpoint_of(tmp_path / "run") == {"step": 7, "complete": False}
    (ckpt / "step7" / "adapter" / "adapter_config.json").write_text("{}")
    (ckpt / "step7" / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert P.checkpoint_of(tmp_path / "run") == {"step": 7, "complete": True}

    def row(phase, s, exit=0, preempted=True, finished=False, reached=7, saved=7):
        return {
            "phase": phase,
            "seconds": s,
            "exit": exit,
            "preempted": preempted,
            "finished": finished,
            "step_reached": reached,
            "checkpoint_step": saved,
            "checkpoint_complete": True,
        }

    rows = [
        row("train", 2.0, saved=8),  # the step in flight finished first: fine
        row("train", 1.0, saved=9),  # two steps on: not the step reached
        row("eval", 4.0),
        row("eval", 12.0, preempted=False, finished=True),
        row("eval", 3.0, exit=1, preempted=False),
    ]
    lines = P.table(rows, 16.0).splitlines()
    assert lines[2] == "| train | 2 | 2.0 | 2.0 | 0, 0 | 2 / 0 / 0 | 1/2 |"
    assert lines[3] == "| eval | 3 | 4.0 | 12.0 | 0, 0, 1 | 1 / 1 / 1 | 3/3 |"
    assert lines[-1] == "the uninterrupted final evaluation takes 16.0 s"
