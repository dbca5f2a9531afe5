"""Robustness against fidelity (beyond the paper): MoreauGrad over `rho` and SmoothGrad over `sigma` on one model.

Comparing MoreauGrad at one `rho` with SmoothGrad at one `sigma` is arbitrary: both smooth the model, and
smoothing buys a map's stability with its fidelity to the model. This sweeps both knobs and places every setting
on the plane (fidelity, robustness):

- **robustness**: the mean over samples of each sample's worst-case top-k intersection (fraction 0.4) over the
  attacks `own` (the method's own differentiable map; the official stand-in for MoreauGrad), `exact` (the
  implicit derivative of MoreauGrad's map; an estimate in regularised mode), `transfer` (through the simple
  gradient) and `noise` (random, same L2 norm), at one budget, as the evaluation's worst case does;
- **fidelity**: the deletion AUC of the clean map (lower is more faithful: deleting the pixels the map ranks
  first destroys the class score sooner), and the discrepancy from the simple gradient (the paper's equation 6,
  `normalized_distance`: how far the map strays from the model's own first-order explanation).

The simple gradient is the common origin of both curves (`rho -> 0`, `sigma -> 0`). A method dominates where its
curve lies higher at the same fidelity. Every point is computed by `mglightning.evaluation.measure_batch`, the
evaluation's own code, on the same samples and seeds.

Example:
    >>> result = robustness_fidelity_frontier(model, samples, [0.02, 0.06], [0.05, 0.1], epsilon=0.75)  # doctest: +SKIP
    >>> figure = frontier_figure(result)                         # doctest: +SKIP
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from mglightning.attacks import GaussianNoise, TopKInterpretationAttack
from mglightning.evaluation.measure import measure_batch
from mglightning.explainers import MoreauGrad, SimpleGradient, SmoothGrad
from mglightning.metrics import DeletionInsertionAUC, TopKIntersection, normalized_distance
from mglightning.paper_figures import Samples
from mglightning.reporting.figures import new_figure
from mglightning.reporting.statistics import bootstrap_interval

__all__ = ["FrontierPoint", "frontier_figure", "robustness_fidelity_frontier"]


@dataclass
class FrontierPoint:
    """One setting's means over the samples, each with its 95% bootstrap interval.

    Attributes:
        method: `simple_gradient`, `moreaugrad` or `smoothgrad`.
        parameter: `rho` (MoreauGrad), `sigma` (SmoothGrad) or `none`.
        value: the parameter's value (pixel units; 0 for the simple gradient).
        topk: mean worst-case top-k intersection (higher: more robust).
        deletion_auc: mean deletion AUC of the clean map (lower: more faithful).
        discrepancy: mean normalised distance of the clean map from the simple gradient's.
        evals_per_image: gradient evaluations per image (clean map + every attack + attacked maps).
        seconds: wall-clock seconds of the point (all samples, all attacks).
        cpu_seconds: CPU seconds of this process for the point (what to plan with on a shared machine).
    """

    method: str
    parameter: str
    value: float
    topk: float
    topk_ci: tuple[float, float]
    deletion_auc: float
    deletion_auc_ci: tuple[float, float]
    discrepancy: float
    discrepancy_ci: tuple[float, float]
    evals_per_image: float
    seconds: float
    cpu_seconds: float


def _attacks(steps: int) -> dict[str, Any]:
    topk = functools.partial(TopKInterpretationAttack, num_steps=steps, topk_fraction=0.4)
    return {
        "own": functools.partial(topk, surrogate="self"),
        "exact": functools.partial(topk, surrogate="exact", distinct_only=True),
        "transfer": functools.partial(topk, surrogate="simple_gradient", distinct_only=True),
        "noise": GaussianNoise,
    }


def robustness_fidelity_frontier(
    model: nn.Module,
    samples: Samples,
    rhos: Sequence[float],
    sigmas: Sequence[float],
    epsilon: float,
    *,
    num_steps: int = 50,
    noise_std: float = 0.1,
    noise_samples: int = 4,
    average_last: int = 17,
    nt_samples: int = 16,
    attack_steps: int = 10,
    deletion_steps: int = 16,
    batch_size: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """Worst-case top-k against deletion AUC and discrepancy for the simple gradient, MoreauGrad at each `rho`
    and SmoothGrad at each `sigma` (see the module docstring).

    Args:
        model: the classifier (eval mode, [0, 1] inputs).
        samples: the test samples (`select_samples`); the explained class is the prediction.
        rhos: MoreauGrad's `rho` values (pixel units), at least one, each > 0; `step_size = 0.1 * rho`.
        sigmas: SmoothGrad's noise levels (pixel units), each > 0.
        epsilon: the attack budget (L2, pixel units).
        num_steps, noise_std, noise_samples, average_last: MoreauGrad's solver (regularised mode by default, as
            configs/eval_cifar10_study.yaml).
        nt_samples: SmoothGrad's noise draws.
        attack_steps: steps of each top-k attack.
        deletion_steps: points of the deletion curve.
        batch_size: samples per `measure_batch` call.
        seed: the noise seed of every draw.

    Returns:
        `{"points": [FrontierPoint as dict, ...], "epsilon", "samples", "settings"}` (JSON-ready).
    """
    if not rhos or not sigmas or any(value <= 0 for value in (*rhos, *sigmas)):
        raise ValueError(f"rhos and sigmas must be non-empty and > 0, got {list(rhos)} and {list(sigmas)}.")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0 (an L2 budget in pixel units), got {epsilon}.")
    settings = {"num_steps": num_steps, "noise_std": noise_std, "noise_samples": noise_samples,
                "average_last": average_last}
    candidates: list[tuple[str, str, float, Any]] = [("simple_gradient", "none", 0.0, SimpleGradient(model))]
    candidates += [("moreaugrad", "rho", float(rho), MoreauGrad(model, rho=rho, step_size=0.1 * rho, **settings))
                   for rho in rhos]
    candidates += [("smoothgrad", "sigma", float(sigma), SmoothGrad(model, stdevs=sigma, nt_samples=nt_samples))
                   for sigma in sigmas]
    reference = SimpleGradient(model).attribute(samples.images, samples.predictions).detach().cpu()
    attacks = _attacks(attack_steps)
    metrics = {"topk": TopKIntersection(fraction=0.4), "fidelity": DeletionInsertionAUC(steps=deletion_steps)}
    points = []
    for method, parameter, value, explainer in candidates:
        started, cpu_started = time.perf_counter(), time.process_time()
        records, clean = [], []
        for start in range(0, len(samples.images), batch_size):
            part = slice(start, start + batch_size)
            measured = measure_batch(
                model, samples.images[part], samples.labels[part], samples.indices[part],
                explainers={method: explainer}, epsilons=[epsilon], attacks=attacks, metrics=metrics, seed=seed,
                keep_maps=True,
            )
            records += measured.records
            clean.append(measured.maps.clean[method])
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        worst: dict[int, float] = {}
        deletion: dict[int, float] = {}
        evals: dict[int, float] = {}
        for record in records:
            worst[record.index] = min(worst.get(record.index, np.inf), record.values["topk"])
            deletion[record.index] = record.values["deletion_auc"]
            evals[record.index] = evals.get(record.index, record.evals_clean) + record.evals_attack \
                + record.evals_attacked
        order = sorted(worst)
        topk = np.array([worst[index] for index in order])
        auc = np.array([deletion[index] for index in order])
        distance = normalized_distance(torch.cat(clean), reference).double().cpu().numpy()
        points.append(asdict(FrontierPoint(
            method=method, parameter=parameter, value=value,
            topk=float(topk.mean()), topk_ci=bootstrap_interval(topk, seed=seed),
            deletion_auc=float(auc.mean()), deletion_auc_ci=bootstrap_interval(auc, seed=seed),
            discrepancy=float(distance.mean()), discrepancy_ci=bootstrap_interval(distance, seed=seed),
            evals_per_image=float(np.mean(list(evals.values()))), seconds=round(seconds, 2),
            cpu_seconds=round(cpu_seconds, 2),
        )))
    return {
        "points": points, "epsilon": float(epsilon), "samples": int(len(samples.images)),
        "indices": samples.indices.tolist(),
        "attacks": list(attacks), "settings": {**settings, "nt_samples": nt_samples, "attack_steps": attack_steps,
                                               "deletion_steps": deletion_steps, "seed": seed},
    }


def frontier_figure(result: dict[str, Any], title: str | None = None) -> Figure:
    """Two panels, worst-case top-k (up: more robust) against deletion AUC and against the discrepancy from the
    simple gradient (left: more faithful), each point with its 95% intervals, the curves labelled by `rho` and
    `sigma` and starting from the simple gradient."""
    figure = new_figure(10, 4)
    panels = figure.subplots(1, 2, sharey=True)
    origin = next(point for point in result["points"] if point["method"] == "simple_gradient")
    styles = {"moreaugrad": ("tab:red", "MoreauGrad (ρ)"), "smoothgrad": ("tab:blue", "SmoothGrad (σ)")}
    for ax, key, label in ((panels[0], "deletion_auc", "deletion AUC of the clean map (lower: more faithful)"),
                           (panels[1], "discrepancy", "discrepancy from the simple gradient")):
        for method, (colour, name) in styles.items():
            curve = [origin] + [point for point in result["points"] if point["method"] == method]
            xs, ys = [point[key] for point in curve], [point["topk"] for point in curve]
            ax.plot(xs, ys, "-", color=colour, alpha=0.6)
            for point in curve[1:]:
                low, high = point[f"{key}_ci"]
                ylow, yhigh = point["topk_ci"]
                ax.errorbar(point[key], point["topk"], xerr=[[point[key] - low], [high - point[key]]],
                            yerr=[[point["topk"] - ylow], [yhigh - point["topk"]]], fmt="o", color=colour,
                            capsize=2, label=name if point is curve[1] else None)
                ax.annotate(f"{point['value']:g}", (point[key], point["topk"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7, color=colour)
        ax.plot(origin[key], origin["topk"], "k*", markersize=10, label="simple gradient")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    panels[0].set_ylabel(f"worst-case top-k at ε={result['epsilon']:g} (higher: more robust)")
    panels[0].legend(fontsize=8)
    figure.suptitle(title or f"Robustness against fidelity ({result['samples']} samples, worst case over "
                              f"{', '.join(result['attacks'])})", fontsize=10)
    return figure
