"""The reference's data recipe: squashed images, soft-score VQA targets with weighted losses, the
caption token mean, and each task's token limits (VL-T5/src/*_clip_data.py, *_model.py).

    pytest tests/test_reference_data.py
"""

from __future__ import annotations

import io
import json

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from tests.helpers import byte_tokenizer, image_batch, tiny
from vlds.config import ConfigError, build_config, validate
from vlds.data.build import check_features
from vlds.data.decode import Collator, Preprocess, _LazyRandom
from vlds.data.prep.extract import main as extract_main
from vlds.data.shardio import DataError, load_index
from vlds.data.synthetic import SyntheticSpec, write_task_split
from vlds.data.tasks import draw_soft_answer, majority_answer, tag_of_text, vqa_soft_scores
from vlds.model.vision import CLIP_MEAN, CLIP_STD, normalise_pixels, pixel_scale_shift

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


# ---- images: squash (the reference's Resize((224, 224))) vs crop ----------------------------


def banded(w: int, h: int, band: int) -> Image.Image:
    """Green, with a red band of `band` columns on the left and a blue one on the right."""
    img = Image.new("RGB", (w, h), GREEN)
    img.paste(RED, (0, 0, band, h))
    img.paste(BLUE, (w - band, 0, w, h))
    return img


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def pixels(x: torch.Tensor) -> torch.Tensor:
    """Preprocess's uint8 (3, S, S) -> float 0..255 RGB (differences may go negative)."""
    assert x.dtype == torch.uint8
    return x.float()


def test_squash_keeps_the_sides_a_crop_cuts_off():
    # 80 x 48 (5:3): the crop keeps the centre 48 x 48 (columns 16..63), so the 8-column bands
    # are gone, 8 columns beyond the bicubic support (2 px x scale 2) from the crop's edge
    data = encode(banded(80, 48, 8), "PNG")
    squash = pixels(Preprocess(24).image(data))
    crop = pixels(Preprocess(24, resize="crop").image(data))
    assert squash.shape == crop.shape == (3, 24, 24)
    # squash: the whole width in 24 columns, bands 2.4 columns wide: column 0 red, 23 blue
    assert squash[0, :, 0].min() > 200 and squash[1, :, 0].max() < 60
    assert squash[2, :, 23].min() > 200 and squash[1, :, 23].max() < 60
    # crop: no red or blue anywhere, all green
    assert crop[0].abs().max() < 2 and crop[2].abs().max() < 2 and crop[1].min() > 253
    # squash is the reference's transform: torchvision Resize((24, 24)), bicubic, on the PIL image
    ref = TF.resize(banded(80, 48, 8), [24, 24], interpolation=TF.InterpolationMode.BICUBIC)
    ours = Preprocess(24).image(data)
    assert torch.equal(ours, TF.pil_to_tensor(ref))  # the same uint8 pixels
    # and the tower's normalisation is the reference's Normalize
    normalised = normalise_pixels(ours, *pixel_scale_shift())
    want = TF.normalize(TF.to_tensor(ref), CLIP_MEAN, CLIP_STD)
    assert torch.allclose(normalised, want, atol=1e-5)


@pytest.mark.parametrize("resize", ["squash", "crop"])
def test_jpeg_draft_mode_keeps_both_sides_at_least_the_size(resize):
    # 800 x 200: draft may scale by 1/2 only (200 / 2 = 100 >= 96); 1/4 would make 50 rows
    img = banded(800, 200, 80)
    data = encode(img, "JPEG")
    draft, full = (Preprocess(96, draft=d, resize=resize).image(data) for d in (True, False))
    assert draft.shape == full.shape == (3, 96, 96)
    # the DCT downscale then bicubic vs bicubic alone: the same picture within a few levels
    assert (pixels(draft) - pixels(full)).abs().mean() < 3
    if resize == "squash":  # the bands survive in the draft path too
        assert pixels(draft)[0, :, 0].min() > 200 and pixels(draft)[2, :, 95].min() > 200


def test_preprocess_refuses_an_unknown_resize_mode():
    with pytest.raises(DataError, match="data.image_resize='pad'; valid: squash, crop"):
        Preprocess(24, resize="pad")


