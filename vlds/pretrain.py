"""The V&L pre-training stage (`train.stage=pretrain`): VL-T5-style objectives through the same
trainer, engine, shards, checkpoints, resume and logs as adapter training, and a backbone
written at the end that later runs load like any other.

    python vlds/train.py --train.stage=pretrain --peft.method=full_finetune \\
        --data.tasks=vqa,gqa,caption --train.out_dir=runs/pretrain
    python vlds/train.py --model.lm=runs/pretrain/backbone/lm \\
        --model.tokenizer=runs/pretrain/backbone/lm        # adapters on the pretrained backbone

The objectives, on the image-text shards (VL-T5, Cho et al. 2021, trains its backbone on COCO
and VG captions and VQA / GQA / VG-QA pairs):
- captions, each training visit drawing one of two (seeded by the sample and the epoch, so a
  resumed run draws the same): *prefix language modelling*, "caption: " + the caption's first
  k words -> the rest (k = 0 is captioning itself), and *span corruption* as T5's: about 15 %
  of the words in spans of about 3, each replaced by a sentinel ("span: a <extra_id_0> circle
  left of ..." -> "<extra_id_0> red <extra_id_1> ..."; the tokenizer's <extra_id_k> when it
  has them, else "<k>");
- question answering and NLVR2 statements as their tasks' own pairs ("vqa: question" ->
  answer);
- video tasks train on their own pairs too.
Evaluation scores the tasks as adapter training does (captions by generation from
"caption: "), so the curves show what the pretrained backbone can do.

The whole backbone trains: `peft.method=full_finetune` (the language model and the visual
embedding), and the tower too with model.vision_train=full or ln. At the end rank 0 writes
`train.out_dir/backbone/` from the run's adapter export (whole tensors, also under ZeRO-3):
    lm/                  save_pretrained of the language model + the tokenizer, and
                         visual_embed.safetensors (build_model loads it with --model.lm=DIR)
    vision.pt            when the tower trained: an open_clip checkpoint for
                         --model.vision_pretrained=FILE (with --model.vision unchanged)
    backbone.json        what was written and from which run
Adapters inside the tower (vision_train=adapter) have no place in an open_clip checkpoint and
are refused with this stage. Written by hand: no library pairs these objectives with a
DeepSpeed trainer over WebDataset shards; the span corruption follows T5's
random_spans_noise_mask (transformers has no standalone function for it).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

from vlds.config import ConfigError, config_check

log = logging.getLogger("vlds")

STAGES = ("adapt", "pretrain")
NOISE_DENSITY, MEAN_SPAN = 0.15, 3.0
BACKBONE = "backbone"
VISUAL_EMBED = "visual_embed.safetensors"


@config_check
def check_stage(cfg) -> None:
    """train.stage is known; the pretraining stage trains the whole backbone."""
    stage = cfg.train.stage
    if stage not in STAGES:
        raise ConfigError(f"train.stage={stage!r}; valid: {', '.join(STAGES)}")
    if stage != "pretrain":
        return
    if cfg.peft.method != "full_finetune":
        raise ConfigError(
            f"train.stage=pretrain trains the whole backbone, but peft.method="
            f"{cfg.peft.method}; set --peft.method=full_finetune (adapters come after, on the "
            f"backbone it writes)"
        )
    if cfg.model.vision_train == "adapter":
        raise ConfigError(
            "train.stage=pretrain writes the tower as plain open_clip weights, which cannot "
            "hold adapters; use --model.vision_train=full, ln or frozen"
        )


def _split(total: int, parts: int, rng: random.Random) -> list[int]:
    """`total` as `parts` positive integers, uniformly among the compositions."""
    cuts = sorted(rng.sample(range(1, total), parts - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]


def sentinel(tokenizer, k: int) -> str:
    """The k-th span sentinel: the tokenizer's <extra_id_k> when it has one, else "<k>"."""
    tok = f"<extra_id_{k}>"
    ids = tokenizer.convert_tokens_to_ids([tok])
    return tok if ids and ids[0] != tokenizer.unk_token_id else f"<{k}>"


