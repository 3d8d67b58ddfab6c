"""How much of a score comes from the image: the shuffled-image score and the text prior.

A vision-and-language score mixes what the model read in the image with what the text alone
gives away (VQA's "is there ..." questions are mostly "yes", its counts mostly "2"). Two
numbers separate them, and vlds reports both beside every score:

- shuffled-image score (`eval.shuffled_images`): the same model on the same validation samples,
  each given another sample's visual tokens (the batch rolled by one; a sample alone in its
  batch takes the previous batch's first). A model that ignores its images scores the same;
  the gap is what the images contribute.
- text prior: the task metric of answering, for every validation sample, the most common
  training answer among the training samples of its *question type*, read from the training
  records alone (no model). Types: VQA's `question_type` field (the official one), the
  question's first three words where a record has none (GQA, TVQA, How2QA), NLVR2's exact
  sentence (a sentence recurs with several image pairs), one type for captions (the most
  common training caption, CIDEr-scored). A type never seen in training gets the overall most
  common answer. It is the classic "question-only" baseline of VQA papers made exact.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import torch

from vlds.data.tasks import get_task, majority_answer


def question_type(task: str, rec: dict) -> str:
    """The key the text prior groups samples by (see the module docstring)."""
    if get_task(task).generative_caption:
        return ""
    if task == "nlvr":
        return rec["sentence"].strip().lower()
    if rec.get("question_type"):
        return rec["question_type"]
    return " ".join(rec["question"].lower().split()[:3])


def _answer(task: str, rec: dict) -> list[str]:
    """The training answers a record votes for: its majority answer, or every caption."""
    t = get_task(task)
    refs = t.references(rec)
    return list(refs) if t.generative_caption else [majority_answer(refs)]


def prior_answers(task: str, train_records) -> tuple[dict[str, str], str]:
    """({question type: its most common training answer}, the overall most common answer).
    Ties go to the answer seen first, so the result does not depend on hash order."""
    per_type: dict[str, Counter] = defaultdict(Counter)
    overall: Counter = Counter()
    for rec in train_records:
        answers = _answer(task, rec)
        per_type[question_type(task, rec)].update(answers)
        overall.update(answers)
    if not overall:
        raise ValueError(f"no {task} training records: the text prior needs the training split")
    return {k: c.most_common(1)[0][0] for k, c in per_type.items()}, overall.most_common(1)[0][0]


def text_prior(task: str, train_records, val_records, metric=None) -> float:
    """The task's score (0-100, `metric` or its METRICS entry) of the text prior's answers."""
    return text_prior_and_majority(task, train_records, val_records, metric)[0]


def text_prior_and_majority(
    task: str, train_records, val_records, metric=None
) -> tuple[float, float | None]:
    """(the text prior's score, the majority-answer baseline: the score of always answering the
    overall most common training answer, `majority_answer` of each record's references; None
    for captions), from one pass over the training records."""
    from vlds.eval.metrics import METRICS

    table, fallback = prior_answers(task, train_records)
    val = list(val_records)
    t = get_task(task)
    preds = [table.get(question_type(task, r), fallback) for r in val]
    refs = [t.references(r) for r in val]
    meta = [
        {k: r[k] for k in ("answer_type", "question_type", "identifier") if k in r} for r in val
    ]
    prior = (metric or METRICS[task])(preds, refs, meta)["score"]
    majority = None if t.generative_caption else METRICS[task]([fallback] * len(refs), refs)
    return prior, None if majority is None else majority["score"]


def shuffle_visual(batch: dict, previous: dict | None) -> dict:
    """The batch with every sample's visual tokens (and their mask) taken from another sample:
    rolled by one within the batch; a batch of one takes the previous batch's first sample
    (left as it is when there is none: one sample cannot be shuffled). Boxes and order ids are
    the same for every sample of a task and stay. A batch still in pixels (a tower that trains
    computes its tokens inside the model: model.vision_train) has its images or frames moved
    the same way."""
    pixels = [k for k in ("images", "frames") if k in batch]
    keys = ["vis_feats", "vis_mask"] if "vis_feats" in batch else pixels
    if batch[keys[0]].shape[0] > 1:
        return {**batch, **{k: batch[k].roll(1, dims=0) for k in keys}}
    if previous is not None:
        return {**batch, **{k: previous[k][:1] for k in keys}}
    return batch


def blank_visual(batch: dict) -> dict:
    """`data.blind`: every sample sees one constant image (all-zero visual features: with a
    standardised tower, the average image)."""
    return {**batch, "vis_feats": torch.zeros_like(batch["vis_feats"])}
