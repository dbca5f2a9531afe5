"""Robustness and sparsity metrics of attribution maps (docs/reference/semantics.md section 6).

Metric classes (``SampleMetric``, a ``torchmetrics.Metric`` with sum/count states, exact under DDP, whose
``measure(MapBatch)`` gives the per-sample values an evaluation records):
``NormalizedDistance``, ``TopKIntersection``, ``SaliencySSIM`` (``update(original, attacked)``) and
``Sparsity`` (``update(maps)``). Per-sample functional forms live in :mod:`mglightning.metrics.functional`.
The sanity check (model-parameter randomisation): ``ModelRandomisation``, ``control_maps``, ``randomised_copy``,
``spearman_correlation`` (:mod:`mglightning.metrics.sanity`). Fidelity of a map to its model: ``DeletionInsertionAUC`` and the per-sample ``deletion_insertion_auc`` /
``deletion_insertion_curves`` (:mod:`mglightning.metrics.fidelity`).
"""

from mglightning.metrics.base import MapBatch, SampleMetric
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
from mglightning.metrics.sanity import ModelRandomisation, control_maps, randomised_copy, spearman_correlation
from mglightning.metrics.sparsity import Sparsity

__all__ = [
    "DeletionInsertionAUC",
    "DeletionInsertionCurves",
    "MapBatch",
    "ModelRandomisation",
    "NormalizedDistance",
    "SaliencySSIM",
    "SampleMetric",
    "Sparsity",
    "TopKIntersection",
    "control_maps",
    "deletion_insertion_auc",
    "deletion_insertion_curves",
    "gini_index",
    "normalized_distance",
    "randomised_copy",
    "saliency_ssim",
    "spearman_correlation",
    "topk_count",
    "topk_intersection",
    "topk_mask",
    "zero_fraction",
]
