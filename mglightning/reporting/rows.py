"""The typed results of an evaluation: a results row, a paired comparison, and the evaluated run they describe.

`statistics` computes them from a run's records, `tables` formats them and `results` writes them to files;
`json_ready` is the one conversion of their values to strict JSON.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from mglightning.evaluation.description import RunDescription

__all__ = ["Comparison", "EvaluatedRun", "ResultRow", "json_ready"]


@dataclass
class ResultRow:
    """One results row: a method under one attack budget, averaged over the evaluated samples.

    With several attacks each sample enters at its worst case over them (per metric: the highest value where
    lower is better, the lowest where higher is better), costs add up over the attacks and a sample counts as
    moved when any attack moved it; `per_attack` keeps every attack's own means and `worst_attack` says, per
    attack, for how many samples it gave the worst value of the robustness metric `worst_attack_metric` (the
    run's first metric column with a direction that needs the attack).

    Attributes:
        values: the mean of every metric column (`distance`, `topk`, ... as the run's metrics name them) and of
            every averaged record field (`attack_success`, `seconds_per_image`, `evals_clean`, ...; None when the
            run did not compute it, e.g. `convex_share`). With the convexity diagnostic, `corollary_share` is the
            share of the samples with a finite Corollary 1 bound whose map moved by at most the bound under
            every attack, and `condition_fails_share` the share of samples where the local condition
            `rho < 1 / lambda` fails (`1 - convex_share`).
        intervals: the 95% bootstrap interval of the mean of every metric column (`bootstrap_interval`).
        directions: `{metric column: higher_is_better}` (None: no direction).
        shown_intervals: the metric columns whose interval the table shows.
        flags: `{metric column: warning}` where the row's mean lies above the metric's `flag_above`, or where a
            metric with a control is not clearly below it (the sanity check's "maps may not depend on the model").
        counts: `{counted column: number of samples}` of a metric's 0/1 indicator columns (the sanity check's
            undefined samples).
    """

    method: str
    label: str
    explainer: str
    display_name: str
    family: str
    epsilon: float
    attack: str
    surrogate: str
    samples: int
    values: dict[str, float | None]
    intervals: dict[str, tuple[float, float]]
    directions: dict[str, bool | None] = field(default_factory=dict)
    shown_intervals: tuple[str, ...] = ()
    per_attack: dict[str, dict[str, float]] = field(default_factory=dict)
    worst_attack: dict[str, int] = field(default_factory=dict)
    flags: dict[str, str] = field(default_factory=dict)
    worst_attack_metric: str = ""
    counts: dict[str, int] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        # Metric values and summaries read as attributes (`row.topk`, `row.topk_ci`, `row.attack_success`).
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        if name.endswith("_ci") and name[:-3] in self.__dict__.get("intervals", {}):
            return self.__dict__["intervals"][name[:-3]]
        raise AttributeError(f"{type(self).__name__} has no {name!r}; its values are {sorted(values)}.")

    def to_dict(self) -> dict[str, Any]:
        return json_ready(asdict(self))


@dataclass
class Comparison:
    """A paired comparison of two methods on the same samples under the same budget.

    `difference` is the mean over samples of `metric(method) - metric(baseline)`, `interval` its 95% bootstrap
    interval; `verdict` says whether `method` is significantly more or less robust by this metric.
    """

    method: str
    baseline: str
    epsilon: float
    metric: str
    samples: int
    difference: float
    interval: tuple[float, float]
    verdict: str = field(default="")

    def to_dict(self) -> dict[str, Any]:
        return json_ready(asdict(self))


@dataclass(frozen=True)
class EvaluatedRun:
    """A run as its results describe it: its description (`run.json`) and what its records add, the number of
    evaluated samples and the clean accuracy on them."""

    description: RunDescription
    samples: int
    accuracy: float

    @classmethod
    def from_records(cls, description: RunDescription, records: Any) -> EvaluatedRun:
        """The run of `records` (a `pandas.DataFrame`, `read_records`): each sample counted once, by its index."""
        first = records.drop_duplicates("index")
        return cls(description, int(first["index"].nunique()), float((first["label"] == first["prediction"]).mean()))

    def to_dict(self) -> dict[str, Any]:
        """`results.json`'s `run_info`: the description's fields, then `samples` and `accuracy`."""
        return json_ready({**self.description.to_dict(), "samples": self.samples, "accuracy": self.accuracy})


def json_ready(value: Any) -> Any:
    """JSON-serialisable copy: NaN/inf become null (strict JSON), tuples lists, unknown objects strings."""
    if isinstance(value, Mapping):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, np.generic):
        return json_ready(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    return str(value)
