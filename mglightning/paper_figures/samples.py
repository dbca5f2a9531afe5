"""The test samples a paper figure draws, and the units of its settings.

Settings that the paper gives in its normalised input space (`rho`, `step_size`, `eta`) are taken in those units
by default (`units="normalised"`) and converted with the model's std (`mglightning.units`); noise levels are pixel
units either way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mglightning.units import model_std, to_pixel_units

__all__ = ["UNITS", "Samples", "caption", "pixel_settings", "select_samples"]

UNITS = ("normalised", "pixels")


@dataclass
class Samples:
    """The test samples a figure draws, on the model's device.

    Attributes:
        images: `(N, C, H, W)` images in [0, 1].
        labels: `(N,)` true classes.
        predictions: `(N,)` the model's predictions.
        indices: `(N,)` dataset indices (captions).
        seeds: `(N,)` long CPU tensor, each sample's noise seed (its dataset index).
    """

    images: Tensor
    labels: Tensor
    predictions: Tensor
    indices: Tensor
    seeds: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.seeds = self.indices.cpu().long()


def select_samples(
    model: nn.Module, dataset: Any, count: int, *, misclassified: bool = False, device: str | torch.device = "cpu",
    batch_size: int = 256,
) -> Samples:
    """The first `count` samples of a test dataset (or the first `count` that the model misclassifies).

    Args:
        model: the classifier, in eval mode, on `device`.
        dataset: an indexable dataset of `(image, label)` pairs (a datamodule's `test_dataset`).
        count: how many samples, >= 1.
        misclassified: take only samples whose prediction differs from the label (scans the whole set if needed).
        device: where the images go.
        batch_size: images per forward pass while scanning.

    Returns:
        `Samples`; fewer than `count` when the dataset has fewer (misclassified) samples.

    Example:
        >>> wrong = select_samples(model, datamodule.test_dataset, 4, misclassified=True)
    """
    if count < 1:
        raise ValueError(f"the number of samples must be at least 1, got {count}.")
    chosen: list[tuple[Tensor, int, int, int]] = []
    for start in range(0, len(dataset), batch_size):
        indices = list(range(start, min(start + batch_size, len(dataset))))
        items = [dataset[i] for i in indices]
        images = torch.stack([image for image, _ in items]).to(device)
        labels = torch.tensor([label for _, label in items])
        with torch.no_grad():
            predictions = model(images).argmax(dim=1).cpu()
        for position, index in enumerate(indices):
            if not misclassified or predictions[position] != labels[position]:
                chosen.append((images[position], int(labels[position]), int(predictions[position]), index))
        if len(chosen) >= count:
            break
    if not chosen:
        raise ValueError("the model misclassifies none of the test samples: there is nothing to draw for Figure 7.")
    chosen = chosen[:count]
    return Samples(
        images=torch.stack([c[0] for c in chosen]),
        labels=torch.tensor([c[1] for c in chosen], device=device),
        predictions=torch.tensor([c[2] for c in chosen], device=device),
        indices=torch.tensor([c[3] for c in chosen]),
    )


def pixel_settings(model: nn.Module, settings: Mapping[str, Any], units: str) -> dict[str, Any]:
    """`settings` in pixel units: as they are for `units="pixels"`, converted with the model's std for
    `"normalised"`."""
    if units not in UNITS:
        raise ValueError(f"units must be one of {UNITS}, got {units!r}.")
    return dict(settings) if units == "pixels" else to_pixel_units(settings, model_std(model))


def caption(samples: Samples, i: int) -> tuple[str, str]:
    """Sample `i`'s caption (dataset index, label, prediction) and its colour: red when misclassified."""
    label, prediction = int(samples.labels[i]), int(samples.predictions[i])
    text = f"sample {int(samples.indices[i])}\nlabel {label}, pred {prediction}"
    return text, ("#C00000" if label != prediction else "black")
