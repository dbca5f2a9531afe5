"""The measurement of one batch: explain, attack, explain again and measure. No Lightning, no files.

`measure_batch` is what the evaluation LightningModule runs for every batch, and what a notebook can call on a
model and a batch directly:

    from mglightning.evaluation import measure_batch
    from mglightning.explainers import MoreauGrad, SimpleGradient
    measured = measure_batch(
        model, images, labels, indices,
        explainers={"simple_gradient": SimpleGradient(model), "moreaugrad": MoreauGrad(model, rho=0.06)},
        epsilons=[0.25],
    )
    measured.records          # one Record per (sample, method, budget, attack)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mglightning.attacks import Attack, TopKInterpretationAttack
from mglightning.data.evaluation import sample_seeds
from mglightning.evaluation.description import MetricSpec
from mglightning.evaluation.maps import BatchMaps
from mglightning.evaluation.records import Record, record_fields
from mglightning.explainers.base import Explainer, check_finite_scores
from mglightning.explainers.diagnostics import corollary_bound, local_convexity
from mglightning.metrics import MapBatch, NormalizedDistance, SaliencySSIM, SampleMetric, Sparsity, TopKIntersection

__all__ = [
    "AttackFactory",
    "BatchMeasurement",
    "build_attack",
    "GridSample",
    "default_attacks",
    "default_metrics",
    "measure_batch",
    "method_rows",
    "metric_columns",
    "metric_specs",
]

AttackFactory = Callable[[Explainer, float], Attack]


def default_attacks() -> dict[str, AttackFactory]:
    """The attack of an evaluation that names none: the top-k attack with its defaults."""
    return {"topk": TopKInterpretationAttack}


def default_metrics() -> dict[str, SampleMetric]:
    """The metrics of an evaluation that names none: distance, top-k intersection, SSIM and sparsity."""
    return {"distance": NormalizedDistance(), "topk": TopKIntersection(), "ssim": SaliencySSIM(), "sparsity": Sparsity()}


def metric_columns(metrics: Mapping[str, SampleMetric]) -> dict[str, tuple[str, str]]:
    """`{record column: (metric label, output)}`: a single-output metric's column is its label, a metric with
    several outputs gets one column per output name. Clashing columns are an error."""
    own = {item.name for item in record_fields()}
    columns: dict[str, tuple[str, str]] = {}
    for label, metric in metrics.items():
        if not isinstance(metric, SampleMetric):
            raise ValueError(
                f"metrics[{label!r}] is a {type(metric).__name__}, not an mglightning.metrics.SampleMetric; metrics "
                "of an evaluation subclass SampleMetric (docs/guides/extending.md)."
            )
        outputs = list(metric.outputs)
        names = [label] if len(outputs) == 1 else outputs
        for name, output in zip(names, outputs):
            if name in columns or name in own:
                clash = f"metrics[{columns[name][0]!r}]" if name in columns else "a record column of its own"
                raise ValueError(f"metrics[{label!r}]: its column {name!r} clashes with {clash}; rename the metric.")
            columns[name] = (label, output)
    return columns


def build_attack(factory: AttackFactory, explainer: Explainer, epsilon: float) -> Attack:
    """`factory(explainer, epsilon)`, checked to be an `Attack`: the one place an attack gets its budget (its
    other settings, `warm_start` and `search_settings` included, are the factory's own)."""
    attack = factory(explainer, epsilon)
    if not isinstance(attack, Attack):
        raise ValueError(f"the attack factory built a {type(attack).__name__}, not an mglightning.attacks.Attack.")
    return attack


def metric_specs(metrics: Mapping[str, SampleMetric]) -> tuple[MetricSpec, ...]:
    """The run description's entries of metrics: class, constructor settings, record columns and directions."""
    columns = metric_columns(metrics)

    def column_of(label: str, output: str) -> str:
        return next(column for column, (owner, name) in columns.items() if owner == label and name == output)

    return tuple(
        MetricSpec(
            label=label, class_path=f"{type(metric).__module__}.{type(metric).__qualname__}",
            settings=_metric_settings(metric),
            columns={column: metric.outputs[output] for column, (owner, output) in columns.items() if owner == label},
            needs_attack=metric.needs_attack, interval=metric.interval,
            bounds=(getattr(metric, "plot_lower_bound", None), getattr(metric, "plot_upper_bound", None)),
            flag_above=getattr(metric, "flag_above", None), flag_message=getattr(metric, "flag_message", None),
            control=None if metric.control is None else tuple(column_of(label, output) for output in metric.control),
            control_message=metric.control_message,
            counted=tuple(column_of(label, output) for output in metric.counted),
        )
        for label, metric in metrics.items()
    )


def _metric_settings(metric: SampleMetric) -> dict[str, Any]:
    """A metric's constructor settings, read back from the attributes of the same names."""
    import inspect

    names = [name for name in inspect.signature(type(metric).__init__).parameters if name not in ("self", "kwargs")]
    return {name: getattr(metric, name) for name in names if hasattr(metric, name) and name != "model"}


def method_rows(explainer_labels: Sequence[str], epsilons: Sequence[float]) -> list[tuple[str, str, float]]:
    """`(results row, explainer label, budget)` for every explainer and budget; a row is named after the
    explainer alone when one budget is evaluated, else `<label>@eps=<budget>`."""
    return [
        (label if len(epsilons) == 1 else f"{label}@eps={eps:g}", label, float(eps))
        for label in explainer_labels
        for eps in epsilons
    ]


@dataclass
class GridSample:
    """The saliency-grid part of one batch: its samples with index below `grid_samples`.

    `clean`, `attacked_input` and `attacked` are `{results row: (k, C, H, W)}`, each row under the first of the
    run's attacks that applies to it (a row that no attack applies to has none).
    """

    index: Tensor
    image: Tensor
    label: Tensor
    prediction: Tensor
    clean: dict[str, Tensor] = field(default_factory=dict)
    attacked_input: dict[str, Tensor] = field(default_factory=dict)
    attacked: dict[str, Tensor] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Tensors and plain containers only, so it reads back with `torch.load(weights_only=True)`."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GridSample:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


@dataclass
class BatchMeasurement:
    """What `measure_batch` returns: the batch's records, the maps of its grid samples when it holds some, and
    every map when asked to keep them."""

    records: list[Record]
    grid: GridSample | None = None
    maps: BatchMaps | None = None


def _clock(reference: Tensor) -> float:
    """Seconds on a monotonic clock, after the device's queued kernels have finished (CUDA runs asynchronously)."""
    if reference.is_cuda:
        torch.cuda.synchronize(reference.device)
    return time.perf_counter()


def _costs(values: Tensor) -> list[float]:
    return [float(value) for value in values.tolist()]


def _attacked_map(
    explainer: Explainer, images: Tensor, inputs: Tensor, target: Tensor, seeds: Tensor, clean: Tensor
) -> tuple[Tensor, Tensor]:
    """The maps of an attack's returned `inputs` and their cost per sample: the explainer's cold map of the
    samples that differ from their clean `images` (with their own seeds; a map does not depend on its batch) and
    the clean map, bit for bit, of the samples returned clean (compared here, whatever the attack reports)."""
    moved = (inputs != images).flatten(1).any(dim=1)
    costs = torch.zeros(len(inputs), dtype=torch.long)
    if not bool(moved.any()):
        return clean.detach().clone(), costs
    if bool(moved.all()):
        explanation = explainer.explain(inputs, target, seeds=seeds)
        return explanation.attribution, explanation.gradient_evaluations.cpu().long()
    rows = moved.nonzero().flatten()
    explanation = explainer.explain(inputs[rows], target[rows], seeds=seeds[rows.cpu()])
    attacked = clean.detach().clone()
    attacked[rows] = explanation.attribution.to(attacked.dtype)
    costs[rows.cpu()] = explanation.gradient_evaluations.cpu().long()
    return attacked, costs


def measure_batch(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    indices: Tensor,
    *,
    explainers: Mapping[str, Explainer],
    epsilons: Sequence[float] = (0.5,),
    attacks: Mapping[str, AttackFactory] | None = None,
    metrics: Mapping[str, SampleMetric] | None = None,
    seed: int = 0,
    target: str = "prediction",
    convexity_iterations: int = 0,
    grid_samples: int = 0,
    rank: int = 0,
    model_name: str | None = None,
    progress: Callable[[str], None] | None = None,
    keep_maps: bool = False,
    keep_inputs: bool = False,
) -> BatchMeasurement:
    """Explain, attack and measure one batch with every explainer, budget, attack and metric.

    For each explainer: its clean map; for each budget and attack: the attack, the map of the attacked input, and
    every metric; one `Record` per (sample, method, budget, attack). Noise seeds come from `seed` and the dataset
    `indices`, so a sample's records do not depend on its batch or device.

    The attacks may search with cheaper maps (warm-started, fewer solver steps: the top-k attack's `warm_start`
    and `search_settings`), but what is reported is exact: the clean map and the map of every attacked input
    are made by the explainer as configured, cold, with the sample's seeds. A sample that the attack did not move
    keeps its clean input, so its attacked map is the clean map itself (not computed again: 0 evaluations).

    Args:
        model: the classifier (eval mode, [0, 1] inputs) the explainers explain.
        images: `(B, C, H, W)` images in [0, 1].
        labels: `(B,)` dataset labels.
        indices: `(B,)` dataset indices (the records' keys and the noise seeds' source).
        explainers: `{label: explainer}` built on `model`.
        epsilons: the attack budgets (L2, pixel units).
        attacks: `{label: factory(explainer, epsilon) -> Attack}` (default: the top-k attack), each built here
            once per explainer and budget; an attack that warm-starts is given the clean map's solution.
        metrics: `{label: SampleMetric}` (default: distance, top-k, SSIM, sparsity). Not updated here.
        seed: the global seed of every noise draw.
        target: explain the model's `prediction` or the dataset `label`.
        convexity_iterations: power iterations of the local weak-convexity estimate of MoreauGrad-family rows
            (0: not computed).
        grid_samples: keep the maps of samples with dataset index below this for the saliency grid.
        rank: the process's rank, stored in the records.
        model_name: how an error about the model's scores names it (default: its class name).
        progress: called with a short description before each phase (clean map, each attack).
        keep_maps: return every clean and attacked map (`BatchMeasurement.maps`, detached, on the CPU).
        keep_inputs: with `keep_maps`, the clean and attacked inputs too.

    Returns:
        A `BatchMeasurement`.
    """
    attacks = default_attacks() if attacks is None else attacks
    metrics = default_metrics() if metrics is None else metrics
    if not attacks:
        raise ValueError("Give at least one attack, e.g. {'topk': mglightning.attacks.TopKInterpretationAttack}.")
    columns = metric_columns(metrics)
    with torch.no_grad():
        logits = model(images)
    check_finite_scores(logits, model_name or type(model).__name__)
    predictions = logits.argmax(dim=1)
    explained = predictions if target == "prediction" else labels.to(predictions.device)
    seeds = sample_seeds(seed, indices.cpu())
    batch_size = len(images)
    keep = (indices < grid_samples).cpu()
    grid = None
    if keep.any():
        grid = GridSample(indices.cpu()[keep], images.detach().cpu()[keep], labels.cpu()[keep],
                          predictions.cpu()[keep])
    maps = None
    if keep_maps:
        maps = BatchMaps(indices.cpu(), inputs=images.detach().cpu() if keep_inputs else None)
    records: list[Record] = []
    base = {
        "index": indices.tolist(), "label": labels.tolist(), "prediction": predictions.tolist(),
        "target": explained.tolist(),
    }

    def values_of(metric_label: str, measured: dict[str, Tensor]) -> dict[str, list[float]]:
        return {
            column: [float(value) for value in measured[output].detach().cpu().tolist()]
            for column, (label, output) in columns.items() if label == metric_label
        }

    for label, explainer in explainers.items():
        if progress is not None:
            progress(f"{label}: clean map")
        started = _clock(images)
        explanation = explainer.explain(images, explained, seeds=seeds)
        clean = explanation.attribution
        seconds_clean = (_clock(images) - started) / batch_size
        if maps is not None:
            maps.clean[label] = clean.detach().cpu()
        clean_values: dict[str, list[float]] = {}
        clean_batch = MapBatch(model, images, explained, clean.detach(), explainer=explainer, seeds=seeds)
        for metric_label, metric in metrics.items():
            if not metric.needs_attack:
                clean_values.update(values_of(metric_label, metric.measure(clean_batch)))
        convexity = None
        if convexity_iterations and explainer.family == "moreaugrad":
            # Corollary 1's lambda is that of the function whose envelope the method takes: in regularised mode
            # the Gaussian-smoothed score (its Hessian averaged over the method's own number of draws).
            convexity = local_convexity(
                model, images, explained, rho=explainer.rho, num_iterations=convexity_iterations,
                score=explainer.score, noise_std=explainer.noise_std, noise_samples=explainer.noise_samples,
                seeds=seeds,
            )
        for eps in epsilons:
            method = label if len(epsilons) == 1 else f"{label}@eps={eps:g}"
            diagnostic: dict[str, list[Any]] = {}
            if convexity is not None:
                bound = corollary_bound(convexity.weak_convexity, explainer.rho, eps).tolist()
                diagnostic = {
                    "weak_convexity": convexity.weak_convexity.tolist(),
                    "convex": convexity.convex.float().tolist(),
                    "bound": [value if math.isfinite(value) else None for value in bound],
                }
            for attack_label, factory in attacks.items():
                if progress is not None:
                    progress(f"{label}: {attack_label} attack at ε={eps:g}")
                attack = build_attack(factory, explainer, eps)
                if not attack.applies:
                    continue
                started = _clock(images)
                # An attack that warm-starts its solver starts from the clean map's solution; the others ignore it.
                result = attack.run(images, explained, seeds=seeds, initial=explanation.solution)
                seconds_attack = (_clock(images) - started) / batch_size
                started = _clock(images)
                attacked, evals_attacked = _attacked_map(explainer, images, result.inputs, explained, seeds, clean)
                seconds_attacked = (_clock(images) - started) / batch_size
                pair = MapBatch(model, images, explained, clean.detach(), result.inputs, attacked.detach(),
                                explainer=explainer, seeds=seeds)
                change = (attacked.detach() - clean.detach()).flatten(1).double().norm(dim=1).cpu().tolist()
                corollary: dict[str, list[Any]] = {"map_change": change}
                if diagnostic:
                    corollary["bound_holds"] = [
                        None if limit is None else float(moved_by <= limit)
                        for moved_by, limit in zip(change, diagnostic["bound"])
                    ]
                values = dict(clean_values)
                for metric_label, metric in metrics.items():
                    if metric.needs_attack:
                        values.update(values_of(metric_label, metric.measure(pair)))
                evals = {
                    "evals_clean": _costs(explanation.gradient_evaluations),
                    "evals_attack": _costs(result.gradient_evaluations),
                    "evals_attacked": _costs(evals_attacked),
                }
                for position in range(batch_size):
                    records.append(
                        Record(
                            **{key: column[position] for key, column in base.items()},
                            method=method, explainer=explainer.name, epsilon=float(eps), attack=attack_label,
                            moved=bool(result.moved[position]),
                            seconds_clean=seconds_clean, seconds_attack=seconds_attack,
                            seconds_attacked=seconds_attacked,
                            **{key: column[position] for key, column in evals.items()},
                            **{key: column[position] for key, column in diagnostic.items()},
                            **{key: column[position] for key, column in corollary.items()},
                            rank=rank,
                            values={column: entries[position] for column, entries in values.items()},
                        )
                    )
                if maps is not None:
                    maps.methods[method] = label
                    maps.attacked[(method, attack_label)] = attacked.detach().cpu()
                    if keep_inputs:
                        maps.attacked_inputs[(method, attack_label)] = result.inputs.detach().cpu()
                # The grid shows each row under the first attack that applies to it (not every attack applies
                # to every method, e.g. `exact` or a `distinct_only` one).
                if grid is not None and method not in grid.attacked:
                    grid.clean[method] = clean.detach().cpu()[keep]
                    grid.attacked_input[method] = result.inputs.detach().cpu()[keep]
                    grid.attacked[method] = attacked.detach().cpu()[keep]
    return BatchMeasurement(records, grid, maps)
