"""Robustness metrics between clean and attacked attribution maps (docs/reference/semantics.md section 6), as torchmetrics.

Each metric keeps only a sum of per-sample values and a sample count, both reduced with
``dist_reduce_fx="sum"``, so its value over N devices equals its value over one device on the same samples,
whatever the split (uneven ones included).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mglightning.checks import check_share
from mglightning.metrics.base import MapBatch, SampleMetric
from mglightning.metrics.functional import (
    _normalized_distance_update,
    _saliency_ssim_update,
    _topk_intersection_update,
)


class _MeanOverSamples(SampleMetric):
    """A per-sample value of two map batches (clean and attacked), averaged over every sample seen."""

    def _per_sample(self, original: Tensor, attacked: Tensor) -> Tensor:
        raise NotImplementedError

    def measure(self, batch: MapBatch) -> dict[str, Tensor]:
        (name,) = self.outputs
        return {name: self._per_sample(batch.clean, batch.attacked)}

    def update(self, original: Tensor, attacked: Tensor) -> None:
        """Add a batch of clean maps and the matching attacked maps, both signed ``(B, C, H, W)``."""
        (name,) = self.outputs
        self.accumulate({name: self._per_sample(original, attacked)})


class NormalizedDistance(_MeanOverSamples):
    """Mean ``|| a/||a||_2 - b/||b||_2 ||_2`` of the flattened magnitude maps (paper eq. 6), in [0, 2].

    Lower is more robust. An all-zero map is at distance 1 from any non-zero map (docs/reference/semantics.md section 6).
    See :func:`mglightning.metrics.functional.normalized_distance` for the per-sample form.

    Args:
        **kwargs: passed to :class:`torchmetrics.Metric` (e.g. ``sync_on_compute``).

    Example:
        >>> metric = NormalizedDistance()
        >>> a = torch.tensor([[[[3.0, 4.0]]], [[[1.0, 0.0]]]])
        >>> metric.update(a, torch.tensor([[[[-6.0, 8.0]]], [[[0.0, 1.0]]]]))
        >>> metric.compute()
        tensor(0.7071)
    """

    higher_is_better = False
    outputs = {"distance": False}
    plot_lower_bound = 0.0
    plot_upper_bound = 2.0

    def _per_sample(self, original: Tensor, attacked: Tensor) -> Tensor:
        return _normalized_distance_update(original, attacked)


class TopKIntersection(_MeanOverSamples):
    """Mean share of the clean map's top-k entries that stay in the attacked map's top-k, in [0, 1].

    ``k = max(1, floor(fraction * nnz(|a|)))`` from the clean map ``a``; top-k sets hold no zeros and break ties
    by the lower flat index (docs/reference/semantics.md section 6). Higher is more robust. See
    :func:`mglightning.metrics.functional.topk_intersection` for the per-sample form.

    Args:
        fraction: share of the clean map's non-zero entries in the top-k set, in (0, 1]. Default 0.4.
        **kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> metric = TopKIntersection(fraction=0.5)
        >>> a = torch.tensor([[[[4.0, 3.0, 2.0, 1.0]]]])
        >>> metric.update(a, torch.tensor([[[[4.0, 1.0, 3.0, 2.0]]]]))
        >>> metric.compute()
        tensor(0.5000)
    """

    higher_is_better = True
    outputs = {"topk": True}
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    def __init__(self, fraction: float = 0.4, **kwargs: Any) -> None:
        check_share(type(self).__name__, "fraction", fraction)
        super().__init__(**kwargs)
        self.fraction = fraction

    def _per_sample(self, original: Tensor, attacked: Tensor) -> Tensor:
        return _topk_intersection_update(original, attacked, self.fraction)


class SaliencySSIM(_MeanOverSamples):
    """Mean SSIM between the clean and attacked magnitude maps, each scaled by its own maximum to [0, 1].

    11x11 Gaussian window, sigma 1.5, ``data_range=1``, per channel, over the positions whose window lies in
    the image (scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1)``); maps must be at least 11x11. Higher is more robust. See
    :func:`mglightning.metrics.functional.saliency_ssim` for the per-sample form.

    Args:
        **kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> metric = SaliencySSIM()
        >>> a = torch.rand(4, 3, 32, 32)
        >>> metric.update(a, -a)
        >>> metric.compute()
        tensor(1.)
    """

    higher_is_better = True
    outputs = {"ssim": True}
    plot_upper_bound = 1.0

    def _per_sample(self, original: Tensor, attacked: Tensor) -> Tensor:
        return _saliency_ssim_update(original, attacked)
