"""Saliency-map figures: grids of clean and attacked maps (the paper's Figure 5, an evaluation's saliency grid),
rows of maps of any methods and settings (the paper's Figures 2, 4 and 7, `mglightning.paper_figures`), and
TensorBoard image grids.

Every map is drawn as `|map|` reduced over channels and scaled by its own maximum (`normalised_magnitude`), in a
perceptual colormap, with one colour bar that reads the maps' common 0..1 scale.
"""

from __future__ import annotations

import textwrap
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from torch import Tensor
from torchvision.utils import make_grid

from mglightning.reporting.figures import MOREAUGRAD_COLOUR, new_figure
from mglightning.reporting.tables import format_number

__all__ = ["MapRow", "map_rows_figure", "normalised_magnitude", "saliency_grid", "saliency_image_grid"]

_CHANNEL_REDUCTIONS = ("sum", "max")
# Inputs a little outside [0, 1] are float round-off of a clamp; anything further is a normalised image.
_PIXEL_RANGE_TOLERANCE = 1e-3


def normalised_magnitude(maps: torch.Tensor, channel_reduction: str = "sum") -> torch.Tensor:
    """Per-pixel magnitude of a batch of signed maps, each scaled by its own maximum to [0, 1].

    Args:
        maps: ``(N, C, H, W)`` attribution maps.
        channel_reduction: ``"sum"`` or ``"max"`` of ``|map|`` over channels.

    Returns:
        ``(N, H, W)`` float tensor on the CPU; an all-zero map stays all zero.

    Example:
        >>> normalised_magnitude(torch.tensor([[[[-2.0, 1.0]]]])).tolist()
        [[[1.0, 0.5]]]
    """
    if channel_reduction not in _CHANNEL_REDUCTIONS:
        raise ValueError(
            f"channel_reduction must be one of {list(_CHANNEL_REDUCTIONS)}, got {channel_reduction!r}."
        )
    if not isinstance(maps, torch.Tensor) or maps.dim() != 4:
        shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise ValueError(f"maps must be a (N, C, H, W) tensor, got {shape}.")
    magnitude = maps.detach().to("cpu", torch.float32).abs()
    magnitude = magnitude.sum(dim=1) if channel_reduction == "sum" else magnitude.amax(dim=1)
    peak = magnitude.flatten(1).amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    return magnitude / peak[:, None, None]


def saliency_image_grid(
    maps: torch.Tensor,
    cmap: str = "inferno",
    channel_reduction: str = "sum",
    nrow: int = 8,
    padding: int = 2,
) -> torch.Tensor:
    """Colour a batch of maps (magnitude, each scaled by its maximum) and tile them into one image.

    Args:
        maps: ``(N, C, H, W)`` signed attribution maps.
        cmap: matplotlib colormap name.
        channel_reduction: ``"sum"`` or ``"max"`` of ``|map|`` over channels.
        nrow: maps per row of the grid.
        padding: white pixels between maps.

    Returns:
        ``(3, H', W')`` float tensor in [0, 1], ready for ``SummaryWriter.add_image``.

    Example:
        >>> writer.add_image("test/moreaugrad/clean_maps", saliency_image_grid(maps))  # doctest: +SKIP
    """
    _check_colormap(cmap)
    magnitude = normalised_magnitude(maps, channel_reduction)
    coloured = colormaps[cmap](magnitude.numpy())[..., :3]  # (N, H, W, 3) RGB in [0, 1]
    images = torch.from_numpy(coloured).permute(0, 3, 1, 2).float()
    return make_grid(images, nrow=nrow, padding=padding, pad_value=1.0)


def _check_colormap(cmap: str) -> None:
    if cmap not in colormaps:
        raise ValueError(f"unknown colormap {cmap!r}; use a matplotlib colormap name such as 'inferno'.")


