"""The real entry point, launched the ways users launch it: `deepspeed vlds/train.py ...` (the
first run of test_one_rank_trains_checkpoints_and_resumes and the ZeRO-2 2-rank run), and
otherwise as a process forked from the tests' warm server (tests/warm.py: the same
`vlds.train.cli` a `python vlds/train.py` runs, ranks given torchrun's variables, without ~16 s
of imports per process)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import train_run
from vlds.peft import METHODS

REPO = Path(__file__).resolve().parent.parent


def launch(args, ranks=1, zero=2, timeout=600, launcher=False):
    args = ["--deepspeed", f"ds_configs/zero{zero}.json", *args]
    p = train_run(args, ranks, launcher=launcher, timeout=timeout)
    return p.stdout + p.stderr


def tiny_args(root, out, *extra):
    return [
        f"--data.root={root}",
        f"--train.out_dir={out}",
        "--data.batch_size=16",
        "--eval.max_samples=16",
        "--eval.batch_size=8",
        "--eval.caption_beams=2",
        "--data.num_workers=1",
        "--train.log_every=1",
        # the shuffled-image score doubles every evaluation: on only where a test checks it
        "--eval.shuffled_images=false",
        # the JVM scorers (PTBTokenizer, METEOR: ~4-6 s per evaluation on 2 cores) are tested
        # in test_eval_metrics.py and test_evaluate.py; training runs here score without them
        "--eval.java_metrics=false",
        *extra,
    ]


def trainable_names(out: Path) -> set[str]:
    return set(json.loads((out / "adapter" / "adapter_config.json").read_text())["tensors"])


def test_one_rank_trains_checkpoints_and_resumes(shapes_root, tmp_path):
    out = tmp_path / "run"
    log = launch(
        tiny_args(
            shapes_root,
            out,
            "--train.max_steps=6",
            "--train.save_every=3",
            "--eval.shuffled_images=true",
        ),
        launcher=True,
    )
    result = json.loads((out / "metrics.json").read_text())
    assert result["step"] == 6
    # the batch plan, printed at start-up and stored: 16 x 1 x 1, the tiny mixing's shares
    plan = result["batch_plan"]
    assert "global batch 16 = 16 x 1 accumulation x 1 rank(s); steps per epoch" in log
    assert f"vqa {plan['task_share_pct']['vqa']:.1f} % (batch 16)" in log
    assert abs(sum(plan["task_share_pct"].values()) - 100) < 0.05
    tasks = ("vqa", "gqa", "nlvr", "caption")
    assert set(result["metrics"]) == {*tasks, "average", "shuffled_average", "loss"}
    assert all(result["metrics"][t]["n"] == 16 for t in tasks)
    task_losses = [result["metrics"][t]["loss"] for t in tasks]  # the validation loss
    assert result["metrics"]["loss"] == pytest.approx(sum(task_losses) / 4)
    assert all(0 < x < 20 for x in task_losses)
    # grounding, reported beside every score: the shuffled-image score and the text prior
    # (recomputed here from the records the run read)
    from vlds.data.shardio import load_index, read_records
    from vlds.eval.grounding import text_prior
    from vlds.eval.metrics import task_metric

    for t in tasks:
        train = read_records(load_index(shapes_root, t, "train"))
        val = read_records(load_index(shapes_root, t, "val"), 16)
        expected = text_prior(t, train, val, task_metric(t, True))
        assert result["text_prior"][t] == pytest.approx(expected)
        assert 0 <= result["metrics"][t]["shuffled_score"] <= (300 if t == "caption" else 100)
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in evals if r["kind"] == "eval"][-1]
    assert last["vqa/text_prior"] == pytest.approx(result["text_prior"]["vqa"])
    assert last["shuffled_average"] == pytest.approx(result["metrics"]["shuffled_average"])
    assert last["loss"] == result["metrics"]["loss"] and last["vqa/loss"] == task_losses[0]
    assert (out / "curves.png").stat().st_size > 10_000
    assert any((out / "tb").iterdir())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["max_steps"] == 6 and cfg["peft"]["method"] == "single_adapter"
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]

    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step6"
    state = json.loads((ckpt / "step6" / "trainer_state.json").read_text())
    assert (state["step"], state["config"]["train"]["max_steps"]) == (6, 6)
    # DeepSpeed's module state holds the trainable tensors only (frozen weights excluded)
    module = torch.load(ckpt / "step6" / "mp_rank_00_model_states.pt", weights_only=False)
    assert set(module["module"]) == trainable_names(out)
    adapter = load_file(ckpt / "step6" / "adapter" / "adapter_model.safetensors")
    assert set(adapter) == trainable_names(out)
    assert any(k.startswith("peft.") for k in adapter)
    first = load_file(ckpt / "step3" / "adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(first[k], adapter[k]) for k in adapter)  # training moved them

    log = launch(
        tiny_args(
            shapes_root, out, "--train.max_steps=9", "--train.save_every=3", "--train.resume=latest"
        )
    )
    assert "resumed from" in log and "at step 6" in log
    result = json.loads((out / "metrics.json").read_text())
    assert result["step"] == 9
    assert (ckpt / "latest").read_text().strip() == "step9"
    assert not (ckpt / "step3").exists()  # keep_last=2

    # a fresh run into the same folder moves the earlier run aside instead of mixing with it
    log = launch(tiny_args(shapes_root, out, "--train.max_steps=1", "--eval.max_samples=4"))
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.")]
    assert len(aside) == 1 and f"moved the earlier run in {out}" in log
    assert json.loads((aside[0] / "metrics.json").read_text())["step"] == 9
    assert json.loads((out / "metrics.json").read_text())["step"] == 1


def check_finished(out: Path, method: str, steps: int, samples: int) -> dict:
    """A finished run's files: its steps and finite losses, each task's validation samples
    scored, the export of exactly the trainable parameters, and the run's cost."""
    result = json.loads((out / "metrics.json").read_text())
    assert result["step"] == steps
    assert all(result["metrics"][t]["n"] == samples for t in ("vqa", "gqa", "nlvr", "caption"))
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    meta = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert meta["method"] == method
    # the run's cost: the export holds exactly the trainable parameters, and its bytes
    exported = load_file(out / "adapter" / "adapter_model.safetensors")
    params = result["params"]
    assert params["trainable"] == sum(t.numel() for t in exported.values()) > 0
    assert params["percent"] == pytest.approx(100 * params["trainable"] / params["total"], abs=1e-4)
    files = [f for f in (out / "adapter").rglob("*") if f.is_file()]
    assert result["adapter_bytes"] == sum(f.stat().st_size for f in files)
    assert result["step_time_s"] > 0 and result["peak_memory_bytes"] > 2**27
    return result


