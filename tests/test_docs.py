"""Every command in README.md and docs/*.md runs as written; every relative link resolves.

Commands are the lines of ```bash / ```sh blocks (continuation lines joined, comments dropped)
and lines starting with `$ ` anywhere. Each one is checked without running long jobs:

- `python -m MODULE` names an importable module (a package needs `__main__`); `vlds COMMAND` and
  `vlds-COMMAND` are console scripts of pyproject.toml and commands of vlds/cli.py, checked as
  the `python -m MODULE` they run; `python FILE`,
  `deepspeed ... FILE`, `torchrun ... FILE`, `srun ... python FILE`, `sbatch FILE`, `bash FILE`
  and `pytest FILE` name files of the repository; `--deepspeed FILE` names an existing JSON;
- the `--preset NAME` and `--section.key=value` (or `value` as the next argument) arguments of a
  train, evaluate or tune command
  (and of `make train ARGS="..."`) parse with `vlds.config.parse_cli` and pass
  `vlds.config.validate`, so a renamed preset, key, method or task fails here;
- `make TARGET` names a Makefile target; `pytest -m EXPR` uses registered markers;
- cheap commands really run: every `python -m vlds.recipe ...` as written; every
  `python -m vlds.peft.report ...` as written (its output is
  compared with a `# {...}` line right after it, when there is one), `bash -n ...` and
  `make lint`, `python -m vlds.data.synthetic --out DIR ...` (into a temp DIR), every
  `python -m vlds.data.prep.shards ...` as written on a miniature release laid out under the
  releases' own file names ("/data/" pointing at it), and `--help` of every
  `python -m vlds...` command line that uses argparse.

    .venv/bin/python -m pytest tests/test_docs.py
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
MAX_README_LINES = 220
RUN_TIMEOUT_S = 120
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").is_dir() else sys.executable

# Entry points whose `--preset` / `--section.key=value` arguments are vlds config overrides.
TRAIN_SCRIPTS = {"vlds/train.py", "slurm/train.sbatch"}
TUNE_SCRIPTS = {"tune/search.py", "slurm/tune.sbatch"}
OVERRIDE_MODULES = {"vlds.train", "vlds.evaluate"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SEPARATORS = {"&&", "||", ";", "|"}


@dataclass(frozen=True)
class Command:
    where: str  # "docs/data.md:42"
    argv: tuple[str, ...]  # one simple command, leading VAR=value assignments removed
    env: tuple[tuple[str, str], ...]
    expected: str | None  # a "# {...}" line right after the command: its JSON output


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def extract_commands(path: Path) -> list[Command]:
    """The shell commands of a markdown file, one per simple command."""
    lines = path.read_text().splitlines()
    commands: list[Command] = []
    fence, i = None, 0  # fence: the info string of the open code block, or None
    last_end = -2  # the line index where the latest command ended
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped.startswith("```"):
            fence = stripped[3:].strip().lower() if fence is None else None
            i += 1
            continue
        in_shell = fence in ("bash", "sh")
        if not (in_shell or stripped.startswith("$ ")):
            i += 1
            continue
        start = i
        text = stripped[2:] if stripped.startswith("$ ") else stripped
        while text.endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text[:-1] + " " + lines[i].strip()
        i += 1
        if not text or text.startswith("#"):
            if text.startswith("# {") and start == last_end + 1 and commands:
                # the documented output of the command just before
                commands[-1] = replace(commands[-1], expected=text[2:])
            continue
        last_end = i - 1
        tokens = shlex.split(text, comments=True)
        segment: list[str] = []
        for tok in [*tokens, ";"]:
            if tok not in SEPARATORS:
                segment.append(tok)
                continue
            env = []
            while segment and ENV_ASSIGNMENT.match(segment[0]):
                key, _, value = segment.pop(0).partition("=")
                env.append((key, value))
            if segment:
                where = f"{rel(path)}:{start + 1}"
                commands.append(Command(where, tuple(segment), tuple(env), None))
            segment = []
    return commands


COMMANDS = [c for page in PAGES for c in extract_commands(page)]


def command_id(c: Command) -> str:
    return f"{c.where} {' '.join(c.argv)[:60]}"


# ---- what the checks compare against ----------------------------------------------------------


def makefile_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.M)}


def console_scripts() -> set[str]:
    import tomllib

    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])


def pytest_markers() -> set[str]:
    import tomllib

    ini = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    return {m.split(":", 1)[0].strip() for m in ini.get("markers", [])}


def find_module(name: str):
    """The module's spec, or None when it (or a parent package) does not exist."""
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def module_files(name: str) -> list[Path]:
    spec = find_module(name)
    if spec is None or spec.origin is None:
        return []
    if spec.submodule_search_locations:  # a package: everything `python -m` may reach
        return sorted(Path(spec.origin).parent.rglob("*.py"))
    return [Path(spec.origin)]


