"""Robustness and sparsity metrics of attribution maps (SPEC section 6).

Metric classes (``torchmetrics.Metric``, sum/count states, exact under DDP):
``NormalizedDistance``, ``TopKIntersection``, ``SaliencySSIM`` (``update(original, attacked)``) and
``Sparsity`` (``update(maps)``). Per-sample functional forms live in :mod:`mglightning.metrics.functional`.
"""

from mglightning.metrics.functional import (
    gini_index,
    normalized_distance,
    saliency_ssim,
    topk_count,
    topk_intersection,
    topk_mask,
    zero_fraction,
)
from mglightning.metrics.robustness import NormalizedDistance, SaliencySSIM, TopKIntersection
from mglightning.metrics.sparsity import Sparsity

__all__ = [
    "NormalizedDistance",
    "SaliencySSIM",
    "Sparsity",
    "TopKIntersection",
    "gini_index",
    "normalized_distance",
    "saliency_ssim",
    "topk_count",
    "topk_intersection",
    "topk_mask",
    "zero_fraction",
]
