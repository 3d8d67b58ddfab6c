"""Shared fixtures: a small shapes-world dataset written once per session, tiny configs."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

import vlds.engine  # noqa: F401  (registers every config section's check, as entry points do)
from tests.helpers import S3_ENV, SAME_RUN, is_launch_var, server, tiny_args, train_run

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*No pretrained weights loaded.*")

# The suite starts its own launchers; a job or rank environment around it (a CI runner inside a
# SLURM allocation, a shell left with RANK/MASTER_PORT) must not reach the runs it starts.
for _k in list(os.environ):
    if is_launch_var(_k):
        del os.environ[_k]


# The slowest files (measured: their tests launch training runs, a Ray search or a SLURM
# cluster), first: `make test` hands whole files to its two xdist workers in collection order
# (--dist loadfile --no-loadscope-reorder), so a long file never starts when the other worker
# is nearly done.
SLOW_FILES = ("test_train.py", "test_reliability.py", "test_slurm.py", "test_distributed.py",
              "test_tune.py", "test_evaluate.py", "test_mini_repro.py", "test_docs.py")  # fmt: skip


def pytest_collection_modifyitems(config, items):
    first = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: first.get(item.path.name, len(SLOW_FILES)))


def pytest_unconfigure(config):
    """After the summary: if the interpreter has not exited within EXIT_WATCHDOG_S (something
    the suite left behind: a non-daemon thread, a child process the exit joins), print every
    thread's stack and exit 1, instead of hanging until CI's time limit says nothing. Once
    cost a whole CI run (a data worker that blocked SIGTERM; tests/test_reliability.py)."""
    import faulthandler
    import sys

    seconds = float(os.environ.get("VLDS_EXIT_WATCHDOG_S", "300"))
    faulthandler.dump_traceback_later(seconds, exit=True, file=sys.__stderr__)


@pytest.fixture(autouse=True)
def _restore_environ():
    """vlds.distributed.world_info_from_env writes RANK/MASTER_* into os.environ (torch's env://
    init reads them there); undo that after every test so no later test or subprocess sees a
    world of another test. Set up before `monkeypatch`, so this runs after its undo."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    """A small embedded dataset (all eight tasks) + its tokenizer."""
    from vlds.data.synthetic import SyntheticSpec, ensure_synthetic

    spec = SyntheticSpec(
        seed=0,
        train_per_task=192,
        val_per_task=48,
        video_train_per_task=96,
        video_val_per_task=32,
        samples_per_shard=64,
    )
    root = ensure_synthetic(tmp_path_factory.mktemp("shapes"), spec)
    prebuild_embedded_backbone(root)
    return root


def prebuild_embedded_backbone(root):
    """The tiny presets' pretrained tower and language models (t5, bart), built here once
    so that no training subprocess pretrains them (their quality is tested on their own).
    The tower is the machine's cached one (as `make train`'s); the language models get 100
    steps instead of 1,500: the tests need their shapes, not their skill."""
    from transformers import T5Tokenizer

    import vlds.model.embedded_lm as elm
    from vlds.config import build_config
    from vlds.model.embedded_tower import ensure_tower

    ensure_tower("vlds-tiny-rn")
    tok = T5Tokenizer.from_pretrained(str(root / "tokenizer"), extra_ids=0)
    saved, elm.STEPS = elm.STEPS, 100
    try:
        for arch in ("t5", "bart"):
            elm.ensure_lm(build_config("tiny", {"model.arch": arch}), root, tok)
    finally:
        elm.STEPS = saved


@pytest.fixture(scope="session")
def tokenizer(shapes_root):
    from transformers import T5Tokenizer

    return T5Tokenizer.from_pretrained(str(shapes_root / "tokenizer"), extra_ids=0)


@pytest.fixture(scope="session")
def one_and_two_ranks(shapes_root, tmp_path_factory):
    """The same 6 steps as 1 rank x micro-batch 16 and as 2 ranks x micro-batch 8: every rank
    reads the same stream and takes its slice of each global batch (data.split=global), no
    dropout, the same seed. Prompts keep their natural lengths: a micro-batch of 8 pads its
    text less than one of 16, which must not matter (visual tokens come first in the encoder).
    """
    runs = {}
    for ranks, micro in ((1, 16), (2, 8)):
        out = tmp_path_factory.mktemp(f"ranks{ranks}") / "run"
        train_run(tiny_args(shapes_root, out, f"--data.batch_size={micro}", *SAME_RUN), ranks)
        runs[ranks] = out
    return runs


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (moto's, its own process) on 127.0.0.1: the environment
    that points boto at it (AWS_ENDPOINT_URL_S3 and test-constant credentials)."""
    from vlds.distributed import free_port

    port = free_port()
    cmd = [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with server(cmd, port, tmp_path_factory.mktemp("moto") / "server.log"):
        yield {**S3_ENV, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}


@pytest.fixture(scope="session")
def s3_shapes(s3_server, shapes_root):
    """The shapes world uploaded to s3://vlds-test/shapes: (URL, server environment)."""
    from vlds.data import remote

    saved = dict(os.environ)
    os.environ.update(s3_server)  # each test sets it again: _restore_environ undoes it
    try:
        fs, _ = remote.filesystem("s3://vlds-test")
        fs.mkdir("vlds-test")
        remote.publish(shapes_root, "s3://vlds-test/shapes")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return "s3://vlds-test/shapes", s3_server


@pytest.fixture(scope="session")
def http_shapes(shapes_root, tmp_path_factory):
    """The shapes world served by Python's http.server (tests/servers/http_shards.py) on
    127.0.0.1: its base URL."""
    from vlds.distributed import free_port

    port = free_port()
    script = str(Path(__file__).parent / "servers" / "http_shards.py")
    cmd = [sys.executable, script, str(shapes_root), str(port)]
    with server(cmd, port, tmp_path_factory.mktemp("http") / "server.log"):
        yield f"http://127.0.0.1:{port}"