# ---- cached features record the resize mode ------------------------------------------------


@pytest.fixture(scope="module")
def feature_roots(tmp_path_factory):
    """One VQA split as pixels, extracted with the default (squash) and with --resize crop."""
    pixels_root = tmp_path_factory.mktemp("pixels")
    write_task_split(pixels_root, "vqa", "val", 6, SyntheticSpec(samples_per_shard=8))
    roots = {}
    for mode in ("squash", "crop"):
        out = tmp_path_factory.mktemp(mode)
        argv = ["--shards", pixels_root, "--tasks", "vqa", "--splits", "val", "--out", out]
        argv += ["--vision", "vlds-tiny-rn", "--vision-pretrained", "", "--grid-pool", 3]
        argv += ["--workers", 0, "--quiet"] + ([] if mode == "squash" else ["--resize", "crop"])
        extract_main([str(a) for a in argv])
        roots[mode] = out
    return roots


def check(root, **overrides):
    base = {"data.root": str(root), "data.tasks": "vqa", "model.vision_pretrained": ""}
    check_features(
        build_config("tiny", {**base, **overrides}), {"vqa": load_index(root, "vqa", "val")}
    )


def test_extracted_index_records_the_resize_mode_and_training_checks_it(feature_roots):
    for mode, root in feature_roots.items():
        index = json.loads((root / "vqa" / "val.index.json").read_text())
        assert index["features"]["resize"] == mode
    check(feature_roots["squash"])  # the default on both sides
    check(feature_roots["crop"], **{"data.image_resize": "crop"})
    with pytest.raises(
        DataError, match="resized with 'crop'.*--data.image_resize=crop.*--resize squash"
    ):
        check(feature_roots["crop"])
    with pytest.raises(DataError, match="resized with 'squash'.*--data.image_resize=squash"):
        check(feature_roots["squash"], **{"data.image_resize": "crop"})


