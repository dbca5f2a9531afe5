"""Reporting of an evaluation, split by what it does:

- `rows`: the typed results (`ResultRow`, `Comparison`) and the evaluated run they describe (`EvaluatedRun`);
- `statistics`: each sample's worst case over the attacks, results rows with bootstrap intervals, paired
  comparisons;
- `tables`: numbers, the markdown results table, warnings and the run's description as text;
- `results`: the results files (`results.json/.csv/.md`), written atomically;
- `figures`: robustness against the budget (Figure 6), fidelity, PNG output;
- `map_figures`: saliency grids (Figure 5) and rows of maps (Figures 2, 4 and 7);
- `tensorboard`: the same scalars, table and figures in TensorBoard, each tag once;
- `report`: all of the above from a run folder (`python evaluate.py report <run_dir>`);
- `study` (several models pooled) and `render` (the documentation's tables from results files): commands.

The records themselves (`Record`, `read_records`) are the evaluation core's: `mglightning.evaluation`.
"""

from mglightning.evaluation.records import read_records
from mglightning.reporting.figures import fidelity_figure, robustness_figure, save_figure
from mglightning.reporting.map_figures import (
    MapRow,
    map_rows_figure,
    normalised_magnitude,
    saliency_grid,
    saliency_image_grid,
)
from mglightning.reporting.report import load_grid, report
from mglightning.reporting.results import write_results
from mglightning.reporting.rows import Comparison, EvaluatedRun, ResultRow
from mglightning.reporting.statistics import bootstrap_interval, compare_paired, summarise_records, worst_case
from mglightning.reporting.tables import format_comparisons, format_number, format_results_table
from mglightning.reporting.tensorboard import log_to_tensorboard

__all__ = [
    "Comparison",
    "EvaluatedRun",
    "MapRow",
    "ResultRow",
    "bootstrap_interval",
    "compare_paired",
    "fidelity_figure",
    "format_comparisons",
    "format_number",
    "format_results_table",
    "load_grid",
    "log_to_tensorboard",
    "map_rows_figure",
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
