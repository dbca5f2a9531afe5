"""The end of an evaluation, and `python evaluate.py report <run_dir>`: tables, files and figures from records.

`report(run_dir)` reads the run's description (`run.json`) and its per-sample records, computes the results
rows with bootstrap intervals and the paired comparisons, writes `results.json/.csv/.md` atomically, prints the
table, and only then draws the figures (robustness vs budget, saliency grid) as PNG and, given a
`SummaryWriter`, to TensorBoard. It never recomputes a map, so it can be run again offline at any time. Metrics
added after the run from its stored maps (`<run_dir>/added/`, `mglightning.evaluation.added`) are columns like the
run's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mglightning.evaluation.added import merge_added
from mglightning.evaluation.description import RunDescription
from mglightning.evaluation.measure import GridSample
from mglightning.evaluation.records import read_records
from mglightning.reporting.figures import fidelity_figure, robustness_figure, save_figure
from mglightning.reporting.map_figures import saliency_grid
from mglightning.reporting.results import write_results
from mglightning.reporting.rows import EvaluatedRun, ResultRow
from mglightning.reporting.statistics import compare_paired, summarise_records
from mglightning.reporting.tables import format_comparisons, format_flags, format_number, format_results_table
from mglightning.reporting.tensorboard import log_to_tensorboard

__all__ = ["load_grid", "report"]


def report(
    run_dir: str | Path, experiment: Any = None, verbose: bool = True
) -> tuple[list[ResultRow], dict[str, Path]]:
    """Write the results files and figures of a run folder from its records; returns the rows and `{name: path}`.

    Args:
        run_dir: the run's folder (holds `run.json` and `records/`).
        experiment: optional TensorBoard `SummaryWriter` to log scalars, table and figures to.
        verbose: print the table, the paired comparisons and the paths.

    Example:
        >>> rows, paths = report("logs/eval_digits/version_0")     # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    description = RunDescription.load(run_dir)
    records = read_records(run_dir, description.metric_columns)
    if records.empty:
        raise ValueError(f"{run_dir} holds no records yet: the run evaluated no sample.")
    run_metrics = {metric.label for metric in description.metrics}
    records, description, notes = merge_added(run_dir, records, description)
    resamples, seed = description.bootstrap_samples, description.seed
    rows = summarise_records(records, description, resamples=resamples, seed=seed)
    comparisons = compare_paired(records, rows, description, resamples=resamples, seed=seed)
    run = EvaluatedRun.from_records(description, records)
    paths = write_results(rows, run_dir, run, comparisons)
    expected = description.planned_samples
    if verbose:
        print("\n" + format_results_table(rows))
        print(
            f"\nEvaluated {run.samples} samples" + (f" of {expected}" if expected != run.samples else "")
            + f" (clean accuracy {format_number(run.accuracy)}); intervals are 95% bootstrap intervals over samples."
            + (f" Each sample counts at its worst case over the {len(description.attacks)} attacks."
               if len(description.attacks) > 1 else "")
        )
        for row in rows:
            convex = row.values.get("convex_share")
            if convex is not None and convex < 0.5:
                print(
                    f"WARNING: for {row.method}, only {convex:.0%} of the samples have rho < 1/lambda (the "
                    "local weak-convexity estimate): the Moreau problem is likely non-convex there and Theorem 1's "
                    "robustness guarantee does not apply; try a smaller rho (a local estimate, not a certificate)."
                )
        if any(row.flags for row in rows):
            print(format_flags(rows))
        if description.note:
            print("Note: " + description.note)
        added = [metric.label for metric in description.metrics if metric.label not in run_metrics]
        if added:
            print("Added after the run from its stored maps (added/): " + ", ".join(added))
        for note in notes:
            print("WARNING: " + note)
        if comparisons:
            print("Paired comparisons with the simple gradient (same samples):\n" + format_comparisons(comparisons))
        print("  records: " + str(run_dir / "records"))
        for name, path in paths.items():
            print(f"  {name}: {path}")

    panels = [
        (column, metric.label if len(metric.columns) == 1 else column, direction is False, metric.bounds)
        for metric in description.metrics if metric.needs_attack and metric.interval
        for column, direction in metric.columns.items() if direction is not None
    ]
    figures = {"robustness": robustness_figure(rows, title=description.title or None, panels=panels)}
    if any(row.values.get("deletion_auc") is not None for row in rows):
        figures["fidelity"] = fidelity_figure(rows, title=description.title or None)
    grid = load_grid(run_dir, description)
    if grid is not None:
        figures["saliency_grid"] = saliency_grid(**grid)
    if experiment is not None:
        log_to_tensorboard(experiment, rows, figures, run=run)
    for name, figure in figures.items():
        paths[name] = save_figure(figure, run_dir / f"{name}.png")
        if verbose:
            print(f"  {name}: {paths[name]}")
    return rows, paths


