"""Training runs for the tests, forked from a process that has already imported the stack.

A tiny `python vlds/train.py` run on 2 cores spends ~16 of its ~28 s importing (measured with
`python -X importtime`: open_clip 4.8 s with torchvision and torch._dynamo, torch 3.1 s,
deepspeed 2.4 s + 1.5 s for its optimizer's torch._inductor, transformers 3.4 s); forked from
here, the same run took 8.9 s. The suite starts ~100 runs. The standard library's forkserver
(multiprocessing, "forkserver" context) starts one server per pytest worker that imports what a
run imports (tests/warm_imports.py) once; each run is a fork of that server: a real, separate
process (its own pid, session, signals, data-loader workers, exit code; killed with SIGKILL it
dies as a script does) that calls `vlds.train.cli`, the function `python vlds/train.py` calls
(test_evaluate.py's evaluator runs call `vlds.evaluate.main` the same way). What it does not
cover is the script's first second (the interpreter's start, the early signal handlers
installed before the imports): tests of that, of the launchers and of the commands as users
type them start real interpreters (test_cli.py, test_docs.py, the launcher runs in
test_train.py, test_reliability.py's whole-process-group test, test_slurm.py).

Ranks: a run of N ranks is N such processes given what torchrun gives a rank (RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT); as a launcher does, when
one rank fails the others are killed.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import wait
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAIN = "vlds.train:cli"  # what `python vlds/train.py` calls
_CONTEXT = None


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["tests.warm_imports"])
    return _CONTEXT


def _child(argv: list[str], env: dict, logs: str, entry: str) -> None:
    """In the forked process: its own session, the given environment, output to files, then
    `entry` ("module:function") called with argv."""
    os.setsid()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(REPO)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        f = os.open(os.path.join(logs, name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(f, fd)
        os.close(f)
    module, function = entry.split(":")
    sys.argv = [module, *argv]
    # a forkserver child inherits the forkserver start method; a script's default is fork (the
    # data loader's workers are forks of the run)
    multiprocessing.set_start_method("fork", force=True)
    if entry == TRAIN:
        from vlds.train import catch_early_signals

        catch_early_signals()
    getattr(importlib.import_module(module), function)(argv)


class Run:
    """One forked process running `entry` (Popen's pid / poll / wait / kill / communicate)."""

    def __init__(self, argv, env: dict, entry: str = TRAIN):
        self.logs = tempfile.mkdtemp(prefix="vlds-run-")
        child_args = ([str(a) for a in argv], env, self.logs, entry)
        self.proc = _context().Process(target=_child, args=child_args)
        self.proc.start()
        self.pid = self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.exitcode

    def poll(self) -> int | None:
        return self.proc.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            raise subprocess.TimeoutExpired("vlds/train.py (forked)", timeout)
        return self.proc.exitcode

    def kill(self) -> None:
        """SIGKILL to the run's session: the process and its data workers."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)

    def read(self, name: str) -> str:
        try:
            return Path(self.logs, name).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def output(self) -> str:
        return self.read("stdout") + self.read("stderr")

    def communicate(self, timeout: float | None = None) -> tuple[str, None]:
        """Waits (killing the run on timeout, then raising) and returns (stdout + stderr, None)."""
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        return self.output(), None


def run(argv, env: dict | None = None, ranks: int = 1, timeout: float = 600, entry=TRAIN):
    """vlds/train.py ARGV on `ranks` forked processes (or another `entry` on one); a
    CompletedProcess with each rank's stdout and stderr joined. Raises
    subprocess.TimeoutExpired (the ranks killed) on timeout."""
    from vlds.distributed import free_port

    env = {**os.environ, **(env or {})}
    port = str(free_port())
    runs = []
    for rank in range(ranks):
        world = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(ranks)}
        world.update(RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(ranks))
        runs.append(Run(argv, {**env, **world} if ranks > 1 else env, entry))
    deadline = time.monotonic() + timeout
    try:
        pending = list(runs)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired("vlds/train.py (forked)", timeout)
            for sentinel in wait([r.proc.sentinel for r in pending], timeout=left):
                r = next(r for r in pending if r.proc.sentinel == sentinel)
                r.proc.join()
                pending.remove(r)
                if r.returncode != 0:  # as torchrun / deepspeed do: the others are stopped
                    for other in pending:
                        other.kill()
    finally:
        for r in runs:
            if r.returncode is None:
                r.kill()
                r.proc.join()
    code = next((r.returncode for r in runs if r.returncode != 0), 0)
    done = subprocess.CompletedProcess(
        [entry, *map(str, argv)],
        code,
        stdout="".join(r.read("stdout") for r in runs),
        stderr="".join(r.read("stderr") for r in runs),
    )
    for r in runs:
        shutil.rmtree(r.logs, ignore_errors=True)
    return done
