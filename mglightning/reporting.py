"""Results files, figures and TensorBoard output of an interpretation-robustness evaluation (SPEC section 7).

The evaluator computes one dict of numbers per explainer method and calls these functions once, on rank 0,
at the end of the run:

- :func:`write_results` writes ``results.json``, ``results.csv`` and ``results.md``;
  :func:`format_results_table` returns the markdown table alone (the CLI prints it).
- :func:`robustness_bar_chart` draws the paper's Figure 6 and :func:`saliency_grid` its Figure 5;
  :func:`save_figure` writes a figure as PNG.
- :func:`log_to_tensorboard` logs the same scalars, table, figures and images to a ``SummaryWriter``;
  :func:`saliency_image_grid` turns a batch of maps into one ``(3, H, W)`` image for ``add_image``.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas, never through ``pyplot``: they
need no display, do not change the user's matplotlib backend and are freed once no longer referenced.

Example:
    >>> results = {
    ...     "simple_gradient": {"distance": 0.82, "topk": 0.31, "ssim": 0.42, "gini": 0.51,
    ...                         "zero_fraction": 0.0, "attack_success": 0.97, "seconds_per_image": 0.0004,
    ...                         "surrogate": "simple_gradient", "samples": 500},
    ... }
    >>> print(format_results_table(results).splitlines()[2])
    | simple_gradient | 0.820 | 0.310 | 0.420 | 0.510 | 0 | 0.970 | 0.000400 | simple_gradient |
"""

from __future__ import annotations

import csv
import json
import math
import numbers
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torchvision.utils import make_grid

__all__ = [
    "METRIC_KEYS",
    "format_results_table",
    "is_moreaugrad_family",
    "log_to_tensorboard",
    "method_label",
    "normalised_magnitude",
    "robustness_bar_chart",
    "saliency_grid",
    "saliency_image_grid",
    "save_figure",
    "write_results",
]

# Numeric entries every method's results must hold, in the order of the files' columns.
METRIC_KEYS: tuple[str, ...] = (
    "distance",
    "topk",
    "ssim",
    "gini",
    "zero_fraction",
    "attack_success",
    "seconds_per_image",
    "samples",
)
_TEXT_KEYS: tuple[str, ...] = ("surrogate",)
_REQUIRED_KEYS: tuple[str, ...] = METRIC_KEYS + _TEXT_KEYS

# Markdown table: (results key, column header). Arrows mark the robustness direction.
_TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("distance", "distance ↓"),
    ("topk", "top-k ↑"),
    ("ssim", "SSIM ↑"),
    ("gini", "Gini"),
    ("zero_fraction", "zero share"),
    ("attack_success", "attack success"),
    ("seconds_per_image", "s / image"),
    ("surrogate", "surrogate"),
)

# Bar chart panels: (results key, panel title, whether lower values are more robust).
_ROBUSTNESS_PANELS: tuple[tuple[str, str, bool], ...] = (
    ("distance", "Normalized distance", True),
    ("topk", "Top-k intersection", False),
    ("ssim", "SSIM", False),
)

_METHOD_LABELS: dict[str, str] = {
    "simple_gradient": "Simple gradient",
    "integrated_gradients": "Integrated gradients",
    "smoothgrad": "SmoothGrad",
    "sparsified_smoothgrad": "Sparsified SmoothGrad",
    "deeplift": "DeepLIFT",
    "relex": "RelEx",
    "moreaugrad": "MoreauGrad",
    "sparse_moreaugrad": "Sparse MoreauGrad",
    "group_sparse_moreaugrad": "Group-sparse MoreauGrad",
}

# Okabe-Ito vermillion against a neutral grey: distinct for colour-blind readers and in grayscale print.
_MOREAUGRAD_COLOUR = "#D55E00"
_BASELINE_COLOUR = "#8C8C8C"
_MOREAUGRAD_HATCH = "//"

_CHANNEL_REDUCTIONS = ("sum", "max")
# Inputs a little outside [0, 1] are float round-off of a clamp; anything further is a normalised image.
_PIXEL_RANGE_TOLERANCE = 1e-3


