"""Figures for reports: which soft prompt the retriever picks per turn, and training curves.

Files only: the Agg backend is chosen before pyplot loads so plotting works on headless
training machines with no display.
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..errors import SPTError  # noqa: E402


def prompt_usage_by_turn(turns: list[int], chosen: list[int], num_prompts: int) -> np.ndarray:
    """Fraction of samples at each turn index that picked each prompt: [max_turn + 1, K].

    Row t sums to 1 when turn t occurs in `turns` and is all zeros otherwise, so the row index
    is always the turn index itself.
    """
    turns = np.asarray(list(turns), dtype=np.int64).reshape(-1)
    chosen = np.asarray(list(chosen), dtype=np.int64).reshape(-1)
    if num_prompts < 1:
        raise SPTError(f"prompt usage: num_prompts must be >= 1, got {num_prompts}")
    if turns.shape != chosen.shape:
        raise SPTError(f"prompt usage: {turns.size} turn indices but {chosen.size} chosen prompts")
    if turns.size == 0:
        return np.zeros((0, num_prompts))
    if turns.min() < 0:
        raise SPTError(f"prompt usage: turn indices must be >= 0, got {int(turns.min())}")
    if chosen.min() < 0 or chosen.max() >= num_prompts:
        bad = int(chosen[(chosen < 0) | (chosen >= num_prompts)][0])
        raise SPTError(f"prompt usage: chosen prompt {bad} outside 0..{num_prompts - 1}")
    counts = np.zeros((int(turns.max()) + 1, num_prompts))
    np.add.at(counts, (turns, chosen), 1.0)  # add.at: repeated (turn, prompt) pairs all count
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def _save(fig, path) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)  # long runs write many figures; open ones would pile up in memory
    return str(path)


def plot_prompt_usage(turns, chosen, num_prompts, path, title=None) -> str:
    """Stacked bars: x = turn index, one coloured segment per prompt with its fraction."""
    usage = prompt_usage_by_turn(turns, chosen, num_prompts)
    if usage.shape[0] == 0:
        raise SPTError("prompt usage plot: no samples to plot")
    n_turns = usage.shape[0]
    x = np.arange(n_turns)
    # tab10 keeps prompts distinguishable for the paper's K=4; larger K falls back to a ramp.
    cmap = plt.get_cmap("tab10" if num_prompts <= 10 else "viridis")
    colors = [cmap(k if num_prompts <= 10 else k / max(num_prompts - 1, 1))
              for k in range(num_prompts)]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * n_turns + 2.0), 4.0))
    bottom = np.zeros(n_turns)
    for k in range(num_prompts):
        ax.bar(x, usage[:, k], bottom=bottom, color=colors[k], label=f"prompt {k}", width=0.85)
        bottom += usage[:, k]
    ax.set_xlabel("turn index")
    ax.set_ylabel("fraction of samples")
    ax.set_ylim(0, 1)
    ax.set_xlim(-0.6, n_turns - 0.4)
    # Integer ticks only; thin them out so long dialogues stay legible.
    step = max(1, n_turns // 20)
    ax.set_xticks(x[::step])
    ax.set_title(title or "Selected prompt by conversation turn")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    return _save(fig, path)


def plot_loss_curves(curves: dict[str, list[tuple[int, float]]], path, title=None) -> str:
    """Step vs value, one line per named curve (points are sorted by step)."""
    if not curves or not any(len(points) for points in curves.values()):
        raise SPTError("loss plot: no points to plot")
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    for name, points in curves.items():
        if not points:
            continue
        points = sorted(points, key=lambda sv: sv[0])
        steps = [s for s, _ in points]
        values = [float(v) for _, v in points]
        # A lone point would be an invisible zero-length line without a marker.
        ax.plot(steps, values, label=str(name), marker="o" if len(points) == 1 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("value")
    ax.grid(True, alpha=0.3)
    ax.set_title(title or "Training curves")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_metric_bars(agg: dict, metrics, path, title=None) -> str:
    """One panel per metric, one bar per run at its mean with the spread as an error bar.

    `agg` maps run -> metric -> {"mean", "std"} (as spt_fast.evaluation.study.aggregate returns).
    """
    runs = [r for r in agg if any(m in agg[r] for m in metrics)]
    if not runs:
        raise SPTError("metric plot: no runs to plot")
    cols = min(3, len(metrics))
    rows = (len(metrics) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    cmap = plt.get_cmap("tab10")
    x = np.arange(len(runs))
    for i, metric in enumerate(metrics):
        ax = axes[i // cols][i % cols]
        means = [agg[r].get(metric, {}).get("mean", np.nan) for r in runs]
        stds = [agg[r].get(metric, {}).get("std", 0.0) for r in runs]
        ax.bar(x, means, yerr=stds, capsize=3, color=[cmap(j % 10) for j in range(len(runs))])
        ax.set_title(metric)
        ax.set_xticks(x)
        ax.set_xticklabels(runs, rotation=45, ha="right", fontsize="small")
        ax.grid(True, axis="y", alpha=0.3)
    for j in range(len(metrics), rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle(title or "Metrics per run")
    fig.tight_layout()
    return _save(fig, path)
