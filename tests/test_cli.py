"""The console commands (`vlds`, `vlds-<command>`, from pyproject's [project.scripts]) behave as
their module forms, and what needs no extra works without the extras.

The installed scripts are run from the interpreter's bin folder (`make test` reinstalls the
project when pyproject.toml changes, which creates them). "Without the extras" is a
sitecustomize.py on PYTHONPATH whose import finder refuses ray, av, wandb and mlflow, as if they
were not installed; a fresh venv with `pip install .` and no extras was checked by hand
(docs/testing.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlds.cli import ALIASES, COMMANDS

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
EXTRAS = ("ray", "av", "wandb", "mlflow")  # the top-level modules of the optional extras
BLOCKER = f'''
import sys


class NoExtras:
    """Refuses the modules of vlds's optional extras, as if they were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {EXTRAS!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
        return None


sys.meta_path.insert(0, NoExtras())
'''


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def run(argv: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=300
    )


def script(name: str) -> str:
    path = BIN / name
    assert path.is_file(), f"{path} is missing: reinstall the project (pip install -e '.[dev]')"
    return str(path)


@pytest.fixture(scope="module")
def no_extras(tmp_path_factory) -> dict:
    """The environment of a process without the extras: PYTHONPATH with the blocker."""
    site = tmp_path_factory.mktemp("no_extras")
    (site / "sitecustomize.py").write_text(BLOCKER)
    return {"PYTHONPATH": str(site)}


def test_help_lists_every_command_without_importing_torch():
    p = run([script("vlds"), "--help"])
    assert p.returncode == 0, p.stderr
    listed = [line.split()[0] for line in p.stdout.splitlines() if line.startswith("  ")]
    assert [c for c in listed if c in COMMANDS] == list(COMMANDS)
    for name, (module, _) in COMMANDS.items():
        (line,) = [x for x in p.stdout.splitlines() if x.startswith(f"  {name} ")]
        assert line.endswith(f"python -m {module}"), line
    for alias in ALIASES:
        assert f"vlds-{alias}" in p.stdout
    code = (
        "import sys, vlds.cli\n"
        "try:\n    vlds.cli.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "heavy = ('torch', 'deepspeed', 'transformers', 'ray', 'numpy')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    p = run([sys.executable, "-c", code])
    assert p.returncode == 0 and p.stdout.splitlines()[-1] == "[]", p.stdout + p.stderr


def test_no_or_unknown_command_is_a_usage_error():
    for argv in ([], ["bogus"]):
        p = run([script("vlds"), *argv])
        assert p.returncode == 2 and "usage: vlds COMMAND" in p.stderr, p.stderr


@pytest.mark.parametrize("command", list(COMMANDS))
def test_command_help_is_the_module_help(command: str):
    module = COMMANDS[command][0]
    want = run([sys.executable, "-m", module, "--help"])
    assert want.returncode == 0 and "usage" in want.stdout.lower(), want.stderr[-3000:]
    forms = [[script("vlds"), command, "--help"]]
    if command in ALIASES:
        forms.append([script(f"vlds-{command}"), "--help"])
    for argv in forms:
        p = run(argv)
        assert (p.returncode, p.stdout) == (0, want.stdout), (argv, p.stderr[-3000:])


@pytest.mark.parametrize(
    "argv,error",
    [
        (["--train.lr=abc"], "train.lr='abc' is not a valid float"),
        (["--nosuch"], "unrecognised argument '--nosuch'"),
    ],
)
def test_train_errors_exit_2_as_the_script_does(argv: list[str], error: str):
    want = run([sys.executable, "vlds/train.py", *argv])
    assert want.returncode == 2 and error in want.stderr, want.stderr[-3000:]
    for cmd in ([script("vlds"), "train"], [script("vlds-train")]):
        p = run([*cmd, *argv])
        assert (p.returncode, p.stderr) == (2, want.stderr), (cmd, p.stderr[-3000:])


def test_tune_errors_exit_2_as_the_script_does():
    want = run([sys.executable, "tune/search.py", "--grace=50"])
    assert want.returncode == 2 and "not a multiple of --eval-every" in want.stderr, want.stderr
    for argv in (
        [script("vlds"), "tune"],
        [script("vlds-tune")],
        [sys.executable, "-m", "vlds.tune.search"],
    ):
        p = run([*argv, "--grace=50"])
        assert (p.returncode, p.stderr) == (2, want.stderr), (argv, p.stderr[-3000:])


# ---- without the extras ---------------------------------------------------------------------


def test_the_blocker_hides_the_extras(no_extras):
    for module in EXTRAS:
        p = run([sys.executable, "-c", f"import {module}"], **no_extras)
        assert p.returncode == 1 and "(blocked)" in p.stderr, (module, p.stderr[-3000:])


def test_help_training_and_imports_work_without_extras(no_extras):
    p = run([script("vlds"), "--help"], **no_extras)
    assert p.returncode == 0 and "tune" in p.stdout, p.stderr[-3000:]
    p = run([script("vlds"), "train", "--help"], **no_extras)
    assert p.returncode == 0 and p.stdout.startswith("usage: vlds/train.py"), p.stderr[-3000:]
    code = (
        "import sys, vlds, vlds.train, vlds.config, vlds.evaluate, vlds.data.prep.shards\n"
        "import vlds.tune.space, vlds.tune.results\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {EXTRAS!r}))"
    )
    p = run([sys.executable, "-c", code], **no_extras)
    assert p.returncode == 0 and p.stdout.splitlines()[-1] == "[]", p.stdout + p.stderr[-3000:]


def test_tune_without_ray_names_the_extra(no_extras):
    for argv in (
        [script("vlds"), "tune", "--help"],
        [script("vlds-tune")],
        [sys.executable, "tune/search.py", "--help"],
    ):
        p = run(argv, **no_extras)
        assert p.returncode == 2, (argv, p.stdout, p.stderr[-3000:])
        assert p.stderr.startswith("error: the search (vlds tune) needs ray"), p.stderr[-3000:]
        assert 'pip install "vlds[tune]"' in p.stderr and "Traceback" not in p.stderr


def test_video_decoding_without_av_names_the_extra(no_extras, tmp_path):
    code = (
        "from vlds.data.prep.video import decode_frames\n"
        "try:\n    decode_frames(b'', 4, 32)\n"
        "except ImportError as e:\n    print(type(e).__name__, e)"
    )
    p = run([sys.executable, "-c", code], **no_extras)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.startswith("MissingExtra decoding videos") and 'vlds[video]"' in p.stdout
