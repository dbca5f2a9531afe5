"""The paper's Figure 3: the discrepancy from the simple gradient (the paper's equation 6) of plain-mode MoreauGrad
against `rho` and of SmoothGrad against its noise `sigma`, with integrated gradients as a reference; and its sparse
comparison, Sparse MoreauGrad (every map at one zero share) against Sparsified SmoothGrad.

The **discrepancy** of a map `A` from the simple gradient `G` is `|| A/||A|| - G/||G|| ||_2` per sample (0: the
same direction, 2: opposite), averaged over the samples with a 95% bootstrap interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from torch import Tensor, nn

from mglightning.explainers import (
    IntegratedGradients,
    MoreauGrad,
    SimpleGradient,
    SmoothGrad,
    SparseMoreauGrad,
    SparsifiedSmoothGrad,
)
from mglightning.metrics import normalized_distance, zero_fraction
from mglightning.paper_figures.samples import Samples, pixel_settings
from mglightning.reporting.figures import new_figure
from mglightning.reporting.statistics import bootstrap_interval

__all__ = [
    "FIGURE3_RHOS",
    "FIGURE3_SIGMAS",
    "FIGURE3_SPARSE_RHOS",
    "FIGURE3_SPARSE_SIGMAS",
    "DiscrepancyCurves",
    "SparsityMatchedCurves",
    "discrepancy_curves",
    "figure3",
    "figure3_sparse",
    "sparsity_matched_curves",
]

# The paper's value grids: the defaults of the functions below and of `figures.py`'s commands, declared once.
FIGURE3_RHOS = (0.03, 0.1, 0.3, 1.0, 3.0)
"""Figure 3's MoreauGrad `rho` values, in normalised units."""
FIGURE3_SIGMAS = (0.01, 0.03, 0.1, 0.2, 0.3)
"""Figure 3's SmoothGrad noise levels, in pixel units."""
FIGURE3_SPARSE_RHOS = (0.1, 0.3, 1.0, 3.0)
"""Figure 3's sparse comparison: Sparse MoreauGrad's `rho` values, in normalised units."""
FIGURE3_SPARSE_SIGMAS = (0.03, 0.1, 0.2, 0.3)
"""Figure 3's sparse comparison: Sparsified SmoothGrad's noise levels, in pixel units."""


@dataclass
class DiscrepancyCurves:
    """Figure 3's numbers: mean discrepancy from the simple gradient with 95% bootstrap intervals.

    Attributes:
        rhos, moreaugrad, moreaugrad_ci: MoreauGrad's `rho` grid (as given), means and `(low, high)` intervals.
        sigmas, smoothgrad, smoothgrad_ci: SmoothGrad's noise grid (pixels), means and intervals.
        integrated_gradients, integrated_gradients_ci: the reference.
        units: the units of `rhos`.
        samples: how many samples.
    """

    rhos: list[float]
    moreaugrad: list[float]
    moreaugrad_ci: list[tuple[float, float]]
    sigmas: list[float]
    smoothgrad: list[float]
    smoothgrad_ci: list[tuple[float, float]]
    integrated_gradients: float
    integrated_gradients_ci: tuple[float, float]
    units: str
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items()}


def _mean_and_interval(values: Tensor) -> tuple[float, tuple[float, float]]:
    array = values.double().cpu().numpy()
    return round(float(array.mean()), 4), tuple(round(v, 4) for v in bootstrap_interval(array, resamples=2000))


def discrepancy_curves(
    model: nn.Module,
    samples: Samples,
    rhos: Sequence[float] = FIGURE3_RHOS,
    sigmas: Sequence[float] = FIGURE3_SIGMAS,
    num_steps: int = 100,
    nt_samples: int = 50,
    ig_steps: int = 50,
    units: str = "normalised",
    internal_batch_size: int | None = 256,
) -> DiscrepancyCurves:
    """The discrepancy (equation 6) of plain-mode MoreauGrad from the simple gradient for each `rho`, of SmoothGrad
    for each noise `sigma` (pixels), and of integrated gradients (zero baseline, `ig_steps` steps).

    Example:
        >>> curves = discrepancy_curves(model, samples, rhos=[0.1, 1.0], sigmas=[0.05, 0.2])
        >>> curves.moreaugrad, curves.integrated_gradients
    """
    if any(rho <= 0 for rho in rhos) or any(sigma <= 0 for sigma in sigmas):
        raise ValueError("rhos and sigmas must be > 0 (their discrepancy at 0 is 0 by definition).")
    target, images, seeds = samples.predictions, samples.images, samples.seeds
    reference = SimpleGradient(model).attribute(images, target).detach()
    mg, mg_ci, sg, sg_ci = [], [], [], []
    for rho in rhos:
        settings = pixel_settings(model, {"rho": rho, "step_size": 0.1 * rho}, units)
        explainer = MoreauGrad(model, num_steps=num_steps, noise_std=0.0, internal_batch_size=internal_batch_size,
                               **settings)
        mean, interval = _mean_and_interval(normalized_distance(explainer.attribute(images, target), reference))
        mg.append(mean), mg_ci.append(interval)
    for sigma in sigmas:
        explainer = SmoothGrad(model, stdevs=sigma, nt_samples=nt_samples, internal_batch_size=internal_batch_size)
        maps = explainer.attribute(images, target, seeds=seeds)
        mean, interval = _mean_and_interval(normalized_distance(maps, reference))
        sg.append(mean), sg_ci.append(interval)
    ig = IntegratedGradients(model, n_steps=ig_steps, internal_batch_size=internal_batch_size)
    ig_mean, ig_ci = _mean_and_interval(normalized_distance(ig.attribute(images, target), reference))
    return DiscrepancyCurves(list(rhos), mg, mg_ci, list(sigmas), sg, sg_ci, ig_mean, ig_ci, units, len(images))


