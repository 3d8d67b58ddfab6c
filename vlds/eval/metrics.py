"""Task metrics, keyed by task name. Each takes predictions and references, returns a dict whose
"score" (0-100, like the paper's tables) is the task's headline number.

These are the simple in-loop metrics: VQA accuracy min(1, #humans who gave the answer / 3) on
lower-cased, stripped strings; exact match for GQA and video QA; NLVR2 accuracy; CIDEr through
pycocoevalcap on lower-cased, punctuation-stripped words (no Java tokenizer needed).
"""

from __future__ import annotations

import re


def _clean(s: str) -> str:
    return s.strip().lower()


def vqa_accuracy(preds: list[str], answers: list[list[str]]) -> dict:
    scores = [
        min(1.0, sum(_clean(a) == _clean(p) for a in ans) / 3.0)
        for p, ans in zip(preds, answers, strict=True)
    ]
    return {"score": 100.0 * sum(scores) / max(1, len(scores)), "n": len(scores)}


def exact_match(preds: list[str], refs: list[list[str]]) -> dict:
    hits = [_clean(p) == _clean(r[0]) for p, r in zip(preds, refs, strict=True)]
    return {"score": 100.0 * sum(hits) / max(1, len(hits)), "n": len(hits)}


def _words(s: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", s.lower()))


def cider(preds: list[str], refs: list[list[str]]) -> dict:
    from pycocoevalcap.cider.cider import Cider

    res = {i: [_words(p) or "_"] for i, p in enumerate(preds)}
    gts = {i: [_words(r) for r in rs] for i, rs in enumerate(refs)}
    score, _ = Cider().compute_score(gts, res)
    return {"score": 100.0 * float(score), "n": len(preds)}


METRICS = {
    "vqa": vqa_accuracy,
    "gqa": exact_match,
    "nlvr": exact_match,
    "tvqa": exact_match,
    "how2qa": exact_match,
    "caption": cider,
    "tvc": cider,
    "yc2c": cider,
}