def _check_images(name: str, images: torch.Tensor, expected_shape: torch.Size | None) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a (N, C, H, W) tensor, got {shape}.")
    if expected_shape is not None and images.shape != expected_shape:
        raise ValueError(f"{name} has shape {tuple(images.shape)} but inputs have {tuple(expected_shape)}.")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"{name} has {images.shape[1]} channels; only 1 (grayscale) or 3 (RGB) can be drawn.")
    low, high = images.min().item(), images.max().item()
    if low < -_PIXEL_RANGE_TOLERANCE or high > 1 + _PIXEL_RANGE_TOLERANCE:
        raise ValueError(
            f"{name} range from {low:.3g} to {high:.3g}, but images must be in [0, 1] "
            "(normalisation is the model's first layer, docs/reference/semantics.md section 1): pass the unnormalised pixels."
        )


def _check_maps(name: str, maps: torch.Tensor, inputs: torch.Tensor) -> None:
    if not isinstance(maps, torch.Tensor) or maps.dim() != 4:
        shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise ValueError(f"{name} must be a (N, C, H, W) tensor, got {shape}.")
    same_layout = maps.shape[0] == inputs.shape[0] and maps.shape[2:] == inputs.shape[2:]
    if not same_layout or maps.shape[1] not in (1, inputs.shape[1]):
        raise ValueError(
            f"{name} has shape {tuple(maps.shape)} but inputs have {tuple(inputs.shape)}; "
            "a map must match its inputs' batch size and height and width (1 channel or the inputs' channels)."
        )
    if not torch.isfinite(maps).all():
        raise ValueError(f"{name} holds NaN or infinite values; the explainer that produced it is broken.")


