"""A small model registry in timm's manner: builders are stored by name and built with `create_model`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from torch import nn

from mglightning.models.weights import fit_state_dict, read_state_dict

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
        weights: optional path to a local file with the model's weights: a plain state dict (`torch.save`), a
            `.safetensors` file or a `train.py` checkpoint (its network's entries are used); read without
            running code (`mglightning.models.read_weights_file`).
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
    """Load the weights in `path` into `model` (strictly) and return it.

    `path` is a plain state dict (`torch.save(model.state_dict(), path)`), a `.safetensors` file or a
    `train.py` checkpoint (its network's entries), read by `read_weights_file`, so the file cannot run code.
    Weights that do not fit are a `ValueError` naming the file and the tensors that differ.
    """
    fit_state_dict(
        model, read_state_dict(path), path,
        hint="Build the model with the settings the weights were saved with (architecture, width, num_classes, ...).",
    )
    return model


def classifier_network(
    arch: str,
    *,
    num_classes: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    model_kwargs: dict | None = None,
) -> nn.Module:
    """The network that `ClassifierModule` trains, from its hyperparameters of the same names.

    `ClassifierModule` builds its network with it, and `build_classifier` rebuilds the network of a `train.py`
    checkpoint with it from the checkpoint's hyperparameters, so the two cannot disagree.
    """
    return create_model(
        arch,
        num_classes=num_classes,
        image_size=image_size,
        in_chans=len(mean),
        mean=tuple(mean),
        std=tuple(std),
        **(model_kwargs or {}),
    )
