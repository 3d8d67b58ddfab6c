"""The pre-training stage (vlds.pretrain, train.stage=pretrain): its objectives against hand-made
cases, the collator's training batches, the config rules, and pretrain -> backbone -> adapter
run end to end through vlds/train.py at toy size."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import byte_tokenizer, tiny_args, train_run
from vlds.config import ConfigError, build_config, validate
from vlds.data.decode import Collator
from vlds.pretrain import caption_objective, span_corruption

REPO = Path(__file__).resolve().parent.parent
WORDS = "a large red circle is left of a small blue square near the top edge".split()  # noqa: SIM905


def mark(k):
    return f"<extra_id_{k}>"


def test_span_corruption_drops_15_percent_in_spans_and_the_pair_rebuilds_the_text():
    for seed in range(20):
        src, tgt = span_corruption(WORDS, random.Random(seed), mark)
        # 15 words: round(15 x 0.15) = 2 dropped, in round(2 / 3) -> 1 span
        s, t = src.split(), tgt.split()
        assert [w for w in s if w.startswith("<")] == [mark(0)]
        assert t[0] == mark(0) and len(t) == 1 + 2
        i = s.index(mark(0))
        assert s[:i] + t[1:] + s[i + 1 :] == WORDS  # the sentinel stands for the dropped words
        assert i >= 1  # T5's layout: the text starts with a kept span
    long = (WORDS * 3)[:40]  # 40 words: 6 dropped in 2 spans
    src, tgt = span_corruption(long, random.Random(1), mark)
    assert src.split().count(mark(0)) == src.split().count(mark(1)) == 1
    assert len(tgt.split()) == 2 + 6
    assert span_corruption(long, random.Random(1), mark) == (src, tgt)  # seeded: reproducible


def test_caption_objective_is_prefix_lm_or_span_corruption_half_each():
    caption = " ".join(WORDS)
    kinds = {"prefix": 0, "span": 0}
    for seed in range(400):
        text, target = caption_objective(caption, random.Random(seed), "caption: ", mark)
        if text.startswith("span: "):
            kinds["span"] += 1
        else:
            kinds["prefix"] += 1
            assert text.startswith("caption:")
            prefix = text[len("caption:") :].strip()
            assert (prefix + " " + target).strip() == caption  # prefix + continuation
    assert 160 < kinds["span"] < 240  # 200 expected
    assert caption_objective("circle", random.Random(0), "caption: ", mark) == (
        "caption:",
        "circle",
    )  # one word: captioned


def test_the_training_collator_turns_captions_into_objectives_and_leaves_qa():
    tok = byte_tokenizer()
    cap = {"task": "caption", "id": "2", "captions": [" ".join(WORDS)]}
    vqa = {"task": "vqa", "id": "1", "question": "what is red?", "answers": ["circle"] * 10}

    def sample(rec, key):
        return {"task": rec["task"], "id": rec["id"], "rec": rec, "key": key,
                "visual": torch.zeros(1, 3, 8, 8)}  # fmt: skip

    plain = Collator(tok, ["vqa", "caption"], 100, 100)
    pre = Collator(tok, ["vqa", "caption"], 100, 100)
    pre.pretrain = True
    caps = [sample(cap, f"k{i}") for i in range(8)]
    a, b = plain(caps, epoch=0), pre(caps, epoch=0)
    assert all(tok.decode(ids, skip_special_tokens=True) == "caption: " for ids in a["input_ids"])
    texts = [tok.decode(ids, skip_special_tokens=True).strip() for ids in b["input_ids"]]
    assert any(t.startswith("span: ") for t in texts)
    assert any(t.startswith("caption: ") for t in texts)  # a prefix of at least one word
    assert torch.equal(pre(caps, epoch=0)["labels"], b["labels"])  # same visit, same draw
    assert not torch.equal(pre(caps, epoch=1)["input_ids"], b["input_ids"])  # next epoch: new
    q = [sample(vqa, "q")]
    assert torch.equal(plain(q)["input_ids"], pre(q)["input_ids"])
    assert torch.equal(plain(q)["labels"], pre(q)["labels"])


@pytest.mark.parametrize(
    "over, needle",
    [
        ({"train.stage": "warmup"}, "train.stage='warmup'; valid: adapt, pretrain"),
        ({"train.stage": "pretrain"}, "set --peft.method=full_finetune"),
        (
            {
                "train.stage": "pretrain",
                "peft.method": "full_finetune",
                "model.vision_train": "adapter",
            },  # fmt: skip
            "cannot hold adapters",
        ),
    ],
)
def test_stage_settings_are_checked_before_any_work(over, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        validate(build_config("tiny", over))


def _train(args):
    p = train_run(args)
    return p.stdout + p.stderr


def test_pretrain_then_adapters_on_the_written_backbone(shapes_root, tmp_path):
    """A pretraining run (the whole LM, the visual embedding and the tower's norms) writes a
    backbone; an adapter run loads all three from it through the real loading code (a
    save_pretrained folder, an open_clip checkpoint file) and starts from those weights."""
    from vlds.model.build import build_tower
    from vlds.model.vision import VisionTower

    pre = tmp_path / "pre"
    flags = ["--train.stage=pretrain", "--peft.method=full_finetune", "--model.vision_train=ln"]
    _train(tiny_args(shapes_root, pre, *flags, "--data.tasks=vqa,caption", "--train.max_steps=4"))
    result = json.loads((pre / "metrics.json").read_text())
    assert result["step"] == 4 and "caption" in result["metrics"]
    back = pre / "backbone"
    meta = json.loads((back / "backbone.json").read_text())
    assert meta["written"] == {
        "lm": "lm/",
        "visual_embed": "lm/visual_embed.safetensors",
        "vision": "vision.pt",
    }
    export = load_file(pre / "adapter" / "adapter_model.safetensors")
    lm = load_file(back / "lm" / "model.safetensors")
    shared = [k for k in lm if f"lm.{k}" in export]
    assert len(shared) >= len(lm) - 1  # every tensor, bar a tied alias
    assert all(torch.equal(lm[k], export[f"lm.{k}"]) for k in shared)
    cfg = build_config("tiny", {"model.vision_pretrained": str(back / "vision.pt")})
    tower = VisionTower(cfg.model.vision, str(back / "vision.pt"), cfg.model.grid_pool)
    for k, v in export.items():
        if k.startswith("tower."):
            assert torch.equal(dict(tower.named_parameters())[k[6:]], v), k
    original = dict(build_tower(build_config("tiny")).named_parameters())
    bn = "visual.layer1.0.bn3.weight"  # trained: the written tower is not the original
    assert not torch.equal(original[bn], dict(tower.named_parameters())[bn])

    run = tmp_path / "adapt"
    b = str(back)
    log = _train(
        tiny_args(
            shapes_root,
            run,
            f"--model.lm={b}/lm",
            f"--model.tokenizer={b}/lm",
            f"--model.vision_pretrained={b}/vision.pt",
            "--train.max_steps=2",
        )
    )
    assert f"loaded the pretrained visual embedding from {b}/lm/visual_embed.safetensors" in log
    assert json.loads((run / "metrics.json").read_text())["step"] == 2
