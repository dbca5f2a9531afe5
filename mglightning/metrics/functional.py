"""Functional forms of the robustness and structure metrics (docs/reference/semantics.md section 6).

Every public function takes signed attribution maps ``(B, C, H, W)``, takes their magnitudes itself and
returns one value per sample, shape ``(B,)``, so callers can keep per-sample numbers. The metric classes in
:mod:`mglightning.metrics` reduce the same per-sample values with sum/count states, through the private
``_*_update`` and ``_mean_compute`` functions below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mglightning.checks import check_share

# SaliencySSIM's settings (docs/reference/semantics.md section 6), the same as scikit-image's
# structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1).
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_WINDOW = 2 * int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5) + 1  # 11, as scipy.ndimage sizes the filter
SSIM_DATA_RANGE = 1.0
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check_maps(maps: Tensor, name: str = "maps") -> None:
    """Raise a ValueError unless ``maps`` is a finite floating tensor shaped (B, C, H, W)."""
    if not isinstance(maps, Tensor):
        raise ValueError(
            f"`{name}` must be a torch.Tensor of attribution maps (B, C, H, W), got {type(maps).__name__}."
        )
    if maps.ndim != 4:
        raise ValueError(
            f"`{name}` must be a batch of attribution maps shaped (B, C, H, W), got shape {tuple(maps.shape)}; "
            "add the batch/channel dimensions with `unsqueeze` if you have a single map."
        )
    if not maps.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor, got dtype {maps.dtype}.")
    if not torch.isfinite(maps).all():
        raise ValueError(f"`{name}` contains NaN or infinite values; check the explainer that produced it.")


def _check_map_pair(original: Tensor, attacked: Tensor) -> None:
    """Validate the two map batches compared by a robustness metric."""
    _check_maps(original, "original")
    _check_maps(attacked, "attacked")
    if original.shape != attacked.shape:
        raise ValueError(
            "`original` and `attacked` must have the same shape (B, C, H, W), "
            f"got {tuple(original.shape)} and {tuple(attacked.shape)}."
        )


def _flat_magnitudes(maps: Tensor) -> Tensor:
    """``|maps|`` flattened per sample to ``(B, C*H*W)``."""
    return maps.detach().abs().flatten(1)


def _mean_compute(total: Tensor, count: Tensor) -> Tensor:
    """Mean over samples from the sum/count states (NaN before any sample was seen)."""
    return total / count


def topk_count(maps: Tensor, fraction: float = 0.4) -> Tensor:
    """Per-sample ``k = max(1, floor(fraction * nnz(|maps|)))`` (docs/reference/semantics.md section 6).

    The product is taken in float64, exactly as Python's ``int(fraction * nnz)`` in the official code.

    Args:
        maps: signed maps ``(B, C, H, W)``.
        fraction: share of the non-zero entries to keep, in (0, 1]. Default 0.4.

    Returns:
        A ``(B,)`` long tensor.

    Example:
        >>> topk_count(torch.tensor([[[[0.0, 1.0, -2.0, 3.0, 4.0, 5.0]]]]), 0.4)
        tensor([2])
    """
    _check_maps(maps)
    check_share("topk_count", "fraction", fraction)
    nonzero = (maps.detach() != 0).flatten(1).sum(dim=1)
    return torch.floor(nonzero.double() * fraction).long().clamp_min(1)


def topk_mask(maps: Tensor, k: Tensor) -> Tensor:
    """Boolean mask of each sample's top-``k`` entries of ``|maps|`` (docs/reference/semantics.md section 6).

    The top-k set never holds an exact zero, so a map with fewer than ``k`` non-zero entries marks just
    those; ties among equal values are broken by the lower flat index (``C, H, W`` order).

    Args:
        maps: signed maps ``(B, C, H, W)``.
        k: per-sample set sizes, an int or a ``(B,)`` integer tensor (see :func:`topk_count`).

    Returns:
        A bool tensor shaped like ``maps``.

    Example:
        >>> maps = torch.tensor([[[[0.0, 2.0, -2.0, 1.0]]]])
        >>> topk_mask(maps, 2).flatten().tolist()
        [False, True, True, False]
    """
    _check_maps(maps)
    magnitudes = _flat_magnitudes(maps)
    batch, size = magnitudes.shape
    k = torch.as_tensor(k, device=magnitudes.device).long()
    if k.shape not in ((), (batch,)):
        raise ValueError(
            f"`k` must be an int or a ({batch},) tensor (one size per sample), got shape {tuple(k.shape)}."
        )
    k = k.expand(batch)
    # A stable descending sort keeps equal values in index order, so the lower flat index ranks first.
    sorted_values, order = torch.sort(magnitudes, dim=1, descending=True, stable=True)
    rank = torch.arange(size, device=magnitudes.device).expand(batch, size)
    keep_sorted = (rank < k[:, None]) & (sorted_values > 0)
    mask = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    return mask.view(maps.shape)


def _normalized_distance_update(original: Tensor, attacked: Tensor) -> Tensor:
    _check_map_pair(original, attacked)
    a, b = _flat_magnitudes(original), _flat_magnitudes(attacked)
    a_norm, b_norm = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    # An all-zero map stays the zero vector after "normalisation", so its distance to any non-zero
    # (unit-norm) map is exactly 1 and to another all-zero map 0 (docs/reference/semantics.md section 6).
    a_unit = torch.where(a_norm > 0, a / a_norm.clamp_min(torch.finfo(a.dtype).tiny), torch.zeros_like(a))
    b_unit = torch.where(b_norm > 0, b / b_norm.clamp_min(torch.finfo(b.dtype).tiny), torch.zeros_like(b))
    return (a_unit - b_unit).norm(dim=1)


def normalized_distance(original: Tensor, attacked: Tensor) -> Tensor:
    """Per-sample ``|| a/||a||_2 - b/||b||_2 ||_2`` of the flattened magnitude maps (paper eq. 6).

    In [0, 2]; lower means a more robust interpretation. An all-zero map is at distance 1 from any
    non-zero map and 0 from another all-zero map.

    Args:
        original: clean signed maps ``(B, C, H, W)``.
        attacked: attacked signed maps, same shape.

    Returns:
        A ``(B,)`` tensor.

    Example:
        >>> a = torch.tensor([[[[3.0, 4.0]]]])
        >>> normalized_distance(a, -2 * a)
        tensor([0.])
    """
    return _normalized_distance_update(original, attacked)


def _topk_intersection_update(original: Tensor, attacked: Tensor, fraction: float) -> Tensor:
    _check_map_pair(original, attacked)
    check_share("topk_intersection", "fraction", fraction)
    k = topk_count(original, fraction)
    shared = (topk_mask(original, k) & topk_mask(attacked, k)).flatten(1).sum(dim=1)
    # Divided by k (as the official code divides by TOPK): an all-zero original map scores 0.
    return shared.to(original.dtype) / k.to(original.dtype)


def topk_intersection(original: Tensor, attacked: Tensor, fraction: float = 0.4) -> Tensor:
    """Per-sample share of the original map's top-k entries that are also in the attacked map's top-k.

    ``k = max(1, floor(fraction * nnz(|original|)))`` is taken from the original map and used for both maps;
    the sets follow :func:`topk_mask` (no zeros, ties to the lower flat index). The count is divided by
    ``k``, so an all-zero original map scores 0. Higher means a more robust interpretation.

    Args:
        original: clean signed maps ``(B, C, H, W)``.
        attacked: attacked signed maps, same shape.
        fraction: share of the original map's non-zero entries in the top-k set, in (0, 1]. Default 0.4.

    Returns:
        A ``(B,)`` tensor with values in [0, 1].

    Example:
        >>> a = torch.tensor([[[[5.0, 4.0, 3.0, 2.0, 1.0]]]])
        >>> topk_intersection(a, a.flip(-1), fraction=0.4)
        tensor([0.])
    """
    return _topk_intersection_update(original, attacked, fraction)


def _gaussian_window(dtype: torch.dtype, device: torch.device) -> Tensor:
    """The normalised 11x11 Gaussian window (sigma 1.5), the same taps as scipy.ndimage.gaussian_filter."""
    radius = SSIM_WINDOW // 2
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    taps = taps / taps.sum()
    return torch.outer(taps, taps).to(dtype=dtype, device=device)


def _scale_by_max(maps: Tensor) -> Tensor:
    """``|maps|`` divided by each sample's maximum; an all-zero map stays zero."""
    magnitudes = maps.detach().abs()
    peak = magnitudes.flatten(1).amax(dim=1).view(-1, 1, 1, 1)
    return torch.where(peak > 0, magnitudes / peak.clamp_min(torch.finfo(maps.dtype).tiny), magnitudes)


