"""Evaluate a trained adapter on validation/test shards, or score an existing prediction file.

    # every task the checkpoint was trained on, the whole val split
    python -m vlds.evaluate --checkpoint runs/tiny/adapter --shards ~/.cache/vlds/shapes-<hash>
    # some tasks, another split, first 500 samples, the reference's older VQA scorer
    python -m vlds.evaluate --checkpoint runs/tiny --task vqa,caption --shards /data/vl-shards \
        --split test --max-samples 500 --legacy-vqa --out runs/tiny/eval-test
    # another decoding rule than the run's: any eval.* key (here: rank TVQA's choices)
    python -m vlds.evaluate --checkpoint runs/tiny-video --shards ~/.cache/vlds/shapes-<hash> \
        --eval.choice_predict=rank
    # score a submission file without a model
    python -m vlds.evaluate --predictions runs/tiny/eval-val/predictions_vqa.json --task vqa \
        --shards /data/vl-shards

The model is rebuilt from the config stored in the checkpoint's adapter_config.json the way
vlds/train.py builds it (seeded with train.seed, so frozen random backbones come back bit for
bit), the adapter is loaded, and each task is decoded with the same code and settings as the
in-loop evaluation (vlds.eval.loop.evaluate_tasks, loaders from vlds.data.build; beams and batch
size from the config's eval section, which --eval.KEY=VALUE overrides), on one process (GPU when
there is one, in the run's precision). Written to --out (default {checkpoint}/../eval-{split}):
one official-format prediction file per task (see vlds/eval/submission.py) and metrics.json. A
split written without labels (GQA test, VQA test-dev / test-std, TVQA test:
`python -m vlds.data.prep.shards` marks it) is predicted, not scored: its file is the
leaderboard submission, every id once. Exit status 2 on bad input, with the reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from vlds.data import remote

log = logging.getLogger("vlds.evaluate")


def reference_rows(shards: Path | str, task: str, split: str, max_samples: int = 0) -> dict:
    """{id: (references, meta)} of a split's first `max_samples` records (0 = all), the same
    samples the in-loop evaluation reads, without decoding any pixels."""
    from vlds.data.decode import META_FIELDS
    from vlds.data.shardio import load_index, read_records
    from vlds.data.tasks import get_task

    t = get_task(task)
    index = load_index(shards, task, split)
    if not index.labelled:
        raise ValueError(
            f"{task}/{split} has no labels (an unlabelled test split): there is nothing to score "
            f"the file against here; submit it to the benchmark's evaluation server"
        )
    out = {}
    for rec in read_records(index, max_samples):
        out[str(rec["id"])] = (t.references(rec), {k: rec[k] for k in META_FIELDS if k in rec})
    return out


def _metric(task: str, legacy_vqa: bool):
    from vlds.eval.metrics import METRICS, vqa_legacy

    return vqa_legacy if (task == "vqa" and legacy_vqa) else METRICS[task]


def score_file(path, task, shards, split="val", max_samples=0, legacy_vqa=False) -> dict:
    """Metrics of a submission file against the split's references (every id exactly once)."""
    from vlds.eval.loop import score_rows
    from vlds.eval.submission import check_ids, read_predictions

    pairs = read_predictions(task, path)
    refs = reference_rows(shards, task, split, max_samples)
    check_ids([i for i, _ in pairs], list(refs), path)
    rows = [(i, p, *refs[i]) for i, p in pairs]
    return score_rows(task, rows, _metric(task, legacy_vqa))


