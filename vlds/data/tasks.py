"""Task registry: how a shard sample of each task becomes (encoder text, target text).

Every shard sample, from the synthetic shapes world or from a converter of a public release,
carries a ``json`` record with the fields below plus its visual payload. The registry owns the
text prompt, the target and the metric name, so converters write raw fields only.

| task    | kind  | visual payload            | json fields                                  |
|---------|-------|---------------------------|----------------------------------------------|
| vqa     | image | jpg/png                   | question, answers[10], answer_type,          |
|         |       |                           | question_type, image_id                      |
| gqa     | image | jpg/png                   | question, answer, image_id                   |
| nlvr    | pair  | img0.(jpg/png), img1.(..) | sentence, label (bool), identifier           |
| caption | image | jpg/png                   | captions[>=1], image_id                      |
| tvqa    | video | frames.npy[.gz]           | question, choices[5], answer_idx, subtitles, |
| how2qa  | video | (T, H, W, 3) uint8        | ts[2], vid_name                              |
| tvc     | video | frames.npy[.gz]           | captions[>=1], subtitles, ts[2], vid_name    |
| yc2c    | video | frames.npy[.gz]           | captions[>=1], subtitles, vid_name           |

Every record also has ``task`` and ``id`` (question id, NLVR2 identifier, image or clip id):
``id`` is unique within a task split and is what predictions are keyed by. A record of an
unlabelled test split (GQA test, VQA test-dev, TVQA test) lacks its LABEL field (answers,
answer, label, captions, answer_idx): it can be decoded and predicted, never trained or scored.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from vlds.config import ConfigError, config_check, split_method
from vlds.eval.vqa import normalize_answer

IMAGE_TASKS = ("vqa", "gqa", "nlvr", "caption")
VIDEO_TASKS = ("tvqa", "how2qa", "tvc", "yc2c")
ALL_TASKS = IMAGE_TASKS + VIDEO_TASKS


def majority_answer(answers: list[str]) -> str:
    """Most frequent human answer; ties go to the one given first (deterministic)."""
    counts = Counter(answers)
    best = max(counts.values())
    return next(a for a in answers if counts[a] == best)


# Soft score of an answer given by `count` of the humans: the reference's answer table (LXMERT's
# VQA json, made by bottom-up-attention-vqa's compute_softscore.py get_score): 0.3 per human,
# 1.0 from four on
_SOFT_SCORES = (0.0, 0.3, 0.6, 0.9, 1.0)


def vqa_soft_scores(answers: list[str]) -> dict[str, float]:
    """{normalised answer: soft score} of a question's human answers, in first-given order.
    Answers that normalise to "" are dropped. Unlike the reference, no answer vocabulary
    (its 3,129 frequent answers) restricts the labels: every normalised answer is kept."""
    counts = Counter(a for a in map(normalize_answer, answers) if a)
    return {a: _SOFT_SCORES[min(c, 4)] for a, c in counts.items()}


def draw_soft_answer(answers: list[str], rng) -> tuple[str, float]:
    """One answer drawn in proportion to its soft score, and that score (the sample's loss
    weight), as the reference's vqa_data.py does at each visit; ("", 0.0) when no answer is
    left after normalisation (the reference's empty label)."""
    scores = vqa_soft_scores(answers)
    if not scores:
        return "", 0.0
    labels, weights = list(scores), list(scores.values())
    answer = rng.choices(labels, weights=weights)[0]
    return answer, scores[answer]


# the field that holds what a record is scored against; absent in unlabelled test splits
LABEL = {
    "vqa": "answers",
    "gqa": "answer",
    "nlvr": "label",
    "caption": "captions",
    "tvqa": "answer_idx",
    "how2qa": "answer_idx",
    "tvc": "captions",
    "yc2c": "captions",
}


def labelled(rec: dict) -> bool:
    return LABEL[rec["task"]] in rec


def _ts(rec: dict) -> str:
    start, end = rec["ts"]
    return f"({start:.1f}-{end:.1f})"


def _choices(rec: dict) -> str:
    return " ".join(f"a{i}: {c}" for i, c in enumerate(rec["choices"]))


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "image" | "pair" | "video"
    prompt: str
    source: Callable[[dict], str]  # text after the prompt
    target: Callable[[dict, random.Random], str]  # training target
    references: Callable[[dict], list[str]]  # what the metric compares a prediction with
    generative_caption: bool = False  # beam search + caption metrics
    # The reference's token limits (special tokens and the prompt included; None = untruncated),
    # used when data.max_text_len / data.max_target_len are 0
    max_text_len: int | None = None
    max_target_len: int | None = None
    # The reference averages this task's loss over every target token of the batch
    # (caption_model.py, reduce_loss=True), not per sample (see train.caption_loss)
    token_mean_loss: bool = False
    # (target, loss weight) drawn at each training visit when data.vqa_target=soft; None =
    # `target` with weight 1
    soft_target: Callable[[dict, random.Random], tuple[str, float]] | None = None
    # tokens generated at evaluation when eval.max_new_tokens is 0: the reference's
    # gen_max_length (param.py default 20; multitask.py: captions 40)
    max_new_tokens: int = 20

    def encoder_text(self, rec: dict, prompt: bool = True) -> str:
        """The prompt (when `prompt`, see `uses_task_prompts`) and the source text. Without
        the prompt a caption's text is empty, as the reference's (its tokenizer then encodes
        only the special tokens)."""
        return (self.prompt if prompt else "") + self.source(rec)

    def train_target(self, rec: dict, rng, sentence: int | None = None) -> str:
        """The target of a training sample: reference sentence `sentence` of a caption
        record made one sample per sentence (data.caption_samples=sentence), else `target`."""
        if sentence is not None and self.generative_caption:
            return rec["captions"][sentence]
        return self.target(rec, rng)


def _draw_caption(rec: dict, rng) -> str:
    """The reference a caption sample trains on at this visit with data.caption_samples=image
    (per-sample seeded rng); with "sentence" each sentence is its own sample (train_target)."""
    return rng.choice(rec["captions"])


def _all_captions(rec: dict) -> list[str]:
    return list(rec["captions"])


def _choice_tag(rec: dict) -> str:
    """TVQA / How2QA: the model generates the correct choice's tag, "a0" .. "a4"."""
    return f"a{rec['answer_idx']}"


# The multiple-choice tasks, and what their model generates (data.choice_target): "tag" = the
# right choice's tag "a3" (the reference's video/tvqa_data.py); "text" = the right choice's
# words, which evaluation maps back to that choice's tag (`tag_of_text`), so the metric, the
# predictions files and the validation references are the same in both.
CHOICE_TASKS = ("tvqa", "how2qa")
CHOICE_TARGETS = ("tag", "text")


def choice_text(rec: dict) -> str:
    """The right choice's words: a TVQA / How2QA target with data.choice_target=text."""
    return rec["choices"][rec["answer_idx"]]


def _plain(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".").rstrip()


def tag_of_text(pred: str, choices: list[str]) -> str:
    """data.choice_target=text: the tag ("a2") of the first choice the generated text names,
    compared lower-cased with runs of spaces as one and a final full stop dropped; the text
    itself when it names none (scored wrong, written as answer_idx -1)."""
    want = _plain(pred)
    return next((f"a{i}" for i, c in enumerate(choices) if _plain(c) == want), pred)


def _qa_source(rec: dict) -> str:
    return (
        f"[Subs] {rec['subtitles']} [Q] {rec['question']} [TS] {_ts(rec)} [Choices] {_choices(rec)}"
    )


TASKS: dict[str, Task] = {
    "vqa": Task(
        "vqa",
        "image",
        "vqa: ",
        lambda r: r["question"],
        lambda r, rng: majority_answer(r["answers"]),
        lambda r: list(r["answers"]),
        # vqa_clip_data.py: encode(prompt + question, max_length=20), encode(answer, max_length=10)
        max_text_len=20,
        max_target_len=10,
        soft_target=lambda r, rng: draw_soft_answer(r["answers"], rng),
    ),
    # The reference code's prompt for GQA has the typo "gpa: "; we use the intended one.
    "gqa": Task(
        "gqa",
        "image",
        "gqa: ",
        lambda r: r["question"],
        lambda r, rng: r["answer"],
        lambda r: [r["answer"]],
        max_text_len=20,  # gqa_clip_data.py: max_length=20; the answer untruncated
    ),
    # nlvr_clip_data.py encodes the sentence and "true" / "false" untruncated
    "nlvr": Task(
        "nlvr",
        "pair",
        "nlvr: ",
        lambda r: r["sentence"],
        lambda r, rng: "true" if r["label"] else "false",
        lambda r: ["true" if r["label"] else "false"],
    ),
    # A caption record is one image with all its references. Training makes it one sample per
    # reference (data.caption_samples=sentence, the reference) or one sample whose visits each
    # train on a reference drawn with a per-sample seeded rng, so a resumed run sees the same
    # choice ("image"); evaluation scores one sample per image against all of them.
    "caption": Task(
        "caption",
        "image",
        "caption: ",
        lambda r: "",
        _draw_caption,
        _all_captions,
        generative_caption=True,
        # multitask.py: caption max_text_length = gen_max_length = 40 (caption_clip_data.py)
        max_text_len=40,
        max_target_len=40,
        token_mean_loss=True,
        max_new_tokens=40,
    ),
    # TVQA and How2QA share the VALUE release's format: subtitles, question, timestamps, five
    # choices; the model generates the tag of the right one
    **{
        name: Task(
            name,
            "video",
            f"{name}: ",
            _qa_source,
            lambda r, rng: _choice_tag(r),
            lambda r: [_choice_tag(r)],
            max_text_len=600,  # video/{tvqa,how2qa}_data.py: max_length=600, targets 20
            max_target_len=20,
        )
        for name in ("tvqa", "how2qa")
    },
    "tvc": Task(
        "tvc",
        "video",
        "tvc: ",
        lambda r: f"[Subs] {r['subtitles']} [TS] {_ts(r)}",
        _draw_caption,
        _all_captions,
        generative_caption=True,
        max_text_len=600,  # video/tvc_data.py: max_length=600, targets 20
        max_target_len=20,
    ),
    "yc2c": Task(
        "yc2c",
        "video",
        "yc2c: ",
        lambda r: f"[Subs] {r['subtitles']}",
        _draw_caption,
        _all_captions,
        generative_caption=True,
        max_text_len=600,  # video/yc2c_data.py: max_length=600, targets 20
        max_target_len=20,
    ),
}


@config_check
def check_tasks(cfg) -> None:
    """data.tasks: known names, and image or video tasks, not both."""
    tasks = cfg.task_list
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown} in data.tasks; valid: {', '.join(TASKS)}")
    if any(t in IMAGE_TASKS for t in tasks) and any(t in VIDEO_TASKS for t in tasks):
        raise ConfigError(
            "data.tasks mixes image and video tasks, whose visual features differ (grid tokens "
            "vs frame embeddings); train them in separate runs, as the paper does"
        )


