"""Metrics added to a run after it ran, from its stored maps: `python evaluate.py report <run_dir> --metrics ...`.

`add_metrics(run_dir, {label: metric})` measures each `SampleMetric` on the maps the run stored
(`model.keep_maps`), without recomputing one, and writes its per-record values into
`<run_dir>/added/<label>.parquet`, keyed by the records' (`method`, `attack`, `index`); the run's own records are
never rewritten. `merge_added` (which `report` calls) joins every added metric to the records, so its columns
appear in the results files and table like the run's own, with its class and settings in `results.json`.

Post hoc a metric's `MapBatch` holds the stored clean and attacked maps (float32), the explained class and the
noise seeds, and the clean and attacked inputs when the run kept them (`model.keep_inputs`); it never holds the
model or the explainer. A metric that uses what was not stored stops with a `NotStoredError` naming it, e.g.
`DeletionInsertionAUC`, which runs the model: such a metric belongs in the run's `model.metrics`. A metric of the
clean map alone (`needs_attack = False`) is measured, as in the run, without the attacked maps.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mglightning.data.evaluation import sample_seeds
from mglightning.evaluation.description import MetricSpec, RunDescription
from mglightning.evaluation.files import damaged
from mglightning.evaluation.maps import KEY_COLUMNS, iter_maps, map_files
from mglightning.evaluation.measure import metric_columns, metric_specs
from mglightning.evaluation.records import atomic_write_bytes, read_records
from mglightning.evaluation.run_folder import RunLock
from mglightning.metrics import MapBatch, SampleMetric

__all__ = ["NotStored", "NotStoredError", "add_metrics", "merge_added", "metrics_from_config"]

_SPEC_KEY = b"mglightning.metric"


class NotStoredError(RuntimeError):
    """A metric computed from stored maps used something the run did not store (the model, its inputs, ...)."""


class NotStored:
    """Stands in a stored-maps `MapBatch` for what the run did not store: any use of it (a call, an attribute, an
    operator, a torch function) raises `NotStoredError` with `message`."""

    def __init__(self, message: str) -> None:
        self._message = message

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise NotStoredError(self._message)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # protocol probes (copy, pickle) and our own fields get the usual answer
            raise AttributeError(name)
        self._refuse()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        values = [*args, *(kwargs or {}).values()]
        for value in values + [item for value in values if isinstance(value, (list, tuple)) for item in value]:
            if isinstance(value, NotStored):
                value._refuse()
        raise NotStoredError("it uses something that stored maps do not hold.")

    __call__ = __getitem__ = __iter__ = __len__ = __bool__ = _refuse
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _refuse
    __matmul__ = __rmatmul__ = __pow__ = __neg__ = __abs__ = __lt__ = __le__ = __gt__ = __ge__ = _refuse

    def __repr__(self) -> str:
        return "<not stored>"


_IN_THE_RUN = "a metric that runs the classifier or the explainer belongs in the run's model.metrics."
MODEL_NOT_STORED = NotStored("it runs the model, which stored maps do not hold; " + _IN_THE_RUN)
EXPLAINER_NOT_STORED = NotStored("it uses the explainer, which stored maps do not hold; " + _IN_THE_RUN)
INPUTS_NOT_STORED = NotStored(
    "it reads the inputs, which this run did not store: evaluate with model.keep_inputs: true (beside keep_maps) "
    "to compute it from stored maps, or add it to the run's model.metrics."
)


def metrics_from_config(value: str | Path | Mapping[str, Any]) -> dict[str, SampleMetric]:
    """`{label: SampleMetric}` from `{label: {class_path, init_args}}`: a mapping, a YAML/JSON string, or the path
    of a YAML file holding one. Checked as the evaluation's `model.metrics` are (a misspelt setting is an error)."""
    import yaml
    from jsonargparse import ArgumentParser

    if isinstance(value, Path) or (isinstance(value, str) and Path(value).is_file()):
        value = Path(value).read_text(encoding="utf-8")
    config = yaml.safe_load(value) if isinstance(value, str) else value
    if not isinstance(config, Mapping) or not config:
        raise ValueError(
            "--metrics takes {label: {class_path: ..., init_args: {...}}} (YAML, JSON or an existing YAML file), "
            "e.g. '{ssim: {class_path: mglightning.metrics.SaliencySSIM}}'; got " + repr(value)
        )
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--metrics", type=dict[str, SampleMetric])
    try:
        parsed = parser.parse_object({"metrics": dict(config)})
    except Exception as error:  # jsonargparse's ArgumentError, whose message names the setting
        raise ValueError(f"--metrics: {error}") from None
    return dict(parser.instantiate_classes(parsed).metrics)


