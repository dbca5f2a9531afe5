"""The paper's figures 2, 3, 4 and 7 from a classifier and a batch of test samples (`figures.py` is the command line).

- Figure 2: MoreauGrad maps over `rho` (from 0, the simple gradient) and Sparse MoreauGrad maps over `eta`
  (from 0, vanilla MoreauGrad).
- Figure 3: the discrepancy of MoreauGrad from the simple gradient against `rho`, and of SmoothGrad against its
  noise `sigma`, with integrated gradients as a reference line; and its sparse comparison, Sparse MoreauGrad (every
  map at one zero share) against Sparsified SmoothGrad.
- Figure 4: every method's map side by side.
- Figure 7: MoreauGrad and Sparse MoreauGrad maps of misclassified samples, for the predicted and the true class.
- Figure 6 (robustness against the budget) is the evaluation's `robustness.png` (`evaluate.py`).

Settings that the paper gives in its normalised input space (`rho`, `step_size`, `eta`) are taken in those units
by default (`units="normalised"`) and converted with the model's std (`mglightning.units`), so the paper's numbers
can be typed as they are; noise levels are pixel units either way. The **discrepancy** of a map `A` from the
simple gradient `G` is the paper's equation 6 between the two, `|| A/||A|| - G/||G|| ||_2` per sample (0: the same
direction, 2: opposite), averaged over the samples with a 95% bootstrap interval; the paper does not define it
further.

Figures are `matplotlib.figure.Figure`s on the Agg canvas (no display needed). Example:

    >>> model = load_classifier("checkpoints/digits/last.ckpt")  # python train.py fit --config configs/digits.yaml
    >>> samples = select_samples(model, datamodule.test_dataset, 4)
    >>> by_rho, by_eta = figure2_maps(model, samples, rhos=[0, 0.1, 0.3, 1.0], etas=[0, 0.005, 0.02])
    >>> save_figure(figure2(samples, by_rho, by_eta), "figure2.png")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
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
from mglightning.explainers.registry import build_explainer
from mglightning.metrics import normalized_distance, zero_fraction
from mglightning.reporting import bootstrap_interval, normalised_magnitude
from mglightning.units import model_std, to_pixel_units

UNITS = ("normalised", "pixels")
MOREAUGRAD_FAMILY = ("moreaugrad", "sparse_moreaugrad", "group_sparse_moreaugrad")

FIGURE4_SETTINGS: dict[str, dict[str, Any]] = {
    "simple_gradient": {},
    "integrated_gradients": {"n_steps": 50},
    "smoothgrad": {"stdevs": 0.1, "nt_samples": 50},
    "sparsified_smoothgrad": {"stdevs": 0.1, "nt_samples": 64},
    "deeplift": {},
    "moreaugrad": {"rho": 1.0, "step_size": 0.1, "num_steps": 100, "noise_std": 0.1, "noise_samples": 8},
    "sparse_moreaugrad": {"rho": 1.0, "step_size": 0.1, "num_steps": 100, "noise_std": 0.1, "noise_samples": 8,
                          "eta": 0.005},
    "group_sparse_moreaugrad": {"rho": 1.0, "step_size": 0.1, "num_steps": 100, "noise_std": 0.1,
                                "noise_samples": 8, "eta": 0.05, "group_size": 4},
}
"""Figure 4's methods and settings: the paper's (official code's) settings in normalised units, with fewer solver
steps (100: with `step_size / rho = 0.1` the proximity term has contracted to 3e-5 by then) and noise draws so that
it runs on a CPU."""


@dataclass
class Samples:
    """The test samples a figure draws, on the model's device.

    Attributes:
        images: `(N, C, H, W)` images in [0, 1].
        labels: `(N,)` true classes.
        predictions: `(N,)` the model's predictions.
        indices: `(N,)` dataset indices (captions).
        seeds: `(N,)` long CPU tensor, each sample's noise seed (its dataset index).
    """

    images: Tensor
    labels: Tensor
    predictions: Tensor
    indices: Tensor
    seeds: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.seeds = self.indices.cpu().long()


def select_samples(
    model: nn.Module, dataset: Any, count: int, *, misclassified: bool = False, device: str | torch.device = "cpu",
    batch_size: int = 256,
) -> Samples:
    """The first `count` samples of a test dataset (or the first `count` that the model misclassifies).

    Args:
        model: the classifier, in eval mode, on `device`.
        dataset: an indexable dataset of `(image, label)` pairs (a datamodule's `test_dataset`).
        count: how many samples, >= 1.
        misclassified: take only samples whose prediction differs from the label (scans the whole set if needed).
        device: where the images go.
        batch_size: images per forward pass while scanning.

    Returns:
        `Samples`; fewer than `count` when the dataset has fewer (misclassified) samples.

    Example:
        >>> wrong = select_samples(model, datamodule.test_dataset, 4, misclassified=True)
    """
    if count < 1:
        raise ValueError(f"the number of samples must be at least 1, got {count}.")
    chosen: list[tuple[Tensor, int, int, int]] = []
    for start in range(0, len(dataset), batch_size):
        indices = list(range(start, min(start + batch_size, len(dataset))))
        items = [dataset[i] for i in indices]
        images = torch.stack([image for image, _ in items]).to(device)
        labels = torch.tensor([label for _, label in items])
        with torch.no_grad():
            predictions = model(images).argmax(dim=1).cpu()
        for position, index in enumerate(indices):
            if not misclassified or predictions[position] != labels[position]:
                chosen.append((images[position], int(labels[position]), int(predictions[position]), index))
        if len(chosen) >= count:
            break
    if not chosen:
        raise ValueError("the model misclassifies none of the test samples: there is nothing to draw for Figure 7.")
    chosen = chosen[:count]
    return Samples(
        images=torch.stack([c[0] for c in chosen]),
        labels=torch.tensor([c[1] for c in chosen], device=device),
        predictions=torch.tensor([c[2] for c in chosen], device=device),
        indices=torch.tensor([c[3] for c in chosen]),
    )


def _pixel_settings(model: nn.Module, settings: Mapping[str, Any], units: str) -> dict[str, Any]:
    if units not in UNITS:
        raise ValueError(f"units must be one of {UNITS}, got {units!r}.")
    return dict(settings) if units == "pixels" else to_pixel_units(settings, model_std(model))


# ----------------------------------------------------------------------------------------------- drawing


@dataclass
class MapRow:
    """One row of a map figure: an input image with its caption, then `(title, map)` cells."""

    image: Tensor
    caption: str
    cells: list[tuple[str, Tensor]]
    caption_colour: str = "black"


def map_rows_figure(rows: Sequence[MapRow], title: str | None = None, cmap: str = "inferno") -> Figure:
    """Rows of saliency maps, each row an input and its maps (`|map|` summed over channels, scaled to [0, 1]),
    with a colour bar that reads the maps' scale.

    Args:
        rows: the rows; each cell's title is drawn above it (rows may have different columns).
        title: optional figure title.
        cmap: matplotlib colormap of the maps.

    Example:
        >>> figure = map_rows_figure([MapRow(image, "sample 3", [("gradient", grad_map)])])
    """
    columns = 1 + max(len(row.cells) for row in rows)
    figure = Figure(figsize=(1.45 * columns, 1.7 * len(rows) + (0.4 if title else 0)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for r, row in enumerate(rows):
        pixels = row.image.detach().to("cpu", torch.float32).clamp(0, 1)
        if pixels.shape[0] == 1:
            axes[r, 0].imshow(pixels[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            axes[r, 0].imshow(pixels.permute(1, 2, 0).numpy(), interpolation="nearest")
        axes[r, 0].set_title(row.caption, fontsize=7, color=row.caption_colour)
        for c, (cell_title, attribution) in enumerate(row.cells, start=1):
            magnitude = normalised_magnitude(attribution.unsqueeze(0))[0]
            axes[r, c].imshow(magnitude.numpy(), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            axes[r, c].set_title(cell_title, fontsize=7)
    # Every map is drawn on the same 0..1 scale, so one colour bar serves them all.
    colourbar = figure.colorbar(
        ScalarMappable(norm=Normalize(0, 1), cmap=cmap), ax=axes[:, 1:].ravel().tolist(), shrink=0.6, aspect=30,
        pad=0.01,
    )
    colourbar.set_label("|attribution| (sum over channels) / its maximum", fontsize=7)
    colourbar.ax.tick_params(labelsize=7)
    if title:
        figure.suptitle(title, fontsize=9)
    return figure


def _caption(samples: Samples, i: int) -> tuple[str, str]:
    label, prediction = int(samples.labels[i]), int(samples.predictions[i])
    text = f"sample {int(samples.indices[i])}\nlabel {label}, pred {prediction}"
    return text, ("#C00000" if label != prediction else "black")


def _fmt(value: float) -> str:
    return f"{value:.3g}"


# ----------------------------------------------------------------------------------------------- Figure 2


def figure2_maps(
    model: nn.Module,
    samples: Samples,
    rhos: Sequence[float],
    etas: Sequence[float],
    sparse_rho: float = 1.0,
    step_ratio: float = 0.1,
    num_steps: int = 100,
    units: str = "normalised",
    internal_batch_size: int | None = 256,
) -> tuple[dict[float, Tensor], dict[float, Tensor]]:
    """Plain-mode MoreauGrad maps for each `rho` (0: the simple gradient) and Sparse MoreauGrad maps for each `eta`
    at `sparse_rho` (0: vanilla MoreauGrad), with `step_size = step_ratio * rho` (the official 0.1).

    Returns:
        `({rho: maps}, {eta: maps})`, maps `(N, C, H, W)` on the CPU, keyed by the values as given.
    """
    if any(rho < 0 for rho in rhos) or any(eta < 0 for eta in etas) or sparse_rho <= 0:
        raise ValueError("rhos and etas must be >= 0 and sparse_rho > 0 (rho = 0 stands for the simple gradient).")
    target = samples.predictions

    def moreaugrad(rho: float, eta: float) -> Tensor:
        if rho == 0:
            return SimpleGradient(model).attribute(samples.images, target).detach().cpu()
        settings = _pixel_settings(model, {"rho": rho, "step_size": step_ratio * rho, "eta": eta}, units)
        common = {"num_steps": num_steps, "noise_std": 0.0, "internal_batch_size": internal_batch_size}
        if eta == 0:
            settings.pop("eta")
            explainer = MoreauGrad(model, **settings, **common)
        else:
            explainer = SparseMoreauGrad(model, **settings, **common)
        return explainer.attribute(samples.images, target).detach().cpu()

    return {rho: moreaugrad(rho, 0.0) for rho in rhos}, {eta: moreaugrad(sparse_rho, eta) for eta in etas}


def figure2_numbers(
    model: nn.Module, samples: Samples, by_rho: Mapping[float, Tensor], by_eta: Mapping[float, Tensor]
) -> dict:
    """Figure 2's numbers: per `rho`, the mean discrepancy (equation 6) from the simple gradient; per `eta`, the mean
    share of exactly-zero entries. Keys are the values as given, as strings (JSON)."""
    gradient = SimpleGradient(model).attribute(samples.images, samples.predictions).detach().cpu()
    return {
        "discrepancy_by_rho": {f"{rho:g}": round(float(normalized_distance(maps, gradient).mean()), 4)
                               for rho, maps in by_rho.items()},
        "zero_share_by_eta": {f"{eta:g}": round(float(zero_fraction(maps).mean()), 4) for eta, maps in by_eta.items()},
    }


def figure2(
    samples: Samples,
    by_rho: Mapping[float, Tensor],
    by_eta: Mapping[float, Tensor],
    sparse_rho: float = 1.0,
    units: str = "normalised",
) -> Figure:
    """The paper's Figure 2: per sample, a row of MoreauGrad maps over `rho` and a row of Sparse MoreauGrad maps
    over `eta` (each captioned with its share of exactly-zero entries).

    Args:
        samples: the samples the maps explain.
        by_rho: `{rho: maps}` from `figure2_maps` (`rho = 0` is drawn as the simple gradient).
        by_eta: `{eta: maps}` from `figure2_maps` (`eta = 0` is drawn as vanilla MoreauGrad).
        sparse_rho: `rho` of the Sparse MoreauGrad row (for the title).
        units: the units of `rho` and `eta` (for the title).

    Example:
        >>> by_rho, by_eta = figure2_maps(model, samples, rhos=[0, 0.3, 1.0], etas=[0, 0.01, 0.05])
        >>> save_figure(figure2(samples, by_rho, by_eta), "figure2.png")
    """
    rows = []
    for i in range(len(samples.images)):
        caption, colour = _caption(samples, i)
        rho_cells = [("simple gradient\n(rho = 0)" if rho == 0 else f"MoreauGrad\nrho = {_fmt(rho)}", maps[i])
                     for rho, maps in by_rho.items()]
        eta_cells = [
            (f"{'MoreauGrad' if eta == 0 else 'Sparse MG'} eta = {_fmt(eta)}\n"
             f"{float(zero_fraction(maps[i : i + 1])[0]):.0%} zero", maps[i])
            for eta, maps in by_eta.items()
        ]
        rows += [MapRow(samples.images[i], caption, rho_cells, colour), MapRow(samples.images[i], "", eta_cells)]
    return map_rows_figure(
        rows, f"Figure 2: MoreauGrad over rho (plain mode), Sparse MoreauGrad over eta at rho = {_fmt(sparse_rho)} "
        f"({units} units)"
    )


# ----------------------------------------------------------------------------------------------- Figure 3


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
    rhos: Sequence[float] = (0.03, 0.1, 0.3, 1.0, 3.0),
    sigmas: Sequence[float] = (0.01, 0.03, 0.1, 0.2, 0.3),
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
        settings = _pixel_settings(model, {"rho": rho, "step_size": 0.1 * rho}, units)
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


def figure3(curves: DiscrepancyCurves) -> Figure:
    """The paper's Figure 3: discrepancy from the simple gradient against `rho` (MoreauGrad) and `sigma`
    (SmoothGrad), with 95% intervals and integrated gradients as a dashed reference line in both panels."""
    figure = Figure(figsize=(9, 3.4), layout="constrained")
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, 2, sharey=True)
    for ax, x, y, ci, colour, label, xlabel in (
        (panels[0], curves.rhos, curves.moreaugrad, curves.moreaugrad_ci, "#D55E00", "MoreauGrad (plain)",
         f"rho ({curves.units} units)"),
        (panels[1], curves.sigmas, curves.smoothgrad, curves.smoothgrad_ci, "#0072B2", "SmoothGrad",
         "sigma (noise std, pixels)"),
    ):
        errors = np.abs(np.array(ci, dtype=float).T - np.array(y, dtype=float))
        ax.errorbar(x, y, yerr=errors, color=colour, marker="o", capsize=3, label=label)
        ax.axhline(curves.integrated_gradients, color="#555555", linestyle="--",
                   label=f"integrated gradients ({curves.integrated_gradients:.2f})")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    panels[0].set_ylabel("discrepancy from the simple gradient\n|| A/||A|| - G/||G|| ||, mean over samples")
    figure.suptitle(f"Figure 3: discrepancy from the simple gradient ({curves.samples} samples, 95% intervals)",
                    fontsize=9)
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
    rhos: Sequence[float] = (0.1, 0.3, 1.0, 3.0),
    sigmas: Sequence[float] = (0.03, 0.1, 0.2, 0.3),
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
        settings = _pixel_settings(model, {"rho": rho, "step_size": 0.1 * rho}, units)
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
    figure = Figure(figsize=(9, 3.4), layout="constrained")
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, 2, sharey=True)
    for ax, x, y, ci, colour, label, xlabel in (
        (panels[0], curves.rhos, curves.sparse_moreaugrad, curves.sparse_moreaugrad_ci, "#D55E00",
         f"Sparse MoreauGrad (plain), {curves.zero_fraction:.0%} zeros", f"rho ({curves.units} units)"),
        (panels[1], curves.sigmas, curves.sparsified_smoothgrad, curves.sparsified_smoothgrad_ci, "#0072B2",
         "Sparsified SmoothGrad", "sigma (noise std, pixels)"),
    ):
        errors = np.abs(np.array(ci, dtype=float).T - np.array(y, dtype=float))
        ax.errorbar(x, y, yerr=errors, color=colour, marker="o", capsize=3, label=label)
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{value:g}" for value in x])  # the grid's values, not log-scale minor labels
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for sigma, value, share in zip(curves.sigmas, curves.sparsified_smoothgrad, curves.sparsified_smoothgrad_zero):
        panels[1].annotate(f"{share:.0%} zeros", (sigma, value), textcoords="offset points", xytext=(4, 6), fontsize=7)
    panels[0].set_ylabel("discrepancy from the simple gradient\n|| A/||A|| - G/||G|| ||, mean over samples")
    figure.suptitle(
        f"Figure 3, sparse: Sparse MoreauGrad, every map at {curves.zero_fraction:.1%} zeros ({curves.matched_to}),\n"
        f"vs Sparsified SmoothGrad ({curves.samples} samples, 95% intervals)",
        fontsize=9,
    )
    return figure


# ----------------------------------------------------------------------------------------------- Figures 4 and 7


def method_maps(
    model: nn.Module,
    samples: Samples,
    methods: Mapping[str, Mapping[str, Any]],
    target: Tensor | None = None,
    units: str = "normalised",
) -> dict[str, Tensor]:
    """Each method's maps: `{registry name: settings}` (the MoreauGrad family's `rho`, `step_size`, `eta` in
    `units`), built with `build_explainer`; `target` defaults to the predictions."""
    target = samples.predictions if target is None else target
    maps = {}
    for name, settings in methods.items():
        if name in MOREAUGRAD_FAMILY:
            settings = _pixel_settings(model, settings, units)
        explainer = build_explainer(name, model, **settings)
        maps[name] = explainer.attribute(samples.images, target, seeds=samples.seeds).detach().cpu()
    return maps


def _display_name(name: str) -> str:
    from mglightning.explainers.registry import EXPLAINERS

    return EXPLAINERS[name].display_name


def figure4(
    model: nn.Module,
    samples: Samples,
    methods: Mapping[str, Mapping[str, Any]] | None = None,
    units: str = "normalised",
) -> Figure:
    """The paper's Figure 4: every method's map of each sample, side by side (default methods and settings:
    `FIGURE4_SETTINGS`)."""
    maps = method_maps(model, samples, FIGURE4_SETTINGS if methods is None else methods, units=units)
    rows = []
    for i in range(len(samples.images)):
        caption, colour = _caption(samples, i)
        rows.append(MapRow(samples.images[i], caption, [(_display_name(m), maps[m][i]) for m in maps], colour))
    return map_rows_figure(rows, f"Figure 4: all methods ({units} units for the MoreauGrad family)")


def figure7(
    model: nn.Module,
    samples: Samples,
    settings: Mapping[str, Any] | None = None,
    sparse_eta: float = 0.005,
    units: str = "normalised",
) -> Figure:
    """The paper's Figure 7: MoreauGrad and Sparse MoreauGrad maps of misclassified samples, for the predicted
    (wrong) class and for the true class.

    Args:
        model: the classifier.
        samples: misclassified samples (`select_samples(..., misclassified=True)`).
        settings: MoreauGrad's settings (default: `FIGURE4_SETTINGS["moreaugrad"]`), in `units`.
        sparse_eta: Sparse MoreauGrad's `eta`, in `units`.
        units: `normalised` or `pixels`.
    """
    settings = dict(FIGURE4_SETTINGS["moreaugrad"] if settings is None else settings)
    methods = {"moreaugrad": settings, "sparse_moreaugrad": {**settings, "eta": sparse_eta}}
    predicted = method_maps(model, samples, methods, samples.predictions, units)
    true = method_maps(model, samples, methods, samples.labels, units)
    rows = []
    for i in range(len(samples.images)):
        caption, colour = _caption(samples, i)
        label, prediction = int(samples.labels[i]), int(samples.predictions[i])
        cells = [(f"MoreauGrad\nclass {prediction} (pred)", predicted["moreaugrad"][i]),
                 (f"Sparse MG\nclass {prediction} (pred)", predicted["sparse_moreaugrad"][i]),
                 (f"MoreauGrad\nclass {label} (label)", true["moreaugrad"][i]),
                 (f"Sparse MG\nclass {label} (label)", true["sparse_moreaugrad"][i])]
        rows.append(MapRow(samples.images[i], caption, cells, colour))
    return map_rows_figure(rows, "Figure 7: misclassified samples, maps of the predicted and of the true class")
