"""The model-parameter randomisation sanity check (Adebayo et al. 2018, "Sanity Checks for Saliency Maps").

A map that explains a model has to change when the model's learned weights are replaced by random ones. The check
compares each sample's map on the trained classifier with the same method's map, for the same class and the same
noise seeds, on a copy whose weights are re-initialised: all layers, or cascading from the output layer down. The
comparison is the Spearman rank correlation of the flattened magnitudes `|A|`, per sample. A method whose maps keep
a high correlation does not explain what the model learned (a map that mostly shows the input is the usual case),
and its robustness to attacks is no evidence of a good explanation.

**Flag rule.** A method is flagged ("its maps do not depend on the model") when the mean correlation over the
samples with a defined correlation exceeds `threshold` (default 0.5). The mean, like every other column of the
results, is exact over any number of devices (`RandomisationCorrelation` keeps a sum and a count); Quantus's MPRT
also aggregates by the mean. A correlation is undefined (NaN) where either map is constant, e.g. all zero.

Example:
    >>> check = model_randomisation_check(SimpleGradient, model, images, target)
    >>> check.correlation            # (B,) per-sample Spearman correlations
    >>> check.flagged                # False for a map that depends on the weights
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from mglightning.explainers.base import Explainer
from mglightning.metrics.functional import _check_map_pair, _flat_magnitudes
from mglightning.models.layers import Normalize

DEFAULT_THRESHOLD = 0.5


def randomisable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers that the check re-initialises: every module with parameters of its own, in registration order
    (input to output for the models of this package), except the input normalisation (`Normalize`).

    Raises a `ValueError` naming any such module without `reset_parameters`, which cannot be re-initialised.

    Example:
        >>> [name for name, _ in randomisable_layers(model)][-1]
        'fc'
    """
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, Normalize) or next(module.parameters(recurse=False), None) is None:
            continue
        if not callable(getattr(module, "reset_parameters", None)):
            raise ValueError(
                f"The layer {name!r} ({type(module).__name__}) has parameters but no reset_parameters(), so it "
                "cannot be re-initialised for the randomisation check."
            )
        layers.append((name, module))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no parameterised layers to randomise.")
    return layers


