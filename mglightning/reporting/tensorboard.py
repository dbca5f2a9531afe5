"""TensorBoard output of an evaluation: each scalar logged once, the table and run description as text, figures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from matplotlib.figure import Figure

from mglightning.reporting.rows import EvaluatedRun, ResultRow
from mglightning.reporting.tables import format_results_table, run_header_markdown

__all__ = ["log_to_tensorboard"]


def log_to_tensorboard(
    experiment: Any,
    rows: Sequence[ResultRow],
    figures: Mapping[str, Figure] | None = None,
    images: Mapping[str, torch.Tensor] | None = None,
    run: EvaluatedRun | None = None,
    step: int = 0,
    prefix: str = "test",
) -> None:
    """Log an evaluation to TensorBoard, every tag once.

    Tags: `<prefix>/<method>/<key>` for every value of each row (`ResultRow.values`: its metric columns, at each
    sample's worst case over the attacks, and the record fields it averages; the lower and upper ends of the
    shown intervals as `<key>_ci_low`/`<key>_ci_high`), `<prefix>/results` (the markdown table, in the Text
    tab), `<prefix>/run_info`, and `<prefix>/<name>` for each figure and image.

    Args:
        experiment: a `torch.utils.tensorboard.SummaryWriter`, e.g. Lightning's `TensorBoardLogger.experiment`.
        rows: the results rows.
        figures: `{name: figure}`; figures are not closed, so they can still be saved afterwards.
        images: `{name: (3, H, W) tensor in [0, 1]}`.
        run: the evaluated run, its description logged as text.
        step: the global step to log at.
        prefix: first part of every tag.
    """
    for name, image in (images or {}).items():
        if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] not in (1, 3):
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"images[{name!r}] must be a (3, H, W) or (1, H, W) tensor in [0, 1], got {shape}.")
    for row in rows:
        for key, value in row.values.items():
            if value is not None:
                experiment.add_scalar(f"{prefix}/{row.method}/{key}", float(value), step)
        for key in row.shown_intervals:
            low, high = row.intervals[key]
            experiment.add_scalar(f"{prefix}/{row.method}/{key}_ci_low", float(low), step)
            experiment.add_scalar(f"{prefix}/{row.method}/{key}_ci_high", float(high), step)
    experiment.add_text(f"{prefix}/results", format_results_table(rows), step)
    if run is not None:
        experiment.add_text(f"{prefix}/run_info", run_header_markdown(run), step)
    for name, figure in (figures or {}).items():
        experiment.add_figure(f"{prefix}/{name}", figure, step, close=False)
    for name, image in (images or {}).items():
        experiment.add_image(f"{prefix}/{name}", image.detach().to("cpu", torch.float32).clamp(0, 1), step)
    experiment.flush()
