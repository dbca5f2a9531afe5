"""A small model registry in timm's manner: builders are stored by name and built with `create_model`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

_MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {}

TIMM_PREFIX = "timm/"


def register_model(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register `builder` under its function name; use as a decorator."""
    name = builder.__name__
    if name in _MODEL_BUILDERS:
        raise ValueError(f"A model named {name!r} is already registered.")
    _MODEL_BUILDERS[name] = builder
    return builder


def list_models() -> list[str]:
    """Names accepted by `create_model` (besides `timm/<any timm model>`)."""
    return sorted(_MODEL_BUILDERS)


def create_model(name: str, *, weights: str | None = None, **kwargs) -> nn.Module:
    """Build a classifier that takes images in [0, 1] by its registered name.

    Args:
        name: a registered name (see `list_models()`), or `timm/<model>` for any timm model
            (e.g. `timm/efficientnet_b0`).
        weights: optional path to a local file with the model's weights: a plain state dict, or a
            Lightning checkpoint of `ClassifierModule` (its `net.` entries are used).
        **kwargs: the builder's settings (`num_classes`, `image_size`, `mean`, `std`, ...).

    Example:
        >>> model = create_model("resnet18", num_classes=10, image_size=32, activation="softplus")
    """
    if name.startswith(TIMM_PREFIX):
        from mglightning.models.timm_models import TimmClassifier

        model = TimmClassifier(name[len(TIMM_PREFIX):], **kwargs)
    elif name in _MODEL_BUILDERS:
        model = _MODEL_BUILDERS[name](**kwargs)
    else:
        raise ValueError(
            f"Unknown model {name!r}. Registered models: {', '.join(list_models())}; "
            f"any timm model is available as '{TIMM_PREFIX}<name>' (e.g. 'timm/efficientnet_b0')."
        )
    if weights is not None:
        load_weights(model, weights)
    return model


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights from a local state-dict file or a `ClassifierModule` checkpoint into `model`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Weights file {str(path)!r} does not exist.")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and "state_dict" in state:
        state = {k[len("net."):]: v for k, v in state["state_dict"].items() if k.startswith("net.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise RuntimeError(f"The weights in {str(path)!r} do not fit this model: {error}") from error
    return model