def method_label(method: str) -> str:
    """Human-readable name of a registered explainer, for figures (unknown names are returned as they are).

    Args:
        method: registry name, e.g. ``"sparse_moreaugrad"``.

    Example:
        >>> method_label("group_sparse_moreaugrad")
        'Group-sparse MoreauGrad'
    """
    return _METHOD_LABELS.get(method, method)


def is_moreaugrad_family(method: str) -> bool:
    """Whether a registered method is MoreauGrad or one of its sparse variants (drawn highlighted).

    Args:
        method: registry name.

    Example:
        >>> is_moreaugrad_family("sparse_moreaugrad"), is_moreaugrad_family("smoothgrad")
        (True, False)
    """
    return "moreaugrad" in method.lower()


# --------------------------------------------------------------------------------------------------------
# Results validation and formatting
# --------------------------------------------------------------------------------------------------------


def _plain_value(method: str, key: str, value: Any) -> Any:
    """Turn a 0-d tensor or numpy scalar into a Python number; reject what a results file cannot hold."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        count = value.size if isinstance(value, np.ndarray) else value.numel()
        if count != 1:
            raise ValueError(
                f"results[{method!r}][{key!r}] is a tensor of shape {tuple(value.shape)}; "
                "pass one number per metric (call .item() or compute the metric first)."
            )
        value = value.item()
    elif isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(
        f"results[{method!r}][{key!r}] has type {type(value).__name__}; use a number or a string."
    )


def _checked_results(
    results: Mapping[str, Mapping[str, Any]], required: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Validate ``results`` and return a plain copy, each method's keys in column order then any extras."""
    if not isinstance(results, Mapping):
        raise TypeError(
            f"results must be a dict {{method name: {{metric: value}}}}, got {type(results).__name__}."
        )
    if not results:
        raise ValueError(
            "results is empty: pass one entry per explainer method, "
            "e.g. {'moreaugrad': {'distance': 0.31, 'topk': 0.62, ...}}."
        )
    checked: dict[str, dict[str, Any]] = {}
    for method, entry in results.items():
        if not isinstance(method, str) or not method:
            raise TypeError(f"method names must be non-empty strings, got {method!r}.")
        if not isinstance(entry, Mapping):
            raise TypeError(
                f"results[{method!r}] must be a dict of metric values, got {type(entry).__name__}."
            )
        missing = [key for key in required if key not in entry]
        if missing:
            raise ValueError(
                f"results[{method!r}] lacks {missing}; every method needs the keys {list(required)}."
            )
        plain = {str(key): _plain_value(method, str(key), value) for key, value in entry.items()}
        for key in METRIC_KEYS:
            if key in plain and (isinstance(plain[key], bool) or not isinstance(plain[key], numbers.Real)):
                raise TypeError(f"results[{method!r}][{key!r}] must be a number, got {plain[key]!r}.")
        for key in _TEXT_KEYS:
            if key in plain and plain[key] is not None and not isinstance(plain[key], str):
                raise TypeError(f"results[{method!r}][{key!r}] must be a string, got {plain[key]!r}.")
        ordered = [key for key in _REQUIRED_KEYS if key in plain] + [
            key for key in plain if key not in _REQUIRED_KEYS
        ]
        checked[method] = {key: plain[key] for key in ordered}
    return checked


def _format_number(value: Any, significant: int = 3) -> str:
    """Fixed-point with ``significant`` significant digits (0.412, 1.23, 0.000412); ints as they are."""
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    if magnitude < -4:  # tiny values would need a long row of zeros
        return f"{value:.{significant - 1}e}"
    return f"{value:.{max(0, significant - 1 - magnitude)}f}"


def _escape_cell(text: str) -> str:
    return text.replace("|", "\\|")


