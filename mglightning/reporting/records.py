"""Per-sample records of an evaluation, streamed to Parquet files as the run goes.

Each rank writes one small Parquet file per evaluated batch into `<run_dir>/records/`, first under a temporary
name and then renamed, so a killed run loses at most the batch in flight and never leaves a half-written file.
`pandas.read_parquet(<run_dir>/records)` (or `read_records`) reads all of them as one table with one row per
(sample, method, budget); the evaluator resumes by skipping the dataset indices found there.

Columns (`RECORD_COLUMNS`): `index` (dataset index), `label`, `prediction`, `target` (the class explained),
`method` (the results row), `explainer` (registry name), `epsilon`, `distance`, `topk`, `ssim`, `gini`,
`zero_fraction`, `moved` (the attack moved the sample), `seconds_clean`, `seconds_attack`, `seconds_attacked`
(per image), `evals_clean`, `evals_attack`, `evals_attacked` (gradient evaluations), `deletion_auc`,
`insertion_auc` (fidelity of the clean map; NaN when not computed), `weak_convexity` (local estimate of the
score's weak-convexity `lambda`), `convex` (whether `rho < 1 / lambda`; NaN when not computed or not a
MoreauGrad-family method), `bound` (Corollary 1's bound on the map's change) and `rank`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["RECORD_COLUMNS", "RecordWriter", "read_records", "recorded_indices"]

RECORD_COLUMNS: dict[str, pa.DataType] = {
    "index": pa.int64(),
    "label": pa.int64(),
    "prediction": pa.int64(),
    "target": pa.int64(),
    "method": pa.string(),
    "explainer": pa.string(),
    "epsilon": pa.float64(),
    "distance": pa.float64(),
    "topk": pa.float64(),
    "ssim": pa.float64(),
    "gini": pa.float64(),
    "zero_fraction": pa.float64(),
    "moved": pa.bool_(),
    "seconds_clean": pa.float64(),
    "seconds_attack": pa.float64(),
    "seconds_attacked": pa.float64(),
    "evals_clean": pa.float64(),
    "evals_attack": pa.float64(),
    "evals_attacked": pa.float64(),
    "deletion_auc": pa.float64(),
    "insertion_auc": pa.float64(),
    "weak_convexity": pa.float64(),
    "convex": pa.float64(),
    "bound": pa.float64(),
    "rank": pa.int64(),
}
SCHEMA = pa.schema(list(RECORD_COLUMNS.items()))


class RecordWriter:
    """Appends record batches of one rank to `<run_dir>/records/`, one atomically written Parquet file each.

    Args:
        run_dir: the run's folder.
        rank: this process's rank (part of every file name, so ranks never write the same file).

    Example:
        >>> writer = RecordWriter(run_dir, rank=0)                                          # doctest: +SKIP
        >>> writer.write([{"index": 3, "method": "moreaugrad", ...}, ...])                 # doctest: +SKIP
    """

    def __init__(self, run_dir: str | Path, rank: int) -> None:
        self.folder = Path(run_dir) / "records"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rank = rank

    def write(self, records: Sequence[Mapping[str, Any]]) -> Path | None:
        """Write the records of one batch; missing optional columns are stored as null."""
        if not records:
            return None
        columns = {name: [record.get(name) for record in records] for name in RECORD_COLUMNS}
        unknown = set().union(*(record.keys() for record in records)) - set(RECORD_COLUMNS)
        if unknown:
            raise ValueError(f"unknown record columns {sorted(unknown)}; the schema is RECORD_COLUMNS.")
        table = pa.table(columns, schema=SCHEMA)
        # Nanoseconds and the pid keep names unique across batches, resumed runs and ranks.
        name = f"rank{self.rank:03d}-{time.time_ns()}-{os.getpid()}.parquet"
        final = self.folder / name
        temporary = self.folder / f".{name}.tmp"
        try:
            pq.write_table(table, temporary)
            os.replace(temporary, final)
        finally:
            if temporary.exists():
                temporary.unlink()
        return final


def read_records(run_dir: str | Path):
    """All records of a run as a `pandas.DataFrame` sorted by method and dataset index (empty if none yet)."""
    import pandas as pd

    files = sorted((Path(run_dir) / "records").glob("*.parquet"))
    if not files:
        return SCHEMA.empty_table().to_pandas()
    frame = pd.concat([pq.read_table(path, schema=SCHEMA).to_pandas() for path in files], ignore_index=True)
    duplicated = frame.duplicated(["method", "index"])
    if duplicated.any():
        raise ValueError(
            f"{Path(run_dir) / 'records'} holds {int(duplicated.sum())} duplicate (method, sample) records: two runs "
            "wrote into the same folder. Evaluate into a fresh folder (or --overwrite)."
        )
    return frame.sort_values(["method", "index"], kind="stable").reset_index(drop=True)


def recorded_indices(run_dir: str | Path, methods: Sequence[str]) -> set[int]:
    """Dataset indices whose records are complete (every method present) in the run folder."""
    frame = read_records(run_dir)
    if frame.empty:
        return set()
    counts = frame[frame["method"].isin(list(methods))].groupby("index")["method"].nunique()
    return {int(index) for index, count in counts.items() if count == len(methods)}
