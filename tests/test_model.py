import random

import pytest
import torch
import torchvision.transforms.functional as TF

from tests.helpers import byte_tokenizer, image_batch, tiny
from vlds.data.synthetic import random_scene, render_scene
from vlds.data.tasks import get_task
from vlds.model.build import build_lm, vocab_of
from vlds.model.vision import (
    CLIP_MEAN,
    CLIP_STD,
    VisionTower,
    grid_boxes,
    resample_frames,
    time_boxes,
)


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_shapes_through_the_model(arch):
    cfg, tok, tower, model = tiny(arch)
    g = cfg.model.grid_pool
    b = image_batch(tok, tower, b=3, n_img=1)
    assert b["vis_feats"].shape == (3, g * g, tower.grid_dim)
    embeds, mask = model.encoder_inputs(b)
    assert embeds.shape == (3, b["input_ids"].shape[1] + g * g, cfg.model.d_model)
    assert mask.shape == embeds.shape[:2]
    loss = model(b)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # NLVR2: two images -> twice the visual tokens, image-order ids 0 then 1
    b2 = image_batch(tok, tower, b=2, n_img=2)
    assert b2["vis_feats"].shape == (2, 2 * g * g, tower.grid_dim)
    assert b2["vis_order"][0].tolist() == [0] * g * g + [1] * g * g
    assert torch.isfinite(model(b2))
    greedy = model.generate(b, num_beams=1, max_new_tokens=5)
    beam = model.generate(b, num_beams=3, max_new_tokens=5)
    assert greedy.shape[0] == 3 and beam.shape[0] == 3
    choices = [torch.tensor(tok("true").input_ids), torch.tensor(tok("false").input_ids)]
    assert model.score_choices(b, choices).shape == (3, 2)  # logits at the first position
    scores = model.score_choices(b, choices, "sequence")
    assert scores.shape == (3, 2) and (scores < 0).all()  # summed log-probabilities


@pytest.mark.parametrize(("arch", "method"), [("t5", "multiple_adapters"), ("bart", "single_lora")])
def test_ranked_choices_score_their_summed_log_probabilities(arch, method):
    # eval.choice_predict=rank: each sample's candidates (of several lengths) scored in one
    # decoder pass equal each candidate's teacher-forced cross-entropy summed by hand; a mixed
    # batch of tasks routes every repeated row to its own task's adapter
    from vlds.eval.loop import choice_labels

    cfg, tok, tower, model = tiny(arch, method, **{"data.choice_target": "text"})
    model.eval()
    b = image_batch(tok, tower, b=3, task_ids=torch.tensor([0, 1, 0]))
    choices = [["red", "blue circle", "a0"], ["square", "x", "two squares"], ["true", "no"]]
    tags, _ = choice_labels(choices, tok, tiny(arch)[0], get_task("tvqa"))  # the reference's
    assert [tok.decode(t[t >= 0], skip_special_tokens=True) for t in tags[2]] == ["a0", "a1", ""]
    labels, valid = choice_labels(choices, tok, cfg, get_task("tvqa"))
    assert labels.shape[:2] == valid.shape == (3, 3)
    assert valid.tolist() == [[True] * 3, [True] * 3, [True, True, False]]
    got = model.score_targets(b, labels)
    for i, sample in enumerate(choices):
        for j, text in enumerate(sample):
            one = {k: v[i : i + 1] for k, v in b.items() if torch.is_tensor(v) and v.shape[0] == 3}
            target = torch.tensor([tok(text).input_ids])  # its tokens and </s>
            model._route(one)
            embeds, mask = model.encoder_inputs(one)
            logits = model.lm(inputs_embeds=embeds, attention_mask=mask, labels=target).logits
            hand = logits.float().log_softmax(-1)[0].gather(1, target[0][:, None]).sum()
            torch.testing.assert_close(got[i, j].item(), hand.item(), rtol=1e-5, atol=1e-4)


