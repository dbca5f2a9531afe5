"""The model-parameter randomisation sanity check (Adebayo et al. 2018, "Sanity checks for saliency maps"), with a
model-free control.

A map that explains the model must change when the model's weights are replaced by random ones. The check
explains each sample again, with the same method, settings and seeds, on a copy of the classifier whose layers
were re-initialised (all of them, or cascading: the `cascade` layers nearest the output), and measures the
Spearman rank correlation of the two maps: of their magnitudes (`sanity`, Adebayo et al.'s absolute-value
variant) and of their signed values (`sanity_signed`).

**Why a control.** Two maps of the same image are rank-correlated for reasons that have nothing to do with the
model: the image's own structure (a map of the form `x * something` ranks its pixels by brightness on any model).
On the bundled digits, two independent model-free maps `x * N(0, 1)` reach an absolute Spearman of 0.84 (more
than integrated gradients or DeepLIFT), so a fixed threshold such as 0.5 tells nothing. The check therefore
computes, on the same inputs, a control: the same correlation between two independent model-free maps
`x * n1` and `x * n2` (`n1, n2 ~ N(0, I)`, drawn from the sample's seed; `sanity_control`). A method passes when
its maps are *clearly* less alike across the randomisation than the control's: the 95% paired bootstrap interval
of the mean over samples of `sanity_control - sanity` lies above zero. Otherwise the results flag it (its
robustness is no evidence of a good explanation: a map that ignores the model is robust to attacks on the model
for free).

**Undefined samples.** Spearman's coefficient is undefined for a constant map (e.g. all zero, as a sparse map on a
random model can be). Such a sample's `sanity` and `sanity_signed` are NaN (left out of their means) and
`sanity_undefined` is 1 (the table shows the count). In the paired rule an undefined sample counts as a gap of
zero (no evidence that the map depends on the model): it can never make a method pass, and a method undefined on
every sample is flagged.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor, nn

from mglightning.checks import check_positive_int
from mglightning.metrics.base import MapBatch, SampleMetric
from mglightning.random import Stream, normal

__all__ = ["ModelRandomisation", "control_maps", "randomised_copy", "spearman_correlation"]


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
    if cascade is not None:
        check_positive_int("randomised_copy", "cascade", cascade)
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


def spearman_correlation(first: Tensor, second: Tensor, signed: bool = False) -> Tensor:
    """Spearman rank correlation per sample between two map batches (flattened per sample).

    Ties get their average rank (as `scipy.stats.spearmanr`). A constant map (e.g. all zero) has no rank order,
    where Spearman's coefficient is undefined: such a sample gets NaN (as scipy gives).

    Args:
        first, second: `(B, ...)` maps of the same shape.
        signed: rank the signed values; False (default) ranks the magnitudes (Adebayo et al.'s absolute variant).

    Returns:
        `(B,)` float64 CPU tensor in [-1, 1], NaN where either map of the sample is constant.
    """
    if first.shape != second.shape:
        raise ValueError(f"the maps must have the same shape, got {tuple(first.shape)} and {tuple(second.shape)}.")

    def ranks(maps: Tensor) -> np.ndarray:
        values = maps.detach().flatten(1).double().cpu()
        return rankdata((values if signed else values.abs()).numpy(), axis=1)

    a, b = ranks(first), ranks(second)
    a -= a.mean(axis=1, keepdims=True)
    b -= b.mean(axis=1, keepdims=True)
    spread_a, spread_b = (a * a).sum(axis=1), (b * b).sum(axis=1)
    defined = (spread_a > 0) & (spread_b > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = (a * b).sum(axis=1) / np.sqrt(spread_a * spread_b)
    return torch.from_numpy(np.where(defined, np.clip(values, -1.0, 1.0), np.nan))


def control_maps(inputs: Tensor, seeds: Tensor) -> tuple[Tensor, Tensor]:
    """Two independent model-free maps `x * n1` and `x * n2` per sample, `n ~ N(0, I)` from the sample's seed.

    The sanity check's control: what the rank correlation of two maps of the same image is when neither depends
    on any model. Drawn with `mglightning.random` (stream `SANITY_CONTROL`, copies 0 and 1), so a sample's
    control does not depend on its batch or device.

    Args:
        inputs: `(B, C, H, W)` images.
        seeds: `(B,)` integer seeds, one per sample.
    """
    rows = inputs.shape[0]
    if seeds.shape != (rows,):
        raise ValueError(f"control_maps: seeds must have shape ({rows},), got {tuple(seeds.shape)}.")
    seeds = seeds.to(inputs.device)
    draws = [
        normal(seeds, inputs.shape[1:], stream=Stream.SANITY_CONTROL,
               copy_index=torch.full((rows,), copy, dtype=torch.long, device=inputs.device))
        for copy in (0, 1)
    ]
    return inputs.detach() * draws[0].to(inputs.dtype), inputs.detach() * draws[1].to(inputs.dtype)


class ModelRandomisation(SampleMetric):
    """Rank correlation of each clean map with the same method's map on a randomised model, against a control.

    The method is built again on `randomised_copy(model, seed, cascade)` with its own settings and explains the
    same samples with the same seeds. Outputs per sample (the module docstring explains the rule):

    - `sanity`: Spearman of the magnitudes (NaN when undefined); lower is better.
    - `sanity_signed`: Spearman of the signed values (NaN when undefined).
    - `sanity_control`: the magnitude Spearman of two model-free maps `x * N(0, I)` on the same input.
    - `sanity_undefined`: 1 when either map of the sample is constant (e.g. all zero), else 0.

    A results row is flagged unless the 95% paired bootstrap interval of `mean(sanity_control - sanity)`
    (undefined samples counting 0) lies above zero, and also, when `flag_above` is set, when the mean `sanity`
    exceeds it. The check's own model evaluations are not counted in the records' gradient evaluations.

    Args:
        seed: seed of the random weights.
        cascade: re-initialise only the `cascade` layers nearest the output (None: all layers).
        flag_above: optionally, also flag a method whose mean `sanity` lies above this (in [0, 1]); None
            (default): only the control rule.
        **kwargs: passed to `torchmetrics.Metric`.

    Example:
        >>> metrics = {"sanity": ModelRandomisation()}               # doctest: +SKIP
    """

    outputs = {"sanity": False, "sanity_signed": None, "sanity_control": None, "sanity_undefined": None}
    needs_attack = False
    control = ("sanity", "sanity_control")
    counted = ("sanity_undefined",)
    flag_message = (
        "its maps keep a rank correlation of {value:.2f} with the maps of a model with random weights, above the "
        "configured flag_above: they show the input more than the model, so their robustness is no evidence of a "
        "good explanation"
    )
    control_message = (
        "its maps on a model with random weights are not clearly less alike than a model-free control's "
        "(|rank correlation| {value:.2f} vs the control's {control:.2f}; control - method {gap:+.2f} "
        "[{low:+.2f}, {high:+.2f}], {undefined} of {samples} samples undefined): they may show the input more "
        "than the model, so their robustness is no evidence of a good explanation"
    )

    def __init__(self, seed: int = 0, cascade: int | None = None, flag_above: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"ModelRandomisation: seed must be an integer, got {seed!r}.")
        if cascade is not None:
            check_positive_int("ModelRandomisation", "cascade", cascade)
        if flag_above is not None and (
            isinstance(flag_above, bool) or not isinstance(flag_above, (int, float))
            or not math.isfinite(flag_above) or not 0 <= flag_above <= 1
        ):
            raise ValueError(
                f"ModelRandomisation: flag_above must be None or a number in [0, 1], got {flag_above!r}; leave it "
                "out to flag by the model-free control alone."
            )
        self.seed = seed
        self.cascade = cascade
        self.flag_above = None if flag_above is None else float(flag_above)
        self._randomised: tuple[int, nn.Module] | None = None

    def _random_model(self, model: nn.Module) -> nn.Module:
        if self._randomised is None or self._randomised[0] != id(model):
            self._randomised = (id(model), randomised_copy(model, self.seed, self.cascade).eval())
        return self._randomised[1]

    def measure(self, batch: MapBatch) -> dict[str, Tensor]:
        if batch.explainer is None:
            raise ValueError("ModelRandomisation needs the explainer that made the maps (MapBatch.explainer).")
        if batch.seeds is None:
            raise ValueError("ModelRandomisation needs the samples' seeds (MapBatch.seeds) for its control maps.")
        explainer = batch.explainer
        settings = {name: getattr(explainer, name) for name in explainer.settings()}
        again = type(explainer)(self._random_model(batch.model), **settings)
        randomised = again.attribute(batch.inputs, batch.target, seeds=batch.seeds)
        magnitude = spearman_correlation(batch.clean, randomised)
        first, second = control_maps(batch.inputs, batch.seeds)
        return {
            "sanity": magnitude,
            "sanity_signed": spearman_correlation(batch.clean, randomised, signed=True),
            "sanity_control": spearman_correlation(first, second),
            "sanity_undefined": torch.isnan(magnitude).double(),
        }

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_randomised"] = None  # a clone or a pickle builds its own random copy
        return state
