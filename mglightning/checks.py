"""Argument checks shared by the explainers, the attacks and the metrics: the bottom floor of the package.

Each check raises a `ValueError` that names its owner (the class or function checked) and the fix, before any
computation. This module imports nothing from `mglightning`, so every subpackage may import it.

Example:
    >>> check_positive_int("MoreauGrad", "num_steps", 0)
    Traceback (most recent call last):
    ...
    ValueError: MoreauGrad: num_steps must be an integer >= 1, got 0.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn


def check_positive_int(owner: str, name: str, value: object, minimum: int = 1) -> None:
    """Raise a `ValueError` naming `owner` unless `value` is an int of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}.")


def check_number(owner: str, name: str, value: object, *, positive: bool = True) -> None:
    """Raise a `ValueError` naming `owner` unless `value` is a finite number, `> 0` (`positive`) or `>= 0`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}.")
    if positive and value <= 0:
        raise ValueError(f"{owner}: {name} must be > 0, got {value!r}.")
    if not positive and value < 0:
        raise ValueError(f"{owner}: {name} must be >= 0, got {value!r}.")


def check_share(owner: str, name: str, value: object) -> None:
    """Raise a `ValueError` naming `owner` unless `value` is a number in (0, 1] (a share of the entries)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{owner}: {name} is a share of the entries in (0, 1], got {value!r}.")


def check_flag(owner: str, name: str, value: object) -> None:
    """Raise a `ValueError` naming `owner` unless `value` is `True` or `False`."""
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: {name} must be True or False, got {value!r}.")


def check_choice(owner: str, name: str, value: object, choices: Sequence[object]) -> None:
    """Raise a `ValueError` naming `owner` unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {tuple(choices)}, got {value!r}.")


def check_internal_batch_size(owner: str, value: object) -> None:
    """Raise a `ValueError` naming `owner` unless `value` is `None`, `"auto"` or a positive int (the explainers'
    and metrics' `internal_batch_size`)."""
    if value is None or (isinstance(value, str) and value == "auto"):
        return
    if isinstance(value, str):
        raise ValueError(f"{owner}: internal_batch_size must be an integer >= 1, 'auto' or None, got {value!r}.")
    check_positive_int(owner, "internal_batch_size", value)


class AutogradDisabledError(RuntimeError, ValueError):
    """Autograd is off (`torch.inference_mode()`) where a method needs gradients. A `RuntimeError` (the call's
    context is wrong) that is also a `ValueError`, the attacks' error for a call they cannot run."""


def check_autograd(owner: str) -> None:
    """Raise `AutogradDisabledError` naming `owner` under `torch.inference_mode()`, which no gradient survives."""
    if torch.is_inference_mode_enabled():
        raise AutogradDisabledError(
            f"{owner} needs autograd, which torch.inference_mode() disables; call it outside it (with Lightning: "
            "Trainer(inference_mode=False))."
        )


def check_inputs(inputs: Tensor, model: nn.Module | None = None) -> None:
    """Raise a `ValueError` unless `inputs` is a non-empty, finite, floating `(B, C, H, W)` tensor, of the floating
    dtype of `model`'s parameters when a model is given (not checked under autocast, which casts itself)."""
    if isinstance(inputs, np.ndarray):
        raise ValueError(
            "inputs must be a torch.Tensor of shape (B, C, H, W), got a numpy array: convert it with "
            "torch.from_numpy(inputs) (with Quantus, use mglightning.integrations.quantus.explain_func, which does)."
        )
    if not isinstance(inputs, Tensor):
        raise ValueError(f"inputs must be a torch.Tensor of shape (B, C, H, W), got {type(inputs).__name__}.")
    if inputs.ndim != 4:
        raise ValueError(
            f"inputs must have shape (B, C, H, W), got {inputs.ndim} dimensions {tuple(inputs.shape)}; "
            "add a batch dimension with inputs.unsqueeze(0) for a single image."
        )
    if inputs.shape[0] == 0:
        raise ValueError("inputs is an empty batch.")
    if not inputs.is_floating_point():
        raise ValueError(f"inputs must be a floating tensor (images in [0, 1]), got {inputs.dtype}.")
    if not torch.isfinite(inputs).all():
        raise ValueError("inputs contains NaN or infinite values.")
    if model is not None and not torch.is_autocast_enabled(inputs.device.type):
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        if dtype is not None and inputs.dtype != dtype:
            raise ValueError(
                f"inputs are {inputs.dtype} but the model's parameters are {dtype}: cast the inputs with "
                f"inputs.to({dtype}) (or the model with model.to({inputs.dtype}))."
            )


def format_target(target: int | Tensor | np.ndarray, inputs: Tensor) -> Tensor:
    """`target` as a `(B,)` long tensor on the inputs' device, after checking its type, shape and sign.

    An int (or a 0-d integer tensor or array) is every sample's class; a tensor or numpy array of integers of
    any shape that squeezes to `(B,)` (e.g. Quantus's `(B,)` int32 arrays, or `(B, 1)` labels) gives one class
    per sample.
    """
    batch = inputs.shape[0]
    if isinstance(target, np.ndarray) and target.dtype.kind in "biufc":
        target = torch.tensor(target)
    if isinstance(target, np.integer):
        target = int(target)
    if isinstance(target, Tensor) and target.ndim == 0 and not (target.is_floating_point() or target.is_complex()):
        target = target.item()
    if isinstance(target, bool) or not isinstance(target, (int, Tensor)):
        raise ValueError(
            f"target must be an int or integer class indices (a tensor or numpy array of shape ({batch},)), "
            f"got {type(target).__name__}."
        )
    if isinstance(target, int):
        target = torch.full((batch,), target, dtype=torch.long)
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}.")
    if target.ndim != 1 and target.numel() == batch and target.squeeze().ndim <= 1:
        target = target.reshape(batch)  # (B, 1), (1, B), ...: all but one dimension of size 1
    if target.shape != (batch,):
        raise ValueError(
            f"target must be an int or have shape ({batch},) (one class per sample; shapes that squeeze to it, "
            f"like ({batch}, 1), are accepted), got {tuple(target.shape)}."
        )
    if (target < 0).any():
        raise ValueError(f"target must hold non-negative class indices, got {target.tolist()}.")
    return target.to(device=inputs.device, dtype=torch.long)


def format_seeds(seeds: Tensor | Sequence[int] | None, batch: int) -> Tensor | None:
    """`seeds` as a `(B,)` long CPU tensor (or `None`), after checking its type and length."""
    if seeds is None:
        return None
    seeds = torch.as_tensor(seeds)
    if seeds.is_floating_point() or seeds.is_complex() or seeds.dtype == torch.bool:
        raise ValueError(f"seeds must be an integer tensor, got dtype {seeds.dtype}.")
    if seeds.shape != (batch,):
        raise ValueError(f"seeds must have shape ({batch},) (one seed per sample), got {tuple(seeds.shape)}.")
    return seeds.to(device="cpu", dtype=torch.long)