# Through DeepSpeed, one method per family and sharing mode (each one's modules, routing and
# LayerNorm rule are tested in process for every method: test_peft_methods.py), here on one
# rank or on two in test_two_ranks_with_gloo (GLOO_RUNS). Left out, as they share these
# runs' engine and export paths: half_shared_adapter (multiple_adapters' TaskAdapters),
# multiple_compacters (single_compacter's PHM layers, routed as the adapters), single_prompt
# (multiple_prompts' Prompts), visual_ln (visual_only plus trained norms).
GLOO_RUNS = [
    (2, "single_adapter"),
    (3, "single_adapter"),
    (3, "hyperformer"),
    (3, "multiple_lora"),
    # a method plus per-task prompts, and adapters inside the CLIP tower (vision_train)
    (3, "single_adapter+multiple_prompts"),
]
DEEPSPEED_METHODS = sorted(
    set(METHODS)
    - {"half_shared_adapter", "multiple_compacters", "single_prompt", "visual_ln"}
    - {m for _, m in GLOO_RUNS}
)


@pytest.mark.parametrize("method", DEEPSPEED_METHODS)
def test_each_method_family_trains_through_deepspeed(shapes_root, tmp_path, method):
    out = tmp_path / method
    launch(
        tiny_args(
            shapes_root,
            out,
            f"--peft.method={method}",
            "--train.max_steps=3",
            "--eval.max_samples=4",
        )
    )
    check_finished(out, method, steps=3, samples=4)


