"""The CPU a benchmark ran on, for the tables in bench/RESULTS.md."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The model name from /proc/cpuinfo ('Intel(R) Xeon(R) Processor'), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
