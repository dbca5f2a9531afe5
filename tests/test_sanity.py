"""The model-parameter randomisation sanity check: the rank correlation against scipy, the randomised copy's
layers, and the check itself on cases with a known answer (a map that returns the input must be flagged, the
simple gradient of a trained network must pass)."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from mglightning.data.synthetic import make_synthetic_images
from mglightning.explainers import Explainer, SimpleGradient, SmoothGrad
from mglightning.metrics import (
    RandomisationCorrelation,
    model_randomisation_check,
    randomisable_layers,
    randomised_copy,
    rank_correlation,
)
from mglightning.models.layers import Normalize
from mglightning.models.resnet import resnet18


def test_rank_correlation_matches_scipy_with_ties():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(6, 2, 5, 5, generator=generator, dtype=torch.float64)
    b = a + 0.8 * torch.randn(6, 2, 5, 5, generator=generator, dtype=torch.float64)
    # Many ties: rounded values (|a| ties between +x and -x too) and exact zeros, as sparse maps have.
    a, b = a.round(decimals=1), b.round(decimals=0)
    a[0, :, :2] = 0
    b[1] = torch.where(b[1].abs() > 1, b[1], 0)
    expected = [spearmanr(x.abs().flatten().numpy(), y.abs().flatten().numpy()).statistic for x, y in zip(a, b)]
    torch.testing.assert_close(rank_correlation(a, b), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    # Magnitudes: the sign of a map does not matter; the order of the two batches does not either.
    torch.testing.assert_close(rank_correlation(-a, b), rank_correlation(b, a), rtol=0, atol=1e-12)


def test_rank_correlation_is_nan_for_a_constant_map_and_exact_for_monotone_ones():
    maps = torch.rand(3, 1, 4, 4)
    other = maps.clone()
    other[0] = 0  # constant: no order, as scipy (which returns nan)
    other[1] = maps[1] ** 3 * 7  # a monotone transform of the magnitudes: correlation exactly 1
    correlation = rank_correlation(maps, other)
    assert math.isnan(correlation[0]) and correlation[1] == pytest.approx(1.0, abs=1e-12)
    reversed_order = rank_correlation(torch.arange(1.0, 10).view(1, 1, 3, 3), torch.arange(9.0, 0, -1).view(1, 1, 3, 3))
    assert reversed_order.item() == pytest.approx(-1.0, abs=1e-12)


def test_randomisation_correlation_metric_skips_undefined_samples():
    maps = torch.rand(4, 1, 4, 4)
    other = torch.rand(4, 1, 4, 4)
    other[2] = 0
    metric = RandomisationCorrelation()
    metric.update(maps[:2], other[:2])
    metric.update(maps[2:], other[2:])
    per_sample = rank_correlation(maps, other)
    assert metric.compute().item() == pytest.approx(per_sample[[0, 1, 3]].mean().item(), abs=1e-12)
    assert metric.undefined.item() == 1


def _perturbed_resnet() -> nn.Module:
    """A tiny ResNet whose every parameter has moved from its initial value (as training would)."""
    model = resnet18(num_classes=3, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4), width=4).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5 + torch.rand_like(parameter))
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.add_(0.3)
    return model


def _changed(original: nn.Module, copied: nn.Module) -> dict[str, bool]:
    """Per randomisable layer name: whether any of its parameters differs between the two models."""
    copied_layers = dict(randomisable_layers(copied))
    return {
        name: any(not torch.equal(p, q) for p, q in zip(layer.parameters(False), copied_layers[name].parameters(False)))
        for name, layer in randomisable_layers(original)
    }


def test_randomised_copy_reinitialises_every_layer_but_the_input_normalisation():
    model = _perturbed_resnet()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    rng_state = torch.random.get_rng_state()
    copied = randomised_copy(model, seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # the global RNG is untouched
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())  # model untouched
    assert all(_changed(model, copied).values())
    normalize = [m for m in copied.modules() if isinstance(m, Normalize)]
    assert len(normalize) == 1 and torch.equal(normalize[0].std, model.normalize.std)
    assert torch.equal(normalize[0].mean, model.normalize.mean)
    # Batch norm layers are reset as PyTorch initialises them, running statistics included.
    assert torch.equal(copied.bn1.weight, torch.ones_like(copied.bn1.weight))
    assert torch.equal(copied.bn1.running_mean, torch.zeros_like(copied.bn1.running_mean))
    assert not copied.training
    # Deterministic from the seed; another seed gives other weights.
    again = randomised_copy(model, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(copied.parameters(), again.parameters()))
    assert not torch.equal(randomised_copy(model, seed=4).fc.weight, copied.fc.weight)


def test_cascade_reinitialises_the_last_layers_and_nests():
    model = _perturbed_resnet()
    names = [name for name, _ in randomisable_layers(model)]
    assert names[0] == "conv1" and names[-1] == "fc"
    for k in (1, 3):
        changed = _changed(model, randomised_copy(model, seed=0, cascade=k))
        assert [name for name, moved in changed.items() if moved] == names[-k:]
    one, three = randomised_copy(model, seed=0, cascade=1), randomised_copy(model, seed=0, cascade=3)
    assert torch.equal(one.fc.weight, three.fc.weight)  # the output layer is drawn first in every cascade
    full = randomised_copy(model, seed=0)
    assert torch.equal(full.fc.weight, one.fc.weight)
    with pytest.raises(ValueError, match=rf"cascade must be an int from 1 .* to {len(names)}"):
        randomised_copy(model, cascade=len(names) + 1)


def test_a_layer_without_reset_parameters_is_a_clear_error():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return self.gain * x

    with pytest.raises(ValueError, match=r"'1' \(Scale\) has parameters but no reset_parameters"):
        randomised_copy(nn.Sequential(nn.Flatten(), Scale()))


class InputMap(Explainer):
    """A "map" that is the input itself: it does not depend on the model at all."""

    name = "input_map"
    display_name = "Input"
    family = "gradient"

    def _attribute(self, inputs, target, seeds, create_graph):
        self.last_sample_gradient_evaluations = torch.zeros(inputs.shape[0], dtype=torch.long)
        return inputs.clone()


@pytest.fixture(scope="module")
def trained():
    """A small CNN trained for 300 steps on separable synthetic images (test accuracy checked), and test images."""
    torch.manual_seed(0)
    images, labels = make_synthetic_images(600, 4, 12, 1, noise_std=0.15, seed=0)
    model = nn.Sequential(
        Normalize([0.5], [0.25]),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.Softplus(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.Softplus(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 4),
    )
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(300):
        batch = torch.randint(0, 500, (32,))
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    test_images, test_labels = images[500:532], labels[500:532]
    with torch.no_grad():
        predictions = model(test_images).argmax(1)
    assert (predictions == test_labels).float().mean() > 0.95
    return model, test_images, predictions


def test_a_map_that_returns_the_input_is_flagged(trained):
    model, images, target = trained
    check = model_randomisation_check(InputMap, model, images, target)
    torch.testing.assert_close(check.correlation, torch.ones(len(images), dtype=torch.float64))
    assert check.flagged and check.mean == pytest.approx(1.0)


def test_the_simple_gradient_of_a_trained_network_passes(trained):
    model, images, target = trained
    for cascade in (None, 1):
        check = model_randomisation_check(SimpleGradient, model, images, target, seed=1, cascade=cascade)
        assert not check.flagged and check.mean < 0.5 and check.cascade == cascade
    # The check's two calls are the plain attribute calls on the two models.
    random_model = randomised_copy(model, 1)
    expected = rank_correlation(
        SimpleGradient(model).attribute(images, target), SimpleGradient(random_model).attribute(images, target)
    )
    check = model_randomisation_check(SimpleGradient, model, images, target, seed=1)
    torch.testing.assert_close(check.correlation, expected)


def test_noisy_methods_see_the_same_noise_on_both_models(trained):
    model, images, target = trained
    seeds = torch.arange(len(images))
    check = model_randomisation_check(lambda m: SmoothGrad(m, stdevs=0.2, nt_samples=4), model, images, target,
                                      seeds=seeds)
    maps = SmoothGrad(model, stdevs=0.2, nt_samples=4).attribute(images, target, seeds=seeds)
    random_maps = SmoothGrad(randomised_copy(model), stdevs=0.2, nt_samples=4).attribute(images, target, seeds=seeds)
    torch.testing.assert_close(check.correlation, rank_correlation(maps, random_maps))


def test_quantus_mprt_gives_the_same_correlations(trained):
    quantus = pytest.importorskip("quantus")
    model, images, target = trained

    def explain(model, inputs, targets, **kwargs):
        inputs = torch.as_tensor(inputs, dtype=torch.float32)
        return SimpleGradient(model).attribute(inputs, torch.as_tensor(targets)).detach().numpy()

    # Quantus re-initialises every layer with reset_parameters, top down, reseeding before each one; give both
    # sides Quantus's final (fully randomised) model and compare the per-sample correlations.
    metric = quantus.MPRT(layer_order="top_down", seed=5, return_last_correlation=True, disable_warnings=True)
    scores = metric(model=model, x_batch=images.numpy(), y_batch=target.numpy(), a_batch=None, explain_func=explain,
                    device="cpu", batch_size=len(images))
    quantus_random = quantus.helpers.model.pytorch_model.PyTorchModel(model, channel_first=True)
    *_, (_, last) = quantus_random.get_random_layer_generator(order="top_down", seed=5)
    ours = rank_correlation(
        SimpleGradient(model).attribute(images, target), SimpleGradient(last).attribute(images, target)
    )
    np.testing.assert_allclose(ours.numpy(), np.asarray(scores, dtype=np.float64), rtol=0, atol=1e-6)
