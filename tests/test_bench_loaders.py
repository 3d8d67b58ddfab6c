"""bench/loaders.py --quick: vlds' reader and webdataset's on the same shards, one table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_loaders_quick_prints_its_table():
    p = subprocess.run(
        [sys.executable, "bench/loaders.py", "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rows = re.findall(
        r"^\| ([^|]+) \| (features|jpeg) ([^|]+) \| \d+ \| ([\d,]+) \| ([\d,]+) \| ([\d.]+) \|",
        p.stdout,
        re.M,
    )
    got = {(reader, path, mode.strip()) for reader, path, mode, *_ in rows}
    for path in ("features", "jpeg"):
        for reader in ("vlds read_samples", "webdataset.WebDataset"):  # both dev dependencies
            assert {(reader, path, "raw"), (reader, path, "+ decode")} <= got, p.stdout
        assert ("vlds TrainStream", path, "whole stream + decode") in got, p.stdout
    for reader, _, mode, rate, _, ratio in rows:
        assert float(rate.replace(",", "")) > 0
        if reader == "vlds read_samples" and mode == "raw":
            assert ratio == "1.00"
    # a library that is not installed is named, not silently dropped
    for name in ("wids.ShardListDataset", "Megatron-Energon", "MosaicML Streaming"):
        assert name in p.stdout
    assert re.search(r"stream\.py \+ vlds/data/shardio\.py: \d+ lines", p.stdout)
