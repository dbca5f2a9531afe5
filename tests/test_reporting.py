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
from mglightning.reporting import (
    METRIC_KEYS,
    format_results_table,
    is_moreaugrad_family,
    log_to_tensorboard,
    method_label,
    normalised_magnitude,
    robustness_bar_chart,
    saliency_grid,
    saliency_image_grid,
    save_figure,
    write_results,
)

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


def _entry(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "distance": float(rng.uniform(0.2, 1.4)),
        "topk": float(rng.uniform(0, 1)),
        "ssim": float(rng.uniform(0, 1)),
        "gini": float(rng.uniform(0, 1)),
        "zero_fraction": float(rng.uniform(0, 1)),
        "attack_success": float(rng.uniform(0, 1)),
        "seconds_per_image": float(10 ** rng.uniform(-4, 1)),
        "surrogate": "simple_gradient",
        "samples": 64,
    }


@pytest.fixture
def results() -> dict:
    return {method: _entry(seed) for seed, method in enumerate(METHODS)}


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


def test_write_results_files_parse_back(tmp_path, results):
    run_info = {"checkpoint": tmp_path / "model.ckpt", "dataset": "cifar10", "epsilon": 0.5, "seed": 7,
                "devices": 2}
    paths = write_results(results, tmp_path / "run", run_info=run_info)
    assert set(paths) == {"json", "csv", "md"} and all(path.is_file() for path in paths.values())

    document = json.loads(paths["json"].read_text())
    assert document["run_info"] == {"checkpoint": str(tmp_path / "model.ckpt"), "dataset": "cifar10",
                                    "epsilon": 0.5, "seed": 7, "devices": 2}
    assert list(document["results"]) == list(METHODS)
    assert document["results"] == results

    with paths["csv"].open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["method"] for row in rows] == list(METHODS)
    for row in rows:
        expected = results[row["method"]]
        assert row["surrogate"] == expected["surrogate"]
        assert int(row["samples"]) == expected["samples"]
        for key in METRIC_KEYS:
            assert float(row[key]) == expected[key]  # full precision, not the table's rounding

    markdown = paths["md"].read_text()
    assert "dataset" in markdown and "cifar10" in markdown
    assert format_results_table(results) in markdown


def test_markdown_table_rows_and_number_format(results):
    results["moreaugrad"].update(distance=0.31234, topk=1.0, zero_fraction=0.0, seconds_per_image=0.000123456)
    results["relex"].update(distance=1.23456, seconds_per_image=12.345, ssim=float("nan"))
    lines = format_results_table(results).splitlines()
    assert len(lines) == 2 + len(METHODS)
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == ["method", "distance ↓", "top-k ↑", "SSIM ↑", "Gini", "zero share", "attack success",
                      "s / image", "surrogate"]
    assert set(lines[1].strip("|").replace(" ", "").split("|")) <= {":---", "---:"}
    rows = {cells[0]: cells for cells in
            ([cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:])}
    assert list(rows) == list(METHODS)
    assert all(len(cells) == len(header) for cells in rows.values())
    assert rows["moreaugrad"][1:3] == ["0.312", "1.00"]
    assert rows["moreaugrad"][5] == "0"
    assert rows["moreaugrad"][7] == "0.000123"
    assert rows["relex"][1] == "1.23" and rows["relex"][3] == "nan" and rows["relex"][7] == "12.3"


def test_results_accept_tensors_and_write_nan_as_null(tmp_path, results):
    results["smoothgrad"]["distance"] = torch.tensor(0.25)
    results["smoothgrad"]["samples"] = torch.tensor(64)
    results["smoothgrad"]["topk"] = np.float32(0.5)
    results["deeplift"]["ssim"] = float("nan")
    results["deeplift"]["note"] = "extra key"
    paths = write_results(results, tmp_path)
    text = paths["json"].read_text()
    document = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON {name}"))
    assert document["results"]["smoothgrad"]["distance"] == 0.25
    assert document["results"]["smoothgrad"]["samples"] == 64
    assert document["results"]["smoothgrad"]["topk"] == 0.5
    assert document["results"]["deeplift"]["ssim"] is None
    with paths["csv"].open(newline="") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert rows["deeplift"]["note"] == "extra key" and rows["moreaugrad"]["note"] == ""
    assert math.isnan(float(rows["deeplift"]["ssim"]))


