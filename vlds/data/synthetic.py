"""The embedded default data set: a seeded "shapes world" in all eight task forms.

Coloured shapes on a 3x3 grid (images) or moving in straight lines (clips) are drawn with PIL
and written as WebDataset shards carrying exactly the json fields of ``vlds.data.tasks`` (plus
``task`` and ``id``), so training, the data pipeline and every metric run end to end without a
download. A sample depends only on (spec, task, split, index): its rng is seeded from a hash of
those, so shards are byte-identical across runs, machines and worker counts.

    python -m vlds.data.synthetic                       # into $VLDS_CACHE or ~/.cache/vlds
    python -m vlds.data.synthetic --out /tmp/vlds --seed 1 --train-per-task 200

``ensure_synthetic()`` generates on first use and afterwards returns the cached folder:

    shapes-<hash>/{task}/{split}-00000.tar + {split}.index.json    every task in ALL_TASKS
    shapes-<hash>/tokenizer/spiece.model      T5Tokenizer.from_pretrained(dir, extra_ids=0)
    shapes-<hash>/COMPLETE                    json with the spec; written last
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import random
import shutil
import socket
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vlds.data.shardio import SCHEMA_VERSION, shard_url, write_index, write_sample
from vlds.data.tasks import ALL_TASKS, IMAGE_TASKS, TASKS, get_task, majority_answer

# Part of the cache hash: bump it whenever the same spec would produce different bytes.
GENERATOR_VERSION = 1

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles",
          "diamond": "diamonds", "cross": "crosses"}  # fmt: skip
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (45, 85, 225),
          "yellow": (240, 210, 40), "purple": (145, 60, 185), "orange": (245, 135, 30)}  # fmt: skip
SIZES = ("small", "large")
RADIUS = {"small": 0.075, "large": 0.12}  # half the bounding box, fraction of the image side
JITTER = 0.03  # max centre offset inside a grid cell; large shapes still stay inside their cell
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
POSITION = {(0, 0): "in the top left", (0, 1): "at the top", (0, 2): "in the top right",
            (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
            (2, 0): "in the bottom left", (2, 1): "at the bottom",
            (2, 2): "in the bottom right"}  # fmt: skip
VELOCITY = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
DIRECTIONS = tuple(VELOCITY)
# Three phrasings per direction: caption references j use the j-th, so they always differ.
MOVES = {"left": ("moves to the left", "slides left", "goes left"),
         "right": ("moves to the right", "slides right", "goes right"),
         "up": ("moves up", "rises", "goes up"), "down": ("moves down", "falls", "goes down"),
         "still": ("stays still", "does not move", "stays in place")}  # fmt: skip
STEPS = {"left": ("move the {} to the left", "slide the {} left", "push the {} left"),
         "right": ("move the {} to the right", "slide the {} right", "push the {} right"),
         "up": ("move the {} up", "lift the {}", "push the {} up"),
         "down": ("move the {} down", "drop the {}", "push the {} down"),
         "still": ("leave the {} in place", "keep the {} still", "do not move the {}")}  # fmt: skip
TVQA_DIRS = {"left": "it moves left", "right": "it moves right", "up": "it moves up",
             "down": "it moves down", "still": "it stays still"}  # fmt: skip
HOW2_DIRS = {"left": "it slides left", "right": "it slides right", "up": "it goes up",
             "down": "it goes down", "still": "it stays in place"}  # fmt: skip
SPEAKERS = ("Alice", "Bob", "Carol", "Dave")


@dataclass(frozen=True)
class SyntheticSpec:
    seed: int = 0
    image_size: int = 96
    num_frames: int = 8
    train_per_task: int = 2000  # samples per image task in split "train"
    val_per_task: int = 300
    video_train_per_task: int = 600
    video_val_per_task: int = 150
    samples_per_shard: int = 500
    vocab_size: int = 512  # sentencepiece tokenizer


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    color: str  # key of COLORS
    size: str  # one of SIZES
    x: float  # centre, fraction of the image width
    y: float  # centre, fraction of the image height

    @property
    def cell(self) -> tuple[int, int]:
        """(row, col) of the 3x3 grid cell holding the centre."""
        return min(2, int(self.y * 3)), min(2, int(self.x * 3))

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Shape, ...]
    background: tuple[int, int, int] = (225, 225, 225)
    noise_seed: int | None = None  # None: no pixel noise (exact colours, for tests)

    @property
    def dark(self) -> bool:
        return sum(self.background) < 3 * 128


@dataclass(frozen=True)
class Mover:
    shape: Shape  # where it is on the first frame
    direction: str  # key of VELOCITY
    distance: float  # travel over the whole clip, fraction of the image side

    def at(self, t: float) -> Shape:
        """Position at clip time t in [0, 1]."""
        dx, dy = VELOCITY[self.direction]
        s = self.shape
        return replace(s, x=s.x + dx * self.distance * t, y=s.y + dy * self.distance * t)


@dataclass(frozen=True)
class Clip:
    movers: tuple[Mover, ...]
    background: tuple[int, int, int] = (225, 225, 225)
    noise_seed: int | None = None


def _an(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Sensor-like noise on ~10% of the pixels, +-6 levels: sparse rather than dense because
    dense noise makes PNG encoding the bulk of the generation time and triples the size."""
    rng = np.random.default_rng(seed)
    values = rng.integers(-6, 7, shape, dtype=np.int16)
    return values * (rng.random((*shape[:-1], 1)) < 0.1)  # same pixels in all three channels


