"""Quantus (Hedström et al. 2023, "Quantus: an explainable AI toolkit for responsible evaluation of neural network
explanations and beyond") scoring mglightning's explainers: `explain_func`.

Quantus 0.6 calls `explain_func(model=model, inputs=x_batch, targets=y_batch, **explain_func_kwargs)` with numpy
arrays (its metrics add `device=` to the keywords when it is given to them), once per batch of its `batch_size`
samples and again for every perturbed or randomised copy it scores. `explain_func` takes exactly that and returns
the maps as a numpy array shaped like the inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mglightning.explainers import CaptumExplainer, Explainer, build_explainer
from mglightning.checks import check_inputs


def explain_func(
    model: nn.Module,
    inputs: np.ndarray | torch.Tensor,
    targets: np.ndarray | torch.Tensor | int,
    *,
    method: str = "simple_gradient",
    seeds: int | Sequence[int] | np.ndarray | torch.Tensor | None = None,
    device: str | torch.device | None = None,
    **settings: Any,
) -> np.ndarray:
    """The maps of one of our explainers for what Quantus passes, as a numpy array shaped like `inputs`.

    The explainer is built for the `model` of each call (Quantus's randomisation tests pass a copy with re-initialised
    layers), from `method` and its `settings` as `build_explainer(method, model, **settings)` builds it.

    **Seeds.** A noisy method (SmoothGrad, MoreauGrad's smoothing, ...) draws sample `i`'s noise from `seeds[i]`,
    which is by default `i`, **the sample's position in the batch Quantus passes**. Quantus passes a perturbed or
    randomised copy of a batch in the same order, so each sample keeps its noise across the calls and a robustness
    metric measures how the map moves with the input, not the explainer's fresh noise (which a new draw per call
    would add to every score). `seeds=s` (an int) uses `s + i`; a sequence gives one seed per sample.

    Args:
        model: the classifier (a `torch.nn.Module` taking `(B, C, H, W)` images), left in its train/eval mode.
        inputs: `(B, C, H, W)` images (numpy or torch), cast to the floating dtype of the model's parameters (e.g.
            Quantus's float64 perturbed copies for a float32 model) and moved to `device`.
        targets: the class explained for each sample: integers of any shape that squeezes to `(B,)`, or one int.
        method: a registry name (`mglightning.explainers.list_explainers()`, default `simple_gradient`) or the class
            path of a Captum method (e.g. `captum.attr.GuidedBackprop`, built as `CaptumExplainer`). With
            `quantus.evaluate`, whose `xai_methods` keys become `method=`, key them by these names.
        seeds: as above; default the positions `0..B-1`.
        device: where to compute (`"cpu"`, `"cuda"`, `"cuda:1"`; Quantus's `"gpu"` means `"cuda"`); the model must
            already be there. Default: the device of the model's parameters.
        **settings: the explainer's settings (e.g. `stdevs=0.1, nt_samples=8` for `smoothgrad`; `noise_tunnel=...`
            for a Captum method).

    Returns:
        The signed maps, a numpy array of shape `(B, C, H, W)` and the model's dtype.

    Example:
        >>> import quantus
        >>> metric = quantus.MaxSensitivity(nr_samples=10, lower_bound=0.05, disable_warnings=True)
        >>> scores = metric(model=model, x_batch=images, y_batch=labels, a_batch=None, device="cpu",
        ...                 explain_func=explain_func, explain_func_kwargs={"method": "smoothgrad", "stdevs": 0.1})
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"explain_func: model must be a torch.nn.Module, got {type(model).__name__}.")
    parameter = next((p for p in model.parameters() if p.is_floating_point()), None)
    model_device = parameter.device if parameter is not None else torch.device("cpu")
    device = _device(device, model_device)
    images = torch.as_tensor(inputs)
    if images.is_floating_point():
        images = images.to(parameter.dtype if parameter is not None else torch.get_default_dtype())
    images = images.to(device)
    check_inputs(images)
    if seeds is None or (isinstance(seeds, int) and not isinstance(seeds, bool)):
        seeds = torch.arange(images.shape[0]) + (seeds or 0)
    explainer = _explainer(method, model, settings)
    return explainer.attribute(images, targets, seeds=seeds).detach().cpu().numpy()


def _explainer(method: str, model: nn.Module, settings: dict[str, Any]) -> Explainer:
    if isinstance(method, str) and method.startswith("captum."):
        return CaptumExplainer(model, method, **settings)
    return build_explainer(method, model, **settings)


def _device(device: str | torch.device | None, model_device: torch.device) -> torch.device:
    """`device` as a `torch.device` (`None`: the model's), checked to be where the model's parameters are."""
    if device is None:
        return model_device
    wanted = torch.device("cuda" if device == "gpu" else device)
    same = wanted.type == model_device.type and wanted.index in (None, model_device.index)
    if not same:
        raise ValueError(
            f"explain_func: device={str(device)!r} but the model's parameters are on {model_device}; move the model "
            f"there first (model.to({str(wanted)!r})) or pass the model's device."
        )
    return wanted if wanted.index is not None else model_device
