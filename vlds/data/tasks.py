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

from vlds.config import ConfigError, config_check

IMAGE_TASKS = ("vqa", "gqa", "nlvr", "caption")
VIDEO_TASKS = ("tvqa", "how2qa", "tvc", "yc2c")
ALL_TASKS = IMAGE_TASKS + VIDEO_TASKS


def majority_answer(answers: list[str]) -> str:
    """Most frequent human answer; ties go to the one given first (deterministic)."""
    counts = Counter(answers)
    best = max(counts.values())
    return next(a for a in answers if counts[a] == best)


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

    def encoder_text(self, rec: dict) -> str:
        return self.prompt + self.source(rec)


def _draw_caption(rec: dict, rng) -> str:
    """The reference a caption sample trains on at this visit (per-sample seeded rng)."""
    return rng.choice(rec["captions"])


def _all_captions(rec: dict) -> list[str]:
    return list(rec["captions"])


def _choice_tag(rec: dict) -> str:
    """TVQA / How2QA: the model generates the correct choice's tag, "a0" .. "a4"."""
    return f"a{rec['answer_idx']}"


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
    ),
    # The reference code's prompt for GQA has the typo "gpa: "; we use the intended one.
    "gqa": Task(
        "gqa",
        "image",
        "gqa: ",
        lambda r: r["question"],
        lambda r, rng: r["answer"],
        lambda r: [r["answer"]],
    ),
    "nlvr": Task(
        "nlvr",
        "pair",
        "nlvr: ",
        lambda r: r["sentence"],
        lambda r, rng: "true" if r["label"] else "false",
        lambda r: ["true" if r["label"] else "false"],
    ),
    # A caption sample is one image with all its references; each visit trains on one of
    # them, drawn with a per-sample seeded rng so a resumed run sees the same choice.
    "caption": Task(
        "caption",
        "image",
        "caption: ",
        lambda r: "",
        _draw_caption,
        _all_captions,
        generative_caption=True,
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
    ),
    "yc2c": Task(
        "yc2c",
        "video",
        "yc2c: ",
        lambda r: f"[Subs] {r['subtitles']}",
        _draw_caption,
        _all_captions,
        generative_caption=True,
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


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]
