"""The Python half of bench/gpu_check.sh: the report's header and the training runs' throughput.

    python bench/gpu_check.py header                          # markdown lines: device, versions
    python bench/gpu_check.py throughput runs/gpu_check/train-zero2 --expect-step 300

`header` names the device (nvidia-smi's name and driver when it is installed, else torch's
device or the CPU), whether CUDA is available (the shell script reads that line), the versions
of python, torch, triton, deepspeed and transformers (package metadata: nothing is imported
for them), the git commit and the UTC date.

`throughput DIR` reads a finished vlds/train.py run's outputs: metrics.json (`step`,
`step_time_s` = the median training step without data wait, `batch_plan.global_batch`,
`adapter_kernel`) and metrics.jsonl (the `train` lines of the latest start, whose `elapsed_s`
counts from that start), and prints samples/s both ways. With --expect-step it fails (exit 1)
unless the run ended at that step with `checkpoints/latest` naming it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python bench/gpu_check.py` from a checkout without install
PACKAGES = ("torch", "triton", "deepspeed", "transformers")


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def nvidia_smi() -> list[tuple[str, str]]:
    """(name, driver version) of every GPU nvidia-smi lists; [] without nvidia-smi."""
    if not shutil.which("nvidia-smi"):
        return []
    query = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    rows = [line.rsplit(",", 1) for line in out.stdout.splitlines() if "," in line]
    return [(name.strip(), driver.strip()) for name, driver in rows]


def header_lines() -> list[str]:
    import torch

    cuda = torch.cuda.is_available()
    gpus = nvidia_smi()
    if gpus:
        device = f"{gpus[0][0]} (x{len(gpus)})" if len(gpus) > 1 else gpus[0][0]
        driver = gpus[0][1]
    else:
        from bench.machine import cpu_model

        device = torch.cuda.get_device_name(0) if cuda else f"CPU: {cpu_model()}"
        driver = "- (no nvidia-smi)"
    if cuda:
        state = f"available, {torch.cuda.device_count()} device(s), CUDA {torch.version.cuda}"
    else:
        state = "not available"
    commit = git("rev-parse", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " (+ uncommitted changes)"
    versions = [f"python {sys.version.split()[0]}"] + [f"{p} {version(p)}" for p in PACKAGES]
    return [
        "# GPU check",
        "",
        f"- device: {device}",
        f"- driver: {driver}",
        f"- CUDA: {state}",
        f"- versions: {', '.join(versions)}",
        f"- git commit: {commit}",
        f"- date (UTC): {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())}",
    ]


def latest_start(lines: list[dict]) -> list[dict]:
    """The `train` lines of the latest start: elapsed_s restarts from 0 at a resume."""
    train = [x for x in lines if x.get("kind") == "train" and "elapsed_s" in x]
    start = 0
    for i in range(1, len(train)):
        if (
            train[i]["elapsed_s"] < train[i - 1]["elapsed_s"]
            or train[i]["step"] <= train[i - 1]["step"]
        ):
            start = i
    return train[start:]


def throughput(out_dir: Path, expect_step: int = 0) -> tuple[list[str], bool]:
    """(lines for the report, whether the run looks right)."""
    metrics_file = out_dir / "metrics.json"
    if not metrics_file.is_file():
        return [f"no {metrics_file}: the run did not finish"], False
    m = json.loads(metrics_file.read_text())
    batch = m["batch_plan"]["global_batch"]
    lines, ok = [f"finished at step {m['step']}, global batch {batch}"], True
    if m.get("step_time_s"):
        lines.append(
            f"samples/s (median training step {m['step_time_s'] * 1e3:.1f} ms, data wait "
            f"excluded): {batch / m['step_time_s']:,.1f}"
        )
    jsonl = out_dir / "metrics.jsonl"
    logged = (
        [json.loads(x) for x in jsonl.read_text().splitlines() if x.strip()]
        if jsonl.is_file()
        else []
    )
    train = latest_start(logged)
    if len(train) >= 2:
        steps = train[-1]["step"] - train[0]["step"]
        seconds = train[-1]["elapsed_s"] - train[0]["elapsed_s"]
        if seconds > 0:
            lines.append(
                f"samples/s (wall, steps {train[0]['step']}-{train[-1]['step']} of this start, "
                f"data, logging and checkpoints included): {steps * batch / seconds:,.1f}"
            )
    if "adapter_kernel" in m:
        lines.append(f"adapter kernel paths: {json.dumps(m['adapter_kernel'])}")
    if expect_step:
        latest = out_dir / "checkpoints" / "latest"
        tag = latest.read_text().strip() if latest.is_file() else ""
        if m["step"] != expect_step or tag != f"step{expect_step}":
            lines.append(
                f"FAIL: expected the run to end at step {expect_step} with checkpoints/latest "
                f"= step{expect_step}; found step {m['step']}, latest {tag or '(none)'}"
            )
            ok = False
        else:
            lines.append(f"checkpoints/latest = {tag}")
    return lines, ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("header", help="the report's header (markdown)")
    t = sub.add_parser("throughput", help="samples/s of a finished vlds/train.py run")
    t.add_argument("out_dir", type=Path)
    t.add_argument("--expect-step", type=int, default=0, help="fail unless it ended here")
    args = p.parse_args(argv)
    if args.command == "header":
        print("\n".join(header_lines()))
        return 0
    lines, ok = throughput(args.out_dir, args.expect_step)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
