"""Accuracy metrics: GQA exact match, TVQA/How2QA choice accuracy, NLVR2 accuracy + consistency.

Each follows its official script:
- GQA (eval.py of the GQA release): a prediction counts when it equals the answer string.
- TVQA / How2QA (VALUE): the predicted answer index equals the gold one; the model writes
  "a{k}", so the strings are compared.
- NLVR2 (lil-lab/nlvr, nlvr2/eval/metrics.py): prediction and label compared lower-cased;
  consistency = fraction of sentences whose every image pair is right, where the sentence of
  an identifier "{split}-{set}-{pair}-{sentence}" is the identifier with its pair part blanked
  ("dev-850-2-0" -> "dev-850--0"). The synthetic identifiers "{split}-{n}-{pair}-0" group as
  "{split}-{n}", one statement per group.
"""

from __future__ import annotations


def _pct(hits: list[bool]) -> float:
    return 100.0 * sum(hits) / max(1, len(hits))


def exact_match(preds: list[str], refs: list[list[str]], meta: list[dict] | None = None) -> dict:
    """GQA: the prediction equals the (single) reference, character for character."""
    hits = [p == r[0] for p, r in zip(preds, refs, strict=True)]
    return {"score": _pct(hits), "n": len(hits)}


def choice_accuracy(preds: list[str], refs: list[list[str]], meta: list[dict] | None = None):
    """TVQA / How2QA: the generated choice tag ("a3") equals the gold one."""
    hits = [p.strip() == r[0] for p, r in zip(preds, refs, strict=True)]
    return {"score": _pct(hits), "n": len(hits)}


def nlvr_sentence(identifier: str) -> str:
    """The official consistency group: the identifier with its third (pair) part blanked."""
    parts = identifier.split("-")
    if len(parts) < 3:
        return identifier  # not an NLVR2-style identifier: every example its own sentence
    parts[2] = ""
    return "-".join(parts)


def nlvr_accuracy(preds: list[str], refs: list[list[str]], meta: list[dict] | None = None):
    """{"score": accuracy, "consistency" (when meta carries identifiers), "n"}; 0-100."""
    hits = [p.strip().lower() == r[0].lower() for p, r in zip(preds, refs, strict=True)]
    out = {"score": _pct(hits), "n": len(hits)}
    if meta is not None and all("identifier" in m for m in meta):
        consistent: dict[str, bool] = {}
        for hit, m in zip(hits, meta, strict=True):
            key = nlvr_sentence(m["identifier"])
            consistent[key] = consistent.get(key, True) and hit
        out["consistency"] = _pct(list(consistent.values()))
        out["sentences"] = len(consistent)
    return out
