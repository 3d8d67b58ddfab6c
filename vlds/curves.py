"""A run's curves.png: training loss per task (and the validation loss, dashed) and validation
scores over steps, each task's score beside its shuffled-image score (dashed, same colour) and
its text prior (dotted line), when the run measured them (vlds.eval.grounding)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def _ema(values: list[float], alpha: float = 0.1) -> list[float]:
    """Exponential moving average: each step trains one task, so raw losses jump between tasks."""
    out, m = [], None
    for v in values:
        m = v if m is None else (1 - alpha) * m + alpha * v
        out.append(m)
    return out


def plot_run(jsonl: Path, out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses, evals = defaultdict(list), defaultdict(list)
    for line in Path(jsonl).read_text().splitlines():
        r = json.loads(line)
        kind = r.pop("kind")
        step = r.pop("step")
        for k, v in r.items():
            if kind == "train" and k.startswith("loss/"):
                losses[k.removeprefix("loss/")].append((step, v))
            elif kind == "eval":
                evals[k.removesuffix("/score")].append((step, v))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for task, pts in sorted(losses.items()):
        steps, vals = zip(*pts, strict=True)
        a.plot(steps, _ema(list(vals)), label=task, lw=1.2)
    if evals.get("loss"):  # the validation loss (eval.loss), all tasks
        steps, vals = zip(*evals["loss"], strict=True)
        a.plot(steps, vals, "k--", marker=".", lw=1.2, label="validation (all tasks)")
    a.set(xlabel="step", ylabel="loss (training: EMA)", title="loss per task", yscale="log")
    scores = {
        k: v for k, v in evals.items() if "/" not in k and k not in ("shuffled_average", "loss")
    }
    for task, pts in sorted(scores.items()):
        steps, vals = zip(*pts, strict=True)
        (line,) = b.plot(steps, vals, marker="o", label=task, lw=2.5 if task == "average" else 1.2)
        shuffled = evals.get("shuffled_average" if task == "average" else f"{task}/shuffled")
        if shuffled:
            s_steps, s_vals = zip(*shuffled, strict=True)
            b.plot(s_steps, s_vals, ls="--", marker=".", color=line.get_color(), lw=1)
        prior = evals.get(f"{task}/text_prior")
        if prior:
            b.axhline(prior[-1][1], ls=":", color=line.get_color(), lw=1)
    if any(k.endswith("/shuffled") for k in evals):
        b.plot([], [], "k--", lw=1, label="shuffled images")
    if any(k.endswith("/text_prior") for k in evals):
        b.plot([], [], "k:", lw=1, label="text prior")
    b.set(xlabel="step", ylabel="score (0-100)", title="validation")
    for ax, data in ((a, losses), (b, evals)):
        if data:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
