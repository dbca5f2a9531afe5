"""The per-sample record of an evaluation, defined once, and its Parquet files.

One `Record` per (sample, method, budget, attack). Its fields, with their Arrow types and how the results
summarise them (the `column` metadata), are the only definition of a record: the Parquet schema
(`record_schema`), the results rows' cost and success columns and the TensorBoard keys are derived from them.
The metric values (`Record.values`) are one more float column each, named by the run's metrics
(`metric_columns`).

Each rank writes one small Parquet file per evaluated batch into `<run_dir>/records/`, first under a temporary
name and then renamed, so a killed run loses at most the batch in flight and never leaves a half-written file.
`read_records(run_dir)` reads them as one `pandas.DataFrame`; a resumed run skips the dataset indices found there.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mglightning.evaluation.description import RunDescription
from mglightning.evaluation.files import DamagedFileError, OutOfSpaceError, atomic_write_bytes, damaged

__all__ = [
    "OutOfSpaceError",
    "Record",
    "RecordWriter",
    "read_records",
    "record_fields",
    "record_schema",
    "recorded_indices",
]


def _column(arrow_type: pa.DataType, summary: str | None = None, across_attacks: str = "first", title: str = "",
            lower_is_better: bool | None = None) -> dict[str, Any]:
    """A record field's metadata.

    Args:
        arrow_type: its Parquet type.
        summary: the results-row value it becomes (its mean over samples), or None (a key or bookkeeping).
        across_attacks: how a sample's records of several attacks combine into its worst case: `first` (the
            same for every attack), `any` (a flag), `sum` (a cost), `max` or `min`.
        title: the results table's column title (none: not a table column).
        lower_is_better: for the table's arrows.
    """
    return {"arrow": arrow_type, "summary": summary, "across_attacks": across_attacks, "title": title,
            "lower_is_better": lower_is_better}


@dataclass
class Record:
    """One sample's result for one method (explainer and budget) under one attack.

    `values` holds the metric values by record column (`metric_columns`); `weak_convexity`, `convex` and `bound`
    are the local-convexity diagnostic of MoreauGrad-family methods (None when not computed); `map_change` is
    the unnormalised L2 change of the map under the attack, and `bound_holds` (1 or 0) compares it with
    Corollary 1's `bound` where that is finite (None elsewhere).
    """

    index: int = field(metadata=_column(pa.int64()))  # dataset index
    label: int = field(metadata=_column(pa.int64()))
    prediction: int = field(metadata=_column(pa.int64()))
    target: int = field(metadata=_column(pa.int64()))  # the class explained
    method: str = field(metadata=_column(pa.string()))  # the results row: explainer label, with the budget
    explainer: str = field(metadata=_column(pa.string()))  # registry name
    epsilon: float = field(metadata=_column(pa.float64()))
    attack: str = field(metadata=_column(pa.string()))  # the attack's label in the run
    moved: bool = field(metadata=_column(pa.bool_(), "attack_success", "any", "attack success"))
    seconds_clean: float = field(metadata=_column(pa.float64(), "seconds_per_image", "first", "s / image"))
    seconds_attack: float = field(metadata=_column(pa.float64(), "attack_seconds_per_image", "sum"))
    seconds_attacked: float = field(metadata=_column(pa.float64(), "attacked_seconds_per_image", "sum"))
    evals_clean: float = field(metadata=_column(pa.float64(), "evals_clean", "first"))
    evals_attack: float = field(metadata=_column(pa.float64(), "evals_attack", "sum"))
    evals_attacked: float = field(metadata=_column(pa.float64(), "evals_attacked", "sum"))
    weak_convexity: float | None = field(default=None, metadata=_column(pa.float64()))
    convex: float | None = field(default=None, metadata=_column(pa.float64(), "convex_share", "first", "convex share"))
    bound: float | None = field(default=None, metadata=_column(pa.float64()))
    # Corollary 1 against measurement: the attack's unnormalised change of the map, ||MG(x') - MG(x)||_2, and
    # whether it stays within `bound` (None where no finite bound was computed). A sample's worst case over
    # attacks takes the largest change, and the bound holds there only if it holds under every attack.
    map_change: float | None = field(default=None, metadata=_column(pa.float64(), across_attacks="max"))
    bound_holds: float | None = field(
        default=None, metadata=_column(pa.float64(), "corollary_share", "min", "Cor. 1 bound holds")
    )
    rank: int = field(default=0, metadata=_column(pa.int64()))
    values: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The record as one Parquet row: its fields and one entry per metric column."""
        row = {item.name: getattr(self, item.name) for item in record_fields()}
        overlap = set(row) & set(self.values)
        if overlap:
            raise ValueError(f"metric columns {sorted(overlap)} clash with the record's own columns.")
        return {**row, **self.values}


def record_fields() -> tuple[Any, ...]:
    """The record's own columns (its dataclass fields but `values`), in order, with their metadata."""
    return tuple(item for item in fields(Record) if item.name != "values")


