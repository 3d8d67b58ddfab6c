"""The grounding numbers are what they claim: the text prior (hand-made records, hand-computed
scores), the shuffled-image score (a model whose answer is read off its visual tokens), and
data.blind (every image one constant)."""

import pytest
import torch

from vlds.config import build_config
from vlds.eval.grounding import (
    blank_visual,
    prior_answers,
    question_type,
    shuffle_visual,
    text_prior,
    text_prior_and_majority,
)
from vlds.eval.loop import evaluate_tasks


def vqa(qtype, answer, n_right=10):
    """A VQA record whose ten human answers hold `answer` n_right times (the rest "zzz")."""
    return {
        "task": "vqa",
        "question": f"{qtype} x?",
        "question_type": qtype,
        "answer_type": "other",
        "answers": [answer] * n_right + ["zzz"] * (10 - n_right),
    }


def test_vqa_text_prior_is_the_most_common_answer_per_question_type():
    train = [vqa("how many", "2")] * 3 + [vqa("how many", "1")]
    train += [vqa("is there a", "yes")] * 2 + [vqa("is there a", "no")]
    table, fallback = prior_answers("vqa", train)
    assert table == {"how many": "2", "is there a": "yes"}
    assert fallback == "2"  # "2" x3, "yes" x2, "1", "no"
    val = [
        vqa("how many", "2"),  # prior "2": 100
        vqa("how many", "3"),  # 0
        vqa("is there a", "yes", n_right=2),  # "yes" from 2 of 10 humans: 2/3 (VQA's min(1, n/3))
        vqa("what color is the", "2"),  # unseen type -> the overall answer "2": 100
    ]
    # the official metric averages over the 10 leave-one-out subsets: a 2-of-10 answer scores
    # (8 x 2/3 + 2 x 1/3) / 10 = 0.6
    assert text_prior("vqa", train, val) == pytest.approx((100 + 0 + 60 + 100) / 4)
    # the same pass gives the majority-answer baseline: "2" for every sample
    prior, majority = text_prior_and_majority("vqa", train, val)
    assert prior == text_prior("vqa", train, val)
    assert majority == pytest.approx((100 + 0 + 0 + 100) / 4)


def test_question_types_of_each_task():
    assert question_type("gqa", {"question": "What color is the shape left of it?"}) == (
        "what color is"
    )
    assert question_type("nlvr", {"sentence": " Both images contain a cross "}) == (
        "both images contain a cross"
    )
    assert question_type("caption", {"captions": ["a red circle"]}) == ""
    assert (
        question_type("vqa", {"question": "is there a red circle?", "question_type": "is there a"})
        == "is there a"
    )


def test_nlvr_and_gqa_and_caption_priors():
    nl = lambda s, label: {"task": "nlvr", "sentence": s, "label": label, "identifier": "x-0-0-0"}  # noqa: E731
    train = [nl("a", True), nl("a", True), nl("a", False), nl("b", False), nl("b", False)]
    assert prior_answers("nlvr", train) == ({"a": "true", "b": "false"}, "false")
    val = [nl("a", True), nl("b", True), nl("c", False)]  # right, wrong, unseen -> "false" right
    assert text_prior("nlvr", train, val) == pytest.approx(200 / 3)

    gq = lambda q, a: {"task": "gqa", "question": q, "answer": a}  # noqa: E731
    train = [gq("is the red circle left of it?", "no")] * 2 + [gq("is the red cross above?", "yes")]
    train += [gq("what color is the shape?", "blue")]
    table, _ = prior_answers("gqa", train)
    assert table == {"is the red": "no", "what color is": "blue"}

    caps = [{"task": "caption", "captions": ["a red circle", "one shape"]}] * 2
    caps += [{"task": "caption", "captions": ["one shape", "a blue square"]}]
    assert prior_answers("caption", caps) == ({"": "one shape"}, "one shape")


def test_text_prior_needs_training_records():
    with pytest.raises(ValueError, match="training split"):
        text_prior("vqa", [], [vqa("how many", "2")])


