"""A finished search's outputs: one row per trial, the budget, the best trial and its
best_config.json (a --config file for vlds/train.py), results.csv and heatmap.png."""

from __future__ import annotations

import csv
from pathlib import Path

from .space import Setup, lr_bin, lr_grid


def collect(result_grid, runs_dir: Path, max_steps: int) -> list[dict]:
    """A row per trial (Tune's ResultGrid): its point, last and best score, step reached."""
    rows = []
    for res in result_grid:
        point, m = res.config.get("point", res.config), res.metrics or {}
        hist = res.metrics_dataframe
        has_hist = hist is not None and "score" in hist
        step, trial_id = int(m.get("step", 0)), m.get("trial_id") or Path(res.path).name
        rows.append(
            {
                "method": point["method"],
                "lr": point["lr"],
                "reduction_factor": point["reduction_factor"],
                "score": m.get("score"),
                "best_score": float(hist["score"].max()) if has_hist else None,
                "step": step,
                "status": "error" if res.error else "finished" if step >= max_steps else "stopped",
                "trial_id": trial_id,
                "run_dir": str(runs_dir / trial_id),
            }
        )
    return sorted(rows, key=lambda r: (r["method"], r["lr"], r["reduction_factor"]))


def budget(rows: list[dict], max_steps: int, milestones: list[int]) -> dict:
    """Trial-steps the search spent (the last step each trial reached: a stopped trial halts at the
    report that stopped it) vs. running every configuration to the end."""
    spent, full = sum(r["step"] for r in rows), len(rows) * max_steps
    return {
        "configurations": len(rows),
        "max_steps": max_steps,
        "trial_steps_spent": spent,
        "trial_steps_all_to_end": full,
        "full_runs_spent": round(spent / max_steps, 2),
        "fraction": round(spent / full, 3) if full else 0.0,
        "reached": {str(t): sum(r["step"] >= t for r in rows) for t in milestones},
    }


def budget_text(b: dict) -> str:
    reached = ", ".join(f"{n} reached step {t}" for t, n in b["reached"].items())
    return (
        f"search budget: {b['trial_steps_spent']:,} trial-steps spent vs "
        f"{b['trial_steps_all_to_end']:,} to run all {b['configurations']} configurations to "
        f"step {b['max_steps']}: {b['full_runs_spent']} full runs' worth "
        f"({100 * b['fraction']:.0f}%); {reached}"
    )


def best_row(rows: list[dict]) -> dict:
    """The highest final score among the trials that trained to the end (the survivors);
    among all trials when none did."""
    pool = [r for r in rows if r["status"] == "finished" and r["score"] is not None]
    pool = pool or [r for r in rows if r["score"] is not None]
    if not pool:
        raise RuntimeError("no trial reported a score; see the trial logs in runs/")
    return max(pool, key=lambda r: r["score"])


def best_config(row: dict, setup: Setup) -> dict:
    """A --config file for vlds/train.py: the preset, the winning point and every override that
    shaped the trial's training (its step budget included), none about where or how it ran or
    was scored (the fields vlds/config.py marks "run"; a run of the winner evaluates with its
    preset's settings), nor the shapes world's folder on this machine."""
    from vlds.config import build_config, keys_with_role

    skip = set(keys_with_role("run")) | ({"data.root"} if setup.embedded_data else set())
    flat = {k: v for k, v in setup.overrides.items() if k not in skip}
    flat.update(
        {
            "train.lr": row["lr"],
            "peft.reduction_factor": row["reduction_factor"],
            "peft.method": row["method"],
            "train.max_steps": setup.max_steps,
        }
    )
    cfg = build_config(setup.preset, flat)  # typed: "16" from the command line -> 16
    nested: dict = {"preset": setup.preset}
    for key in sorted(flat):
        section, _, name = key.partition(".")
        nested.setdefault(section, {})[name] = getattr(getattr(cfg, section), name)
    return nested


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot_heatmap(rows: list[dict], path: Path, lr_range, n_bins: int, rfs: list[int]) -> None:
    """Final score per (lr bin, reduction factor), a panel per method; each cell also names the
    step its trial reached. Random search: the best trial of each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = sorted({r["method"] for r in rows})
    scored = [r["score"] for r in rows if r["score"] is not None] or [0.0]
    lo, hi = min(scored), max(max(scored), min(scored) + 1e-6)  # one colour scale, never empty
    fig, axes = plt.subplots(
        1, len(methods), squeeze=False, figsize=(2.2 + 1.6 * n_bins * len(methods), 4.4)
    )
    for ax, method in zip(axes[0], methods, strict=True):
        grid = np.full((len(rfs), n_bins), np.nan)  # (reduction factor, lr bin)
        steps = np.zeros((len(rfs), n_bins), dtype=int)
        for r in rows:
            if r["method"] == method and r["score"] is not None and r["reduction_factor"] in rfs:
                i, j = rfs.index(r["reduction_factor"]), lr_bin(r["lr"], *lr_range, n_bins)
                if np.isnan(grid[i, j]) or r["score"] > grid[i, j]:
                    grid[i, j], steps[i, j] = r["score"], r["step"]
        im = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto", vmin=lo, vmax=hi)
        mid = (lo + hi) / 2
        for i, j in zip(*np.nonzero(~np.isnan(grid)), strict=True):
            ax.text(
                j,
                i,
                f"{grid[i, j]:.1f}\n@{steps[i, j]}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if grid[i, j] < mid else "black",
            )
        ax.set_xticks(range(n_bins), [f"{x:.2g}" for x in lr_grid(*lr_range, n_bins)])
        ax.set_yticks(range(len(rfs)), [str(r) for r in rfs])
        ax.set(
            xlabel="learning rate", ylabel="reduction factor (d_model / bottleneck)", title=method
        )
    fig.colorbar(im, ax=axes[0].tolist(), label="validation score (task average)")
    fig.suptitle("search: final score @ step reached")
    fig.savefig(path, dpi=110)
    plt.close(fig)
