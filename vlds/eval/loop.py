"""Distributed in-loop evaluation: each rank decodes its share of every task's validation split,
predictions are gathered, every sample counts exactly once, and rank 0 computes the metrics
(captions start Java once, not once per rank) and sends them to every rank.

Decoding follows the reference: greedy for QA, beam search for captions (cfg.eval.qa_beams /
caption_beams), and NLVR2 by comparing the model's "true" and "false" logits at the first decoding
position (eval.nlvr_predict="first_token", the reference's nlvr_model.py; "sequence" compares the
summed log-probabilities of the whole targets, EOS included). TVQA / How2QA generate greedily
and are scored when the text is the right choice's tag (or, with data.choice_target=text, names
the right choice); eval.choice_predict=rank takes instead the choice whose target has the largest
summed log-probability. The standalone evaluator (vlds/evaluate.py) runs the same
`evaluate_tasks` on one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from vlds import faults
from vlds.data.tasks import CHOICE_TASKS, get_task, tag_of_text
from vlds.eval.grounding import blank_visual, shuffle_visual
from vlds.eval.metrics import METRICS, task_metric
from vlds.guard import Preempted, any_ranks, stop_criteria


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def choice_labels(choices: list[list[str]], tokenizer, cfg, task) -> tuple:
    """eval.choice_predict=rank: the candidate targets of a batch of multiple-choice samples,
    as training tokenises its targets: (B, n, L) token ids, -100 past each candidate's end,
    and (B, n) True where sample i has a candidate j (n = the most choices of any sample)."""
    n = max(len(c) for c in choices)
    texts = [
        (c[j] if cfg.data.choice_target == "text" else f"a{j}") if j < len(c) else ""
        for c in choices
        for j in range(n)
    ]
    limit = cfg.data.max_target_len or task.max_target_len
    lab = tokenizer(
        texts, max_length=limit, truncation=limit is not None, padding=True, return_tensors="pt"
    )
    ids = lab.input_ids.masked_fill(lab.attention_mask == 0, -100)
    valid = torch.tensor([[j < len(c) for j in range(n)] for c in choices])
    return ids.view(len(choices), n, -1), valid


@torch.no_grad()
def predict(
    model,
    tower,
    loader,
    task_name,
    tokenizer,
    cfg,
    device,
    zero3: bool,
    shuffled=False,
    preemption=None,
):
    """(id, prediction, references, meta, loss) for this rank's share of one task; `shuffled`:
    each sample sees another sample's visual tokens (vlds.eval.grounding). loss: the sample's
    mean cross-entropy over its target tokens, teacher-forced (the validation loss; None when
    cfg.eval.loss is off, for shuffled images and for a sample without references).
    `preemption` (vlds.guard.Preemption): polled by every rank before each batch and by
    generation at each token; raises vlds.guard.Preempted on every rank once any was signalled."""
    task = get_task(task_name)
    out, it, last, prev_visual = [], iter(loader), None, None
    choices = None
    if task_name == "nlvr":
        choices = [torch.tensor(tokenizer(w).input_ids) for w in ("true", "false")]
    while True:
        batch = next(it, None)
        # ZeRO-3 generation is collective: ranks that ran out keep stepping on a dummy batch
        # (results dropped) until every rank is done.
        # (some rank still has a batch, some rank was signalled): one all-reduce per batch
        stopping = preemption is not None and preemption.local
        more, stop = any_ranks([batch is not None, stopping], device)
        if stop:
            raise Preempted
        if not more:
            break
        real = batch is not None
        batch = batch if real else last
        if batch is None:
            raise RuntimeError(f"rank has no {task_name} validation samples; lower world size")
        last = batch
        b = tower.visual_inputs(_to(batch, device), cfg.model.max_frames)
        faults.maybe_sleep("eval", 1.0)  # tests: a signal that lands during an evaluation
        if cfg.data.blind:
            b = blank_visual(b)
        elif shuffled:
            b, prev_visual = shuffle_visual(b, prev_visual), b
        losses = [None] * len(batch["ids"])
        if cfg.eval.loss and not shuffled:
            losses = [None if x != x else x for x in model.sample_losses(b).tolist()]  # NaN
        if choices is not None:
            rule = cfg.eval.nlvr_predict
            scores = model.score_choices(b, choices, rule)  # (B, 2)
            if rule == "first_token":  # the reference: true only when its logit is larger
                preds = ["true" if s[0] > s[1] else "false" for s in scores.tolist()]
            else:
                preds = ["true" if s[0] >= s[1] else "false" for s in scores.tolist()]
        elif task_name in CHOICE_TASKS and cfg.eval.choice_predict == "rank":
            labels, valid = choice_labels(batch["choices"], tokenizer, cfg, task)
            scores = model.score_targets(b, labels).masked_fill(~valid.to(device), float("-inf"))
            preds = [f"a{k}" for k in scores.argmax(dim=1).tolist()]
        else:
            beams = cfg.eval.caption_beams if task.generative_caption else cfg.eval.qa_beams
            ids = model.generate(
                b,
                num_beams=beams,
                max_new_tokens=cfg.eval.max_new_tokens or task.max_new_tokens,
                synced_gpus=zero3 and dist.is_initialized(),
                stopping_criteria=stop_criteria(preemption),
            )
            preds = [p.strip() for p in tokenizer.batch_decode(ids, skip_special_tokens=True)]
            if cfg.data.choice_target == "text" and task_name in CHOICE_TASKS:
                preds = [tag_of_text(p, c) for p, c in zip(preds, batch["choices"], strict=True)]
        if real:
            meta = batch.get("meta") or [{} for _ in preds]
            refs = batch["refs"]
            losses = [x if r else None for x, r in zip(losses, refs, strict=True)]
            out += list(zip(batch["ids"], preds, refs, meta, losses, strict=True))
    return out


def gather_predictions(local: list) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged = {}
    for part in parts:
        for row in part:
            if row[0] in merged:
                raise RuntimeError(f"sample {row[0]} was evaluated on two ranks")
            merged[row[0]] = row
    return list(merged.values())


def score_rows(task_name: str, rows: list, metric=None) -> dict:
    """Metrics of (id, prediction, references, meta) rows, in id order (float sums, and METEOR's
    corpus statistics, then add up in the same order wherever the rows came from)."""
    rows = sorted(rows, key=lambda r: r[0])
    metric = metric or METRICS[task_name]
    return metric([r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])


def from_rank0(obj):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _mean(xs: list[float]) -> float | None:
    """None when no task was scored (every split unlabelled)."""
    return sum(xs) / len(xs) if xs else None


def evaluate_tasks(
    model, tower, loaders: dict, tokenizer, cfg, device, zero3=False, metrics=None, preemption=None
):
    """({task: metrics, "average": mean score, "loss": mean validation loss}, {task: [{"id",
    "prediction", "meta"}]}), both identical on every rank. `metrics` overrides METRICS entries
    (e.g. the legacy VQA scorer). A task whose split has no labels (a test split: every
    reference empty) is predicted, not scored: {"score": None, "n", "labelled": False}, left
    out of both averages. With cfg.eval.loss each scored task's metrics hold "loss", the mean
    over its samples of each sample's teacher-forced cross-entropy (a finer signal than the
    task metric early in training: the search's rungs use it, vlds.tune.scheduler).
    `preemption`: see `predict` (training passes its own; the standalone evaluator none)."""
    was_training = model.training
    model.eval()
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    results, predictions = {}, {}
    # A blind run's images are one constant: shuffling them changes nothing.
    shuffled = cfg.eval.shuffled_images and not cfg.data.blind
    for task_name, loader in loaders.items():
        args = (model, tower, loader, task_name, tokenizer, cfg, device, zero3)
        rows = gather_predictions(predict(*args, preemption=preemption))
        rows.sort(key=lambda r: r[0])
        predictions[task_name] = [{"id": r[0], "prediction": r[1], "meta": r[3]} for r in rows]
        if not any(r[2] for r in rows):  # an unlabelled test split: predictions only
            results[task_name] = {"score": None, "n": len(rows), "labelled": False}
            continue
        metric = (metrics or {}).get(task_name) or task_metric(task_name, cfg.eval.java_metrics)
        results[task_name] = score_rows(task_name, rows, metric) if is_main else None
        losses = [r[4] for r in rows if r[4] is not None]
        if is_main and losses:
            results[task_name]["loss"] = sum(losses) / len(losses)
        if shuffled:
            rows_s = gather_predictions(predict(*args, shuffled=True, preemption=preemption))
            if is_main:
                results[task_name]["shuffled_score"] = score_rows(task_name, rows_s, metric)[
                    "score"
                ]
    results = from_rank0(results)
    scored = [t for t in results if results[t]["score"] is not None]
    results["average"] = _mean([results[t]["score"] for t in scored])
    if any("loss" in results[t] for t in scored):
        results["loss"] = _mean([results[t]["loss"] for t in scored if "loss" in results[t]])
    if shuffled:
        results["shuffled_average"] = _mean([results[t]["shuffled_score"] for t in scored])
    model.train(was_training)
    return results, predictions
