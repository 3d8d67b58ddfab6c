"""A long run will be killed, preempted and fed broken files: it must lose nothing.

Every test runs vlds/train.py as its own process: forked from the tests' warm server
(tests/warm.py: `vlds.train.cli`, what the script runs), or as a real interpreter where the
script's start-up or the launcher is what is tested. Failures are made to happen at a chosen
step with VLDS_FAULTS (vlds/faults.py) or by sending real signals.
"""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import deepspeed_cmd, launcher_env, train_run
from tests.warm import Run

REPO = Path(__file__).resolve().parent.parent


def run(args, faults="", check=True, ranks=1):
    """A finished forked run (helpers.train_run)."""
    return train_run(args, ranks, faults, check)


def args(root, out, *extra):
    return [
        f"--data.root={root}",
        f"--train.out_dir={out}",
        "--data.batch_size=16",
        "--eval.max_samples=4",
        "--eval.batch_size=4",
        "--eval.caption_beams=1",
        "--data.num_workers=1",
        "--train.log_every=1",
        "--train.keep_last=5",
        "--model.dropout=0.1",  # dropout on (the tiny preset has none): its RNG must resume
        "--eval.java_metrics=false",  # the JVM scorers are tested in test_eval_metrics.py
        *extra,
    ]


# bf16 against fp32 losses, relative: bf16 rounds activations to 8 bits of mantissa (0.4 %)
BF16_LOSS_TOLERANCE = 0.03


def weights(out: Path) -> dict:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def tree_digest(path: Path) -> dict:
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


@pytest.fixture(scope="module")
def reference_run(shapes_root, tmp_path_factory):
    """10 uninterrupted steps (dropout on), checkpoints every 3."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run(args(shapes_root, out, "--train.max_steps=10", "--train.save_every=3"))
    return out


def crash_then_resume(root, out, faults, published, after_crash=lambda: None, extra=()):
    """A run of 10 steps (checkpoints every 3) that SIGKILLs itself as `faults` says, then
    `--train.resume=latest`; `published` is the checkpoint `latest` names after the crash."""
    steps = ["--train.max_steps=10", "--train.save_every=3", *extra]
    p = run(args(root, out, *steps), faults=faults, check=False)
    assert p.returncode == -signal.SIGKILL
    assert (out / "checkpoints" / "latest").read_text() == published
    after_crash()
    p = run(args(root, out, *steps, "--train.resume=latest"))
    assert "resumed from" in p.stderr and "replaying the stream" not in p.stderr  # cursors


def losses(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}  # last write wins


def test_sigkill_mid_epoch_then_resume_is_exact(shapes_root, tmp_path, reference_run):
    """Killed as step 8 starts (latest = step6). Then resumed from step3 by hand, reaching step 6
    again: the new step6 replaces the old one, and a kill right after the old folder is removed
    leaves `latest` naming the complete new copy. Resumed from it, the run ends as the
    uninterrupted one."""
    out = tmp_path / "run"
    ckpt = out / "checkpoints"

    def saved_again():
        again = ["--train.max_steps=10", "--train.save_every=3", f"--train.resume={ckpt}/step3"]
        p = run(args(shapes_root, out, *again), faults="kill_replace@6", check=False)
        assert p.returncode == -signal.SIGKILL
        assert (ckpt / "latest").read_text() == ".tmp-step6" and not (ckpt / "step6").exists()

    crash_then_resume(shapes_root, out, "kill@8", published="step6", after_crash=saved_again)
    assert (ckpt / "latest").read_text() == "step10" and not list(ckpt.glob(".tmp-*"))
    a, b = weights(reference_run), weights(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from uninterrupted"
    # the same data order: every step's loss is the same as in the uninterrupted run
    assert losses(out) == losses(reference_run)


def test_training_from_s3_is_the_local_run_and_resumes(s3_shapes, tmp_path, reference_run):
    """The same 10 steps with the shards on an S3-compatible server (tests/conftest.py): killed
    as step 8 starts, resumed from its workers' cursors (range reads at the saved offsets), it
    ends with the local uninterrupted run's loss at every step and its weights."""
    url, env = s3_shapes
    os.environ.update(env)
    out = tmp_path / "run"
    crash_then_resume(url, out, "kill@8", published="step6")
    assert losses(out) == losses(reference_run)
    a, b = weights(reference_run), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_kill_during_save_leaves_the_previous_checkpoint(shapes_root, tmp_path, reference_run):
    out = tmp_path / "run"
    ckpt = out / "checkpoints"

    def half_written():  # the save of step 6 wrote its files but never published them
        assert (ckpt / ".tmp-step6" / "mp_rank_00_model_states.pt").is_file()
        assert not (ckpt / "step6").exists()

    crash_then_resume(shapes_root, out, "kill_save@6", published="step3", after_crash=half_written)
    assert not list(ckpt.glob(".tmp-*"))  # the stale half-save was cleaned up by the resume
    a, b = weights(reference_run), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(out) == losses(reference_run)


