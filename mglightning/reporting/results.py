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
    "format_number",
    "format_results_table",
    "run_header_markdown",
    "summarise_records",
    "write_results",
]

# Metrics with a bootstrap interval: (record column, lower is more robust).
INTERVAL_METRICS: tuple[tuple[str, bool], ...] = (("distance", True), ("topk", False), ("ssim", False))


@dataclass
class ResultRow:
    """One results row: a method under one attack budget, averaged over the evaluated samples.

    `*_ci` are 95% bootstrap intervals of the mean over samples (`bootstrap_interval`). Costs are per image:
    `evals_*` count model input rows through a forward+backward (a Hessian-vector product counts 2).
    `deletion_auc`, `insertion_auc` and `convex_share` are `None` when the run did not compute them.
    """

    method: str
    label: str
    explainer: str
    display_name: str
    family: str
    epsilon: float
    surrogate: str
    samples: int
    distance: float
    distance_ci: tuple[float, float]
    topk: float
    topk_ci: tuple[float, float]
    ssim: float
    ssim_ci: tuple[float, float]
    gini: float
    zero_fraction: float
    attack_success: float
    seconds_per_image: float
    attack_seconds_per_image: float
    evals_clean: float
    evals_attack: float
    evals_attacked: float
    deletion_auc: float | None = None
    deletion_auc_ci: tuple[float, float] | None = None
    insertion_auc: float | None = None
    insertion_auc_ci: tuple[float, float] | None = None
    convex_share: float | None = None

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


def summarise_records(
    records: Any, run_info: Mapping[str, Any], resamples: int = 1000, seed: int = 0
) -> list[ResultRow]:
    """The results rows of a run from its per-sample records, in the run's row order.

    Args:
        records: a `pandas.DataFrame` of records (`read_records`).
        run_info: the run's description (`run.json`): its `rows` list gives each row's method, label, registry
            name, display name, family, budget and surrogate.
        resamples: bootstrap resamples for the intervals.
        seed: bootstrap seed.
    """
    rows: list[ResultRow] = []
    for spec in run_info["rows"]:
        part = records[records["method"] == spec["method"]].sort_values("index")
        count = len(part)

        def mean(column: str) -> float:
            if column not in part or count == 0:
                return math.nan
            return float(part[column].astype("float64").mean())

        def optional(column: str) -> float | None:
            if column not in part or part[column].isna().all():
                return None
            return float(part[column].astype("float64").mean())

        def optional_interval(column: str) -> tuple[float, float] | None:
            if optional(column) is None:
                return None
            return bootstrap_interval(part[column].to_numpy(dtype="float64"), resamples, seed=seed)

        intervals = {
            metric: bootstrap_interval(part[metric].to_numpy(), resamples, seed=seed) for metric, _ in INTERVAL_METRICS
        }
        rows.append(
            ResultRow(
                method=spec["method"],
                label=spec["label"],
                explainer=spec["explainer"],
                display_name=spec["display_name"],
                family=spec["family"],
                epsilon=float(spec["epsilon"]),
                surrogate=spec["surrogate"],
                samples=count,
                distance=mean("distance"),
                distance_ci=intervals["distance"],
                topk=mean("topk"),
                topk_ci=intervals["topk"],
                ssim=mean("ssim"),
                ssim_ci=intervals["ssim"],
                gini=mean("gini"),
                zero_fraction=mean("zero_fraction"),
                attack_success=mean("moved"),
                seconds_per_image=mean("seconds_clean"),
                attack_seconds_per_image=mean("seconds_attack"),
                evals_clean=mean("evals_clean"),
                evals_attack=mean("evals_attack"),
                evals_attacked=mean("evals_attacked"),
                deletion_auc=optional("deletion_auc"),
                deletion_auc_ci=optional_interval("deletion_auc"),
                insertion_auc=optional("insertion_auc"),
                insertion_auc_ci=optional_interval("insertion_auc"),
                convex_share=optional("convex"),
            )
        )
    return rows


