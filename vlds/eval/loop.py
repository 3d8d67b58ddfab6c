"""Distributed in-loop evaluation: each rank decodes its share of every task's validation split,
predictions are gathered, every sample counts exactly once, and rank 0's metrics reach all ranks.

Decoding follows the reference: greedy for QA, beam search for captions, and NLVR2 by comparing
the model's scores of "true" and "false".
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from vlds.data.tasks import get_task
from vlds.eval.metrics import METRICS


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _any_rank(flag: bool, device) -> bool:
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


@torch.no_grad()
def predict(model, tower, loader, task_name, tokenizer, cfg, device, zero3: bool):
    """(id, prediction, references) for this rank's share of one task."""
    task = get_task(task_name)
    out, it, last = [], iter(loader), None
    choices = None
    if task_name == "nlvr":
        choices = [torch.tensor(tokenizer(w).input_ids) for w in ("true", "false")]
    while True:
        batch = next(it, None)
        # ZeRO-3 generation is collective: ranks that ran out keep stepping on a dummy batch
        # (results dropped) until every rank is done.
        if not _any_rank(batch is not None, device):
            break
        real = batch is not None
        batch = batch if real else last
        if batch is None:
            raise RuntimeError(f"rank has no {task_name} validation samples; lower world size")
        last = batch
        b = tower.visual_inputs(_to(batch, device), cfg.model.max_frames)
        if choices is not None:
            scores = model.score_choices(b, choices)  # (B, 2)
            preds = ["true" if s[0] >= s[1] else "false" for s in scores.tolist()]
        else:
            beams = cfg.eval.caption_beams if task.generative_caption else cfg.eval.qa_beams
            ids = model.generate(
                b,
                num_beams=beams,
                max_new_tokens=cfg.eval.max_new_tokens,
                synced_gpus=zero3 and dist.is_initialized(),
            )
            preds = [p.strip() for p in tokenizer.batch_decode(ids, skip_special_tokens=True)]
        if real:
            out += list(zip(batch["ids"], preds, batch["refs"], strict=True))
    return out


def gather_predictions(local: list) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged = {}
    for part in parts:
        for ident, pred, refs in part:
            if ident in merged:
                raise RuntimeError(f"sample {ident} was evaluated on two ranks")
            merged[ident] = (ident, pred, refs)
    return list(merged.values())


def evaluate(model, tower, loaders: dict, tokenizer, cfg, device, zero3=False):
    """{task: metrics} plus "average" of the task scores; identical on every rank."""
    was_training = model.training
    model.eval()
    results, predictions = {}, {}
    for task_name, loader in loaders.items():
        rows = gather_predictions(
            predict(model, tower, loader, task_name, tokenizer, cfg, device, zero3)
        )
        rows.sort(key=lambda r: r[0])
        preds = [r[1] for r in rows]
        refs = [r[2] for r in rows]
        results[task_name] = METRICS[task_name](preds, refs)
        predictions[task_name] = [{"id": r[0], "prediction": r[1]} for r in rows]
    results["average"] = sum(r["score"] for r in results.values()) / max(1, len(results))
    model.train(was_training)
    return results, predictions
