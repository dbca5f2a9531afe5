"""Unit conversion of the paper's settings (docs/reference/semantics.md section 3): a Moreau solve in the model's normalised
input space equals the pixel-space solve with the converted settings, iterate by iterate, up to the std scaling."""

import math

import pytest
import torch
from torch import nn

from mglightning.explainers import MoreauGrad, SparseMoreauGrad
from mglightning.models import create_model
from mglightning.models.layers import Normalize
from mglightning.units import model_std, scalar_std, to_normalised_units, to_pixel_units

SHAPE = (3, 4, 4)


def normalised_net():
    """A softplus CNN that takes normalised images (what the paper's code explains)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.Softplus(), nn.Flatten(), nn.Linear(6 * 16, 5)
    ).double().eval()


def pixel_model(net, mean, std):
    """The same network behind its normalisation layer: it takes [0, 1] pixels (what mglightning explains)."""
    return nn.Sequential(Normalize(mean, std), net).double().eval()


@pytest.fixture
def problem():
    torch.manual_seed(1)
    images = torch.rand(4, *SHAPE, dtype=torch.float64)
    return images, torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize(
    "explainer, paper",
    [
        (MoreauGrad, {"rho": 1.0, "step_size": 0.1, "noise_std": 0.0}),
        (MoreauGrad, {"rho": 0.5, "step_size": 0.2, "noise_std": 0.0}),
        (SparseMoreauGrad, {"rho": 1.0, "step_size": 0.1, "noise_std": 0.0, "eta": 0.05}),
    ],
    ids=["moreaugrad", "moreaugrad_rho0.5", "sparse_moreaugrad"],
)
def test_normalised_solve_equals_converted_pixel_solve(problem, explainer, paper):
    images, target = problem
    mean, s = (0.4, 0.5, 0.6), 0.3
    std = (s, s, s)
    net = normalised_net()
    normalised_inputs = (images - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / s
    in_normalised = explainer(net, num_steps=60, **paper)
    solved_normalised = in_normalised.explain(normalised_inputs, target)
    map_normalised = solved_normalised.attribution
    in_pixels = explainer(pixel_model(net, mean, std), num_steps=60, **to_pixel_units(paper, std))
    solved_pixels = in_pixels.explain(images, target)
    map_pixels = solved_pixels.attribution
    # Every iterate maps exactly: d_pix = s * d_n, so MG_pix = (-d_pix / rho_pix) = MG_n / s.
    torch.testing.assert_close(solved_pixels.solution, s * solved_normalised.solution)
    torch.testing.assert_close(map_pixels, map_normalised / s)
    assert map_pixels.abs().max() > 0
    if "eta" in paper:  # the L1 threshold converts too: the same entries are exactly zero
        assert torch.equal(map_pixels == 0, map_normalised == 0) and (map_pixels == 0).any()


def test_noisy_solve_equals_pixel_solve_with_noise_scaled_by_std(problem):
    """Regularised mode: an absolute noise level converts like a length (`sigma_pix = sigma_n * s`); the official
    code's noise is relative to the input's range (`sigma * (x_n.max() - x_n.min())`, about `sigma / s` in
    normalised units), which is why the paper's noise is about `sigma` pixels and is not converted."""
    images, target = problem
    s, mean = 0.25, (0.5, 0.5, 0.5)
    net = normalised_net()
    seeds = torch.tensor([3, 1, 4, 1])
    paper = {"rho": 1.0, "step_size": 0.1}
    in_normalised = MoreauGrad(net, num_steps=20, noise_std=0.4, noise_samples=3, **paper)
    map_normalised = in_normalised.attribute((images - 0.5) / s, target, seeds=seeds)
    in_pixels = MoreauGrad(
        pixel_model(net, mean, (s,) * 3), num_steps=20, noise_std=0.4 * s, noise_samples=3,
        **to_pixel_units(paper, s),
    )
    torch.testing.assert_close(in_pixels.attribute(images, target, seeds=seeds), map_normalised / s)


def test_per_channel_std_is_close_to_the_exact_weighted_problem(problem):
    """With one std per channel the exact pixel problem weights the channels; the scalar reduction is close."""
    images, target = problem
    std = (0.2470, 0.2435, 0.2616)  # CIFAR-10
    net = normalised_net()
    mean = torch.tensor((0.49, 0.48, 0.45), dtype=torch.float64).view(1, 3, 1, 1)
    per_channel = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    exact = MoreauGrad(net, rho=1.0, step_size=0.1, num_steps=60, noise_std=0.0)
    exact_solution = exact.explain((images - mean) / per_channel, target).solution
    converted = MoreauGrad(
        pixel_model(net, mean.flatten().tolist(), std), num_steps=60, noise_std=0.0,
        **to_pixel_units({"rho": 1.0, "step_size": 0.1}, std),
    )
    converted_solution = converted.explain(images, target).solution
    expected = exact_solution * per_channel  # the exact solution, in pixels
    cosine = torch.nn.functional.cosine_similarity(converted_solution.flatten(1), expected.flatten(1))
    assert (cosine > 0.995).all()
    relative = (converted_solution - expected).flatten(1).norm(dim=1) / expected.flatten(1).norm(dim=1)
    assert (relative < 0.08).all()  # about 6%: the channels' own rho_n * s_c^2 differ by up to 15%


def test_conversion_factors():
    paper = {"rho": 1.0, "step_size": 0.1, "eta": 0.005, "epsilon": [0.3, 1, 3, 10], "attack_step_size": 0.01,
             "num_steps": 300, "noise_std": 0.1, "noise_samples": 32, "group_size": 14}
    pixels = to_pixel_units(paper, 0.25)
    assert pixels.pop("epsilon") == pytest.approx([0.075, 0.25, 0.75, 2.5])
    assert pixels == pytest.approx(
        {"rho": 0.0625, "step_size": 0.00625, "eta": 0.02, "attack_step_size": 0.0025, "num_steps": 300,
         "noise_std": 0.1, "noise_samples": 32, "group_size": 14}
    )
    back = to_normalised_units(to_pixel_units(paper, 0.25), 0.25)
    assert back.pop("epsilon") == pytest.approx(paper.pop("epsilon"))
    assert back == pytest.approx(paper)


def test_scalar_std_of_channels_is_the_quadratic_harmonic_mean():
    std = [0.2, 0.25, 0.4]
    expected = 1 / math.sqrt(sum(1 / v**2 for v in std) / 3)
    assert scalar_std(std) == pytest.approx(expected)
    assert scalar_std(torch.tensor(std).view(1, 3, 1, 1)) == pytest.approx(expected)
    assert min(std) < scalar_std(std) < sum(std) / 3
    assert scalar_std([0.3, 0.3, 0.3]) == pytest.approx(0.3)


def test_model_std_reads_the_normalisation_layer():
    model = create_model("resnet18", num_classes=3, width=4, std=(0.5, 0.25, 0.125))
    assert model_std(model) == (0.5, 0.25, 0.125)
    with pytest.raises(ValueError, match="no mglightning Normalize layer"):
        model_std(nn.Linear(3, 2))


@pytest.mark.parametrize(
    "settings, std, message",
    [({"rho": 1.0}, 0.0, "std"), ({"rho": 1.0}, [0.2, -0.1], "std"), ({"rho": "one"}, 0.2, "rho"),
     ({"epsilon": [1.0, math.nan]}, 0.2, "epsilon"), ([("rho", 1.0)], 0.2, "mapping")],
)
def test_bad_input_is_refused(settings, std, message):
    with pytest.raises(ValueError, match=message):
        to_pixel_units(settings, std)
