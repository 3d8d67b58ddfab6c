"""The paper's experiment in miniature: every PEFT method side by side on the shapes world.

    python bench/mini_repro.py                      # the whole experiment (make repro)
    python bench/mini_repro.py --seeds 0 --methods single_adapter,full_finetune --no-video
    python bench/mini_repro.py --report-only        # re-write the report from finished runs
    python bench/mini_repro.py --seeds 0 --methods single_adapter --analyses clip,pretrain \
        --no-video                                  # the paper's analyses only
    python bench/mini_repro.py --methods single_adapter,full_finetune --out runs/mini_v2
                                                    # v2: every analysis, 3 seeds, video too
    python bench/mini_repro.py --methods single_adapter,full_finetune,single_prompt --epochs 2 \
        --video-epochs 10 --eval-samples 200 --out runs/mini_v2_budget
                                                    # v2 in 55 min once the backbone is cached

1. Data: the embedded default of `make train` (8 tasks of the shapes world).
2. Backbone: the embedded default's own, built by the product on first use: the tiny open_clip
   tower pretrained on shapes-world labels (vlds.model.embedded_tower, our stand-in for CLIP)
   and a T5 of MODEL's sizes pretrained on the four image tasks from oracle visual tokens
   (vlds.model.embedded_lm, our stand-in for T5's pretrained weights), loaded by the real
   loading code (`--model.lm=synthetic --model.vision_pretrained=synthetic`). Every run
   learns its own visual embedding from scratch, as in the paper, and must learn to see.
3. Features: the downstream shards go through the frozen pretrained tower once
   (`python -m vlds.data.prep.extract`), as users cache CLIP features for real runs.
4. Runs: `python vlds/train.py` per (method, seed): every method of vlds.peft on the four image
   tasks together, and the single adapter and full fine-tuning on the four video tasks, each
   with the reference's learning rate for its method (vlds.recipe: adapters/Compacter/
   Hyperformer/LoRA/prompts 1e-3, multiple adapters 3e-4, full fine-tuning 1e-4; video 3e-4,
   full 3e-5) and the reference's training defaults (task prompts only for the single-module
   methods, the caption token-mean loss, zero boxes + object order, its init and weight-decay
   groups; docs/differences.md), except two targets: VQA's majority answer, as in `make
   train` (the shapes world's wrong human answers are noise, not ambiguity), and TVQA /
   How2QA's right choice in words, not its tag "a3", predicted by ranking the five choices
   (data.choice_target=text, eval.choice_predict=rank, as the tiny-video preset: the miniature
   language model never learns to point at a tag, bench/RESULTS.md). The image tasks
   mix in the reference's step shares on the real releases (IMAGE_MIX: VQA 28 / GQA 29 /
   NLVR2 12 / captions 31 %): the shapes world's equal task sizes would give other shares
   under the reference's rule (one sample per caption sentence, per-task batches), so it keeps
   one caption sample per image or clip and batches of 32 (16 for video). Two runs at a time,
   one core each, the longest first; a finished run (its metrics.json) is never redone, so an
   interrupted experiment continues where it stopped.
   The paper's analyses add single-adapter rows (--analyses, all by default): "prompts", the
   single adapter with per-task prompts (peft.method=single_adapter+multiple_prompts);
   "clip", CLIP fine-tuned and adapters inside CLIP (model.vision_train=full / adapter: these
   read pixels, since a tower that trains cannot use cached features), beside the frozen
   tower of every other row; "pretrain", the single adapter on a backbone that first went
   through vlds' V&L pre-training stage (train.stage=pretrain: the whole model, --pretrain-
   epochs on the image tasks' training split, written to out/pretrain/backbone and loaded
   with --model.lm=DIR).
5. Report: report.md (per method: % updated, each task's official metric as mean +- std over
   seeds, the average, the same model's average with shuffled images and the gap between the
   two (what the images contribute), step time, peak memory, checkpoint bytes; the text prior;
   which of the paper's findings the miniature reproduces, a comparison counting only between
   methods that use the images), score_vs_params.png (the paper's teaser plot), results.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python bench/mini_repro.py` from a checkout without install

from bench.mini_report import write_report  # noqa: E402
from vlds.recipe import RECIPES, SPLIT_SIZES, recipe_lr, reference_shares  # noqa: E402

IMAGE_TASKS = "vqa,gqa,nlvr,caption"
VIDEO_TASKS = "tvqa,how2qa,tvc,yc2c"
VIDEO_METHODS = ("single_adapter", "full_finetune")
# The paper's analyses, each a single-adapter row with a variant (the report's row name)
ANALYSES = {
    "prompts": [("single_adapter+multiple_prompts", "")],
    "clip": [("single_adapter", "clip-full"), ("single_adapter", "clip-adapter")],
    "pretrain": [("single_adapter", "vl-pretrained")],
}
# The reference's mixture: its epoch's step shares on the real releases (VQA 28, GQA 29, NLVR2
# 12, captions 31 %; vlds.recipe). The shapes world has 8,000 samples per task, so the
# reference's rule (one caption sample per sentence, per-task batches) would give other shares
# here; the shares are set directly instead, each step one task's batch of 32.
IMAGE_MIX = ",".join(
    f"{t}={round(p)}"
    for t, p in reference_shares(
        SPLIT_SIZES, 500, RECIPES["bart-base"]["values"]["data.task_batch_scale"][0]
    ).items()
)
# The backbone: a T5 of 0.8M parameters (d 96, 3 + 3 layers, vocabulary 512). PEFT sizes keep
# the paper's ratios to d (768 there): reduction factor 8, LoRA rank d/6, Hyperformer
# embeddings 2d/3, prompt MLP ~d; 20 prompt vectors (40 there) before 40 text tokens.
MODEL = {"model.d_model": 96, "model.num_layers": 3, "model.num_heads": 4, "model.d_ff": 384}
PEFT = {
    "peft.reduction_factor": 8,
    "peft.lora_rank": 16,
    "peft.hyper_task_dim": 64,
    "peft.hyper_layer_dim": 64,
    "peft.hyper_hidden": 32,
    "peft.prompt_length": 20,
    "peft.prompt_hidden": 96,
}


def parse_args(argv):
    from vlds.peft import METHODS
    from vlds.peft.registry import method_class

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "mini_repro")
    p.add_argument("--methods", default=",".join(sorted(METHODS)), help="comma list")
    p.add_argument("--seeds", default="0,1,2", help="comma list of train.seed values")
    p.add_argument("--no-video", action="store_true", help="skip the video runs")
    p.add_argument(
        "--epochs", type=int, default=3, help="epochs per image run (8,000 samples/task)"
    )
    p.add_argument(
        "--video-epochs",
        type=int,
        default=16,
        help="epochs per video run (600 clips/task; with 4 the frozen model never learned the "
        "caption tasks: bench/RESULTS.md)",
    )
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--eval-samples", type=int, default=300, help="validation samples per task")
    p.add_argument("--report-only", action="store_true")
    p.add_argument(
        "--analyses",
        default=",".join(ANALYSES),
        help=f"the paper's analyses to add (comma list of {', '.join(ANALYSES)}; '' for none)",
    )
    p.add_argument("--pretrain-epochs", type=int, default=1, help="epochs of V&L pre-training")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = []
    for m in args.methods:
        try:
            method_class(m)
        except ValueError:
            unknown.append(m)
    if unknown:
        p.error(f"unknown method(s) {unknown}; valid: {', '.join(sorted(METHODS))}")
    args.analyses = [a.strip() for a in args.analyses.split(",") if a.strip()]
    bad = sorted(set(args.analyses) - set(ANALYSES))
    if bad:
        p.error(f"unknown analysis {bad}; valid: {', '.join(ANALYSES)}")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    return args


# ---- 1 + 2 + 3: data, the embedded backbone, cached features -----------------------------------


def extract_features(down_root: Path, feats: Path) -> subprocess.Popen:
    """The downstream shards through the embedded pretrained tower (`--vision-pretrained
    synthetic`, vlds.model.embedded_tower), once: finished shards are skipped on a re-run.
    Started, not awaited: the caller waits for it (``Popen.wait``)."""
    cmd = [
        sys.executable,
        "-m",
        "vlds.data.prep.extract",
        "--shards",
        str(down_root),
        "--tasks",
        f"{IMAGE_TASKS},{VIDEO_TASKS}",
        "--splits",
        "train,val",
        "--out",
        str(feats),
        "--vision",
        "vlds-tiny-rn",
        "--vision-pretrained",
        "synthetic",
        "--grid-pool",
        "3",
    ]
    return subprocess.Popen(cmd, cwd=REPO)


def prepare(down_root: Path, out: Path) -> tuple[Path, subprocess.Popen]:
    """(the features folder, the feature extraction still running): returns once the embedded
    language model of MODEL's sizes (vlds.model.embedded_lm) is ready, pretrained before any
    run starts, so no run pretrains it on one thread. The model is cached once per machine
    beside `make train`'s, in the shapes world's folder (4,500 steps, ~15 min on one core: each
    --out pretraining its own identical copy took most of v2's preparation), and linked into
    the features folder, the runs' data root, where `--model.lm=synthetic` finds it. The
    features are extracted meanwhile, on the other core; the caller waits for them
    (`wait_features`), so that with the model cached the runs that read pixels start at once."""
    from vlds.config import build_config
    from vlds.model.build import build_tokenizer
    from vlds.model.embedded_lm import ensure_lm, lm_dir

    feats = out / "features"
    extraction = extract_features(down_root, feats)
    try:
        cfg = build_config("tiny", {**MODEL, "model.tokenizer": str(down_root / "tokenizer")})
        here = lm_dir(cfg, feats)
        if not (here / "config.json").is_file():  # else one built here, before this cache
            shared = ensure_lm(cfg, down_root, build_tokenizer(cfg))
            here.parent.mkdir(parents=True, exist_ok=True)
            if here.is_symlink():  # a link to a cache since removed
                here.unlink()
            here.symlink_to(shared.resolve(), target_is_directory=True)
    except BaseException:
        extraction.kill()
        extraction.wait()
        raise
    return feats, extraction


def wait_features(extraction: subprocess.Popen) -> None:
    if extraction.wait() != 0:
        raise subprocess.CalledProcessError(extraction.returncode, extraction.args)


# ---- 4: the runs -----------------------------------------------------------------------------


def run_specs(args) -> list[dict]:
    """One entry per run: `method` is the report's row (the PEFT method, `@variant` for an
    analysis row), `peft` the method it trains."""
    specs = []
    extra = [row for a in args.analyses for row in ANALYSES[a]]
    for video in (False, True):
        if video and args.no_video:
            continue
        rows = [(m, "") for m in args.methods if not video or m in VIDEO_METHODS]
        rows += [] if video else [r for r in extra if r not in rows]
        for method, variant in rows:
            lr = recipe_lr("video" if video else "image", method)[0]  # the reference's table
            label = f"{method}@{variant}" if variant else method
            for seed in args.seeds:
                name = f"{'video' if video else 'image'}/{label}/seed{seed}"
                specs.append(
                    {
                        "name": name,
                        "video": video,
                        "method": label,
                        "peft": method,
                        "variant": variant,
                        "seed": seed,
                        "lr": lr,
                    }  # fmt: skip
                )
    return specs


def longest_first(specs: list[dict]) -> list[dict]:
    """The order runs start in: the longest first, so the last minutes do not leave one core
    idle behind a long run. A tower that trains reads pixels (2-3x a feature run's step,
    bench/RESULTS.md); video runs come next (16 epochs, longer inputs)."""

    def cost(spec: dict) -> int:
        return 0 if spec["variant"].startswith("clip-") else 1 if spec["video"] else 2

    return sorted(specs, key=cost)  # stable: the table's order within a cost


def pretrain_args(feats: Path, down_root: Path, out: Path, args) -> list[str]:
    """The V&L pre-training run of the "pretrain" analysis: the whole model (the rate of full
    fine-tuning, 1e-4) on the image tasks' cached features, seed 0."""
    spec = {"name": "pretrain", "video": False, "method": "full_finetune", "variant": "",
            "seed": 0, "lr": recipe_lr("image", "full_finetune")[0]}  # fmt: skip
    argv = train_args(spec, feats, down_root, out, args)
    return [a for a in argv if not a.startswith("--train.epochs=")] + [
        f"--train.epochs={args.pretrain_epochs}",
        "--train.stage=pretrain",
    ]


