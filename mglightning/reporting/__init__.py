"""Reporting of an evaluation, split by what it does:

- `results`: typed results rows with bootstrap intervals, paired comparisons, the table and the results files;
- `figures`: robustness against the budget (Figure 6), saliency grids (Figure 5), PNG output;
- `tensorboard`: the same scalars, table and figures in TensorBoard, each tag once;
- `report`: all of the above from a run folder (`python evaluate.py report <run_dir>`).

The records themselves (`Record`, `read_records`) are the evaluation core's: `mglightning.evaluation`.
"""

from mglightning.reporting.figures import (
    fidelity_figure,
    normalised_magnitude,
    robustness_figure,
    saliency_grid,
    saliency_image_grid,
    save_figure,
)
from mglightning.evaluation.records import read_records
from mglightning.reporting.report import load_grid, report
from mglightning.reporting.results import (
    Comparison,
    ResultRow,
    bootstrap_interval,
    compare_paired,
    format_comparisons,
    format_number,
    format_results_table,
    summarise_records,
    worst_case,
    write_results,
)
from mglightning.reporting.tensorboard import log_to_tensorboard

__all__ = [
    "Comparison",
    "ResultRow",
    "bootstrap_interval",
    "fidelity_figure",
    "compare_paired",
    "format_comparisons",
    "format_number",
    "format_results_table",
    "load_grid",
    "log_to_tensorboard",
    "normalised_magnitude",
    "read_records",
    "report",
    "robustness_figure",
    "saliency_grid",
    "saliency_image_grid",
    "save_figure",
    "summarise_records",
    "worst_case",
    "write_results",
]
