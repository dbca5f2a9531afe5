"""A study over several trained models: per-model results pooled with a hierarchical bootstrap.

One evaluation run folder per model (the same evaluation config, each with its own classifier weights) gives
per-sample records; a claim about the method, not about one training run, needs intervals that cover both the
models and the samples. Here every figure is pooled over the models with a **hierarchical bootstrap**: each
resample draws the models with replacement, then within each drawn model its samples with replacement, and
takes the mean over the drawn models of the per-model means (each model weighs the same, whatever its number of
samples). The pooled estimate is that mean on the data itself; the interval is the percentile interval of the
resampled statistic (`hierarchical_bootstrap`).

What the study reports, per model and pooled (`study_results`):

- every metric column of each method's worst case over the run's attacks (`worst_case`), mean and 95% interval;
- paired differences `method - baseline` on the same samples of the same model, pooled the same way, against
  the simple gradient **and** against SmoothGrad (every other method, every budget, every robustness metric),
  with the number of comparisons stated: at 95% each, about 1 in 20 verdicts can be wrong by chance alone;
- the sanity check (`ModelRandomisation`): the pooled gap `control - |rho|` (undefined samples counting 0, the
  check's own rule) and the number of undefined samples;
- Corollary 1 where the run computed the convexity diagnostic: the share of samples whose worst-attack map
  change stays within the bound (among those where the bound is finite) and the share where the local condition
  `rho < 1 / lambda` fails.

Command (writes `study.json` and `study.md` into `--out`):

    python -m mglightning.reporting.study logs/eval_cifar10_study/version_0 logs/eval_cifar10_study/version_1 \\
        logs/eval_cifar10_study/version_2 --out results/cifar10_study

`study_markdown(path_to_study_json)` renders the headline tables from the JSON alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mglightning.evaluation.description import RunDescription
from mglightning.evaluation.files import atomic_write_bytes
from mglightning.evaluation.records import read_records
from mglightning.reporting.render import commit, machine
from mglightning.reporting.rows import EvaluatedRun, json_ready
from mglightning.reporting.statistics import paired_verdict, summarise_records, worst_case
from mglightning.reporting.tables import column_title, format_number

__all__ = ["BASELINES", "hierarchical_bootstrap", "main", "study_markdown", "study_results", "write_study"]

# The registry names of the methods every other method is compared with.
BASELINES = ("simple_gradient", "smoothgrad")


def hierarchical_bootstrap(
    groups: Sequence[np.ndarray], resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, tuple[float, float]]:
    """Mean over groups (models) of the per-group means of the samples, with a two-level percentile bootstrap.

    The random draws, in this order from `numpy.random.default_rng(seed)`: `rng.integers(0, M, size=(R, M))`,
    the drawn groups of each resample; then `rng.random(size=(R, M, n_max))`, from which the `j`-th drawn group
    `g` of resample `r` takes its samples `floor(u[r, j, i] * n_g)` for `i < n_g` (with replacement).

    Args:
        groups: one `(n_g,)` array of per-sample values per group (finite; at least one value each).
        resamples: bootstrap resamples `R`.
        confidence: the interval's coverage.
        seed: seed of the draws.

    Returns:
        `(estimate, (low, high))`: the mean of the group means, and its interval.

    Example:
        >>> hierarchical_bootstrap([np.array([0.1, 0.3]), np.array([0.5, 0.7, 0.9])], resamples=200)[0]
        0.45
    """
    arrays = [np.asarray(group, dtype=np.float64).ravel() for group in groups]
    if not arrays or any(array.size == 0 for array in arrays):
        raise ValueError("hierarchical_bootstrap needs at least one group, and at least one value in every group.")
    if any(not np.isfinite(array).all() for array in arrays):
        raise ValueError("hierarchical_bootstrap: the values must be finite (leave undefined samples out first).")
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"resamples must be >= 1 and confidence in (0, 1), got {resamples} and {confidence}.")
    count = len(arrays)
    sizes = np.array([array.size for array in arrays])
    padded = np.zeros((count, sizes.max()))
    for position, array in enumerate(arrays):
        padded[position, : array.size] = array
    estimate = float(np.mean([array.mean() for array in arrays]))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, count, size=(resamples, count))
    uniforms = rng.random(size=(resamples, count, sizes.max()))
    drawn_sizes = sizes[picks]  # (R, M)
    index = np.floor(uniforms * drawn_sizes[..., None]).astype(np.int64)
    values = padded[picks[..., None], index]  # (R, M, n_max); positions past a group's size are masked below
    used = np.arange(sizes.max()) < drawn_sizes[..., None]
    means = (values * used).sum(axis=2) / drawn_sizes
    statistic = means.mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(statistic, [tail, 100 - tail])
    return round(estimate, 12), (round(float(low), 12), round(float(high), 12))


def _pooled(groups: list[np.ndarray], resamples: int, seed: int) -> dict[str, Any]:
    """Pooled mean and interval of per-model arrays; NaN values (undefined) are left out, a model with none
    defined too."""
    kept = [group[~np.isnan(group)] for group in groups]
    kept = [group for group in kept if group.size]
    if not kept:
        return {"mean": None, "interval": [None, None], "models": 0, "samples": 0}
    mean, (low, high) = hierarchical_bootstrap(kept, resamples, seed=seed)
    return {"mean": mean, "interval": [low, high], "models": len(kept), "samples": int(sum(g.size for g in kept))}


def _load_run(run_dir: Path) -> tuple[RunDescription, Any, Any]:
    description = RunDescription.load(run_dir)
    records = read_records(run_dir, description.metric_columns)
    if records.empty:
        raise ValueError(f"{run_dir} holds no records: evaluate the model first (python evaluate.py --config ...).")
    return description, records, worst_case(records, description)


def study_results(
    run_dirs: Sequence[str | Path], resamples: int = 1000, seed: int = 0, command: str | None = None
) -> dict[str, Any]:
    """The study's figures from one evaluation run folder per model (see the module docstring).

    Args:
        run_dirs: the run folders, one per model, evaluated with the same settings (only the classifier and its
            weights may differ).
        resamples: bootstrap resamples (per model and pooled).
        seed: bootstrap seed.
        command: the command line to record (default: this process's).

    Returns:
        A JSON-ready dict: `models` (per model: folder, classifier, weights' sha256, samples, accuracy, its run
        description and results rows), `methods`, `pooled`, `comparisons` with `comparison_count`, `sanity`,
        `corollary`, and the provenance (`command`, `git_commit`, `machine`, `created`).
    """
    if not run_dirs:
        raise ValueError("Give at least one evaluation run folder (one per model).")
    runs = [(Path(run_dir), *_load_run(Path(run_dir))) for run_dir in run_dirs]
    first_description = runs[0][1]
    rows = [spec.method for spec in first_description.rows]
    for run_dir, description, _, _ in runs[1:]:
        differences = [name for name in description.differences(first_description)
                       if name not in ("classifier", "classifier_sha256")]
        if differences:
            raise ValueError(
                f"{run_dir} was evaluated with other settings than {runs[0][0]} (they differ in {differences}); a "
                "study pools runs of one evaluation config that differ only in the classifier's weights."
            )
    directions = {column: direction for metric in first_description.metrics
                  for column, direction in metric.columns.items()}
    robust = [column for metric in first_description.metrics if metric.needs_attack and metric.interval
              for column, direction in metric.columns.items() if direction is not None]
    controls = [metric.control for metric in first_description.metrics if metric.control]
    counted = [column for metric in first_description.metrics for column in metric.counted]
    specs = {spec.method: spec for spec in first_description.rows}

    models = []
    per_model: list[dict[str, Any]] = []  # {method: frame indexed by sample}
    for run_dir, description, records, combined in runs:
        summary = summarise_records(records, description, resamples=resamples, seed=seed)
        run = EvaluatedRun.from_records(description, records)
        config = run_dir / "config.yaml"
        models.append({
            "run_dir": str(run_dir), "classifier": description.classifier,
            "weights_sha256": description.classifier_sha256, "samples": run.samples, "accuracy": run.accuracy,
            "config": config.read_text(encoding="utf-8") if config.is_file() else None,
            "run": description.to_dict(), "rows": {row.method: row.to_dict() for row in summary},
        })
        per_model.append({method: combined[combined["method"] == method].set_index("index").sort_index()
                          for method in rows})

    def groups(method: str, column: str) -> list[np.ndarray]:
        return [frames[method][column].to_numpy(dtype=np.float64) for frames in per_model]

    pooled = {method: {column: _pooled(groups(method, column), resamples, seed) for column in directions}
              for method in rows}

    comparisons = []
    for baseline_name in BASELINES:
        for method in rows:
            spec = specs[method]
            baseline = next((other.method for other in first_description.rows
                             if other.explainer == baseline_name and other.epsilon == spec.epsilon), None)
            # Each pair once: SmoothGrad against the simple gradient, never the reverse.
            if baseline is None or spec.explainer in BASELINES[: BASELINES.index(baseline_name) + 1]:
                continue
            for column in robust:
                differences = []
                for frames in per_model:
                    ours, theirs = frames[method][column], frames[baseline][column]
                    shared = ours.index.intersection(theirs.index).sort_values()
                    gap = (ours.loc[shared] - theirs.loc[shared]).to_numpy(dtype=np.float64)
                    differences.append(gap[~np.isnan(gap)])
                result = _pooled(differences, resamples, seed)
                low, high = result["interval"]
                comparisons.append({
                    "method": method, "baseline": baseline, "epsilon": spec.epsilon, "metric": column,
                    "difference": result["mean"], "interval": [low, high], "models": result["models"],
                    "samples": result["samples"],
                    "per_model": [float(values.mean()) if values.size else None for values in differences],
                    "verdict": "no samples" if low is None else paired_verdict(low, high, directions[column]),
                })

    sanity = {}
    for column, control in controls:
        for method in rows:
            gaps = []
            for frames in per_model:
                values = frames[method][column].to_numpy(dtype=np.float64)
                gaps.append(np.where(np.isnan(values), 0.0, frames[method][control].to_numpy(dtype=np.float64)
                                     - values))
            undefined = {name: int(sum(np.nansum(frames[method][name].to_numpy(dtype=np.float64))
                                       for frames in per_model)) for name in counted}
            gap = _pooled(gaps, resamples, seed)
            flagged = [model["run_dir"] for model in models if column in model["rows"][method]["flags"]]
            sanity[method] = {"column": column, "control": control, "gap": gap,
                              "passes": gap["interval"][0] is not None and gap["interval"][0] > 0,
                              "undefined": undefined, "flagged_models": flagged}

    corollary = {}
    for method in rows:
        holds = [frames[method]["bound_holds"].to_numpy(dtype=np.float64) for frames in per_model]
        convex = [frames[method]["convex"].to_numpy(dtype=np.float64) for frames in per_model]
        if all(np.isnan(values).all() for values in convex):
            continue
        defined = np.concatenate([values[~np.isnan(values)] for values in holds])
        condition = np.concatenate([values[~np.isnan(values)] for values in convex])
        corollary[method] = {
            "bound_holds_share": float(defined.mean()) if defined.size else None,
            "bound_defined_samples": int(defined.size),
            "condition_fails_share": float(1 - condition.mean()) if condition.size else None,
            "samples": int(condition.size),
            "per_model": [
                {"bound_holds_share": float(np.nanmean(h)) if (~np.isnan(h)).any() else None,
                 "condition_fails_share": float(1 - np.nanmean(c)) if (~np.isnan(c)).any() else None}
                for h, c in zip(holds, convex)
            ],
        }

    command = command if command is not None else " ".join(shlex.quote(part) for part in sys.argv)
    # The commit of the source that computes the study and the machine, as the documentation's results files name them.
    git_commit, described = commit(Path(__file__).resolve().parents[2]), machine()
    samples = [model.get("samples") for model in models]
    return json_ready({
        # What produced the file, in the form the documentation's rendered tables read (mglightning.reporting.render).
        "provenance": {"command": command, "commit": git_commit, "machine": described,
                       "n": f"{len(models)} models x {samples[0] if len(set(samples)) == 1 else samples} samples"},
        "title": first_description.title or "",
        "command": command, "git_commit": git_commit,
        "machine": {"description": described, "python": platform.python_version(), "torch": torch.__version__,
                    "cpu_count": os.cpu_count()},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "resamples": resamples, "seed": seed, "confidence": 0.95,
        "attacks": [attack.label for attack in first_description.attacks],
        "ranking_metric": robust[0] if robust else None,
        "columns": {column: direction for column, direction in directions.items()},
        "robustness_columns": robust,
        "methods": [{"method": spec.method, "label": spec.label, "explainer": spec.explainer,
                     "display_name": spec.display_name, "epsilon": spec.epsilon} for spec in first_description.rows],
        "models": models, "pooled": pooled, "comparisons": comparisons, "comparison_count": len(comparisons),
        "sanity": sanity, "corollary": corollary,
    })


def _cell(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("mean") is None:
        return "–"
    low, high = entry["interval"]
    return f"{format_number(entry['mean'])} [{format_number(low)}, {format_number(high)}]"


def _signed(value: float | None) -> str:
    return "–" if value is None else f"{value:+.3f}"


def _model_name(model: dict[str, Any]) -> str:
    """A model's weights file name (a checkpoint's, or the `weights` of a classifier spec) and its sha256 prefix."""
    found = re.search(r"weights='([^']+)'", model["classifier"])
    name = Path(found.group(1) if found else model["classifier"]).name
    return name + (f" sha256 {model['weights_sha256'][:12]}" if model.get("weights_sha256") else "")


def study_markdown(path: str | Path) -> str:
    """The study's headline tables in Markdown, from its `study.json` alone.

    Table 1, per method and budget: each robustness metric pooled over the models (mean [95% hierarchical
    bootstrap interval]), the sanity check (pooled |rho| and the control's, the pooled gap with its interval,
    undefined samples, the models whose row is flagged) and Corollary 1 (share of samples within the bound, share
    where the local condition fails). Table 2: the paired differences against the simple gradient and against
    SmoothGrad, with the number of comparisons.
    """
    study = json.loads(Path(path).read_text(encoding="utf-8"))
    columns = study["robustness_columns"]
    models = study["models"]
    samples = sorted({model["samples"] for model in models})
    lines = [
        f"{len(models)} models ({', '.join(_model_name(model) for model in models)}), "
        f"{'/'.join(str(n) for n in samples)} test samples each; each sample at its worst case over the attacks "
        f"{', '.join(study['attacks'])}. Intervals: 95% hierarchical bootstrap (models, then samples; "
        f"{study['resamples']} resamples). Commit {study['git_commit']}.",
        "",
    ]

    def title(column: str) -> str:
        return column_title(column, study["columns"].get(column))

    sanity, corollary = study.get("sanity", {}), study.get("corollary", {})
    header = ["method", "ε"] + [title(column) + " [95% CI]" for column in columns]
    if sanity:
        header += ["sanity abs ρ / control", "control − abs ρ [95% CI]", "undefined n", "flagged models"]
    if corollary:
        header += ["Cor. 1 bound holds", "condition fails"]
    lines += ["| " + " | ".join(header) + " |", "| :--- |" + " ---: |" * (len(header) - 1)]
    for method in study["methods"]:
        name = method["method"]
        cells = [method["display_name"], f"{method['epsilon']:g}"]
        cells += [_cell(study["pooled"][name].get(column)) for column in columns]
        if sanity:
            check = sanity.get(name)
            if check is None:
                cells += ["–"] * 4
            else:
                pooled = study["pooled"][name]
                cells += [
                    f"{format_number(pooled[check['column']]['mean'])} / "
                    f"{format_number(pooled[check['control']]['mean'])}",
                    _cell(check["gap"]) + ("" if check["passes"] else " ⚠"),
                    str(sum(check["undefined"].values())),
                    f"{len(check['flagged_models'])} of {len(models)}",
                ]
        if corollary:
            entry = corollary.get(name)
            cells += ["–", "–"] if entry is None else [
                f"{format_number(entry['bound_holds_share'])} (of {entry['bound_defined_samples']})",
                format_number(entry["condition_fails_share"]),
            ]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    comparisons = study["comparisons"]
    if comparisons:
        names = {method["method"]: method["display_name"] for method in study["methods"]}
        lines += [
            "",
            f"Paired differences (method − baseline, same samples of the same model, pooled): "
            f"{study['comparison_count']} comparisons, each at 95%, so about "
            f"{format_number(0.05 * study['comparison_count'])} verdicts may be wrong by chance alone.",
            "",
            "| method | baseline | ε | metric | difference [95% CI] | per model | verdict |",
            "| :--- | :--- | ---: | :--- | ---: | ---: | :--- |",
        ]
        for item in comparisons:
            low, high = item["interval"]
            lines.append(
                f"| {names[item['method']]} | {names[item['baseline']]} | {item['epsilon']:g} | "
                f"{title(item['metric'])} | {_signed(item['difference'])} [{_signed(low)}, {_signed(high)}] | "
                f"{', '.join(_signed(value) for value in item['per_model'])} | {item['verdict']} |"
            )
    return "\n".join(lines) + "\n"


def write_study(study: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write `study.json` and `study.md` into `out_dir`, each atomically; returns `{"json": ..., "md": ...}`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "study.json", "md": out_dir / "study.md"}
    _write_text(paths["json"], json.dumps(study, indent=1, allow_nan=False) + "\n")
    title = study.get("title") or "Study"
    _write_text(paths["md"], f"# {title}\n\n" + study_markdown(paths["json"]))
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    """`python -m mglightning.reporting.study RUN_DIR [RUN_DIR ...] --out DIR [--resamples N] [--seed S]`."""
    parser = argparse.ArgumentParser(
        prog="python -m mglightning.reporting.study",
        description="Pool evaluation runs of several models (one run folder each, same config) with a hierarchical "
                    "bootstrap; writes study.json and study.md.",
    )
    parser.add_argument("run_dirs", nargs="+", help="evaluation run folders, one per model")
    parser.add_argument("--out", required=True, help="folder for study.json and study.md")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    arguments = parser.parse_args(argv)
    command = "python -m mglightning.reporting.study " + " ".join(
        shlex.quote(part) for part in (argv if argv is not None else sys.argv[1:]))
    study = study_results(arguments.run_dirs, arguments.resamples, arguments.seed, command=command)
    paths = write_study(study, arguments.out)
    print(study_markdown(paths["json"]))
    for name, path in paths.items():
        print(f"  {name}: {path}")
    return paths


def study_headline_markdown(path: str | Path) -> str:
    """The study's first table alone (per method and budget, pooled over the models), for a page that links to the
    paired comparisons instead of repeating them (the README)."""
    table, _, comparisons = study_markdown(path).partition("\n\nPaired differences")
    count = json.loads(Path(path).read_text(encoding="utf-8"))["comparison_count"]
    return f"{table}\n\nThe {count} paired comparisons against the simple gradient and SmoothGrad are on the study's page."


def _write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), recovery="and the run folders are untouched: free some space and "
                       "run the same command again")


if __name__ == "__main__":
    main()
