"""Tests of the evaluation run's results files, figures and TensorBoard output (mglightning.reporting)."""

import csv
import doctest
import json
import math

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

import mglightning.reporting
from mglightning.evaluation import OutOfSpaceError
from mglightning.explainers import EXPLAINERS
from mglightning.reporting import (
    ResultRow,
    format_results_table,
    log_to_tensorboard,
    normalised_magnitude,
    robustness_figure,
    saliency_grid,
    saliency_image_grid,
    save_figure,
    write_results,
)
from evaluated_runs import evaluated_run
from full_disk import fill_the_disk

METHODS = (
    "simple_gradient",
    "integrated_gradients",
    "smoothgrad",
    "sparsified_smoothgrad",
    "deeplift",
    "relex",
    "moreaugrad",
    "sparse_moreaugrad",
    "group_sparse_moreaugrad",
)


def _row(seed: int, method: str, epsilon: float = 0.5, suffix: str = "") -> ResultRow:
    rng = np.random.default_rng(seed)
    value = {key: float(rng.uniform(0.1, 0.9)) for key in ("distance", "topk", "ssim")}
    cls = EXPLAINERS[method]
    sparsity = {"gini": float(rng.uniform(0, 1)), "zero_fraction": float(rng.uniform(0, 1))}
    fidelity = {"deletion_auc": None, "insertion_auc": None}
    costs = {
        "attack_success": float(rng.uniform(0, 1)), "seconds_per_image": float(10 ** rng.uniform(-4, 1)),
        "attack_seconds_per_image": 0.5, "attacked_seconds_per_image": 0.5, "evals_clean": 1.0,
        "evals_attack": 30.0, "evals_attacked": 1.0, "convex_share": None,
    }
    return ResultRow(
        method=method + suffix, label=method, explainer=method, display_name=cls.display_name, family=cls.family,
        epsilon=epsilon, attack="topk", surrogate="self", samples=64,
        values={**value, **sparsity, **fidelity, **costs},
        intervals={key: (v - 0.05, v + 0.07) for key, v in value.items()},
        directions={"distance": False, "topk": True, "ssim": True, "gini": None, "zero_fraction": None,
                    "deletion_auc": False, "insertion_auc": True},
        shown_intervals=("distance", "topk", "ssim"),
    )


@pytest.fixture
def rows() -> list[ResultRow]:
    return [_row(seed, method) for seed, method in enumerate(METHODS)]


def _images(batch: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _grid_inputs(methods, batch=2, channels=3, size=8):
    inputs = _images(batch, channels, size)
    attacked_inputs = {m: (inputs + 0.05 * _images(batch, channels, size, 1)).clamp(0, 1) for m in methods}
    clean_maps = {m: torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(i))
                  for i, m in enumerate(methods)}
    attacked_maps = {m: clean_maps[m] + 0.5 for m in methods}
    return inputs, attacked_inputs, clean_maps, attacked_maps


# ------------------------------------------------------------------------------------------------ files


def test_write_results_files_parse_back(tmp_path, rows):
    run = evaluated_run(classifier=str(tmp_path / "model.ckpt"), seed=7)
    paths = write_results(rows, tmp_path / "run", run)
    assert set(paths) == {"json", "csv", "md"} and all(path.is_file() for path in paths.values())

    document = json.loads(paths["json"].read_text())
    assert document["run_info"] == {**run.description.to_dict(), "samples": 64, "accuracy": 0.9}
    assert document["run_info"]["dataset"] == "CIFAR10DataModule"
    assert list(document["results"]) == list(METHODS)
    assert document["results"]["relex"]["values"]["topk"] == rows[5].topk
    assert document["results"]["relex"]["intervals"]["topk"] == list(rows[5].topk_ci)

    with paths["csv"].open(newline="") as handle:
        read = list(csv.DictReader(handle))
    assert [row["method"] for row in read] == list(METHODS)
    for row, expected in zip(read, rows):
        assert float(row["distance"]) == expected.distance  # full precision, not the table's rounding
        assert int(row["samples"]) == expected.samples

    markdown = paths["md"].read_text()
    assert "CIFAR10DataModule" in markdown and "MoreauGrad (rho=0.06)" in markdown and "ε = 0.500" in markdown
    assert "TopKInterpretationAttack (num_steps=10)" in markdown and "`topk` (TopKIntersection)" in markdown
    assert format_results_table(rows) in markdown


