"""The results files of an evaluation: `results.json`, `results.csv` and `results.md`, each written atomically.

Example:
    >>> write_results(rows, run_dir, EvaluatedRun.from_records(description, records), comparisons)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mglightning.evaluation.files import atomic_write_bytes
from mglightning.reporting.rows import Comparison, EvaluatedRun, ResultRow
from mglightning.reporting.tables import format_comparisons, format_flags, format_results_table, run_header_markdown

__all__ = ["write_results"]

# What a full disk while writing the results leaves, and how to go on.
_REPORT_AGAIN = "and the records are kept: free some space and report the run again"


def write_results(
    rows: Sequence[ResultRow],
    out_dir: str | Path,
    run: EvaluatedRun,
    comparisons: Sequence[Comparison] = (),
) -> dict[str, Path]:
    """Write `results.json`, `results.csv` and `results.md` into `out_dir`, each atomically.

    Each file is written in full to a temporary name in the same folder and then renamed over the final name,
    so a failing write (full disk, killed process) leaves either the previous file or none, never a truncated
    one (`mglightning.evaluation.files.atomic_write_bytes`).

    Args:
        rows: the results rows (`summarise_records`).
        out_dir: the folder to write into (created if needed).
        run: the evaluated run (`results.json`'s `run_info` and the header of `results.md`).
        comparisons: the paired comparisons (`compare_paired`).

    Returns:
        `{"json": path, "csv": path, "md": path}`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "csv": out_dir / "results.csv", "md": out_dir / "results.md"}
    document = {
        "run_info": run.to_dict(),
        "results": {row.method: row.to_dict() for row in rows},
        "comparisons": [item.to_dict() for item in comparisons],
    }
    _write_text(paths["json"], json.dumps(document, indent=2, allow_nan=False) + "\n")

    buffer = io.StringIO()
    flat = [_flat_row(row) for row in rows]
    columns = list(dict.fromkeys(key for row in flat for key in row))
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in flat:
        writer.writerow({key: _csv_cell(value) for key, value in row.items()})
    _write_text(paths["csv"], buffer.getvalue())

    sections = ["# Interpretation robustness", run_header_markdown(run), format_results_table(rows)]
    if any(row.flags for row in rows):
        sections.append(format_flags(rows))
    if run.description.note:
        sections.append("**Note.** " + str(run.description.note))
    if comparisons:
        sections.append("Paired comparisons (same samples):\n\n```\n" + format_comparisons(comparisons) + "\n```")
    _write_text(paths["md"], "\n\n".join(sections) + "\n")
    return paths


def _write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), recovery=_REPORT_AGAIN)


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