@pytest.mark.parametrize("zero, method", GLOO_RUNS)
def test_two_ranks_with_gloo(shapes_root, tmp_path, zero, method):
    out = tmp_path / f"zero{zero}"
    tower = ["--model.vision_train=adapter"] if "+" in method else []
    # ZeRO-2 also trains at a global batch the ranks' 16 do not make: 2 ranks x 12 = 24, with
    # the reference's per-task batch fractions (int(12 x 100/60) = 20, int(12 x 20/60) = 4)
    batch = ["--train.global_batch_size=24", "--data.task_batch_scale=gqa=100/60,nlvr=20/60"]
    launch(
        tiny_args(
            shapes_root,
            out,
            "--train.max_steps=4",
            "--eval.max_samples=15",
            f"--peft.method={method}",
            *(batch if zero == 2 else []),
            *tower,
        ),
        ranks=2,
        zero=zero,
        launcher=zero == 2,  # the deepspeed launcher's 2 ranks
    )
    # 15 validation samples split over 2 ranks (8 + 7): each counted exactly once
    result = check_finished(out, method, steps=4, samples=15)
    plan = result["batch_plan"]
    assert plan["global_batch"] == plan["micro_batch"] * plan["accumulation"] * 2
    assert sum(plan["task_steps"].values()) == plan["steps_per_epoch"]
    if zero == 2:
        assert (plan["global_batch"], plan["micro_batch"], plan["accumulation"]) == (24, 12, 1)
        assert plan["task_batch"] == {"vqa": 12, "gqa": 20, "nlvr": 4, "caption": 12}
    # the adapter export holds whole tensors, also when ZeRO-3 partitions them
    meta = json.loads((out / "adapter" / "adapter_config.json").read_text())
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    assert {k: list(v.shape) for k, v in tensors.items()} == meta["tensors"]
    assert all(v.numel() > 0 for v in tensors.values())
    d = meta["config"]["model"]["d_model"]
    whole = {
        "single_adapter": ("peft.enc-0-self.down.weight", [d // 2, d]),
        "hyperformer": ("peft.hyper_enc.generators.enc_self.down_w.weight", [d * d // 2, 8]),
        "multiple_lora": ("peft.dec-1-cross-v.loras.3.A.weight", [8, d]),
        "single_adapter+multiple_prompts": ("peft.prompt.prompts.2.embed.weight", [8, d]),
    }[method]
    assert list(tensors[whole[0]].shape) == whole[1]
    if tower:  # both PEFT parts and the tower's adapters (partitioned by ZeRO-3) exported
        assert "peft.enc-0-self.down.weight" in tensors
        check_tower_adapters(out, tensors, shapes_root)


def check_tower_adapters(out, tensors, shapes_root):
    """model.vision_train=adapter: the tower's adapters trained and exported whole, and loaded
    back into a model built from the run's config (as vlds.evaluate builds it)."""
    from vlds.checkpoint import load_adapter
    from vlds.config import config_from_dict
    from vlds.model.build import build_model, build_tokenizer, build_tower

    tower = {k: v for k, v in tensors.items() if k.startswith("tower.")}
    assert sorted({k.split(".")[2] for k in tower}) == [f"layer{i}-0" for i in range(1, 5)]
    assert tower["tower.adapters.layer4-0.adapter.down.weight"].shape == (128, 256)
    assert tower["tower.adapters.layer4-0.adapter.up.weight"].abs().sum() > 0  # left zero
    cfg = config_from_dict(json.loads((out / "config.json").read_text()))
    model = build_model(cfg, build_tokenizer(cfg, shapes_root), build_tower(cfg), shapes_root)
    load_adapter(model, out)
    for k, v in tower.items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--preset", "huge"], "unknown preset 'huge'; valid presets: tiny"),
        (["--data.root=/nonexistent/shards"], "data folder /nonexistent/shards does not exist"),
        (["--peft.reduction_factor=3"], "peft.reduction_factor=3 does not divide d_model=64"),
        (
            ["--data.task_batch_scale=gqa=100/60,vqq=2"],
            "data.task_batch_scale names 'vqq', not a task",
        ),
        (["--train.lrate=1"], "unknown key 'train.lrate'"),
        (["--deepspeed", "nope.json"], "DeepSpeed config nope.json does not exist"),
    ],
)
def test_bad_input_fails_before_any_work(tmp_path, args, needle):
    out = tmp_path / "never"
    p = subprocess.run(
        [sys.executable, "vlds/train.py", f"--train.out_dir={out}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2, p.stderr[-2000:]
    assert needle in p.stderr
    assert not out.exists()


def test_missing_task_split_names_the_fix(shapes_root, tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            "vlds/train.py",
            f"--data.root={shapes_root}",
            "--data.val_split=test",
            f"--train.out_dir={tmp_path / 'x'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2
    assert "no shard index" in p.stderr and "test.index.json" in p.stderr


def test_blind_run_answers_from_the_text_alone(shapes_root, tmp_path):
    """data.blind: every image is one constant, in training and evaluation, so two validation
    questions with the same wording get the same answer; no shuffled-image score is computed
    (shuffling one constant changes nothing)."""
    from vlds.data.shardio import load_index, read_records

    out = tmp_path / "blind"
    blind = ("--train.max_steps=3", "--data.blind=true", "--eval.shuffled_images=true")
    launch(tiny_args(shapes_root, out, *blind))
    result = json.loads((out / "metrics.json").read_text())
    assert "shuffled_score" not in result["metrics"]["vqa"]
    assert "shuffled_average" not in result["metrics"]
    questions = {
        r["id"]: r["question"] for r in read_records(load_index(shapes_root, "vqa", "val"))
    }
    answers = {}
    for row in json.loads((out / "predictions_vqa.json").read_text()):
        q = questions[str(row["question_id"])]
        assert answers.setdefault(q, row["answer"]) == row["answer"], q
    assert len(answers) < 16  # some wording repeats among the 16 scored questions