def check_overrides(args: list[str], where: str, entry: str) -> None:
    """`--preset` / `--config` / `--section.key=value` as vlds parses them; a train command may
    also pass only `--deepspeed FILE` (anything else vlds/train.py would refuse)."""
    import vlds.engine  # noqa: F401  (registers every config section's checks)
    from vlds.config import parse_cli, validate

    kept: list[str] = []
    it = iter(args)
    for arg in it:
        if arg == "--config":
            next(it, None)  # a file the reader writes (e.g. the search's best_config.json)
        elif arg.startswith("--config="):
            continue
        elif entry == "train" or arg.startswith("--preset"):
            kept.append(arg)
            if arg == "--preset":
                kept.append(next(it, ""))
        elif arg.startswith("--") and "." in arg.split("=", 1)[0]:
            kept.append(arg)
            value = None if "=" in arg else next(it, None)  # `--key value`
            kept += [value] if value is not None else []
    cfg, rest = parse_cli(kept)
    validate(cfg)
    it = iter(rest)
    for arg in it:
        assert arg == "--deepspeed", f"{where}: vlds/train.py does not take {arg!r}"
        ds = next(it, "")
        assert (REPO / ds).is_file(), f"{where}: --deepspeed {ds} does not exist"


def check_python(args: list[str], where: str) -> None:
    """`python -m MODULE ...` or `python FILE ...`."""
    if args[:1] == ["-m"]:
        module, rest = args[1], args[2:]
        spec = find_module(module)
        assert spec is not None, f"{where}: no module {module}"
        if spec.submodule_search_locations:
            assert find_module(f"{module}.__main__"), f"{where}: {module} has no __main__"
        if module in OVERRIDE_MODULES:
            check_overrides(rest, where, "train" if module == "vlds.train" else "other")
        return
    assert args and not args[0].startswith("-"), f"{where}: unsupported python call {args}"
    script, rest = args[0], args[1:]
    assert (REPO / script).is_file(), f"{where}: {script} does not exist"
    if script in TRAIN_SCRIPTS:
        check_overrides(rest, where, "train")
    elif script in TUNE_SCRIPTS:
        check_overrides(rest, where, "tune")


def check_vlds(prog: str, args: list[str], where: str) -> None:
    """`vlds COMMAND ...` / `vlds-COMMAND ...`: a console script that runs a module's `python -m`
    form (vlds/cli.py); its arguments are checked as that form's."""
    from vlds.cli import COMMANDS

    assert prog in console_scripts(), f"{where}: {prog} is not in pyproject's [project.scripts]"
    if prog == "vlds":
        if args[:1] in (["--help"], ["-h"], ["--version"]):
            return
        assert args and args[0] in COMMANDS, f"{where}: vlds has no command {args[:1]}"
        command, rest = args[0], args[1:]
    else:
        command, rest = prog.removeprefix("vlds-"), args
    check_python(["-m", COMMANDS[command][0], *rest], where)
    if command == "tune":
        check_overrides(rest, where, "tune")


def check_pytest(args: list[str], where: str) -> None:
    """Test files that exist and `-m EXPR` over registered markers."""
    for f in [a for a in args if a.endswith(".py") or a.startswith("tests/")]:
        assert (REPO / f.split("::")[0]).exists(), f"{where}: {f} does not exist"
    if "-m" in args:
        words = re.findall(r"[A-Za-z_]+", args[args.index("-m") + 1])
        unknown = set(words) - {"and", "or", "not"} - pytest_markers()
        assert not unknown, f"{where}: unregistered pytest markers {unknown}"


def check_launcher(args: list[str], where: str) -> None:
    """deepspeed / torchrun: launcher options, then the script and its arguments."""
    scripts = [i for i, a in enumerate(args) if a.endswith(".py")]
    assert scripts, f"{where}: no script in {args}"
    check_python(args[scripts[0] :], where)