def span_corruption(words: list[str], rng: random.Random, mark) -> tuple[str, str]:
    """T5's span corruption of a word sequence: (input with one sentinel per dropped span,
    target of each sentinel followed by its words). `mark(k)` is the k-th sentinel."""
    n = len(words)
    noise = min(n - 1, max(1, round(n * NOISE_DENSITY)))
    spans = max(1, min(noise, n - noise, round(noise / MEAN_SPAN)))
    noise_lens = _split(noise, spans, rng)
    keep_lens = _split(n - noise + 1, spans + 1, rng)  # a kept run before each span and after
    keep_lens[-1] -= 1  # the last (after the last span) may be empty
    src, tgt, i = [], [], 0
    for k, (keep, drop) in enumerate(zip(keep_lens, noise_lens, strict=False)):
        src += words[i : i + keep] + [mark(k)]
        tgt += [mark(k)] + words[i + keep : i + keep + drop]
        i += keep + drop
    return " ".join(src + words[i:]), " ".join(tgt)


def caption_objective(caption: str, rng: random.Random, prompt: str, mark) -> tuple[str, str]:
    """(encoder text, target) for one visit of a caption: prefix LM or span corruption, one
    half each (a caption of one word is always captioned)."""
    words = caption.split()
    if len(words) < 2 or rng.random() < 0.5:
        k = rng.randrange(len(words)) if words else 0
        return (prompt + " ".join(words[:k])).rstrip(), " ".join(words[k:])
    src, tgt = span_corruption(words, rng, mark)
    return "span: " + src, tgt


def write_backbone(cfg, run_dir: Path, tokenizer, data_root: Path | None) -> Path:
    """`run_dir/backbone/` from the run's adapter export (see the module docstring)."""
    from safetensors.torch import save_file

    from vlds.checkpoint import read_adapter
    from vlds.model.build import build_lm, build_tower, lm_weights, vocab_of
    from vlds.model.embedded_lm import save_lm_dir

    _, tensors, _ = read_adapter(run_dir)

    def under(prefix: str) -> dict:  # the export's tensors of one submodule, by their names there
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    out = Path(run_dir) / BACKBONE
    tmp = out.with_name(f"{BACKBONE}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lm = build_lm(cfg, *vocab_of(tokenizer), path=lm_weights(cfg, tokenizer, data_root))
    part = under("lm.")
    missing, unexpected = lm.load_state_dict(part, strict=False)
    # the export names a tied tensor once (named_parameters): its other names share its storage
    state = lm.state_dict()
    loaded = {state[k].data_ptr() for k in part}
    untied = [k for k in missing if state[k].data_ptr() not in loaded]
    if unexpected or untied:
        raise RuntimeError(
            f"the export does not match the language model: missing {untied[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    save_lm_dir(lm, tokenizer, tmp / "lm")
    embed = under("visual_embed.")
    save_file({k: v.contiguous() for k, v in embed.items()}, tmp / "lm" / VISUAL_EMBED)
    written = {"lm": "lm/", "visual_embed": f"lm/{VISUAL_EMBED}"}
    tower_part = under("tower.")
    if tower_part:
        written["vision"] = "vision.pt"
        _save_tower(cfg, build_tower(cfg), tower_part, tmp / "vision.pt")
    meta = {"run": str(run_dir), "model": vars(cfg.model), "written": written}
    (tmp / "backbone.json").write_text(json.dumps(meta, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("wrote the pretrained backbone to %s (--model.lm=%s)", out, out / "lm")
    return out


def _save_tower(cfg, tower, trained: dict, path: Path) -> None:
    """The tower with its trained weights as an open_clip checkpoint of the whole CLIP model
    (the text tower as the original: open_clip loads checkpoints strictly), with the feature
    statistics the original carried (vlds.model.vision standardises with them)."""
    import open_clip
    import torch

    from vlds.model.build import tower_weights

    missing = set(trained) - {n for n, _ in tower.named_parameters()}
    if missing:
        raise RuntimeError(f"tower tensors the tower lacks: {sorted(missing)[:5]}")
    state = tower.state_dict()
    state.update(trained)
    tower.load_state_dict(state)
    weights = tower_weights(cfg)
    clip = open_clip.create_model(cfg.model.vision, pretrained=weights or None)
    clip.visual.load_state_dict(tower.visual.state_dict())
    stats = {
        k: getattr(tower, k)
        for k in ("grid_mean", "grid_std", "pooled_mean", "pooled_std")
        if getattr(tower, k) is not None
    }
    torch.save({"state_dict": clip.state_dict(), "feature_stats": stats}, path)