def train_args(spec: dict, feats: Path, down_root: Path, out: Path, args) -> list[str]:
    over = {
        **MODEL,
        **PEFT,
        "model.lm": "synthetic",
        "model.arch": "t5",
        "model.tokenizer": str(down_root / "tokenizer"),
        "model.vision": "vlds-tiny-rn",
        "model.vision_pretrained": "synthetic",
        "model.grid_pool": 3,
        "data.root": str(feats),
        "data.features": "true",
        "data.num_workers": 0,
        "data.tasks": VIDEO_TASKS if spec["video"] else IMAGE_TASKS,
        "data.mixing_weights": IMAGE_MIX,
        "data.caption_samples": "image",
        "peft.method": spec.get("peft", spec["method"]),
        "train.lr": spec["lr"],
        "train.seed": spec["seed"],
        "train.epochs": args.video_epochs if spec["video"] else args.epochs,
        "train.out_dir": str(out / spec["name"]),
        "train.log_every": 25,
        "train.keep_last": 1,
        "eval.every": 10**9,
        "eval.max_samples": args.eval_samples,
        "eval.batch_size": 100,
        "eval.caption_beams": 3,
    }
    variant = spec.get("variant", "")
    if variant.startswith("clip-"):  # a tower that trains reads pixels; the same language model
        from vlds.config import build_config
        from vlds.model.embedded_lm import lm_dir

        lm = lm_dir(build_config("tiny", MODEL), feats)
        over.update(
            {
                "model.lm": str(lm),
                "model.vision_train": variant.removeprefix("clip-"),
                "data.root": str(down_root),
                "data.features": "false",
            }
        )
    elif variant == "vl-pretrained":
        backbone = out / "pretrain" / "backbone" / "lm"
        over.update({"model.lm": str(backbone), "model.tokenizer": str(backbone)})
    if spec["video"]:  # the preset's mixing weights name the image tasks
        over.update(
            {
                "data.max_text_len": 96,
                "data.batch_size": 16,
                "data.mixing": "proportional",
                "data.mixing_weights": "",
                # as the tiny-video preset: QA answers with the choice's words, ranked
                "data.choice_target": "text",
                "eval.choice_predict": "rank",
            }
        )
    return [f"--{k}={v}" for k, v in over.items()]


