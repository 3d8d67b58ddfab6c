"""Preemption: seconds from a signal to the exit with a checkpoint, per phase, at the tiny preset.

    python bench/preemption.py                     # 3 signals per phase (what RESULTS.md shows)
    python bench/preemption.py --repeats 5 --json runs/bench/preemption.json
    python bench/preemption.py --tree /tmp/before  # another checkout (e.g. a git worktree)

Each trial starts `python vlds/train.py --preset tiny` (the embedded default: 150 validation
samples per task, beam-3 captions, the shuffled-image pass; 2 data workers) in its own process
group, waits for the phase, sends SIGTERM to the whole group (what `scancel` and a preempting
scheduler do: the data workers get it too) at a random moment within the phase, and measures
the time until the trainer exits. Then it checks what a requeued job needs: exit code 0 and a
complete checkpoint behind `latest` of the step the run had reached.

- train: 0-3 s after a training step was logged;
- save: the moment `.tmp-step<N>` appears (the save of step N has started; polled every 5 ms);
- eval: the final evaluation (`--train.max_steps=N`: step N is saved, then evaluated), at a
  random moment within its first 80 %; a calibration run without a signal measures how long
  the evaluation takes, the wait a signal would otherwise cost. A signal that lands after the
  evaluation's last poll (in the last task's scoring) lets the run finish (metrics.json
  written, exit 0: nothing to requeue); the table counts stopped / finished / crashed runs.

SLURM sends SIGKILL KillWait seconds after the SIGTERM of `scancel` (30 s by default; 180 s of
warning with slurm/train.sbatch's `--signal=USR1@180`): the worst case must stay below that.
Seconds depend on the machine; compare phases and trees measured in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python bench/preemption.py` from a checkout without install

STEPS = 20  # the eval and save phases: step N = 20 (about 10 s of training on 2 cores)
PHASES = ("train", "save", "eval")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="signals per phase")
    p.add_argument("--phases", default=",".join(PHASES))
    p.add_argument("--tree", default=str(REPO), help="the checkout whose vlds/train.py runs")
    p.add_argument("--seed", type=int, default=0, help="the moments' random draw")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--report-only", default="", help="print the table of a saved --json")
    return p.parse_args(argv)


class Trial:
    """One `vlds/train.py --preset tiny` process in its own process group."""

    def __init__(self, tree: Path, out: Path, *extra: str):
        self.out = out
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "vlds/train.py",
                "--preset=tiny",
                f"--train.out_dir={out}",
                "--train.log_every=1",
                "--data.num_workers=2",
                *extra,
            ],
            cwd=tree,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def wait_for(self, ready, what: str, poll=0.05, timeout=900) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if ready():
                return time.monotonic()
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited before {what}:\n{self.proc.stdout.read()[-3000:]}")
            time.sleep(poll)
        raise RuntimeError(f"no {what} in {timeout} s")

    def rows(self, kind: str) -> list[dict]:
        f = self.out / "metrics.jsonl"
        lines = f.read_text().splitlines() if f.is_file() else []
        return [r for r in map(json.loads, lines) if r["kind"] == kind]

    def signal_and_wait(self) -> tuple[float, str]:
        t0 = time.monotonic()
        os.killpg(self.proc.pid, signal.SIGTERM)
        output, _ = self.proc.communicate(timeout=900)
        return time.monotonic() - t0, output


def checkpoint_of(out: Path) -> dict:
    """What `latest` names: its step, and whether it is complete (trainer state, DeepSpeed
    state, the adapter export)."""
    ckpt = out / "checkpoints"
    if not (ckpt / "latest").is_file():
        return {"step": None, "complete": False}
    tag = (ckpt / "latest").read_text().strip()
    files = [ckpt / tag / "trainer_state.json", ckpt / tag / "adapter" / "adapter_config.json"]
    complete = all(f.is_file() for f in files) and any((ckpt / tag).glob("*model_states.pt"))
    step = json.loads(files[0].read_text())["step"] if files[0].is_file() else None
    return {"step": step, "complete": complete}


def calibrate_eval(tree: Path, root: Path) -> float:
    """Seconds of the final evaluation at step STEPS, without a signal."""
    t = Trial(tree, root / "calibration", f"--train.max_steps={STEPS}")
    saved = t.wait_for(lambda: any(r["step"] == STEPS for r in t.rows("checkpoint")), "save")
    t.wait_for(lambda: t.rows("eval"), "evaluation", timeout=1800)
    seconds = time.monotonic() - saved
    t.proc.communicate(timeout=600)
    return seconds


def one(tree: Path, out: Path, phase: str, rng: random.Random, eval_s: float) -> dict:
    if phase == "train":
        t = Trial(tree, out, "--train.max_steps=2000")
        t.wait_for(lambda: t.rows("train"), "a training step")
        time.sleep(rng.uniform(0, 3))
    elif phase == "save":
        t = Trial(tree, out, "--train.max_steps=2000", f"--train.save_every={STEPS}")
        tmp = out / "checkpoints" / f".tmp-step{STEPS}"
        t.wait_for(tmp.is_dir, "the save", poll=0.005)
    else:
        t = Trial(tree, out, f"--train.max_steps={STEPS}")
        t.wait_for(lambda: any(r["step"] == STEPS for r in t.rows("checkpoint")), "the save")
        time.sleep(rng.uniform(0, 0.8 * eval_s))
    reached = max([r["step"] for r in t.rows("train")], default=0)
    seconds, output = t.signal_and_wait()
    ckpt = checkpoint_of(out)
    return {
        "phase": phase,
        "seconds": round(seconds, 2),
        "exit": t.proc.returncode,
        "preempted": "preempted" in output,
        "finished": (out / "metrics.json").is_file(),
        "step_reached": reached,
        "checkpoint_step": ckpt["step"],
        "checkpoint_complete": ckpt["complete"],
        "error": next((x for x in output.splitlines() if "Error" in x), "")[:160],
    }


def in_flight(row: dict) -> tuple[int, int]:
    """The steps a checkpoint may hold: the last one logged when the signal was sent, or the
    one then in progress (it finishes before the ranks stop)."""
    return row["step_reached"], row["step_reached"] + 1


def table(rows: list[dict], eval_s: float | None) -> str:
    lines = [
        "| phase | signals | median s | worst s | exit codes | stopped / finished / crashed |"
        " checkpoint of the step reached |",
        "|---|---|---|---|---|---|---|",
    ]
    for phase in dict.fromkeys(r["phase"] for r in rows):
        rs = [r for r in rows if r["phase"] == phase]
        s = sorted(r["seconds"] for r in rs)
        ok = sum(r["checkpoint_complete"] and r["checkpoint_step"] in in_flight(r) for r in rs)
        codes = ", ".join(str(r["exit"]) for r in rs)
        stopped = sum(r["preempted"] and r["exit"] == 0 for r in rs)
        finished = sum(r["finished"] and r["exit"] == 0 for r in rs)
        lines.append(
            f"| {phase} | {len(rs)} | {s[len(s) // 2]:.1f} | {s[-1]:.1f} | {codes} | "
            f"{stopped} / {finished} / {len(rs) - stopped - finished} | {ok}/{len(rs)} |"
        )
    if eval_s is not None:
        lines.append(f"\nthe uninterrupted final evaluation takes {eval_s:.1f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.report_only:
        saved = json.loads(Path(a.report_only).read_text())
        print(table(saved["rows"], saved["eval_s"]))
        return 0
    tree, rng = Path(a.tree).resolve(), random.Random(a.seed)
    phases = [p for p in a.phases.split(",") if p]
    from bench.machine import cpu_model

    print(f"preemption latency: {tree} on {cpu_model()}, {os.cpu_count()} CPUs", flush=True)
    rows, eval_s = [], None
    with tempfile.TemporaryDirectory(prefix="vlds-preempt-") as tmp:
        root = Path(tmp)
        if "eval" in phases:
            eval_s = calibrate_eval(tree, root)
            print(f"final evaluation without a signal: {eval_s:.1f} s", flush=True)
        for phase in phases:
            for i in range(a.repeats):
                r = one(tree, root / f"{phase}{i}", phase, rng, eval_s or 0.0)
                print(json.dumps(r), flush=True)
                rows.append(r)
    print(table(rows, eval_s))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"rows": rows, "eval_s": eval_s}, indent=2) + "\n")
    good = all(
        r["exit"] == 0 and r["checkpoint_complete"] and r["checkpoint_step"] in in_flight(r)
        for r in rows
    )
    worst = max((r["seconds"] for r in rows), default=0.0)
    print(f"preemption: worst {worst:.1f} s from signal to exit; {'PASS' if good else 'FAIL'}")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
