"""The paper's map figures: Figure 2 (MoreauGrad maps over `rho`, Sparse MoreauGrad maps over `eta`), Figure 4
(every method side by side) and Figure 7 (maps of misclassified samples, for the predicted and the true class),
drawn with `mglightning.reporting.map_figures.map_rows_figure`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure
from torch import Tensor, nn

from mglightning.explainers import MoreauGrad, SimpleGradient, SparseMoreauGrad
from mglightning.explainers.registry import EXPLAINERS, build_explainer
from mglightning.metrics import normalized_distance, zero_fraction
from mglightning.paper_figures.samples import Samples, caption, pixel_settings
from mglightning.reporting.map_figures import MapRow, map_rows_figure

__all__ = [
    "FIGURE2_ETAS",
    "FIGURE2_RHOS",
    "FIGURE4_SETTINGS",
    "MOREAUGRAD_FAMILY",
    "figure2",
    "figure2_maps",
    "figure2_numbers",
    "figure4",
    "figure7",
    "method_maps",
]

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

# The paper's value grids: the defaults of the functions below and of `figures.py`'s commands, declared once.
FIGURE2_RHOS = (0.0, 0.1, 0.3, 1.0, 3.0)
"""Figure 2's MoreauGrad `rho` values (0: the simple gradient), in normalised units."""
FIGURE2_ETAS = (0.0, 0.005, 0.01, 0.02, 0.05)
"""Figure 2's Sparse MoreauGrad `eta` values (0: vanilla MoreauGrad), in normalised units."""


def _fmt(value: float) -> str:
    return f"{value:.3g}"


# ----------------------------------------------------------------------------------------------- Figure 2


def figure2_maps(
    model: nn.Module,
    samples: Samples,
    rhos: Sequence[float] = FIGURE2_RHOS,
    etas: Sequence[float] = FIGURE2_ETAS,
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
        settings = pixel_settings(model, {"rho": rho, "step_size": step_ratio * rho, "eta": eta}, units)
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
        text, colour = caption(samples, i)
        rho_cells = [("simple gradient\n(rho = 0)" if rho == 0 else f"MoreauGrad\nrho = {_fmt(rho)}", maps[i])
                     for rho, maps in by_rho.items()]
        eta_cells = [
            (f"{'MoreauGrad' if eta == 0 else 'Sparse MG'} eta = {_fmt(eta)}\n"
             f"{float(zero_fraction(maps[i : i + 1])[0]):.0%} zero", maps[i])
            for eta, maps in by_eta.items()
        ]
        rows += [MapRow(samples.images[i], text, rho_cells, colour), MapRow(samples.images[i], "", eta_cells)]
    return map_rows_figure(
        rows, f"Figure 2: MoreauGrad over rho (plain mode), Sparse MoreauGrad over eta at rho = {_fmt(sparse_rho)} "
        f"({units} units)"
    )


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
            settings = pixel_settings(model, settings, units)
        explainer = build_explainer(name, model, **settings)
        maps[name] = explainer.attribute(samples.images, target, seeds=samples.seeds).detach().cpu()
    return maps


def _display_name(name: str) -> str:
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
        text, colour = caption(samples, i)
        rows.append(MapRow(samples.images[i], text, [(_display_name(m), maps[m][i]) for m in maps], colour))
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
        text, colour = caption(samples, i)
        label, prediction = int(samples.labels[i]), int(samples.predictions[i])
        cells = [(f"MoreauGrad\nclass {prediction} (pred)", predicted["moreaugrad"][i]),
                 (f"Sparse MG\nclass {prediction} (pred)", predicted["sparse_moreaugrad"][i]),
                 (f"MoreauGrad\nclass {label} (label)", true["moreaugrad"][i]),
                 (f"Sparse MG\nclass {label} (label)", true["sparse_moreaugrad"][i])]
        rows.append(MapRow(samples.images[i], text, cells, colour))
    return map_rows_figure(rows, "Figure 7: misclassified samples, maps of the predicted and of the true class")
