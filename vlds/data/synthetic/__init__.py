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

Modules: ``world`` (spec, shapes, scenes, clips, rendering), ``language`` (the eight tasks'
questions, captions and subtitles; ``make_sample``), ``tokenizer`` (sentencepiece training),
``package`` (shards, indexes, the cache) and ``__main__`` (the command line).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vlds.data.synthetic.language import GENERATORS, make_sample, vqa_question
from vlds.data.synthetic.package import (
    ensure_synthetic,
    spec_hash,
    write_task_split,
)
from vlds.data.synthetic.tokenizer import train_tokenizer
from vlds.data.synthetic.world import (
    COLORS,
    GENERATOR_VERSION,
    HOW2_DIRS,
    MOVES,
    NUMBER_WORDS,
    PLURAL,
    POSITION,
    SHAPES,
    TVQA_DIRS,
    Clip,
    Mover,
    Scene,
    Shape,
    SyntheticSpec,
    random_clip,
    random_scene,
    render_clip,
    render_scene,
)


def main(argv: Sequence[str] | None = None) -> Path:
    """The command line (``python -m vlds.data.synthetic``); imported on call so that running
    the package as a script does not find ``__main__`` already imported."""
    from vlds.data.synthetic.__main__ import main

    return main(argv)


__all__ = [
    "COLORS",
    "GENERATORS",
    "GENERATOR_VERSION",
    "HOW2_DIRS",
    "MOVES",
    "NUMBER_WORDS",
    "PLURAL",
    "POSITION",
    "SHAPES",
    "TVQA_DIRS",
    "Clip",
    "Mover",
    "Scene",
    "Shape",
    "SyntheticSpec",
    "ensure_synthetic",
    "main",
    "make_sample",
    "random_clip",
    "random_scene",
    "render_clip",
    "render_scene",
    "spec_hash",
    "train_tokenizer",
    "vqa_question",
    "write_task_split",
]