def test_bf16_killed_and_resumed_ends_bitwise_equal(shapes_root, tmp_path, reference_run):
    """bf16 on CPU (DeepSpeed's bf16 optimizer: fp32 master weights in the checkpoint). Its
    losses are finite and follow the same run in fp32 (reference_run) step by step."""
    bf16 = "--train.precision=bf16"
    ref, out = tmp_path / "ref", tmp_path / "run"
    run(args(shapes_root, ref, "--train.max_steps=10", "--train.save_every=3", bf16))
    half, full = losses(ref), losses(reference_run)
    print("bf16 vs fp32 losses:", half, full)
    assert half.keys() == full.keys() and len(half) == 10
    assert all(math.isfinite(v) for v in half.values())
    assert all(abs(half[k] - full[k]) <= BF16_LOSS_TOLERANCE * full[k] for k in full), (half, full)
    crash_then_resume(shapes_root, out, "kill@8", published="step6", extra=[bf16])
    a, b = weights(ref), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    assert losses(out) == losses(ref)


def _train_rows(out: Path) -> int:
    f = out / "metrics.jsonl"
    return f.read_text().count('"kind": "train"') if f.is_file() else 0


def _wait_for(out: Path, proc, ready, what: str, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if ready():
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited before {what}: " + proc.communicate()[0][-3000:])
        time.sleep(0.05)
    raise AssertionError(f"no {what} in {timeout} s")


def _wait_for_training(out: Path, proc, timeout=120, rows_before=0):
    _wait_for(out, proc, lambda: _train_rows(out) > rows_before, "training step", timeout)


def start(argv, faults="", script=False):
    """vlds/train.py in its own process group (signalled as a batch system signals a job):
    forked from the warm server, or with `script` a new interpreter running the file."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLDS_FAULTS": faults}
    if not script:
        return Run(argv, env)
    return subprocess.Popen(
        [sys.executable, "vlds/train.py", *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def stopped_at(out: Path, proc) -> dict:
    """The run exited 0 as preempted, with a published checkpoint: its trainer state."""
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    assert "preempted: saved step" in output and "Traceback" not in output, output[-3000:]
    tag = (out / "checkpoints" / "latest").read_text()
    state = json.loads((out / "checkpoints" / tag / "trainer_state.json").read_text())
    assert tag == f"step{state['step']}" and not list((out / "checkpoints").glob(".tmp-*"))
    assert not (out / "metrics.json").exists()  # not a finished run
    return state


# What `scancel` and a preempting scheduler do: the signal reaches every process of the job,
# the data workers included (which must leave it to the trainer). Sent four times to one run,
# resumed in between, at different moments: during set-up (imports, model build), right after
# the first step of a resumed run (its loader's workers starting) and later on; SIGTERM
# (scancel) and SIGUSR1 (SLURM's time-limit warning).
SIGNALS = [
    ("setup", signal.SIGTERM),
    (0.0, signal.SIGTERM),
    (0.4, signal.SIGUSR1),
    (1.5, signal.SIGTERM),
]


def test_a_signal_to_the_whole_process_group_saves_and_exits_zero(shapes_root, tmp_path):
    out = tmp_path / "run"
    argv = args(shapes_root, out, "--train.max_steps=2000", "--data.num_workers=2")
    steps = [0]
    for i, (moment, sig) in enumerate(SIGNALS):
        rows = _train_rows(out)
        # at set-up, the script itself: its interpreter's start, early handlers and imports
        proc = start(argv + (["--train.resume=latest"] if i else []), script=moment == "setup")
        if moment == "setup":
            time.sleep(1.0)  # python has started: importing torch, building the model
            assert _train_rows(out) == rows
        else:
            _wait_for_training(out, proc, rows_before=rows)
            time.sleep(moment)
        os.killpg(proc.pid, sig)
        state = stopped_at(out, proc)
        assert state["step"] >= steps[-1]
        steps.append(state["step"])
    assert steps[-1] > 0
    p = run(args(shapes_root, out, f"--train.max_steps={steps[-1] + 2}", "--train.resume=latest"))
    assert f"at step {steps[-1]}" in p.stderr + p.stdout


# A data worker drops the preemption signals of anyone but its parent, whose SIGTERM (how
# multiprocessing ends a worker) still ends it: a process that exits with a loader still open
# must not wait forever in the interpreter's join of its daemon children.
QUIET_WORKER = r"""
import os, subprocess, sys, time
import psutil, torch
from vlds.data.build import _Loader

class Pids(torch.utils.data.IterableDataset):
    def __iter__(self):
        while True:
            yield os.getpid()

# vlds' loader wrapper forks the workers with the signals blocked and gives them quiet_worker
# (this DataLoader names no worker_init_fn: a raw one, as in a test or a user's script)
it = iter(_Loader(torch.utils.data.DataLoader(Pids(), batch_size=None, num_workers=1)))
worker = psutil.Process(int(next(it)))
for sig in ("TERM", "USR1", "TERM"):  # sent by another process, as scancel's are
    subprocess.run(["kill", f"-{sig}", str(worker.pid)], check=True)
time.sleep(0.5)
print(worker.status(), flush=True)
LEFT_OPEN = it  # the interpreter's exit terminates (SIGTERM from the parent) and joins it
"""


def test_a_data_worker_ignores_outside_signals_but_its_parent_ends_it():
    p = subprocess.run(
        [sys.executable, "-c", QUIET_WORKER], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() in (["sleeping"], ["running"])  # alive after the outside signals


def test_a_signal_during_evaluation_stops_it_and_saves(shapes_root, tmp_path):
    """The evaluation at step 4 takes >= 16 s (each batch sleeps 1 s); a SIGTERM in it stops
    the run within a batch, with step 4 saved, and the resumed run evaluates step 4."""
    out = tmp_path / "run"
    argv = args(
        shapes_root,
        out,
        "--train.max_steps=6",
        "--eval.every=4",
        "--eval.max_samples=16",
        "--data.num_workers=2",
    )
    proc = start(argv, faults="slow_eval@4")
    _wait_for(out, proc, lambda: _train_rows(out) >= 4, "step 4")
    time.sleep(2.5)  # into the evaluation's batches
    os.killpg(proc.pid, signal.SIGTERM)
    assert stopped_at(out, proc)["step"] == 4
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in rows if r["kind"] == "eval"]  # cut short: nothing reported
    run(argv + ["--train.resume=latest"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [4, 6]


def test_a_signal_during_a_save_stops_the_run_after_it(shapes_root, tmp_path):
    """The save of step 3 takes >= 3 s; a SIGTERM in it lets it finish, and the run stops there
    (no step 4), the checkpoint published and loadable."""
    out = tmp_path / "run"
    argv = args(shapes_root, out, "--train.max_steps=2000", "--train.save_every=3")
    proc = start(argv, faults="slow_save@3")
    _wait_for(out, proc, lambda: (out / "checkpoints" / ".tmp-step3").is_dir(), "save of step 3")
    os.killpg(proc.pid, signal.SIGTERM)
    assert stopped_at(out, proc)["step"] == 3
    assert max(losses(out)) == 3  # stopped right after the save
    from vlds.checkpoint import verify_checkpoint

    verify_checkpoint(out / "checkpoints" / "step3")
    assert weights(out / "checkpoints" / "step3").keys()


def test_a_signal_to_one_rank_stops_every_rank(shapes_root, tmp_path):
    import psutil

    out = tmp_path / "run"
    cmd = deepspeed_cmd(args(shapes_root, out, "--train.max_steps=2000"), 2)  # --local_rank=N
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=launcher_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _wait_for_training(out, proc)
    rank1 = [
        c
        for c in psutil.Process(proc.pid).children(recursive=True)
        if "--local_rank=1" in c.cmdline() and c.name() != "pt_data_worker"
    ]
    assert len(rank1) == 1
    rank1[0].send_signal(signal.SIGUSR1)  # rank 0 is not signalled: it must learn from rank 1
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, output[-3000:]
    tag = (out / "checkpoints" / "latest").read_text()
    assert (out / "checkpoints" / tag / "rng_rank1.pt").is_file()


def test_non_finite_steps_are_skipped_and_counted(shapes_root, tmp_path):
    out = tmp_path / "run"
    run(args(shapes_root, out, "--train.max_steps=6"), faults="nan_loss@2,nan_grad@4")
    result = json.loads((out / "metrics.json").read_text())
    assert result["bad_steps_total"] == 2
    assert all(torch.isfinite(v).all() for v in weights(out).values())
    logged = [
        json.loads(x)["step"]
        for x in (out / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["kind"] == "train"
    ]
    assert logged == [1, 3, 5, 6]  # skipped steps log no loss


def test_checked_adamw_skips_a_non_finite_step_and_otherwise_is_adamw():
    from vlds.engine import CheckedAdamW

    torch.manual_seed(0)
    w0 = torch.randn(3, 4)
    grad = torch.randn(3, 4)
    ours, ref = (torch.nn.Parameter(w0.clone()) for _ in range(2))
    opt = CheckedAdamW([ours], lr=0.1, weight_decay=0.01)
    ref_opt = torch.optim.AdamW([ref], lr=0.1, weight_decay=0.01)
    for bad in (float("nan"), float("inf")):
        ours.grad = grad.clone()
        ours.grad[1, 2] = bad
        opt.step()
        assert opt.overflow and torch.equal(ours.data, w0) and not opt.state  # untouched
    for _ in range(2):  # then two finite steps: exactly AdamW's
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        ref_opt.step()
        assert not opt.overflow and torch.equal(ours.data, ref.data)
    assert not torch.equal(ours.data, w0)


def test_zero_stage_rule():
    from vlds.config import Config, ConfigError, validate
    from vlds.engine import zero_stage

    cfg = Config()
    two, offload = {"stage": 2}, {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    assert zero_stage(cfg, 1, two) == 0  # one rank: nothing to partition
    assert zero_stage(cfg, 1, two, bf16=True) == 1  # DeepSpeed's BF16_Optimizer (below)
    assert zero_stage(cfg, 2, two, bf16=True) == 2
    assert zero_stage(cfg, 2, two) == 2 and zero_stage(cfg, 8, {"stage": 3}) == 3
    assert zero_stage(cfg, 1, offload) == 3  # offloading is a reason for ZeRO on one rank
    assert zero_stage(cfg, 1, two, resumed={"zero_stage": 2}) == 2  # the checkpoint's stage
    assert zero_stage(cfg, 1, two, resumed={}) == 2  # older checkpoints: the JSON's
    cfg.train.zero_stage = "1"
    assert zero_stage(cfg, 1, two) == 1 and zero_stage(cfg, 4, two, {"zero_stage": 1}) == 1
    with pytest.raises(ConfigError, match="resume with --train.zero_stage=0 "):
        zero_stage(cfg, 1, two, resumed={"zero_stage": 0})
    cfg.train.zero_stage = "4"
    with pytest.raises(ConfigError, match="train.zero_stage='4'; valid: auto"):
        validate(cfg)


# A tiny CLIP-T5 engine in bf16 at the given train.zero_stage, two steps after one warm-up:
# the optimizer DeepSpeed chose and the tensors' reads back to the host (on a GPU each is a
# synchronisation), as one JSON line.
_HOST_READS = """
import collections, json, sys, torch
from bench import step_time as st
from vlds.distributed import init_distributed, world_info_from_env
from vlds.engine import DEFAULT_DS_CONFIG, build_engine, deepspeed_config
args = st.parse_args(["--batch", "2", "--text-len", "6", "--target-len", "2", "--d-model", "32",
                      "--layers", "2", "--heads", "2", "--d-ff", "64", "--vocab", "128"])
args.reduction_factor = 8
device = init_distributed(world_info_from_env())
cfg = st.build_config_for(args, "single_adapter", "off")
cfg.train.precision, cfg.train.zero_stage = "bf16", sys.argv[1]
model = st.build_vl_model(cfg, args.vocab)
ds = deepspeed_config(DEFAULT_DS_CONFIG, cfg, 1, True)
engine = build_engine(cfg, model, ds, 10)
batch = st.make_batch(args, device, torch.bfloat16)
def step():
    engine.backward(engine(batch))
    engine.step()
step()
reads = collections.Counter()
for name in ("item", "__bool__", "__float__"):
    real = getattr(torch.Tensor, name)
    setattr(torch.Tensor, name, lambda t, *a, _r=real, _n=name: reads.update([_n]) or _r(t, *a))
step(); step()
print(json.dumps({"stage": ds["zero_optimization"]["stage"], "reads": sum(reads.values()) / 2,
                  "optimizer": type(engine.optimizer).__name__,
                  "trainable": sum(p.requires_grad for p in model.parameters())}))
"""


def test_bf16_on_one_rank_reads_back_a_handful_of_values_a_step():
    """ "auto" in bf16 on one rank: stage 1 with fp32 gradient accumulation, DeepSpeed's
    BF16_Optimizer, a few host reads a step. Stage 0 in bf16 is DeepSpeed's unfused fp16
    optimizer, which reads every gradient's overflow check and more back to the host (on an
    H200 the engine took 1.61x a plain loop's step; bench/RESULTS.md)."""
    got = {}
    for stage in ("auto", "0"):
        proc = subprocess.run(
            [sys.executable, "-c", _HOST_READS, stage], capture_output=True, text=True,
            timeout=300, cwd=Path(__file__).resolve().parent.parent,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        got[stage] = json.loads(proc.stdout.strip().splitlines()[-1])
    auto, zero = got["auto"], got["0"]
    assert (auto["stage"], auto["optimizer"]) == (1, "BF16_Optimizer")
    assert auto["reads"] <= 8
    assert (zero["stage"], zero["optimizer"]) == (0, "FP16_UnfusedOptimizer")
    assert zero["reads"] >= 2 * zero["trainable"] > 8


def test_too_many_non_finite_steps_stop_with_the_last_checkpoint_intact(shapes_root, tmp_path):
    out = tmp_path / "run"
    p = run(
        args(
            shapes_root,
            out,
            "--train.max_steps=20",
            "--train.save_every=2",
            "--train.max_bad_steps=3",
        ),
        faults="nan_loss@5-20",
        check=False,
    )
    assert p.returncode == 3
    assert "3 non-finite steps in a row (last: step 7" in p.stderr
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == "step6"  # steps 5-6 skipped: weights still good
    a = load_file(ckpt / "step6" / "adapter" / "adapter_model.safetensors")
    b = load_file(ckpt / "step4" / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(v).all() for v in a.values())
    assert all(torch.equal(a[k], b[k]) for k in a)  # skipped steps did not touch the weights


def _evil_pickle(path: Path, marker: Path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"module": Evil()}, path)


@pytest.fixture(scope="module")
def finished(shapes_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    run(args(shapes_root, out, "--train.max_steps=2"))
    return out


@pytest.mark.parametrize(
    "case, extra, needle",
    [
        (
            "changed method",
            ["--peft.method=single_lora"],
            "cannot resume: peft.method was 'single_adapter', now 'single_lora'",
        ),
        (
            "changed batch and learning rate",
            ["--data.batch_size=8", "--train.lr=0.5"],
            ["data.batch_size was 16, now 8", "train.lr was 0.003, now 0.5"],
        ),
        ("missing tensor", [], "does not hold this run's trainable tensors: missing ['"),
        ("changed tasks", ["--data.tasks=vqa,gqa"], "data.tasks was"),
        (
            "changed ZeRO stage",  # written at stage 0 (one rank, train.zero_stage=auto)
            ["--train.zero_stage=2"],
            "the checkpoint was written under ZeRO stage 0, and train.zero_stage=2; resume "
            "with --train.zero_stage=0 (or auto)",
        ),
        ("unsafe pickle", [], "is not a plain tensor checkpoint"),
        ("dangling latest", [], "points at step99, which is missing"),
        ("not a checkpoint", ["--train.resume=/nonexistent"], "is not a checkpoint folder"),
        (
            "adapter of another method",
            ["--train.resume=", "--peft.method=single_lora", "--train.init_from={out}/adapter"],
            "does not fit this model: missing",
        ),
    ],
)
def test_bad_checkpoints_fail_clearly_and_lose_nothing(finished, tmp_path, case, extra, needle):
    out = tmp_path / "run"
    import shutil

    shutil.copytree(finished, out)
    marker = tmp_path / "pwned"
    if case == "unsafe pickle":
        _evil_pickle(out / "checkpoints" / "step2" / "mp_rank_00_model_states.pt", marker)
    if case == "dangling latest":
        (out / "checkpoints" / "latest").write_text("step99")
    if case == "missing tensor":  # a trainable tensor lost from the module state
        f = out / "checkpoints" / "step2" / "mp_rank_00_model_states.pt"
        state = torch.load(f, weights_only=False)
        state["module"].pop(next(k for k in state["module"] if "peft" in k))
        torch.save(state, f)
    before = tree_digest(out)
    extra = [e.format(out=out) for e in extra]
    root = json.loads((out / "config.json").read_text())["data"]["root"]
    p = run(args(root, out, "--train.max_steps=4", "--train.resume=latest", *extra), check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    for n in [needle] if isinstance(needle, str) else needle:
        assert n in p.stderr
    assert not marker.exists()  # the pickle payload never ran
    if case == "missing tensor":  # found when loading, after the run folder was opened
        ckpt = {k: v for k, v in before.items() if k.startswith("checkpoints/")}
        assert {k: v for k, v in tree_digest(out).items() if k.startswith("checkpoints/")} == ckpt
    elif case != "adapter of another method":
        assert tree_digest(out) == before  # nothing on disk changed


def test_resume_with_another_world_size_is_refused(finished, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    root = json.loads((out / "config.json").read_text())["data"]["root"]
    p = run(args(root, out, "--train.max_steps=4", "--train.resume=latest"), ranks=2, check=False)
    assert p.returncode != 0
    assert "world size was 1, now 2" in p.stdout + p.stderr


def test_init_from_starts_a_new_run_from_trained_weights(finished, tmp_path):
    out = tmp_path / "new"
    root = json.loads((finished / "config.json").read_text())["data"]["root"]
    run(
        args(
            root,
            out,
            "--train.max_steps=1",
            f"--train.init_from={finished}/adapter",
            "--train.lr=0",
        )
    )  # lr 0: the loaded weights come out unchanged
    a, b = weights(finished), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