def test_bad_results_fail_with_clear_errors(tmp_path, results):
    with pytest.raises(ValueError, match="results is empty"):
        write_results({}, tmp_path)
    with pytest.raises(ValueError, match="results is empty"):
        robustness_bar_chart({})
    del results["relex"]["topk"]
    with pytest.raises(ValueError, match=r"results\['relex'\] lacks \['topk'\]"):
        format_results_table(results)
    results["relex"]["topk"] = "high"
    with pytest.raises(TypeError, match="must be a number"):
        write_results(results, tmp_path)
    results["relex"]["topk"] = torch.ones(3)
    with pytest.raises(ValueError, match="one number per metric"):
        write_results(results, tmp_path)
    with pytest.raises(TypeError, match="dict of metric values"):
        format_results_table({"moreaugrad": 0.3})
    assert not (tmp_path / "results.json").exists()


def test_docstring_examples_run():
    outcome = doctest.testmod(mglightning.reporting, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert outcome.failed == 0 and outcome.attempted >= 5


def test_method_names():
    assert [is_moreaugrad_family(m) for m in METHODS] == [False] * 6 + [True] * 3
    assert method_label("sparsified_smoothgrad") == "Sparsified SmoothGrad"
    assert method_label("my_new_method") == "my_new_method"


# ------------------------------------------------------------------------------------------------ figures


def test_robustness_bar_chart_draws_values_and_highlights_moreaugrad(results):
    results["relex"]["ssim"] = float("nan")
    figure = robustness_bar_chart(results, title="CIFAR-10")
    axes = figure.axes
    assert len(axes) == 3
    for ax, key, direction in zip(axes, ("distance", "topk", "ssim"), ("lower", "higher", "higher")):
        bars = ax.patches
        assert len(bars) == len(METHODS)
        widths = [bar.get_width() for bar in bars]
        expected = [0.0 if math.isnan(results[m][key]) else results[m][key] for m in METHODS]
        np.testing.assert_allclose(widths, expected)
        assert ax.get_xlabel() == f"{direction} is more robust"
        assert ax.get_xlim()[0] == 0.0 and ax.get_xlim()[1] > max(widths)  # bars start at the axis
        hatched = [bool(bar.get_hatch()) for bar in bars]
        assert hatched == [is_moreaugrad_family(m) for m in METHODS]
        colours = {tuple(bar.get_facecolor()) for bar, mg in zip(bars, hatched) if mg}
        assert len(colours) == 1 and colours.isdisjoint(tuple(bar.get_facecolor()) for bar in bars[:6])
    assert [label.get_text() for label in axes[0].get_yticklabels()] == [method_label(m) for m in METHODS]
    heights_on_page = [axes[0].transData.transform((0, bar.get_y()))[1] for bar in axes[0].patches]
    assert heights_on_page == sorted(heights_on_page, reverse=True)  # first method on top, as in the table
    assert "n/a" in [text.get_text() for text in axes[2].texts]
    assert figure.get_suptitle() == "CIFAR-10"


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
                           sample_indices=[1, 2], channel_reduction="max")
    image_axes = [ax for ax in figure.axes if ax.get_label() != "<colorbar>"]
    assert len(image_axes) == 2 * 3 * (1 + len(methods))  # samples x rows x (input + methods)
    assert len(figure.axes) == len(image_axes) + 1  # one shared colour bar

    titles = [ax.get_title() for ax in image_axes]
    assert "SmoothGrad" in titles and "MoreauGrad" in titles
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


