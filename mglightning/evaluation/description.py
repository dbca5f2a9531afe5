"""The typed description of an evaluation run (`<run_dir>/run.json`): what was evaluated, and how to read it.

The evaluator builds it with `describe_run` when a run starts (the classifier's weights file identified by its
SHA-256) and writes it; the report reads it to name and order the results rows, and a resumed run compares its
`fingerprint` (every field that changes a record) with the new evaluation's, so records of another evaluation are
never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mglightning.evaluation.files import atomic_write_bytes
from mglightning.random import NOISE_PROTOCOL

if TYPE_CHECKING:
    from mglightning.attacks import Attack
    from mglightning.explainers.base import Explainer
    from mglightning.models.loading import ClassifierSource

__all__ = ["AttackSpec", "ExplainerSpec", "MetricSpec", "RowSpec", "RunDescription", "RunDescriptionError",
           "describe_run", "file_sha256", "weights_file"]

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


def describe_run(
    *,
    classifier: ClassifierSource | str,
    datamodule: Any,
    planned_samples: int,
    explainers: Mapping[str, Explainer],
    attack_factories: Mapping[str, Any],
    attacks: Mapping[tuple[str, float, str], Attack],
    metrics: tuple[MetricSpec, ...],
    rows: Sequence[tuple[str, str, float]],
    epsilons: Sequence[float],
    target: str,
    seed: int,
    warm_start: bool,
    convexity_iterations: int,
    bootstrap_samples: int,
    grid_samples: int,
    keep_maps: str | None,
    keep_inputs: bool,
    note: str | None,
) -> RunDescription:
    """The description of an evaluation about to run: every setting that changes a record, and how to report it.

    Args:
        classifier: the evaluator's classifier source; its weights file is hashed into `classifier_sha256`.
        datamodule: the set-up data module (its class names the data set, its `hparams` but the loading ones are
            the data settings, its `test_dataset` gives the test set size).
        planned_samples: how many test samples the run evaluates in all.
        explainers: `{label: explainer}`, as built.
        attack_factories: `{label: factory}` from the config (a partial's keywords are the attack's settings).
        attacks: `{(explainer label, budget, attack label): attack}`, every attack as built.
        metrics: the metrics' specs (`mglightning.evaluation.measure.metric_specs`).
        rows: `(results row, explainer label, budget)` of every results row (`method_rows`).
        epsilons: the budgets.
        target, seed, warm_start, convexity_iterations, bootstrap_samples, grid_samples, keep_maps, keep_inputs,
            note: the evaluator's settings of those names.
    """
    explainer_specs = tuple(
        ExplainerSpec(
            label=label, name=explainer.name, display_name=explainer.display_name, family=explainer.family,
            class_path=_class_path(type(explainer)),
            settings={name: getattr(explainer, name) for name in explainer.settings()},
        )
        for label, explainer in explainers.items()
    )
    _, first_label, first_eps = rows[0]
    built = {label: attacks[(first_label, first_eps, label)] for label in attack_factories}
    attack_specs = tuple(
        AttackSpec(label=label, name=getattr(built[label], "name", label), class_path=_class_path(type(built[label])),
                   settings=dict(getattr(factory, "keywords", {}) or {}))  # a bare class passes no settings
        for label, factory in attack_factories.items()
    )
    row_specs = tuple(
        RowSpec(
            method=row, label=label, explainer=explainers[label].name,
            display_name=explainers[label].display_name + ("" if len(epsilons) == 1 else f" (ε={eps:g})"),
            family=explainers[label].family, epsilon=eps,
            surrogates={attack_label: getattr(attacks[(label, eps, attack_label)], "surrogate_name", "none")
                        for attack_label in attack_factories if attacks[(label, eps, attack_label)].applies},
        )
        for row, label, eps in rows
    )
    data_settings = {
        key: value
        for key, value in dict(getattr(datamodule, "hparams", {})).items()
        if key not in ("batch_size", "num_workers", "pin_memory")
    }
    attack_names = ", ".join(attack_factories)
    return RunDescription(
        classifier=str(classifier),
        classifier_sha256=file_sha256(weights_file(classifier)),
        dataset=type(datamodule).__name__, data_settings=data_settings,
        test_set_size=len(datamodule.test_dataset), planned_samples=planned_samples,
        explainers=explainer_specs, attacks=attack_specs, metrics=metrics, rows=row_specs, epsilons=tuple(epsilons),
        target=target, seed=seed, warm_start=warm_start,
        convexity_iterations=convexity_iterations, noise_protocol=NOISE_PROTOCOL,
        bootstrap_samples=bootstrap_samples,
        grid_samples=grid_samples, keep_maps=keep_maps, keep_inputs=keep_inputs,
        versions={"python": platform.python_version(), "torch": torch.__version__},
        title=f"{type(datamodule).__name__}, {attack_names} attack" + ("s" if len(attack_factories) > 1 else ""),
        note=note,
    )


def weights_file(source: ClassifierSource | str) -> str | None:
    """The file holding the classifier's weights, for the run's fingerprint (None for timm's cache)."""
    if isinstance(source, (str, Path)):
        return str(source)
    return source.checkpoint or source.weights


def file_sha256(path: str | Path | None) -> str | None:
    """SHA-256 of a file (the classifier's weights), read in 1 MiB blocks; None for what is not a file."""
    if path is None or not Path(str(path)).is_file():
        return None
    digest = hashlib.sha256()
    with open(Path(str(path)), "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
