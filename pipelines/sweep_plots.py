"""Matplotlib figures of a sweep for its MLflow parent run: the metric against each swept
parameter, every trial's learning curve on one chart, and a parallel-coordinates view."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

STATUS_STYLE = {"completed": ("o", "-"), "stopped": ("x", "--"), "errored": ("s", ":")}


def _axis(values: list, log_scale: bool):
    """Positions of a parameter's values on an axis: numbers as they are, anything else by category."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values], None, log_scale
    cats = sorted({str(v) for v in values})
    return [float(cats.index(str(v))) for v in values], cats, False


def metric_vs_params(rows: list[dict], space: dict, metric: str) -> plt.Figure:
    """One panel per swept key: each trial's best metric against the value it drew."""
    keys = list(space)
    cols = min(3, len(keys))
    nrows = -(-len(keys) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys):
        ax.set_visible(True)
        xs, cats, log_scale = _axis([r["params"][key] for r in rows], space[key].kind == "loguniform")
        for status, (marker, _) in STATUS_STYLE.items():
            pts = [(x, r["metric_best"]) for x, r in zip(xs, rows) if r["status"] == status]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, label=status, alpha=0.8)
        if cats:
            ax.set_xticks(range(len(cats)), cats, rotation=20, fontsize=8)
        if log_scale:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(f"best {metric}")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def learning_curves(rows: list[dict], metric: str) -> plt.Figure:
    """Every trial's metric per epoch on one chart; stopped trials dashed."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if not r["curve"]:
            continue
        x, y = zip(*r["curve"])
        marker, style = STATUS_STYLE[r["status"]]
        ax.plot(x, y, linestyle=style, marker=marker, label=f"{r['trial_id']} ({r['status']})")
    ax.set_xlabel("epochs done")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def parallel_coordinates(rows: list[dict], space: dict, metric: str) -> plt.Figure:
    """One vertical axis per swept key and one for the metric; a line per trial, coloured by
    its metric (categories spread evenly, numbers scaled to their range)."""
    keys = list(space)
    scored = [r for r in rows if not math.isnan(r["metric_best"])]
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * (len(keys) + 1)), 4.5))
    if not scored:
        ax.set_title("no trial reported the metric")
        return fig
    columns, ticks = [], []
    for key in keys:
        xs, cats, log_scale = _axis([r["params"][key] for r in scored], space[key].kind == "loguniform")
        arr = np.log10(xs) if log_scale else np.asarray(xs, dtype=float)
        lo, hi = float(np.min(arr)), float(np.max(arr))
        span = hi - lo or 1.0
        columns.append((arr - lo) / span)
        if cats:
            ticks.append([((i - lo) / span, cat) for i, cat in enumerate(cats)])
        else:
            ticks.append([(0.0, f"{(10 ** lo if log_scale else lo):.3g}"), (1.0, f"{(10 ** hi if log_scale else hi):.3g}")])
    values = np.asarray([r["metric_best"] for r in scored])
    lo, hi = float(values.min()), float(values.max())
    columns.append((values - lo) / ((hi - lo) or 1.0))
    ticks.append([(0.0, f"{lo:.3f}"), (1.0, f"{hi:.3f}")])
    data = np.stack(columns, axis=1)
    cmap = plt.get_cmap("viridis")
    for row, value in zip(data, columns[-1]):
        ax.plot(range(data.shape[1]), row, color=cmap(value), alpha=0.85)
    for i, axis_ticks in enumerate(ticks):
        ax.axvline(i, color="0.6", linewidth=0.8)
        for y, text in axis_ticks:
            ax.text(i + 0.03, y, text, fontsize=7, va="center")
    ax.set_xticks(range(data.shape[1]), keys + [f"best {metric}"], rotation=15, fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(-0.05, 1.05)
    fig.tight_layout()
    return fig


def figures(rows: list[dict], sweep, metric: str) -> dict[str, plt.Figure]:
    """The sweep's figures by artifact name."""
    space = sweep.config.sweep.space
    return {"metric_vs_params": metric_vs_params(rows, space, metric),
            "learning_curves": learning_curves(rows, metric),
            "parallel_coordinates": parallel_coordinates(rows, space, metric)}


def close(fig: plt.Figure) -> None:
    """Free a figure once logged."""
    plt.close(fig)