def compare_paired(
    records: Any, rows: Sequence[ResultRow], resamples: int = 1000, seed: int = 0
) -> list[Comparison]:
    """Each MoreauGrad-family row against the simple gradient under the same budget, sample by sample.

    For each metric the per-sample differences `metric(method) - metric(simple gradient)` on the samples both
    rows hold are averaged, with a bootstrap interval. The verdict is "more robust" (or "less robust") when the
    whole interval lies on the robust (non-robust) side of zero, else "no clear difference".
    """
    baselines = {row.epsilon: row for row in rows if row.explainer == "simple_gradient"}
    comparisons = []
    for row in rows:
        baseline = baselines.get(row.epsilon)
        if row.family != "moreaugrad" or baseline is None:
            continue
        ours = records[records["method"] == row.method].set_index("index")
        theirs = records[records["method"] == baseline.method].set_index("index")
        shared = ours.index.intersection(theirs.index).sort_values()
        for metric, lower_is_better in INTERVAL_METRICS:
            differences = (ours.loc[shared, metric] - theirs.loc[shared, metric]).to_numpy(dtype=np.float64)
            low, high = bootstrap_interval(differences, resamples, seed=seed)
            # Differences within float round-off of zero count as zero.
            low, high = (0.0 if abs(low) < 1e-9 else low), (0.0 if abs(high) < 1e-9 else high)
            if lower_is_better:  # the robust side of zero is the negative one
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


def format_results_table(rows: Sequence[ResultRow]) -> str:
    """Markdown table, one line per row: robustness with 95% intervals, sparsity, attack success and cost.

    Columns: method, normalized distance, top-k intersection, SSIM (each `mean [low, high]`), Gini index, share
    of zero entries, attack success (share of samples the attack moved), seconds per image of the clean map,
    gradient evaluations per image (clean map / attack / attacked map), the attack's surrogate, and the
    deletion/insertion AUC and convex-regime share when the run computed them.
    """
    extras = [
        (key, title)
        for key, title in (("deletion_auc", "deletion AUC ↓"), ("insertion_auc", "insertion AUC ↑"), ("convex_share", "convex share"))
        if any(getattr(row, key) is not None for row in rows)
    ]
    header = [
        "method", "distance ↓ [95% CI]", "top-k ↑ [95% CI]", "SSIM ↑ [95% CI]", "Gini", "zero share",
        "attack success", "s / image", "grad evals / image (clean / attack / attacked)",
    ] + [title for _, title in extras] + ["surrogate"]
    lines = ["| " + " | ".join(header) + " |", "| :--- |" + " ---: |" * (len(header) - 2) + " :--- |"]
    for row in rows:
        cells = [
            row.method,
            _with_interval(row.distance, row.distance_ci),
            _with_interval(row.topk, row.topk_ci),
            _with_interval(row.ssim, row.ssim_ci),
            format_number(row.gini),
            format_number(row.zero_fraction),
            format_number(row.attack_success),
            format_number(row.seconds_per_image),
            " / ".join(format_number(value) for value in (row.evals_clean, row.evals_attack, row.evals_attacked)),
            *[format_number(getattr(row, key)) for key, _ in extras],
            row.surrogate,
        ]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def run_header_markdown(run_info: Mapping[str, Any]) -> str:
    """A readable description of the run for `results.md`: classifier, data, samples, budgets, attack, methods."""
    attack = run_info.get("attack", {})
    lines = [
        f"- **Classifier**: `{run_info.get('classifier', '?')}`",
        f"- **Dataset**: {run_info.get('dataset', '?')} (test split), {run_info.get('samples', '?')} samples, "
        f"clean accuracy {format_number(run_info.get('accuracy'))}",
        f"- **Explained class**: the model's {run_info.get('target', 'prediction')}; seed {run_info.get('seed', 0)}",
        f"- **Attack**: {attack.get('kind', '?')}, L2 budgets ε = "
        + ", ".join(format_number(eps) for eps in run_info.get("epsilons", []))
        + " (pixel units)"
        + (f", {attack['steps']} steps of size {attack['step_size']}" if attack.get("kind") == "topk" else "")
        + (f", top-k fraction {attack['topk_fraction']}" if "topk_fraction" in attack else ""),
        f"- **Intervals**: 95% percentile bootstrap over samples ({run_info.get('bootstrap_samples', 1000)} resamples)",
        "- **Methods**:",
    ]
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
    columns = [item.name for item in fields(ResultRow)]
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _csv_cell(value) for key, value in asdict(row).items()})
    atomic_write_text(paths["csv"], buffer.getvalue())

    sections = ["# Interpretation robustness", run_header_markdown(run_info), format_results_table(rows)]
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