def check_command(c: Command) -> None:
    prog, args, where = Path(c.argv[0]).name, list(c.argv[1:]), c.where
    if prog in ("python", "python3"):
        check_python(args, where)
    elif prog in ("deepspeed", "torchrun"):
        check_launcher(args, where)
    elif prog == "srun":
        assert "python" in args, f"{where}: srun without python"
        check_python(args[args.index("python") + 1 :], where)
    elif prog == "sbatch":
        scripts = [i for i, a in enumerate(args) if a.endswith(".sbatch")]
        assert scripts, f"{where}: no .sbatch script in {args}"
        script, rest = args[scripts[0]], args[scripts[0] + 1 :]
        assert (REPO / script).is_file(), f"{where}: {script} does not exist"
        check_overrides(rest, where, "train" if script in TRAIN_SCRIPTS else "tune")
        if ds := dict(c.env).get("DS_CONFIG"):
            assert (REPO / ds).is_file(), f"{where}: DS_CONFIG={ds} does not exist"
    elif prog in ("bash", "sh"):
        files = [a for a in args if not a.startswith("-")]
        assert files and (REPO / files[0]).is_file(), f"{where}: no script file in {args}"
    elif prog == "make":
        targets = [a for a in args if "=" not in a and not a.startswith("-")]
        missing = sorted(set(targets) - makefile_targets())
        assert targets and not missing, f"{where}: not Makefile targets: {missing or args}"
        variables = dict(a.split("=", 1) for a in args if "=" in a)
        if "train" in targets and "ARGS" in variables:
            check_overrides(shlex.split(variables["ARGS"]), where, "train")
        if "test" in targets and "PYTEST_ARGS" in variables:
            check_pytest(shlex.split(variables["PYTEST_ARGS"]), where)
    elif prog == "pytest":
        check_pytest(args, where)
    elif prog == "vlds" or prog.startswith("vlds-"):
        check_vlds(prog, args, where)
    elif (REPO / c.argv[0]).is_file():  # a script of the repository, e.g. slurm/local/cluster.sh
        script = REPO / c.argv[0]
        assert os.access(script, os.X_OK), f"{where}: {c.argv[0]} is not executable"
        if args and not args[0].startswith("-"):  # its subcommand: a cmd_<name> function
            assert f"cmd_{args[0]}()" in script.read_text(), f"{where}: no subcommand {args[0]}"
    else:
        pytest.fail(f"{where}: no check for the command {' '.join(c.argv)!r}; add one here")


@pytest.mark.parametrize("command", COMMANDS, ids=command_id)
def test_command_names_what_exists(command: Command):
    check_command(command)


# ---- commands cheap enough to run --------------------------------------------------------------


def run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, *argv], cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )


def python_module_calls() -> list[tuple[Command, str, list[str]]]:
    out = []
    for c in COMMANDS:
        argv = list(c.argv)
        if Path(argv[0]).name in ("python", "python3") and argv[1:2] == ["-m"]:
            out.append((c, argv[2], argv[3:]))
    return out


REPORT_CALLS = [
    (c, args) for c, module, args in python_module_calls() if module == "vlds.peft.report"
]


def has_argparse(module: str) -> bool:
    return any("argparse" in f.read_text() for f in module_files(module))


# vlds command lines that use argparse; a module that does not exist (yet) stays in the list,
# so that its test fails instead of vanishing
HELP_MODULES = sorted(
    {
        module
        for _, module, _ in python_module_calls()
        if module.split(".")[0] == "vlds" and (not module_files(module) or has_argparse(module))
    }
)


@pytest.mark.parametrize("command,args", REPORT_CALLS, ids=[command_id(c) for c, _ in REPORT_CALLS])
def test_peft_report_runs_as_written(command: Command, args: list[str]):
    proc = run(["-m", "vlds.peft.report", *args])
    assert proc.returncode == 0, f"{command.where}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    if command.expected is not None:
        assert json.loads(proc.stdout) == json.loads(command.expected), (
            f"{command.where}: the documented output differs:\n{proc.stdout}"
        )


RECIPE_CALLS = [(c, args) for c, module, args in python_module_calls() if module == "vlds.recipe"]


@pytest.mark.parametrize("command,args", RECIPE_CALLS, ids=[command_id(c) for c, _ in RECIPE_CALLS])
def test_recipe_printer_runs_as_written(command: Command, args: list[str]):
    proc = run(["-m", "vlds.recipe", *args])
    assert proc.returncode == 0, f"{command.where}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "train.lr" in proc.stdout and "global batch" in proc.stdout


@pytest.mark.parametrize("module", HELP_MODULES)
def test_module_help_runs(module: str):
    assert module_files(module), f"no module {module}"
    proc = run(["-m", module, "--help"])
    assert proc.returncode == 0, f"{module} --help: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "usage" in proc.stdout.lower()


