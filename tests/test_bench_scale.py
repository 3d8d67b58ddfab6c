"""bench/scale.py --quick (10k samples, 1 / 8 / 64 readers): its table and its verdict line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_scale_quick_reports_step_independent_resume_and_per_rank_eval_reads():
    p = subprocess.run(
        [sys.executable, "bench/scale.py", "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    resume = re.findall(
        r"^\| 10,000 \| (\d+) \| step (\d+) of \d+ \| ([\d,]+) \| [\d.]+ \| ([\d,]+) \|",
        p.stdout,
        re.M,
    )
    assert len(resume) == 9, p.stdout
    by_world = {}
    for world, step, cursors, replay in resume:
        by_world.setdefault(int(world), []).append(
            (int(step), int(cursors.replace(",", "")), int(replay.replace(",", "")))
        )
    for world, rows in by_world.items():
        first, last = rows[0], rows[-1]
        assert last[1] <= 1.5 * first[1], (world, rows)  # from cursors: flat in the step
    one = by_world[1]
    assert one[-1][2] > 5 * one[-1][1] and one[-1][2] > 5 * one[0][2]  # replay: grows with it
    evals = re.findall(
        r"^\| 10,000 \| (\d+) \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \|", p.stdout, re.M
    )
    assert [int(w) for w, *_ in evals] == [1, 8, 64]
    for _, got, share, shard in evals:
        got, share, shard = (int(x.replace(",", "")) for x in (got, share, shard))
        assert got <= share + shard
    # shm by hand: 8 workers x prefetch 2 x (GQA's training batch, 104 images, + NLVR2's
    # evaluation batch, 256 x 2 images) x 3 x 224 x 224 uint8 bytes
    gb = 8 * 2 * (104 + 256 * 2) * 3 * 224 * 224 / 1e9
    last = p.stdout.strip().splitlines()[-1]
    m = re.fullmatch(
        r"scale: resume (\d+)/(\d+) = ([\d.]+); eval (\d+)/(\d+) = ([\d.]+); "
        r"shm ([\d.]+) GB/rank: (PASS|FAIL)",
        last,
    )
    assert m, last
    assert float(m[7]) == round(gb, 2)
    assert m[8] == ("PASS" if gb <= 2.0 else "FAIL")
