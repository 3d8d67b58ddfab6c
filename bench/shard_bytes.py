"""Shard bytes against the input image bytes for VQA, images stored once vs once per question.

    python bench/shard_bytes.py                  # the table for bench/RESULTS.md
    python bench/shard_bytes.py --images 50      # quicker

A VQAv2 release in its official format is made in a temp folder: `--images` COCO-like JPEGs
(640 x 480, photo-like statistics, ~100 kB, as bench/data_throughput.py makes them), 3 to 8
questions per image (mean 5.36: VQAv2 train has 443,757 questions on 82,783 images), each
with its 10 answers. `python -m vlds.data.prep.shards vqa` writes it twice, in the default
layout (one tar sample per image, its questions in a group.json list) and with --no-group
(one sample per question, the image repeated), and the table gives the shard bytes of each as
a multiple of the input JPEG bytes. Target: <= 1.1x for the default layout.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.data_throughput import photo  # noqa: E402

TARGET = 1.1
ANSWERS = ["yes", "no", "2", "red", "white", "dog", "tennis", "kitchen", "1", "blue"]


def make_release(root: Path, n_images: int, seed: int = 0) -> tuple[list[str], int, int]:
    """(the converter's arguments, input image bytes, questions) of a VQAv2-format release."""
    rng = np.random.default_rng(seed)
    images = root / "val2014"
    images.mkdir(parents=True)
    qs, anns, image_bytes = [], [], 0
    for i in range(1, n_images + 1):
        data = photo(rng)
        (images / f"COCO_val2014_{i:012d}.jpg").write_bytes(data)
        image_bytes += len(data)
        for k in range(3 + rng.binomial(5, 0.472)):  # 3..8, mean 5.36
            qid = i * 1000 + k
            qs.append(
                {
                    "image_id": i,
                    "question": f"what is in picture {i}, part {k}?",
                    "question_id": qid,
                }
            )
            answers = [str(a) for a in rng.choice(ANSWERS, 10)]
            anns.append(
                {
                    "question_id": qid,
                    "image_id": i,
                    "question_type": "what is",
                    "answer_type": "other",
                    "multiple_choice_answer": answers[0],
                    "answers": [
                        {"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                        for j, a in enumerate(answers)
                    ],
                }
            )
    q = root / "v2_OpenEnded_mscoco_val2014_questions.json"
    a = root / "v2_mscoco_val2014_annotations.json"
    q.write_text(json.dumps({"data_subtype": "val2014", "questions": qs}))
    a.write_text(json.dumps({"annotations": anns}))
    args = ["vqa", "--questions", str(q), "--annotations", str(a), "--images", str(images)]
    return args, image_bytes, len(qs)


def main(argv=None) -> list[dict]:
    from vlds.data.prep.shards import main as shards_main

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=200)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        conv, image_bytes, questions = make_release(root / "release", args.images)
        for layout, extra in (
            ("one sample per image (default)", []),
            ("--no-group", ["--no-group"]),
        ):
            out = root / ("out" + "-".join(extra))
            t0 = time.perf_counter()
            s = shards_main([*conv, "--split", "val", "--out", str(out), "--quiet", *extra])
            rows.append(
                {
                    "layout": layout,
                    "images": args.images,
                    "questions": s["samples"],
                    "image_bytes": image_bytes,
                    "shard_bytes": s["bytes"],
                    "ratio": s["bytes"] / image_bytes,
                    "seconds": time.perf_counter() - t0,
                }
            )
    print(
        f"VQA shard bytes vs input JPEG bytes ({questions / args.images:.2f} questions per image)"
    )
    head = ("layout", "images", "questions", "JPEG bytes", "shard bytes", "ratio", "target")
    print("{:<32} {:>7} {:>9} {:>13} {:>13} {:>6} {:>9}".format(*head))
    for r in rows:
        ok = (
            ""
            if r["layout"] == "--no-group"
            else ("<= 1.1 ok" if r["ratio"] <= TARGET else "MISSED")
        )
        print(
            f"{r['layout']:<32} {r['images']:>7} {r['questions']:>9} {r['image_bytes']:>13,} "
            f"{r['shard_bytes']:>13,} {r['ratio']:>6.3f} {ok:>9}"
        )
    return rows


if __name__ == "__main__":
    main()