def test_an_index_from_before_the_mode_was_recorded_was_cropped(feature_roots, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(feature_roots["crop"], old)
    path = old / "vqa" / "val.index.json"
    index = json.loads(path.read_text())
    del index["features"]["resize"]
    path.write_text(json.dumps(index))
    check(old, **{"data.image_resize": "crop"})
    with pytest.raises(DataError, match="resized with 'crop'"):
        check(old)


# ---- VQA soft-score targets ----------------------------------------------------------------

# normalised: yes x5 ("Yes." too) -> 1.0; "two", "two", "2" -> "2" x3 -> 0.9; "the dog" ->
# "dog" x1 -> 0.3; "a" -> "" (dropped)
ANSWERS = ["yes", "yes", "yes", "Yes.", "yes", "two", "two", "2", "the dog", "a"]
SCORES = {"yes": 1.0, "2": 0.9, "dog": 0.3}


def test_soft_scores_follow_the_reference_table():
    assert vqa_soft_scores(ANSWERS) == SCORES
    # min(1, 0.3 x count): 1, 2, 3, 4, 10 humans
    for n, score in ((1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)):
        assert vqa_soft_scores(["red"] * n + ["blue"] * (10 - n))["red"] == score
    assert draw_soft_answer(["a", "the", "an"], _LazyRandom("k-0")) == ("", 0.0)


def test_the_soft_draw_is_proportional_to_the_score_and_weighted_by_it():
    n = 4000
    draws = [draw_soft_answer(ANSWERS, _LazyRandom(f"q7-{epoch}")) for epoch in range(n)]
    total = sum(SCORES.values())  # 2.2
    for answer, score in SCORES.items():
        freq = sum(a == answer for a, _ in draws) / n
        # binomial sd <= sqrt(0.25 / 4000) = 0.008: 0.03 is > 3.5 sd
        assert abs(freq - score / total) < 0.03, (answer, freq, score / total)
    assert all(w == SCORES[a] for a, w in draws)  # the weight is the drawn answer's score
    # reproducible per (key, epoch)
    assert [draw_soft_answer(ANSWERS, _LazyRandom(f"q7-{e}")) for e in range(50)] == draws[:50]


def vqa_sample(key: str, answers=ANSWERS, question="what is it?") -> dict:
    rec = {"task": "vqa", "id": key, "question": question, "answers": answers}
    return {"task": "vqa", "id": key, "rec": rec, "visual": torch.zeros(1, 3, 4, 4), "key": key}


def test_collator_soft_and_majority_targets():
    tok = byte_tokenizer()
    samples = [vqa_sample("q7"), vqa_sample("q8", ["red"] * 2 + ["blue"] * 8)]
    soft = Collator(tok, ["vqa"], 0, 0)
    for epoch in (0, 1, 2):
        b = soft(samples, epoch)
        want = [
            draw_soft_answer(s["rec"]["answers"], _LazyRandom(f"{s['key']}-{epoch}"))
            for s in samples
        ]
        lab = tok([a for a, _ in want], padding=True, return_tensors="pt")
        assert torch.equal(b["labels"], lab.input_ids.masked_fill(lab.attention_mask == 0, -100))
        assert b["loss_weight"].tolist() == pytest.approx([w for _, w in want])
        assert b["loss_reduction"] == "sample"
        assert torch.equal(soft(samples, epoch)["labels"], b["labels"])  # the same on a re-run
    # majority: the most frequent raw answer, weight 1, whatever the epoch (as before)
    major = Collator(tok, ["vqa"], 0, 0, vqa_target="majority")
    for epoch in (0, 1):
        b = major(samples, epoch)
        lab = tok([majority_answer(s["rec"]["answers"]) for s in samples], padding=True)
        assert [[t for t in row if t != -100] for row in b["labels"].tolist()] == [
            [t for t in row if t != tok.pad_token_id] for row in lab.input_ids
        ]
        assert b["loss_weight"].tolist() == [1.0, 1.0]


def qa_sample(qid: str, choices: list[str], answer_idx: int) -> dict:
    rec = {"task": "tvqa", "id": qid, "question": "which shape moves left?", "subtitles": "",
           "ts": [0.0, 1.0], "choices": choices, "answer_idx": answer_idx}  # fmt: skip
    return {"task": "tvqa", "rec": rec, "id": qid, "key": qid, "visual": torch.zeros(4, 3, 4, 4)}


def test_choice_targets_tag_and_text():
    tok = byte_tokenizer()
    samples = [
        qa_sample("1", ["circle", "square", "the red cube", "star", "ring"], 2),
        qa_sample("2", ["one", "two", "three", "four", "five"], 4),
    ]

    def targets(batch):
        return [tok.decode([t for t in row if t != -100], skip_special_tokens=True)
                for row in batch["labels"].tolist()]  # fmt: skip

    tag = Collator(tok, ["tvqa"], 0, 0)(samples)  # the reference: the right choice's tag
    assert targets(tag) == ["a2", "a4"]
    text = Collator(tok, ["tvqa"], 0, 0, choice_target="text")(samples)
    assert targets(text) == ["the red cube", "five"]
    # validation scores the same references either way, and the batch carries the choices
    assert text["refs"] == tag["refs"] == [["a2"], ["a4"]]
    assert text["choices"] == [s["rec"]["choices"] for s in samples]
    with pytest.raises(DataError, match="data.choice_target='word'; valid: tag, text"):
        Collator(tok, ["tvqa"], 0, 0, choice_target="word")


def test_generated_text_maps_to_the_tag_of_the_choice_it_names():
    choices = ["the red cube", "the blue cube", "left", "The Red  Cube", "up"]
    assert tag_of_text("the blue cube", choices) == "a1"
    # case, runs of spaces and a final full stop do not matter; the first match wins
    assert tag_of_text("The red cube.", choices) == "a0"
    assert tag_of_text("  LEFT ", choices) == "a2"
    # words that name no choice stay as generated: wrong for the metric, -1 in the file
    assert tag_of_text("the red", choices) == "the red"
    assert tag_of_text("", choices) == ""


@pytest.mark.parametrize("target", ["tag", "text"])
def test_evaluation_scores_generated_choice_words_by_their_tag(target, tmp_path):
    from tests.test_grounding import PassThrough, ReadsItsImage, Tok
    from vlds.eval.loop import evaluate_tasks
    from vlds.eval.submission import write_predictions

    # the model writes ANSWERS[k] ("red", "blue", "green", "yellow") for features k
    shown = torch.tensor([0.0, 1.0, 3.0]).view(3, 1, 1).expand(3, 9, 4)
    batch = {
        "vis_feats": shown,
        "vis_mask": torch.ones(3, 9, dtype=torch.long),
        "ids": ["q0", "q1", "q2"],
        "refs": [["a1"], ["a0"], ["a2"]],
        "choices": [["blue", "Red", "x", "y", "z"], ["blue", "red", "x", "y", "z"]]
        + [["red", "blue", "green", "x", "y"]],
    }
    cfg = build_config("tiny", {"data.choice_target": target, "eval.shuffled_images": False})
    metrics, preds = evaluate_tasks(
        ReadsItsImage(), PassThrough(), {"tvqa": [batch]}, Tok(), cfg, "cpu"
    )
    written = write_predictions("tvqa", preds["tvqa"], tmp_path).read_text().splitlines()
    if target == "tag":  # colour words are no tags: every sample wrong, written as -1
        assert metrics["tvqa"]["score"] == 0.0
        assert [json.loads(x)["answer_idx"] for x in written] == [-1, -1, -1]
        return
    # "red" names choice 1 (any case), "blue" choice 0, "yellow" none of the third's
    assert [p["prediction"] for p in preds["tvqa"]] == ["a1", "a0", "yellow"]
    assert metrics["tvqa"]["score"] == pytest.approx(200 / 3)
    assert [json.loads(x)["answer_idx"] for x in written] == [1, 0, -1]


# ---- the loss ------------------------------------------------------------------------------


def hand_token_losses(model, batch) -> list[list[float]]:
    """Each sample's per-token cross-entropies from the model's logits, one token at a time."""
    embeds, mask = model.encoder_inputs(batch)
    logits = model.lm(inputs_embeds=embeds, attention_mask=mask, labels=batch["labels"]).logits
    out = []
    for i, row in enumerate(batch["labels"].tolist()):
        logp = logits[i].float().log_softmax(-1)
        out.append([-logp[j, t].item() for j, t in enumerate(row) if t != -100])
    return out


def test_loss_weighted_per_sample_mean_and_caption_token_mean():
    cfg, tok, tower, model = tiny("t5")
    model.eval()
    batch = image_batch(tok, tower, b=4)  # targets of 4, 7, 5 and 13 byte tokens
    with torch.no_grad():
        tokens = hand_token_losses(model, batch)
        assert [len(t) for t in tokens] == [4, 7, 5, 13]
        means = [sum(t) / len(t) for t in tokens]
        weights = [0.3, 1.0, 0.0, 0.6]
        plain = model(batch)  # no weight: the per-sample mean, then the mean (unchanged)
        assert plain.item() == pytest.approx(sum(means) / 4, rel=1e-5)
        weighted = model({**batch, "loss_weight": torch.tensor(weights)})
        assert weighted.item() == pytest.approx(
            sum(w * m for w, m in zip(weights, means, strict=True)) / 4, rel=1e-5
        )
        token = model({**batch, "loss_reduction": "token"})
        assert token.item() == pytest.approx(sum(map(sum, tokens)) / 29, rel=1e-5)


def test_collator_marks_coco_captions_for_the_token_mean():
    tok = byte_tokenizer()
    cap = {"task": "caption", "id": "c", "captions": ["a red circle"]}
    tvc = {"task": "tvc", "id": "v", "captions": ["he walks"], "subtitles": "hi", "ts": [0, 1]}
    s_cap = {
        "task": "caption",
        "rec": cap,
        "id": "c",
        "key": "c",
        "visual": torch.zeros(1, 3, 4, 4),
    }
    s_tvc = {"task": "tvc", "rec": tvc, "id": "v", "key": "v", "visual": torch.zeros(4, 3, 4, 4)}
    assert Collator(tok, ["caption"], 0, 0)([s_cap])["loss_reduction"] == "token"
    assert (
        Collator(tok, ["caption"], 0, 0, caption_loss="sample")([s_cap])["loss_reduction"]
        == "sample"
    )
    # the reference's video model averages every task per sample, captions too (video_model.py)
    assert Collator(tok, ["tvc"], 0, 0)([s_tvc])["loss_reduction"] == "sample"


# ---- token limits --------------------------------------------------------------------------

LONG = "x" * 700  # ByT5: one token per byte, + </s>


def record(task: str) -> dict:
    """A record of `task` whose source text and target are both long."""
    rec = {"task": task, "id": task}
    if task in ("vqa", "gqa"):
        rec |= {"question": LONG, "answers": [LONG] * 10, "answer": LONG}
    elif task == "nlvr":
        rec |= {"sentence": LONG, "label": True}
    elif task in ("caption", "tvc", "yc2c"):
        rec |= {"captions": [LONG], "subtitles": LONG, "ts": [0.0, 1.0]}
    else:  # tvqa / how2qa: the target is a choice tag ("a3": 2 bytes + </s>)
        rec |= {"question": LONG, "subtitles": "", "ts": [0.0, 1.0], "choices": ["c"] * 5}
        rec["answer_idx"] = 3
    return rec


def lengths(task: str, text_len=0, target_len=0, **kw) -> tuple[int, int]:
    rec = record(task)
    kind = {"nlvr": (2, 3, 4, 4), "tvqa": (4, 3, 4, 4), "tvc": (4, 3, 4, 4)}.get(task)
    visual = torch.zeros(kind or (1, 3, 4, 4))
    sample = {"task": task, "rec": rec, "id": task, "key": task, "visual": visual}
    b = Collator(byte_tokenizer(), [task], text_len, target_len, **kw)([sample])
    return b["input_ids"].shape[1], int((b["labels"] != -100).sum())


def test_each_task_is_truncated_as_the_reference():
    full_text = len("nlvr: ") + 700 + 1
    # (encoder text, target): prompt and </s> included, as the reference's tokenizer.encode
    assert lengths("vqa") == (20, 10)  # vqa_clip_data.py: max_length=20 / 10
    assert lengths("gqa") == (20, 701)  # gqa_clip_data.py: the answer untruncated
    assert lengths("nlvr")[0] == full_text  # nlvr_clip_data.py: untruncated
    assert lengths("caption") == (len("caption: ") + 1, 40)  # caption: target 40
    assert lengths("tvqa") == (600, 3)  # video/*_data.py: 600 / 20
    assert lengths("tvc") == (600, 20)
    # majority targets are cut the same way
    assert lengths("vqa", vqa_target="majority") == (20, 10)
    # a positive limit holds for every task
    for task in ("vqa", "gqa", "nlvr", "caption", "tvqa", "tvc"):
        text, target = lengths(task, 10**4, 10**4)  # untruncated
        assert lengths(task, 30, 8) == (min(30, text), min(8, target))


# ---- config --------------------------------------------------------------------------------


def test_defaults_are_the_reference_and_bad_values_name_the_fix():
    import vlds.engine  # noqa: F401  (registers every section's checks)

    cfg = build_config("bart-base")  # the real presets keep every default
    d = cfg.data
    assert (d.image_resize, d.vqa_target, cfg.train.caption_loss) == ("squash", "soft", "token")
    assert build_config("bart-base-video").data.choice_target == "tag"
    assert (d.max_text_len, d.max_target_len) == (0, 0)
    # the shapes world's wrong human answers make soft draws label noise: tiny takes the majority
    assert build_config("tiny").data.vqa_target == "majority"
    for key, bad, needle in (
        ("data.image_resize", "pad", "data.image_resize='pad'; valid: squash, crop"),
        ("data.vqa_target", "top", "data.vqa_target='top'; valid: soft, majority"),
        ("data.choice_target", "idx", "data.choice_target='idx'; valid: tag, text"),
        ("train.caption_loss", "mean", "train.caption_loss='mean'; valid: token, sample"),
        ("data.max_text_len", "-1", "data.max_text_len=-1 must be >= 0"),
        ("data.max_target_len", "-2", "data.max_target_len=-2 must be >= 0"),
    ):
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
            validate(build_config("tiny", {key: bad}))
