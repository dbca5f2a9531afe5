"""The explainer registry: every method by its docs/reference/semantics.md section 2 name, built with `build_explainer(name, model, **settings)`."""

from __future__ import annotations

from typing import Any

from torch import nn

from mglightning.explainers.base import Explainer
from mglightning.explainers.captum import CaptumExplainer
from mglightning.explainers.caso import CAFO, CASO
from mglightning.explainers.deeplift import DeepLift
from mglightning.explainers.gradients import IntegratedGradients, SimpleGradient, SmoothGrad, SparsifiedSmoothGrad
from mglightning.explainers.moreaugrad import GroupSparseMoreauGrad, MoreauGrad, SparseMoreauGrad
from mglightning.explainers.relex import RelEx

EXPLAINERS: dict[str, type[Explainer]] = {
    cls.name: cls
    for cls in (
        SimpleGradient,
        IntegratedGradients,
        SmoothGrad,
        SparsifiedSmoothGrad,
        DeepLift,
        RelEx,
        MoreauGrad,
        SparseMoreauGrad,
        GroupSparseMoreauGrad,
        CASO,
        CAFO,
        CaptumExplainer,
    )
}


def list_explainers() -> list[str]:
    """The registered method names, in the registry's order."""
    return list(EXPLAINERS)


def explainer_settings(name: str) -> dict[str, Any]:
    """The settings a method accepts, with their defaults.

    Example:
        >>> explainer_settings("moreaugrad")["rho"]
        1.0
    """
    return _explainer_class(name).settings()


def build_explainer(name: str, model: nn.Module, **settings: Any) -> Explainer:
    """Build the explainer registered as `name` for `model` with method settings.

    Unknown names and unknown or invalid settings raise a `ValueError` naming the method and what it accepts,
    before any computation.

    Args:
        name: one of `list_explainers()`.
        model: classifier taking `(B, C, H, W)` images in [0, 1].
        **settings: the method's constructor settings (see `explainer_settings(name)`).

    Example:
        >>> explainer = build_explainer("sparse_moreaugrad", model, eta=1e-2, num_steps=100)
        >>> attr = explainer.attribute(images, target=labels)
    """
    valid = explainer_settings(name)
    unknown = sorted(set(settings) - set(valid))
    if unknown:
        raise ValueError(
            f"{name}: unknown setting(s) {', '.join(unknown)}; valid settings: {', '.join(valid)}."
        )
    return _explainer_class(name)(model, **settings)


def _explainer_class(name: str) -> type[Explainer]:
    if name not in EXPLAINERS:
        raise ValueError(f"Unknown explainer {name!r}; valid names: {', '.join(EXPLAINERS)}.")
    return EXPLAINERS[name]
