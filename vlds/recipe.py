"""The reference recipe as one table: what the real presets train with, and where each value
comes from.

    python -m vlds.recipe --preset bart-base --method multiple_adapters
    python -m vlds.recipe --preset t5-base --method single_adapter --world 8

The reference is the paper's code, ylsung/VL_adapter (VL-T5/, commit 545fcbb): its launch scripts
(`VL-T5/scripts/{image,video}/<method>.sh`, each run as `bash scripts/image/<method>.sh 1`, one
process) and `src/` (param.py, multitask.py, multitask_data.py). A real preset names its recipe
("recipe": "bart-base" in vlds.config.PRESETS); `vlds.config.build_config` then applies the
recipe's values for the run's method between the preset and the user's overrides, so
`--train.lr=2e-4` still wins. The printer lists every configuration value with its source, the
effective global batch for a world size, and each task's share of an epoch's steps computed from
the public releases' training-split sizes (SPLIT_SIZES) under the reference's rule and vlds'.

A leaf like vlds.config (which imports it): plain data and pure functions, nothing from vlds at
import time.
"""

from __future__ import annotations

import argparse
import math
import sys

REF = "ylsung/VL_adapter@545fcbb"
_IMG, _VID = "VL-T5/scripts/image", "VL-T5/scripts/video"

# Learning rate per method (the scripts' `lr=`). Methods without a script of their own take the
# rate of their family (the paper's text: adapters, Compacter, Hyperformer, LoRA and prompts
# 1e-3; multiple adapters 3e-4; full fine-tuning 1e-4), said so in the source.
_IMAGE_LR = {
    "single_adapter": (1e-3, f"{_IMG}/single_adapter.sh: lr=1e-3"),
    "multiple_adapters": (3e-4, f"{_IMG}/multiple_adapters.sh: lr=3e-4"),
    "half_shared_adapter": (3e-4, "no script; the per-task adapters' rate (multiple_adapters.sh)"),
    "hyperformer": (1e-3, f"{_IMG}/hyperformer.sh: lr=1e-3"),
    "single_compacter": (1e-3, f"{_IMG}/single_compacter.sh: lr=1e-3"),
    "multiple_compacters": (1e-3, f"{_IMG}/multiple_compacters.sh: lr=1e-3"),
    "single_lora": (1e-3, f"{_IMG}/single_lora.sh: lr=1e-3"),
    "multiple_lora": (1e-3, f"{_IMG}/multiple_lora.sh: lr=1e-3"),
    "single_prompt": (1e-3, f"{_IMG}/single_prompt.sh: lr=1e-3"),
    "multiple_prompts": (1e-3, f"{_IMG}/multiple_prompts.sh: lr=1e-3"),
    "full_finetune": (1e-4, f"{_IMG}/full_finetuning.sh: lr=1e-4"),
    "visual_only": (1e-3, "no script (vlds' ablation); the PEFT methods' rate"),
    "visual_ln": (1e-3, "no script (vlds' ablation); the PEFT methods' rate"),
}
_VIDEO_LR = {
    "single_adapter": (3e-4, f"{_VID}/single_adapter.sh: lr=3e-4"),
    "single_lora": (3e-4, f"{_VID}/single_lora.sh: lr=3e-4"),
    "single_prompt": (3e-4, f"{_VID}/single_prompt.sh: lr=3e-4"),
    "full_finetune": (3e-5, f"{_VID}/full_finetuning.sh: lr=3e-5"),
}
_VIDEO_DEFAULT_LR = (3e-4, f"no video script for this method; the video PEFT rate ({_VID}/*.sh)")

_COMMON = {
    "train.warmup_ratio": (0.1, "scripts: --warmup_ratio 0.1"),
    "train.grad_clip": (5.0, "scripts: --clip_grad_norm 5"),
    "train.weight_decay": (0.01, "src/param.py: --weight_decay default 0.01"),
    "train.adam_eps": (1e-6, "src/param.py: --adam_eps default 1e-6"),
    "train.adam_beta1": (0.9, "src/param.py: --adam_beta1 default 0.9"),
    "train.adam_beta2": (0.999, "src/param.py: --adam_beta2 default 0.999"),
    "model.dropout": (0.1, "src/param.py: --dropout default 0.1"),
    "peft.reduction_factor": (8, "scripts: --reduction_factor 8"),
    "data.mixing": (
        "proportional",
        "src/multitask_data.py MultitaskLoader(sampling='roundrobin'): every batch of every task "
        "once per epoch, shuffled with the epoch as seed",
    ),
}

