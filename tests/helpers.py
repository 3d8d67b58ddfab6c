"""Tiny models and batches for unit tests (no data folder needed)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from vlds.config import build_config
from vlds.distributed import free_port
from vlds.model.build import build_model, build_tower

REPO = Path(__file__).resolve().parent.parent

# What a launcher (torchrun, deepspeed, srun) hands a rank; tests start from none of them.
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def is_launch_var(name: str) -> bool:
    return name in LAUNCH_VARS or name.startswith("SLURM_")


def byte_tokenizer():
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


def tiny(arch="t5", method="single_adapter", seed=0, **overrides):
    """(cfg, tokenizer, tower, model) for a tiny random CLIP-T5/BART (random tower and LM)."""
    # random weights: unit tests need no data folder and no pretraining
    base = {"model.lm": "random", "model.vision_pretrained": "", "model.dropout": "0.0"}
    cfg = build_config("tiny", {**base, "model.arch": arch, "peft.method": method, **overrides})
    tok = byte_tokenizer()
    torch.manual_seed(seed)
    tower = build_tower(cfg)
    model = build_model(cfg, tok, tower)
    return cfg, tok, tower, model


def image_batch(tok, tower, b=3, n_img=1, seed=0, task_ids=None, cfg=None):
    g = torch.Generator().manual_seed(seed)
    enc = tok(
        ["vqa: what color is the circle?", "gqa: what is left of it?", "nlvr: two"][:b]
        + ["caption: "] * max(0, b - 3),
        return_tensors="pt",
        padding=True,
    )
    lab = tok(
        ["red", "square", "true"][:b] + ["a red circle"] * max(0, b - 3),
        return_tensors="pt",
        padding=True,
    )
    batch = {
        "input_ids": enc.input_ids,
        "attention_mask": enc.attention_mask,
        "labels": lab.input_ids.masked_fill(lab.attention_mask == 0, -100),
        "images": torch.randn(b, n_img, 3, tower.image_size, tower.image_size, generator=g),
        "task_ids": torch.zeros(b, dtype=torch.long) if task_ids is None else task_ids,
    }
    return tower.visual_inputs(batch, 8)


def slurm_job_id_with_free_port() -> int:
    """A SLURM job id whose derived rendezvous port (vlds.distributed and slurm/train.sbatch:
    20000 + id % 20000) is free right now."""
    import random
    import socket

    for port in random.Random().sample(range(21000, 32000), 200):  # below the ephemeral range
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return 100000 + port - 20000  # 100000 % 20000 == 0
    raise RuntimeError("no free port")


def tiny_args(root, out, *extra):
    return [
        f"--data.root={root}",
        f"--train.out_dir={out}",
        "--data.num_workers=0",
        "--eval.max_samples=8",
        "--eval.batch_size=8",
        "--eval.caption_beams=1",
        "--train.log_every=1",
        # the JVM scorers (PTBTokenizer, METEOR: ~4-6 s per evaluation on 2 cores) are tested
        # in test_eval_metrics.py and test_evaluate.py; training runs here score without them
        "--eval.java_metrics=false",
        *extra,
    ]


def deepspeed_cmd(args, ranks: int) -> list[str]:
    """The deepspeed launcher starting vlds/train.py on `ranks` CPU ranks (a free port)."""
    launcher = str(Path(sys.executable).parent / "deepspeed")
    port = str(free_port())
    return [launcher, "--num_gpus", str(ranks), "--master_port", port, "vlds/train.py", *args]


def launcher_env(**extra) -> dict:
    """The environment for the deepspeed launcher: one torch thread, the venv's bin on PATH
    (where the launcher finds itself to start the ranks)."""
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    return {**os.environ, "OMP_NUM_THREADS": "1", "PATH": path, **extra}


def train_run(
    args, ranks=1, faults="", check=True, launcher=False, timeout=600, entry=None, env=None
):
    """vlds/train.py ARGS on `ranks` CPU ranks, one torch thread each: forked from the warm
    server (tests/warm.py), or, with `launcher`, under the deepspeed launcher as users start
    it; `entry` ("module:function") forks another command instead; `env` adds variables. A
    CompletedProcess (text)."""
    if launcher:
        env = launcher_env(VLDS_FAULTS=faults, **(env or {}))
        cmd = deepspeed_cmd(args, ranks)
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    else:
        from tests.warm import TRAIN, run

        env = {"OMP_NUM_THREADS": "1", "VLDS_FAULTS": faults, **(env or {})}
        p = run(args, env, ranks, timeout, entry or TRAIN)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


# 6 steps of the same global batch on 1 rank x 16 or 2 ranks x 8 (one_and_two_ranks)
SAME_RUN = [
    "--data.split=global",
    # the reference's caption token mean depends on the split over ranks: the per-sample mean
    # (vlds' variant) keeps caption steps rank-invariant
    "--train.caption_loss=sample",
    "--model.dropout=0",
    "--train.seed=3",
    "--train.max_steps=6",
    # images shuffled within each rank's evaluation batches: that score depends on how the
    # evaluation is split, by design (vlds.eval.grounding)
    "--eval.shuffled_images=false",
    # 13 validation samples per task in batches of 3: 2 ranks score 7 and 6, in 3 and 2 batches
    # (under ZeRO-3 the rank that ran out keeps generating on a dummy batch)
    "--eval.max_samples=13",
    "--eval.batch_size=3",
]


@contextlib.contextmanager
def server(cmd: list[str], port: int, log: Path):
    """A server process (its own session) until the block ends; waits until `port` answers."""
    with open(log, "wb") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if p.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{cmd[0]} did not start: {log.read_text()[-2000:]}"
                    ) from None
                time.sleep(0.1)
        yield p
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# S3 credentials of the test server (moto accepts any): constants, never real ones
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "vlds-test-key",
    "AWS_SECRET_ACCESS_KEY": "vlds-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
