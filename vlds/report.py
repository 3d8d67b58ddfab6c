"""Plots of a run: training loss and validation scores over steps (PNG)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def plot_run(jsonl: Path, out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = [], defaultdict(list)
    for line in Path(jsonl).read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "train":
            train.append((r["step"], r["loss"]))
        elif r["kind"] == "eval":
            for k, v in r.items():
                if k not in ("step", "kind"):
                    evals[k].append((r["step"], v))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        a.plot(*zip(*train), lw=1)
    a.set(xlabel="step", ylabel="training loss", title="loss", yscale="log")
    for k, pts in sorted(evals.items()):
        b.plot(*zip(*pts), marker="o", label=k.removesuffix("/score"),
               lw=2.5 if k == "average" else 1.2)
    b.set(xlabel="step", ylabel="score (0-100)", title="validation")
    if evals:
        b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
