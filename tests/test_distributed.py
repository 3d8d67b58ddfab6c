"""Launch environments: rank/world/master from torchrun, deepspeed or SLURM variables, a real
SLURM-style start of two processes, and 2 ranks x micro-batch b == 1 rank x micro-batch 2b."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import (
    SAME_RUN,
    is_launch_var,
    slurm_job_id_with_free_port,
    tiny_args,
    train_run,
)
from vlds.distributed import (
    expand_nodelist,
    first_host,
    slurm_port,
    world_info_from_env,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("gpu[003-005,009],cpu1", ["gpu003", "gpu004", "gpu005", "gpu009", "cpu1"]),
        ("node1,node2", ["node1", "node2"]),
        ("a-b[1-2]", ["a-b1", "a-b2"]),
        ("localhost", ["localhost"]),
        ("127.0.0.1", ["127.0.0.1"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("gpu-[01-02]-ib", ["gpu-01-ib", "gpu-02-ib"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("x[7],y[0009-0010]", ["x7", "y0009", "y0010"]),
    ],
)
def test_nodelist_expands_like_scontrol_show_hostnames(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts
    assert first_host(nodelist) == hosts[0]


@pytest.mark.parametrize("bad", ["", ",", "a[1-2", "a]b", "a[x-y]", "a[[1]]", "a,,b"])
def test_a_broken_nodelist_is_refused(bad):
    with pytest.raises(ValueError, match="cannot parse SLURM node list"):
        expand_nodelist(bad)


def _clean_env(monkeypatch, launch_vars: dict | None = None):
    """No launch or SLURM variable but `launch_vars` (set through monkeypatch)."""
    for k in list(os.environ):
        if is_launch_var(k):
            monkeypatch.delenv(k)
    for k, v in (launch_vars or {}).items():
        monkeypatch.setenv(k, v)


def test_slurm_variables_give_rank_world_and_master(monkeypatch):
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[003-005,009],cpu1",
        "SLURM_JOB_ID": "123456",
    }
    _clean_env(monkeypatch, env)
    info = world_info_from_env()
    assert (info.rank, info.local_rank, info.world_size) == (5, 1, 8)
    assert os.environ["MASTER_ADDR"] == "gpu003"
    assert os.environ["MASTER_PORT"] == str(20000 + 123456 % 20000)
    # a job step on part of the allocation rendezvouses on its own first node, with its own
    # task count; an exported MASTER_* (slurm/train.sbatch) wins
    step = {"SLURM_STEP_NODELIST": "gpu[005,009]", "SLURM_STEP_NUM_TASKS": "4"}
    _clean_env(monkeypatch, {**env, **step, "MASTER_PORT": "29999"})
    info = world_info_from_env()
    assert info.world_size == 4
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("gpu005", "29999")


def test_a_single_slurm_task_rendezvouses_locally(monkeypatch):
    """`srun -n1` or a shell in an interactive allocation: a world of one on a free local port,
    not the job's first node on the job-derived port (which another job step may hold)."""
    _clean_env(
        monkeypatch,
        {
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "1",
            "SLURM_JOB_NODELIST": "gpu[003-004]",
            "SLURM_JOB_ID": "123456",
        },
    )
    info = world_info_from_env()
    assert (info.rank, info.world_size) == (0, 1)
    assert os.environ["MASTER_ADDR"] == "127.0.0.1"
    assert os.environ["MASTER_PORT"] != str(slurm_port("123456"))