def _saliency_ssim_update(original: Tensor, attacked: Tensor) -> Tensor:
    _check_map_pair(original, attacked)
    batch, channels, height, width = original.shape
    if height < SSIM_WINDOW or width < SSIM_WINDOW:
        raise ValueError(
            f"SaliencySSIM needs maps of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels (its Gaussian window), "
            f"got {height}x{width}."
        )
    x = _scale_by_max(original).reshape(batch * channels, 1, height, width)
    y = _scale_by_max(attacked).reshape(batch * channels, 1, height, width)
    # The five local moments in one grouped convolution. A "valid" convolution (no padding) gives exactly
    # the region scikit-image averages over: it filters with reflect padding and then crops (win-1)/2
    # pixels from every border, i.e. keeps only the positions whose window lies inside the image.
    stacked = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    window = _gaussian_window(original.dtype, original.device).expand(5, 1, SSIM_WINDOW, SSIM_WINDOW)
    mu_x, mu_y, mu_xx, mu_yy, mu_xy = F.conv2d(stacked, window, groups=5).unbind(dim=1)
    var_x = mu_xx - mu_x * mu_x
    var_y = mu_yy - mu_y * mu_y
    cov_xy = mu_xy - mu_x * mu_y
    c1 = (SSIM_K1 * SSIM_DATA_RANGE) ** 2
    c2 = (SSIM_K2 * SSIM_DATA_RANGE) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    # Every channel has the same number of valid positions, so the mean over (channel, position) equals the
    # mean over channels of the per-channel SSIM.
    return ssim_map.reshape(batch, -1).mean(dim=1)


