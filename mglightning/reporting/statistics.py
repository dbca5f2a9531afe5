"""The statistics of an evaluation's results, from its per-sample records: each sample's worst case over the
attacks, the results rows with bootstrap intervals and warnings, and the paired comparisons with the simple
gradient.

The evaluator streams one record per (sample, method, budget, attack) to disk (`mglightning.evaluation.records`);
everything here is a function of those records and the run's description, so the results can be recomputed
offline (`python evaluate.py report <run_dir>`) without recomputing a single map.

Example:
    >>> rows = summarise_records(read_records(run_dir), description)       # doctest: +SKIP
    >>> comparisons = compare_paired(records, rows, description)            # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from mglightning.evaluation.description import MetricSpec, RunDescription
from mglightning.evaluation.records import record_fields, summary_fields
from mglightning.reporting.rows import Comparison, ResultRow

__all__ = [
    "bootstrap_interval",
    "compare_paired",
    "control_flag",
    "paired_verdict",
    "ranking_metric",
    "summarise_records",
    "worst_case",
]


def bootstrap_interval(
    values: np.ndarray, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampling samples with replacement, seeded).

    Args:
        values: `(n,)` per-sample values, in a fixed order (the evaluator sorts by dataset index, so the
            interval does not depend on the number of devices).
        resamples: number of bootstrap resamples.
        confidence: the interval's coverage.
        seed: seed of the resampling (`numpy.random.default_rng`).

    Returns:
        `(low, high)`; `(nan, nan)` for no values.

    Example:
        >>> bootstrap_interval(np.array([0.2, 0.4, 0.6, 0.8]), seed=0)
        (0.3, 0.7)
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return (math.nan, math.nan)
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"resamples must be >= 1 and confidence in (0, 1), got {resamples} and {confidence}.")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, values.size, size=(resamples, values.size))
    means = values[draws].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return (round(float(low), 12), round(float(high), 12))


def worst_case(records: Any, description: RunDescription) -> Any:
    """Each sample's worst case over the run's attacks: one record per (method, sample).

    Metric columns that depend on the attack take the worst value (highest where lower is better, lowest where
    higher is better, the mean where there is no direction); the others and the record fields combine as the
    record type declares (`first`, `any` for flags, `sum` for costs, `max`, `min`). The column `worst_attack`
    names the attack that gave the worst value of the first robustness metric (`ranking_metric`). With one
    attack, the records themselves.
    """
    attacks = [attack.label for attack in description.attacks]
    frame = records[records["attack"].isin(attacks)]
    robust = ranking_metric(description)
    if len(attacks) == 1:
        frame = frame.copy()
        frame["worst_attack"] = attacks[0]
        return frame
    combine: dict[str, Any] = {}
    for item in record_fields():
        if item.name in ("method", "index"):
            continue
        combine[item.name] = {"first": "first", "any": "max", "sum": "sum", "max": "max", "min": "min"}[
            item.metadata["across_attacks"]]
    for metric in description.metrics:
        for column, direction in metric.columns.items():
            if not metric.needs_attack:
                combine[column] = "first"
            else:
                combine[column] = "mean" if direction is None else ("min" if direction else "max")
    grouped = frame.groupby(["method", "index"], sort=True)
    combined = grouped.agg(combine).reset_index()
    combined["attack"] = "worst of " + ", ".join(attacks)
    if robust:
        key = robust
        higher = next(direction for metric in description.metrics for column, direction in metric.columns.items()
                      if column == key)
        chosen = frame.loc[grouped[key].idxmin() if higher else grouped[key].idxmax()]
        combined["worst_attack"] = chosen["attack"].to_numpy()
    else:
        combined["worst_attack"] = attacks[0]
    return combined


def ranking_metric(description: RunDescription) -> str | None:
    """The metric column that ranks a sample's attacks (`worst_attack`): the run's first column with a direction
    of a metric that needs the attack (e.g. `distance`), or None."""
    return next((column for metric in description.metrics if metric.needs_attack
                 for column, direction in metric.columns.items() if direction is not None), None)


def control_flag(metric: MetricSpec, column: str, control: str, part: Any, resamples: int, seed: int) -> str | None:
    """The warning for a row whose `column` is not clearly below its model-free `control` column, or None.

    The per-sample gaps `control - column` (an undefined sample, NaN in `column`, counts as 0: no evidence) are
    averaged with a paired 95% bootstrap interval; the row passes only when the interval's lower end is above 0.
    """
    values = part[column].to_numpy(dtype="float64")
    controls = part[control].to_numpy(dtype="float64")
    if values.size == 0:
        return None
    undefined = np.isnan(values)
    gaps = np.where(undefined, 0.0, controls - values)
    low, high = bootstrap_interval(gaps, resamples, seed=seed)
    if low > 0:
        return None
    return metric.control_message.format(
        value=float(np.nanmean(values)) if not undefined.all() else math.nan, control=float(np.mean(controls)),
        gap=float(gaps.mean()), low=low, high=high, undefined=int(undefined.sum()), samples=int(values.size),
    )


def summarise_records(
    records: Any, description: RunDescription, resamples: int = 1000, seed: int = 0
) -> list[ResultRow]:
    """The results rows of a run from its per-sample records, in the run's row order.

    Args:
        records: a `pandas.DataFrame` of records (`read_records`).
        description: the run's `RunDescription` (`run.json`): its rows, attacks and metrics.
        resamples: bootstrap resamples for the intervals.
        seed: bootstrap seed.
    """
    combined = worst_case(records, description)
    directions = {column: direction for metric in description.metrics for column, direction in metric.columns.items()}
    shown = tuple(column for metric in description.metrics if metric.interval for column in metric.columns)
    attack_columns = [column for metric in description.metrics if metric.needs_attack for column in metric.columns]
    rows: list[ResultRow] = []
    for spec in description.rows:
        attacks = list(spec.surrogates)  # the attacks that apply to this method
        part = combined[combined["method"] == spec.method].sort_values("index")
        values: dict[str, float | None] = {}
        intervals: dict[str, tuple[float, float]] = {}
        for column in directions:
            data = part[column].to_numpy(dtype="float64") if len(part) else np.array([])
            values[column] = float(np.nanmean(data)) if data.size and not np.isnan(data).all() else math.nan
            intervals[column] = bootstrap_interval(data[~np.isnan(data)], resamples, seed=seed)
        for summary, item in summary_fields().items():
            column = part[item.name].astype("float64") if len(part) else None
            values[summary] = None if column is None or column.isna().all() else float(column.mean())
        per_attack = {}
        if len(attacks) > 1:
            for attack in attacks:
                own = records[(records["method"] == spec.method) & (records["attack"] == attack)]
                per_attack[attack] = {column: float(own[column].astype("float64").mean()) for column in attack_columns}
        worst = part["worst_attack"].value_counts() if len(attacks) > 1 else {}
        if values.get("convex_share") is not None:
            values["condition_fails_share"] = 1.0 - values["convex_share"]
        flags = {
            column: metric.flag_message.format(value=values[column])
            for metric in description.metrics if metric.flag_above is not None and metric.flag_message
            for column in metric.columns
            if values.get(column) is not None and not math.isnan(values[column]) and values[column] > metric.flag_above
        }
        for metric in description.metrics:
            if metric.control and metric.control_message and metric.control[0] not in flags and len(part):
                warning = control_flag(metric, *metric.control, part, resamples, seed)
                if warning is not None:
                    flags[metric.control[0]] = warning
        counts = {
            column: int(np.nansum(part[column].to_numpy(dtype="float64")))
            for metric in description.metrics for column in metric.counted if len(part)
        }
        surrogates = [spec.surrogates[attack] for attack in attacks]
        rows.append(
            ResultRow(
                method=spec.method, label=spec.label, explainer=spec.explainer, display_name=spec.display_name,
                family=spec.family, epsilon=float(spec.epsilon),
                attack=attacks[0] if len(attacks) == 1 else "worst of " + ", ".join(attacks),
                surrogate=surrogates[0] if len(attacks) == 1 else ", ".join(
                    f"{attack}: {surrogate}" for attack, surrogate in zip(attacks, surrogates)),
                samples=len(part), values=values, intervals=intervals, directions=directions,
                shown_intervals=shown, per_attack=per_attack,
                worst_attack={attack: int(worst.get(attack, 0)) for attack in attacks} if len(attacks) > 1 else {},
                flags=flags, worst_attack_metric=(ranking_metric(description) or "") if len(attacks) > 1 else "",
                counts=counts,
            )
        )
    return rows


def compare_paired(
    records: Any, rows: Sequence[ResultRow], description: RunDescription, resamples: int = 1000, seed: int = 0
) -> list[Comparison]:
    """Each MoreauGrad-family row against the simple gradient under the same budget, sample by sample.

    For each robustness metric with an interval, the per-sample differences `metric(method) - metric(simple
    gradient)` of the worst cases over the attacks, on the samples both rows hold, are averaged, with a bootstrap
    interval and a verdict (`paired_verdict`).
    """
    combined = worst_case(records, description)
    baselines = {row.epsilon: row for row in rows if row.explainer == "simple_gradient"}
    metrics = [
        (column, direction) for metric in description.metrics if metric.needs_attack and metric.interval
        for column, direction in metric.columns.items() if direction is not None
    ]
    comparisons = []
    for row in rows:
        baseline = baselines.get(row.epsilon)
        if row.family != "moreaugrad" or baseline is None:
            continue
        ours = combined[combined["method"] == row.method].set_index("index")
        theirs = combined[combined["method"] == baseline.method].set_index("index")
        shared = ours.index.intersection(theirs.index).sort_values()
        for metric, higher_is_better in metrics:
            differences = (ours.loc[shared, metric] - theirs.loc[shared, metric]).to_numpy(dtype=np.float64)
            low, high = (_zero_within_round_off(end) for end in bootstrap_interval(differences, resamples, seed=seed))
            comparisons.append(
                Comparison(
                    method=row.method, baseline=baseline.method, epsilon=row.epsilon, metric=metric,
                    samples=len(shared), difference=float(differences.mean()) if len(shared) else math.nan,
                    interval=(low, high), verdict=paired_verdict(low, high, higher_is_better),
                )
            )
    return comparisons


def paired_verdict(low: float, high: float, higher_is_better: bool) -> str:
    """The verdict on a paired difference `method - baseline` from its interval `(low, high)`: "more robust" (or
    "less robust") when the whole interval lies on the robust (non-robust) side of zero, else "no clear
    difference". Ends within float round-off of zero count as zero.

    Example:
        >>> paired_verdict(-0.3, -0.1, higher_is_better=False), paired_verdict(-0.1, 1e-12, higher_is_better=True)
        ('more robust', 'no clear difference')
    """
    low, high = _zero_within_round_off(low), _zero_within_round_off(high)
    if not higher_is_better:  # the robust side of zero is the negative one
        return "more robust" if high < 0 else "less robust" if low > 0 else "no clear difference"
    return "more robust" if low > 0 else "less robust" if high < 0 else "no clear difference"


def _zero_within_round_off(value: float) -> float:
    """Differences within float round-off of zero count as zero."""
    return 0.0 if abs(value) < 1e-9 else value