def load_grid(run_dir: Path, description: RunDescription) -> dict[str, Any] | None:
    """The saliency-grid samples that every rank saved (`<run_dir>/grid/*.pt`), as `saliency_grid` arguments.

    A sample saved twice (a batch evaluated again after a crash between its grid and its records) counts once,
    from the newest file. Each results row is drawn under the first attack that applied to it; a row that no
    attack applied to is left out. A damaged file is left out with a warning naming it and its samples (the grid
    is a figure: the records and results do not depend on it).
    """
    files = sorted((Path(run_dir) / "grid").glob("*.pt"), key=lambda path: path.stat().st_mtime)
    parts = [part for part in (_grid_part(path) for path in files) if part is not None]
    if not parts:
        return None
    newest: dict[int, tuple[int, int]] = {}
    for number, part in enumerate(parts):
        for position, index in enumerate(part.index.tolist()):
            newest[index] = (number, position)
    order = sorted(newest)
    methods = [row.method for row in description.rows if all(row.method in part.clean for part in parts)]
    if not methods:
        return None

    def stack(key: str, method: str | None = None) -> torch.Tensor:
        values = []
        for index in order:
            number, position = newest[index]
            value = getattr(parts[number], key)
            values.append((value if method is None else value[method])[position])
        return torch.stack(values)

    return {
        "inputs": stack("image"),
        "clean_maps": {m: stack("clean", m) for m in methods},
        "attacked_inputs": {m: stack("attacked_input", m) for m in methods},
        "attacked_maps": {m: stack("attacked", m) for m in methods},
        "labels": stack("label"),
        "predictions": stack("prediction"),
        "sample_ids": torch.tensor(order),
        "num_samples": len(order),
        "method_names": {row.method: row.display_name for row in description.rows if row.method in methods},
        "highlight": [row.method for row in description.rows if row.family == "moreaugrad" and row.method in methods],
    }


def _grid_part(path: Path) -> GridSample | None:
    """One grid file's samples, or None (with a warning naming it) when it is damaged."""
    import warnings

    try:
        part = GridSample.from_dict(torch.load(path, map_location="cpu", weights_only=True))
        count = len(part.index)
        tensors = [part.image, part.label, part.prediction, *part.clean.values(), *part.attacked_input.values(),
                   *part.attacked.values()]
        if part.index.dim() != 1 or any(not isinstance(value, torch.Tensor) or len(value) != count
                                        for value in tensors):
            raise ValueError("its tensors do not hold one entry per sample")
    except Exception as error:  # whatever a damaged file raises: a truncated archive, unpickling, missing keys
        first = path.name.split("-")[1] if path.name.startswith("samples-") else "?"
        warnings.warn(
            f"{path} is damaged ({type(error).__name__}: {error}); it held the saliency-grid samples of one batch, "
            f"from dataset index {first}. The saliency grid leaves them out; the records and results are intact. "
            "Remove the file to draw the grid from the other samples without this warning."
        )
        return None
    return part
