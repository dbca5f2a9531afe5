"""What every metric of an evaluation shares: per-sample values for the records, sums for devices.

An evaluation measures each batch with every configured metric: `SampleMetric.measure(batch)` returns one value
per sample and per output (what the per-sample records store), and `accumulate` adds them to sum/count states
reduced with `dist_reduce_fx="sum"`, so `compute()` over N devices equals it over one. The familiar torchmetrics
call (`update(original, attacked)` for the robustness metrics) does both.

A metric of your own subclasses `SampleMetric`, declares its `outputs` and implements `measure`:

    class MeanMagnitudeShift(SampleMetric):
        outputs = {"shift": False}            # output name -> higher is better (None: no direction)

        def measure(self, batch: MapBatch) -> dict[str, Tensor]:
            return {"shift": (batch.attacked.abs() - batch.clean.abs()).flatten(1).mean(dim=1)}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torchmetrics import Metric

__all__ = ["MapBatch", "SampleMetric"]


@dataclass(frozen=True)
class MapBatch:
    """One batch as an evaluation's metrics see it.

    Attributes:
        model: the classifier (eval mode, [0, 1] inputs).
        inputs: `(B, C, H, W)` clean images.
        target: `(B,)` long tensor, the class explained.
        clean: `(B, C, H, W)` signed clean maps.
        attacked_inputs: the attacked images, or None for metrics of the clean map alone (`needs_attack` False).
        attacked: the signed maps of the attacked images, or None likewise.
        explainer: the explainer that made the maps (for metrics that explain again, e.g. on another model).
        seeds: `(B,)` the noise seeds the maps were made with.
    """

    model: nn.Module
    inputs: Tensor
    target: Tensor
    clean: Tensor
    attacked_inputs: Tensor | None = None
    attacked: Tensor | None = None
    explainer: Any = None
    seeds: Tensor | None = None


class SampleMetric(Metric):
    """A torchmetrics metric whose per-sample values an evaluation records, and whose means it aggregates.

    Class attributes:
        outputs: `{name: higher_is_better}` of the values `measure` returns (`None`: no better direction). In an
            evaluation a single-output metric's record column is the metric's label in the config; a metric
            with several outputs gets one column per output name.
        needs_attack: whether `measure` needs the attacked maps (the robustness metrics); metrics of the clean
            map alone (sparsity, fidelity) are measured once per method and copied to every attack and budget.
        interval: whether the results table shows a bootstrap interval for it (every value gets one in
            `results.json`).
        flag_message: with an instance attribute `flag_above`, the warning (formatted with `value`) for a method
            whose mean lies above it, e.g. the sanity check's.
        control: `(output, control output)`: the results flag a method unless the 95% paired bootstrap interval
            of the mean over samples of `control - output` lies above zero (a sample whose `output` is NaN, i.e.
            undefined, counts as 0), with `control_message` (formatted with `value`, `control`, `gap`, `low`,
            `high`, `undefined`, `samples`); the sanity check's model-free control.
        counted: outputs that are 0/1 indicators; the results table shows their count of samples, not a mean.

    Args:
        **kwargs: passed to `torchmetrics.Metric` (e.g. `sync_on_compute`).
    """

    is_differentiable = False
    full_state_update = False
    outputs: ClassVar[dict[str, bool | None]]
    needs_attack: ClassVar[bool] = True
    interval: ClassVar[bool] = True
    flag_message: ClassVar[str | None] = None
    control: ClassVar[tuple[str, str] | None] = None
    control_message: ClassVar[str | None] = None
    counted: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in self.outputs:
            self.add_state(f"{name}_total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def measure(self, batch: MapBatch) -> dict[str, Tensor]:
        """The `(B,)` values of each output for one batch (no state changes)."""
        raise NotImplementedError(f"{type(self).__name__} must implement measure(batch) -> {{output: (B,) tensor}}.")

    def update(self, batch: MapBatch) -> None:
        """Measure a batch and add its values (the built-in metrics take their familiar arguments instead)."""
        self.accumulate(self.measure(batch))

    def accumulate(self, values: dict[str, Tensor]) -> None:
        """Add per-sample values (as `measure` returns them, or read back from records) to the sums."""
        missing = set(self.outputs) - set(values)
        if missing:
            raise ValueError(f"{type(self).__name__}: values lack the outputs {sorted(missing)}.")
        count = None
        for name in self.outputs:
            value = torch.as_tensor(values[name]).detach().flatten()
            if count is not None and value.numel() != count:
                raise ValueError(f"{type(self).__name__}: outputs hold different numbers of samples.")
            count = value.numel()
            total = getattr(self, f"{name}_total")
            setattr(self, f"{name}_total", total + value.to(device=total.device, dtype=total.dtype).sum())
        self.count += count

    def compute(self) -> Tensor | dict[str, Tensor]:
        """The mean over every sample seen (on every device) of each output: a tensor for a single output, else
        `{output: mean}`; NaN before any sample."""
        means = {
            name: getattr(self, f"{name}_total") / self.count if self.count > 0 else torch.tensor(float("nan"))
            for name in self.outputs
        }
        return next(iter(means.values())) if len(means) == 1 else means