def _adapter_dir(checkpoint: Path) -> Path:
    from vlds.checkpoint import ADAPTER_CONFIG

    d = checkpoint / "adapter" if (checkpoint / "adapter").is_dir() else checkpoint
    if not (d / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(
            f"no {ADAPTER_CONFIG} in {checkpoint}; pass a run folder, a checkpoints/step<N> "
            f"folder or their adapter/ folder"
        )
    return d


def evaluate_checkpoint(
    checkpoint,
    shards,
    tasks=None,
    split="val",
    max_samples=0,
    batch_size=0,
    legacy_vqa=False,
    eval_overrides=None,
):
    """(metrics {task: ..., "average"}, predictions {task: rows}) of an adapter checkpoint;
    `eval_overrides` {"eval.KEY": value} change how it is decoded (eval.* keys only)."""
    import torch

    from vlds.checkpoint import ADAPTER_CONFIG, load_adapter
    from vlds.config import ConfigError, apply_overrides, config_from_dict, validate
    from vlds.data.build import DataBuilder, local_side
    from vlds.distributed import WorldInfo
    from vlds.engine import use_bf16
    from vlds.eval.loop import evaluate_tasks
    from vlds.model.build import build_model, build_tokenizer, build_tower
    from vlds.model.vision import tower_image_size

    adapter = _adapter_dir(Path(checkpoint))
    cfg = config_from_dict(json.loads((adapter / ADAPTER_CONFIG).read_text())["config"])
    tasks = tasks or cfg.task_list
    unknown = [t for t in tasks if t not in cfg.task_list]
    if unknown:
        raise ConfigError(
            f"task(s) {unknown} were not trained in {adapter} (it has {cfg.task_list}); "
            f"pick from those"
        )
    cfg.data.root, cfg.data.val_split = str(shards), split
    cfg.eval.max_samples = max_samples
    cfg.eval.batch_size = batch_size or cfg.eval.batch_size
    cfg.eval.java_metrics = True  # the official caption scorers, whatever the run itself used
    if eval_overrides:  # the caller's eval.* keys win over all of the above
        cfg = apply_overrides(cfg, eval_overrides)
        validate(cfg)  # a bad value fails here, before any model is built

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shards = remote.location(shards)
    local = local_side(cfg, shards, True)
    tokenizer = build_tokenizer(cfg, local)
    # The loaders first: a missing split fails before any model is built.
    image_size = tower_image_size(cfg.model.vision)
    data = DataBuilder(
        cfg,
        shards,
        tokenizer,
        image_size,
        WorldInfo(0, 0, 1),
        train=False,
        eval_tasks=tasks,
        device=device,
    )
    tower = build_tower(cfg)  # seeded as in training: frozen random weights come back exactly
    model = build_model(cfg, tokenizer, tower, local)
    load_adapter(model, adapter)
    dtype = torch.bfloat16 if use_bf16(cfg) else torch.float32
    model.to(device, dtype)
    tower.to(device, dtype)
    overrides = {"vqa": _metric("vqa", legacy_vqa)}
    return evaluate_tasks(
        model, tower, data.eval_loaders(), tokenizer, cfg, device, metrics=overrides
    )


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m vlds.evaluate", description=__doc__.split("\n\n")[0]
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="run folder, checkpoints/step<N> or an adapter/ folder")
    src.add_argument("--predictions", help="a submission file to score (needs --task)")
    p.add_argument("--shards", required=True, help="data root: {task}/{split}.index.json + tars")
    p.add_argument("--task", default="", help="task or comma list (default: the run's tasks)")
    p.add_argument("--split", default="val")
    p.add_argument("--out", default="", help="output folder (default {checkpoint}/../eval-SPLIT)")
    p.add_argument("--max-samples", type=int, default=0, help="first N per task (0 = all)")
    p.add_argument("--batch-size", type=int, default=0, help="default: the run's eval.batch_size")
    p.add_argument("--legacy-vqa", action="store_true", help="the reference's older VQA scorer")
    p.epilog = (
        "--eval.KEY=VALUE (any key of the eval section) changes how the checkpoint is decoded, "
        "e.g. --eval.choice_predict=rank or --eval.caption_beams=3"
    )
    from vlds.config import take_overrides

    overrides, rest = take_overrides(list(argv))
    bad = [k for k in overrides if not k.startswith("eval.")]
    if bad:
        p.error(
            f"{', '.join('--' + k for k in bad)}: only eval.* keys can change at evaluation; "
            f"the model and data are the checkpoint's"
        )
    args = p.parse_args(rest)
    args.eval_overrides = overrides
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the CLI; returns {task: metrics, ...}. Errors propagate (the __main__ block turns
    them into a message and exit status 2)."""
    from vlds.data.tasks import get_task
    from vlds.eval.submission import FILE_NAMES, write_predictions

    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    for t in tasks:
        get_task(t)  # an unknown task name fails with the valid ones
    shards = remote.location(args.shards)
    if args.predictions:
        if len(tasks) != 1:
            raise ValueError("--predictions needs exactly one --task (the file's task)")
        m = score_file(
            args.predictions, tasks[0], shards, args.split, args.max_samples, args.legacy_vqa
        )
        result = {"predictions": str(args.predictions), "split": args.split, tasks[0]: m}
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / f"metrics_{tasks[0]}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return {tasks[0]: m}

    metrics, preds = evaluate_checkpoint(
        args.checkpoint,
        shards,
        tasks or None,
        args.split,
        args.max_samples,
        args.batch_size,
        args.legacy_vqa,
        args.eval_overrides,
    )
    out = (
        Path(args.out)
        if args.out
        else _adapter_dir(Path(args.checkpoint)).parent / (f"eval-{args.split}")
    )
    out.mkdir(parents=True, exist_ok=True)
    for t, rows in preds.items():
        log.info("wrote %s", write_predictions(t, rows, out))
    summary = {
        "checkpoint": str(args.checkpoint),
        "split": args.split,
        "max_samples": args.max_samples,
        "legacy_vqa": args.legacy_vqa,
        "eval_overrides": args.eval_overrides,
        "metrics": metrics,
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    tasks = [t for t, m in metrics.items() if isinstance(m, dict)]
    scores = [f"{t} {metrics[t]['score']:.2f}" for t in tasks if metrics[t]["score"] is not None]
    if scores:
        avg = metrics["average"]
        log.info("%s: %s, average %.2f", out / "metrics.json", ", ".join(scores), avg)
    unlabelled = [t for t in tasks if metrics[t]["score"] is None]
    if unlabelled:
        log.info(
            "%s/%s has no labels: wrote the submission file(s) %s for the evaluation server",
            ",".join(unlabelled),
            args.split,
            ", ".join(str(out / FILE_NAMES[t]) for t in unlabelled),
        )
    return metrics


if __name__ == "__main__":
    try:
        main()
    # ConfigError, DataError and PredictionError are ValueErrors: bad input, not a crash
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