# ---- the data writers' commands, run as written on a release in the official layout ---------

SHARD_CALLS = [
    (c, args) for c, module, args in python_module_calls() if module == "vlds.data.prep.shards"
]


def expand_braces(token: str) -> list[str]:
    """bash's brace expansion of one group, as the shell does for the docs' `{train,val}`."""
    m = re.search(r"\{([^{}]*,[^{}]*)\}", token)
    if not m:
        return [token]
    return [
        x
        for part in m.group(1).split(",")
        for x in expand_braces(token[: m.start()] + part + token[m.end() :])
    ]


@pytest.fixture(scope="module")
def official_release(tmp_path_factory):
    """tests/test_shards.py's miniature release laid out as the docs' commands name it: the
    releases' own file names in the working folder, datasets under DATA (for "/data/")."""
    import shutil
    import tarfile
    import zipfile

    from tests.test_shards import make_release

    cwd = tmp_path_factory.mktemp("official")
    r = make_release(cwd / "release")
    data = cwd / "data"
    (data / "coco").mkdir(parents=True)
    shutil.copytree(r["coco_images"][0], data / "coco" / "train2014")
    shutil.copy(r["coco_images"][1], data / "coco" / "val2014.zip")
    with zipfile.ZipFile(r["coco_images"][1]) as z:
        z.extractall(data / "coco")  # its members are val2014/...: the folder form
    with tarfile.open(r["gqa_images"]) as tar:
        members = [m for m in tar if m.name.startswith("images/")]
        tar.extractall(data / "gqa", members=members, filter="data")
    shutil.copytree(r["nlvr_images"][0] / "train", data / "nlvr2" / "images" / "train")
    shutil.copytree(r["features"], data / "value" / "clip-vit-b32")
    (data / "yc2").mkdir()
    with zipfile.ZipFile(data / "yc2" / "videos.zip", "w") as z:
        for v in sorted(r["videos"].iterdir()):
            z.write(v, f"videos/{v.name}")
    for name in ("questions_train2014", "questions_val2014"):
        sub = name.split("_")[1]
        shutil.copy(r[f"q_{sub}"], cwd / r[f"q_{sub}"].name)
        shutil.copy(r[f"a_{sub}"], cwd / r[f"a_{sub}"].name)
    shutil.copy(r["karpathy"], cwd / "dataset_coco.json")
    shutil.copy(r["gqa_train"], cwd / "train_balanced_questions.json")
    shutil.copy(r["nlvr_train"], cwd / "train.json")
    for task in ("tvqa", "how2qa", "tvc"):
        shutil.copy(r[task], cwd / f"{task}_train.jsonl")
    shutil.copy(r["yc2c"], cwd / "yc2c_val.jsonl")
    for subs in ("tv_subtitles.jsonl", "how2_subtitles.jsonl", "yc2_subtitles.jsonl"):
        shutil.copy(r["subtitles"], cwd / subs)
    # test splits without labels: VQA test-dev (questions only), GQA test-balanced (no answer)
    (data / "coco" / "test2015").mkdir()
    questions = []
    for i in (5, 6):
        name = f"COCO_test2015_{i:012d}.jpg"
        shutil.copy(
            data / "coco" / "train2014" / f"COCO_train2014_{i:012d}.jpg",
            data / "coco" / "test2015" / name,
        )
        questions.append({"image_id": i, "question": "what is it?", "question_id": i * 10 + 3})
    (cwd / "v2_OpenEnded_mscoco_test-dev2015_questions.json").write_text(
        json.dumps({"data_subtype": "test2015", "questions": questions})
    )
    gqa = json.loads((cwd / "train_balanced_questions.json").read_text())
    test = {f"0{k}": {x: v for x, v in q.items() if x != "answer"} for k, q in gqa.items()}
    (cwd / "test_balanced_questions.json").write_text(json.dumps(test))
    return cwd


