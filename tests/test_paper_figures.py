"""The paper's figures as commands (`figures.py fig2|fig3|fig4|fig7`) on a tiny digits classifier, and the numbers
behind them against direct computations."""

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import figures
from mglightning import load_classifier
from mglightning.data import DigitsDataModule
from mglightning.explainers import (
    IntegratedGradients,
    MoreauGrad,
    SimpleGradient,
    SmoothGrad,
    SparseMoreauGrad,
    SparsifiedSmoothGrad,
)
from mglightning.metrics import normalized_distance, zero_fraction
from mglightning.modules import ClassifierModule
from mglightning.paper_figures import discrepancy_curves, figure2_maps, select_samples, sparsity_matched_curves
from mglightning.units import model_std, scalar_std

DATA = ["--data.class_path", "mglightning.data.DigitsDataModule", "--data.init_args.image_size", "16"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A width-4 softplus ResNet-18 on 16x16 digits, trained for a few steps (it still misclassifies many)."""
    torch.manual_seed(0)
    datamodule = DigitsDataModule(batch_size=64, image_size=16)
    module = ClassifierModule(
        num_classes=10, image_size=16, mean=datamodule.mean, std=datamodule.std, model_kwargs={"width": 4}, lr=0.05
    )
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=4, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )
    trainer.fit(module, datamodule=datamodule)
    path = tmp_path_factory.mktemp("classifier") / "digits16.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def model_and_samples(checkpoint):
    model = load_classifier(checkpoint)
    datamodule = DigitsDataModule(image_size=16)
    datamodule.setup("test")
    return model, select_samples(model, datamodule.test_dataset, 3)


def assert_written(folder: Path, name: str) -> None:
    png = folder / f"{name}.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = list(folder.glob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(folder), size_guidance={"images": 0}).Reload()
    assert f"paper/{name}" in accumulator.Tags()["images"]


def test_fig2_command(checkpoint, tmp_path):
    figures.cli_main(["fig2", "--ckpt_path", str(checkpoint), *DATA, "--output_dir", str(tmp_path), "--samples", "1",
                      "--rhos", "[0, 0.5]", "--etas", "[0, 0.02]", "--num_steps", "3"])
    assert_written(tmp_path, "figure2")
    numbers = json.loads((tmp_path / "figure2.json").read_text())
    assert numbers["discrepancy_by_rho"]["0"] == 0 and set(numbers["zero_share_by_eta"]) == {"0", "0.02"}


def test_fig3_command(checkpoint, tmp_path):
    figures.cli_main(["fig3", "--ckpt_path", str(checkpoint), *DATA, "--output_dir", str(tmp_path), "--samples", "3",
                      "--rhos", "[0.1, 1]", "--sigmas", "[0.05, 0.2]", "--num_steps", "3", "--nt_samples", "2",
                      "--ig_steps", "4"])
    assert_written(tmp_path, "figure3")
    assert (tmp_path / "figure3.json").is_file()


def test_fig4_command(checkpoint, tmp_path):
    figures.cli_main(["fig4", "--ckpt_path", str(checkpoint), *DATA, "--output_dir", str(tmp_path), "--samples", "1",
                      "--methods", "[simple_gradient, deeplift, moreaugrad, group_sparse_moreaugrad]",
                      "--settings", '{"moreaugrad": {"num_steps": 2, "noise_samples": 2}, '
                      '"group_sparse_moreaugrad": {"num_steps": 2, "noise_samples": 2}}'])
    assert_written(tmp_path, "figure4")


def test_fig7_command(checkpoint, tmp_path):
    figures.cli_main(["fig7", "--ckpt_path", str(checkpoint), *DATA, "--output_dir", str(tmp_path), "--samples", "2",
                      "--units", "pixels"])
    assert_written(tmp_path, "figure7")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt_path"):
        figures.cli_main(["fig2", "--ckpt_path", str(tmp_path / "none.ckpt"), *DATA])


def test_misclassified_samples_are_all_misclassified(checkpoint):
    model = load_classifier(checkpoint)
    datamodule = DigitsDataModule(image_size=16)
    datamodule.setup("test")
    wrong = select_samples(model, datamodule.test_dataset, 5, misclassified=True, batch_size=7)
    assert len(wrong.indices) == 5 and (wrong.predictions != wrong.labels).all()
    for image, index in zip(wrong.images, wrong.indices.tolist()):
        assert torch.equal(image, datamodule.test_dataset[index][0])


def test_figure2_maps_tend_to_the_simple_gradient_and_sparsify(model_and_samples):
    model, samples = model_and_samples
    by_rho, by_eta = figure2_maps(model, samples, rhos=[0.0, 1e-4, 0.1, 1.0], etas=[0.0, 1e-5, 1e-4], num_steps=150)
    gradient = SimpleGradient(model).attribute(samples.images, samples.predictions)
    torch.testing.assert_close(by_rho[0.0], gradient)
    distance = {rho: float(normalized_distance(maps, gradient).mean()) for rho, maps in by_rho.items()}
    # MoreauGrad -> simple gradient as rho -> 0 (the distance shrinks about linearly with rho)
    assert 0 < distance[1e-4] < 1e-2 * distance[1.0] and distance[0.1] < distance[1.0]
    # eta = 0 is vanilla MoreauGrad at sparse_rho = 1 (normalised); larger eta, more exact zeros.
    torch.testing.assert_close(by_eta[0.0], by_rho[1.0])
    zeros = [float(zero_fraction(by_eta[eta]).mean()) for eta in (0.0, 1e-5, 1e-4)]  # tiny gradients: tiny etas
    assert zeros[0] == 0 and zeros[0] < zeros[1] < zeros[2]


def test_figure2_converts_normalised_units_with_the_model_std(model_and_samples):
    model, samples = model_and_samples
    s = scalar_std(model_std(model))
    normalised, _ = figure2_maps(model, samples, rhos=[0.5], etas=[], num_steps=5)
    pixels, _ = figure2_maps(model, samples, rhos=[0.5 * s**2], etas=[], num_steps=5, units="pixels")
    torch.testing.assert_close(normalised[0.5], pixels[0.5 * s**2])


def test_discrepancy_curves_match_direct_computation(model_and_samples):
    model, samples = model_and_samples
    curves = discrepancy_curves(model, samples, rhos=[0.2], sigmas=[0.1], num_steps=4, nt_samples=3, ig_steps=5,
                                units="pixels")
    target, images = samples.predictions, samples.images
    gradient = SimpleGradient(model).attribute(images, target)
    moreau = MoreauGrad(model, rho=0.2, step_size=0.02, num_steps=4, noise_std=0.0).attribute(images, target)
    smooth = SmoothGrad(model, stdevs=0.1, nt_samples=3).attribute(images, target, seeds=samples.seeds)
    integrated = IntegratedGradients(model, n_steps=5).attribute(images, target)
    for value, maps in ((curves.moreaugrad[0], moreau), (curves.smoothgrad[0], smooth),
                        (curves.integrated_gradients, integrated)):
        assert value == pytest.approx(float(normalized_distance(maps, gradient).mean()), abs=1e-4)
    low, high = curves.moreaugrad_ci[0]
    assert low <= curves.moreaugrad[0] <= high


def test_figure2_has_a_colour_bar_on_the_maps_scale(tmp_path):
    from mglightning.paper_figures import Samples, figure2
    from mglightning.reporting import save_figure

    generator = torch.Generator().manual_seed(0)
    samples = Samples(images=torch.rand(2, 3, 8, 8, generator=generator), labels=torch.tensor([1, 2]),
                      predictions=torch.tensor([1, 3]), indices=torch.tensor([5, 9]))
    by_rho = {rho: torch.randn(2, 3, 8, 8, generator=generator) for rho in (0.0, 0.1)}
    by_eta = {eta: torch.randn(2, 3, 8, 8, generator=generator) for eta in (0.0, 0.01)}
    figure = figure2(samples, by_rho, by_eta)
    # The maps' axes hold images; the colour bar is the one axes with a colour scale and no image.
    colour_bars = [ax for ax in figure.axes if ax.get_label() == "<colorbar>"]
    assert len(colour_bars) == 1
    assert colour_bars[0].get_ylim() == (0.0, 1.0)
    assert "|attribution|" in colour_bars[0].get_ylabel()
    assert save_figure(figure, tmp_path / "figure2.png").is_file()


def test_fig3_sparse_command_holds_sparse_moreaugrad_at_sparsified_smoothgrads_zero_share(checkpoint, tmp_path):
    figures.cli_main(["fig3_sparse", "--ckpt_path", str(checkpoint), *DATA, "--output_dir", str(tmp_path),
                      "--samples", "3", "--rhos", "[0.3, 1]", "--sigmas", "[0.05, 0.2]", "--match_sigma", "0.2",
                      "--num_steps", "20", "--nt_samples", "4"])
    assert_written(tmp_path, "figure3_sparse")
    numbers = json.loads((tmp_path / "figure3_sparse.json").read_text())
    assert numbers["matched_to"] == "sparsified_smoothgrad at sigma=0.2" and numbers["samples"] == 3
    # The matched share is Sparsified SmoothGrad's mean zero share at sigma = 0.2, computed here directly ...
    model = load_classifier(checkpoint)
    datamodule = DigitsDataModule(image_size=16)
    datamodule.setup("test")
    samples = select_samples(model, datamodule.test_dataset, 3)
    maps = SparsifiedSmoothGrad(model, stdevs=0.2, nt_samples=4).attribute(samples.images, samples.predictions,
                                                                           seeds=samples.seeds)
    assert numbers["zero_fraction"] == pytest.approx(float(zero_fraction(maps).mean()), abs=1e-6)
    assert 0 < numbers["zero_fraction"] < 1
    # ... and every Sparse MoreauGrad map has it, within the search's tolerance, at every rho.
    for low, high in numbers["sparse_moreaugrad_zero_range"]:
        assert numbers["zero_fraction"] - 0.01 <= low <= high <= numbers["zero_fraction"] + 0.01


def test_sparsity_matched_curves_at_a_given_share_match_direct_computation(model_and_samples):
    model, samples = model_and_samples
    curves = sparsity_matched_curves(model, samples, rhos=[0.2], sigmas=[0.1], target_zero_fraction=0.6, num_steps=10,
                                     nt_samples=3, units="pixels")
    assert curves.matched_to == "given" and curves.zero_fraction == 0.6
    target, images = samples.predictions, samples.images
    gradient = SimpleGradient(model).attribute(images, target)
    sparse = SparseMoreauGrad(model, rho=0.2, step_size=0.02, num_steps=10, noise_std=0.0,
                              target_zero_fraction=0.6).attribute(images, target)
    sparsified = SparsifiedSmoothGrad(model, stdevs=0.1, nt_samples=3).attribute(images, target, seeds=samples.seeds)
    assert curves.sparse_moreaugrad[0] == pytest.approx(float(normalized_distance(sparse, gradient).mean()), abs=1e-4)
    assert curves.sparsified_smoothgrad[0] == pytest.approx(
        float(normalized_distance(sparsified, gradient).mean()), abs=1e-4)
    assert curves.sparsified_smoothgrad_zero[0] == pytest.approx(float(zero_fraction(sparsified).mean()), abs=1e-4)
    with pytest.raises(ValueError, match="match_sigma=0.3 must be one of sigmas"):
        sparsity_matched_curves(model, samples, rhos=[0.2], sigmas=[0.1], match_sigma=0.3)