def randomised_copy(model: nn.Module, seed: int = 0, cascade: int | None = None) -> nn.Module:
    """A deep copy of `model` with re-initialised weights: all layers, or the last `cascade` layers.

    The layers are those of `randomisable_layers` (the input `Normalize` keeps its mean and std); each is
    re-initialised by its own `reset_parameters()` (PyTorch's default initialisation; batch norm also resets its
    running statistics), from the output layer down, with numbers drawn on the CPU from one generator seeded with
    `seed`. So the copy is the same on every device and for every `seed` call, and the cascade's copies are nested:
    the last `k` layers of `cascade=k + 1` equal those of `cascade=k`. The global RNG state is left as it was, and
    the copy keeps the model's train/eval mode.

    Args:
        model: the trained classifier (left untouched).
        seed: the initialisation's seed.
        cascade: re-initialise only the last `cascade` layers (1 = the output layer); `None` (default) all of them.

    Example:
        >>> random_model = randomised_copy(model, seed=0)             # all layers
        >>> top_two = randomised_copy(model, seed=0, cascade=2)       # the last two parameterised layers
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}.")
    copied = copy.deepcopy(model)
    layers = randomisable_layers(copied)
    if cascade is not None and (isinstance(cascade, bool) or not isinstance(cascade, int)
                                or not 1 <= cascade <= len(layers)):
        raise ValueError(
            f"cascade must be an int from 1 (the output layer) to {len(layers)} (every parameterised layer of "
            f"{type(model).__name__}), or None for all, got {cascade!r}."
        )
    chosen = layers[::-1][: len(layers) if cascade is None else cascade]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _, layer in chosen:
            device = next(layer.parameters(recurse=False)).device
            layer.to("cpu").reset_parameters()
            layer.to(device)
    return copied


def _average_ranks(values: Tensor) -> Tensor:
    """Per row of `(B, n)` values, their ranks 1..n, ties sharing their average rank (scipy's `rankdata`)."""
    batch, n = values.shape
    order = values.argsort(dim=1)
    ordered = values.gather(1, order)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = starts.cumsum(1) - 1  # the tie group of each sorted position
    positions = torch.arange(1, n + 1, dtype=torch.float64, device=values.device).expand(batch, n)
    totals = torch.zeros(batch, n, dtype=torch.float64, device=values.device).scatter_add_(1, group, positions)
    counts = torch.zeros_like(totals).scatter_add_(1, group, torch.ones_like(positions))
    average = (totals / counts.clamp_min(1)).gather(1, group)
    return torch.empty_like(average).scatter_(1, order, average)


def _rank_correlation_update(original: Tensor, other: Tensor) -> Tensor:
    ranks_a = _average_ranks(_flat_magnitudes(original))
    ranks_b = _average_ranks(_flat_magnitudes(other))
    ranks_a = ranks_a - ranks_a.mean(1, keepdim=True)
    ranks_b = ranks_b - ranks_b.mean(1, keepdim=True)
    scale = torch.linalg.vector_norm(ranks_a, dim=1) * torch.linalg.vector_norm(ranks_b, dim=1)
    covariance = (ranks_a * ranks_b).sum(1)
    return torch.where(scale > 0, covariance / scale.clamp_min(torch.finfo(scale.dtype).tiny), math.nan)


def rank_correlation(original: Tensor, other: Tensor) -> Tensor:
    """Per-sample Spearman rank correlation between two map batches' magnitudes `|A|`, flattened.

    Ties get their average rank (as `scipy.stats.spearmanr`); the result is NaN for a sample where either map is
    constant (e.g. all zero), whose ranks carry no order.

    Args:
        original: signed maps `(B, C, H, W)`, e.g. of the trained model.
        other: signed maps of the same shape, e.g. of the randomised model.

    Returns:
        A `(B,)` float64 tensor in [-1, 1] (NaN where undefined), on the maps' device.

    Example:
        >>> rank_correlation(torch.tensor([[[[1.0, 2.0, 3.0]]]]), torch.tensor([[[[-1.0, 5.0, 9.0]]]]))
        tensor([1.], dtype=torch.float64)
    """
    _check_map_pair(original, other)
    return _rank_correlation_update(original, other)


class RandomisationCorrelation(Metric):
    """Mean Spearman rank correlation of each sample's map on the trained model with its map on a randomised copy.

    `update(original, randomised)` takes the two map batches (`rank_correlation` per sample); samples whose
    correlation is undefined (a constant map) are left out of the mean and counted in `undefined`. States are sums
    and counts reduced with `"sum"`, so N devices give the value of one. Lower is better: a method whose maps
    depend on the model scores near 0; `compute() > threshold` is the module's flag rule.

    Args:
        **kwargs: passed to `torchmetrics.Metric`.

    Example:
        >>> metric = RandomisationCorrelation()
        >>> metric.update(maps, SimpleGradient(randomised_copy(model)).attribute(images, target))
        >>> metric.compute()
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    plot_lower_bound = -1.0
    plot_upper_bound = 1.0

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("undefined", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, original: Tensor, randomised: Tensor) -> None:
        """Add a batch of maps on the trained model and the matching maps on the randomised copy."""
        values = rank_correlation(original, randomised)
        defined = ~values.isnan()
        self.total += values[defined].sum().to(self.total.dtype)
        self.count += int(defined.sum())
        self.undefined += int((~defined).sum())

    def compute(self) -> Tensor:
        """Mean correlation over the samples with a defined one (NaN before any)."""
        return self.total / self.count


@dataclass(frozen=True)
class RandomisationCheck:
    """The outcome of `model_randomisation_check`.

    Attributes:
        correlation: `(B,)` float64 CPU tensor, each sample's rank correlation (NaN where a map is constant).
        mean: the mean over the defined correlations (NaN if none is).
        flagged: `mean > threshold`: the maps do not depend on the model's weights.
        threshold: the flag's threshold.
        seed: the randomisation's seed.
        cascade: how many layers from the output down were re-initialised (`None`: all).
    """

    correlation: Tensor
    mean: float
    flagged: bool
    threshold: float
    seed: int
    cascade: int | None


def model_randomisation_check(
    explainer_factory: Callable[[nn.Module], Explainer],
    model: nn.Module,
    inputs: Tensor,
    target: int | Tensor,
    *,
    seeds: Tensor | None = None,
    seed: int = 0,
    cascade: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> RandomisationCheck:
    """Run the model-parameter randomisation check of one method on a batch.

    One batched `attribute` call on the trained model and one on `randomised_copy(model, seed, cascade)`, with the
    same `target` and noise `seeds`, then `rank_correlation` per sample and the flag rule (module docstring).

    Args:
        explainer_factory: builds the method for a model, e.g. an explainer class (`SimpleGradient`) or
            `lambda m: MoreauGrad(m, rho=0.06)`.
        model: the trained classifier, in eval mode.
        inputs: `(B, C, H, W)` images in [0, 1].
        target: the class explained, an int or a `(B,)` tensor (the trained model's predictions, usually); the
            randomised model is explained for the same class.
        seeds: `(B,)` noise seeds, used for both calls (`None`: drawn once from torch's global RNG, so noisy
            methods still see the same noise on both models).
        seed: the randomisation's seed.
        cascade: re-initialise only the last `cascade` layers; `None` (default) all.
        threshold: flag when the mean correlation exceeds it (default 0.5).

    Example:
        >>> check = model_randomisation_check(IntegratedGradients, model, images, predictions, cascade=1)
        >>> check.mean, check.flagged
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1 <= threshold <= 1:
        raise ValueError(f"threshold must be a correlation in [-1, 1], got {threshold!r}.")
    if seeds is None:
        seeds = torch.randint(0, 2**62, (inputs.shape[0],), dtype=torch.long)
    randomised = randomised_copy(model, seed, cascade)
    original = explainer_factory(model).attribute(inputs, target, seeds=seeds).detach()
    other = explainer_factory(randomised).attribute(inputs, target, seeds=seeds).detach()
    correlation = rank_correlation(original, other).cpu()
    defined = correlation[~correlation.isnan()]
    mean = float(defined.mean()) if defined.numel() else math.nan
    return RandomisationCheck(correlation, mean, bool(mean > threshold), float(threshold), seed, cascade)
