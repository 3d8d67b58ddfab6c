"""Prediction files in each benchmark's official submission format, written and read back.

| task            | file                       | content                                         |
|-----------------|----------------------------|-------------------------------------------------|
| vqa             | predictions_vqa.json       | [{"question_id": 1, "answer": "2"}, ...]        |
| gqa             | predictions_gqa.json       | [{"questionId": "20968", "prediction": "red"}]  |
| nlvr            | predictions_nlvr.csv       | dev-850-0-0,True  (no header, as metrics.py)    |
| caption         | predictions_caption.json   | [{"image_id": 42, "caption": "a red circle"}]   |
| tvqa, how2qa    | predictions_{task}.jsonl   | {"qid": 7, "answer_idx": 3}  (-1: no choice)    |
| tvc, yc2c       | predictions_{task}.jsonl   | {"clip_id": 5, "descs": [{"desc": "..."}]}      |

(TVQA/How2QA/TVC/YC2C as in the VALUE benchmark's starter code.)

Ids are the records' "id" (NLVR2: the identifier), written as integers when they are plain
decimal numbers, as the official files have them. `read_predictions` maps a file back to
(id, prediction string) pairs that the task's metric compares exactly as it compares the
model's own strings, so scoring a written file reproduces the in-loop numbers.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

FILE_NAMES = {
    "vqa": "predictions_vqa.json",
    "gqa": "predictions_gqa.json",
    "nlvr": "predictions_nlvr.csv",
    "caption": "predictions_caption.json",
    "tvqa": "predictions_tvqa.jsonl",
    "how2qa": "predictions_how2qa.jsonl",
    "tvc": "predictions_tvc.jsonl",
    "yc2c": "predictions_yc2c.jsonl",
}
_CHOICE = re.compile(r"a(0|[1-9][0-9]*)")  # "a3"; "a03" is not the tag the targets use


class PredictionError(ValueError):
    """A prediction file that cannot be scored, with what is wrong and where."""


def external_id(ident: str):
    """ "42" -> 42 (question/image ids are numbers in the official files); anything else as is."""
    return int(ident) if ident.isdigit() and str(int(ident)) == ident else ident


def _nlvr_label(pred: str) -> str:
    return {"true": "True", "false": "False"}.get(pred.strip().lower(), pred)


def _choice_idx(pred: str) -> int:
    m = _CHOICE.fullmatch(pred.strip())
    return int(m.group(1)) if m else -1


def write_predictions(task: str, rows: list[dict], out_dir: str | Path) -> Path:
    """rows [{"id", "prediction"[, "meta"]}] -> {out_dir}/predictions_{task}.{json,csv,jsonl}."""
    if task not in FILE_NAMES:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(FILE_NAMES)}")
    path = Path(out_dir) / FILE_NAMES[task]
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: r["id"])
    ids = [external_id(str(r["id"])) for r in rows]
    preds = [r["prediction"] for r in rows]
    if task == "vqa":
        data = [{"question_id": i, "answer": p} for i, p in zip(ids, preds, strict=True)]
    elif task == "gqa":  # GQA question ids are strings in the release
        data = [{"questionId": str(i), "prediction": p} for i, p in zip(ids, preds, strict=True)]
    elif task == "caption":
        data = [{"image_id": i, "caption": p} for i, p in zip(ids, preds, strict=True)]
    elif task == "nlvr":
        with path.open("w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            for r, p in zip(rows, preds, strict=True):
                w.writerow([r.get("meta", {}).get("identifier", r["id"]), _nlvr_label(p)])
        return path
    else:
        pairs = zip(ids, preds, strict=True)
        if task in ("tvqa", "how2qa"):
            lines = [{"qid": i, "answer_idx": _choice_idx(p)} for i, p in pairs]
        else:
            lines = [{"clip_id": i, "descs": [{"desc": p}]} for i, p in pairs]
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))
        return path
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def _fields(task: str, item, where: str, keys: tuple[str, ...]) -> list:
    if not isinstance(item, dict) or any(k not in item for k in keys):
        raise PredictionError(
            f"{where}: expected an object with keys {list(keys)} (the {task} submission format), "
            f"got {str(item)[:100]}"
        )
    return [item[k] for k in keys]


def read_predictions(task: str, path: str | Path) -> list[tuple[str, str]]:
    """(id, prediction) pairs of a submission file, in file order (duplicates kept)."""
    path = Path(path)
    if task not in FILE_NAMES:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(FILE_NAMES)}")
    if not path.is_file():
        raise PredictionError(f"prediction file {path} does not exist")
    text = path.read_text()
    out = []
    if task == "nlvr":
        for n, row in enumerate(csv.reader(text.splitlines()), 1):
            if not row:
                continue
            if len(row) != 2:
                raise PredictionError(f"{path}:{n}: expected 'identifier,True|False', got {row}")
            out.append((row[0], row[1].strip().lower()))
        return out
    if task in ("vqa", "gqa", "caption"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PredictionError(f"{path} is not valid JSON ({e})") from e
        if not isinstance(data, list):
            raise PredictionError(f"{path}: expected a JSON list of predictions")
        keys = {
            "vqa": ("question_id", "answer"),
            "gqa": ("questionId", "prediction"),
            "caption": ("image_id", "caption"),
        }[task]
        for n, item in enumerate(data):
            ident, pred = _fields(task, item, f"{path} entry {n}", keys)
            out.append((str(ident), str(pred)))
        return out
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise PredictionError(f"{path}:{n} is not a JSON line ({e})") from e
        if task in ("tvqa", "how2qa"):
            ident, idx = _fields(task, item, f"{path}:{n}", ("qid", "answer_idx"))
            out.append((str(ident), f"a{idx}"))
        else:
            ident, descs = _fields(task, item, f"{path}:{n}", ("clip_id", "descs"))
            if not descs or not isinstance(descs[0], dict) or "desc" not in descs[0]:
                raise PredictionError(f"{path}:{n}: descs must be [{{'desc': caption}}]")
            out.append((str(ident), str(descs[0]["desc"])))
    return out


def _first(xs, k: int = 5) -> str:
    xs = sorted(xs)
    return ", ".join(map(str, xs[:k])) + (", ..." if len(xs) > k else "")


def check_ids(pred_ids: list[str], ref_ids: list[str], path="predictions") -> None:
    """Every reference predicted exactly once, nothing else: otherwise one error naming how many
    ids are missing, duplicated or unknown, and the first few of each."""
    seen, dup = set(), set()
    for i in pred_ids:
        (dup if i in seen else seen).add(i)
    refs = set(ref_ids)
    missing, unknown = refs - seen, seen - refs
    problems = []
    if missing:
        problems.append(f"{len(missing)} id(s) missing ({_first(missing)})")
    if dup:
        problems.append(f"{len(dup)} duplicate id(s) ({_first(dup)})")
    if unknown:
        problems.append(f"{len(unknown)} id(s) not in the reference split ({_first(unknown)})")
    if problems:
        raise PredictionError(
            f"{path}: {'; '.join(problems)}; expected each of the {len(refs)} reference ids once"
        )
