"""bench/mini_repro.py: the report's numbers and verdicts from hand-made runs, and the whole
pipeline (embedded backbone -> cached features -> vlds/train.py runs -> report) at toy size."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bench.mini_report import (
    chance_line,
    findings,
    rule_verdict,
    summarise,
    verdict,
    video_learning,
    write_report,
)

REPO = Path(__file__).resolve().parent.parent


def fake_run(method, seed, scores, percent, video=False, shuffled=None, step_s=0.05):
    tasks = ("tvqa", "how2qa", "tvc", "yc2c") if video else ("vqa", "gqa", "nlvr", "caption")
    metrics = {t: {"score": s} for t, s in zip(tasks, scores, strict=True)}
    metrics["average"] = sum(scores) / 4
    metrics["shuffled_average"] = metrics["average"] - 20 if shuffled is None else shuffled
    result = {
        "metrics": metrics,
        "text_prior": dict.fromkeys(tasks, 25.0),
        "params": {"percent": percent, "trainable": int(percent * 1000)},
        "step_time_s": step_s + seed / 100,
        "peak_memory_bytes": 2e9 + seed,
        "peak_memory_kind": "peak RSS",
        "adapter_bytes": 1234,
        "train_time_s": 9.0,
    }
    return {
        "name": f"{method}/{seed}",
        "video": video,
        "method": method,
        "seed": seed,
        "result": result,
    }


@pytest.fixture
def runs():
    return [
        fake_run("full_finetune", 0, (60, 50, 70, 100), 100.0),
        fake_run("full_finetune", 1, (62, 52, 70, 104), 100.0),
        fake_run("single_adapter", 0, (59, 50, 71, 100), 5.0),
        fake_run("single_adapter", 1, (61, 50, 69, 104), 5.0),
        fake_run("single_prompt", 0, (30, 30, 50, 60), 2.0),
        fake_run("single_prompt", 1, (30, 30, 50, 64), 2.0),
        fake_run("single_adapter", 0, (70, 70, 40, 100), 4.0, video=True),
    ]


def test_summary_is_hand_computed(runs):
    image = summarise(runs, video=False)
    assert list(image) == ["full_finetune", "single_adapter", "single_prompt"]  # paper order
    full = image["full_finetune"]
    assert full["seeds"] == 2 and full["percent"] == 100.0
    assert full["scores"]["vqa"] == pytest.approx((61.0, 2**0.5))  # mean, sample std
    assert full["average"] == pytest.approx((71.0, 2**0.5))  # (70, 72)
    assert full["step_ms"] == pytest.approx(55.0) and full["peak_gb"] == pytest.approx(2.0)
    assert full["gap"] == (20.0, 0.0) and full["text_prior"] == 25.0
    video = summarise(runs, video=True)
    assert list(video) == ["single_adapter"] and video["single_adapter"]["average"][1] == 0.0


@pytest.mark.parametrize(
    "gap, paper_gap, noise, expected",
    [
        (-0.5, -0.2, 1.0, "reproduced"),  # no difference in the paper, none here
        (-4.0, -0.2, 1.0, "not reproduced"),  # no difference in the paper, a clear one here
        (-11.6, 0.0, 18.0, "within seed noise"),  # a gap the seeds' spread covers: cannot tell
        (-10.0, -18.6, 2.0, "reproduced"),  # far behind in both
        (-1.0, -18.6, 0.0, "not reproduced"),  # behind, but not far: does not show the claim
        (+3.0, -18.6, 2.0, "not reproduced"),  # opposite sign
        (-3.0, -1.5, 1.0, "reproduced"),  # a little behind, beyond the noise
        (-0.5, -1.5, 1.0, "within seed noise"),
        (+3.0, -1.5, 1.0, "not reproduced"),
    ],
)
def test_verdicts(gap, paper_gap, noise, expected):
    assert verdict(gap, paper_gap, noise) == expected


def test_findings_and_files(runs, tmp_path):
    image = summarise(runs, video=False)
    lines = findings(image, summarise(runs, video=True))
    adapter = next(
        x for x in lines if x.startswith("- Single adapter matches full fine-tuning (im")
    )
    assert "= -0.5 points" in adapter and "**reproduced**" in adapter  # 70.5 vs 71.0
    prompt = next(x for x in lines if x.startswith("- Prompt tuning"))
    assert "= -28.0 points" in prompt and "**reproduced**" in prompt  # 43.0 vs 71.0
    (tmp_path / "timing.json").write_text('{"prepare_s": 30.0, "total_s": 150.0}')
    write_report(runs, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "invocation (runs finished before it are reused, not counted): 2.5 min (" in report
    # since the features and the pre-training run beside the first runs
    timing = {"prepare_s": 12.0, "features_s": 150.0, "pretrain_s": 270.0, "total_s": 3000.0}
    (tmp_path / "timing.json").write_text(json.dumps(timing))
    write_report(runs, tmp_path)
    assert (
        "counted): 50.0 min: the data and the language model 0.2 min, then the runs; ready "
        "beside the first of them: the features at 2.5 min, the V&L pre-trained backbone at "
        "4.5 min."
    ) in (tmp_path / "report.md").read_text()
    assert "| single_adapter | 2 | 5.00 | 60.0 ± 1.4 | 50.0 ± 0.0 |" in report
    assert "| **70.5 ± 0.7** | 20.0 ± 0.0 |" in report  # average, then the image gap
    assert "Text prior (the most common training answer per question type" in report
    assert "image 25.0" in report
    assert (tmp_path / "score_vs_params.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "results.json").read_text())["image"]["single_prompt"]


def test_video_tasks_learn_by_the_stated_rule():
    # five choices on 100 samples: a guesser's 2σ line is 20 + 200 sqrt(0.16 / 100) = 28
    assert chance_line("tvqa", 100) == pytest.approx((20.0, 28.0))
    runs = []
    for seed, scores in ((0, (35, 29, 50, 12)), (1, (30, 28.5, 60, 80))):
        run = fake_run("single_adapter", seed, scores, 5.0, video=True)
        for t in ("tvqa", "how2qa"):
            run["result"]["metrics"][t] |= {"n": 100, "shuffled_score": 21.0 + seed}
        runs.append(run)
    [line] = video_learning(runs)
    assert (
        "TVQA acc 35.0 / 30.0 (chance 20, a guesser's 2σ line 28.0; shuffled clips 21.0 / 22.0)"
        in line
    )
    assert "YC2C CIDEr 12.0 / 80.0 (rule > 10)" in line
    assert line.endswith("**every task learned on every seed**.")
    runs[1]["result"]["metrics"]["how2qa"]["score"] = 28.0  # on the line: a guesser could
    runs[0]["result"]["metrics"]["yc2c"]["score"] = 10.0
    [line] = video_learning(runs)
    assert line.endswith("**not learned: How2QA acc seed 1, YC2C CIDEr seed 0**.")
    assert video_learning([fake_run("single_adapter", 0, (1, 1, 1, 1), 5.0)]) == []  # image


def test_a_method_that_ignores_the_images_makes_a_finding_not_testable(runs):
    # the prompt runs' shuffled averages equal their averages: they answer from the text
    blind = [
        fake_run("single_prompt", s, (30, 30, 50, 60 + 4 * s), 2.0, shuffled=42.5 + s)
        for s in (0, 1)
    ]
    image = summarise([r for r in runs if r["method"] != "single_prompt"] + blind, video=False)
    assert image["single_prompt"]["gap"] == pytest.approx((0.0, 0.0))
    prompt = next(x for x in findings(image, {}) if x.startswith("- Prompt tuning"))
    assert "**not testable: single_prompt does not use the images beyond seed noise**" in prompt
    adapter = next(x for x in findings(image, {}) if x.startswith("- Single adapter"))
    assert "**reproduced**" in adapter  # both use the images (gaps of 20 points)


def test_the_analyses_rows_by_their_stated_rules(runs):
    """single_adapter averages 70.5 ± 0.7 (2σ 1.4); the analysis rows are hand-made."""
    extra = [
        fake_run("single_adapter@clip-full", 0, (62, 52, 72, 104), 100.0, step_s=0.16),  # 72.5
        fake_run("single_adapter@clip-full", 1, (62, 52, 72, 104), 100.0, step_s=0.16),
        fake_run("single_adapter@clip-adapter", 0, (60, 50, 70, 102), 9.0),  # 70.5: +0.0
        fake_run("single_adapter@clip-adapter", 1, (60, 50, 70, 102), 9.0),
        fake_run("single_adapter@vl-pretrained", 0, (64, 54, 74, 104), 5.0),  # 74.0: +3.5
        fake_run("single_adapter@vl-pretrained", 1, (64, 54, 74, 104), 5.0),
        fake_run("single_adapter+multiple_prompts", 0, (59, 50, 71, 100), 7.0),  # 70.0
    ]
    lines = findings(summarise(runs + extra, video=False), {})
    full = next(x for x in lines if "than fine-tuning CLIP" in x)
    assert "= +2.0 points (2σ of seeds 1.4)" in full and "**not reproduced**" in full
    # steps 165 ms (median of 160 and 170) against 55 ms
    assert "for 100,000 vs 5,000 trainable parameters and a 3.0x training step" in full
    inside = next(x for x in lines if "adapters inside CLIP" in x)
    assert "= +0.0 points" in inside and "**reproduced**" in inside
    pre = next(x for x in lines if "V&L pre-training" in x)
    assert "= +3.5 points" in pre and "**reproduced**" in pre
    prompts = next(x for x in lines if "Per-task prompts" in x)
    assert "-0.5 points (2σ of seeds 1.4)" in prompts and "no verdict" in prompts
    assert rule_verdict(-0.5, 1.4, "a ahead") == "within seed noise"
    assert rule_verdict(-3.0, 1.4, "a ahead") == "not reproduced"


def test_the_analyses_train_what_they_name(tmp_path):
    from bench import mini_repro as M

    args = M.parse_args(["--seeds", "0,1", "--methods", "single_adapter", "--no-video"])
    specs = {s["name"]: s for s in M.run_specs(args)}
    assert sorted(specs) == sorted(
        f"image/{row}/seed{s}"
        for row in (
            "single_adapter",
            "single_adapter+multiple_prompts",
            "single_adapter@clip-full",
            "single_adapter@clip-adapter",
            "single_adapter@vl-pretrained",
        )
        for s in (0, 1)
    )
    order = [s["name"] for s in M.longest_first(list(specs.values()))]
    assert order[:4] == [f"image/single_adapter@clip-{v}/seed{s}" for v in ("full", "adapter")
                         for s in (0, 1)]  # fmt: skip
    assert order[4:] == [n for n in specs if "@clip-" not in n]  # the rest as listed
    feats, down = tmp_path / "features", tmp_path / "shapes"

    def argv(name):
        given = M.train_args(specs[name], feats, down, tmp_path, args)
        return dict(a[2:].split("=", 1) for a in given)

    clip = argv("image/single_adapter@clip-adapter/seed1")
    assert (clip["model.vision_train"], clip["data.features"], clip["data.root"]) == (
        "adapter", "false", str(down)
    )  # fmt: skip
    assert clip["model.lm"] == str(feats / "lms" / "t5-d96-l3-h4-ff384-v3")
    assert clip["peft.method"] == "single_adapter" and clip["train.seed"] == "1"
    pre = argv("image/single_adapter@vl-pretrained/seed0")
    assert pre["model.lm"] == pre["model.tokenizer"] == str(tmp_path / "pretrain/backbone/lm")
    assert pre["data.features"] == "true"
    both = argv("image/single_adapter+multiple_prompts/seed0")
    assert both["peft.method"] == "single_adapter+multiple_prompts"
    stage = dict(a[2:].split("=", 1) for a in M.pretrain_args(feats, down, tmp_path, args))
    assert (stage["train.stage"], stage["peft.method"], stage["train.epochs"]) == (
        "pretrain", "full_finetune", "1"
    )  # fmt: skip
    assert stage["train.lr"] == "0.0001" and stage["train.out_dir"] == str(tmp_path / "pretrain")


def test_unknown_method_is_refused():
    p = subprocess.run(
        [sys.executable, "bench/mini_repro.py", "--methods", "single_adapter,adapterz"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "unknown method(s) ['adapterz']" in p.stderr


class Extraction:
    """A feature extraction that finishes when `done` is set, with exit status `rc`."""

    def __init__(self, order: list, done: threading.Event, rc: int = 0):
        self.order, self.done, self.returncode, self.args = order, done, rc, ["extract"]

    def wait(self) -> int:
        assert self.done.wait(60)
        self.order.append("features")
        return self.returncode


@pytest.mark.parametrize("rc", [0, 1])
def test_runs_on_pixels_start_before_the_features_exist(monkeypatch, tmp_path, rc):
    from bench import mini_repro as M

    order, done = [], threading.Event()

    def run_one(spec, *a):
        order.append(spec["name"])
        if spec["variant"].startswith("clip-"):  # runs while the extraction has not finished
            done.set()
        return {**spec, "result": {}}

    monkeypatch.setattr(M, "run_one", run_one)
    monkeypatch.setattr(M, "pretrain_backbone", lambda *a: order.append("pretrain"))
    argv = ["--seeds", "0", "--methods", "single_adapter", "--no-video", "--out", str(tmp_path)]
    args = M.parse_args(argv)
    specs = M.run_specs(args)
    pixels = {s["name"] for s in specs if s["variant"].startswith("clip-")}
    assert len(pixels) == 2 and len(specs) == 5  # the adapter and its four analysis rows
    if rc:  # a failed extraction: no run on features starts, the error reaches the caller
        with pytest.raises((subprocess.CalledProcessError, RuntimeError)):
            M.run_all(specs, tmp_path, Extraction(order, done, rc), tmp_path, tmp_path, args, 0)
        assert set(order) <= pixels | {"features"}
        return
    timing = M.run_all(specs, tmp_path, Extraction(order, done), tmp_path, tmp_path, args, 0)
    assert order[0] in pixels  # the first run started while the extraction ran
    for s in specs:
        if s["name"] not in pixels:
            assert order.index(s["name"]) > order.index("features"), s["name"]
        if s["variant"] == "vl-pretrained":
            assert order.index(s["name"]) > order.index("pretrain")
    assert len(order) == len(specs) + 2 and set(timing) == {"prepare_s", "features_s", "pretrain_s"}


def test_embedded_backbone_features_and_a_run_through_vlds_train(
    shapes_root, tmp_path, monkeypatch
):
    """The pipeline at toy size: features through the embedded tower, the embedded language
    model of MODEL's sizes (pretrained 2 steps here, once per machine: a second experiment
    links the same one), one method through `python vlds/train.py` on them, the report."""
    import vlds.model.embedded_lm as elm
    from bench import mini_repro as M

    monkeypatch.setattr(elm, "STEPS", 2)
    feats, extraction = M.prepare(shapes_root, tmp_path)
    M.wait_features(extraction)
    index = json.loads((feats / "vqa" / "train.index.json").read_text())
    assert index["features"]["pretrained"] == "synthetic"
    lms = list((feats / "lms").iterdir())
    name = f"t5-d96-l3-h4-ff384-v{elm.LM_VERSION}"
    assert [p.name for p in lms if p.is_dir()] == [name]
    shared = shapes_root / "lms" / name  # the machine's cache, beside `make train`'s models
    assert (feats / "lms" / name).resolve() == shared.resolve()
    assert (shared / "pretraining.json").is_file()

    def fail(*a, **k):
        raise AssertionError("pretrained again")

    monkeypatch.setattr(elm, "pretrain", fail)
    again, extraction = M.prepare(shapes_root, tmp_path / "again")
    M.wait_features(extraction)
    assert (again / "lms" / name).resolve() == shared.resolve()
    args = M.parse_args(["--epochs", "1", "--eval-samples", "8", "--out", str(tmp_path)])
    spec = {
        "name": "image/single_adapter/seed0",
        "video": False,
        "method": "single_adapter",
        "seed": 0,
        "lr": 1e-3,
    }
    run = M.run_one(spec, feats, shapes_root, tmp_path, args)["result"]
    config = json.loads((tmp_path / spec["name"] / "config.json").read_text())
    assert config["model"]["lm"] == "synthetic" and config["data"]["features"] == "true"
    assert "shuffled_score" in run["metrics"]["vqa"] and set(run["text_prior"]) == set(
        M.IMAGE_TASKS.split(",")
    )
    assert run["metrics"]["vqa"]["n"] == 8 and run["wall_s"] > 0
    # the finished run is reused as it is, but never under other settings
    assert M.run_one(spec, feats, shapes_root, tmp_path, args)["result"] == run
    other = M.parse_args(["--epochs", "2", "--eval-samples", "8", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="trained with train.epochs=1, this experiment asks for 2"):
        M.run_one(spec, feats, shapes_root, tmp_path, other)
    write_report([{**spec, "result": run}], tmp_path)
    assert "| single_adapter | 1 |" in (tmp_path / "report.md").read_text()
