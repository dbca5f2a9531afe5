"""Figures of an evaluation's results: robustness against the attack budget (the paper's Figure 6) and fidelity,
from the results rows, and PNG output. The saliency-map figures are in `mglightning.reporting.map_figures`.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas (`new_figure`), never through ``pyplot``:
they need no display, do not change the user's matplotlib backend and are freed once no longer referenced.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from mglightning.reporting.rows import ResultRow
from mglightning.reporting.tables import format_number

__all__ = ["MOREAUGRAD_COLOUR", "fidelity_figure", "new_figure", "robustness_figure", "save_figure"]

# Panels: (results value, panel title, whether lower values are better, the metric's (lower, upper) bounds).
Panel = tuple[str, str, bool, tuple[float | None, float | None]]
_ROBUSTNESS_PANELS: tuple[Panel, ...] = (
    ("distance", "Normalized distance", True, (0.0, 2.0)),
    ("topk", "Top-k intersection", False, (0.0, 1.0)),
    ("ssim", "SSIM", False, (None, 1.0)),
)
_TITLES = {"distance": "Normalized distance", "topk": "Top-k intersection", "ssim": "SSIM"}

# Okabe-Ito vermillion against a neutral grey: distinct for colour-blind readers and in grayscale print.
MOREAUGRAD_COLOUR = "#D55E00"
_BASELINE_COLOUR = "#8C8C8C"
_MOREAUGRAD_HATCH = "//"
# Line colours of the budget plot (Okabe-Ito, then tab10), MoreauGrad's family drawn with solid lines.
_LINE_COLOURS = ("#D55E00", "#0072B2", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")


def new_figure(width: float, height: float) -> Figure:
    """An empty figure of `width` x `height` inches, constrained layout, on its own Agg canvas (not pyplot's)."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def robustness_figure(
    rows: Sequence[ResultRow], title: str | None = None, panels: Sequence[Panel] | None = None
) -> Figure:
    """The robustness metrics of every method with their 95% intervals, like Figure 6 of the MoreauGrad paper.

    One panel per robustness metric (default: normalized distance, top-k intersection, SSIM; an evaluation
    passes its own metrics as `(column, title, lower_is_better, (lower, upper) bounds)`; an axis never runs past
    a metric's bound). With several attack budgets each panel has the
    budget on the x axis and one line per method with error bars (the paper's layout); with one budget, one
    horizontal bar per method with its interval and value. MoreauGrad-family methods are drawn in vermillion
    (solid lines, hatched bars), the baselines in other colours (dashed lines) or grey.

    Args:
        rows: the results rows (`summarise_records`), any order; rows of the same explainer `label` form a line.
        title: optional figure title, e.g. ``"CIFAR-10, L2 top-k attack"``.

    Example:
        >>> save_figure(robustness_figure(rows), "logs/eval/robustness.png")  # doctest: +SKIP
    """
    if not rows:
        raise ValueError("no results rows to draw.")
    panels = [
        (key, _TITLES.get(key, name), lower, bounds) for key, name, lower, bounds in (panels or _ROBUSTNESS_PANELS)
    ]
    if not panels:
        raise ValueError("no robustness metric to draw.")
    budgets = sorted({row.epsilon for row in rows})
    figure = _budget_lines(rows, budgets, panels) if len(budgets) > 1 else _bars(rows, panels)
    if title:
        figure.suptitle(title)
    return figure


def _interval(row: ResultRow, key: str) -> tuple[float, float]:
    return row.intervals.get(key, (math.nan, math.nan))


def _value(row: ResultRow, key: str) -> float:
    value = row.values.get(key)
    return math.nan if value is None else value


def fidelity_figure(rows: Sequence[ResultRow], title: str | None = None) -> Figure:
    """The fidelity of each method's clean maps to the model: areas under the deletion (↓) and insertion (↑)
    curves with their 95% intervals, one bar per method (rows of the first budget: the clean map does not
    depend on the budget).

    Example:
        >>> save_figure(fidelity_figure(rows), "logs/eval/fidelity.png")  # doctest: +SKIP
    """
    first = min(row.epsilon for row in rows)
    rows = [row for row in rows if row.epsilon == first and row.values.get("deletion_auc") is not None]
    if not rows:
        raise ValueError("no rows with deletion/insertion areas: evaluate with the DeletionInsertionAUC metric.")
    panels = (("deletion_auc", "Deletion AUC", True, (0.0, 1.0)), ("insertion_auc", "Insertion AUC", False, (0.0, 1.0)))
    figure = _bars(rows, panels, width=8.0, caption="more faithful")
    if title:
        figure.suptitle(title)
    return figure


