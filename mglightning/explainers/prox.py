"""Proximal operators of the sparse penalties of Sparse and Group-Sparse MoreauGrad (paper section 5).

`soft_threshold` is the proximal operator of `a * ||v||_1` and `group_soft_threshold` that of
`a * sum_S ||v_S||_2`, the sum over `group_size x group_size` spatial blocks across all channels. The threshold
`a` is one number, or one per sample (a `(B,)` tensor: sample `i`'s entries `values[i]` use `a[i]`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_threshold(threshold: float | Tensor, values: Tensor) -> None:
    if isinstance(threshold, Tensor):
        if values.ndim == 0 or threshold.shape != (values.shape[0],):
            raise ValueError(
                f"a per-sample threshold must have shape (B,) with B = values.shape[0] (one per sample), got "
                f"{tuple(threshold.shape)} for values of shape {tuple(values.shape)}."
            )
        if not bool((threshold >= 0).all()):  # also rejects NaN
            raise ValueError(f"thresholds must be non-negative, got {threshold.tolist()}.")
    elif not threshold >= 0:  # also rejects NaN
        raise ValueError(f"threshold must be non-negative, got {threshold}.")


def _per_sample(threshold: float | Tensor, ndim: int) -> float | Tensor:
    """A per-sample `(B,)` threshold viewed to broadcast over the other `ndim - 1` dimensions; a number as it is."""
    return threshold.view(-1, *(1,) * (ndim - 1)) if isinstance(threshold, Tensor) else threshold


def soft_threshold(values: Tensor, threshold: float | Tensor) -> Tensor:
    """Elementwise soft threshold `ST_a(v) = sign(v) * max(|v| - a, 0)`.

    Args:
        values: any tensor.
        threshold: `a >= 0`, or a `(B,)` tensor of per-sample thresholds for `values` of shape `(B, ...)`.

    Returns:
        A new tensor shaped like `values`; entries with `|v| <= a` are exactly zero.

    Example:
        >>> soft_threshold(torch.tensor([-2.0, 0.5, 3.0]), 1.0)
        tensor([-1.,  0.,  2.])
        >>> soft_threshold(torch.tensor([[-2.0, 0.5], [-2.0, 0.5]]), torch.tensor([1.0, 0.25]))
        tensor([[-1.0000,  0.0000],
                [-1.7500,  0.2500]])
    """
    _check_threshold(threshold, values)
    return unchecked_soft_threshold(values, threshold)


def unchecked_soft_threshold(values: Tensor, threshold: float | Tensor) -> Tensor:
    """`soft_threshold` without the argument checks (a solver's inner loop: checking a tensor threshold's sign
    would synchronise with the device at every step)."""
    return torch.sign(values) * torch.clamp(values.abs() - _per_sample(threshold, values.ndim), min=0)


def check_group_size(shape: torch.Size | tuple[int, ...], group_size: int, owner: str | None = None) -> None:
    """Raise a `ValueError` (naming `owner` when given) unless `group_size` divides the height and width of a
    `(B, C, H, W)` shape."""
    prefix = "" if owner is None else f"{owner}: "
    if len(shape) != 4:
        raise ValueError(f"{prefix}Group soft thresholding needs (B, C, H, W) tensors, got shape {tuple(shape)}.")
    height, width = shape[-2:]
    if height % group_size or width % group_size:
        divisors = [d for d in range(1, min(height, width) + 1) if height % d == 0 and width % d == 0]
        raise ValueError(
            f"{prefix}group_size={group_size} must divide the image height {height} and width {width}; "
            f"choose one of {divisors}."
        )


def group_soft_threshold(values: Tensor, threshold: float | Tensor, group_size: int) -> Tensor:
    """Group soft threshold `GST_a(v_S) = max(1 - a / ||v_S||_2, 0) * v_S` over spatial blocks.

    Each group `S` is a `group_size x group_size` block of pixels across all channels, so a group is
    either zero in every channel or kept (shrunk) in every channel.

    Args:
        values: a `(B, C, H, W)` tensor; `H` and `W` must be multiples of `group_size`.
        threshold: `a >= 0`, or a `(B,)` tensor of per-sample thresholds.
        group_size: side of the square spatial blocks.

    Returns:
        A new tensor shaped like `values`; groups with `||v_S||_2 <= a` are exactly zero.

    Example:
        >>> v = torch.zeros(1, 1, 2, 4); v[..., :2] = 1.0        # left 2x2 block has norm 2
        >>> group_soft_threshold(v, 1.0, group_size=2)[0, 0]
        tensor([[0.5000, 0.5000, 0.0000, 0.0000],
                [0.5000, 0.5000, 0.0000, 0.0000]])
    """
    check_group_size(values.shape, group_size)
    _check_threshold(threshold, values)
    return unchecked_group_soft_threshold(values, threshold, group_size)


def unchecked_group_soft_threshold(values: Tensor, threshold: float | Tensor, group_size: int) -> Tensor:
    """`group_soft_threshold` without the argument checks (for a solver's inner loop, as
    `unchecked_soft_threshold`)."""
    blocks = _blocks(values, group_size)
    norms = torch.linalg.vector_norm(blocks, dim=(1, 3, 5), keepdim=True)
    # A zero block must map to zero even for threshold 0: guard the division instead of producing NaN.
    threshold = _per_sample(threshold, blocks.ndim)
    scale = torch.clamp(1 - threshold / norms.clamp_min(torch.finfo(values.dtype).tiny), min=0)
    return (blocks * scale).reshape(values.shape)


def group_norms(values: Tensor, group_size: int) -> Tensor:
    """The L2 norm `||v_S||_2` of every `group_size x group_size` block across all channels.

    Args:
        values: a `(B, C, H, W)` tensor; `H` and `W` must be multiples of `group_size`.
        group_size: side of the square spatial blocks.

    Returns:
        A `(B, H // group_size, W // group_size)` tensor.

    Example:
        >>> group_norms(torch.ones(1, 3, 2, 4), 2)
        tensor([[[3.4641, 3.4641]]])
    """
    check_group_size(values.shape, group_size)
    return torch.linalg.vector_norm(_blocks(values, group_size), dim=(1, 3, 5))


def _blocks(values: Tensor, group_size: int) -> Tensor:
    """`(B, C, H, W)` viewed as `(B, C, H / g, g, W / g, g)`."""
    batch, channels, height, width = values.shape
    return values.reshape(batch, channels, height // group_size, group_size, width // group_size, group_size)
