"""model.vision_train: what of the CLIP tower trains (frozen, full, ln, adapter), on both tiny
towers (a ResNet and a ViT), image and video tasks: the tower's gradients land exactly where
configured, the parameter accounting counts the tower when it trains, and the settings that
cannot train a tower are refused before any work."""

import re

import pytest
import torch
import torch.nn as nn

from tests.helpers import image_batch, tiny
from vlds.config import ConfigError, build_config, validate
from vlds.model.vision import train_tower
from vlds.peft import count_parameters
from vlds.peft.report import report

TOWERS = ["vlds-tiny-rn", "vlds-tiny-vit"]


def build(vision, mode, tasks="vqa,gqa,nlvr,caption", method="single_adapter"):
    over = {"model.vision": vision, "model.vision_train": mode, "data.tasks": tasks}
    return tiny("t5", method, seed=3, **over)


def expected(tower, mode, video):
    """Names (in the tower) of the parameters that should train, written out per mode."""
    names = {n for n, _ in tower.named_parameters()}
    if mode == "frozen":
        return set()
    if mode == "adapter":
        return {n for n in names if n.startswith("adapters.")}
    if mode == "ln":
        norms = (nn.LayerNorm, nn.BatchNorm2d)
        return {
            f"visual.{m}.{p}"
            for m, mod in tower.visual.named_modules()
            if isinstance(mod, norms)
            for p, _ in mod.named_parameters(recurse=False)
        }
    unread = () if video else ("visual.attnpool.", "visual.proj")  # full: what tokens read
    return {n for n in names if not n.startswith(unread)}


def video_batch(tok, tower, b=2, t=3):
    enc = tok(["tvqa: who is it?", "tvqa: where?"][:b], return_tensors="pt", padding=True)
    lab = tok(["a0", "a1"][:b], return_tensors="pt", padding=True)
    size = tower.image_size
    return {
        "input_ids": enc.input_ids,
        "attention_mask": enc.attention_mask,
        "labels": lab.input_ids.masked_fill(lab.attention_mask == 0, -100),
        "frames": torch.randint(0, 256, (b, t, 3, size, size), dtype=torch.uint8),
        "task_ids": torch.zeros(b, dtype=torch.long),
    }


@pytest.mark.parametrize("mode", ["frozen", "full", "ln", "adapter"])
@pytest.mark.parametrize("vision", TOWERS)
@pytest.mark.parametrize("video", [False, True])
def test_the_towers_gradients_land_only_where_configured(vision, mode, video):
    tasks = "tvqa,how2qa" if video else "vqa,gqa,nlvr,caption"
    cfg, tok, tower, model = build(vision, mode, tasks)
    batch = video_batch(tok, tower) if video else image_batch(tok, tower, b=3)
    if not video:  # pixels as the data workers hand them over
        batch["images"] = (batch["images"].clamp(-2, 2) * 60 + 128).to(torch.uint8)
    assert (model.tower is tower) == (mode != "frozen")
    want = expected(tower, mode, video)
    assert {n for n, p in tower.named_parameters() if p.requires_grad} == want
    if mode != "frozen":  # the tower's trainable parameters are the model's (the engine's)
        mine = {n for n, p in model.named_parameters() if p.requires_grad}
        assert {f"tower.{n}" for n in want} <= mine
    with torch.no_grad():  # adapters start at the identity (up = 0: no gradient to down yet)
        for n, p in tower.named_parameters():
            if ".up." in n:
                p.add_(torch.randn_like(p) * 0.05)
    before = {n: p.detach().clone() for n, p in tower.named_parameters()}
    stats = {n: b.clone() for n, b in tower.named_buffers()}
    # from outside, a tower the model holds passes the pixels through; the model reads them
    b = tower.visual_inputs(batch, cfg.model.max_frames)
    assert ("vis_feats" in b) == (mode == "frozen")
    model.train()
    loss = model(b)
    loss.backward()
    for n, p in tower.named_parameters():
        if n in want:  # every trainable tower weight is read and learns
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{n}: no gradient"
        else:
            assert p.grad is None, f"frozen {n} got a gradient"
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    for n, p in tower.named_parameters():
        assert torch.equal(p, before[n]) != (n in want), n
    for n, buf in tower.named_buffers():  # BatchNorm statistics stay fixed in every mode
        assert torch.equal(buf, stats[n]), n


