"""The paper's settings, in the normalised input space, converted to [0, 1] pixel units (docs/reference/semantics.md section 3).

The paper and the official code explain `f(x_n)` with `x_n = (x - mean) / s`; every mglightning model takes
pixels `x` and normalises in its first layer. For one std `s`, the substitution `z_n - x_n = (z - x) / s` turns
the normalised Moreau problem `f(z_n) + ||z_n - x_n||^2 / (2 rho_n) + eta_n ||z_n - x_n||_1` into the pixel
problem with

    rho_pix = rho_n * s^2,   step_size_pix = step_size_n * s^2,   eta_pix = eta_n / s,   epsilon_pix = epsilon_n * s

and every solver iterate maps exactly (`d_pix = s * d_n`, so the map is `MG_pix = MG_n / s`). An L2 budget is
a length: `epsilon_pix = epsilon_n * s`, and so is the attack's step. The official noise is
`sigma * (x_n.max() - x_n.min())`, a fraction of the input's range, i.e. about `sigma` in pixels: noise levels
are not converted.

**Per-channel std.** With a std per channel the exact pixel problem weights each channel's displacement by
`1 / s_c^2`, which a scalar `rho` cannot express. We use one scalar, the quadratic harmonic mean
`s = mean_c(s_c^-2)^(-1/2)`: it is exact for the squared norms (the proximity term, the budget, hence `rho`,
`step_size`, `epsilon`) of a displacement spread evenly over the channels. It lies between the smallest and
the largest `s_c`, below their arithmetic mean (CIFAR-10: 0.2503 for stds 0.2470/0.2435/0.2616; ImageNet: 0.2260
for 0.229/0.224/0.225), so a converted budget is, if anything, slightly small. For a grayscale image repeated to
3 channels all `s_c` are equal and the conversion is exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mglightning.models.layers import Normalize

PIXEL_EXPONENTS: dict[str, int] = {
    "rho": 2,
    "step_size": 2,
    "eta": -1,
    "epsilon": 1,
    "attack_step_size": 1,
}
"""Setting name -> power of the std `s` that converts it from normalised to pixel units (value * s**power)."""


def scalar_std(std: float | Sequence[float] | Tensor) -> float:
    """One std for the conversion: the value itself, or `mean_c(s_c^-2)^(-1/2)` over the channels' stds.

    Args:
        std: a positive number, or one positive number per channel (a sequence or a tensor of any shape,
            e.g. a `Normalize` layer's `(1, C, 1, 1)` buffer).

    Returns:
        The scalar std `s`.

    Example:
        >>> round(scalar_std((0.2470, 0.2435, 0.2616)), 4)   # CIFAR-10
        0.2503
        >>> scalar_std(0.5)
        0.5
    """
    values = torch.as_tensor(std, dtype=torch.float64).flatten()
    if values.numel() == 0 or not torch.isfinite(values).all() or (values <= 0).any():
        raise ValueError(f"std must be a positive number or one positive number per channel, got {std!r}.")
    return float(values.pow(-2).mean().pow(-0.5))


def model_std(model: nn.Module) -> tuple[float, ...]:
    """The per-channel std of the model's normalisation: its first `Normalize` layer (every mglightning classifier
    has one in front).

    Args:
        model: a classifier taking [0, 1] images.

    Returns:
        One std per input channel.

    Example:
        >>> model_std(create_model("resnet18", num_classes=10, width=8, std=(0.25, 0.25, 0.25)))
        (0.25, 0.25, 0.25)
    """
    for module in model.modules():
        if isinstance(module, Normalize):
            return tuple(float(value) for value in module.std.flatten())
    raise ValueError(
        f"{type(model).__name__} has no mglightning Normalize layer, so its input std is unknown; pass the "
        "dataset's std (the datamodule's `std`) to the conversion instead."
    )


def _convert(settings: Mapping[str, Any], std: float | Sequence[float] | Tensor, sign: int) -> dict[str, Any]:
    if not isinstance(settings, Mapping):
        raise ValueError(f"settings must be a mapping of setting names to values, got {type(settings).__name__}.")
    scale = scalar_std(std)
    converted = dict(settings)
    for name, value in settings.items():
        power = PIXEL_EXPONENTS.get(name)
        if power is None or value is None:
            continue
        factor = scale ** (sign * power)
        if isinstance(value, (list, tuple)):
            converted[name] = type(value)(_scaled(name, item, factor) for item in value)
        else:
            converted[name] = _scaled(name, value, factor)
    return converted


def _scaled(name: str, value: Any, factor: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number (or a list of them) to convert its units, got {value!r}.")
    return float(value) * factor


def to_pixel_units(settings: Mapping[str, Any], std: float | Sequence[float] | Tensor) -> dict[str, Any]:
    """Convert the paper's normalised-space settings to [0, 1] pixel units.

    Converts `rho` and `step_size` (times `s^2`), `eta` (divided by `s`), `epsilon` and `attack_step_size`
    (times `s`), each a number or a list of numbers; every other setting (`num_steps`, `noise_std`,
    `noise_samples`, `group_size`, ...) is copied unchanged. `s` is `scalar_std(std)`.

    Args:
        settings: setting name -> value, e.g. an explainer's `init_args` or `{"epsilon": [0.3, 1, 3, 10]}`.
        std: the dataset's std, a number or one per channel (the model's `Normalize.std`, a datamodule's `std`).

    Returns:
        A new dict with the converted values (floats).

    Example:
        >>> to_pixel_units({"rho": 1.0, "step_size": 0.1, "num_steps": 300, "eta": 0.005}, std=0.5)
        {'rho': 0.25, 'step_size': 0.025, 'num_steps': 300, 'eta': 0.01}
        >>> to_pixel_units({"epsilon": [1, 3]}, std=0.5)
        {'epsilon': [0.5, 1.5]}
    """
    return _convert(settings, std, sign=1)


def to_normalised_units(settings: Mapping[str, Any], std: float | Sequence[float] | Tensor) -> dict[str, Any]:
    """The inverse of `to_pixel_units`: pixel-unit settings expressed in the paper's normalised units.

    Args:
        settings: setting name -> value in [0, 1] pixel units.
        std: the dataset's std, a number or one per channel.

    Returns:
        A new dict with `rho`, `step_size`, `eta`, `epsilon` and `attack_step_size` converted.

    Example:
        >>> to_normalised_units({"rho": 0.25, "epsilon": 0.5}, std=0.5)
        {'rho': 1.0, 'epsilon': 1.0}
    """
    return _convert(settings, std, sign=-1)