def saliency_ssim(original: Tensor, attacked: Tensor) -> Tensor:
    """Per-sample SSIM of the two magnitude maps, each scaled by its own maximum (docs/reference/semantics.md section 6).

    SSIM with an 11x11 Gaussian window (sigma 1.5), ``data_range=1``, population covariances, computed per
    channel and averaged, over the positions whose window lies inside the image. This equals
    ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1, channel_axis=0)`` on each sample. Maps must be at least 11x11.
    Two all-zero maps have SSIM 1. Higher means a more robust interpretation.

    Args:
        original: clean signed maps ``(B, C, H, W)``.
        attacked: attacked signed maps, same shape.

    Returns:
        A ``(B,)`` tensor.

    Example:
        >>> a = torch.rand(2, 1, 32, 32)
        >>> saliency_ssim(a, 3 * a)
        tensor([1., 1.])
    """
    return _saliency_ssim_update(original, attacked)


def _sparsity_update(maps: Tensor) -> tuple[Tensor, Tensor]:
    _check_maps(maps)
    magnitudes = _flat_magnitudes(maps)
    size = magnitudes.shape[1]
    ascending, _ = torch.sort(magnitudes, dim=1)
    # Gini index of the sorted magnitudes: sum_i (2i - n - 1) a_(i) / (n * sum a), i = 1..n.
    weights = 2 * torch.arange(1, size + 1, device=maps.device, dtype=maps.dtype) - size - 1
    total = magnitudes.sum(dim=1)
    gini = (ascending * weights).sum(dim=1) / (size * total.clamp_min(torch.finfo(maps.dtype).tiny))
    zero_share = (magnitudes == 0).sum(dim=1).to(maps.dtype) / size
    return gini, zero_share


def gini_index(maps: Tensor) -> Tensor:
    """Per-sample Gini index of the flattened magnitude map (Quantus's ``Sparseness``).

    ``G = sum_i (2i - n - 1) a_(i) / (n sum_i a_i)`` over the ascending magnitudes ``a_(1..n)``: 0 for a
    uniform map, ``1 - 1/n`` for a single non-zero entry. Quantus adds 1e-7 to every entry to avoid 0/0; here
    an all-zero map is defined as 0 instead, so the index does not depend on the map's scale.

    Args:
        maps: signed maps ``(B, C, H, W)``.

    Returns:
        A ``(B,)`` tensor with values in [0, 1).

    Example:
        >>> gini_index(torch.tensor([[[[0.0, 0.0, 0.0, 2.0]]]]))
        tensor([0.7500])
    """
    return _sparsity_update(maps)[0]


def zero_fraction(maps: Tensor) -> Tensor:
    """Per-sample share of exactly-zero entries of the map.

    Args:
        maps: signed maps ``(B, C, H, W)``.

    Returns:
        A ``(B,)`` tensor with values in [0, 1].

    Example:
        >>> zero_fraction(torch.tensor([[[[0.0, -1.0, 0.0, 2.0]]]]))
        tensor([0.5000])
    """
    return _sparsity_update(maps)[1]


__all__ = [
    "gini_index",
    "normalized_distance",
    "saliency_ssim",
    "topk_count",
    "topk_intersection",
    "topk_mask",
    "zero_fraction",
]
