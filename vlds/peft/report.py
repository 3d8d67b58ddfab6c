"""Parameter accounting from the architecture alone (random init on the meta device, no
download): how many parameters a method trains and what share of the VL model that is.

    python -m vlds.peft.report --backbone bart-base --method single_adapter \
        --tasks vqa,gqa,nlvr,caption
    python -m vlds.peft.report --backbone t5-base --method single_lora --feat-dim 512
    python -m vlds.peft.report --backbone bart-base --method single_adapter+multiple_prompts
    python -m vlds.peft.report --backbone bart-base --all        # a table of every method
    python -m vlds.peft.report --backbone bart-base --vision RN101 --vision-train adapter

"% updated" = trainable / all parameters of the VL model: language model + visual embedding +
added modules; CLIP excluded, tied weights counted once, buffers not counted. A CLIP tower that
trains (--vision-train full|ln|adapter: model.vision_train) is part of the model and counted,
all of it in the total; it is built with random weights on the CPU (seconds for RN101).
"""

from __future__ import annotations

import argparse
import json

import torch

from vlds.config import PeftConfig
from vlds.model.vision import VISION_TRAIN
from vlds.peft.inject import apply_peft, count_parameters
from vlds.peft.registry import METHODS, method_class

# The published configurations of the two backbones (config.json of the hub models), the
# length of their tokenizers and the tokens the reference adds (vlds' presets: model.extra_tokens).
BACKBONES = {
    "t5-base": dict(arch="t5", vocab_size=32128, d_model=768, d_ff=3072, num_layers=12,
                    num_heads=12, d_kv=64, tokenizer_len=32100, extra_tokens=100),
    "bart-base": dict(arch="bart", vocab_size=50265, d_model=768, encoder_layers=6,
                      decoder_layers=6, encoder_attention_heads=12, decoder_attention_heads=12,
                      encoder_ffn_dim=3072, decoder_ffn_dim=3072, tokenizer_len=50265,
                      extra_tokens=200),
}  # fmt: skip

# Paper (VL-Adapter, Table 1 and the video table): bart-base, r = 8, 4 tasks.
PAPER_PERCENT = {
    ("image", "single_adapter"): 4.18, ("image", "multiple_adapters"): 12.22,
    ("image", "half_shared_adapter"): 8.36, ("image", "hyperformer"): 5.79,
    ("image", "single_compacter"): 2.70, ("image", "single_lora"): 5.93,
    ("image", "multiple_lora"): 17.72, ("image", "single_prompt"): 2.00,
    ("video", "single_adapter"): 3.39, ("video", "single_lora"): 5.17,
}  # fmt: skip
# the paper's analysis of adapters with prompts: rows of the --all table after the methods
COMPOSITIONS = ("single_adapter+single_prompt", "single_adapter+multiple_prompts")


def build_lm(backbone: str, extra_tokens: int | None = None):
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        T5Config,
        T5ForConditionalGeneration,
    )

    spec = dict(BACKBONES[backbone])
    arch = spec.pop("arch")
    extra = spec.pop("extra_tokens") if extra_tokens is None else extra_tokens
    spec.pop("extra_tokens", None)
    # the embedding grows to tokenizer + added tokens when that is larger (vlds.model.build):
    # t5-base's 32,128 rows become the reference's 32,200 with its 100 <vis_extra_id_k>
    spec["vocab_size"] = max(spec["vocab_size"], spec.pop("tokenizer_len") + extra)
    with torch.device("meta"):
        if arch == "t5":
            return arch, T5ForConditionalGeneration(T5Config(**spec))
        return arch, BartForConditionalGeneration(BartConfig(**spec))


def report(
    backbone: str,
    method: str,
    tasks: list[str],
    feat_dim: int = 2048,
    reduction_factor: int = 8,
    extra_tokens: int | None = None,
    vision: str = "RN101",
    vision_train: str = "frozen",
    **peft,
) -> dict:
    from vlds.model.vl import VLModel

    arch, lm = build_lm(backbone, extra_tokens)
    with torch.device("meta"):
        model = VLModel(lm, arch, feat_dim)
        apply_peft(
            model, PeftConfig(method=method, reduction_factor=reduction_factor, **peft), tasks
        )
    if vision_train != "frozen":  # open_clip cannot build on the meta device
        from vlds.data.tasks import VIDEO_TASKS
        from vlds.model.vision import VisionTower, train_tower

        tower = VisionTower(vision)
        train_tower(tower, vision_train, reduction_factor, video=tasks[0] in VIDEO_TASKS)
        model.attach_tower(tower, 0)
    return count_parameters(model)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", choices=sorted(BACKBONES), default="bart-base")
    p.add_argument(
        "--method",
        default="single_adapter",
        help=f"one of {', '.join(sorted(METHODS))}, or METHOD+PROMPTS "
        "(e.g. single_adapter+multiple_prompts)",
    )
    p.add_argument("--tasks", default="vqa,gqa,nlvr,caption")
    p.add_argument("--feat-dim", type=int, default=2048, help="2048: CLIP RN101 grid; 512: video")
    p.add_argument("--reduction-factor", type=int, default=8)
    p.add_argument(
        "--extra-tokens",
        type=int,
        default=None,
        help="tokens added to the vocabulary (default: 200 for bart-base, 100 for t5-base)",
    )
    p.add_argument("--all", action="store_true", help="a table of every method")
    p.add_argument("--vision", default="RN101", help="the CLIP tower (open_clip name)")
    p.add_argument(
        "--vision-train",
        default="frozen",
        choices=VISION_TRAIN,
        help="what of the tower trains (model.vision_train); frozen: not counted",
    )
    a = p.parse_args(argv)
    try:
        method_class(a.method)
    except ValueError as e:  # ConfigError
        p.error(str(e))
    tasks = [t for t in a.tasks.split(",") if t]
    kw = dict(
        feat_dim=a.feat_dim,
        reduction_factor=a.reduction_factor,
        extra_tokens=a.extra_tokens,
        vision=a.vision,
        vision_train=a.vision_train,
    )
    if not a.all:
        print(json.dumps(report(a.backbone, a.method, tasks, **kw)))
        return
    kind = "video" if a.feat_dim == 512 else "image"
    print(f"{'method':32s} {'trainable':>12s} {'total':>13s} {'% updated':>10s} {'paper':>6s}")
    for m in (*METHODS, *COMPOSITIONS):
        r = report(a.backbone, m, tasks, **kw)
        paper = PAPER_PERCENT.get((kind, m)) if a.backbone == "bart-base" else None
        print(f"{m:32s} {r['trainable']:12,d} {r['total']:13,d} {r['percent']:10.2f} "
              f"{paper if paper is not None else '':>6}")  # fmt: skip


if __name__ == "__main__":
    main()
