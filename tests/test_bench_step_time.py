"""bench/step_time.py end to end at a tiny size: both workers run and the JSON rows make sense."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = ["--d-model", "64", "--layers", "2", "--heads", "4", "--d-ff", "128", "--vocab", "512"]


def test_step_time_tiny(tmp_path):
    out = tmp_path / "rows.json"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "step_time.py"),
        *TINY,
        "--batch",
        "2",
        "--warmup",
        "1",
        "--steps",
        "2",
        "--json",
        str(out),
    ]
    # The script starts one worker subprocess per method, as in a real run.
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {r["method"]: r for r in json.loads(out.read_text())}

    assert set(rows) == {"single_adapter", "full_finetune"}
    adapter, full = rows["single_adapter"], rows["full_finetune"]
    assert full["trainable"] > adapter["trainable"] > 0
    assert 0 < adapter["percent"] < 100
    for r in rows.values():
        assert len(r["step_times_s"]) == 2
        assert r["step_median_s"] > 0 and r["step_p90_s"] >= r["step_median_s"]
        assert r["peak_rss_gb"] > 0
    # The export holds the trainable tensors only (fp32 + a small safetensors header).
    assert adapter["checkpoint_bytes"] < full["checkpoint_bytes"]
    assert 4 * adapter["trainable"] <= adapter["checkpoint_bytes"] < 4 * full["trainable"]
    assert "PASS" in proc.stdout or "FAIL" in proc.stdout  # the comparison line was printed
