"""The evaluation core, without Lightning: one batch's measurement, its records, the run's description and
its folder. `mglightning.modules.ExplanationEvaluator` runs it on any number of devices; `evaluate.py` drives
that from a config."""

from mglightning.evaluation.description import (
    AttackSpec,
    ExplainerSpec,
    MetricSpec,
    RowSpec,
    RunDescription,
    RunDescriptionError,
)
from mglightning.evaluation.measure import (
    BatchMeasurement,
    GridSample,
    default_attacks,
    default_metrics,
    measure_batch,
    method_rows,
    metric_columns,
)
from mglightning.evaluation.files import OutOfSpaceError
from mglightning.evaluation.records import (
    Record,
    RecordWriter,
    read_records,
    record_fields,
    record_schema,
    recorded_indices,
)
from mglightning.evaluation.run_folder import (
    RunFolderBusyError,
    RunLock,
    choose_run_folder,
    discard_unstarted,
    move_aside,
)

__all__ = [
    "AttackSpec",
    "BatchMeasurement",
    "ExplainerSpec",
    "GridSample",
    "MetricSpec",
    "OutOfSpaceError",
    "Record",
    "RecordWriter",
    "RowSpec",
    "RunDescription",
    "RunDescriptionError",
    "RunFolderBusyError",
    "RunLock",
    "choose_run_folder",
    "default_attacks",
    "default_metrics",
    "discard_unstarted",
    "measure_batch",
    "method_rows",
    "metric_columns",
    "move_aside",
    "read_records",
    "record_fields",
    "record_schema",
    "recorded_indices",
]