# batch size per process = the global batch: the README runs every script with one process
_ONE_PROCESS = "one process (README: `bash scripts/image/<method>.sh 1`)"
_IMAGE_SCALE = (
    "gqa=100/60,nlvr=20/60,caption=50/60",
    "src/multitask.py: gqa/nlvr/caption batch = int(batch_size * 100/60, 20/60, 50/60)",
)


def _image_recipe(backbone: str, batch: int) -> dict:
    return {
        "kind": "image",
        "values": {
            **_COMMON,
            "train.epochs": (20, f"{_IMG}/*.sh: --epochs 20"),
            "train.global_batch_size": (
                batch,
                f"{_IMG}/*.sh: batch_size={batch} ({backbone}), {_ONE_PROCESS}",
            ),
            "data.batch_size": (
                batch,
                "the reference's per-process batch (the most one GPU holds)",
            ),
            "data.task_batch_scale": _IMAGE_SCALE,
        },
    }


RECIPES: dict[str, dict] = {
    "t5-base": _image_recipe("t5", 300),
    "bart-base": _image_recipe("bart", 500),
    "bart-base-video": {
        "kind": "video",
        "values": {
            **_COMMON,
            "train.epochs": (7, f"{_VID}/*.sh: --epochs 7"),
            "train.global_batch_size": (50, f"{_VID}/*.sh: batch_size=50 (bart), {_ONE_PROCESS}"),
            "data.batch_size": (50, "the reference's per-process batch"),
            "data.task_batch_scale": ("", "src/multitask_video.py: one batch size for every task"),
        },
    },
}


# Defaults that are the reference's behaviour (vlds' variant one flag away): the printer's source.
BEHAVIOUR: dict[str, str] = {
    "data.image_resize": "the reference's, feature_extraction/coco_CLIP.py Resize((224, 224))",
    "data.vqa_target": "the reference's, src/vqa_clip_data.py (soft-score draw) + vqa_model.py",
    "data.choice_target": "the reference's, src/video/{tvqa,how2qa}_data.py (target a{k})",
    "data.max_text_len": "the reference's per task (src/*_clip_data.py, src/video/*_data.py)",
    "data.max_target_len": "the reference's per task (src/*_clip_data.py, src/video/*_data.py)",
    "data.caption_samples": "the reference's, src/caption_clip_data.py (one per sentence)",
    "data.task_prompts": "the reference's scripts' --use_tasks_prompts (vlds.data.tasks)",
    "train.caption_loss": "the reference's, src/caption_model.py (token mean)",
    "train.decay_exempt": "the reference's, src/trainer_base.py (names with bias/LayerNorm.weight)",
    "model.visual_input": "the reference's, src/modeling_{t5,bart}.py VisualEmbedding",
    "eval.nlvr_predict": "the reference's, src/nlvr_model.py (first decoding position)",
    "eval.choice_predict": "the reference's, video_model.py (greedy generation, scored as a tag)",
    "eval.no_repeat_ngram_size": "the backbone's generation config, as the reference's generate",
    "eval.max_new_tokens": "the reference's gen_max_length per task (captions 40, others 20)",
}


def recipe_lr(kind: str, method: str) -> tuple[float, str]:
    """(learning rate, source) of the reference for an "image" or "video" run of `method`; a
    method plus prompts (METHOD+PROMPTS) trains at the method's rate."""
    from vlds.config import split_method

    base, prompts = split_method(method)
    if prompts is not None:
        lr, src = recipe_lr(kind, base)
        return lr, f"{src} ({base}'s rate: the reference adds --encoder_prompt_len to its flags)"
    if kind == "video":
        return _VIDEO_LR.get(method, _VIDEO_DEFAULT_LR)
    if method not in _IMAGE_LR:
        raise KeyError(f"no recipe learning rate for method {method!r}")
    return _IMAGE_LR[method]


def recipe_values(recipe: str, method: str) -> dict[str, tuple]:
    """{"section.key": (value, source)} the recipe sets for a run of `method`."""
    if recipe not in RECIPES:
        raise KeyError(f"unknown recipe {recipe!r}; valid: {', '.join(RECIPES)}")
    spec = RECIPES[recipe]
    return {**spec["values"], "train.lr": recipe_lr(spec["kind"], method)}


# ---- the epoch's step shares -----------------------------------------------------------------
# Training-split sizes of the public image releases as the reference trains on them (samples; a
# caption sample is one reference sentence), as published (no release file is on a CI machine to
# count): VQA, VQAv2 questions of the Karpathy train + restval images (src/multitask.py
# split='karpathy_train'); GQA, balanced train + val questions (943,000 + 132,062; split=
# 'train,valid'); NLVR2, train.json lines; COCO, dataset_coco.json sentences of the 113,287 train +
# restval images (split='karpathy_train').
SPLIT_SIZES = {"vqa": 605_102, "gqa": 1_075_062, "nlvr": 86_373, "caption": 566_747}