# A curve of Figure 3: (x values, mean discrepancies, their (low, high) intervals, legend label, x axis label).
Curve = tuple[Sequence[float], Sequence[float], Sequence[tuple[float, float]], str, str]


def figure3(curves: DiscrepancyCurves) -> Figure:
    """The paper's Figure 3: discrepancy from the simple gradient against `rho` (MoreauGrad) and `sigma`
    (SmoothGrad), with 95% intervals and integrated gradients as a dashed reference line in both panels."""
    return _discrepancy_figure(
        (curves.rhos, curves.moreaugrad, curves.moreaugrad_ci, "MoreauGrad (plain)", f"rho ({curves.units} units)"),
        (curves.sigmas, curves.smoothgrad, curves.smoothgrad_ci, "SmoothGrad", "sigma (noise std, pixels)"),
        f"Figure 3: discrepancy from the simple gradient ({curves.samples} samples, 95% intervals)",
        reference=curves.integrated_gradients,
    )


def _discrepancy_figure(
    moreaugrad: Curve,
    smoothgrad: Curve,
    title: str,
    reference: float | None = None,
    zero_shares: Sequence[float] | None = None,
) -> Figure:
    """Figure 3's two panels, the discrepancy from the simple gradient of a MoreauGrad method (left, vermillion) and
    of a SmoothGrad method (right, blue) against their parameter on a log axis, with 95% intervals.

    Args:
        moreaugrad, smoothgrad: the two curves.
        title: the figure's title.
        reference: integrated gradients' discrepancy, drawn as a dashed line in both panels.
        zero_shares: the SmoothGrad method's zero share at each point, written beside it; the x ticks are then the
            grid's values.
    """
    figure = new_figure(9, 3.4)
    panels = figure.subplots(1, 2, sharey=True)
    for ax, (x, y, ci, label, xlabel), colour in zip(panels, (moreaugrad, smoothgrad), ("#D55E00", "#0072B2")):
        errors = np.abs(np.array(ci, dtype=float).T - np.array(y, dtype=float))
        ax.errorbar(x, y, yerr=errors, color=colour, marker="o", capsize=3, label=label)
        if reference is not None:
            ax.axhline(reference, color="#555555", linestyle="--", label=f"integrated gradients ({reference:.2f})")
        ax.set_xscale("log")
        if zero_shares is not None:
            ax.set_xticks(x, [f"{value:g}" for value in x])  # the grid's values, not log-scale minor labels
            ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for sigma, value, share in zip(smoothgrad[0], smoothgrad[1], zero_shares or ()):
        panels[1].annotate(f"{share:.0%} zeros", (sigma, value), textcoords="offset points", xytext=(4, 6), fontsize=7)
    panels[0].set_ylabel("discrepancy from the simple gradient\n|| A/||A|| - G/||G|| ||, mean over samples")
    figure.suptitle(title, fontsize=9)
    return figure


@dataclass
class SparsityMatchedCurves:
    """Figure 3's sparse comparison: the discrepancy from the simple gradient of Sparse MoreauGrad, every map held at
    one zero share, and of Sparsified SmoothGrad, with 95% bootstrap intervals and the zero shares measured.

    Attributes:
        zero_fraction: the zero share every Sparse MoreauGrad map is held at (its `target_zero_fraction`).
        matched_to: where that share comes from: `"sparsified_smoothgrad at sigma=<s>"` (its mean zero share there)
            or `"given"`.
        rhos, sparse_moreaugrad, sparse_moreaugrad_ci: Sparse MoreauGrad's `rho` grid (as given), means, intervals.
        sparse_moreaugrad_zero_range: per `rho`, the `(min, max)` zero share over the samples' maps.
        sigmas, sparsified_smoothgrad, sparsified_smoothgrad_ci: Sparsified SmoothGrad's noise grid (pixels), means,
            intervals.
        sparsified_smoothgrad_zero: per `sigma`, the mean zero share of its maps.
        units: the units of `rhos`.
        samples: how many samples.
    """

    zero_fraction: float
    matched_to: str
    rhos: list[float]
    sparse_moreaugrad: list[float]
    sparse_moreaugrad_ci: list[tuple[float, float]]
    sparse_moreaugrad_zero_range: list[tuple[float, float]]
    sigmas: list[float]
    sparsified_smoothgrad: list[float]
    sparsified_smoothgrad_ci: list[tuple[float, float]]
    sparsified_smoothgrad_zero: list[float]
    units: str
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items()}


