"""The model-randomisation sanity check: Spearman against scipy, the randomised copy, and the flag in the results."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

import evaluate
from mglightning.explainers import SimpleGradient
from mglightning.explainers.base import Explanation, sample_counts
from mglightning.metrics import MapBatch, ModelRandomisation, control_maps, randomised_copy, spearman_correlation
from mglightning.models.layers import Normalize
from mglightning.reporting.statistics import control_flag
from test_evaluate import E, checkpoint, eval_args, results_of  # noqa: F401


class InputMap(SimpleGradient):
    """A 'map' that returns the input itself: it cannot depend on the model, so the check must flag it."""

    name = "input_map"
    display_name = "Input map"

    def _explain(self, inputs, target, seeds, create_graph, initial):
        return Explanation(inputs.detach().clone(), sample_counts(len(inputs), 0))


class NoisyInputMap(SimpleGradient):
    """The model-free control as a method: `x * N(0, 1)`, a fresh draw at every call (so the clean model's map and
    the randomised model's are independent, exactly as the control's two maps)."""

    name = "noisy_input_map"
    display_name = "Noisy input map"
    calls = 0

    def _explain(self, inputs, target, seeds, create_graph, initial):
        NoisyInputMap.calls += 1
        generator = torch.Generator().manual_seed(1000 + NoisyInputMap.calls)
        noisy = inputs.detach() * torch.randn(inputs.shape, generator=generator)
        return Explanation(noisy, sample_counts(len(inputs), 0))


class ZeroOnRandomModels(SimpleGradient):
    """The simple gradient on the trained model, an all-zero map on any other (as a sparse map can be)."""

    name = "zero_on_random"
    display_name = "Zero on random models"
    trained = None

    def _explain(self, inputs, target, seeds, create_graph, initial):
        explanation = super()._explain(inputs, target, seeds, create_graph, initial)
        if self.model is ZeroOnRandomModels.trained:
            return explanation
        return Explanation(torch.zeros_like(explanation.attribution), explanation.gradient_evaluations)


@pytest.mark.filterwarnings("ignore:An input array is constant")
@pytest.mark.parametrize("signed", [False, True])
def test_spearman_matches_scipy_with_ties_and_constant_maps_are_undefined(signed):
    generator = torch.Generator().manual_seed(0)
    first = torch.randn(6, 3, 4, 4, generator=generator)
    second = first + 0.5 * torch.randn(6, 3, 4, 4, generator=generator)
    first[1] = torch.where(first[1].abs() < 0.7, torch.zeros(()), first[1])  # many tied zeros
    second[2] = torch.where(second[2].abs() < 0.7, torch.zeros(()), second[2]).round(decimals=1)
    second[3] = 0.0  # constant: no rank order
    first[4] = 0.25  # constant but not zero
    second[5] = -second[5]
    values = spearman_correlation(first, second, signed=signed)
    for i in range(6):
        a, b = first[i].flatten().numpy(), second[i].flatten().numpy()
        expected = spearmanr(a, b).statistic if signed else spearmanr(np.abs(a), np.abs(b)).statistic
        if i in (3, 4):
            assert np.isnan(expected) and np.isnan(values[i].item())  # undefined, for scipy and for us
        else:
            assert values[i].item() == pytest.approx(expected, abs=1e-12)
    assert torch.isnan(spearman_correlation(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4))).all()
    flipped = spearman_correlation(first[[0]], -first[[0]], signed=signed).item()
    assert flipped == pytest.approx(-1.0 if signed else 1.0)  # magnitudes ignore the sign, signed ranks do not


def test_the_control_maps_are_independent_seeded_draws_times_the_input():
    images = 0.1 + torch.rand(1, 3, 8, 8).expand(3, 3, 8, 8)
    first, second = control_maps(images, torch.tensor([5, 6, 5]))
    assert torch.equal(first[0], first[2]) and not torch.equal(first[0], first[1])  # a function of the seed
    assert not torch.equal(first, second)
    again, _ = control_maps(images[1:2], torch.tensor([6]))
    assert torch.equal(again[0], first[1])  # whatever the batch
    noise = first / images
    assert abs(float(noise.mean())) < 0.15 and abs(float(noise.std()) - 1) < 0.1
    with pytest.raises(ValueError, match="seeds must have shape"):
        control_maps(images, torch.tensor([1, 2]))


@pytest.mark.parametrize("setting", [{"flag_above": float("nan")}, {"flag_above": 1.5}, {"flag_above": True},
                                     {"seed": 0.5}, {"cascade": 0}])
def test_bad_settings_are_refused_when_the_metric_is_built(setting):
    with pytest.raises(ValueError, match="ModelRandomisation"):
        ModelRandomisation(**setting)


def _net():
    torch.manual_seed(3)
    return nn.Sequential(Normalize([0.5] * 3, [0.25] * 3), nn.Conv2d(3, 4, 3), nn.Softplus(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 8), nn.Softplus(), nn.Linear(8, 3))


def test_randomised_copy_reinitialises_the_chosen_layers_from_its_seed():
    model = _net()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    full = randomised_copy(model, seed=1)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())  # untouched
    changed = {name for name, value in full.state_dict().items() if not torch.equal(before[name], value)}
    assert changed == {name for name in before if name.split(".")[-1] in ("weight", "bias")}
    assert torch.equal(full[0].mean, model[0].mean)  # the input normalisation is no layer to randomise
    again = randomised_copy(model, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), again.state_dict().values()))
    other = randomised_copy(model, seed=2)
    assert not torch.equal(other[6].weight, full[6].weight)
    top = randomised_copy(model, seed=1, cascade=1)  # only the output layer
    assert not torch.equal(top[6].weight, model[6].weight) and torch.equal(top[4].weight, model[4].weight)
    with pytest.raises(ValueError, match="cascade must be"):
        randomised_copy(model, cascade=0)


def _patterns(n: int, seed: int):
    """Three classes, each a bright 3x3 square at its own place on uniform noise (an image with structure: on flat
    grey the model-free control's maps are barely alike, and no method can be clearly less alike)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=generator)
    images = 0.6 * torch.rand(n, 3, 12, 12, generator=generator)
    for c in range(3):
        images[labels == c, :, 2 + 3 * c : 5 + 3 * c, 2 + 3 * c : 5 + 3 * c] += 0.4
    return images.clamp(0, 1), labels


def _trained_net():
    """A small softplus CNN trained to 100% on the patterns (150 Adam steps, about a second)."""
    torch.manual_seed(0)
    net = nn.Sequential(Normalize([0.5] * 3, [0.15] * 3), nn.Conv2d(3, 8, 3, padding=1), nn.Softplus(),
                        nn.Flatten(), nn.Linear(8 * 144, 3))
    images, labels = _patterns(256, 0)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        optimiser.zero_grad()
        nn.functional.cross_entropy(net(images), labels).backward()
        optimiser.step()
    return net.eval().requires_grad_(False)


def _sanity(explainer, model, images, labels, metric=None):
    """The sanity outputs of `explainer` on the samples, and the results' warning for them (None: it passes)."""
    metric = metric or ModelRandomisation()
    seeds = torch.arange(len(images))
    maps = explainer.attribute(images, labels, seeds=seeds)
    values = metric.measure(MapBatch(model, images, labels, maps, explainer=explainer, seeds=seeds))
    frame = pd.DataFrame({name: value.numpy() for name, value in values.items()})
    return values, control_flag(metric, "sanity", "sanity_control", frame, resamples=1000, seed=0)


def test_the_control_and_the_input_map_are_flagged_and_the_trained_simple_gradient_passes():
    model = _trained_net()
    images, labels = _patterns(32, 1)
    assert (model(images).argmax(1) == labels).all()
    values, warning = _sanity(SimpleGradient(model), model, images, labels)
    assert warning is None, warning
    assert values["sanity"].abs().mean() < 0.2 and values["sanity_control"].mean() > 0.3  # measured: -0.04, 0.41
    assert not values["sanity_undefined"].any()
    for method in (InputMap(model), NoisyInputMap(model)):
        values, warning = _sanity(method, model, images, labels)
        assert warning is not None and "not clearly less alike" in warning, type(method).__name__
    # The noisy input map is the control itself: its correlations are drawn like the control's.
    assert abs(float(values["sanity"].mean() - values["sanity_control"].mean())) < 0.1


def test_an_all_zero_map_on_the_randomised_model_is_undefined_and_never_a_pass():
    model = _trained_net()
    images, labels = _patterns(16, 1)
    ZeroOnRandomModels.trained = model
    values, warning = _sanity(ZeroOnRandomModels(model), model, images, labels)
    assert torch.isnan(values["sanity"]).all() and torch.isnan(values["sanity_signed"]).all()
    assert values["sanity_undefined"].tolist() == [1.0] * 16
    assert warning is not None and "16 of 16 samples undefined" in warning


def test_the_results_flag_a_method_whose_maps_do_not_depend_on_the_model(checkpoint, tmp_path, capsys):
    explainers = json.dumps({"simple_gradient": {"class_path": E + "SimpleGradient"},
                             "input_map": {"class_path": "test_sanity.InputMap"}})
    metrics = json.dumps({"topk": {"class_path": "mglightning.metrics.TopKIntersection"},
                          "sanity": {"class_path": "mglightning.metrics.ModelRandomisation",
                                     "init_args": {"flag_above": 0.99}}})
    cli = evaluate.cli_main(eval_args(checkpoint, tmp_path, "--model.metrics", metrics, explainers=explainers))
    results = results_of(Path(cli.model.run_dir))
    assert results["input_map"]["sanity"] == pytest.approx(1.0)
    assert results["input_map"]["sanity_signed"] == pytest.approx(1.0)
    assert 0 < results["input_map"]["sanity_control"] < 1
    assert results["simple_gradient"]["sanity"] < 1.0  # this 5-step model is barely trained: no claim about it
    counts = json.loads((Path(cli.model.run_dir) / "results.json").read_text())["results"]["input_map"]["counts"]
    assert counts == {"sanity_undefined": 0}
    printed = capsys.readouterr().out
    assert "WARNING: input_map: its maps keep a rank correlation of 1.00" in printed  # above flag_above
    assert " ⚠ |" in printed and "| sanity undefined n |" in printed and "sanity control abs ρ" in printed
