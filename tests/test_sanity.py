"""The model-randomisation sanity check: Spearman against scipy, the randomised copy, and the flag in the results."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

import evaluate
from mglightning.explainers import SimpleGradient
from mglightning.explainers.gradients import record_gradient_evaluations
from mglightning.metrics import MapBatch, ModelRandomisation, randomised_copy, spearman_correlation
from mglightning.models.layers import Normalize
from test_evaluate import E, checkpoint, eval_args, results_of  # noqa: F401


class InputMap(SimpleGradient):
    """A 'map' that returns the input itself: it cannot depend on the model, so the check must flag it."""

    name = "input_map"
    display_name = "Input map"

    def _attribute(self, inputs, target, seeds, create_graph):
        record_gradient_evaluations(self, len(inputs), 0)
        return inputs.detach().clone()


@pytest.mark.filterwarnings("ignore:An input array is constant")
def test_spearman_matches_scipy_with_ties_and_constant_maps():
    generator = torch.Generator().manual_seed(0)
    first = torch.randn(5, 3, 4, 4, generator=generator)
    second = first + 0.5 * torch.randn(5, 3, 4, 4, generator=generator)
    first[1] = torch.where(first[1].abs() < 0.7, torch.zeros(()), first[1])  # many tied zeros
    second[2] = torch.where(second[2].abs() < 0.7, torch.zeros(()), second[2]).round(decimals=1)
    second[3] = 0.0  # constant: no rank order
    values = spearman_correlation(first, second)
    for i in range(5):
        expected = spearmanr(first[i].abs().flatten().numpy(), second[i].abs().flatten().numpy()).statistic
        if i == 3:
            assert np.isnan(expected) and values[i] == 0.0  # undefined for scipy; no order kept, for us
        else:
            assert values[i].item() == pytest.approx(expected, abs=1e-12)
    both_constant = spearman_correlation(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4))
    assert both_constant.tolist() == [1.0]
    assert spearman_correlation(first, -first).tolist() == pytest.approx([1.0] * 5)  # magnitudes are compared


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
    """Three classes, each a bright 3x3 square at its own place on grey noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=generator)
    images = 0.5 + 0.1 * torch.randn(n, 3, 12, 12, generator=generator)
    for c in range(3):
        images[labels == c, :, 2 + 3 * c : 5 + 3 * c, 2 + 3 * c : 5 + 3 * c] += 0.35
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


def test_the_input_map_is_flagged_and_the_trained_simple_gradient_is_not():
    model = _trained_net()
    images, labels = _patterns(16, 1)
    assert (model(images).argmax(1) == labels).all()
    seeds = torch.arange(16)
    metric = ModelRandomisation()
    for explainer, flagged in ((InputMap(model), True), (SimpleGradient(model), False)):
        maps = explainer.attribute(images, labels, seeds=seeds)
        values = metric.measure(MapBatch(model, images, labels, maps, explainer=explainer, seeds=seeds))["sanity"]
        assert (values.mean() > metric.flag_above) == flagged, (type(explainer).__name__, values.mean())
    assert values.abs().mean() < 0.2  # the trained net's simple gradient decorrelates (measured: 0.07)


def test_the_results_flag_a_method_whose_maps_do_not_depend_on_the_model(checkpoint, tmp_path, capsys):
    explainers = json.dumps({"simple_gradient": {"class_path": E + "SimpleGradient"},
                             "input_map": {"class_path": "test_sanity.InputMap"}})
    metrics = json.dumps({"topk": {"class_path": "mglightning.metrics.TopKIntersection"},
                          "sanity": {"class_path": "mglightning.metrics.ModelRandomisation"}})
    cli = evaluate.cli_main(eval_args(checkpoint, tmp_path, "--model.metrics", metrics, explainers=explainers))
    results = results_of(Path(cli.model.run_dir))
    assert results["input_map"]["sanity"] == pytest.approx(1.0)
    assert results["simple_gradient"]["sanity"] < 1.0  # this 5-step model is barely trained: no claim about it
    printed = capsys.readouterr().out
    assert "WARNING: input_map: its maps keep a rank correlation of 1.00" in printed
    assert " ⚠ |" in printed
