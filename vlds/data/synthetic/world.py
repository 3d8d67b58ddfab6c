"""The shapes world: its spec, vocabulary, scenes and clips, their random draws and rendering.

A scene is up to four coloured shapes on a 3x3 grid; a clip is up to three shapes moving in
straight lines. Everything here is plain data plus PIL/numpy drawing; the words about it live
in ``language`` and the files in ``package``.
"""

from __future__ import annotations

import gzip
import io
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

from vlds.data.tasks import IMAGE_TASKS

# Part of the cache hash: bump it whenever the same spec would produce different bytes.
GENERATOR_VERSION = 3  # 2: counting answers balanced over 0..3; 3: NLVR2 existence statements

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
    train_per_task: int = 8000  # samples per image task in split "train"
    val_per_task: int = 300
    video_train_per_task: int = 600
    video_val_per_task: int = 150
    samples_per_shard: int = 500
    vocab_size: int = 512  # sentencepiece tokenizer


def _split_sizes(task: str, spec: SyntheticSpec) -> dict[str, int]:
    if task in IMAGE_TASKS:
        return {"train": spec.train_per_task, "val": spec.val_per_task}
    return {"train": spec.video_train_per_task, "val": spec.video_val_per_task}


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