def test_saved_pngs_are_valid_images(tmp_path, results):
    inputs, attacked_inputs, clean_maps, attacked_maps = _grid_inputs(METHODS, size=32)
    bar_path = save_figure(robustness_bar_chart(results), tmp_path / "figures" / "robustness.png", dpi=100)
    grid_path = save_figure(saliency_grid(inputs, attacked_inputs, clean_maps, attacked_maps),
                            tmp_path / "figures" / "saliency_grid.png", dpi=100)
    for path, figure_size in ((bar_path, (11.0, 1.6 + 0.32 * 9)), (grid_path, (1.3 * 10 + 1.0, None))):
        with Image.open(path) as image:
            assert image.format == "PNG"
            width, height = image.size
            image.verify()
        assert width == round(figure_size[0] * 100)
        assert 300 <= height <= 3000
        if figure_size[1] is not None:
            assert height == round(figure_size[1] * 100)
    with pytest.raises(ValueError, match=r"ending in \.png"):
        save_figure(robustness_bar_chart(results), tmp_path / "figure.jpg")


def test_save_figure_closes_pyplot_figures(tmp_path):
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(2, 2))
    figure.add_subplot().plot([0, 1], [1, 0])
    save_figure(figure, tmp_path / "line.png", dpi=50)
    assert not plt.fignum_exists(figure.number)
    with Image.open(tmp_path / "line.png") as image:
        assert image.size == (100, 100)


# ------------------------------------------------------------------------------------------------ TensorBoard


def test_log_to_tensorboard_writes_scalars_text_figures_and_images(tmp_path, results):
    methods = ("smoothgrad", "moreaugrad")
    results = {method: results[method] for method in methods}
    inputs, attacked_inputs, clean_maps, attacked_maps = _grid_inputs(methods)
    bar_chart = robustness_bar_chart(results)
    bar_chart.set_dpi(40)
    writer = SummaryWriter(log_dir=str(tmp_path))
    log_to_tensorboard(writer, results, figures={"robustness": bar_chart},
                       images={"moreaugrad/clean_maps": saliency_image_grid(clean_maps["moreaugrad"])},
                       step=3, run_info={"dataset": "digits", "epsilon": 0.5})
    assert isinstance(bar_chart, Figure) and bar_chart.axes  # still usable, e.g. for save_figure

    # Read while the writer is still open, as in a running Trainer.
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    writer.close()
    tags = events.Tags()
    numeric_keys = METRIC_KEYS
    assert set(tags["scalars"]) == {f"test/{m}/{key}" for m in methods for key in numeric_keys}
    for method in methods:
        for key in numeric_keys:
            (event,) = events.Scalars(f"test/{method}/{key}")
            assert event.step == 3
            assert event.value == pytest.approx(results[method][key], rel=1e-6)
    assert set(tags["images"]) == {"test/robustness", "test/moreaugrad/clean_maps"}
    (grid_event,) = events.Images("test/moreaugrad/clean_maps")
    assert (grid_event.width, grid_event.height) == (2 * 8 + 3 * 2, 8 + 2 * 2)
    (figure_event,) = events.Images("test/robustness")
    assert figure_event.width == round(11.0 * 40)
    text = events.Tensors("test/results/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text == format_results_table(results)
    run_info_text = events.Tensors("test/run_info/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "digits" in run_info_text and "0.5" in run_info_text


def test_log_to_tensorboard_rejects_bad_images_before_logging(tmp_path, results):
    with SummaryWriter(log_dir=str(tmp_path)) as writer:
        with pytest.raises(ValueError, match=r"images\['maps'\] must be a \(3, H, W\)"):
            log_to_tensorboard(writer, results, images={"maps": torch.rand(2, 3, 8, 8)})
        with pytest.raises(ValueError, match="results is empty"):
            log_to_tensorboard(writer, {})
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert events.Tags()["scalars"] == []