def sparsity_matched_curves(
    model: nn.Module,
    samples: Samples,
    rhos: Sequence[float] = FIGURE3_SPARSE_RHOS,
    sigmas: Sequence[float] = FIGURE3_SPARSE_SIGMAS,
    target_zero_fraction: float | None = None,
    match_sigma: float = 0.1,
    num_steps: int = 100,
    nt_samples: int = 64,
    units: str = "normalised",
    internal_batch_size: int | None = 256,
) -> SparsityMatchedCurves:
    """The paper's sparse Figure 3 comparison at one sparsity ("we adjusted eta in Sparse MoreauGrad to standardize
    the sparsity level for fair comparisons with Sparsified SmoothGrad").

    Sparsified SmoothGrad (`nt_samples` draws, its default `flatten` and `l0`) runs at each noise `sigma`; Sparse
    MoreauGrad (plain mode, `step_size = 0.1 * rho`) runs at each `rho` with `target_zero_fraction`, by default
    Sparsified SmoothGrad's mean zero share at `match_sigma` (one of `sigmas`), so that every Sparse MoreauGrad map
    has that share of exact zeros (within its search's tolerance, 0.01). Sparsified SmoothGrad's own share varies
    with `sigma` and from map to map; the curves report it.

    Example:
        >>> curves = sparsity_matched_curves(model, samples, rhos=[0.3, 1.0], sigmas=[0.1, 0.2])
        >>> curves.zero_fraction, curves.sparse_moreaugrad_zero_range
    """
    if any(rho <= 0 for rho in rhos) or any(sigma <= 0 for sigma in sigmas):
        raise ValueError("rhos and sigmas must be > 0.")
    if target_zero_fraction is None and match_sigma not in sigmas:
        raise ValueError(
            f"match_sigma={match_sigma} must be one of sigmas {list(sigmas)}: Sparse MoreauGrad is held at "
            "Sparsified SmoothGrad's mean zero share there (or give target_zero_fraction)."
        )
    target, images, seeds = samples.predictions, samples.images, samples.seeds
    reference = SimpleGradient(model).attribute(images, target).detach()
    ssg, ssg_ci, ssg_zero = [], [], []
    for sigma in sigmas:
        explainer = SparsifiedSmoothGrad(model, stdevs=sigma, nt_samples=nt_samples,
                                         internal_batch_size=internal_batch_size)
        maps = explainer.attribute(images, target, seeds=seeds).detach()
        mean, interval = _mean_and_interval(normalized_distance(maps, reference))
        ssg.append(mean), ssg_ci.append(interval), ssg_zero.append(float(zero_fraction(maps).mean()))
    matched_to = "given"
    if target_zero_fraction is None:
        target_zero_fraction = ssg_zero[list(sigmas).index(match_sigma)]
        matched_to = f"sparsified_smoothgrad at sigma={match_sigma:g}"
    smg, smg_ci, smg_zero = [], [], []
    for rho in rhos:
        settings = pixel_settings(model, {"rho": rho, "step_size": 0.1 * rho}, units)
        explainer = SparseMoreauGrad(model, num_steps=num_steps, noise_std=0.0, internal_batch_size=internal_batch_size,
                                     target_zero_fraction=target_zero_fraction, **settings)
        maps = explainer.attribute(images, target).detach()
        mean, interval = _mean_and_interval(normalized_distance(maps, reference))
        shares = zero_fraction(maps)
        smg.append(mean), smg_ci.append(interval)
        smg_zero.append((round(float(shares.min()), 4), round(float(shares.max()), 4)))
    return SparsityMatchedCurves(
        float(target_zero_fraction), matched_to, list(rhos), smg, smg_ci, smg_zero, list(sigmas), ssg, ssg_ci,
        [round(share, 4) for share in ssg_zero], units, len(images),
    )


def figure3_sparse(curves: SparsityMatchedCurves) -> Figure:
    """Figure 3's sparse comparison: discrepancy from the simple gradient against `rho` (Sparse MoreauGrad, every map
    at `curves.zero_fraction` zeros) and `sigma` (Sparsified SmoothGrad, each point captioned with its zero share),
    with 95% intervals."""
    return _discrepancy_figure(
        (curves.rhos, curves.sparse_moreaugrad, curves.sparse_moreaugrad_ci,
         f"Sparse MoreauGrad (plain), {curves.zero_fraction:.0%} zeros", f"rho ({curves.units} units)"),
        (curves.sigmas, curves.sparsified_smoothgrad, curves.sparsified_smoothgrad_ci, "Sparsified SmoothGrad",
         "sigma (noise std, pixels)"),
        f"Figure 3, sparse: Sparse MoreauGrad, every map at {curves.zero_fraction:.1%} zeros ({curves.matched_to}),\n"
        f"vs Sparsified SmoothGrad ({curves.samples} samples, 95% intervals)",
        zero_shares=curves.sparsified_smoothgrad_zero,
    )