def parse_scale(spec: str) -> dict[str, float]:
    """ "gqa=100/60,nlvr=0.33" -> {"gqa": 1.666.., "nlvr": 0.33}; a factor may be a fraction."""
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, eq, factor = (x.strip() for x in item.partition("="))
        num, slash, den = factor.partition("/")
        try:
            value = float(num) / (float(den) if slash else 1.0)
        except (ValueError, ZeroDivisionError):
            value = float("nan")
        if not eq or not value > 0 or not math.isfinite(value):
            raise ValueError(
                f"data.task_batch_scale: {item!r} needs a factor > 0, e.g. {name}=100/60 or "
                f"{name}=0.5"
            )
        out[name] = value
    return out


def reference_shares(sizes: dict[str, int], batch: int, scale: str) -> dict[str, float]:
    """Each task's % of an epoch's steps as the reference counts them on one process: a task's
    batch is int(batch x factor) and its step count len(DataLoader) = ceil(samples / batch)."""
    factors = parse_scale(scale)
    steps = {t: math.ceil(n / int(batch * factors.get(t, 1.0))) for t, n in sizes.items()}
    total = sum(steps.values())
    return {t: 100.0 * s / total for t, s in steps.items()}


# ---- the printer -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vlds.recipe", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    p.add_argument("--preset", default="bart-base")
    p.add_argument("--method", default=None, help="peft.method (default: the preset's)")
    p.add_argument("--world", type=int, default=1, help="ranks the run will use")
    args, rest = p.parse_known_args(argv)
    from vlds.config import ConfigError, resolve_config, take_overrides

    try:
        overrides, unknown = take_overrides(rest)
        if unknown:
            p.error(f"unrecognised arguments: {' '.join(unknown)}")
        if args.method:
            overrides["peft.method"] = args.method
        cfg, sources = resolve_config(args.preset, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_recipe(cfg, sources, args.world))
    return 0


def format_recipe(cfg, sources: dict[str, str], world: int) -> str:
    """The resolved config, one `key = value  (source)` line each, then the batch plan and the
    step shares (vlds.data.mixing)."""
    from vlds.config import ConfigError, global_batch
    from vlds.data.mixing import run_batch_sizes, step_shares

    lines = [f"# preset {cfg.preset}, peft.method {cfg.peft.method}", ""]
    width = max(len(k) for k in sources)
    for key, source in sources.items():
        section, name = key.split(".", 1)
        value = getattr(getattr(cfg, section), name)
        lines.append(f"{key:<{width}} = {value!r:<14} ({source})")
    from vlds.data.tasks import uses_task_prompts

    on = uses_task_prompts(cfg)
    lines.append("")
    lines.append(
        f'task prompts ("vqa: " ...): {"on" if on else "off"} (data.task_prompts='
        f"{cfg.data.task_prompts}: the reference's script for {cfg.peft.method} "
        f"{'passes' if on else 'does not pass'} --use_tasks_prompts)"
        if cfg.data.task_prompts == "auto"
        else f"task prompts: {'on' if on else 'off'} (data.task_prompts={cfg.data.task_prompts})"
    )
    try:
        train_batch, accum, micro = global_batch(cfg, world)
    except ConfigError as e:
        lines.append(f"batch: {e}")
        return "\n".join(lines)
    asked = cfg.train.global_batch_size or train_batch
    note = "" if train_batch == asked else f" (asked {asked}: the nearest multiple of the world)"
    lines.append(
        f"global batch {train_batch}{note} = micro-batch {micro} x {accum} accumulation "
        f"step(s) x {world} rank(s)"
    )
    tasks = cfg.task_list
    known = {t: SPLIT_SIZES[t] for t in tasks if t in SPLIT_SIZES}
    if len(known) == len(tasks):
        sizes = run_batch_sizes(cfg, world)
        ours = step_shares(known, sizes, world, cfg.data)
        ref = reference_shares(
            known, cfg.train.global_batch_size or micro, cfg.data.task_batch_scale
        )
        lines.append("")
        lines.append("task     train samples  batch/rank  steps share  reference share")
        for t in tasks:
            lines.append(
                f"{t:<8} {known[t]:>13,}  {sizes[t]:>10}  {ours[t]:>10.1f} %  {ref[t]:>13.1f} %"
            )
        lines.append("(samples: the public releases' training splits, vlds.recipe.SPLIT_SIZES)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
