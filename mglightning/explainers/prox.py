"""Proximal operators of the sparse penalties of Sparse and Group-Sparse MoreauGrad (paper section 5).

`soft_threshold` is the proximal operator of `a * ||v||_1` and `group_soft_threshold` that of
`a * sum_S ||v_S||_2`, the sum over `group_size x group_size` spatial blocks across all channels.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_threshold(threshold: float) -> None:
    if not threshold >= 0:  # also rejects NaN
        raise ValueError(f"threshold must be non-negative, got {threshold}.")


def soft_threshold(values: Tensor, threshold: float) -> Tensor:
    """Elementwise soft threshold `ST_a(v) = sign(v) * max(|v| - a, 0)`.

    Args:
        values: any tensor.
        threshold: `a >= 0`.

    Returns:
        A new tensor shaped like `values`; entries with `|v| <= a` are exactly zero.

    Example:
        >>> soft_threshold(torch.tensor([-2.0, 0.5, 3.0]), 1.0)
        tensor([-1.,  0.,  2.])
    """
    _check_threshold(threshold)
    return torch.sign(values) * torch.clamp(values.abs() - threshold, min=0)


def check_group_size(shape: torch.Size | tuple[int, ...], group_size: int) -> None:
    """Raise a `ValueError` unless `group_size` divides the height and width of a `(B, C, H, W)` shape."""
    if len(shape) != 4:
        raise ValueError(f"Group soft thresholding needs (B, C, H, W) tensors, got shape {tuple(shape)}.")
    height, width = shape[-2:]
    if height % group_size or width % group_size:
        divisors = [d for d in range(1, min(height, width) + 1) if height % d == 0 and width % d == 0]
        raise ValueError(
            f"group_size={group_size} must divide the image height {height} and width {width}; "
            f"choose one of {divisors}."
        )


def group_soft_threshold(values: Tensor, threshold: float, group_size: int) -> Tensor:
    """Group soft threshold `GST_a(v_S) = max(1 - a / ||v_S||_2, 0) * v_S` over spatial blocks.

    Each group `S` is a `group_size x group_size` block of pixels across all channels, so a group is
    either zero in every channel or kept (shrunk) in every channel.

    Args:
        values: a `(B, C, H, W)` tensor; `H` and `W` must be multiples of `group_size`.
        threshold: `a >= 0`.
        group_size: side of the square spatial blocks.

    Returns:
        A new tensor shaped like `values`; groups with `||v_S||_2 <= a` are exactly zero.

    Example:
        >>> v = torch.zeros(1, 1, 2, 4); v[..., :2] = 1.0        # left 2x2 block has norm 2
        >>> group_soft_threshold(v, 1.0, group_size=2)[0, 0]
        tensor([[0.5000, 0.5000, 0.0000, 0.0000],
                [0.5000, 0.5000, 0.0000, 0.0000]])
    """
    _check_threshold(threshold)
    check_group_size(values.shape, group_size)
    batch, channels, height, width = values.shape
    blocks = values.reshape(batch, channels, height // group_size, group_size, width // group_size, group_size)
    norms = torch.linalg.vector_norm(blocks, dim=(1, 3, 5), keepdim=True)
    # A zero block must map to zero even for threshold 0: guard the division instead of producing NaN.
    scale = torch.clamp(1 - threshold / norms.clamp_min(torch.finfo(values.dtype).tiny), min=0)
    return (blocks * scale).reshape(values.shape)
