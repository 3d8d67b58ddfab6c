"""The language of the eight tasks: questions, answers, statements, captions and subtitles
about shapes-world scenes and clips, and ``make_sample``, which seeds, writes and renders one
sample.

Each generator in ``GENERATORS`` takes (rng, task, split, index, spec) and returns the json
record (without "task") plus the scenes or clip it talks about; every answer is derived from
those objects, never from the pixels.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Sequence

from vlds.data.synthetic.world import (
    COLORS,
    GENERATOR_VERSION,
    HOW2_DIRS,
    MOVES,
    NUMBER_WORDS,
    PLURAL,
    POSITION,
    SHAPES,
    SPEAKERS,
    STEPS,
    TVQA_DIRS,
    Clip,
    Mover,
    Scene,
    SyntheticSpec,
    _npy_gz,
    _png,
    random_clip,
    random_scene,
    render_clip,
    render_scene,
)
from vlds.data.tasks import IMAGE_TASKS, get_task


def _an(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


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


def balanced_count(rng: random.Random) -> tuple[Scene, str, str]:
    """(scene, question, answer) of a counting question whose answer is uniform over 0..3:
    scenes are drawn until one holds the target count. Counting from random scenes would
    answer "1" most of the time, which the text alone then gives away."""
    n = rng.randrange(4)
    if rng.random() < 0.5:
        kind = rng.choice(SHAPES)
        question, favor, match = f"how many {PLURAL[kind]} are there?", (kind, None), "kind"
    else:
        color = rng.choice(list(COLORS))
        question, favor, match = f"how many {color} objects are there?", (None, color), "color"
    target = favor[0] or favor[1]
    while True:
        scene = random_scene(rng, lo=max(1, n), favor=favor)
        if sum(getattr(o, match) == target for o in scene.objects) == n:
            return scene, question, str(n)


def _vqa(rng, task, split, i, spec):
    scene = random_scene(rng)
    question, answer, answer_type, question_type = vqa_question(scene, rng)
    if answer_type == "number":  # the same share of counting questions, balanced answers
        scene, question, answer = balanced_count(rng)
    rec = {
        "question": question,
        "answers": _human_answers(rng, answer, answer_type),
        "answer_type": answer_type,
        "question_type": question_type,
        "image_id": i,
        "id": str(i),
    }
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
    """(sentence, truth(left, right) -> bool, favor) for one statement group.

    Existence statements about one image, both or neither (generator version 3). The earlier
    counting forms ("exactly two circles", "more circles in the left image", "the same number
    of shapes") stayed at chance for the tiny language model even from oracle visual tokens
    (51-55 % after 3,000 steps, bench/RESULTS.md), so NLVR2 taught no grounding; counting is
    VQA's "how many" questions."""
    kind, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    side = rng.choice(("left", "right"))

    def has(scene: Scene, kind=None, color=None) -> bool:
        return any(kind in (None, o.kind) and color in (None, o.color) for o in scene.objects)

    def on_side(a, b) -> Scene:
        return a if side == "left" else b

    forms = [
        (
            f"the {side} image contains {_an(kind)}",
            lambda a, b: has(on_side(a, b), kind),
            (kind, None),
        ),
        (
            f"the {side} image contains {_an(color)} {kind}",
            lambda a, b: has(on_side(a, b), kind, color),
            (kind, color),
        ),
        (
            f"both images contain {_an(color)} object",
            lambda a, b: has(a, color=color) and has(b, color=color),
            (None, color),
        ),
        (
            f"both images contain {_an(kind)}",
            lambda a, b: has(a, kind) and has(b, kind),
            (kind, None),
        ),
        (
            f"neither image contains {_an(color)} {kind}",
            lambda a, b: not has(a, kind, color) and not has(b, kind, color),
            (kind, color),
        ),
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
        return rng.choice(
            (
                f"first we take the {name}.",
                f"now look at the {name} carefully.",
                f"here you can see the {name} on the table.",
            )
        )
    a, b = rng.sample(SPEAKERS, 2)
    if hint:
        return f"{a}: did you see the {name}? {b}: yes, it {move[2]}."
    return rng.choice(
        (
            f"{a}: look at the {name}. {b}: what about it?",
            f"{a}: where is the {name}? {b}: right there.",
            f"{a}: I like the {name}. {b}: me too.",
        )
    )


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
        q = (
            f"what is the color of the object that {move[2]}?"
            if how2
            else f"what color is the shape that {move[0]}?"
        )
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
    rec = {
        "question": question,
        "choices": choices,
        "answer_idx": answer_idx,
        "subtitles": _subtitles(rng, clip, focus, narrated=how2),
        "ts": _ts(rng),
        "vid_name": f"{task}_{split}_{i:06d}",
        "id": str(i),
    }
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
    rec = {
        "captions": clip_captions(clip, rng, narrated),
        "subtitles": _subtitles(rng, clip, rng.choice(clip.movers), narrated),
        "ts": _ts(rng),
        "vid_name": vid_name,
        "id": vid_name,
    }
    return rec, clip


# --- samples ------------------------------------------------------------------------------

# task -> (rng, task, split, i, spec) -> (record without "task", scenes or a clip)
GENERATORS = {
    "vqa": _vqa,
    "gqa": _gqa,
    "nlvr": _nlvr,
    "caption": _caption,
    "tvqa": _video_qa,
    "how2qa": _video_qa,
    "tvc": _video_caption,
    "yc2c": _video_caption,
}


def _rng(spec: SyntheticSpec, *parts) -> random.Random:
    # sha256 rather than hash(): str hashes are salted per process.
    key = repr((GENERATOR_VERSION, spec.seed) + parts).encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))


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
