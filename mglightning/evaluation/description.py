"""The typed description of an evaluation run (`<run_dir>/run.json`): what was evaluated, and how to read it.

The evaluator writes it when a run starts; the report reads it to name and order the results rows, and a
resumed run compares its `fingerprint` (every field that changes a record) with the new evaluation's, so records
of another evaluation are never mixed in.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mglightning.evaluation.files import atomic_write_bytes

__all__ = ["AttackSpec", "ExplainerSpec", "MetricSpec", "RowSpec", "RunDescription", "RunDescriptionError"]

# Fields that describe how a run is reported, not what it measured: they are not part of its fingerprint. Most may
# change between a run and its resume; the evaluator refuses a change of `keep_maps` and `keep_inputs`, which would
# leave some recorded samples without stored maps.
_REPORTING_FIELDS = ("bootstrap_samples", "grid_samples", "versions", "title", "note", "keep_maps", "keep_inputs")


class RunDescriptionError(ValueError):
    """A folder's run.json is missing or unreadable."""


@dataclass(frozen=True)
class ExplainerSpec:
    """One configured explainer: its label in the config, registry name, names for display and its settings."""

    label: str
    name: str
    display_name: str
    family: str
    class_path: str
    settings: dict[str, Any]


@dataclass(frozen=True)
class AttackSpec:
    """One configured attack: its label in the config (the records' `attack`), class and settings."""

    label: str
    name: str
    class_path: str
    settings: dict[str, Any]


@dataclass(frozen=True)
class MetricSpec:
    """One configured metric: its label, class, settings and the record columns it fills.

    `columns` maps each record column to `higher_is_better` (None: no direction); `needs_attack` is False for
    metrics of the clean map alone; `bounds` are the metric's plotting bounds (torchmetrics' `plot_lower_bound`
    and `plot_upper_bound`, None where it has none); a row whose mean lies above `flag_above` is flagged with
    `flag_message` (e.g. the sanity check's "maps do not depend on the model"); `control` is `(column, control
    column)` of a metric whose rows are flagged with `control_message` unless the column is clearly below its
    control (`SampleMetric.control`); `counted` are 0/1 indicator columns the table shows as counts.
    """

    label: str
    class_path: str
    settings: dict[str, Any]
    columns: dict[str, bool | None]
    needs_attack: bool
    interval: bool
    bounds: tuple[float | None, float | None] = (None, None)
    flag_above: float | None = None
    flag_message: str | None = None
    control: tuple[str, str] | None = None
    control_message: str | None = None
    counted: tuple[str, ...] = ()


@dataclass(frozen=True)
class RowSpec:
    """One results row: an explainer under one budget. `surrogates` names, per label of an attack that applies
    to it, whose map the attack differentiated (`self`, a registry name, or `none`)."""

    method: str
    label: str
    explainer: str
    display_name: str
    family: str
    epsilon: float
    surrogates: dict[str, str]


@dataclass(frozen=True)
class RunDescription:
    """Everything that defines an evaluation's records, and how its results are reported."""

    classifier: str
    classifier_sha256: str | None
    dataset: str
    data_settings: dict[str, Any]
    test_set_size: int
    planned_samples: int
    explainers: tuple[ExplainerSpec, ...]
    attacks: tuple[AttackSpec, ...]
    metrics: tuple[MetricSpec, ...]
    rows: tuple[RowSpec, ...]
    epsilons: tuple[float, ...]
    target: str
    seed: int
    warm_start: bool
    convexity_iterations: int
    noise_protocol: str = ""  # the random-number generator of every noise draw (mglightning.random)
    bootstrap_samples: int = 1000
    grid_samples: int = 4
    keep_maps: str | None = None  # the stored maps' dtype (`float16`, `float32`), None when no maps are stored
    keep_inputs: bool = False
    versions: dict[str, str] = field(default_factory=dict)
    title: str = ""
    note: str | None = None

    @property
    def metric_columns(self) -> list[str]:
        """The metric columns of the records, in the metrics' order."""
        return [column for metric in self.metrics for column in metric.columns]

    @property
    def fingerprint(self) -> str:
        """SHA-256 of every field that changes a record (settings, classifier file, data, seeds)."""
        measured = {key: value for key, value in self.to_dict().items() if key not in _REPORTING_FIELDS}
        return hashlib.sha256(json.dumps(measured, sort_keys=True, default=str).encode()).hexdigest()

    def differences(self, other: RunDescription) -> list[str]:
        """The names of the fields that change a record and differ between the two descriptions."""
        mine, theirs = self.to_dict(), other.to_dict()
        return sorted(key for key in mine if key not in _REPORTING_FIELDS and mine[key] != theirs.get(key))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (tuples as lists)."""
        return json.loads(json.dumps(asdict(self), default=str))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunDescription:
        parts = {"explainers": ExplainerSpec, "attacks": AttackSpec, "metrics": MetricSpec, "rows": RowSpec}
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(data) - known - {"fingerprint"})
        missing = sorted(
            item.name for item in fields(cls)
            if item.name not in data and item.default is MISSING and item.default_factory is MISSING
        )
        if unknown or missing:
            raise RunDescriptionError(
                f"run.json does not describe an evaluation of this mglightning version (unknown fields {unknown}, "
                f"missing {missing}); evaluate into a new folder."
            )
        values = dict(data)
        values.pop("fingerprint", None)
        values["metrics"] = [
            {**item, "bounds": tuple(item["bounds"]),
             **({"control": tuple(item["control"])} if item.get("control") else {}),
             **({"counted": tuple(item["counted"])} if "counted" in item else {})}
            for item in values["metrics"]
        ]
        for key, part in parts.items():
            values[key] = tuple(part(**item) for item in values[key])
        values["epsilons"] = tuple(values["epsilons"])
        return cls(**values)

    def save(self, run_dir: str | Path) -> Path:
        """Write `<run_dir>/run.json` atomically (with the fingerprint, for readers)."""
        path = Path(run_dir) / "run.json"
        text = json.dumps({**self.to_dict(), "fingerprint": self.fingerprint}, indent=2) + "\n"
        atomic_write_bytes(path, text.encode("utf-8"))
        return path

    @classmethod
    def load(cls, run_dir: str | Path) -> RunDescription:
        """The description in `<run_dir>/run.json`, with a clear error when the folder is not a run."""
        path = Path(run_dir) / "run.json"
        if not path.is_file():
            raise RunDescriptionError(
                f"{str(run_dir)!r} is not an evaluation run folder (no run.json); pass the folder that evaluate.py "
                "printed (e.g. logs/eval_digits/version_0)."
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RunDescriptionError(f"{path} cannot be read ({error}); evaluate into a new folder.") from None
        return cls.from_dict(data)
