"""bench/gpu_check.sh on a machine without CUDA: what it can run (the kernels' interpreter
check), a report with its header, and the CUDA-only steps named as skipped; and the throughput
its training steps report, read from a run's outputs."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from bench import gpu_check

REPO = Path(__file__).resolve().parent.parent


def run_check(report: Path, **env) -> subprocess.CompletedProcess:
    """`bash bench/gpu_check.sh REPORT` with CUDA hidden and these variables."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **env}
    cmd = ["bash", "bench/gpu_check.sh", str(report)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_gpu_check_without_cuda(tmp_path):
    report = tmp_path / "check" / "report.md"
    proc = run_check(report)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = report.read_text()
    for field in ("- device: ", "- driver: ", "- CUDA: not available", "- git commit: "):
        assert field in text, field
    versions = re.search(r"^- versions: (.*)$", text, re.M).group(1)
    for package in ("torch", "triton", "deepspeed"):
        assert f"{package} " in versions
    assert re.search(r"^- date \(UTC\): \d{4}-\d\d-\d\d \d\d:\d\d:\d\d$", text, re.M)
    # the one step that runs without CUDA: its command, output and exit status
    assert "bench/adapter_kernel.py --check" in text
    assert "interpreter check M=257" in text and "max abs error vs PyTorch" in text
    assert "exit status: 0" in text
    # every CUDA-only step named at the end of the report and of stdout
    skipped = "Skipped (no CUDA): "
    last_report = text.strip().splitlines()[-1]
    last_stdout = proc.stdout.strip().splitlines()[-1]
    assert last_report.startswith(skipped) and last_stdout == last_report
    for name in ("0. each autotune config", "1. fused kernel tests", "3. step time", "4. training"):
        assert name in last_report


def test_a_step_left_without_time_fails_the_check(tmp_path):
    """A budget spent before step 2 starts: reported as not run, exit status 1."""
    report = tmp_path / "report.md"
    proc = run_check(report, GPU_CHECK_BUDGET_S="1")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = report.read_text()
    assert "not run: the check's time budget (1 s) is spent" in text
    assert "max abs error vs PyTorch" not in text  # the check itself never ran
    assert text.strip().splitlines()[-1].startswith("Skipped (no CUDA): ")


def test_throughput_from_run_outputs(tmp_path):
    """Two starts in one folder (a resume): the wall rate comes from the latest start's lines."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step300\n")
    metrics = {"step": 300, "step_time_s": 0.05, "batch_plan": {"global_batch": 32}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    lines = [(100, 5.0), (200, 10.0), (220, 0.5), (260, 1.5), (300, 2.5)]  # (step, elapsed_s)
    (run / "metrics.jsonl").write_text(
        "".join(
            json.dumps({"step": s, "kind": "train", "loss": 1.0, "elapsed_s": e}) + "\n"
            for s, e in lines
        )
        + json.dumps({"step": 300, "kind": "checkpoint", "bytes": 1})
        + "\n"
    )
    out, ok = gpu_check.throughput(run, expect_step=300)
    assert ok
    text = "\n".join(out)
    assert "median training step 50.0 ms" in text and ": 640.0" in text  # 32 / 0.05
    assert "steps 220-300" in text and ": 1,280.0" in text  # 80 steps x 32 / 2 s
    assert "checkpoints/latest = step300" in text
    out, ok = gpu_check.throughput(run, expect_step=400)
    assert not ok and "FAIL" in out[-1]
    out, ok = gpu_check.throughput(tmp_path / "missing")
    assert not ok