def add_metrics(run_dir: str | Path, metrics: Mapping[str, SampleMetric]) -> dict[str, Path]:
    """Measure `metrics` on a run's stored maps and write `<run_dir>/added/<label>.parquet` for each.

    Every record of the run must have its maps (a run evaluated with `model.keep_maps`). A label given again
    replaces its earlier values; a column that the run (or another added metric) already has is refused.

    Returns:
        `{label: path}` of the files written.

    Example:
        >>> add_metrics("logs/eval_digits/version_0", {"ssim": SaliencySSIM()})   # doctest: +SKIP
    """
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    run_dir = Path(run_dir)
    description = RunDescription.load(run_dir)
    map_files(run_dir)  # a run without stored maps is refused before anything else
    for label in metrics:
        if not label or "/" in label or label.startswith("."):
            raise ValueError(f"--metrics label {label!r}: use a plain name (it names added/<label>.parquet).")
    columns = metric_columns(metrics)
    taken = {column: "the run's metrics" for column in description.metric_columns}
    for spec, _ in _added(run_dir):
        if spec.label not in metrics:
            taken.update({column: f"added/{spec.label}.parquet" for column in spec.columns})
    for column, (label, _) in columns.items():
        if column in taken:
            raise ValueError(f"--metrics {label!r}: its column {column!r} is already one of {taken[column]}; give "
                             "the metric another label.")
    lock = RunLock(run_dir).acquire()  # one writer: not while the run (or another report) writes the folder
    try:
        records = read_records(run_dir, description.metric_columns)
        if records.empty:
            raise ValueError(f"{run_dir} holds no records yet: the run evaluated no sample.")
        parts = _measure(run_dir, description.seed, metrics, columns)
        measured = sum(len(frame) for frame in next(iter(parts.values())))
        if measured != len(records):
            raise ValueError(
                f"{run_dir}: {len(records) - measured} of its {len(records)} records have no stored maps (was the "
                "maps folder changed?); nothing was added."
            )
        folder = run_dir / "added"
        folder.mkdir(exist_ok=True)
        paths = {}
        for spec in metric_specs(metrics):
            table = pa.Table.from_pandas(pd.concat(parts[spec.label], ignore_index=True), preserve_index=False)
            table = table.replace_schema_metadata({_SPEC_KEY: json.dumps(dataclasses.asdict(spec), default=str)})
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink)
            paths[spec.label] = folder / f"{spec.label}.parquet"
            atomic_write_bytes(paths[spec.label], sink.getvalue().to_pybytes())
        return paths
    finally:
        lock.release()