def test_shuffle_visual_gives_every_sample_another_samples_tokens():
    feats = torch.arange(3.0).view(3, 1, 1).expand(3, 2, 4)
    mask = torch.tensor([[1, 1], [1, 0], [0, 0]])
    out = shuffle_visual({"vis_feats": feats, "vis_mask": mask, "ids": [0, 1, 2]}, None)
    assert out["vis_feats"][:, 0, 0].tolist() == [2.0, 0.0, 1.0]
    assert out["vis_mask"].tolist() == [[0, 0], [1, 1], [1, 0]]
    one = {"vis_feats": torch.full((1, 2, 4), 7.0), "vis_mask": torch.ones(1, 2, dtype=torch.long)}
    assert shuffle_visual(one, {"vis_feats": feats, "vis_mask": mask})["vis_feats"][0, 0, 0] == 0.0
    assert shuffle_visual(one, None)["vis_feats"][0, 0, 0] == 7.0  # nothing to swap with
    assert blank_visual(one)["vis_feats"].abs().sum() == 0
    # pixels, for a tower that computes its tokens inside the model (model.vision_train)
    images = torch.arange(3, dtype=torch.uint8).view(3, 1, 1, 1, 1).expand(3, 2, 3, 4, 4)
    out = shuffle_visual({"images": images, "ids": [0, 1, 2]}, None)
    assert out["images"][:, 1, 2, 3, 3].tolist() == [2, 0, 1] and "vis_feats" not in out
    frames = torch.full((1, 5, 3, 4, 4), 9, dtype=torch.uint8)
    assert shuffle_visual({"frames": frames}, {"frames": frames - 9})["frames"].sum() == 0


ANSWERS = ["red", "blue", "green", "yellow"]


class ReadsItsImage(torch.nn.Module):
    """Answers ANSWERS[k] where k is the first visual feature: a model whose output is known."""

    def generate(self, b, **kw):
        return b["vis_feats"][:, 0, 0].long()[:, None]

    def sample_losses(self, b):  # a known validation loss: the answer index + 1
        return b["vis_feats"][:, 0, 0] + 1


class Tok:
    def batch_decode(self, ids, skip_special_tokens=True):
        return [ANSWERS[int(i[0])] for i in ids]


class PassThrough:
    def visual_inputs(self, batch, max_frames):
        return batch


def gqa_batches(answers: list[int], batch_size: int):
    """GQA eval batches whose sample i shows (in its features) answer index answers[i]."""
    out = []
    for start in range(0, len(answers), batch_size):
        chunk = answers[start : start + batch_size]
        out.append(
            {
                "vis_feats": torch.tensor(chunk, dtype=torch.float).view(-1, 1, 1).expand(-1, 9, 4),
                "vis_mask": torch.ones(len(chunk), 9, dtype=torch.long),
                "ids": [f"q{start + i}" for i in range(len(chunk))],
                "refs": [[ANSWERS[a]] for a in chunk],
            }
        )
    return out


@pytest.mark.parametrize("blind", [False, True])
def test_shuffled_score_and_blind_run_on_a_model_that_reads_its_image(blind):
    # batches of 3, 3 and 1: within a batch the roll gives each sample its predecessor's image
    # (all differ from its own here); the lone last sample takes the previous batch's first (0)
    answers = [0, 1, 2, 3, 0, 1, 0]
    cfg = build_config("tiny", {"eval.shuffled_images": True, "data.blind": blind})
    metrics, preds = evaluate_tasks(
        ReadsItsImage(), PassThrough(), {"gqa": gqa_batches(answers, 3)}, Tok(), cfg, "cpu"
    )
    if blind:  # every image is one constant: the model answers ANSWERS[0] everywhere
        assert metrics["gqa"]["score"] == pytest.approx(100 * 3 / 7)
        assert "shuffled_score" not in metrics["gqa"] and "shuffled_average" not in metrics
        return
    assert metrics["gqa"]["score"] == 100.0
    # shuffled predictions [2, 0, 1], [1, 3, 0], [3] (the lone sample gets the previous
    # batch's first image): none equals its own answer
    assert metrics["gqa"]["shuffled_score"] == 0.0
    assert metrics["shuffled_average"] == 0.0
    assert [p["prediction"] for p in preds["gqa"]] == [ANSWERS[a] for a in answers]
    # the validation loss: from the real images only, the mean over samples, then over tasks
    assert metrics["gqa"]["loss"] == metrics["loss"] == pytest.approx(sum(answers) / 7 + 1)


def test_shuffled_score_counts_coincidences():
    # samples whose neighbour shows the same answer are right even when shuffled
    answers = [1, 1, 2, 2]
    cfg = build_config("tiny", {"eval.shuffled_images": True})
    metrics, _ = evaluate_tasks(
        ReadsItsImage(), PassThrough(), {"gqa": gqa_batches(answers, 4)}, Tok(), cfg, "cpu"
    )
    # rolled: [2, 1, 1, 2] against [1, 1, 2, 2]: samples 1 and 3 right
    assert metrics["gqa"]["shuffled_score"] == 50.0


def test_grounding_switches_are_config_keys():
    cfg = build_config("tiny")
    assert cfg.eval.shuffled_images and not cfg.data.blind
    assert not build_config("t5-base").eval.shuffled_images