def train(name: str, argv: list[str], run_dir: Path) -> None:
    """`python vlds/train.py ARGV` on one thread, in a world of its own; its log beside it."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for k in list(env):  # a world of one per run, on its own free port, even under srun
        if k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") or (
            k.startswith("SLURM_")
        ):
            env.pop(k)
    log = run_dir.parent / f"{run_dir.name}.log"
    with open(log, "w") as f:
        cmd = [sys.executable, "vlds/train.py", *argv]
        p = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"{name} failed (exit {p.returncode}); log {log}:\n{tail}")


def pretrain_backbone(feats: Path, down_root: Path, out: Path, args) -> Path:
    """The "pretrain" analysis' backbone, trained once (a finished one is reused)."""
    backbone = out / "pretrain" / "backbone"
    if not (backbone / "backbone.json").is_file():
        train("pretrain", pretrain_args(feats, down_root, out, args), out / "pretrain")
    return backbone


def run_one(spec: dict, feats: Path, down_root: Path, out: Path, args) -> dict:
    run_dir = out / spec["name"]
    done = run_dir / "metrics.json"
    if not done.is_file():
        t0 = time.time()
        train(spec["name"], train_args(spec, feats, down_root, out, args), run_dir)
        result = json.loads(done.read_text())
        result["wall_s"] = round(time.time() - t0, 1)
        done.write_text(json.dumps(result, indent=2) + "\n")
    check_same_settings(run_dir, train_args(spec, feats, down_root, out, args))
    return {**spec, "result": json.loads(done.read_text())}


