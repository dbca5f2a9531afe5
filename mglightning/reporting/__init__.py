"""Reporting of an evaluation, split by what it does:

- `records`: the per-sample records, streamed to Parquet during the run (`RecordWriter`, `read_records`);
- `results`: typed results rows with bootstrap intervals, paired comparisons, the table and the results files;
- `figures`: robustness against the budget (Figure 6), saliency grids (Figure 5), PNG output;
- `tensorboard`: the same scalars, table and figures in TensorBoard, each tag once;
- `report`: all of the above from a run folder (`python evaluate.py report <run_dir>`).
"""

from mglightning.reporting.figures import (
    fidelity_figure,
    normalised_magnitude,
    robustness_figure,
    saliency_grid,
    saliency_image_grid,
    save_figure,
)
from mglightning.reporting.records import RECORD_COLUMNS, RecordWriter, read_records, recorded_indices
from mglightning.reporting.report import load_run_info, report
from mglightning.reporting.results import (
    Comparison,
    ResultRow,
    bootstrap_interval,
    compare_paired,
    format_comparisons,
    format_number,
    format_results_table,
    summarise_records,
    write_results,
)
from mglightning.reporting.tensorboard import log_to_tensorboard

__all__ = [
    "RECORD_COLUMNS",
    "Comparison",
    "RecordWriter",
    "ResultRow",
    "bootstrap_interval",
    "fidelity_figure",
    "compare_paired",
    "format_comparisons",
    "format_number",
    "format_results_table",
    "load_run_info",
    "log_to_tensorboard",
    "normalised_magnitude",
    "read_records",
    "recorded_indices",
    "report",
    "robustness_figure",
    "saliency_grid",
    "saliency_image_grid",
    "save_figure",
    "summarise_records",
    "write_results",
]