@pytest.mark.parametrize("command,args", SHARD_CALLS, ids=[command_id(c) for c, _ in SHARD_CALLS])
def test_shard_writer_commands_run_as_written(command: Command, args, official_release):
    """Only "/data/" is replaced (by the release's folder) and the shell's brace expansion
    done; every argument else is the documentation's."""
    data = str(official_release / "data") + "/"
    argv = [x.replace("/data/", data, 1) for a in args for x in expand_braces(a)]
    proc = subprocess.run(
        [PYTHON, "-m", "vlds.data.prep.shards", *argv],
        cwd=official_release,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"{command.where}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    task, split = argv[0], argv[argv.index("--split") + 1]
    out = Path(argv[argv.index("--out") + 1])
    task = {"nlvr2": "nlvr", "coco-caption": "caption"}.get(task, task)
    index = json.loads((out / task / f"{split}.index.json").read_text())
    assert index["total"] > 0, f"{command.where}: wrote no sample"
    assert index.get("labelled", True) == (not split.startswith("test")), command.where


SYNTHETIC_CALLS = [
    (c, args)
    for c, module, args in python_module_calls()
    if module == "vlds.data.synthetic" and "--out" in args
]


@pytest.mark.parametrize(
    "command,args", SYNTHETIC_CALLS, ids=[command_id(c) for c, _ in SYNTHETIC_CALLS]
)
def test_synthetic_writer_command_runs_as_written(command: Command, args, tmp_path):
    """Its --out folder replaced by a temp one (the bare call writes the 359 MB default world
    into the user's cache: checked, not run)."""
    out = args.index("--out") + 1
    argv = [*args[:out], str(tmp_path / "w"), *args[out + 1 :]]
    proc = run(["-m", "vlds.data.synthetic", *argv])
    assert proc.returncode == 0, f"{command.where}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert list((tmp_path / "w").glob("shapes-*/COMPLETE")), f"{command.where}: no world written"


# seconds-long shell commands: run as written from the checkout
QUICK_CALLS = [
    c
    for c in COMMANDS
    if (Path(c.argv[0]).name == "bash" and "-n" in c.argv) or list(c.argv) == ["make", "lint"]
]


@pytest.mark.parametrize("command", QUICK_CALLS, ids=command_id)
def test_quick_commands_run_as_written(command: Command):
    proc = subprocess.run(
        list(command.argv), cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    assert proc.returncode == 0, f"{command.where}: exit {proc.returncode}\n{proc.stdout[-2000:]}"


def test_report_and_help_are_found():
    assert len(REPORT_CALLS) >= 2 and RECIPE_CALLS
    assert {a[0] for _, a in SHARD_CALLS} >= {"vqa", "gqa", "nlvr2", "coco-caption", "tvqa"}
    assert SYNTHETIC_CALLS and len(QUICK_CALLS) >= 2
    assert {"vlds.evaluate", "vlds.peft.report", "vlds.data.prep.shards"} <= set(HELP_MODULES)


# ---- the README's shape and every link ---------------------------------------------------------


def test_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines"
    first = [c for c in COMMANDS if c.where.startswith("README.md:")][:2]
    assert [" ".join(c.argv) for c in first] == ["make train", "make test"]


def strip_fences(text: str) -> str:
    return re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.S | re.M)


def strip_code(text: str) -> str:
    """Markdown without fenced blocks and inline code (links there are not links)."""
    return re.sub(r"`[^`\n]*`", "", strip_fences(text))


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces -> '-', -1 for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for line in strip_fences(path.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def relative_links(path: Path) -> list[str]:
    targets = re.findall(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", strip_code(path.read_text()))
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_resolve(page: Path):
    broken = []
    for target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {rel(dest)})")
    assert not broken, f"{rel(page)}: broken links: {broken}"


def test_readme_layout_map_matches_the_tree():
    """Every file the map names exists, and every module and package of vlds/ is named."""
    text = README.read_text()
    block = text.split("## Repository layout", 1)[1].split("```", 2)[1]
    named = set(re.findall(r"[A-Za-z_]\w*\.py", block))
    tracked = {p.name for p in REPO.glob("**/*.py") if ".venv" not in p.parts}
    assert named <= tracked, f"the layout map names missing files: {sorted(named - tracked)}"
    for path in sorted((REPO / "vlds").rglob("*.py")):
        if path.name in ("__init__.py", "__main__.py") or "converters" in path.parts:
            continue  # converters/ is named as a folder (one module per family of releases)
        assert path.name in named, f"{rel(path)} is missing from README.md's layout map"
    for package in sorted(p.parent for p in (REPO / "vlds").rglob("__init__.py")):
        if package != REPO / "vlds":
            assert f"{package.name}/" in block, f"{rel(package)}/ is missing from the map"


def test_commands_are_found():
    # guards the extraction itself: too few commands would make the tests above vacuous
    assert len(COMMANDS) >= 30, [command_id(c) for c in COMMANDS]
