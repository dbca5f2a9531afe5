"""timm classifiers (ImageNet's EfficientNet-b0 in the paper) behind the same [0, 1] normalisation layer."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from mglightning.models.layers import Normalize


class TimmClassifier(nn.Module):
    """`Normalize` followed by a timm model, so that it takes images in [0, 1] like every mglightning model.

    Args:
        timm_name: the timm model name, e.g. `efficientnet_b0`.
        num_classes: output classes (timm replaces the head if it differs from the pretrained one).
        pretrained: load timm's pretrained weights (needs them in the local Hugging Face cache or internet).
        image_size: accepted for a uniform interface with the other builders (timm models are size-agnostic).
        in_chans: input channels.
        mean, std: normalisation statistics; default to the pretrained configuration's.
    """

    def __init__(
        self,
        timm_name: str,
        num_classes: int = 1000,
        pretrained: bool = False,
        image_size: int = 224,
        in_chans: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        import timm

        if not timm.is_model(timm_name):
            raise ValueError(
                f"timm has no model named {timm_name!r}; see `timm.list_models()` for the available names."
            )
        try:
            self.net = timm.create_model(
                timm_name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans
            )
        except Exception as error:  # timm raises several kinds of errors when the hub cannot be reached
            if not pretrained:
                raise
            raise RuntimeError(
                f"Could not load pretrained weights for timm model {timm_name!r} ({type(error).__name__}: {error}). "
                "Without internet, download them once on a connected machine into the Hugging Face cache "
                "(HF_HOME), or build the model with pretrained=False and pass weights=<local file>."
            ) from error
        config = self.net.pretrained_cfg
        self.num_classes = num_classes
        self.normalize = Normalize(mean or config.get("mean"), std or config.get("std"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))
