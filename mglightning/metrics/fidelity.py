"""Fidelity of an attribution map to the model: deletion and insertion curves and their areas (Petsiuk et al. 2018).

A faithful map ranks first the pixels the model's score depends on. **Deletion** replaces the top-ranked pixels
by a baseline, a growing share at a time, and records the explained class's softmax probability: it should fall
fast (low area under the curve). **Insertion** starts from the baseline and puts the top-ranked pixels back: the
probability should rise fast (high area).

Conventions:

- Pixels are spatial positions: a position's saliency is its magnitude summed over the channels, and a position
  is deleted or inserted in all channels at once. Ties keep the lower flat index (``H, W`` order) first.
- The curve has ``steps + 1`` points: after ``floor(k * H * W / steps)`` positions, ``k = 0 .. steps``.
- The baseline is 0 by default (a black image; the digits' background) for both curves, so the two curves are
  the same experiment run in opposite directions. RISE inserts into a blurred copy instead; pass it as
  ``baseline`` (any tensor that broadcasts to the inputs) to do that.
- The score is the softmax probability of the explained class (``target``); the area is the trapezoid rule over
  the fractions ``positions / (H * W)`` on [0, 1].
- All ``2 * B * (steps + 1)`` modified images go through the model in chunks of ``internal_batch_size``, without
  gradients, in the model's current mode (put it in eval mode).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from mglightning.checks import check_inputs, check_internal_batch_size, check_positive_int, format_target
from mglightning.explainers.batching import chunk_ranges
from mglightning.metrics.base import MapBatch, SampleMetric
from mglightning.metrics.functional import _check_maps

OWNER = "deletion/insertion"


class DeletionInsertionCurves(NamedTuple):
    """Per-sample deletion and insertion curves.

    Attributes:
        fractions: ``(steps + 1,)`` share of the positions deleted (or inserted) at each point, 0 to 1.
        deletion: ``(B, steps + 1)`` softmax probability of each sample's class as its top positions are deleted.
        insertion: ``(B, steps + 1)`` the same as its top positions are inserted into the baseline.
    """

    fractions: Tensor
    deletion: Tensor
    insertion: Tensor


def _check_settings(steps: int, baseline: float | Tensor, internal_batch_size: int | None) -> None:
    check_positive_int(OWNER, "steps", steps)
    check_internal_batch_size(OWNER, internal_batch_size)
    _check_baseline(baseline)


def _check_baseline(baseline: float | Tensor) -> None:
    """A number or a tensor, finite: a NaN baseline makes every curve point NaN, so the areas come out `nan`."""
    if isinstance(baseline, Tensor):
        if not torch.isfinite(baseline).all():
            raise ValueError(
                f"{OWNER}: baseline must be finite; the tensor given holds "
                f"{int((~torch.isfinite(baseline)).sum())} NaN or infinite values."
            )
        return
    if isinstance(baseline, bool) or not isinstance(baseline, (int, float)):
        raise ValueError(f"{OWNER}: baseline must be a number or a tensor, got {type(baseline).__name__}.")
    if not math.isfinite(baseline):
        raise ValueError(f"{OWNER}: baseline must be a finite number (0 is a black image), got {baseline!r}.")


def _baseline_like(baseline: float | Tensor, inputs: Tensor) -> Tensor:
    if isinstance(baseline, Tensor):
        try:
            return baseline.to(device=inputs.device, dtype=inputs.dtype).expand_as(inputs)
        except RuntimeError:
            raise ValueError(
                f"{OWNER}: baseline of shape {tuple(baseline.shape)} does not broadcast to the inputs' shape "
                f"{tuple(inputs.shape)}; pass a number or an image batch (e.g. a blurred copy of the inputs)."
            ) from None
    return torch.full_like(inputs, float(baseline))


def _deletion_insertion_update(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    target: int | Tensor,
    steps: int,
    baseline: float | Tensor,
    internal_batch_size: int | None,
) -> DeletionInsertionCurves:
    check_inputs(inputs)
    _check_maps(maps)
    if maps.shape != inputs.shape:
        raise ValueError(
            f"{OWNER}: maps must be shaped like the inputs {tuple(inputs.shape)}, got {tuple(maps.shape)}."
        )
    _check_settings(steps, baseline, internal_batch_size)
    target = format_target(target, inputs)
    base = _baseline_like(baseline, inputs)
    inputs = inputs.detach()
    batch, _, height, width = inputs.shape
    positions = height * width
    device = inputs.device

    saliency = maps.detach().abs().sum(dim=1).flatten(1).to(device)
    # A stable descending sort keeps equal values in index order, so the lower flat index ranks first.
    order = torch.sort(saliency, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(positions, device=device).expand(batch, -1))
    counts = torch.div(torch.arange(steps + 1, device=device) * positions, steps, rounding_mode="floor")

    # Rows are (curve, sample, point) with curve 0 = deletion, 1 = insertion; each chunk builds only its images.
    points = steps + 1
    scores = []
    with torch.no_grad():
        for start, stop in chunk_ranges(2 * batch * points, internal_batch_size):
            row = torch.arange(start, stop, device=device)
            curve, rest = row // (batch * points), row % (batch * points)
            sample, point = rest // points, rest % points
            top = (rank[sample] < counts[point][:, None]).view(-1, 1, height, width)
            keep_image = torch.where(curve.view(-1, 1, 1, 1) == 1, top, ~top)
            logits = model(torch.where(keep_image, inputs[sample], base[sample]))
            if start == 0 and int(target.max()) >= logits.shape[1]:
                raise ValueError(
                    f"{OWNER}: target holds class {int(target.max())} but the model has {logits.shape[1]} classes."
                )
            scores.append(logits.softmax(dim=1).gather(1, target[sample][:, None]).squeeze(1))
    deletion, insertion = torch.cat(scores).view(2, batch, points)
    return DeletionInsertionCurves(counts.to(deletion.dtype) / positions, deletion, insertion)


def deletion_insertion_curves(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    target: int | Tensor,
    steps: int = 20,
    baseline: float | Tensor = 0.0,
    internal_batch_size: int | None = 256,
) -> DeletionInsertionCurves:
    """Per-sample deletion and insertion curves of attribution maps (conventions: module docstring).

    Args:
        model: the classifier the maps explain, taking ``(B, C, H, W)`` images in [0, 1] (in eval mode).
        inputs: the explained images ``(B, C, H, W)``.
        maps: their signed attribution maps, shaped like ``inputs``.
        target: the explained class, an int or a ``(B,)`` long tensor.
        steps: curve points after the first (the positions go in ``steps`` equal shares). Default 20.
        baseline: what deleted positions become and what insertion starts from: a number or a tensor that
            broadcasts to ``inputs``. Default 0.
        internal_batch_size: model input rows per forward pass (None: all ``2 * B * (steps + 1)`` at once).

    Returns:
        :class:`DeletionInsertionCurves` ``(fractions, deletion, insertion)``.

    Example:
        >>> curves = deletion_insertion_curves(model, images, maps, target=predictions, steps=10)
        >>> curves.deletion.shape, curves.fractions[-1]
        (torch.Size([8, 11]), tensor(1.))
    """
    return _deletion_insertion_update(model, inputs, maps, target, steps, baseline, internal_batch_size)


def deletion_insertion_auc(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    target: int | Tensor,
    steps: int = 20,
    baseline: float | Tensor = 0.0,
    internal_batch_size: int | None = 256,
) -> tuple[Tensor, Tensor]:
    """Per-sample areas under the deletion and insertion curves (trapezoid rule on [0, 1]).

    Lower deletion and higher insertion areas mean a map more faithful to the model. Arguments as
    :func:`deletion_insertion_curves`.

    Returns:
        ``(deletion, insertion)``, two ``(B,)`` tensors with values in [0, 1].

    Example:
        >>> from mglightning.explainers import SimpleGradient
        >>> maps = SimpleGradient(model).attribute(images, target=predictions)
        >>> deletion, insertion = deletion_insertion_auc(model, images, maps, predictions, steps=20)
    """
    curves = _deletion_insertion_update(model, inputs, maps, target, steps, baseline, internal_batch_size)
    return (
        torch.trapezoid(curves.deletion, curves.fractions, dim=1),
        torch.trapezoid(curves.insertion, curves.fractions, dim=1),
    )


class DeletionInsertionAUC(SampleMetric):
    """Mean areas under the deletion and insertion curves of attribution maps.

    ``update(inputs, maps, target)`` adds a batch; ``compute()`` returns ``{"deletion_auc": mean area (lower is
    more faithful), "insertion_auc": mean area (higher is more faithful)}``. States are sums and a count reduced
    with ``"sum"``, so N devices give the value of one. In an evaluation it measures each clean map with the
    evaluated classifier; used alone it takes the model in the constructor (held as a child module, as
    torchmetrics' FID holds its feature network, and used in its current mode). Per-sample form:
    :func:`deletion_insertion_auc`; conventions in :mod:`mglightning.metrics.fidelity`.

    Args:
        model: the classifier the maps explain (in eval mode), for ``update``; an evaluation passes its own.
        steps: curve points after the first. Default 20.
        baseline: a number or a tensor that broadcasts to the inputs. Default 0.
        internal_batch_size: model input rows per forward pass (None: all at once). Default 256.
        **kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> metric = DeletionInsertionAUC(model, steps=20)
        >>> metric.update(images, maps, target=predictions)
        >>> metric.compute()["deletion_auc"]
    """

    higher_is_better = None  # deletion: lower is better; insertion: higher is better
    outputs = {"deletion_auc": False, "insertion_auc": True}
    needs_attack = False
    interval = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    def __init__(
        self,
        model: nn.Module | None = None,
        steps: int = 20,
        baseline: float | Tensor = 0.0,
        internal_batch_size: int | None = 256,
        **kwargs: Any,
    ) -> None:
        _check_settings(steps, baseline, internal_batch_size)
        super().__init__(**kwargs)
        self.model = model
        self.steps = steps
        self.baseline = baseline
        self.internal_batch_size = internal_batch_size

    def _areas(self, model: nn.Module, inputs: Tensor, maps: Tensor, target: int | Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            deletion, insertion = deletion_insertion_auc(
                model, inputs, maps, target, self.steps, self.baseline, self.internal_batch_size
            )
        return {"deletion_auc": deletion, "insertion_auc": insertion}

    def measure(self, batch: MapBatch) -> dict[str, Tensor]:
        return self._areas(batch.model, batch.inputs, batch.clean.detach(), batch.target)

    def update(self, inputs: Tensor, maps: Tensor, target: int | Tensor) -> None:
        """Add a batch of images ``(B, C, H, W)``, their signed maps and the explained classes."""
        if self.model is None:
            raise ValueError("DeletionInsertionAUC.update needs the model: DeletionInsertionAUC(model, ...).")
        self.accumulate(self._areas(self.model, inputs, maps, target))


__all__ = [
    "DeletionInsertionAUC",
    "DeletionInsertionCurves",
    "deletion_insertion_auc",
    "deletion_insertion_curves",
]
