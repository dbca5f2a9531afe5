"""The multi-model study (mglightning.reporting.study) and Corollary 1 against measurement in the records."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mglightning.evaluation import measure_batch
from mglightning.evaluation.description import AttackSpec, MetricSpec, RowSpec, RunDescription
from mglightning.evaluation.records import Record, RecordWriter
from mglightning.explainers import MoreauGrad, SimpleGradient
from mglightning.explainers.diagnostics import corollary_bound
from mglightning.models.layers import Normalize
from mglightning.reporting.study import hierarchical_bootstrap, main, study_markdown, study_results
from mglightning.attacks import TopKInterpretationAttack
from mglightning.metrics import TopKIntersection


def _brute_force(groups, resamples, confidence, seed):
    """The same draws as `hierarchical_bootstrap`, consumed by a plain double loop over resamples and models."""
    rng = np.random.default_rng(seed)
    count, longest = len(groups), max(len(group) for group in groups)
    picks = rng.integers(0, count, size=(resamples, count))
    uniforms = rng.random(size=(resamples, count, longest))
    statistics = []
    for r in range(resamples):
        model_means = []
        for j in range(count):
            group = groups[picks[r, j]]
            chosen = [group[int(math.floor(uniforms[r, j, i] * len(group)))] for i in range(len(group))]
            model_means.append(sum(chosen) / len(chosen))
        statistics.append(sum(model_means) / count)
    tail = (1 - confidence) / 2 * 100
    return float(np.mean([np.mean(group) for group in groups])), tuple(np.percentile(statistics, [tail, 100 - tail]))


@pytest.mark.parametrize("sizes", [(5, 9, 7), (4,), (30, 30)])
def test_the_hierarchical_bootstrap_matches_a_brute_force_double_loop(sizes):
    rng = np.random.default_rng(1)
    groups = [rng.normal(position, 1.0, size) for position, size in enumerate(sizes)]
    estimate, (low, high) = hierarchical_bootstrap(groups, resamples=300, confidence=0.9, seed=7)
    expected, (expected_low, expected_high) = _brute_force(groups, 300, 0.9, 7)
    assert estimate == pytest.approx(expected, abs=1e-12)
    assert (low, high) == pytest.approx((expected_low, expected_high), abs=1e-12)
    assert low < estimate < high


def test_the_model_level_draw_widens_the_interval_beyond_the_samples():
    # Three models whose means differ: an interval that only resampled samples would be far narrower.
    groups = [np.full(50, 0.2) + 0.01 * np.arange(50) / 50, np.full(50, 0.5), np.full(50, 0.8)]
    _, (low, high) = hierarchical_bootstrap(groups, resamples=2000, seed=0)
    assert low < 0.35 and high > 0.65
    with pytest.raises(ValueError, match="finite"):
        hierarchical_bootstrap([np.array([0.1, np.nan])])
    with pytest.raises(ValueError, match="at least one value"):
        hierarchical_bootstrap([np.array([0.1]), np.array([])])


# --------------------------------------------------------------------------------------------- the study command

METHODS = (("simple_gradient", "gradient"), ("smoothgrad", "smoothing"), ("moreaugrad", "moreaugrad"))


def _description(classifier: str) -> RunDescription:
    metrics = (
        MetricSpec(label="topk", class_path="x", settings={}, columns={"topk": True}, needs_attack=True,
                   interval=True),
        MetricSpec(label="sanity", class_path="x", settings={},
                   columns={"sanity": False, "sanity_signed": None, "sanity_control": None,
                            "sanity_undefined": None},
                   needs_attack=False, interval=True, control=("sanity", "sanity_control"),
                   control_message="not clearly less alike ({value} {control} {gap} {low} {high} {undefined} "
                                   "{samples})", counted=("sanity_undefined",)),
    )
    rows = tuple(RowSpec(method=m, label=m, explainer=m, display_name=m.replace("_", " "), family=f, epsilon=1.0,
                         surrogates={"own": "self", "noise": "none"}) for m, f in METHODS)
    return RunDescription(
        classifier=classifier, classifier_sha256="ab" * 32, dataset="d", data_settings={}, test_set_size=20,
        planned_samples=8, explainers=(), metrics=metrics, rows=rows, epsilons=(1.0,), target="prediction", seed=0,
        attacks=(AttackSpec(label="own", name="topk", class_path="x", settings={}),
                 AttackSpec(label="noise", name="noise", class_path="x", settings={})),
        warm_start=False, convexity_iterations=5,
    )


def _run(folder, model: int, samples: int = 8):
    """A run folder of one model: top-k per attack, sanity values and the Corollary 1 fields, made up."""
    # As the evaluator names a classifier spec (the ClassifierSource's repr).
    description = _description(f"ClassifierSource(arch='resnet18', weights='checkpoints/seed{model}.safetensors')")
    folder.mkdir(parents=True)
    description.save(folder)
    records = []
    for index in range(samples):
        for method, _ in METHODS:
            for attack, shift in (("own", 0.0), ("noise", 0.3)):
                topk = {"simple_gradient": 0.3, "smoothgrad": 0.5, "moreaugrad": 0.6}[method] + 0.1 * model
                undefined = method == "moreaugrad" and index < 2
                records.append(Record(
                    index=index, label=0, prediction=0, target=0, method=method, explainer=method, epsilon=1.0,
                    attack=attack, moved=True, seconds_clean=0.0, seconds_attack=0.0, seconds_attacked=0.0,
                    evals_clean=1.0, evals_attack=1.0, evals_attacked=1.0,
                    weak_convexity=1.0 if method == "moreaugrad" else None,
                    convex=(0.0 if index == 7 else 1.0) if method == "moreaugrad" else None,
                    bound=(None if index == 7 else 2.0) if method == "moreaugrad" else None,
                    map_change=1.0 + shift + (1.0 if index == 0 and attack == "noise" else 0.0),
                    bound_holds=(None if index == 7 else float(1.0 + shift + (index == 0 and attack == "noise")
                                                              <= 2.0)) if method == "moreaugrad" else None,
                    values={"topk": topk + 0.01 * index + shift, "sanity": math.nan if undefined else 0.1,
                            "sanity_signed": math.nan if undefined else 0.05, "sanity_control": 0.4,
                            "sanity_undefined": float(undefined)},
                ))
    RecordWriter(folder, 0, description.metric_columns).write(records)
    return folder


def test_the_study_pools_the_models_compares_with_both_baselines_and_renders(tmp_path, capsys):
    folders = [_run(tmp_path / f"run{model}", model) for model in range(3)]
    paths = main([str(folder) for folder in folders] + ["--out", str(tmp_path / "study"), "--resamples", "200"])
    study = json.loads(paths["json"].read_text())
    assert study["command"].startswith("python -m mglightning.reporting.study ")
    assert [model["weights_sha256"] for model in study["models"]] == ["ab" * 32] * 3
    assert study["git_commit"] and study["machine"]["cpu_count"] >= 1
    # Pooled top-k: each sample's worst (lowest) attack is "own"; the mean of the three models' means.
    expected = np.mean([0.6 + 0.1 * model + 0.01 * np.arange(8).mean() for model in range(3)])
    assert study["pooled"]["moreaugrad"]["topk"]["mean"] == pytest.approx(expected)
    low, high = study["pooled"]["moreaugrad"]["topk"]["interval"]
    assert low < expected < high
    pairs = {(item["method"], item["baseline"]): item for item in study["comparisons"]}
    assert set(pairs) == {("smoothgrad", "simple_gradient"), ("moreaugrad", "simple_gradient"),
                          ("moreaugrad", "smoothgrad")}
    assert study["comparison_count"] == 3
    assert pairs[("moreaugrad", "smoothgrad")]["difference"] == pytest.approx(0.1)
    assert pairs[("moreaugrad", "smoothgrad")]["verdict"] == "more robust"
    sanity = study["sanity"]["moreaugrad"]
    assert sanity["undefined"] == {"sanity_undefined": 6}  # 2 per model
    assert sanity["gap"]["mean"] == pytest.approx(0.3 * 6 / 8)  # undefined samples count 0
    assert sanity["passes"]
    corollary = study["corollary"]["moreaugrad"]
    # Per model: sample 7 has no finite bound (condition fails); sample 0's noise attack exceeds the bound.
    assert corollary["condition_fails_share"] == pytest.approx(1 / 8)
    assert corollary["bound_holds_share"] == pytest.approx(6 / 7) and corollary["bound_defined_samples"] == 21
    assert "simple_gradient" not in study["corollary"]
    row = study["models"][0]["rows"]["moreaugrad"]  # one model's results row carries the same shares
    assert row["values"]["corollary_share"] == pytest.approx(6 / 7)
    assert row["values"]["condition_fails_share"] == pytest.approx(1 / 8)
    table = study_markdown(paths["json"])
    assert table == paths["md"].read_text().split("\n\n", 1)[1]
    assert "3 comparisons" in table and "| moreaugrad | smoothgrad | 1 | top-k ↑ | +0.100" in table
    assert "6 (of 21)" not in table and "0.857 (of 21)" in table and "| 6 | 0 of 3 |" in table
    assert "3 models (seed0.safetensors sha256 abababababab, seed1.safetensors sha256 abababababab, " in table
    assert "8 test samples each" in table
    assert "0.857 (of 21)" in capsys.readouterr().out
    # study.json is a results file the documentation renders from: it names what produced it.
    from mglightning.reporting.render import PROVENANCE_KEYS

    provenance = json.loads(paths["json"].read_text())["provenance"]
    assert set(PROVENANCE_KEYS) <= set(provenance)
    assert provenance["n"] == "3 models x 8 samples" and provenance["command"] == study["command"]


def test_the_study_refuses_runs_of_different_settings(tmp_path):
    first = _run(tmp_path / "a", 0)
    second = _run(tmp_path / "b", 1)
    other = json.loads((second / "run.json").read_text())
    other["seed"] = 5
    (second / "run.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"differ in \['seed'\]"):
        study_results([first, second])


# ------------------------------------------------------------------------------ Corollary 1 in the records


@pytest.mark.parametrize("rho", [0.05, 30.0])  # measured lambda ~0.07-0.09: the condition holds, then fails
def test_the_records_compare_the_worst_map_change_with_corollary_1(rho):
    torch.manual_seed(0)
    model = nn.Sequential(Normalize([0.5] * 3, [0.25] * 3), nn.Conv2d(3, 4, 3), nn.Softplus(), nn.Flatten(),
                          nn.Linear(4 * 10 * 10, 3)).eval().requires_grad_(False)
    images = torch.rand(4, 3, 12, 12)
    explainers = {"simple_gradient": SimpleGradient(model),
                  "moreaugrad": MoreauGrad(model, rho=rho, step_size=rho / 10, num_steps=20, noise_std=0.0)}
    attack = {"own": lambda explainer, eps: TopKInterpretationAttack(explainer, eps, num_steps=2)}
    measured = measure_batch(model, images, torch.zeros(4, dtype=torch.long), torch.arange(4),
                             explainers=explainers, epsilons=[0.5], attacks=attack, convexity_iterations=5,
                             keep_maps=True, metrics={"topk": TopKIntersection()})
    for record in measured.records:
        clean = measured.maps.clean[record.method][record.index]
        attacked = measured.maps.attacked[(record.method, "own")][record.index]
        assert record.map_change == pytest.approx(float((attacked - clean).double().norm()), rel=1e-6)
        if record.method == "simple_gradient":
            assert record.bound is None and record.bound_holds is None
        else:
            bound = corollary_bound(torch.tensor([record.weak_convexity]), rho, 0.5).item()
            assert math.isfinite(bound) == (rho < 1)
            assert record.bound == pytest.approx(bound) if math.isfinite(bound) else record.bound is None
            assert record.bound_holds == (None if record.bound is None else float(record.map_change <= record.bound))


# ----------------------------------------------------------------------------------------------------- configs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("config", ["eval_cifar10_study.yaml", "eval_cifar10.yaml", "eval_tinyimagenet.yaml",
                                    "eval_imagenet.yaml"])
@pytest.mark.parametrize("overlay", [None, "paper_procedure"])
def test_the_headline_is_the_worst_case_and_the_paper_procedure_is_the_overlay(config, overlay, capsys):
    import yaml

    import evaluate

    extra = ["--config", str(CONFIGS / "presets" / f"{overlay}.yaml")] if overlay else []
    arguments = ["--config", str(CONFIGS / config), *extra]
    if config == "eval_cifar10_study.yaml":  # another seed's weights, as the docs run it
        arguments += ["--model.classifier.weights", "checkpoints/cifar10_study/seed2.safetensors"]
    with pytest.raises(SystemExit) as exit_info:
        evaluate.cli_main([*arguments, "--print_config"])
    assert exit_info.value.code == 0
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert list(model["attacks"]) == (["own"] if overlay else ["own", "exact", "transfer", "noise"])
    if config == "eval_cifar10_study.yaml":
        assert model["classifier"]["weights"] == "checkpoints/cifar10_study/seed2.safetensors"
        assert model["epsilon"] == [0.250, 0.751] and model["max_samples"] == 32
        assert set(model["explainers"]) == {"simple_gradient", "integrated_gradients", "smoothgrad", "moreaugrad",
                                            "sparse_moreaugrad"}
        assert model["metrics"]["sanity"]["class_path"] == "mglightning.metrics.ModelRandomisation"
        assert model["convexity_iterations"] > 0


def test_docstring_examples_run():
    import doctest

    import mglightning.reporting.study

    outcome = doctest.testmod(mglightning.reporting.study, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert outcome.failed == 0 and outcome.attempted >= 1