def check_same_settings(run_dir: Path, argv: list[str]) -> None:
    """A finished run is reused only if it was trained with these settings (a re-run with other
    --epochs or --eval-samples must not mix old and new runs in one table)."""
    saved = json.loads((run_dir / "config.json").read_text())
    for arg in argv:
        key, value = arg[2:].split("=", 1)
        section, name = key.split(".")
        if key != "train.out_dir" and str(saved[section][name]) != value:
            raise SystemExit(
                f"{run_dir} was trained with {key}={saved[section][name]}, this experiment "
                f"asks for {value}: delete that folder to redo it, or pass another --out"
            )


def run_all(specs, feats, extraction, down_root, out, args, t0: float) -> dict:
    """Every run, args.parallel at a time, the longest first, and the timing. The pool's
    first slot stands for the core the feature extraction runs on: it waits for the features,
    then trains the "pretrain" analysis' backbone. The runs that read pixels (the clip rows)
    need neither and start on the other slot meanwhile; a run on features waits for them, a
    run on the pre-trained backbone for it (with the language model cached, this keeps both
    cores busy from the start: v2 at 2 epochs left one idle for 4.3 min)."""
    from tqdm import tqdm

    timing = {"prepare_s": round(time.time() - t0, 1)}  # the data and the language model
    features, backbone, failed = threading.Event(), threading.Event(), []

    def stage() -> None:
        try:
            wait_features(extraction)
            timing["features_s"] = round(time.time() - t0, 1)
            features.set()
            if "pretrain" in args.analyses:
                pretrain_backbone(feats, down_root, out, args)
                timing["pretrain_s"] = round(time.time() - t0, 1)
        except BaseException as e:
            failed.append(e)
            raise
        finally:
            features.set()
            backbone.set()

    def job(spec: dict) -> dict:
        variant = spec["variant"]
        if not variant.startswith("clip-"):
            (backbone if variant == "vl-pretrained" else features).wait()
        if failed:
            raise RuntimeError(f"{spec['name']} not started: the preparation failed")
        return run_one(spec, feats, down_root, out, args)

    with cf.ThreadPoolExecutor(args.parallel) as pool:
        prep = pool.submit(stage)  # submitted first, so a slot takes it before any run
        futures = [pool.submit(job, s) for s in longest_first(specs)]
        with tqdm(total=len(futures), desc="runs", dynamic_ncols=True) as bar:
            for fut in cf.as_completed([prep, *futures]):
                r = fut.result()
                if r is not None:
                    bar.update(1)
                    bar.set_postfix_str(r["name"])
    return timing


def main(argv=None) -> None:
    args = parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    specs = run_specs(args)
    if not args.report_only:
        from vlds.data.synthetic import ensure_synthetic

        t0 = time.time()
        down_root = ensure_synthetic()  # the default of `make train`
        feats, extraction = prepare(down_root, out)
        timing = run_all(specs, feats, extraction, down_root, out, args, t0)
        timing["total_s"] = round(time.time() - t0, 1)
        (out / "timing.json").write_text(json.dumps(timing) + "\n")
    results = []
    for s in specs:
        done = out / s["name"] / "metrics.json"
        if done.is_file():
            results.append({**s, "result": json.loads(done.read_text())})
    if not results:
        raise SystemExit(f"no finished runs under {out}; run without --report-only first")
    write_report(results, out)
    print(f"report: {out / 'report.md'}, plot: {out / 'score_vs_params.png'}")


if __name__ == "__main__":
    main()
