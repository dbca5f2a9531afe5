"""The evaluation core, without Lightning: one batch's measurement, its records and stored maps, the run's
description and its folder, and metrics added afterwards from the stored maps.
`mglightning.modules.ExplanationEvaluator` runs it on any number of devices; `evaluate.py` drives that from a
config."""

from mglightning.evaluation.added import NotStoredError, add_metrics, merge_added, metrics_from_config
from mglightning.evaluation.description import (
    AttackSpec,
    ExplainerSpec,
    MetricSpec,
    RowSpec,
    RunDescription,
    RunDescriptionError,
)
from mglightning.evaluation.maps import BatchMaps, MapWriter, StoredMaps, iter_maps, load_maps
from mglightning.evaluation.measure import (
    BatchMeasurement,
    GridSample,
    default_attacks,
    default_metrics,
    measure_batch,
    method_rows,
    metric_columns,
    metric_specs,
)
from mglightning.evaluation.files import DamagedFileError, OutOfSpaceError
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
    "BatchMaps",
    "BatchMeasurement",
    "ExplainerSpec",
    "GridSample",
    "MapWriter",
    "MetricSpec",
    "NotStoredError",
    "DamagedFileError",
    "OutOfSpaceError",
    "Record",
    "RecordWriter",
    "RowSpec",
    "RunDescription",
    "RunDescriptionError",
    "RunFolderBusyError",
    "RunLock",
    "StoredMaps",
    "add_metrics",
    "choose_run_folder",
    "default_attacks",
    "default_metrics",
    "discard_unstarted",
    "iter_maps",
    "load_maps",
    "measure_batch",
    "merge_added",
    "method_rows",
    "metric_columns",
    "metric_specs",
    "metrics_from_config",
    "move_aside",
    "read_records",
    "record_fields",
    "record_schema",
    "recorded_indices",
]