def test_markdown_table_rows_and_number_format(rows):
    rows[6].values["distance"], rows[6].intervals["distance"] = 0.31234, (0.2, 0.4)
    rows[6].values["seconds_per_image"] = 0.000123456
    rows[5].values["ssim"], rows[5].values["deletion_auc"] = float("nan"), 0.25
    lines = format_results_table(rows).splitlines()
    assert len(lines) == 2 + len(METHODS)
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[:4] == ["method", "distance ↓ [95% CI]", "top-k ↑ [95% CI]", "SSIM ↑ [95% CI]"]
    assert "deletion AUC ↓" in header and header[-1] == "surrogate"
    table = {cells[0]: cells for cells in
             ([cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:])}
    assert list(table) == list(METHODS)
    assert all(len(cells) == len(header) for cells in table.values())
    assert table["moreaugrad"][1] == "0.312 [0.200, 0.400]"
    assert table["moreaugrad"][header.index("s / image")] == "0.000123"
    assert header[4:6] == ["Gini", "zero share"]  # sparsity has no better direction
    assert table["relex"][3].startswith("nan")
    assert table["relex"][header.index("deletion AUC ↓")] == "0.250" and table["smoothgrad"][header.index("deletion AUC ↓")] == "–"


def test_results_write_nan_as_null(tmp_path, rows):
    rows[4].values["ssim"] = float("nan")
    paths = write_results(rows, tmp_path, evaluated_run())
    document = json.loads(paths["json"].read_text(), parse_constant=lambda name: pytest.fail(f"non-standard JSON {name}"))
    assert document["results"]["deeplift"]["values"]["ssim"] is None
    with paths["csv"].open(newline="") as handle:
        read = {row["method"]: row for row in csv.DictReader(handle)}
    assert math.isnan(float(read["deeplift"]["ssim"]))


def test_a_full_disk_while_writing_the_results_keeps_the_previous_files_and_says_how_to_go_on(tmp_path, rows,
                                                                                             monkeypatch):
    paths = write_results(rows, tmp_path, evaluated_run())
    before = {name: path.read_bytes() for name, path in paths.items()}

    fill_the_disk(monkeypatch)
    with pytest.raises(OutOfSpaceError, match=r"writing results\.json .* the records are kept: .*report the run again"):
        write_results(rows[:2], tmp_path, evaluated_run())
    assert {name: path.read_bytes() for name, path in paths.items()} == before, "the previous files are intact"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["results.csv", "results.json", "results.md"]


def test_docstring_examples_run():
    total = 0
    for module in (mglightning.reporting.statistics, mglightning.reporting.tables, mglightning.reporting.map_figures):
        outcome = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert outcome.failed == 0
        total += outcome.attempted
    assert total >= 3


# ------------------------------------------------------------------------------------------------ figures


def test_robustness_figure_with_one_budget_draws_bars_with_intervals(rows):
    rows[5].values["ssim"] = float("nan")
    figure = robustness_figure(rows, title="CIFAR-10")
    axes = figure.axes
    assert len(axes) == 3
    for ax, key, direction in zip(axes, ("distance", "topk", "ssim"), ("lower", "higher", "higher")):
        bars = ax.patches
        assert len(bars) == len(METHODS)
        expected = [0.0 if math.isnan(getattr(r, key)) else getattr(r, key) for r in rows]
        np.testing.assert_allclose([bar.get_width() for bar in bars], expected)
        assert ax.get_xlabel() == f"{direction} is more robust"
        hatched = [bool(bar.get_hatch()) for bar in bars]
        assert hatched == [r.family == "moreaugrad" for r in rows]
        # One error bar per method, spanning its interval.
        (errorbar,) = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
        segments = errorbar.lines[2][0].get_segments()
        for segment, row in zip(segments, rows):
            low, high = getattr(row, f"{key}_ci")
            if not math.isnan(getattr(row, key)):
                assert segment[0][0] == pytest.approx(low) and segment[1][0] == pytest.approx(high)
    assert [label.get_text() for label in axes[0].get_yticklabels()] == [r.display_name for r in rows]
    assert "n/a" in [text.get_text() for text in axes[2].texts]
    assert figure.get_suptitle() == "CIFAR-10"


def test_robustness_figure_with_several_budgets_draws_one_line_per_method():
    methods = ("simple_gradient", "smoothgrad", "moreaugrad")
    rows = [_row(i, m, eps, f"@eps={eps:g}") for i, m in enumerate(methods) for eps in (0.3, 1.0, 3.0)]
    figure = robustness_figure(rows)
    for ax, key in zip(figure.axes[:3], ("distance", "topk", "ssim")):
        containers = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
        assert [c.get_label() for c in containers] == [EXPLAINERS[m].display_name for m in methods]
        for container, method in zip(containers, methods):
            line = container.lines[0]
            expected = [getattr(r, key) for r in rows if r.label == method]
            np.testing.assert_allclose(line.get_ydata(), expected)
            assert len(container.lines[2][0].get_segments()) == 3  # an error bar per budget
            assert line.get_linestyle() == ("-" if method == "moreaugrad" else "--")
        assert "budget" in ax.get_xlabel()