def _measure(
    run_dir: Path, seed: int, metrics: Mapping[str, SampleMetric], columns: Mapping[str, tuple[str, str]]
) -> dict[str, list[Any]]:
    """`{label: [DataFrame of record keys and the metric's columns, one per stored batch, method and attack]}`."""
    parts: dict[str, list[Any]] = {label: [] for label in metrics}
    with torch.no_grad():
        for stored in iter_maps(run_dir):
            index = torch.tensor(stored.keys["index"].to_list())
            batch = MapBatch(
                model=MODEL_NOT_STORED,
                inputs=stored.inputs if stored.inputs is not None else INPUTS_NOT_STORED,
                target=torch.tensor(stored.keys["target"].to_list()),
                clean=stored.clean,
                attacked_inputs=stored.attacked_inputs if stored.attacked_inputs is not None else INPUTS_NOT_STORED,
                attacked=stored.attacked,
                explainer=EXPLAINER_NOT_STORED,
                seeds=sample_seeds(seed, index),
            )
            # As in the run, a metric of the clean map alone is measured without the attacked maps.
            clean_only = dataclasses.replace(batch, attacked_inputs=None, attacked=None)
            for label, metric in metrics.items():
                try:
                    values = metric.measure(batch if metric.needs_attack else clean_only)
                except NotStoredError as error:
                    raise NotStoredError(
                        f"--metrics {label!r} ({type(metric).__name__}) cannot be computed from stored maps: {error}"
                    ) from None
                except Exception as error:  # e.g. a check that the inputs are a tensor: say what it was given
                    missing = "the model, the explainer" + ("" if stored.inputs is not None else " and the inputs")
                    raise ValueError(
                        f"--metrics {label!r} ({type(metric).__name__}) failed on the stored maps: {error} (from "
                        "stored maps a metric gets the clean and attacked maps, the explained class and the seeds, "
                        f"not {missing}: a metric that needs them belongs in the run's model.metrics)."
                    ) from error
                frame = stored.keys[KEY_COLUMNS].copy()
                for column, (owner, output) in columns.items():
                    if owner == label:
                        value = torch.as_tensor(values[output]).detach().flatten()
                        if value.numel() != len(frame):
                            raise ValueError(f"--metrics {label!r}: its {output!r} holds {value.numel()} values "
                                             f"for a batch of {len(frame)} maps (one per sample expected).")
                        frame[column] = value.to("cpu", torch.float64).numpy()
                parts[label].append(frame)
    return parts


def _added(run_dir: Path, damaged_files: list[str] | None = None) -> list[tuple[MetricSpec, Any]]:
    """Every added metric of a run: its description and its values (a DataFrame keyed by the record keys).

    A file that cannot be read (truncated, emptied) is left out, with a note naming it appended to
    `damaged_files`.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    found = []
    for path in sorted((run_dir / "added").glob("*.parquet")):
        try:
            table = pq.read_table(path)
            if _SPEC_KEY not in (table.schema.metadata or {}):
                raise _Foreign()
            data = json.loads(table.schema.metadata[_SPEC_KEY])
            tuples = {key: tuple(data[key]) for key in ("bounds", "control", "counted") if data.get(key) is not None}
            spec = MetricSpec(**{**data, **tuples})
            values = table.to_pandas()
            missing = [column for column in [*KEY_COLUMNS, *spec.columns] if column not in values.columns]
            if missing:
                raise ValueError(f"it lacks the columns {missing}")
        except _Foreign:
            raise ValueError(f"{path} was not written by `evaluate.py report --metrics` (it holds no metric "
                             "description); move it out of the added/ folder.") from None
        except (pa.ArrowException, OSError, ValueError, TypeError, KeyError) as error:  # truncated, emptied, edited
            if damaged_files is not None:
                damaged_files.append(
                    f"{damaged(path, error)}: the added metric {path.stem!r} is left out; the run's records are "
                    f"intact. Remove the file and add the metric again with: python evaluate.py report {run_dir} "
                    "--metrics '{" + path.stem + ": {class_path: ..., init_args: {...}}}' (as it was added)."
                )
            continue
        found.append((spec, values))
    return found


class _Foreign(Exception):
    """A whole Parquet file in added/ that holds no metric description."""


def merge_added(
    run_dir: str | Path, records: Any, description: RunDescription
) -> tuple[Any, RunDescription, list[str]]:
    """The records with the columns of every added metric of the run, the description with those metrics, and a
    note for each added metric left out because it lacks some records (added before the run was resumed) or its
    file is damaged."""
    run_dir = Path(run_dir)
    notes = []
    added = []
    for spec, values in _added(run_dir, notes):
        merged = records[KEY_COLUMNS].merge(values, on=KEY_COLUMNS, how="left", validate="one_to_one", indicator=True)
        missing = int((merged["_merge"] != "both").sum())
        if missing:
            metric = {spec.label: {"class_path": spec.class_path, "init_args": spec.settings}}
            notes.append(
                f"added/{spec.label}.parquet lacks {missing} of the {len(records)} records (it was computed before the "
                f"run went on), so it is left out; recompute it with: python evaluate.py report {run_dir} --metrics "
                f"'{json.dumps(metric, default=str)}'"
            )
            continue
        records = records.copy()
        for column in spec.columns:
            records[column] = merged[column].to_numpy()
        added.append(spec)
    if added:
        description = dataclasses.replace(description, metrics=description.metrics + tuple(added))
    return records, description, notes