def test_the_evaluation_loop_predicts_the_best_ranked_choice():
    from tests.test_grounding import PassThrough
    from vlds.eval.loop import choice_labels, evaluate_tasks

    over = {"data.choice_target": "text", "eval.choice_predict": "rank"}
    cfg, tok, tower, model = tiny("t5", **over, **{"eval.shuffled_images": "false"})
    b = image_batch(tok, tower, b=3)
    choices = [["red", "blue circle", "a0"], ["square", "x", "two squares"], ["true", "no"]]
    labels, valid = choice_labels(choices, tok, cfg, get_task("tvqa"))
    scores = model.eval().score_targets(b, labels)
    best = scores.masked_fill(~valid, float("-inf")).argmax(dim=1).tolist()  # the last: of 2
    refs = [["a0"], ["a1"], ["a1"]]
    batch = {**b, "ids": ["0", "1", "2"], "refs": refs, "choices": choices}
    metrics, preds = evaluate_tasks(model, PassThrough(), {"tvqa": [batch]}, tok, cfg, "cpu")
    assert [p["prediction"] for p in preds["tvqa"]] == [f"a{k}" for k in best]
    hits = sum(f"a{k}" == r[0] for k, r in zip(best, refs, strict=True))
    assert metrics["tvqa"]["score"] == pytest.approx(100 * hits / 3)


def test_video_frames_become_frame_tokens():
    cfg, tok, tower, model = tiny("t5")
    frames = torch.randn(2, 5, 3, tower.image_size, tower.image_size)
    batch = {"frames": frames}
    b = tower.visual_inputs(batch, max_frames=8)
    assert b["vis_feats"].shape == (2, 8, tower.pooled_dim)
    assert b["vis_mask"].tolist() == [[1] * 5 + [0] * 3] * 2
    assert torch.equal(b["vis_feats"][:, 5:], torch.zeros(2, 3, tower.pooled_dim))
    # frame embeddings are the tower's pooled output of each frame
    one = tower.visual(frames[1, 2:3])
    torch.testing.assert_close(b["vis_feats"][1, 2], one[0])


def test_resample_frames_max_pools_longer_clips():
    x = torch.arange(8.0).view(1, 8, 1)  # frames 0..7
    y, mask = resample_frames(x, 4)
    assert y.view(-1).tolist() == [1.0, 3.0, 5.0, 7.0] and mask.tolist() == [[1, 1, 1, 1]]


def test_boxes_are_hand_computed():
    b = grid_boxes(2)
    assert b.tolist() == [
        [0, 0, 0.5, 0.5, 0.25],
        [0.5, 0, 1, 0.5, 0.25],
        [0, 0.5, 0.5, 1, 0.25],
        [0.5, 0.5, 1, 1, 0.25],
    ]
    assert time_boxes(2).tolist() == [[0, 0, 0.5, 1, 0.5], [0.5, 0, 1, 1, 0.5]]


def test_resnet_grid_is_layer4_adaptively_max_pooled():
    tower = VisionTower("vlds-tiny-rn", "", grid_pool=2)
    x = torch.randn(2, 3, 96, 96)
    v = tower.visual
    grid = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))  # (2, C, 3, 3)
    tokens, boxes = tower.grid_tokens(x)
    assert tokens.shape == (2, 4, grid.shape[1]) and boxes.shape == (4, 5)
    # top-left pooled cell covers grid rows/cols 0..1 (adaptive pooling of 3 -> 2)
    torch.testing.assert_close(tokens[:, 0], grid[:, :, :2, :2].amax(dim=(2, 3)))


def test_vit_tower_gives_patch_tokens():
    tower = VisionTower("vlds-tiny-vit", "")
    tokens, boxes = tower.grid_tokens(torch.randn(2, 3, 96, 96))
    assert tokens.shape == (2, 9, tower.grid_dim) and boxes.shape == (9, 5)  # (96/32)^2 patches