def test_robustness_axes_end_within_the_metrics_range_and_the_values_stay_readable(rows):
    for row in rows:  # near the top of the range, where the old axes ran on to 1.25
        row.topk, row.topk_ci, row.ssim, row.ssim_ci = 0.95, (0.9, 0.99), 0.97, (0.93, 1.0)
    figure = robustness_figure(rows)
    renderer = figure.canvas.get_renderer()
    figure.draw(renderer)  # the layout places the axes and the texts
    distance, topk, ssim = figure.axes
    assert topk.get_xlim() == (0.0, 1.0) and ssim.get_xlim() == (0.0, 1.0)
    assert distance.get_xlim()[1] <= 2.0
    box = figure.bbox
    for ax, right_neighbour in ((distance, topk), (topk, ssim), (ssim, None)):
        for text in ax.texts:
            extent = text.get_window_extent(renderer)
            assert box.x0 <= extent.x0 and extent.x1 <= box.x1, f"{text.get_text()!r} is cut off"
            if right_neighbour is not None:
                assert extent.x1 <= right_neighbour.get_window_extent(renderer).x0, "a value runs into the next panel"

    several = [_row(i, m, eps, f"@eps={eps:g}") for i, m in enumerate(("simple_gradient", "moreaugrad"))
               for eps in (0.3, 1.0)]
    for row in several:
        row.topk, row.topk_ci, row.ssim, row.ssim_ci = 0.97, (0.93, 1.0), 0.99, (0.97, 1.0)
    lines = robustness_figure(several)
    for ax, bound in zip(lines.axes[:3], (2.0, 1.0, 1.0)):
        low, high = ax.get_ylim()
        assert 0.0 <= low and high <= bound


def test_normalised_magnitude_matches_loop():
    maps = torch.randn(3, 3, 5, 4, generator=torch.Generator().manual_seed(0))
    maps[1] = 0.0
    for reduction, reduce in (("sum", np.sum), ("max", np.max)):
        result = normalised_magnitude(maps, reduction).numpy()
        for sample in range(3):
            pixels = np.zeros((5, 4))
            for row in range(5):
                for column in range(4):
                    pixels[row, column] = reduce(np.abs(maps[sample, :, row, column].numpy()))
            expected = pixels / pixels.max() if pixels.max() > 0 else pixels
            np.testing.assert_allclose(result[sample], expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"channel_reduction must be one of \['sum', 'max'\]"):
        normalised_magnitude(maps, "mean")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        normalised_magnitude(maps[0])