def format_results_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table with one row per method, in the order of ``results``.

    Columns: method, normalized distance, top-k intersection, SSIM, Gini index, share of zero entries, attack
    success, seconds per image and the attack's surrogate. Numbers have 3 significant digits.

    Args:
        results: ``{method: {"distance", "topk", "ssim", "gini", "zero_fraction", "attack_success",
            "seconds_per_image", "surrogate", "samples": value}}``; 0-d tensors are accepted.

    Returns:
        The table, lines joined by ``"\\n"``, without a trailing newline.

    Example:
        >>> row = {"distance": 0.31, "topk": 0.62, "ssim": 0.7, "gini": 0.8, "zero_fraction": 0.5,
        ...        "attack_success": 0.4, "seconds_per_image": 1.25, "surrogate": "moreaugrad", "samples": 8}
        >>> print(format_results_table({"moreaugrad": row}))  # doctest: +NORMALIZE_WHITESPACE
        | method | distance ↓ | top-k ↑ | SSIM ↑ | Gini | zero share | attack success | s / image | surrogate |
        | :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :--- |
        | moreaugrad | 0.310 | 0.620 | 0.700 | 0.800 | 0.500 | 0.400 | 1.25 | moreaugrad |
    """
    table = _checked_results(results, _REQUIRED_KEYS)
    header = ["method"] + [title for _, title in _TABLE_COLUMNS]
    alignment = [":---"] + ["---:" if key in METRIC_KEYS else ":---" for key, _ in _TABLE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(alignment) + " |"]
    for method, entry in table.items():
        cells = [method] + [_format_number(entry[key]) for key, _ in _TABLE_COLUMNS]
        lines.append("| " + " | ".join(_escape_cell(cell) for cell in cells) + " |")
    return "\n".join(lines)


def _json_ready(value: Any) -> Any:
    """JSON-serialisable copy: NaN/inf become null (strict JSON), paths and unknown objects become strings."""
    if isinstance(value, Mapping):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return _json_ready(value.tolist())
    if isinstance(value, np.generic):
        return _json_ready(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    return str(value)


def _run_info_markdown(run_info: Mapping[str, Any]) -> str:
    return "\n".join(f"- **{key}**: `{_json_ready(value)}`" for key, value in run_info.items())


def write_results(
    results: Mapping[str, Mapping[str, Any]],
    out_dir: str | Path,
    run_info: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``results.json``, ``results.csv`` and ``results.md`` into ``out_dir`` (created if missing).

    - ``results.json``: ``{"run_info": {...}, "results": {method: {...}}}``; NaN and infinity are written as
      ``null`` so any strict JSON reader can load the file; paths and other objects in ``run_info`` as strings.
    - ``results.csv``: a header, then one row per method; numbers at full precision; extra keys that a
      method carries beyond the standard ones become extra columns (empty where a method lacks them).
    - ``results.md``: the run info as a list, then :func:`format_results_table`.

    Args:
        results: per-method results, see :func:`format_results_table`.
        out_dir: the run's folder.
        run_info: what the run was (checkpoint, dataset, epsilon, attack, seed, devices, ...).

    Returns:
        ``{"json": path, "csv": path, "md": path}``.

    Example:
        >>> paths = write_results(results, "logs/eval", run_info={"dataset": "cifar10"})  # doctest: +SKIP
        >>> json.loads(paths["json"].read_text())["results"]["moreaugrad"]["topk"]  # doctest: +SKIP
    """
    table = _checked_results(results, _REQUIRED_KEYS)
    if run_info is not None and not isinstance(run_info, Mapping):
        raise TypeError(f"run_info must be a dict or None, got {type(run_info).__name__}.")
    run_info = dict(run_info or {})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "csv": out_dir / "results.csv", "md": out_dir / "results.md"}

    document = {"run_info": _json_ready(run_info), "results": _json_ready(table)}
    paths["json"].write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")

    columns = ["method"] + list(_REQUIRED_KEYS)
    for entry in table.values():
        columns += [key for key in entry if key not in columns]
    with paths["csv"].open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        for method, entry in table.items():
            writer.writerow({"method": method, **{key: _csv_cell(value) for key, value in entry.items()}})

    sections = ["# Interpretation robustness"]
    if run_info:
        sections.append(_run_info_markdown(run_info))
    sections.append(format_results_table(table))
    paths["md"].write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return paths


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest string that reads back to the same float
    return value