def test_a_random_resnet_tower_sees_the_image():
    """open_clip's own init, frozen, gives ~1e-4 features that hardly change with the image
    (the visual embedding's bias would swamp them); the He re-init gives image-dependent ones."""
    import open_clip

    from vlds.model.vision import register_embedded_configs

    register_embedded_configs()
    rng = random.Random(0)
    scenes = [render_scene(random_scene(rng), 96) for _ in range(16)]
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    x = torch.stack([(TF.to_tensor(im) - mean) / std for im in scenes])
    torch.manual_seed(0)
    raw = open_clip.create_model("vlds-tiny-rn").visual.eval()
    raw_grid = raw.layer4(raw.layer3(raw.layer2(raw.layer1(raw.stem(x)))))
    assert raw_grid.std(0).mean() < 1e-2  # the degenerate case this guards against
    tower = VisionTower("vlds-tiny-rn", "", grid_pool=3)
    tokens, _ = tower.grid_tokens(x)
    assert tokens.std(0).mean() > 0.1 and tokens.abs().mean() > 0.3  # of order 1, like CLIP's
    assert tower.frame_embeddings(x[:, None]).std(0).mean() > 0.1  # pooled: video tokens too


def test_tower_is_frozen_and_stays_in_eval_mode():
    tower = VisionTower("vlds-tiny-rn", "")
    tower.train()
    assert not tower.training and not any(p.requires_grad for p in tower.parameters())


def test_visual_inputs_keep_the_graph_only_when_asked():
    """Training and evaluation get no graph through the tower, even one made trainable; the
    backbone pretraining (grad=True) gets gradients on the tower's weights."""
    tower = VisionTower("vlds-tiny-rn", "", grid_pool=2)
    tower.requires_grad_(True)
    batch = {"images": torch.randn(2, 1, 3, 96, 96)}
    assert not tower.visual_inputs(batch, 8)["vis_feats"].requires_grad
    tower.visual_inputs(batch, 8, grad=True)["vis_feats"].sum().backward()
    for first_and_last in (tower.visual.conv1.weight, tower.visual.layer4[-1].bn3.weight):
        assert first_and_last.grad is not None and first_and_last.grad.abs().sum() > 0


def test_vision_weights_load_from_a_local_checkpoint(tmp_path):
    torch.manual_seed(1)
    a = VisionTower("vlds-tiny-rn", "")
    import open_clip

    from vlds.model.vision import register_embedded_configs

    register_embedded_configs()
    full = open_clip.create_model("vlds-tiny-rn")  # the whole CLIP layout open_clip loads
    full.visual.load_state_dict(a.visual.state_dict())
    torch.save(full.state_dict(), tmp_path / "clip.pt")
    torch.manual_seed(2)  # a different random init, overwritten by the file
    b = VisionTower("vlds-tiny-rn", str(tmp_path / "clip.pt"))
    x = torch.randn(1, 3, 96, 96)
    torch.testing.assert_close(a.grid_tokens(x)[0], b.grid_tokens(x)[0])


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_language_model_loads_from_a_local_directory(tmp_path, arch):
    """The real loading path (hub name or directory), exercised offline via save_pretrained."""
    cfg, tok, _, _ = tiny(arch)
    lm = build_lm(cfg, *vocab_of(tok)).eval()  # no PEFT hooks: the plain backbone
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    cfg2, *_ = tiny(arch)
    cfg2.model.lm = str(tmp_path / "lm")
    cfg2.model.tokenizer = ""
    from vlds.model.build import build_tokenizer

    tok2 = build_tokenizer(cfg2)
    assert tok2("vqa: hi").input_ids == tok("vqa: hi").input_ids
    lm2 = build_lm(cfg2, *vocab_of(tok2)).eval()
    ids = torch.tensor([tok("caption: a red circle").input_ids])
    dec = torch.tensor([[0, 5, 6]])
    torch.testing.assert_close(
        lm(input_ids=ids, decoder_input_ids=dec).logits,
        lm2(input_ids=ids, decoder_input_ids=dec).logits,
    )


def test_arch_mismatch_with_a_pretrained_model_is_explained(tmp_path):
    cfg, tok, tower, model = tiny("t5")
    model.lm.save_pretrained(tmp_path / "lm")
    cfg.model.lm, cfg.model.arch = str(tmp_path / "lm"), "bart"
    from vlds.config import ConfigError

    with pytest.raises(ConfigError, match="is a t5 model but model.arch='bart'"):
        build_lm(cfg, *vocab_of(byte_tokenizer()))