def test_saliency_image_grid_colours_each_map():
    maps = torch.zeros(3, 1, 4, 4)
    maps[0, 0, 1, 2] = -5.0  # the maximum of map 0 after taking magnitudes
    maps[0, 0, 3, 3] = 2.5
    maps[2] = 1.0
    grid = saliency_image_grid(maps, cmap="viridis", nrow=2, padding=1)
    assert grid.shape == (3, 1 + 2 * (4 + 1), 1 + 2 * (4 + 1)) and grid.dtype == torch.float32
    assert 0.0 <= grid.min() and grid.max() <= 1.0
    viridis = colormaps["viridis"]

    def pixel(tile, row, column):  # tiles are laid out row-major, each offset by the padding
        top, left = 1 + (tile // 2) * 5, 1 + (tile % 2) * 5
        return grid[:, top + row, left + column].numpy()

    np.testing.assert_allclose(pixel(0, 1, 2), viridis(1.0)[:3], atol=1e-6)
    np.testing.assert_allclose(pixel(0, 3, 3), viridis(0.5)[:3], atol=1e-6)
    np.testing.assert_allclose(pixel(0, 0, 0), viridis(0.0)[:3], atol=1e-6)
    np.testing.assert_allclose(pixel(1, 2, 2), viridis(0.0)[:3], atol=1e-6)  # all-zero map stays dark
    np.testing.assert_allclose(pixel(2, 2, 2), viridis(1.0)[:3], atol=1e-6)
    with pytest.raises(ValueError, match="unknown colormap"):
        saliency_image_grid(maps, cmap="not-a-colormap")


def test_saliency_grid_layout_and_content():
    methods = ("smoothgrad", "moreaugrad")
    inputs, attacked_inputs, clean_maps, attacked_maps = _grid_inputs(methods, batch=3)
    attacked_inputs["smoothgrad"][2] = inputs[2]  # this sample was not moved by the attack
    figure = saliency_grid(inputs, attacked_inputs, clean_maps, attacked_maps,
                           labels=[0, 1, 1], predictions=torch.tensor([0, 0, 1]),
                           class_names=["cat", "dog"], sample_ids=torch.tensor([40, 41, 42]),
                           sample_indices=[1, 2], channel_reduction="max",
                           method_names={"smoothgrad": "SmoothGrad", "moreaugrad": "MoreauGrad"},
                           highlight=["moreaugrad"])
    image_axes = [ax for ax in figure.axes if ax.get_label() != "<colorbar>"]
    assert len(image_axes) == 2 * 3 * (1 + len(methods))  # samples x rows x (input + methods)
    assert len(figure.axes) == len(image_axes) + 1  # one shared colour bar

    titles = [ax.get_title() for ax in image_axes]
    assert "SmoothGrad" in titles and "MoreauGrad" in titles
    colours = {ax.get_title(): ax.title.get_color() for ax in image_axes if ax.get_title() in ("SmoothGrad", "MoreauGrad")}
    assert colours["SmoothGrad"] == "black" and colours["MoreauGrad"] != "black"
    assert [ax.get_ylabel() for ax in image_axes[:3]] == ["original", "attacked", "attacked input"]
    caption = image_axes[0].title
    assert caption.get_text().startswith("sample 41\n")
    assert "label: dog" in caption.get_text() and "pred: cat" in caption.get_text()
    assert caption.get_color() != "black"  # misclassified samples stand out

    # Axes are created sample by sample: the input column's 3 rows, then each method's 3 rows.
    first_sample = image_axes[:9]
    moreaugrad_original, moreaugrad_attacked, moreaugrad_input = first_sample[6:9]
    expected_clean = normalised_magnitude(clean_maps["moreaugrad"][1:2], "max")[0].numpy()
    expected_attacked = normalised_magnitude(attacked_maps["moreaugrad"][1:2], "max")[0].numpy()
    np.testing.assert_allclose(moreaugrad_original.images[0].get_array(), expected_clean, rtol=1e-6)
    np.testing.assert_allclose(moreaugrad_attacked.images[0].get_array(), expected_attacked, rtol=1e-6)
    np.testing.assert_allclose(moreaugrad_input.images[0].get_array(),
                               attacked_inputs["moreaugrad"][1].permute(1, 2, 0).numpy(), rtol=1e-6)
    shift = (attacked_inputs["moreaugrad"][1] - inputs[1]).norm().item()
    assert moreaugrad_input.get_xlabel() == f"‖δ‖₂ = {shift:.3f}"
    assert image_axes[9 + 5].get_xlabel() == "not moved"  # smoothgrad's attacked input of sample 2


def test_saliency_grid_grayscale_without_attacked_inputs():
    methods = ("simple_gradient",)
    inputs, attacked_inputs, clean_maps, attacked_maps = _grid_inputs(methods, batch=4, channels=1)
    figure = saliency_grid(inputs, attacked_inputs, clean_maps, attacked_maps, num_samples=10,
                           show_attacked_inputs=False)
    image_axes = [ax for ax in figure.axes if ax.get_label() != "<colorbar>"]
    assert len(image_axes) == 4 * 2 * 2  # all 4 samples (fewer than asked), 2 rows, 2 columns
    assert image_axes[0].images[0].get_cmap().name == "gray"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda args: args[2].update(moreaugrad=torch.zeros(2, 3, 8, 7)), r"clean_maps\['moreaugrad'\] has shape"),
        (lambda args: args[3].update(moreaugrad=torch.zeros(3, 3, 8, 8)), r"attacked_maps\['moreaugrad'\] has shape"),
        (lambda args: args[1].update(moreaugrad=torch.zeros(2, 1, 8, 8)), r"attacked_inputs\['moreaugrad'\] has shape"),
        (lambda args: args[1].pop("moreaugrad"), r"attacked_inputs lacks the methods \['moreaugrad'\]"),
        (lambda args: args[0].sub_(0.5), r"must be in \[0, 1\]"),
        (lambda args: args[2]["moreaugrad"].fill_(float("nan")), "NaN"),
    ],
)
def test_saliency_grid_rejects_mismatched_inputs(change, message):
    args = list(_grid_inputs(("smoothgrad", "moreaugrad")))
    change(args)
    with pytest.raises(ValueError, match=message):
        saliency_grid(*args)


