"""Task metrics, keyed by task name: `METRICS[task](preds, refs, meta=None) -> {"score": ...}`.

`preds` are the model's strings, `refs` what `Task.references` gives (VQA: the human answers;
GQA/NLVR2/TVQA/How2QA: one gold string; captions: all references), and `meta` the per-sample
record fields some metrics need (VQA answer_type/question_type for the breakdowns, NLVR2
identifier for consistency), as the eval batches carry them. "score" is the task's headline
number on the paper's 0-100 scale:

| task          | score                          | also                                       |
|---------------|--------------------------------|--------------------------------------------|
| vqa           | official VQA accuracy (vqa.py) | per_answer_type, per_question_type         |
| gqa           | exact-match accuracy           |                                            |
| nlvr          | accuracy                       | consistency (official sentence groups)     |
| tvqa, how2qa  | choice accuracy                |                                            |
| caption, tvc, | CIDEr x 100 (pycocoevalcap,    | Bleu_1..4, METEOR, ROUGE_L, CIDEr, SPICE   |
| yc2c          | PTB-tokenised)                 | when its jars are present (0-1 scale)      |

`vqa_legacy` is the older VQA scorer the reference used (`vlds.evaluate --legacy-vqa`).
"""

from __future__ import annotations

from functools import partial

from vlds.eval.accuracy import choice_accuracy, exact_match, nlvr_accuracy
from vlds.eval.caption import caption_metrics
from vlds.eval.vqa import vqa_accuracy

METRICS = {
    "vqa": vqa_accuracy,
    "gqa": exact_match,
    "nlvr": nlvr_accuracy,
    "tvqa": choice_accuracy,
    "how2qa": choice_accuracy,
    "caption": caption_metrics,
    "tvc": caption_metrics,
    "yc2c": caption_metrics,
}

vqa_legacy = partial(vqa_accuracy, legacy=True)


def task_metric(task: str, java: bool = True):
    """METRICS[task]; java=False scores captions without the JVM parts (eval.java_metrics)."""
    metric = METRICS[task]
    return partial(metric, java=False) if metric is caption_metrics and not java else metric


__all__ = ["METRICS", "task_metric", "vqa_accuracy", "vqa_legacy", "exact_match", "caption_metrics"]
