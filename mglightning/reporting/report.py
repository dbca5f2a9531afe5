"""The end of an evaluation, and `python evaluate.py report <run_dir>`: tables, files and figures from records.

`report(run_dir)` reads the run's description (`run.json`) and its per-sample records, computes the results
rows with bootstrap intervals and the paired comparisons, writes `results.json/.csv/.md` atomically, prints the
table, and only then draws the figures (robustness vs budget, saliency grid) as PNG and, given a
`SummaryWriter`, to TensorBoard. It never recomputes a map, so it can be run again offline at any time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mglightning.reporting.figures import fidelity_figure, robustness_figure, saliency_grid, save_figure
from mglightning.reporting.records import read_records
from mglightning.reporting.results import (
    ResultRow,
    compare_paired,
    format_comparisons,
    format_number,
    format_results_table,
    summarise_records,
    write_results,
)
from mglightning.reporting.tensorboard import log_to_tensorboard

__all__ = ["load_run_info", "report"]


def load_run_info(run_dir: str | Path) -> dict[str, Any]:
    """The run's description (`<run_dir>/run.json`), with a clear error when the folder is not a run."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(run_dir)!r} is not an evaluation run folder (no run.json); pass the folder that evaluate.py "
            "printed (e.g. logs/eval_digits/version_0)."
        )
    return json.loads(path.read_text(encoding="utf-8"))


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
    run_info = load_run_info(run_dir)
    records = read_records(run_dir)
    if records.empty:
        raise ValueError(f"{run_dir} holds no records yet: the run evaluated no sample.")
    resamples = int(run_info.get("bootstrap_samples", 1000))
    seed = int(run_info.get("seed", 0))
    rows = summarise_records(records, run_info, resamples=resamples, seed=seed)
    comparisons = compare_paired(records, rows, resamples=resamples, seed=seed)
    first = records.drop_duplicates("index")
    run_info = {
        **run_info,
        "samples": int(first["index"].nunique()),
        "accuracy": float((first["label"] == first["prediction"]).mean()),
    }
    paths = write_results(rows, run_dir, run_info, comparisons)
    expected = run_info.get("planned_samples")
    if verbose:
        print("\n" + format_results_table(rows))
        print(
            f"\nEvaluated {run_info['samples']} samples"
            + (f" of {expected}" if expected is not None and expected != run_info["samples"] else "")
            + f" (clean accuracy {format_number(run_info['accuracy'])}); intervals are 95% bootstrap intervals "
            "over samples."
        )
        for row in rows:
            if row.convex_share is not None and row.convex_share < 0.5:
                print(
                    f"WARNING: for {row.method}, only {row.convex_share:.0%} of the samples have rho < 1/lambda (the "
                    "local weak-convexity estimate): the Moreau problem is likely non-convex there and Theorem 1's "
                    "robustness guarantee does not apply; try a smaller rho (a local estimate, not a certificate)."
                )
        if run_info.get("note"):
            print("Note: " + run_info["note"])
        if comparisons:
            print("Paired comparisons with the simple gradient (same samples):\n" + format_comparisons(comparisons))
        print("  records: " + str(run_dir / "records"))
        for name, path in paths.items():
            print(f"  {name}: {path}")

    figures = {"robustness": robustness_figure(rows, title=run_info.get("title"))}
    if any(row.deletion_auc is not None for row in rows):
        figures["fidelity"] = fidelity_figure(rows, title=run_info.get("title"))
    grid = load_grid(run_dir)
    if grid is not None:
        figures["saliency_grid"] = saliency_grid(**grid)
    if experiment is not None:
        log_to_tensorboard(experiment, rows, figures, run_info=run_info)
    for name, figure in figures.items():
        paths[name] = save_figure(figure, run_dir / f"{name}.png")
        if verbose:
            print(f"  {name}: {paths[name]}")
    return rows, paths


def load_grid(run_dir: Path) -> dict[str, Any] | None:
    """The saliency-grid samples that every rank saved (`<run_dir>/grid/*.pt`), as `saliency_grid` arguments."""
    files = sorted((Path(run_dir) / "grid").glob("*.pt"))
    if not files:
        return None
    parts = [torch.load(path, map_location="cpu", weights_only=True) for path in files]
    index = torch.cat([part["index"] for part in parts])
    order = index.argsort()
    methods = list(parts[0]["clean"])

    def stack(key: str, method: str | None = None) -> torch.Tensor:
        values = [part[key] if method is None else part[key][method] for part in parts]
        return torch.cat(values)[order]

    return {
        "inputs": stack("image"),
        "clean_maps": {m: stack("clean", m) for m in methods},
        "attacked_inputs": {m: stack("attacked_input", m) for m in methods},
        "attacked_maps": {m: stack("attacked", m) for m in methods},
        "labels": stack("label"),
        "predictions": stack("prediction"),
        "sample_ids": index[order],
        "num_samples": len(index),
        "method_names": parts[0]["display_names"],
        "highlight": [m for m, family in parts[0]["families"].items() if family == "moreaugrad"],
    }