def record_schema(metric_columns: Sequence[str]) -> pa.Schema:
    """The Parquet schema of a run's records: the record's own columns, then one float64 per metric column."""
    return pa.schema(
        [(item.name, item.metadata["arrow"]) for item in record_fields()]
        + [(name, pa.float64()) for name in metric_columns]
    )


class RecordWriter:
    """Appends record batches of one rank to `<run_dir>/records/`, one atomically written Parquet file each.

    Args:
        run_dir: the run's folder.
        rank: this process's rank (part of every file name, so ranks never write the same file).
        metric_columns: the run's metric columns (`metric_columns` of its metrics).

    Example:
        >>> writer = RecordWriter(run_dir, rank=0, metric_columns=["distance", "topk"])   # doctest: +SKIP
        >>> writer.write([Record(index=3, ..., values={"distance": 0.2, "topk": 0.8})])    # doctest: +SKIP
    """

    def __init__(self, run_dir: str | Path, rank: int, metric_columns: Sequence[str]) -> None:
        self.folder = Path(run_dir) / "records"
        self.rank = rank
        self.metric_columns = list(metric_columns)
        self.schema = record_schema(self.metric_columns)

    def write(self, records: Sequence[Record]) -> Path | None:
        """Write the records of one batch; a metric column a record lacks is stored as null."""
        if not records:
            return None
        rows = [record.row() for record in records]
        unknown = set().union(*(row.keys() for row in rows)) - set(self.schema.names)
        if unknown:
            raise ValueError(f"unknown record columns {sorted(unknown)}; this run's columns are {self.schema.names}.")
        table = pa.table({name: [row.get(name) for row in rows] for name in self.schema.names}, schema=self.schema)
        self.folder.mkdir(parents=True, exist_ok=True)
        # Nanoseconds and the pid keep names unique across batches, resumed runs and ranks.
        name = f"rank{self.rank:03d}-{time.time_ns()}-{os.getpid()}.parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        atomic_write_bytes(self.folder / name, sink.getvalue().to_pybytes())
        return self.folder / name


def read_records(run_dir: str | Path, metric_columns: Sequence[str] | None = None):
    """All records of a run as a `pandas.DataFrame` sorted by method, attack and dataset index.

    Args:
        run_dir: the run's folder.
        metric_columns: the run's metric columns (default: those of its `run.json`).
    """
    import pandas as pd

    run_dir = Path(run_dir)
    if metric_columns is None:
        metric_columns = RunDescription.load(run_dir).metric_columns
    schema = record_schema(metric_columns)
    files = sorted((run_dir / "records").glob("*.parquet"))
    if not files:
        return schema.empty_table().to_pandas()
    tables, broken = [], []
    for path in files:
        try:
            tables.append(pq.read_table(path, schema=schema).to_pandas())
        except (pa.ArrowException, OSError, ValueError) as error:  # truncated, emptied, foreign or edited
            broken.append(damaged(path, error))
    if broken:
        intact = int(pd.concat(tables)["index"].nunique()) if tables else 0
        raise DamagedFileError(
            f"{'; '.join(broken)}. Each records file holds the records of one batch of one rank (its samples "
            f"cannot be read from it); the other {len(tables)} records files are intact and hold {intact} samples. "
            f"Move the damaged file{'s' if len(broken) > 1 else ''} out of {run_dir / 'records'} and run the same "
            f"evaluate.py command with --resume {run_dir}: it evaluates the samples they held again and keeps the "
            "others."
        )
    frame = pd.concat(tables, ignore_index=True)
    duplicated = frame.duplicated(["method", "attack", "index"])
    if duplicated.any():
        raise ValueError(
            f"{run_dir / 'records'} holds {int(duplicated.sum())} duplicate (method, attack, sample) records: two "
            "runs wrote into the same folder. Evaluate into a fresh folder (or --overwrite)."
        )
    return frame.sort_values(["method", "attack", "index"], kind="stable").reset_index(drop=True)


def recorded_indices(run_dir: str | Path, expected: Mapping[str, Sequence[str]], metric_columns: Sequence[str]) -> set[int]:
    """Dataset indices whose records are complete in the run folder: for every method (`expected`'s keys), one
    record under each of the attacks that apply to it (its values)."""
    frame = read_records(run_dir, metric_columns)
    if frame.empty:
        return set()
    wanted = {(method, attack) for method, attacks in expected.items() for attack in attacks}
    pairs = list(zip(frame["method"], frame["attack"]))
    frame = frame[[pair in wanted for pair in pairs]]
    counts = frame.groupby("index").size()
    return {int(index) for index, count in counts.items() if count == len(wanted)}


def summary_fields() -> dict[str, Any]:
    """`{results value: record field}` of the record fields the results rows average."""
    return {item.metadata["summary"]: item for item in record_fields() if item.metadata["summary"]}