def _draw(draw: ImageDraw.ImageDraw, s: Shape, size: int) -> None:
    cx, cy, r, fill = s.x * size, s.y * size, RADIUS[s.size] * size, COLORS[s.color]
    if s.kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif s.kind == "square":  # a bit smaller than the box so its area matches the circle's
        h = 0.85 * r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif s.kind == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif s.kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif s.kind == "cross":
        w = 0.35 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {s.kind!r}")


def render_scene(scene: Scene | Sequence[Shape], size: int = 96) -> Image.Image:
    """Draw a scene (or a bare object list on the default background) as a size x size RGB image."""
    if not isinstance(scene, Scene):
        scene = Scene(tuple(scene))
    img = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(img)
    for s in scene.objects:
        _draw(draw, s, size)
    if scene.noise_seed is None:
        return img
    pixels = np.asarray(img, dtype=np.int16) + _noise(scene.noise_seed, (size, size, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def render_clip(clip: Clip, size: int = 96, num_frames: int = 8) -> np.ndarray:
    """All frames of a clip: (T, H, W, 3) uint8, objects moving linearly from t=0 to t=1."""
    frames = []
    for f in range(num_frames):
        t = f / max(1, num_frames - 1)
        scene = Scene(tuple(m.at(t) for m in clip.movers), clip.background)
        frames.append(np.asarray(render_scene(scene, size)))
    video = np.stack(frames)  # (T, H, W, 3)
    if clip.noise_seed is not None:
        video = (video.astype(np.int16) + _noise(clip.noise_seed, video.shape)).clip(0, 255)
    return video.astype(np.uint8)


def _background(rng: random.Random) -> tuple[int, int, int]:
    level = rng.randint(200, 235) if rng.random() < 0.5 else rng.randint(35, 70)
    return tuple(level + rng.randint(-6, 6) for _ in range(3))


def random_scene(
    rng: random.Random, lo: int = 1, hi: int = 4, favor: tuple = (None, None)
) -> Scene:
    """lo..hi objects in distinct grid cells, in reading order. favor=(kind, color) makes those
    attributes likelier (p=0.5 each), so NLVR statements about them are often true."""
    objects = []
    for cell in sorted(rng.sample(range(9), rng.randint(lo, hi))):
        row, col = divmod(cell, 3)
        kind = favor[0] if favor[0] and rng.random() < 0.5 else rng.choice(SHAPES)
        color = favor[1] if favor[1] and rng.random() < 0.5 else rng.choice(list(COLORS))
        x = (col + 0.5) / 3 + rng.uniform(-JITTER, JITTER)
        y = (row + 0.5) / 3 + rng.uniform(-JITTER, JITTER)
        objects.append(Shape(kind, color, rng.choice(SIZES), x, y))
    return Scene(tuple(objects), _background(rng), rng.getrandbits(32))


def _apart(a: Shape, b: Shape) -> bool:
    # Every shape lies inside its box of half-side RADIUS, so separated boxes never overlap.
    return max(abs(a.x - b.x), abs(a.y - b.y)) > RADIUS[a.size] + RADIUS[b.size] + 0.02


def random_clip(rng: random.Random, num_frames: int = 8) -> Clip:
    """1-3 objects with distinct colours and kinds (so "the red circle", "the red one" and "the
    circle" each name one object), each moving straight or still, never overlapping."""
    n = rng.randint(1, 3)
    while True:
        movers = []
        for kind, color in zip(rng.sample(SHAPES, n), rng.sample(list(COLORS), n), strict=True):
            size, direction = rng.choice(SIZES), rng.choice(DIRECTIONS)
            dist = rng.uniform(0.3, 0.45) if direction != "still" else 0.0
            dx, dy = VELOCITY[direction]
            lo, hi = RADIUS[size] + 0.02, 1 - RADIUS[size] - 0.02  # the whole path stays in frame
            x = rng.uniform(lo - min(0, dx) * dist, hi - max(0, dx) * dist)
            y = rng.uniform(lo - min(0, dy) * dist, hi - max(0, dy) * dist)
            movers.append(Mover(Shape(kind, color, size, x, y), direction, dist))
        times = [f / max(1, num_frames - 1) for f in range(num_frames)]
        if all(
            _apart(a.at(t), b.at(t)) for t in times for a in movers for b in movers if a is not b
        ):
            return Clip(tuple(movers), _background(rng), rng.getrandbits(32))


# --- image tasks --------------------------------------------------------------------------


def vqa_question(scene: Scene, rng: random.Random) -> tuple[str, str, str, str]:
    """(question, answer, answer_type, question_type) answerable from the scene."""
    objs = scene.objects
    kinds, colors = Counter(o.kind for o in objs), Counter(o.color for o in objs)
    unique_kinds = sorted(k for k, c in kinds.items() if c == 1)
    unique_colors = sorted(c for c, n in colors.items() if n == 1)
    forms = [f for f, ok in (("color", unique_kinds), ("shape", unique_colors)) if ok]
    form = rng.choice(forms + ["count", "exists"])
    if form == "color":
        kind = rng.choice(unique_kinds)
        color = next(o.color for o in objs if o.kind == kind)
        return f"what color is the {kind}?", color, "other", "what color is the"
    if form == "shape":
        color = rng.choice(unique_colors)
        kind = next(o.kind for o in objs if o.color == color)
        return f"what shape is the {color} object?", kind, "other", "what shape is the"
    if form == "count":
        # Mostly about something present; sometimes anything, so "0" occurs too.
        if rng.random() < 0.5:
            kind = rng.choice([o.kind for o in objs] if rng.random() < 0.8 else SHAPES)
            return f"how many {PLURAL[kind]} are there?", str(kinds[kind]), "number", "how many"
        color = rng.choice([o.color for o in objs] if rng.random() < 0.8 else list(COLORS))
        q = f"how many {color} objects are there?"
        return q, str(colors[color]), "number", "how many"
    present = sorted({(o.color, o.kind) for o in objs})
    absent = [(c, k) for c in COLORS for k in SHAPES if (c, k) not in present]
    yes = rng.random() < 0.5
    color, kind = rng.choice(present if yes else absent)
    return f"is there {_an(color)} {kind}?", "yes" if yes else "no", "yes/no", "is there a"


def _human_answers(rng: random.Random, answer: str, answer_type: str) -> list[str]:
    """Ten annotator answers: 6-9 exact (so the raw majority is always right), the rest mostly
    variants the VQA normaliser maps back ("two", "Red", "a circle") and a few wrong ones."""
    if rng.random() < 0.1:
        return [answer] * 10
    if answer_type == "number":
        variants = [NUMBER_WORDS[int(answer)], f"{answer}."]
        wrong = [str(int(answer) + 1), str(abs(int(answer) - 1))]
    elif answer_type == "yes/no":
        variants, wrong = (
            [answer.capitalize(), f"{answer}.", answer.upper()],
            ["no" if answer == "yes" else "yes"],
        )
    else:
        variants = [answer.capitalize(), f"{answer}."]
        if answer in SHAPES:
            variants += [_an(answer), f"the {answer}"]
        wrong = [w for w in (SHAPES if answer in SHAPES else COLORS) if w != answer]
    exact = rng.randint(6, 9)
    rest = [rng.choice(variants if rng.random() < 0.7 else wrong) for _ in range(10 - exact)]
    answers = [answer] * exact + rest
    rng.shuffle(answers)
    return answers


def _vqa(rng, task, split, i, spec):
    scene = random_scene(rng)
    question, answer, answer_type, question_type = vqa_question(scene, rng)
    rec = {"question": question, "answers": _human_answers(rng, answer, answer_type),
           "answer_type": answer_type, "question_type": question_type,
           "image_id": i, "id": str(i)}  # fmt: skip
    return rec, [scene]


# (object, reference) -> whether object is <relation> reference; columns/rows never tie across
# cells because the jitter is much smaller than a cell.
RELATIONS = {"left of": lambda o, r: o.cell[1] < r.cell[1],
             "right of": lambda o, r: o.cell[1] > r.cell[1],
             "above": lambda o, r: o.cell[0] < r.cell[0],
             "below": lambda o, r: o.cell[0] > r.cell[0]}  # fmt: skip


def _gqa(rng, task, split, i, spec):
    while True:
        scene = random_scene(rng, 2, 4)
        objs = scene.objects
        names = Counter(o.name for o in objs)
        named = [o for o in objs if names[o.name] == 1]  # can be referred to unambiguously
        asks = []
        for ref in named:
            for rel, test in RELATIONS.items():
                hits = [o for o in objs if o is not ref and test(o, ref)]
                if len(hits) == 1:  # "the shape left of X" must have a unique answer
                    asks.append((f"what color is the shape {rel} the {ref.name}?", hits[0].color))
                    asks.append((f"what shape is {rel} the {ref.name}?", hits[0].kind))
        yes_no = {True: [], False: []}
        for a in named:
            for b in named:
                for rel, test in RELATIONS.items():
                    if a is not b:
                        yes_no[test(a, b)].append(f"is the {a.name} {rel} the {b.name}?")
        want = rng.random() < 0.5
        if yes_no[want] and (not asks or rng.random() < 0.3):
            question, answer = rng.choice(yes_no[want]), "yes" if want else "no"
        elif asks:
            question, answer = rng.choice(asks)
        else:
            continue
        return {"question": question, "answer": answer, "image_id": i, "id": str(i)}, [scene]


NLVR_GROUP_SIZES = (2, 3, 4)  # image pairs per statement, cycled


def _nlvr_slot(i: int) -> tuple[int, int, int]:
    """Sample index -> (statement number n, pair index within the group, group size)."""
    period, r = divmod(i, sum(NLVR_GROUP_SIZES))
    for j, size in enumerate(NLVR_GROUP_SIZES):
        if r < size:
            return period * len(NLVR_GROUP_SIZES) + j, r, size
        r -= size
    raise AssertionError


def _nlvr_statement(rng: random.Random):
    """(sentence, truth(left, right) -> bool, favor) for one statement group."""
    kind, color, k = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.randint(1, 3)
    side = rng.choice(("left", "right"))
    other = "right" if side == "left" else "left"

    def count(scene: Scene, kind=None, color=None) -> int:
        return sum(kind in (None, o.kind) and color in (None, o.color) for o in scene.objects)

    def on(side: str, left: Scene, right: Scene) -> Scene:
        return left if side == "left" else right

    def exactly(a, b):
        return count(on(side, a, b), kind) == k

    def both_color(a, b):
        return count(a, color=color) > 0 and count(b, color=color) > 0

    def both_kind(a, b):
        return count(a, kind) > 0 and count(b, kind) > 0

    def more(a, b):
        return count(on(side, a, b), kind) > count(on(other, a, b), kind)

    def same_number(a, b):
        return len(a.objects) == len(b.objects)

    def neither(a, b):
        return count(a, kind, color) + count(b, kind, color) == 0

    noun = kind if k == 1 else PLURAL[kind]
    forms = [
        (f"the {side} image contains exactly {NUMBER_WORDS[k]} {noun}", exactly, (kind, None)),
        (f"both images contain {_an(color)} object", both_color, (None, color)),
        (f"both images contain {_an(kind)}", both_kind, (kind, None)),
        (
            f"there are more {PLURAL[kind]} in the {side} image than in the {other} image",
            more,
            (kind, None),
        ),
        ("the two images contain the same number of shapes", same_number, (None, None)),
        (f"neither image contains {_an(color)} {kind}", neither, (kind, color)),
    ]
    return forms[rng.randrange(len(forms))]


def _nlvr(rng, task, split, i, spec):
    n, pair, size = _nlvr_slot(i)
    group_rng = _rng(spec, "nlvr", split, "group", n)
    sentence, truth, favor = _nlvr_statement(group_rng)
    # Balanced labels inside each group, so the whole split is ~50/50 true by construction.
    labels = [True, False] * (size // 2) + [group_rng.random() < 0.5] * (size % 2)
    group_rng.shuffle(labels)
    label = labels[pair]
    for _ in range(1000):  # rejection: the favoured attributes make either label likely
        left, right = random_scene(rng, favor=favor), random_scene(rng, favor=favor)
        if truth(left, right) == label:
            break
    identifier = f"{split}-{n}-{pair}-0"
    rec = {"sentence": sentence, "label": truth(left, right), "identifier": identifier}
    return rec | {"id": identifier}, [left, right]


def scene_captions(scene: Scene, rng: random.Random, k: int = 5) -> list[str]:
    """k distinct true captions drawn from several templates."""
    objs, n = scene.objects, len(scene.objects)
    plural = "" if n == 1 else "s"
    cands = [
        _join([_an(f"{o.color} {o.kind}") for o in objs]),
        _join([_an(f"{o.size} {o.color} {o.kind}") for o in objs]),
        f"{NUMBER_WORDS[n]} shape{plural} on a {'dark' if scene.dark else 'light'} background",
        f"there {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} object{plural} in the picture",
    ]
    for o in objs:
        cands.append(f"there is {_an(o.size)} {o.name} {POSITION[o.cell]}")
        cands.append(f"{_an(o.name)} {POSITION[o.cell]}")
    for a in objs:
        for b in objs:
            if a.cell[1] == b.cell[1] and a.cell[0] < b.cell[0]:
                cands.append(f"{_an(a.name)} above {_an(b.name)}")
            if a.cell[0] == b.cell[0] and a.cell[1] < b.cell[1]:
                cands.append(f"{_an(a.name)} to the left of {_an(b.name)}")
    return rng.sample(list(dict.fromkeys(cands)), k)


def _caption(rng, task, split, i, spec):
    scene = random_scene(rng)
    return {"captions": scene_captions(scene, rng), "image_id": i, "id": str(i)}, [scene]


# --- video tasks --------------------------------------------------------------------------


def _ts(rng: random.Random) -> list[float]:
    # The clip's span inside a longer imaginary episode, in seconds.
    start = round(rng.uniform(0.0, 90.0), 2)
    return [start, round(start + rng.uniform(2.0, 12.0), 2)]


def _subtitles(rng: random.Random, clip: Clip, focus: Mover, narrated: bool) -> str:
    """Dialogue (TV) or narration (instructional) mentioning an object; sometimes a true hint."""
    m = focus if rng.random() < 0.7 else rng.choice(clip.movers)
    name, move = m.shape.name, MOVES[m.direction]
    hint = rng.random() < 0.3
    if narrated:
        if hint:
            return f"now watch how the {name} {move[0]}."
        return rng.choice((f"first we take the {name}.", f"now look at the {name} carefully.",
                           f"here you can see the {name} on the table."))  # fmt: skip
    a, b = rng.sample(SPEAKERS, 2)
    if hint:
        return f"{a}: did you see the {name}? {b}: yes, it {move[2]}."
    return rng.choice((f"{a}: look at the {name}. {b}: what about it?",
                       f"{a}: where is the {name}? {b}: right there.",
                       f"{a}: I like the {name}. {b}: me too."))  # fmt: skip


def clip_question(clip: Clip, rng: random.Random, how2: bool):
    """(question, correct choice, choice pool, preferred distractors, focus mover).
    TVQA and How2QA ask the same facts in different words."""
    movers = clip.movers
    dirs = Counter(m.direction for m in movers)
    unique = [m for m in movers if m.direction != "still" and dirs[m.direction] == 1]
    form = rng.choice(["direction", "count"] + (["color", "which"] if unique else []))
    phrases = HOW2_DIRS if how2 else TVQA_DIRS
    if form == "direction":
        m = rng.choice(movers)
        q = (
            f"what happens to the {m.shape.name}?"
            if how2
            else f"which way does the {m.shape.name} move?"
        )
        return q, phrases[m.direction], list(phrases.values()), (), m
    if form == "count":
        q = "how many objects move in the video?" if how2 else "how many shapes are moving?"
        moving = sum(m.direction != "still" for m in movers)
        return q, NUMBER_WORDS[moving], list(NUMBER_WORDS), (), rng.choice(movers)
    m = rng.choice(unique)
    move = MOVES[m.direction]
    if form == "color":
        q = (f"what is the color of the object that {move[2]}?" if how2
             else f"what color is the shape that {move[0]}?")  # fmt: skip
        return q, m.shape.color, list(COLORS), (), m
    if how2:  # the other objects of the clip are the most tempting wrong answers
        names = [f"the {c} {k}" for c in COLORS for k in SHAPES]
        others = [f"the {o.shape.name}" for o in movers if o is not m]
        return f"which object {move[2]}?", f"the {m.shape.name}", names, others, m
    return f"which shape {move[0]}?", m.shape.kind, list(SHAPES), (), m


def _choose(rng, correct: str, pool: Sequence[str], first: Sequence[str]) -> tuple[list[str], int]:
    """Five distinct choices, the correct one at a random position."""
    wrong = [p for p in first if p != correct][:4]
    wrong += rng.sample([p for p in pool if p != correct and p not in wrong], 4 - len(wrong))
    choices = wrong + [correct]
    rng.shuffle(choices)
    return choices, choices.index(correct)


def _video_qa(rng, task, split, i, spec):
    clip = random_clip(rng, spec.num_frames)
    how2 = task == "how2qa"
    question, correct, pool, first, focus = clip_question(clip, rng, how2)
    choices, answer_idx = _choose(rng, correct, pool, first)
    rec = {"question": question, "choices": choices, "answer_idx": answer_idx,
           "subtitles": _subtitles(rng, clip, focus, narrated=how2), "ts": _ts(rng),
           "vid_name": f"{task}_{split}_{i:06d}", "id": str(i)}  # fmt: skip
    return rec, clip


def clip_captions(clip: Clip, rng: random.Random, instructional: bool) -> list[str]:
    """Three distinct true references: descriptions (TVC) or recipe-like steps (YouCook2)."""
    refs = []
    for j in range(3):  # the j-th phrasing of every motion, so references never repeat
        order = rng.sample(clip.movers, len(clip.movers))
        if instructional:
            refs.append(", then ".join(STEPS[m.direction][j].format(m.shape.name) for m in order))
        else:
            refs.append(_join([f"the {m.shape.name} {MOVES[m.direction][j]}" for m in order]))
    return refs


def _video_caption(rng, task, split, i, spec):
    clip = random_clip(rng, spec.num_frames)
    narrated = task == "yc2c"
    vid_name = f"{task}_{split}_{i:06d}"
    rec = {"captions": clip_captions(clip, rng, narrated),
           "subtitles": _subtitles(rng, clip, rng.choice(clip.movers), narrated),
           "ts": _ts(rng), "vid_name": vid_name, "id": vid_name}  # fmt: skip
    return rec, clip


# --- samples, shards, tokenizer -----------------------------------------------------------

# task -> (rng, task, split, i, spec) -> (record without "task", scenes or a clip)
GENERATORS = {"vqa": _vqa, "gqa": _gqa, "nlvr": _nlvr, "caption": _caption,
              "tvqa": _video_qa, "how2qa": _video_qa, "tvc": _video_caption,
              "yc2c": _video_caption}  # fmt: skip


def _rng(spec: SyntheticSpec, *parts) -> random.Random:
    # sha256 rather than hash(): str hashes are salted per process.
    key = repr((GENERATOR_VERSION, spec.seed) + parts).encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _npy_gz(array: np.ndarray) -> bytes:
    """np.save bytes, gzip-compressed (mtime=0: byte-identical output). Flat-coloured frames
    shrink ~30x, so the video shards stay small."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return gzip.compress(buf.getvalue(), compresslevel=6, mtime=0)


def make_sample(task: str, split: str, i: int, spec: SyntheticSpec, render: bool = True) -> dict:
    """Sample i of a task split: {"__key__", "json": record, payload name: bytes}. The record
    never depends on rendering, so render=False gives the same text much faster."""
    get_task(task)
    rec, visual = GENERATORS[task](_rng(spec, task, split, i), task, split, i, spec)
    sample = {"__key__": f"{task}-{split}-{i:07d}", "json": {"task": task, **rec}}
    if not render:
        return sample
    if task not in IMAGE_TASKS:
        sample["frames.npy.gz"] = _npy_gz(render_clip(visual, spec.image_size, spec.num_frames))
    elif len(visual) == 2:
        sample["img0.png"], sample["img1.png"] = (
            _png(render_scene(s, spec.image_size)) for s in visual
        )
    else:
        sample["png"] = _png(render_scene(visual[0], spec.image_size))
    return sample


def _write_shard(job: tuple) -> int:
    root, task, split, shard, start, stop, spec = job
    # Plain tarfile in webdataset's layout ({key}.{ext}, exts sorted): importing webdataset pulls
    # in torch, seconds per worker, and its TarWriter stamps the current time.
    with tarfile.open(
        Path(root) / task / f"{split}-{shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT
    ) as tar:
        for i in range(start, stop):
            sample = make_sample(task, split, i, spec)
            key = sample.pop("__key__")
            sample["json"] = json.dumps(sample["json"]).encode()
            write_sample(tar, key, sample)
    return stop - start


def _split_sizes(task: str, spec: SyntheticSpec) -> dict[str, int]:
    if task in IMAGE_TASKS:
        return {"train": spec.train_per_task, "val": spec.val_per_task}
    return {"train": spec.video_train_per_task, "val": spec.video_val_per_task}


def _shard_jobs(root: Path, task: str, split: str, n: int, spec: SyntheticSpec) -> list[tuple]:
    step = spec.samples_per_shard
    starts = range(0, n, step)
    return [(str(root), task, split, s, a, min(n, a + step), spec) for s, a in enumerate(starts)]


def _write_index(root: Path, task: str, split: str, jobs: list[tuple]) -> dict:
    shards = [{"url": shard_url(split, j[3]), "samples": j[5] - j[4]} for j in jobs]
    return write_index(Path(root) / task, task, split, shards)


def write_task_split(root: Path, task: str, split: str, n: int, spec: SyntheticSpec) -> dict:
    """Write samples 0..n-1 as {root}/{task}/{split}-NNNNN.tar plus {split}.index.json (urls
    relative to the task folder); returns the index."""
    get_task(task)
    (Path(root) / task).mkdir(parents=True, exist_ok=True)
    jobs = _shard_jobs(root, task, split, n, spec)
    for job in jobs:
        _write_shard(job)
    return _write_index(root, task, split, jobs)


def read_records(root: Path, task: str, split: str) -> Iterator[dict]:
    """The json records of a written task split, in index order (no images decoded)."""
    index = json.loads((Path(root) / task / f"{split}.index.json").read_text())
    for shard in index["shards"]:
        with tarfile.open(Path(root) / task / shard["url"]) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    yield json.load(tar.extractfile(member))


def _texts(rec: dict) -> list[str]:
    task = TASKS[rec["task"]]
    return [task.encoder_text(rec), *task.references(rec), *rec.get("choices", ())]


def _seed_pieces(texts: list[str]) -> list[tuple[str, int]]:
    """Every in-word substring (2-16 chars) seen at least twice, with its count. sentencepiece's
    own suffix-array seeding misses whole words that are always followed by a space, which in
    a templated language is most of them, leaving "which" as "wh" "ic" "h"."""
    words = Counter(w for text in texts for w in text.split())
    counts = Counter()
    for word, n in words.items():
        word = "\u2581" + word  # sentencepiece's word-start marker
        for a in range(len(word)):
            for b in range(a + 2, min(len(word), a + 16) + 1):
                counts[word[a:b]] += n
    return [(piece, n) for piece, n in counts.most_common() if n >= 2]


def train_tokenizer(root: Path, spec: SyntheticSpec) -> Path:
    """Train a sentencepiece unigram model on the text of every sample of all eight tasks (prompts,
    questions, subtitles, choices, answers, captions) and return {root}/tokenizer, which
    ``T5Tokenizer.from_pretrained(dir, extra_ids=0)`` loads. Texts are regenerated without
    rendering, so the vocabulary never depends on which shards were written."""
    import sentencepiece as spm

    texts = [
        text
        for task in ALL_TASKS
        for split, n in _split_sizes(task, spec).items()
        for i in range(n)
        for text in _texts(make_sample(task, split, i, spec, render=False)["json"])
    ]
    out = Path(root) / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp:
        seeds = Path(tmp) / "seeds.tsv"
        seeds.write_text("".join(f"{p}\t{n}\n" for p, n in _seed_pieces(texts)))
        # T5's special ids, no BOS. hard_vocab_limit=False: the world has only ~200 useful pieces.
        # split_digits: otherwise timestamps like "(12.5-" fill most of the vocabulary.
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, model_type="unigram",
            vocab_size=spec.vocab_size, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
            character_coverage=1.0, hard_vocab_limit=False, split_digits=True,
            seed_sentencepieces_file=str(seeds), num_threads=1, minloglevel=2,
        )  # fmt: skip
    (out / "spiece.model").write_bytes(_without_paths(model.getvalue()))
    return out


def _without_paths(model: bytes) -> bytes:
    """The model proto records the temp seed-file path; blank it so the file is reproducible."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:  # protobuf missing: keep the model as is, only its bytes vary
        return model
    proto = sentencepiece_model_pb2.ModelProto.FromString(model)
    proto.trainer_spec.seed_sentencepieces_file = ""
    return proto.SerializeToString(deterministic=True)


# --- the cached data set ------------------------------------------------------------------


def spec_hash(spec: SyntheticSpec) -> str:
    key = json.dumps([GENERATOR_VERSION, SCHEMA_VERSION, dataclasses.asdict(spec)], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:10]


def _is_complete(path: Path) -> bool:
    return (path / "COMPLETE").is_file()


@contextlib.contextmanager
def _lock(path: Path):
    """Best-effort inter-process lock, so ranks on one host wait instead of all generating. On
    file systems without flock the atomic rename alone still keeps the result whole."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with open(path, "a") as f:
        with contextlib.suppress(OSError):
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove_stale_temps(base: Path, name: str) -> None:
    # Temp folders are named {name}.tmp-{host}-{pid}; one whose process on this host is gone is
    # the leftover of a killed run. Other hosts' folders are left alone (their pids mean nothing).
    host = socket.gethostname()
    for tmp in base.glob(f"{name}.tmp-*"):
        owner, _, pid = tmp.name[len(name) + len(".tmp-") :].rpartition("-")
        if owner == host and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _generate(out: Path, spec: SyntheticSpec, workers: int | None) -> None:
    from tqdm import tqdm

    jobs, splits = [], {}
    for task in ALL_TASKS:
        (out / task).mkdir(parents=True)
        for split, n in _split_sizes(task, spec).items():
            splits[task, split] = _shard_jobs(out, task, split, n, spec)
            jobs += splits[task, split]
    total = sum(j[5] - j[4] for j in jobs)
    if workers is None:  # a pool costs ~1 s to start: only worth it for real sizes
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        workers = 1 if total < 2000 else min(cores or 1, len(jobs))
    # Costliest shards first (clips render 8 frames, NLVR two images) so the pool ends together.
    cost = {"nlvr": 2, "tvqa": 4, "how2qa": 4, "tvc": 4, "yc2c": 4}
    jobs.sort(key=lambda j: -(j[5] - j[4]) * cost.get(j[1], 1))
    with tqdm(total=total, unit="sample", desc="shapes world", smoothing=0) as bar:
        if workers <= 1:
            for job in jobs:
                bar.update(_write_shard(job))
        else:
            # spawn, not fork: the caller may already hold threads (torch, a data loader).
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for done in pool.imap_unordered(_write_shard, jobs):
                    bar.update(done)
        bar.set_postfix_str("tokenizer")
        train_tokenizer(out, spec)
    for (task, split), split_jobs in splits.items():
        _write_index(out, task, split, split_jobs)
    marker = {"spec": dataclasses.asdict(spec), "generator_version": GENERATOR_VERSION,
              "schema_version": SCHEMA_VERSION, "tasks": list(ALL_TASKS)}  # fmt: skip
    (out / "COMPLETE").write_text(json.dumps(marker, indent=1) + "\n")  # last: marks it whole


def ensure_synthetic(
    root: Path | None = None,
    spec: SyntheticSpec = SyntheticSpec(),
    tasks: Sequence[str] = ALL_TASKS,
    workers: int | None = None,
) -> Path:
    """Return {root}/shapes-<spec hash>, generating it first if needed (root defaults to
    $VLDS_CACHE or ~/.cache/vlds). All eight tasks and the tokenizer are always written, so the
    folder for a spec is the same whatever ``tasks`` asks for; ``tasks`` is only validated.

    Generation goes to a temp sibling that is renamed into place once complete, so a killed run
    never leaves a folder that looks finished. Racing processes on one host queue on a lock;
    across hosts each generates and the loser of the rename discards its copy (same bytes)."""
    for task in tasks:
        get_task(task)
    base = Path(root or os.environ.get("VLDS_CACHE") or Path.home() / ".cache" / "vlds")
    final = base.expanduser() / f"shapes-{spec_hash(spec)}"
    if _is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(final.parent / f"{final.name}.lock"):
        if _is_complete(final):  # another rank finished while we waited
            return final
        if final.exists():
            raise RuntimeError(f"{final} exists without a COMPLETE marker; delete it to regenerate")
        _remove_stale_temps(final.parent, final.name)
        tmp = final.parent / f"{final.name}.tmp-{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _generate(tmp, spec, workers)
            try:
                os.rename(tmp, final)
            except OSError:  # another host renamed its copy first
                if not _is_complete(final):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def majority_baseline(root: Path, task: str = "vqa", split: str = "val") -> float:
    """Accuracy of always answering the most frequent training answer: the fraction of ``split``
    questions whose majority reference (``tasks.majority_answer`` of the references; for VQA the
    10 human answers, raw strings) equals the most common majority answer of "train". Exact
    match, not VQA's soft min(1, matches/3); a model must beat this to have learned anything."""
    t = get_task(task)
    if t.generative_caption:
        raise ValueError(f"{task} is a captioning task; a majority answer is not defined")
    train = Counter(majority_answer(t.references(r)) for r in read_records(root, task, "train"))
    constant = train.most_common(1)[0][0]
    answers = [majority_answer(t.references(r)) for r in read_records(root, task, split)]
    return sum(a == constant for a in answers) / len(answers)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, help="cache root (default $VLDS_CACHE or ~/.cache/vlds)"
    )
    parser.add_argument("--workers", type=int, help="processes (default: all cores)")
    for f in dataclasses.fields(SyntheticSpec):
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default
        )
    args = parser.parse_args(argv)
    spec = SyntheticSpec(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(SyntheticSpec)}
    )
    start = time.perf_counter()
    path = ensure_synthetic(args.out, spec, workers=args.workers)
    seconds = time.perf_counter() - start
    print(f"{'task':<8} {'split':<6} {'samples':>8} {'shards':>7} {'bytes':>13}")
    total = 0
    for task in ALL_TASKS:
        for split in ("train", "val"):
            index = json.loads((path / task / f"{split}.index.json").read_text())
            size = sum((path / task / s["url"]).stat().st_size for s in index["shards"])
            total += size
            print(f"{task:<8} {split:<6} {index['total']:>8} {len(index['shards']):>7} {size:>13,}")
    print(f"{path}: {total / 1e6:.1f} MB of shards, ready in {seconds:.1f} s")
    return path


if __name__ == "__main__":
    main()
