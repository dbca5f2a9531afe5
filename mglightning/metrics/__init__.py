"""Robustness and sparsity metrics of attribution maps (SPEC section 6).

Metric classes (``torchmetrics.Metric``, sum/count states, exact under DDP):
``NormalizedDistance``, ``TopKIntersection``, ``SaliencySSIM`` (``update(original, attacked)``) and
``Sparsity`` (``update(maps)``). Per-sample functional forms live in :mod:`mglightning.metrics.functional`.
Fidelity of a map to its model: ``DeletionInsertionAUC`` and the per-sample ``deletion_insertion_auc`` /
``deletion_insertion_curves`` (:mod:`mglightning.metrics.fidelity`).
The model-parameter randomisation sanity check: ``randomised_copy``, the per-sample ``rank_correlation``,
``RandomisationCorrelation`` and ``model_randomisation_check`` (:mod:`mglightning.metrics.sanity`).
"""

from mglightning.metrics.fidelity import (
    DeletionInsertionAUC,
    DeletionInsertionCurves,
    deletion_insertion_auc,
    deletion_insertion_curves,
)
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
from mglightning.metrics.sanity import (
    RandomisationCheck,
    RandomisationCorrelation,
    model_randomisation_check,
    randomisable_layers,
    randomised_copy,
    rank_correlation,
)
from mglightning.metrics.sparsity import Sparsity

__all__ = [
    "DeletionInsertionAUC",
    "DeletionInsertionCurves",
    "NormalizedDistance",
    "RandomisationCheck",
    "RandomisationCorrelation",
    "SaliencySSIM",
    "Sparsity",
    "TopKIntersection",
    "deletion_insertion_auc",
    "deletion_insertion_curves",
    "gini_index",
    "model_randomisation_check",
    "normalized_distance",
    "randomisable_layers",
    "randomised_copy",
    "rank_correlation",
    "saliency_ssim",
    "topk_count",
    "topk_intersection",
    "topk_mask",
    "zero_fraction",
]
