"""The model-parameter randomisation sanity check (Adebayo et al. 2018, "Sanity checks for saliency maps").

A map that explains the model must change when the model's weights are replaced by random ones. The check
explains each sample again, with the same method, settings and seeds, on a copy of the classifier whose layers
were re-initialised (all of them, or cascading: the `cascade` layers nearest the output), and measures the
Spearman rank correlation of the two magnitude maps. A method whose maps keep a high correlation shows mostly the
input, not the model, and is robust to attacks on the model for free: its robustness is no evidence of a good
explanation (the results flag it).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor, nn

from mglightning.metrics.base import MapBatch, SampleMetric

__all__ = ["ModelRandomisation", "randomised_copy", "spearman_correlation"]


def _resettable(model: nn.Module) -> list[nn.Module]:
    """The layers with weights of their own that can re-initialise themselves, input to output (definition order)."""
    return [
        module for module in model.modules()
        if hasattr(module, "reset_parameters") and any(True for _ in module.parameters(recurse=False))
    ]


def randomised_copy(model: nn.Module, seed: int = 0, cascade: int | None = None) -> nn.Module:
    """A copy of `model` whose layers are re-initialised by their own `reset_parameters`, drawn from `seed`.

    Args:
        model: the classifier (left unchanged).
        seed: the seed of the new weights.
        cascade: re-initialise only the `cascade` layers nearest the output (Adebayo et al.'s cascading
            randomisation, from the top); None re-initialises every layer. Layers without weights of their own
            (the input normalisation, activations) keep what they have.

    Example:
        >>> random_model = randomised_copy(model, seed=0)            # doctest: +SKIP
    """
    layers = _resettable(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no layer with reset_parameters(); nothing to randomise.")
    if cascade is not None and (isinstance(cascade, bool) or not isinstance(cascade, int) or cascade < 1):
        raise ValueError(f"cascade must be None (every layer) or an integer >= 1, got {cascade!r}.")
    copied = copy.deepcopy(model)
    chosen = _resettable(copied)
    if cascade is not None:
        chosen = chosen[-cascade:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.no_grad():
            for module in chosen:
                module.reset_parameters()
    return copied.requires_grad_(False)


def spearman_correlation(first: Tensor, second: Tensor) -> Tensor:
    """Spearman rank correlation per sample between the flattened magnitudes of two map batches.

    Ties get their average rank (as `scipy.stats.spearmanr`). A constant map (e.g. all zero, as a sparse map on a
    random model can be) has no rank order, where Spearman's coefficient is undefined: a sample with one constant
    map gets 0 (the other map's order is kept nowhere), one with two constant maps gets 1 (the two agree: the
    method shows nothing either way).

    Args:
        first, second: `(B, ...)` maps of the same shape (signed: their magnitudes are compared).

    Returns:
        `(B,)` float64 CPU tensor in [-1, 1].
    """
    if first.shape != second.shape:
        raise ValueError(f"the maps must have the same shape, got {tuple(first.shape)} and {tuple(second.shape)}.")
    a = rankdata(first.detach().abs().flatten(1).double().cpu().numpy(), axis=1)
    b = rankdata(second.detach().abs().flatten(1).double().cpu().numpy(), axis=1)
    a -= a.mean(axis=1, keepdims=True)
    b -= b.mean(axis=1, keepdims=True)
    spread_a, spread_b = (a * a).sum(axis=1), (b * b).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = (a * b).sum(axis=1) / np.sqrt(spread_a * spread_b)
    constant_a, constant_b = spread_a == 0, spread_b == 0
    values = np.where(constant_a | constant_b, np.where(constant_a & constant_b, 1.0, 0.0), values)
    return torch.from_numpy(values)


class ModelRandomisation(SampleMetric):
    """Spearman rank correlation of each clean map with the same method's map on a randomised model.

    The method is built again on `randomised_copy(model, seed, cascade)` with its own settings and explains the
    same samples with the same seeds. Lower is better: a map that depends on the model decorrelates; values above
    `flag_above` are flagged in the results as maps that do not explain the model. The check's own model
    evaluations are not counted in the records' gradient evaluations.

    Args:
        seed: seed of the random weights.
        cascade: re-initialise only the `cascade` layers nearest the output (None: all layers).
        flag_above: the mean correlation above which a method is flagged (default 0.5).
        **kwargs: passed to `torchmetrics.Metric`.

    Example:
        >>> metrics = {"sanity": ModelRandomisation()}               # doctest: +SKIP
    """

    outputs = {"sanity": False}
    needs_attack = False
    flag_message = (
        "its maps keep a rank correlation of {value:.2f} with the maps of a model with random weights: they show "
        "the input more than the model, so their robustness is no evidence of a good explanation"
    )

    def __init__(self, seed: int = 0, cascade: int | None = None, flag_above: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if cascade is not None and (isinstance(cascade, bool) or not isinstance(cascade, int) or cascade < 1):
            raise ValueError(f"ModelRandomisation: cascade must be None or an integer >= 1, got {cascade!r}.")
        self.seed = seed
        self.cascade = cascade
        self.flag_above = flag_above
        self._randomised: tuple[int, nn.Module] | None = None

    def _random_model(self, model: nn.Module) -> nn.Module:
        if self._randomised is None or self._randomised[0] != id(model):
            self._randomised = (id(model), randomised_copy(model, self.seed, self.cascade).eval())
        return self._randomised[1]

    def measure(self, batch: MapBatch) -> dict[str, Tensor]:
        if batch.explainer is None:
            raise ValueError("ModelRandomisation needs the explainer that made the maps (MapBatch.explainer).")
        explainer = batch.explainer
        settings = {name: getattr(explainer, name) for name in explainer.settings()}
        again = type(explainer)(self._random_model(batch.model), **settings)
        randomised = again.attribute(batch.inputs, batch.target, seeds=batch.seeds)
        return {"sanity": spearman_correlation(batch.clean, randomised)}

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_randomised"] = None  # a clone or a pickle builds its own random copy
        return state