def _bars(
    rows: Sequence[ResultRow],
    panels: Sequence[Panel] = _ROBUSTNESS_PANELS,
    width: float = 11.0,
    caption: str = "more robust",
) -> Figure:
    highlighted = [row.family == "moreaugrad" for row in rows]
    colours = [MOREAUGRAD_COLOUR if flag else _BASELINE_COLOUR for flag in highlighted]
    positions = np.arange(len(rows))
    figure = new_figure(width, 1.6 + 0.34 * len(rows))
    axes = np.atleast_1d(figure.subplots(1, len(panels), sharey=True))
    for ax, (key, name, lower_is_better, (lower, upper)) in zip(axes, panels):
        values = np.array([_value(row, key) for row in rows], dtype=float)
        intervals = np.array([_interval(row, key) for row in rows], dtype=float)
        errors = np.abs(np.stack([values - intervals[:, 0], intervals[:, 1] - values]))
        bars = ax.barh(
            positions, np.nan_to_num(values), xerr=np.nan_to_num(errors), color=colours, edgecolor="white",
            linewidth=0.5, error_kw={"elinewidth": 1, "capsize": 2, "ecolor": "#333333"},
        )
        for bar, flag in zip(bars, highlighted):
            if flag:
                bar.set_hatch(_MOREAUGRAD_HATCH)
        finite = intervals[np.isfinite(intervals)]
        largest = float(finite.max()) if finite.size else 1.0
        right = max(largest, 0.05 if lower_is_better else 1.0) * 1.25
        if upper is not None:  # a bounded metric's axis ends at its bound; the labels may stand past it
            right = min(right, upper)
        ax.set_xlim(0.0 if lower is None else min(0.0, lower), right)
        # Each value is written just past the end of its error bar, so the two never overlap.
        for position, value, (_, high) in zip(positions, values, intervals):
            text = "n/a" if math.isnan(value) else format_number(value)
            anchor = np.nanmax([value, high, 0.0]) if not math.isnan(value) else 0.0
            if anchor + 0.12 * right <= right:
                ax.text(anchor + 0.015 * right, position, text, va="center", fontsize=8)
            else:  # no room before the axis' end (a bounded metric near its bound): inside the bar's start
                ax.text(0.015 * right, position, text, va="center", ha="left", fontsize=8, color="white",
                        fontweight="bold")
        ax.set_title(f"{name} {'↓' if lower_is_better else '↑'}", fontsize=11)
        ax.set_xlabel(f"{'lower' if lower_is_better else 'higher'} is {caption}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(axis="y", length=0)
    axes[0].set_yticks(positions, [row.display_name.split(" (ε=")[0] for row in rows])
    axes[0].invert_yaxis()  # first method on top, as in the table
    legend = [
        Patch(facecolor=MOREAUGRAD_COLOUR, hatch=_MOREAUGRAD_HATCH, edgecolor="white", label="MoreauGrad family"),
        Patch(facecolor=_BASELINE_COLOUR, edgecolor="white", label="baselines"),
    ]
    figure.legend(
        handles=legend, loc="outside lower center", ncols=2, frameon=False,
        title=f"error bars: 95% bootstrap intervals over {rows[0].samples} samples",
        title_fontsize=8,
    )
    return figure


def _budget_lines(rows: Sequence[ResultRow], budgets: list[float], panels: Sequence[Panel]) -> Figure:
    labels = list(dict.fromkeys(row.label for row in rows))
    by_label = {label: sorted((row for row in rows if row.label == label), key=lambda r: r.epsilon) for label in labels}
    figure = new_figure(13.0, 4.2)
    axes = np.atleast_1d(figure.subplots(1, len(panels)))
    # A small horizontal offset per method keeps the error bars of neighbouring lines apart.
    span = (max(budgets) - min(budgets)) or 1.0
    offsets = np.linspace(-0.012, 0.012, len(labels)) * span
    for ax, (key, name, lower_is_better, _) in zip(axes, panels):
        for position, label in enumerate(labels):
            line = by_label[label]
            moreau = line[0].family == "moreaugrad"
            x = np.array([row.epsilon for row in line]) + offsets[position]
            y = np.array([_value(row, key) for row in line], dtype=float)
            intervals = np.array([_interval(row, key) for row in line], dtype=float)
            errors = np.abs(np.stack([y - intervals[:, 0], intervals[:, 1] - y]))
            ax.errorbar(
                x, y, yerr=np.nan_to_num(errors), marker="o" if moreau else "s", markersize=4, capsize=2,
                linestyle="-" if moreau else "--", linewidth=2.0 if moreau else 1.2,
                color=_LINE_COLOURS[position % len(_LINE_COLOURS)], label=line[0].display_name,
            )
        ax.set_xticks(budgets, [format_number(b) for b in budgets])
        ax.set_xlabel("attack budget ε (L2, pixel units)", fontsize=9)
        ax.set_title(f"{name} {'↓' if lower_is_better else '↑'}", fontsize=11)
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    handles, names = axes[0].get_legend_handles_labels()
    figure.legend(
        handles, names, loc="outside right center", frameon=False, fontsize=8,
        title=f"95% bootstrap intervals,\n{rows[0].samples} samples", title_fontsize=8,
    )
    return figure


def save_figure(figure: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Write a figure as PNG (parent folders created) and close it.

    Figures from this module are not registered with pyplot and are freed once unreferenced; a pyplot figure
    is closed with ``plt.close``. Log a figure to TensorBoard before saving it.

    Args:
        figure: the figure.
        path: destination; the ``.png`` suffix is required.
        dpi: resolution.

    Returns:
        The path written.

    Example:
        >>> save_figure(robustness_figure(rows), "logs/eval/robustness.png")  # doctest: +SKIP
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_figure writes PNG files; give a path ending in .png, got {str(path)!r}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, format="png", facecolor="white")
    if getattr(figure.canvas, "manager", None) is not None:
        import matplotlib.pyplot as plt  # only reached for figures that pyplot already manages

        plt.close(figure)
    return path