def test_torchrun_variables_win_over_slurm(monkeypatch):
    torchrun = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "3",
        "MASTER_ADDR": "h1",
        "MASTER_PORT": "1234",
    }
    _clean_env(monkeypatch, {**torchrun, "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    info = world_info_from_env()
    assert (info.rank, info.local_rank, info.world_size) == (3, 3, 4)
    assert os.environ["MASTER_ADDR"] == "h1"


def test_bare_python_is_a_world_of_one(monkeypatch):
    _clean_env(monkeypatch)
    info = world_info_from_env()
    assert (info.rank, info.world_size) == (0, 1) and int(os.environ["MASTER_PORT"]) > 0
    _clean_env(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="MASTER_PORT is unset"):
        world_info_from_env()


def _rows(out: Path, kind: str) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def test_vlds_train_runs_under_simulated_slurm(shapes_root, tmp_path):
    """Two `python vlds/train.py` processes with only SLURM variables, as srun starts them."""
    out = tmp_path / "run"
    base = {k: v for k, v in os.environ.items() if not is_launch_var(k)}
    job = {
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NODELIST": "localhost",
        "OMP_NUM_THREADS": "1",
        "SLURM_JOB_ID": str(slurm_job_id_with_free_port()),
        "SLURM_NNODES": "1",
    }
    args = tiny_args(shapes_root, out, "--data.batch_size=8", "--train.max_steps=3")
    procs = [
        subprocess.Popen(
            [sys.executable, "vlds/train.py", *args],
            cwd=REPO,
            env={**base, **job, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    state = json.loads((out / "checkpoints" / "step3" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 3
    assert (out / "checkpoints" / "step3" / "rng_rank1.pt").is_file()
    assert json.loads((out / "metrics.json").read_text())["metrics"]["vqa"]["n"] == 8


def test_two_ranks_train_the_same_weights_as_one_rank_with_twice_the_batch(one_and_two_ranks):
    one, two = (
        load_file(one_and_two_ranks[r] / "adapter" / "adapter_model.safetensors") for r in (1, 2)
    )
    assert one.keys() == two.keys()
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    # measured: 1.2e-07 (float noise); 2e-4 when the text lengths differ (padding-dependence)
    assert worst < 1e-5, f"largest weight difference {worst}"
    # the same global batches in the same order: the same task at every step
    tasks = [
        {
            r["step"]: next(k for k in r if k.startswith("loss/"))
            for r in _rows(one_and_two_ranks[n], "train")
        }
        for n in (1, 2)
    ]
    assert tasks[0] == tasks[1] and len(tasks[0]) == 6
    # and the same evaluation: the same predictions, hence scores; the validation losses within
    # the weights' float noise
    m1, m2 = (
        json.loads((one_and_two_ranks[n] / "metrics.json").read_text())["metrics"] for n in (1, 2)
    )
    losses = [{t: m.pop("loss") for t, m in ms.items() if isinstance(m, dict)} for ms in (m1, m2)]
    assert m1.pop("loss") == pytest.approx(m2.pop("loss"), rel=1e-5)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and len(losses[0]) == 4
    assert m1 == m2
    assert all(m1[t]["n"] == 13 for t in losses[0])  # every sample scored exactly once


def test_two_ranks_log_the_same_losses_as_one_rank(one_and_two_ranks):
    one, two = (
        {r["step"]: r["loss"] for r in _rows(one_and_two_ranks[n], "train")} for n in (1, 2)
    )
    assert one.keys() == two.keys()
    assert all(abs(one[k] - two[k]) < 1e-5 for k in one), (one, two)


def _killed_and_resumed(root, out, *extra, zero="zero2"):
    """SAME_RUN on 2 ranks with a checkpoint every 2 steps, SIGKILLed (both ranks) as step 5
    starts, then resumed from `latest` (step 4) to the end."""
    argv = tiny_args(
        root,
        out,
        "--data.batch_size=8",
        *SAME_RUN,
        "--train.save_every=2",
        f"--deepspeed=ds_configs/{zero}.json",
        *extra,
    )
    p = train_run(argv, 2, faults="kill@5", check=False)
    assert p.returncode != 0 and (out / "checkpoints" / "latest").read_text() == "step4"
    p = train_run([*argv, "--train.resume=latest"], 2)
    assert "resumed from" in p.stderr + p.stdout
    assert "replaying the stream" not in p.stderr + p.stdout  # each rank from its cursors
    return out


def _bitwise_equal(a: Path, b: Path) -> None:
    wa, wb = (load_file(x / "adapter" / "adapter_model.safetensors") for x in (a, b))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "resumed weights differ"
    la, lb = ({r["step"]: r["loss"] for r in _rows(x, "train")} for x in (a, b))
    assert la == lb and len(la) == 6


def test_two_ranks_killed_mid_epoch_and_resumed_end_bitwise_equal(
    one_and_two_ranks, shapes_root, tmp_path
):
    """ZeRO-2: the uninterrupted run is one_and_two_ranks' 2-rank run."""
    out = _killed_and_resumed(shapes_root, tmp_path / "run")
    _bitwise_equal(one_and_two_ranks[2], out)


def test_zero3_two_ranks_killed_and_resumed_end_bitwise_equal(shapes_root, tmp_path):
    """ZeRO-3 (the trainable tensors partitioned across the ranks, and in the checkpoint)."""
    ref = tmp_path / "ref"
    argv = tiny_args(shapes_root, ref, "--data.batch_size=8", *SAME_RUN)
    train_run([*argv, "--deepspeed=ds_configs/zero3.json"], 2)
    out = _killed_and_resumed(shapes_root, tmp_path / "run", zero="zero3")
    _bitwise_equal(ref, out)
    # the evaluation: 7 and 6 samples per rank, every one scored exactly once
    for run in (ref, out):
        m = json.loads((run / "metrics.json").read_text())["metrics"]
        assert [m[t]["n"] for t in ("vqa", "gqa", "nlvr", "caption")] == [13] * 4
    # The same run with the fused Triton adapter kernels (CPU interpreter) under ZeRO-3, where
    # the adapters' weights are gathered shards: every step's loss and the trained weights are
    # the reference path's, within fp32 summation order; both ranks' kernels were self-checked.
    fused = tmp_path / "fused"
    argv = tiny_args(shapes_root, fused, "--data.batch_size=8", *SAME_RUN)
    argv += ["--deepspeed=ds_configs/zero3.json", "--peft.fused_kernel=on", "--eval.max_samples=2"]
    train_run(argv, 2, env={"TRITON_INTERPRET": "1"})
    la, lb = ({r["step"]: r["loss"] for r in _rows(x, "train")} for x in (ref, fused))
    assert la.keys() == lb.keys() and all(abs(la[k] - lb[k]) < 1e-5 for k in la), (la, lb)
    wa, wb = (load_file(x / "adapter" / "adapter_model.safetensors") for x in (ref, fused))
    assert wa.keys() == wb.keys()
    for k in wa:  # Adam divides by sqrt(v): a near-zero gradient amplifies summation order
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-4)
    paths = json.loads((fused / "metrics.json").read_text())["adapter_kernel"]
    assert paths and all(p["path"] == "fused" and p["checked"] for p in paths.values()), paths
    reference = json.loads((ref / "metrics.json").read_text())["adapter_kernel"]
    assert {p["reason"] for p in reference.values()} == {
        "cpu tensors: the fused kernels run on CUDA"
    }


def test_a_samples_loss_does_not_depend_on_its_batch():
    from tests.helpers import tiny

    cfg, tok, tower, model = tiny(arch="t5")
    model.eval()
    texts = ["vqa: what color is the big circle left of the square?", "gqa: red?"]
    targets = ["red", "a square"]
    images = torch.randn(
        2, 1, 3, tower.image_size, tower.image_size, generator=torch.Generator().manual_seed(0)
    )

    def batch(idx):
        enc = tok([texts[i] for i in idx], padding=True, return_tensors="pt")
        lab = tok([targets[i] for i in idx], padding=True, return_tensors="pt")
        b = {
            "input_ids": enc.input_ids,
            "attention_mask": enc.attention_mask,
            "labels": lab.input_ids.masked_fill(lab.attention_mask == 0, -100),
            "images": images[idx],
            "task_ids": torch.zeros(len(idx), dtype=torch.long),
        }

        return tower.visual_inputs(b, cfg.model.max_frames)

    with torch.no_grad():
        together = model(batch([0, 1]))
        apart = (model(batch([0])) + model(batch([1]))) / 2
    # measured: 6.5928 together vs 6.5995 apart
    assert torch.allclose(together, apart, rtol=0, atol=1e-5), (together.item(), apart.item())
