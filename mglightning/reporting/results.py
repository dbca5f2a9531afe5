"""Results of an evaluation computed from its per-sample records: typed rows, bootstrap intervals, paired
comparisons, the markdown table and the results files.

The evaluator streams one record per (sample, method, budget) to disk (`mglightning.reporting.records`);
everything here is a function of those records and the run's description, so a table can be recomputed offline
(`python evaluate.py report <run_dir>`) without recomputing a single map.

Example:
    >>> rows = summarise_records(read_records(run_dir), run_info)          # doctest: +SKIP
    >>> print(format_results_table(rows))                                   # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Comparison",
    "ResultRow",
    "bootstrap_interval",
    "compare_paired",
    "format_comparisons",
    "format_flags",
    "format_number",
    "format_results_table",
    "run_header_markdown",
    "summarise_records",
    "write_results",
]

# Table titles of the built-in columns; any other column is titled by its name, with its direction's arrow.
_TITLES = {
    "distance": "distance", "topk": "top-k", "ssim": "SSIM", "gini": "Gini", "zero_fraction": "zero share",
    "deletion_auc": "deletion AUC", "insertion_auc": "insertion AUC", "sanity": "sanity abs ρ",
    "sanity_signed": "sanity signed ρ", "sanity_control": "sanity control abs ρ", "sanity_undefined": "sanity undefined",
}


@dataclass
class ResultRow:
    """One results row: a method under one attack budget, averaged over the evaluated samples.

    With several attacks each sample enters at its worst case over them (per metric: the highest value where
    lower is better, the lowest where higher is better), costs add up over the attacks and a sample counts as
    moved when any attack moved it; `per_attack` keeps every attack's own means and `worst_attack` says, per
    attack, for how many samples it gave the worst value of the robustness metric `worst_attack_metric` (the
    run's first metric column with a direction that needs the attack).

    Attributes:
        values: the mean of every metric column (`distance`, `topk`, ... as the run's metrics name them) and of
            every averaged record field (`attack_success`, `seconds_per_image`, `evals_clean`, ...; None when the
            run did not compute it, e.g. `convex_share`). With the convexity diagnostic, `corollary_share` is the
            share of the samples with a finite Corollary 1 bound whose map moved by at most the bound under
            every attack, and `condition_fails_share` the share of samples where the local condition
            `rho < 1 / lambda` fails (`1 - convex_share`).
        intervals: the 95% bootstrap interval of the mean of every metric column (`bootstrap_interval`).
        directions: `{metric column: higher_is_better}` (None: no direction).
        shown_intervals: the metric columns whose interval the table shows.
        flags: `{metric column: warning}` where the row's mean lies above the metric's `flag_above`, or where a
            metric with a control is not clearly below it (the sanity check's "maps may not depend on the model").
        counts: `{counted column: number of samples}` of a metric's 0/1 indicator columns (the sanity check's
            undefined samples).
    """

    method: str
    label: str
    explainer: str
    display_name: str
    family: str
    epsilon: float
    attack: str
    surrogate: str
    samples: int
    values: dict[str, float | None]
    intervals: dict[str, tuple[float, float]]
    directions: dict[str, bool | None] = field(default_factory=dict)
    shown_intervals: tuple[str, ...] = ()
    per_attack: dict[str, dict[str, float]] = field(default_factory=dict)
    worst_attack: dict[str, int] = field(default_factory=dict)
    flags: dict[str, str] = field(default_factory=dict)
    worst_attack_metric: str = ""
    counts: dict[str, int] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        # Metric values and summaries read as attributes (`row.topk`, `row.topk_ci`, `row.attack_success`).
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        if name.endswith("_ci") and name[:-3] in self.__dict__.get("intervals", {}):
            return self.__dict__["intervals"][name[:-3]]
        raise AttributeError(f"{type(self).__name__} has no {name!r}; its values are {sorted(values)}.")

    def to_dict(self) -> dict[str, Any]:
        return _json_ready(asdict(self))


@dataclass
class Comparison:
    """A paired comparison of two methods on the same samples under the same budget.

    `difference` is the mean over samples of `metric(method) - metric(baseline)`, `interval` its 95% bootstrap
    interval; `verdict` says whether `method` is significantly more or less robust by this metric.
    """

    method: str
    baseline: str
    epsilon: float
    metric: str
    samples: int
    difference: float
    interval: tuple[float, float]
    verdict: str = field(default="")

    def to_dict(self) -> dict[str, Any]:
        return _json_ready(asdict(self))


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


def worst_case(records: Any, description: Any) -> Any:
    """Each sample's worst case over the run's attacks: one record per (method, sample).

    Metric columns that depend on the attack take the worst value (highest where lower is better, lowest where
    higher is better, the mean where there is no direction); the others and the record fields combine as the
    record type declares (`first`, `any` for flags, `sum` for costs, `max`, `min`). The column `worst_attack`
    names the attack that gave the worst value of the first robustness metric (`ranking_metric`). With one
    attack, the records themselves.
    """
    from mglightning.evaluation.records import record_fields

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


def ranking_metric(description: Any) -> str | None:
    """The metric column that ranks a sample's attacks (`worst_attack`): the run's first column with a direction
    of a metric that needs the attack (e.g. `distance`), or None."""
    return next((column for metric in description.metrics if metric.needs_attack
                 for column, direction in metric.columns.items() if direction is not None), None)


def control_flag(metric: Any, column: str, control: str, part: Any, resamples: int, seed: int) -> str | None:
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


def summarise_records(records: Any, description: Any, resamples: int = 1000, seed: int = 0) -> list[ResultRow]:
    """The results rows of a run from its per-sample records, in the run's row order.

    Args:
        records: a `pandas.DataFrame` of records (`read_records`).
        description: the run's `RunDescription` (`run.json`): its rows, attacks and metrics.
        resamples: bootstrap resamples for the intervals.
        seed: bootstrap seed.
    """
    from mglightning.evaluation.records import summary_fields

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
    records: Any, rows: Sequence[ResultRow], description: Any, resamples: int = 1000, seed: int = 0
) -> list[Comparison]:
    """Each MoreauGrad-family row against the simple gradient under the same budget, sample by sample.

    For each robustness metric with an interval, the per-sample differences `metric(method) - metric(simple
    gradient)` of the worst cases over the attacks, on the samples both rows hold, are averaged, with a bootstrap
    interval. The verdict is "more robust" (or "less robust") when the whole interval lies on the robust
    (non-robust) side of zero, else "no clear difference".
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
            low, high = bootstrap_interval(differences, resamples, seed=seed)
            # Differences within float round-off of zero count as zero.
            low, high = (0.0 if abs(low) < 1e-9 else low), (0.0 if abs(high) < 1e-9 else high)
            if not higher_is_better:  # the robust side of zero is the negative one
                verdict = "more robust" if high < 0 else "less robust" if low > 0 else "no clear difference"
            else:
                verdict = "more robust" if low > 0 else "less robust" if high < 0 else "no clear difference"
            comparisons.append(
                Comparison(
                    method=row.method, baseline=baseline.method, epsilon=row.epsilon, metric=metric,
                    samples=len(shared), difference=float(differences.mean()) if len(shared) else math.nan,
                    interval=(low, high), verdict=verdict,
                )
            )
    return comparisons


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


def _title(column: str, direction: bool | None) -> str:
    arrow = "" if direction is None else (" ↑" if direction else " ↓")
    return _TITLES.get(column, column) + arrow


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
    from mglightning.evaluation.records import summary_fields

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
        + [_title(column, first.directions[column])
           + (" n" if column in counted else " [95% CI]" if column in first.shown_intervals else "")
           for column in columns]
        + [title for _, title in titled] + ["grad evals / image (clean / attack / attacked)"]
        + ([f"worst attack by {_TITLES.get(ranked_by, ranked_by)} (samples)" if ranked_by
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


def run_header_markdown(run_info: Mapping[str, Any]) -> str:
    """A readable description of the run for `results.md`: classifier, data, samples, budgets, attacks, metrics
    and methods (`run_info`: the run description's `to_dict()`, with `samples` and `accuracy`)."""
    lines = [
        f"- **Classifier**: `{run_info.get('classifier', '?')}`",
        f"- **Dataset**: {run_info.get('dataset', '?')} (test split), {run_info.get('samples', '?')} samples, "
        f"clean accuracy {format_number(run_info.get('accuracy'))}",
        f"- **Explained class**: the model's {run_info.get('target', 'prediction')}; seed {run_info.get('seed', 0)}",
        "- **L2 budgets** ε = " + ", ".join(format_number(eps) for eps in run_info.get("epsilons", []))
        + " (pixel units)",
        "- **Attacks**" + (" (each sample counts at its worst case over them)" if len(run_info.get("attacks", [])) > 1
                           else "") + ":",
    ]
    for attack in run_info.get("attacks", []):
        settings = ", ".join(f"{key}={value}" for key, value in attack.get("settings", {}).items())
        lines.append(f"  - `{attack['label']}`: {attack['class_path']} ({settings or 'defaults'})")
    lines.append("- **Metrics**: " + ", ".join(
        f"`{metric['label']}` ({metric['class_path'].rsplit('.', 1)[-1]})" for metric in run_info.get("metrics", [])))
    lines.append(
        f"- **Intervals**: 95% percentile bootstrap over samples ({run_info.get('bootstrap_samples', 1000)} resamples)"
    )
    lines.append("- **Methods**:")
    for explainer in run_info.get("explainers", []):
        settings = ", ".join(f"{key}={value}" for key, value in explainer.get("settings", {}).items())
        lines.append(f"  - `{explainer['label']}`: {explainer['display_name']} ({settings})")
    return "\n".join(lines)


def write_results(
    rows: Sequence[ResultRow],
    out_dir: str | Path,
    run_info: Mapping[str, Any],
    comparisons: Sequence[Comparison] = (),
) -> dict[str, Path]:
    """Write `results.json`, `results.csv` and `results.md` into `out_dir`, each atomically.

    Each file is written in full to a temporary name in the same folder and then renamed over the final name,
    so a failing write (full disk, killed process) leaves either the previous file or none, never a truncated
    one.

    Returns:
        `{"json": path, "csv": path, "md": path}`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "csv": out_dir / "results.csv", "md": out_dir / "results.md"}
    document = {
        "run_info": _json_ready(dict(run_info)),
        "results": {row.method: row.to_dict() for row in rows},
        "comparisons": [item.to_dict() for item in comparisons],
    }
    atomic_write_text(paths["json"], json.dumps(document, indent=2, allow_nan=False) + "\n")

    buffer = io.StringIO()
    flat = [_flat_row(row) for row in rows]
    columns = list(dict.fromkeys(key for row in flat for key in row))
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in flat:
        writer.writerow({key: _csv_cell(value) for key, value in row.items()})
    atomic_write_text(paths["csv"], buffer.getvalue())

    sections = ["# Interpretation robustness", run_header_markdown(run_info), format_results_table(rows)]
    if any(row.flags for row in rows):
        sections.append(format_flags(rows))
    if run_info.get("note"):
        sections.append("**Note.** " + str(run_info["note"]))
    if comparisons:
        sections.append("Paired comparisons (same samples):\n\n```\n" + format_comparisons(comparisons) + "\n```")
    atomic_write_text(paths["md"], "\n\n".join(sections) + "\n")
    return paths


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and an atomic rename."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def _flat_row(row: ResultRow) -> dict[str, Any]:
    """One CSV line: the row's names, then each value, with `<column>_ci` for the metric columns."""
    flat = {key: getattr(row, key) for key in ("method", "label", "explainer", "display_name", "family", "epsilon",
                                               "attack", "surrogate", "samples")}
    for key, value in row.values.items():
        flat[key] = value
        if key in row.intervals:
            flat[f"{key}_ci"] = row.intervals[key]
    for attack, count in row.worst_attack.items():
        flat[f"worst_{attack}"] = count
    return flat


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, tuple):
        return " ".join(repr(item) for item in value)
    if isinstance(value, float):
        return repr(value)  # shortest string that reads back to the same float
    return value


def _json_ready(value: Any) -> Any:
    """JSON-serialisable copy: NaN/inf become null (strict JSON), tuples lists, unknown objects strings."""
    if isinstance(value, Mapping):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, np.generic):
        return _json_ready(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    return str(value)