# --------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def robustness_bar_chart(results: Mapping[str, Mapping[str, Any]], title: str | None = None) -> Figure:
    """Bar chart of the robustness metrics, like Figure 6 of the MoreauGrad paper.

    Three panels (normalized distance, top-k intersection, SSIM), one horizontal bar per method in the order
    of ``results`` with its value written beside it; MoreauGrad-family bars are vermillion and hatched,
    baselines grey. Each panel says which direction is more robust. A NaN value is drawn as "n/a".

    Args:
        results: per-method results; only ``distance``, ``topk`` and ``ssim`` are read.
        title: optional figure title, e.g. ``"CIFAR-10, L2 top-k attack, epsilon = 0.5"``.

    Returns:
        A :class:`~matplotlib.figure.Figure` (Agg canvas, not registered with pyplot).

    Example:
        >>> save_figure(robustness_bar_chart(results, title="CIFAR-10"), "logs/eval/robustness.png")  # doctest: +SKIP
    """
    table = _checked_results(results, [key for key, _, _ in _ROBUSTNESS_PANELS])
    methods = list(table)
    family = [is_moreaugrad_family(method) for method in methods]
    colours = [_MOREAUGRAD_COLOUR if highlighted else _BASELINE_COLOUR for highlighted in family]
    positions = np.arange(len(methods))

    figure = _new_figure(11.0, 1.6 + 0.32 * len(methods))
    axes = figure.subplots(1, len(_ROBUSTNESS_PANELS), sharey=True)
    for ax, (key, name, lower_is_better) in zip(axes, _ROBUSTNESS_PANELS):
        values = np.array([table[method][key] for method in methods], dtype=float)
        bars = ax.barh(positions, np.nan_to_num(values), color=colours, edgecolor="white", linewidth=0.5)
        for bar, highlighted in zip(bars, family):
            if highlighted:
                bar.set_hatch(_MOREAUGRAD_HATCH)
        value_labels = ["n/a" if math.isnan(value) else _format_number(value) for value in values]
        ax.bar_label(bars, labels=value_labels, padding=3, fontsize=8)

        finite = values[np.isfinite(values)]
        largest = float(finite.max()) if finite.size else 1.0
        smallest = float(finite.min()) if finite.size else 0.0
        # Room beside the bars for the value labels; [0, 1] metrics keep their natural scale and ticks.
        upper = max(largest, 0.05 if lower_is_better else 1.0) * 1.2
        lower = 0.0 if smallest >= 0.0 else smallest - 0.2 * (upper - smallest)
        ax.set_xlim(lower, upper)
        if not lower_is_better and largest <= 1.0 and smallest >= 0.0:
            ax.set_xticks(np.linspace(0.0, 1.0, 6))
        ax.set_title(f"{name} {'↓' if lower_is_better else '↑'}", fontsize=11)
        ax.set_xlabel(f"{'lower' if lower_is_better else 'higher'} is more robust", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(axis="y", length=0)
    axes[0].set_yticks(positions, [method_label(method) for method in methods])
    axes[0].invert_yaxis()  # first method on top, as in the table

    legend = [
        Patch(facecolor=_MOREAUGRAD_COLOUR, hatch=_MOREAUGRAD_HATCH, edgecolor="white", label="MoreauGrad family"),
        Patch(facecolor=_BASELINE_COLOUR, edgecolor="white", label="baselines"),
    ]
    figure.legend(handles=legend, loc="outside lower center", ncols=2, frameon=False)
    if title:
        figure.suptitle(title)
    return figure


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
            "(normalisation is the model's first layer, SPEC section 1): pass the unnormalised pixels."
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
    figure = _new_figure(cell * columns + 1.0, cell * sum(height_ratios) + 0.9)
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
                    ax.set_xlabel(f"‖δ‖₂ = {_format_number(shift)}" if shift > 0 else "not moved", fontsize=7)
                else:
                    magnitude = clean if row_name == "original" else attacked
                    ax.imshow(magnitude[position].numpy(), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
                    map_axes.append(ax)
                if position == 0 and offset == 0:
                    label = textwrap.fill(method_label(method), width=14)
                    colour = _MOREAUGRAD_COLOUR if is_moreaugrad_family(method) else "black"
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


def save_figure(figure: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Write a figure as PNG (parent folders created) and close it.

    Figures from this module are not registered with pyplot and are freed once unreferenced; a pyplot figure
    is closed with ``plt.close``. Log a figure to TensorBoard before saving it.

    Args:
        figure: the figure.
        path: destination; the ``.png`` suffix is required.
        dpi: resolution.

    Returns:
        The path written.

    Example:
        >>> save_figure(robustness_bar_chart(results), "logs/eval/robustness.png")  # doctest: +SKIP
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_figure writes PNG files; give a path ending in .png, got {str(path)!r}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, format="png", facecolor="white")
    if getattr(figure.canvas, "manager", None) is not None:
        import matplotlib.pyplot as plt  # only reached for figures that pyplot already manages

        plt.close(figure)
    return path


# --------------------------------------------------------------------------------------------------------
# TensorBoard
# --------------------------------------------------------------------------------------------------------


def log_to_tensorboard(
    experiment: Any,
    results: Mapping[str, Mapping[str, Any]],
    figures: Mapping[str, Figure] | None = None,
    images: Mapping[str, torch.Tensor] | None = None,
    step: int = 0,
    prefix: str = "test",
    run_info: Mapping[str, Any] | None = None,
) -> None:
    """Log the evaluation to TensorBoard: scalars, the results table, figures and images.

    Tags: ``<prefix>/<method>/<metric>`` for every numeric entry of every method, ``<prefix>/results`` (the
    markdown table, TensorBoard's Text tab renders it), ``<prefix>/run_info``, ``<prefix>/<name>`` for each
    figure and image. Figures are not closed, so they can still be saved with :func:`save_figure` afterwards.

    Args:
        experiment: a ``torch.utils.tensorboard.SummaryWriter``, e.g. Lightning's
            ``TensorBoardLogger.experiment``.
        results: per-method results, see :func:`format_results_table`.
        figures: ``{name: figure}``, e.g. ``{"robustness": robustness_bar_chart(results)}``.
        images: ``{name: (3, H, W) tensor in [0, 1]}``, e.g. from :func:`saliency_image_grid`.
        step: the global step to log at.
        prefix: first part of every tag.
        run_info: what the run was, logged as text.

    Example:
        >>> log_to_tensorboard(trainer.logger.experiment, results,
        ...                    figures={"robustness": robustness_bar_chart(results)})  # doctest: +SKIP
    """
    table_text = format_results_table(results)
    table = _checked_results(results, _REQUIRED_KEYS)
    for name, image in (images or {}).items():
        if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] not in (1, 3):
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"images[{name!r}] must be a (3, H, W) or (1, H, W) tensor in [0, 1], got {shape}.")
    for name, figure in (figures or {}).items():
        if not isinstance(figure, Figure):
            raise TypeError(f"figures[{name!r}] must be a matplotlib Figure, got {type(figure).__name__}.")

    for method, entry in table.items():
        for key, value in entry.items():
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                experiment.add_scalar(f"{prefix}/{method}/{key}", value, step)
    experiment.add_text(f"{prefix}/results", table_text, step)
    if run_info:
        experiment.add_text(f"{prefix}/run_info", _run_info_markdown(run_info), step)
    for name, figure in (figures or {}).items():
        experiment.add_figure(f"{prefix}/{name}", figure, step, close=False)
    for name, image in (images or {}).items():
        experiment.add_image(f"{prefix}/{name}", image.detach().to("cpu", torch.float32).clamp(0, 1), step)
    experiment.flush()