@pytest.mark.parametrize("vision", TOWERS)
def test_adapters_in_the_tower_start_as_the_identity(vision):
    *_, frozen_tower, frozen = build(vision, "frozen")
    cfg, tok, tower, model = build(vision, "adapter")
    assert frozen.tower is None  # frozen: the tower stays outside the model
    batch = image_batch(tok, tower, b=2)
    with torch.no_grad():  # the same random tower (train.seed), the up-projections at zero
        a = frozen_tower.visual_inputs(batch, cfg.model.max_frames)["vis_feats"]
        b = tower._visual_inputs(batch, cfg.model.max_frames)["vis_feats"]
    assert a.abs().sum() > 0 and torch.equal(a, b)
    # and the sites: every ViT block's attention and MLP, every ResNet bottleneck
    keys, r = sorted(tower.adapters.keys()), cfg.peft.reduction_factor
    if tower.is_resnet:
        assert keys == ["layer1-0", "layer2-0", "layer3-0", "layer4-0"]
        assert tower.adapters["layer4-0"].adapter.down.weight.shape == (256 // r, 256)
    else:
        assert keys == ["block0-attn", "block0-mlp", "block1-attn", "block1-mlp"]
        assert tower.adapters["block0-mlp"].adapter.down.weight.shape == (64 // r, 64)


def test_accounting_counts_the_tower_when_it_trains():
    """Tiny ResNet tower, image tasks, the tiny preset's r = 2: adapters at its 4 bottleneck
    outputs (channels 32, 64, 128, 256), each Linear(c -> c/2) + Linear(c/2 -> c) with biases."""
    counts = {m: count_parameters(build("vlds-tiny-rn", m)[3]) for m in ("frozen", "adapter")}
    cfg, _, tower, _ = build("vlds-tiny-rn", "frozen")
    assert cfg.peft.reduction_factor == 2
    tower_all = sum(p.numel() for p in tower.parameters())
    adapters = sum(2 * c * c // 2 + c // 2 + c for c in (32, 64, 128, 256))
    assert adapters == 1_072 + 4_192 + 16_576 + 65_920 == 87_760
    assert counts["adapter"]["trainable"] == counts["frozen"]["trainable"] + adapters
    assert counts["adapter"]["total"] == counts["frozen"]["total"] + tower_all + adapters
    full = count_parameters(build("vlds-tiny-rn", "full")[3])
    attnpool = sum(p.numel() for p in tower.visual.attnpool.parameters())
    assert full["trainable"] == counts["frozen"]["trainable"] + tower_all - attnpool


def test_the_report_counts_a_training_tower_at_bart_base_size():
    """bart-base single_adapter (6,081,600 of 145,606,464, test_peft_methods) with adapters in
    the tiny ResNet tower at r = 8: Linear(c -> c/8) + Linear(c/8 -> c) with biases at its 4
    bottlenecks (c = 32, 64, 128, 256): 292 + 1,096 + 4,240 + 16,672 = 22,300 more trained;
    the whole tower (and those) more in all."""
    tasks = ["vqa", "gqa", "nlvr", "caption"]
    r = report("bart-base", "single_adapter", tasks, vision="vlds-tiny-rn", vision_train="adapter")
    *_, tower, _ = build("vlds-tiny-rn", "frozen")
    tower_all = sum(p.numel() for p in tower.parameters())
    assert r["trainable"] == 6_081_600 + 22_300
    assert r["total"] == 145_606_464 + tower_all + 22_300


@pytest.mark.parametrize(
    "over, needle",
    [
        ({"model.vision_train": "half"}, "model.vision_train='half'; valid: frozen, full, ln"),
        (
            {"model.vision_train": "full", "data.features": "true"},
            "data.features=true reads cached features",
        ),
        ({"model.vision_train": "ln", "data.blind": "true"}, "set --model.vision_train=frozen"),
    ],
)
def test_settings_that_cannot_train_a_tower_fail_before_any_work(over, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        validate(build_config("tiny", over))


def test_a_bottleneck_that_does_not_divide_the_towers_width_is_refused():
    *_, tower, _ = build("vlds-tiny-vit", "frozen")
    needle = "reduction_factor=3 does not divide the tower's width 64"
    with pytest.raises(ConfigError, match=needle):
        train_tower(tower, "adapter", 3, video=False)
