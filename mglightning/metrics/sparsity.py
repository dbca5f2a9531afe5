"""Structure metric of a single batch of attribution maps (docs/semantics.md section 6), as a torchmetrics metric."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from mglightning.metrics.functional import _mean_compute, _sparsity_update


class Sparsity(Metric):
    """Sparsity of attribution maps: the mean Gini index and the mean share of exactly-zero entries.

    Unlike the robustness metrics, it measures one batch of maps: ``update(maps)``. The Gini index is that of
    the flattened magnitude map (Quantus's ``Sparseness``; 0 for a uniform map, close to 1 for a single
    non-zero entry; an all-zero map counts as 0). ``compute()`` returns
    ``{"gini": mean Gini index, "zero_fraction": mean share of exact zeros}``; both are higher for sparser maps.
    States are sums and a count reduced with ``"sum"``, so N devices give the value of one. Per-sample forms:
    :func:`mglightning.metrics.functional.gini_index` and :func:`~mglightning.metrics.functional.zero_fraction`.

    Args:
        **kwargs: passed to :class:`torchmetrics.Metric` (e.g. ``sync_on_compute``).

    Example:
        >>> metric = Sparsity()
        >>> metric.update(torch.tensor([[[[0.0, 0.0, 0.0, -2.0]]], [[[1.0, 1.0, 1.0, 1.0]]]]))
        >>> {name: round(value.item(), 4) for name, value in metric.compute().items()}
        {'gini': 0.375, 'zero_fraction': 0.375}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("gini_total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("zero_fraction_total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, maps: Tensor) -> None:
        """Add a batch of signed maps ``(B, C, H, W)``."""
        gini, zero_share = _sparsity_update(maps)
        self.gini_total += gini.sum().to(self.gini_total.dtype)
        self.zero_fraction_total += zero_share.sum().to(self.zero_fraction_total.dtype)
        self.count += gini.numel()

    def compute(self) -> dict[str, Tensor]:
        """``{"gini": ..., "zero_fraction": ...}``, each a mean over all samples seen (NaN before any)."""
        return {
            "gini": _mean_compute(self.gini_total, self.count),
            "zero_fraction": _mean_compute(self.zero_fraction_total, self.count),
        }
