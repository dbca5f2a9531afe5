"""The robustness-fidelity frontier (`figures.py frontier`, mglightning.frontier) on a tiny digits classifier."""

import json

import pytest

import figures
from mglightning.explainers import MoreauGrad, SimpleGradient
from mglightning.frontier import robustness_fidelity_frontier
from mglightning.metrics import deletion_insertion_auc, normalized_distance
from test_paper_figures import DATA, assert_written, checkpoint, model_and_samples  # noqa: F401

TINY = {"num_steps": 3, "noise_std": 0.0, "noise_samples": 1, "average_last": 0, "nt_samples": 2,
        "attack_steps": 1, "deletion_steps": 4, "batch_size": 2}


def test_the_frontier_matches_direct_computations(model_and_samples):
    model, samples = model_and_samples
    result = robustness_fidelity_frontier(model, samples, rhos=[1e-4, 3.0], sigmas=[0.05],
                                          epsilon=0.5, **TINY)
    points = result["points"]
    assert [(p["method"], p["value"]) for p in points][:2] == [("simple_gradient", 0.0), ("moreaugrad", 1e-4)]
    assert len(points) == 4 and result["samples"] == 3
    origin, tiny_rho = points[0], points[1]
    assert origin["discrepancy"] == pytest.approx(0.0, abs=1e-5) and origin["evals_per_image"] > 0 and origin["seconds"] >= 0
    # The simple gradient's deletion AUC, from the metric's per-sample function.
    maps = SimpleGradient(model).attribute(samples.images, samples.predictions)
    deletion, _ = deletion_insertion_auc(model, samples.images, maps, samples.predictions, steps=4)
    assert origin["deletion_auc"] == pytest.approx(float(deletion.mean()), abs=1e-6)
    # MoreauGrad at a tiny rho is the simple gradient's map (Theorem 1 as rho -> 0).
    assert tiny_rho["discrepancy"] < 0.01
    rho = points[2]  # rho = 3: its discrepancy, directly
    direct = MoreauGrad(model, rho=3.0, step_size=0.3, num_steps=3, noise_std=0.0).attribute(
        samples.images, samples.predictions, seeds=samples.seeds)
    assert rho["discrepancy"] == pytest.approx(float(normalized_distance(direct, maps).mean()), rel=1e-3)
    assert rho["discrepancy"] > 100 * tiny_rho["discrepancy"]
    for point in points:
        low, high = point["topk_ci"]
        assert 0 <= low <= point["topk"] <= high <= 1
    with pytest.raises(ValueError, match="rhos and sigmas"):
        robustness_fidelity_frontier(model, samples, rhos=[], sigmas=[0.1], epsilon=0.5)


def test_the_frontier_command_writes_its_figure_and_numbers(checkpoint, tmp_path):
    figures.cli_main(["frontier", "--classifier", str(checkpoint), *DATA, "--output_dir", str(tmp_path),
                      "--samples", "2", "--epsilon", "0.5", "--rhos", "[0.01, 0.03, 0.1, 0.3]",
                      "--sigmas", "[0.02, 0.05, 0.1, 0.2]",
                      *[f"--{key}={value}" for key, value in TINY.items()]])
    assert_written(tmp_path, "frontier")
    numbers = json.loads((tmp_path / "frontier.json").read_text())
    assert [p["method"] for p in numbers["points"]].count("moreaugrad") == 4
    assert [p["method"] for p in numbers["points"]].count("smoothgrad") == 4
    assert numbers["attacks"] == ["own", "exact", "transfer", "noise"] and numbers["classifier"] == str(checkpoint)