def _show_image(ax: Any, image: torch.Tensor) -> None:
    pixels = image.detach().to("cpu", torch.float32).clamp(0, 1)
    if pixels.shape[0] == 1:
        ax.imshow(pixels[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(pixels.permute(1, 2, 0).numpy(), interpolation="nearest")


def _blank_axes(ax: Any) -> None:
    """No ticks or frame, but keep the axis so its y label (the row name) still shows."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _class_text(index: int, class_names: Sequence[str] | None) -> str:
    return class_names[index] if class_names is not None and 0 <= index < len(class_names) else str(index)


def saliency_grid(
    inputs: torch.Tensor,
    attacked_inputs: Mapping[str, torch.Tensor],
    clean_maps: Mapping[str, torch.Tensor],
    attacked_maps: Mapping[str, torch.Tensor],
    labels: torch.Tensor | None = None,
    predictions: torch.Tensor | None = None,
    class_names: Sequence[str] | None = None,
    sample_ids: Sequence[int] | torch.Tensor | None = None,
    num_samples: int = 3,
    sample_indices: Sequence[int] | None = None,
    methods: Sequence[str] | None = None,
    channel_reduction: str = "sum",
    cmap: str = "inferno",
    show_attacked_inputs: bool = True,
    title: str | None = None,
    method_names: Mapping[str, str] | None = None,
    highlight: Collection[str] | None = None,
) -> Figure:
    """Clean and attacked saliency maps side by side, like Figure 5 of the MoreauGrad paper.

    One column per method (plus a first column with the clean input) and, for each sample, the rows
    "original" (clean map), "attacked" (map of the attacked input) and "attacked input" (each method's own
    attacked image, captioned with the L2 size of its perturbation). Maps show ``|map|`` reduced over
    channels, each scaled by its own maximum, in a perceptual colormap. The clean input's title gives the
    sample's id (its dataset index, say), its label and its prediction (red when they differ).

    Args:
        inputs: ``(N, C, H, W)`` clean images in [0, 1], ``C`` 1 or 3.
        attacked_inputs: ``{method: (N, C, H, W)}`` each method's attacked images.
        clean_maps: ``{method: (N, C, H, W)}`` signed maps of the clean images.
        attacked_maps: ``{method: (N, C, H, W)}`` signed maps of that method's attacked images.
        labels: optional ``(N,)`` true classes.
        predictions: optional ``(N,)`` predicted classes.
        class_names: optional names indexed by class.
        sample_ids: optional ``(N,)`` ids shown in the captions (e.g. dataset indices); default the row in
            ``inputs``.
        num_samples: how many samples to draw (the first ones) when ``sample_indices`` is not given.
        sample_indices: which samples (rows of ``inputs``) to draw.
        methods: which methods to draw, in this order; default all of ``clean_maps``.
        channel_reduction: ``"sum"`` or ``"max"`` of ``|map|`` over channels.
        cmap: matplotlib colormap for the maps.
        show_attacked_inputs: draw the "attacked input" rows (the paper's figure has only the two map rows).
        title: optional figure title.
        method_names: optional display name of each method for the column titles (default the key).
        highlight: methods whose titles are drawn in the MoreauGrad colour.

    Returns:
        A :class:`~matplotlib.figure.Figure` (Agg canvas, not registered with pyplot).

    Example:
        >>> figure = saliency_grid(images, attacked, clean_maps, attacked_maps, labels=labels,
        ...                        predictions=predictions, class_names=["cat", "dog"])  # doctest: +SKIP
        >>> save_figure(figure, "logs/eval/saliency_grid.png")  # doctest: +SKIP
    """
    _check_images("inputs", inputs, None)
    _check_colormap(cmap)
    methods = list(clean_maps) if methods is None else list(methods)
    if not methods:
        raise ValueError("no methods to draw: clean_maps is empty (or methods=[]).")
    for source_name, source in (
        ("clean_maps", clean_maps),
        ("attacked_maps", attacked_maps),
        ("attacked_inputs", attacked_inputs),
    ):
        absent = [method for method in methods if method not in source]
        if absent:
            raise ValueError(f"{source_name} lacks the methods {absent}; every drawn method needs an entry.")
    for method in methods:
        _check_images(f"attacked_inputs[{method!r}]", attacked_inputs[method], inputs.shape)
        _check_maps(f"clean_maps[{method!r}]", clean_maps[method], inputs)
        _check_maps(f"attacked_maps[{method!r}]", attacked_maps[method], inputs)
    batch = inputs.shape[0]
    labels = None if labels is None else torch.as_tensor(labels).cpu()
    predictions = None if predictions is None else torch.as_tensor(predictions).cpu()
    sample_ids = torch.arange(batch) if sample_ids is None else torch.as_tensor(sample_ids).cpu()
    for name, classes in (("labels", labels), ("predictions", predictions), ("sample_ids", sample_ids)):
        if classes is not None and tuple(classes.shape) != (batch,):
            raise ValueError(f"{name} must have shape ({batch},), one class per input, got {tuple(classes.shape)}.")
    if sample_indices is None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}.")
        sample_indices = list(range(min(num_samples, batch)))
    sample_indices = [int(index) for index in sample_indices]
    if not sample_indices or any(not 0 <= index < batch for index in sample_indices):
        raise ValueError(f"sample_indices must be a non-empty list of indices in [0, {batch}), got {sample_indices}.")

    # Only the drawn samples move to the CPU, whatever device the evaluation ran on.
    inputs = inputs.detach()[sample_indices].to("cpu", torch.float32)
    attacked_inputs = {m: attacked_inputs[m].detach()[sample_indices].to("cpu", torch.float32) for m in methods}

    row_names = ["original", "attacked"] + (["attacked input"] if show_attacked_inputs else [])
    magnitudes = {
        method: (
            normalised_magnitude(clean_maps[method][sample_indices], channel_reduction),
            normalised_magnitude(attacked_maps[method][sample_indices], channel_reduction),
        )
        for method in methods
    }
    columns = 1 + len(methods)
    cell = 1.3
    # A thin empty row between samples keeps each sample's block apart.
    height_ratios: list[float] = []
    for position in range(len(sample_indices)):
        height_ratios += ([0.12] if position else []) + [1.0] * len(row_names)
    figure = new_figure(cell * columns + 1.0, cell * sum(height_ratios) + 0.9)
    grid = figure.add_gridspec(len(height_ratios), columns, height_ratios=height_ratios)

    map_axes = []
    for position, index in enumerate(sample_indices):
        first_row = position * (len(row_names) + 1)
        for offset, row_name in enumerate(row_names):
            ax = figure.add_subplot(grid[first_row + offset, 0])
            _blank_axes(ax)
            ax.set_ylabel(row_name, fontsize=9)
            if offset == 0:
                _show_image(ax, inputs[position])
                caption, colour = _sample_caption(index, int(sample_ids[index]), labels, predictions, class_names)
                ax.set_title(caption, fontsize=8, color=colour)
        for column, method in enumerate(methods, start=1):
            clean, attacked = magnitudes[method]
            for offset, row_name in enumerate(row_names):
                ax = figure.add_subplot(grid[first_row + offset, column])
                _blank_axes(ax)
                if row_name == "attacked input":
                    _show_image(ax, attacked_inputs[method][position])
                    shift = (attacked_inputs[method][position] - inputs[position]).norm().item()
                    ax.set_xlabel(f"‖δ‖₂ = {format_number(shift)}" if shift > 0 else "not moved", fontsize=7)
                else:
                    magnitude = clean if row_name == "original" else attacked
                    ax.imshow(magnitude[position].numpy(), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
                    map_axes.append(ax)
                if position == 0 and offset == 0:
                    label = textwrap.fill((method_names or {}).get(method, method), width=14)
                    colour = MOREAUGRAD_COLOUR if method in (highlight or ()) else "black"
                    ax.set_title(label, fontsize=9, color=colour, fontweight="bold")

    colourbar = figure.colorbar(
        ScalarMappable(norm=Normalize(0, 1), cmap=cmap), ax=map_axes, shrink=0.5, aspect=30, pad=0.01
    )
    colourbar.set_label(f"|attribution| ({channel_reduction} over channels) / its maximum", fontsize=8)
    if title:
        figure.suptitle(title)
    return figure


def _sample_caption(
    index: int,
    sample_id: int,
    labels: torch.Tensor | None,
    predictions: torch.Tensor | None,
    class_names: Sequence[str] | None,
) -> tuple[str, str]:
    """Title of a sample's clean input and its colour: red when the model misclassifies the sample."""
    lines = [f"sample {sample_id}"]
    if labels is not None:
        lines.append(f"label: {_class_text(int(labels[index]), class_names)}")
    if predictions is not None:
        lines.append(f"pred: {_class_text(int(predictions[index]), class_names)}")
    wrong = labels is not None and predictions is not None and int(labels[index]) != int(predictions[index])
    return "\n".join(lines), ("#C00000" if wrong else "black")



@dataclass
class MapRow:
    """One row of a map figure: an input image with its caption, then `(title, map)` cells."""

    image: Tensor
    caption: str
    cells: list[tuple[str, Tensor]]
    caption_colour: str = "black"


def map_rows_figure(rows: Sequence[MapRow], title: str | None = None, cmap: str = "inferno") -> Figure:
    """Rows of saliency maps, each row an input and its maps (`|map|` summed over channels, scaled to [0, 1]),
    with a colour bar that reads the maps' scale.

    Args:
        rows: the rows; each cell's title is drawn above it (rows may have different columns).
        title: optional figure title.
        cmap: matplotlib colormap of the maps.

    Example:
        >>> figure = map_rows_figure([MapRow(image, "sample 3", [("gradient", grad_map)])])  # doctest: +SKIP
    """
    columns = 1 + max(len(row.cells) for row in rows)
    figure = new_figure(1.45 * columns, 1.7 * len(rows) + (0.4 if title else 0))
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for r, row in enumerate(rows):
        _show_image(axes[r, 0], row.image)
        axes[r, 0].set_title(row.caption, fontsize=7, color=row.caption_colour)
        for c, (cell_title, attribution) in enumerate(row.cells, start=1):
            magnitude = normalised_magnitude(attribution.unsqueeze(0))[0]
            axes[r, c].imshow(magnitude.numpy(), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            axes[r, c].set_title(cell_title, fontsize=7)
    # Every map is drawn on the same 0..1 scale, so one colour bar serves them all.
    colourbar = figure.colorbar(
        ScalarMappable(norm=Normalize(0, 1), cmap=cmap), ax=axes[:, 1:].ravel().tolist(), shrink=0.6, aspect=30,
        pad=0.01,
    )
    colourbar.set_label("|attribution| (sum over channels) / its maximum", fontsize=7)
    colourbar.ax.tick_params(labelsize=7)
    if title:
        figure.suptitle(title, fontsize=9)
    return figure
