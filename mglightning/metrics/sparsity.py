"""Structure metric of a single batch of attribution maps (docs/reference/semantics.md section 6), as a torchmetrics metric."""

from __future__ import annotations

from torch import Tensor

from mglightning.metrics.base import MapBatch, SampleMetric
from mglightning.metrics.functional import _sparsity_update


class Sparsity(SampleMetric):
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

    higher_is_better = True
    outputs = {"gini": None, "zero_fraction": None}  # sparser, not better
    needs_attack = False
    interval = False

    def measure(self, batch: MapBatch) -> dict[str, Tensor]:
        gini, zero_share = _sparsity_update(batch.clean)
        return {"gini": gini, "zero_fraction": zero_share}

    def update(self, maps: Tensor) -> None:
        """Add a batch of signed maps ``(B, C, H, W)``."""
        gini, zero_share = _sparsity_update(maps)
        self.accumulate({"gini": gini, "zero_fraction": zero_share})
