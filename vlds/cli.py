"""The `vlds` console command: one sub-command per entry point, each exactly its module form.

    vlds --help                                 # the sub-commands, one line each
    vlds train --peft.method=single_lora        # = python -m vlds.train --peft.method=...
    vlds train --help                           # vlds/train.py's own help
    vlds-train --peft.method=single_lora        # the same (aliases: vlds-<command>)

`vlds CMD ARGS` runs the module that `python -m MODULE ARGS` runs, the way Python runs it: as
`__main__` (runpy), with `sys.argv` = [the module's file, *ARGS]. Argument parsing, `--help`,
messages and exit codes (train: 2 bad config/data/checkpoint, 3 non-finite steps) are the
module's own code, not a copy. `deepspeed vlds/train.py`, `torchrun vlds/train.py` and
`python -m ...` are unchanged; a multi-process launch still names vlds/train.py.

This module imports only the standard library, so `vlds --help` needs no torch. It also holds
`require`, which imports a module of an optional extra or fails naming the install command.
"""

from __future__ import annotations

import argparse
import importlib
import runpy
import sys

# command -> (the module `python -m` runs, its line in `vlds --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("vlds.train", "train a PEFT method on a task mix (one process)"),
    "evaluate": ("vlds.evaluate", "evaluate an adapter, or score a prediction file"),
    "shards": ("vlds.data.prep.shards", "write training shards from a public release"),
    "extract": ("vlds.data.prep.extract", "cache frozen CLIP features as feature shards"),
    "synthetic": ("vlds.data.synthetic", "render the embedded shapes-world data set"),
    "report": ("vlds.peft.report", "trainable parameters (% updated) of PEFT methods"),
    "tune": ("vlds.tune.search", "Ray Tune + ASHA search (needs vlds[tune])"),
}
ALIASES = ("train", "evaluate", "shards", "extract", "tune", "report")  # vlds-<name>


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def require(module: str, extra: str, what: str):
    """Import `module` (a dependency of the `extra` extra) for `what`; MissingExtra if it is
    not installed (or fails to import), naming `pip install "vlds[extra]"`."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(
            f"{what} needs {module.split('.')[0]} ({e}); install it with: "
            f'pip install "vlds[{extra}]" (in a checkout: pip install -e ".[{extra}]")'
        ) from e


def run(command: str, args: list[str]) -> int:
    """`python -m MODULE *args` in this process; the module's exit status is raised as
    SystemExit, as under `python -m`."""
    sys.argv = [sys.argv[0], *args]  # runpy replaces [0] with the module's file
    runpy.run_module(COMMANDS[command][0], run_name="__main__", alter_sys=True)
    return 0


def parser() -> argparse.ArgumentParser:
    """Only for `vlds --help`, `--version` and the error for a missing or unknown command."""
    rows = "\n".join(f"  {n:<10} {line:<50} python -m {m}" for n, (m, line) in COMMANDS.items())
    p = argparse.ArgumentParser(
        prog="vlds",
        usage="vlds COMMAND [ARGS ...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="VL-Adapter-style PEFT on DeepSpeed: the command-line tools.\n\n"
        f"commands (each runs its module as `python -m` does; `vlds COMMAND --help`):\n{rows}",
        epilog="Aliases: "
        + ", ".join(f"vlds-{c}" for c in ALIASES)
        + '.\nExtras: pip install "vlds[video]" (video shards), "vlds[tune]" (the search),\n'
        '"vlds[trackers]" (wandb, mlflow); "vlds[dev]": all of them and the test tools.',
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    p.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help=argparse.SUPPRESS)
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vlds")
    except PackageNotFoundError:
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    """`vlds COMMAND ARGS...`; `vlds --help` lists the commands."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        return run(argv[0], argv[1:])
    parser().parse_args(argv[:1])  # --help / --version, or argparse's error (exit 2)
    return 2  # not reached: a first argument that parses is a command


def _alias(command: str):
    def entry() -> int:
        return run(command, sys.argv[1:])

    entry.__name__ = entry.__qualname__ = command
    entry.__doc__ = f"`vlds-{command} ARGS` = `vlds {command} ARGS`."
    return entry


train, evaluate, shards, extract, tune, report = (_alias(c) for c in ALIASES)

if __name__ == "__main__":
    sys.exit(main())