TASK_PROMPTS = ("auto", "true", "false")
# The methods whose reference script passes --use_tasks_prompts (VL-T5/scripts/image/*.sh and
# video/*.sh, commit 545fcbb): the single-module ones; image full fine-tuning, the multiple-
# module methods and Hyperformer train without; video full fine-tuning sets it. Methods no
# script runs (half_shared_adapter, visual_only, visual_ln; video hyperformer and multiple_*)
# get none either.
PROMPTED_METHODS = {
    "image": frozenset({"single_adapter", "single_compacter", "single_lora", "single_prompt"}),
    "video": frozenset({"full_finetune", "single_adapter", "single_lora", "single_prompt"}),
}


def uses_task_prompts(cfg) -> bool:
    """Whether this config's encoder texts start with the task prompts ("vqa: " ...):
    data.task_prompts "true" / "false", or "auto" = as the reference's script for
    peft.method on these tasks (PROMPTED_METHODS; for METHOD+PROMPTS, as METHOD's)."""
    mode = cfg.data.task_prompts
    if mode not in TASK_PROMPTS:
        raise ConfigError(f"data.task_prompts={mode!r}; valid: {', '.join(TASK_PROMPTS)}")
    if mode != "auto":
        return mode == "true"
    kind = "video" if any(t in VIDEO_TASKS for t in cfg.task_list) else "image"
    return split_method(cfg.peft.method)[0] in PROMPTED_METHODS[kind]


@config_check
def check_task_prompts(cfg) -> None:
    uses_task_prompts(cfg)


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]