def test_saliency_grid_rejects_bad_selection():
    args = _grid_inputs(("smoothgrad",))
    with pytest.raises(ValueError, match=r"indices in \[0, 2\)"):
        saliency_grid(*args, sample_indices=[2])
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        saliency_grid(*args, labels=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"sample_ids must have shape \(2,\)"):
        saliency_grid(*args, sample_ids=[7])
    with pytest.raises(ValueError, match=r"clean_maps lacks the methods \['relex'\]"):
        saliency_grid(*args, methods=["relex"])
    with pytest.raises(ValueError, match="unknown colormap"):
        saliency_grid(*args, cmap="not-a-colormap")


def test_saved_pngs_are_valid_images(tmp_path, rows):
    inputs, attacked_inputs, clean_maps, attacked_maps = _grid_inputs(METHODS, size=32)
    bar_path = save_figure(robustness_figure(rows), tmp_path / "figures" / "robustness.png", dpi=100)
    grid_path = save_figure(saliency_grid(inputs, attacked_inputs, clean_maps, attacked_maps),
                            tmp_path / "figures" / "saliency_grid.png", dpi=100)
    for path, figure_size in ((bar_path, (11.0, 1.6 + 0.34 * 9)), (grid_path, (1.3 * 10 + 1.0, None))):
        with Image.open(path) as image:
            assert image.format == "PNG"
            width, height = image.size
            image.verify()
        assert width == round(figure_size[0] * 100)
        assert 300 <= height <= 3000
        if figure_size[1] is not None:
            assert height == round(figure_size[1] * 100)
    with pytest.raises(ValueError, match=r"ending in \.png"):
        save_figure(robustness_figure(rows), tmp_path / "figure.jpg")


def test_save_figure_closes_pyplot_figures(tmp_path):
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(2, 2))
    figure.add_subplot().plot([0, 1], [1, 0])
    save_figure(figure, tmp_path / "line.png", dpi=50)
    assert not plt.fignum_exists(figure.number)
    with Image.open(tmp_path / "line.png") as image:
        assert image.size == (100, 100)


# ------------------------------------------------------------------------------------------------ TensorBoard


def test_log_to_tensorboard_writes_each_scalar_once_with_text_figures_and_images(tmp_path, rows):
    rows = [rows[2], rows[6]]
    methods = [row.method for row in rows]
    inputs, attacked_inputs, clean_maps, attacked_maps = _grid_inputs(methods)
    chart = robustness_figure(rows)
    chart.set_dpi(40)
    writer = SummaryWriter(log_dir=str(tmp_path))
    log_to_tensorboard(writer, rows, figures={"robustness": chart},
                       images={"moreaugrad/clean_maps": saliency_image_grid(clean_maps["moreaugrad"])},
                       step=3, run=evaluated_run(dataset="digits"))
    assert isinstance(chart, Figure) and chart.axes  # still usable, e.g. for save_figure

    # Read while the writer is still open, as in a running Trainer.
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    writer.close()
    tags = events.Tags()
    logged = [key for key, value in rows[0].values.items() if value is not None]
    intervals = [f"{key}_ci_{end}" for key in ("distance", "topk", "ssim") for end in ("low", "high")]
    assert set(tags["scalars"]) == {f"test/{m}/{key}" for m in methods for key in logged + intervals}
    for row in rows:
        for key in logged:
            (event,) = events.Scalars(f"test/{row.method}/{key}")
            assert event.step == 3
            assert event.value == pytest.approx(getattr(row, key), rel=1e-6)
    assert set(tags["images"]) == {"test/robustness", "test/moreaugrad/clean_maps"}
    (grid_event,) = events.Images("test/moreaugrad/clean_maps")
    assert (grid_event.width, grid_event.height) == (2 * 8 + 3 * 2, 8 + 2 * 2)
    text = events.Tensors("test/results/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text == format_results_table(rows)
    run_info_text = events.Tensors("test/run_info/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "digits" in run_info_text and "0.500" in run_info_text


def test_log_to_tensorboard_rejects_bad_images_before_logging(tmp_path, rows):
    with SummaryWriter(log_dir=str(tmp_path)) as writer:
        with pytest.raises(ValueError, match=r"images\['maps'\] must be a \(3, H, W\)"):
            log_to_tensorboard(writer, rows, images={"maps": torch.rand(2, 3, 8, 8)})
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert events.Tags()["scalars"] == []
