"""The text of an evaluation's results: numbers, the markdown results table, warnings, paired comparisons and the
run's description, as `results.md`, the console and TensorBoard show them.

Example:
    >>> print(format_results_table(summarise_records(records, description)))   # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from mglightning.evaluation.records import summary_fields
from mglightning.reporting.rows import Comparison, EvaluatedRun, ResultRow

__all__ = [
    "TITLES",
    "column_title",
    "format_comparisons",
    "format_flags",
    "format_number",
    "format_results_table",
    "run_header_markdown",
]

# Table titles of the built-in columns; any other column is titled by its name, with its direction's arrow.
TITLES = {
    "distance": "distance", "topk": "top-k", "ssim": "SSIM", "gini": "Gini", "zero_fraction": "zero share",
    "deletion_auc": "deletion AUC", "insertion_auc": "insertion AUC", "sanity": "sanity abs ρ",
    "sanity_signed": "sanity signed ρ", "sanity_control": "sanity control abs ρ", "sanity_undefined": "sanity undefined",
}


def format_comparisons(comparisons: Sequence[Comparison]) -> str:
    """One line per comparison, e.g. `MoreauGrad vs simple gradient, eps 1: top-k +0.041 [+0.012, +0.070] ...`."""
    lines = []
    for item in comparisons:
        low, high = item.interval
        lines.append(
            f"{item.method} - {item.baseline} (eps {format_number(item.epsilon)}, {item.samples} paired samples): "
            f"{item.metric} {item.difference:+.3f} [{low:+.3f}, {high:+.3f}] -> {item.verdict}"
        )
    return "\n".join(lines)


def format_number(value: Any, significant: int = 3) -> str:
    """Fixed-point with `significant` significant digits (0.412, 1.23, 0.000412); ints as they are.

    Example:
        >>> format_number(0.000412), format_number(1234.6), format_number(None)
        ('0.000412', '1235', '–')
    """
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    if magnitude < -4:  # tiny values would need a long row of zeros
        return f"{value:.{significant - 1}e}"
    return f"{value:.{max(0, significant - 1 - magnitude)}f}"


def _with_interval(value: float, interval: tuple[float, float]) -> str:
    low, high = interval
    if math.isnan(low):
        return format_number(value)
    return f"{format_number(value)} [{format_number(low)}, {format_number(high)}]"


def column_title(column: str, direction: bool | None) -> str:
    """A column's table title with its direction's arrow, e.g. `top-k ↑`."""
    arrow = "" if direction is None else (" ↑" if direction else " ↓")
    return TITLES.get(column, column) + arrow


def format_results_table(rows: Sequence[ResultRow]) -> str:
    """Markdown table, one line per row: every metric (`mean [low, high]` where its interval is shown), the
    record fields with a table title (attack success: share of samples an attack moved; seconds per image of the
    clean map; the convex-regime share and the share within Corollary 1's bound when computed), gradient
    evaluations per image (clean map / attack / attacked map), the worst attack with its count when several
    attacks ran (titled with the metric that ranks the attacks), and the attack's surrogate. A counted column (the
    sanity check's undefined samples) shows its number of samples.
    """
    if not rows:
        return ""
    first = rows[0]
    columns = list(first.directions)
    # The record fields that carry a table title, in the record's order; those never computed are left out.
    titled = [(summary, item.metadata["title"]) for summary, item in summary_fields().items() if item.metadata["title"]]
    titled = [(summary, title) for summary, title in titled if any(row.values.get(summary) is not None for row in rows)]
    several = any(row.worst_attack for row in rows)
    ranked_by = next((row.worst_attack_metric for row in rows if row.worst_attack_metric), "")
    counted = set().union(*(row.counts for row in rows))
    header = (
        ["method"]
        + [column_title(column, first.directions[column])
           + (" n" if column in counted else " [95% CI]" if column in first.shown_intervals else "")
           for column in columns]
        + [title for _, title in titled] + ["grad evals / image (clean / attack / attacked)"]
        + ([f"worst attack by {TITLES.get(ranked_by, ranked_by)} (samples)" if ranked_by
            else "worst attack (samples)"] if several else [])
        + ["surrogate"]
    )
    lines = ["| " + " | ".join(header) + " |", "| :--- |" + " ---: |" * (len(header) - 2) + " :--- |"]
    for row in rows:
        cells = [row.method]
        for column in columns:
            value = row.values.get(column)
            if column in counted:
                cell = format_number(row.counts.get(column))
            elif column in row.shown_intervals:
                cell = _with_interval(value, row.intervals[column])
            else:
                cell = format_number(value)
            cells.append(cell + (" ⚠" if column in row.flags else ""))
        cells += [format_number(row.values.get(summary)) for summary, _ in titled]
        cells.append(
            " / ".join(format_number(row.values.get(key)) for key in ("evals_clean", "evals_attack", "evals_attacked"))
        )
        if several:
            cells.append(", ".join(f"{attack} {count}" for attack, count in row.worst_attack.items()))
        cells.append(row.surrogate)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def format_flags(rows: Sequence[ResultRow]) -> str:
    """One warning line per flagged method and metric (the table marks those cells with ⚠)."""
    return "\n".join(f"WARNING: {row.method}: {message}." for row in rows for message in row.flags.values())



def run_header_markdown(run: EvaluatedRun) -> str:
    """A readable description of the run for `results.md`: classifier, data, samples, budgets, attacks, metrics
    and methods."""
    description = run.description
    lines = [
        f"- **Classifier**: `{description.classifier}`",
        f"- **Dataset**: {description.dataset} (test split), {run.samples} samples, "
        f"clean accuracy {format_number(run.accuracy)}",
        f"- **Explained class**: the model's {description.target}; seed {description.seed}",
        "- **L2 budgets** ε = " + ", ".join(format_number(eps) for eps in description.epsilons) + " (pixel units)",
        "- **Attacks**" + (" (each sample counts at its worst case over them)" if len(description.attacks) > 1
                           else "") + ":",
    ]
    for attack in description.attacks:
        settings = ", ".join(f"{key}={value}" for key, value in attack.settings.items())
        lines.append(f"  - `{attack.label}`: {attack.class_path} ({settings or 'defaults'})")
    lines.append("- **Metrics**: " + ", ".join(
        f"`{metric.label}` ({metric.class_path.rsplit('.', 1)[-1]})" for metric in description.metrics))
    lines.append(f"- **Intervals**: 95% percentile bootstrap over samples ({description.bootstrap_samples} resamples)")
    lines.append("- **Methods**:")
    for explainer in description.explainers:
        settings = ", ".join(f"{key}={value}" for key, value in explainer.settings.items())
        lines.append(f"  - `{explainer.label}`: {explainer.display_name} ({settings})")
    return "\n".join(lines)
