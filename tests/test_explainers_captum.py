"""CaptumExplainer against Captum called directly, its per-sample seeding (batch invariance), its settings' errors,
and a Captum evaluation run end to end through `evaluate.py`'s parser."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from captum.attr import (
    GradientShap,
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    NoiseTunnel,
    Occlusion,
    Saliency,
)
from test_explainers import _one_thread, softplus_cnn  # noqa: F401  (the fixture applies here too)
from torch import nn

from mglightning.explainers import CaptumExplainer, SimpleGradient, build_explainer

ROOT = Path(__file__).resolve().parents[1]
TARGET = torch.tensor([0, 3, 1, 2])
SEEDS = torch.tensor([11, 22, 33, 44])


def relu_cnn() -> nn.Module:
    """A tiny ReLU classifier, on which GuidedBackprop differs from the gradient (it only modifies nn.ReLU)."""
    torch.manual_seed(4321)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(6 * 16, 4),
    ).eval()


@pytest.fixture
def images():
    return torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _direct(method, model, images, target, **arguments):
    return method(model).attribute(images.clone().requires_grad_(True), target=target, **arguments).detach()


def _alone_under_seed(seed, call):
    """Captum on one sample after the documented seeding: torch's, numpy's and Python's generators."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    return call()


# --- equal maps to Captum called directly ---------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Setting backward hooks")  # Captum's, from the direct call
def test_guided_backprop_equals_captum_and_differs_from_the_gradient_on_relu(images):
    model = relu_cnn()
    actual = CaptumExplainer(model, "captum.attr.GuidedBackprop").attribute(images, TARGET)
    torch.testing.assert_close(actual, _direct(GuidedBackprop, model, images, TARGET), rtol=0, atol=0)
    gradient = SimpleGradient(model).attribute(images, TARGET)
    assert (actual - gradient).norm() > 0.1 * gradient.norm()


@pytest.mark.parametrize("score", ["logit", "softmax", "log_softmax"])
def test_input_x_gradient_equals_captum_for_every_score(images, score):
    model = softplus_cnn()
    head = {"logit": nn.Identity(), "softmax": nn.Softmax(dim=1), "log_softmax": nn.LogSoftmax(dim=1)}[score]
    expected = _direct(InputXGradient, nn.Sequential(model, head), images, TARGET)
    actual = CaptumExplainer(model, "captum.attr.InputXGradient", score=score, internal_batch_size=3).attribute(
        images, TARGET
    )
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
    # The simple gradient times the input, as its definition says.
    torch.testing.assert_close(actual, images * SimpleGradient(model, score=score).attribute(images, TARGET))


def test_saliency_is_signed_by_default_and_takes_captums_abs(images):
    model = softplus_cnn()
    signed = CaptumExplainer(model).attribute(images, TARGET)
    torch.testing.assert_close(signed, SimpleGradient(model).attribute(images, TARGET), rtol=0, atol=1e-6)
    magnitudes = CaptumExplainer(model, attribute_args={"abs": True}).attribute(images, TARGET)
    torch.testing.assert_close(magnitudes, _direct(Saliency, model, images, TARGET), rtol=0, atol=0)


@pytest.mark.parametrize("internal_batch_size", [None, 2, 64])
def test_occlusion_equals_captum_with_yaml_values_and_any_chunking(images, internal_batch_size):
    model = softplus_cnn()
    settings = {"sliding_window_shapes": [3, 4, 4], "strides": 2, "baselines": 0.25}  # as YAML gives them
    explainer = CaptumExplainer(
        model, "captum.attr.Occlusion", attribute_args=settings, internal_batch_size=internal_batch_size
    )
    actual = explainer.explain(images, TARGET)
    expected = _direct(
        Occlusion, model, images, TARGET, sliding_window_shapes=(3, 4, 4), strides=2, baselines=0.25
    )
    torch.testing.assert_close(actual.attribution, expected, rtol=0, atol=1e-5)
    # 3 x 3 window positions (strides 2 over 8 - 4 + 1 pixels) and one unoccluded pass per sample, forward only.
    assert actual.gradient_evaluations.tolist() == [10] * 4
    assert explainer.family == "perturbation"


def test_integrated_gradients_use_captums_internal_batch_size(images):
    model = softplus_cnn()
    explainer = CaptumExplainer(
        model, "captum.attr.IntegratedGradients", attribute_args={"n_steps": 12, "method": "riemann_right"},
        internal_batch_size=8,
    )
    expected = IntegratedGradients(model).attribute(images, target=TARGET, n_steps=12, method="riemann_right")
    actual = explainer.explain(images, TARGET)
    torch.testing.assert_close(actual.attribution, expected, rtol=0, atol=1e-5)
    assert actual.gradient_evaluations.tolist() == [12] * 4


def test_gradient_shap_equals_captum_on_each_sample_alone_under_its_seed(images):
    model = softplus_cnn()
    settings = {"baselines": [0.0, 0.5, 1.0], "n_samples": 6, "stdevs": 0.05}
    actual = CaptumExplainer(model, "captum.attr.GradientShap", attribute_args=settings).explain(
        images, TARGET, seeds=SEEDS
    )
    baselines = torch.tensor([0.0, 0.5, 1.0]).view(3, 1, 1, 1).expand(3, 3, 8, 8)
    for i in range(len(images)):
        expected = _alone_under_seed(
            int(SEEDS[i]),
            lambda: _direct(
                GradientShap, model, images[i : i + 1], TARGET[i : i + 1], baselines=baselines, n_samples=6,
                stdevs=0.05,
            ),
        )
        torch.testing.assert_close(actual.attribution[i : i + 1], expected, rtol=0, atol=1e-6)
    assert actual.gradient_evaluations.tolist() == [6] * 4


NOISE_TUNNEL = {"nt_type": "smoothgrad", "nt_samples": 5, "stdevs": 0.1}


def test_noise_tunnel_saliency_equals_captum_on_each_sample_alone_under_its_seed(images):
    model = softplus_cnn()
    explainer = CaptumExplainer(model, "captum.attr.Saliency", noise_tunnel=NOISE_TUNNEL)
    actual = explainer.explain(images, TARGET, seeds=SEEDS)
    for i in range(len(images)):
        expected = _alone_under_seed(
            int(SEEDS[i]),
            lambda: NoiseTunnel(Saliency(model)).attribute(
                images[i : i + 1].clone().requires_grad_(True), target=TARGET[i : i + 1], abs=False, **NOISE_TUNNEL
            ),
        )
        torch.testing.assert_close(actual.attribution[i : i + 1], expected.detach(), rtol=0, atol=1e-6)
    # nt_samples noisy copies per sample, each one forward+backward.
    assert actual.gradient_evaluations.tolist() == [5] * 4
    assert (explainer.display_name, explainer.family) == ("Captum NoiseTunnel(Saliency)", "smoothing")


# --- batch invariance of the noisy methods --------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        {"method": "captum.attr.Saliency", "noise_tunnel": NOISE_TUNNEL},
        {"method": "captum.attr.GradientShap", "attribute_args": {"baselines": [0.0, 1.0], "n_samples": 4}},
    ],
    ids=["noise_tunnel_saliency", "gradient_shap"],
)
def test_a_noisy_methods_map_of_a_sample_does_not_depend_on_its_batch(images, settings):
    model = softplus_cnn()
    together = CaptumExplainer(model, **settings).attribute(images, TARGET, seeds=SEEDS)
    for chunk in (1, 3):  # the chunk size does not matter either
        chunked = CaptumExplainer(model, **settings, internal_batch_size=chunk).attribute(images, TARGET, seeds=SEEDS)
        torch.testing.assert_close(chunked, together, rtol=0, atol=1e-6)
    order = torch.tensor([2, 0, 3, 1])
    shuffled = CaptumExplainer(model, **settings).attribute(images[order], TARGET[order], seeds=SEEDS[order])
    torch.testing.assert_close(shuffled, together[order], rtol=0, atol=1e-6)
    for i in range(len(images)):
        alone = CaptumExplainer(model, **settings).attribute(images[i : i + 1], TARGET[i : i + 1], seeds=SEEDS[i : i + 1])
        torch.testing.assert_close(alone, together[i : i + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(CaptumExplainer(model, **settings).attribute(images, TARGET, seeds=SEEDS + 1), together)


def test_captum_on_the_whole_batch_is_not_batch_invariant(images):
    """Why the noisy methods run one sample at a time: Captum draws one batch's noise at once."""
    model = softplus_cnn()

    def noise_tunnel(batch):
        torch.manual_seed(0)
        return NoiseTunnel(Saliency(model)).attribute(
            batch.clone().requires_grad_(True), target=0, abs=False, **NOISE_TUNNEL
        )

    in_batch, alone = noise_tunnel(images)[1], noise_tunnel(images[1:2])[0]
    assert not torch.allclose(in_batch, alone, rtol=0, atol=1e-5)  # far outside the invariance test's tolerance


def test_the_global_generators_are_left_as_they_were(images):
    explainer = CaptumExplainer(softplus_cnn(), "captum.attr.GradientShap", attribute_args={"baselines": 0.0})
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    explainer.attribute(images, TARGET, seeds=SEEDS)
    after = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(after[0], expected[0]) and np.array_equal(after[1], expected[1]) and after[2] == expected[2]


# --- the explainer contract ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        {"method": "captum.attr.GuidedBackprop"},
        {"method": "captum.attr.Saliency", "noise_tunnel": NOISE_TUNNEL},
        {"method": "captum.attr.Occlusion", "attribute_args": {"sliding_window_shapes": [3, 2, 2], "strides": 2}},
    ],
    ids=["guided_backprop", "noise_tunnel", "occlusion"],
)
@pytest.mark.parametrize("training", [False, True])
def test_inputs_grads_and_mode_are_left_untouched(settings, training):
    model = relu_cnn().train(training)
    for parameter in model.parameters():
        parameter.grad = torch.full_like(parameter, 0.5)
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    images.grad = torch.full_like(images, 0.25)
    before = images.detach().clone()
    CaptumExplainer(model, **settings).attribute(images, 1, seeds=SEEDS[:2])
    assert torch.equal(images.detach(), before) and images.requires_grad and images.is_leaf
    assert torch.equal(images.grad, torch.full_like(images, 0.25))
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert all(module.training == training for module in model.modules())
    assert not any(module._backward_hooks or module._forward_hooks for module in model.modules())


def test_captum_maps_are_not_differentiable_so_the_surrogate_is_the_simple_gradient(images):
    """Captum's gradients carry no graph: Saliency's map has none, and InputXGradient's only through its input
    factor, whose derivative is then the gradient alone (missing the Hessian term of the true derivative)."""
    model = softplus_cnn(dtype=torch.float64)
    points = images.double().requires_grad_(True)
    assert Saliency(model).attribute(points, target=TARGET, abs=False).grad_fn is None
    captum_derivative = torch.autograd.grad(InputXGradient(model).attribute(points, target=TARGET).sum(), points)[0]
    exact = points * SimpleGradient(model).attribute(points, TARGET, create_graph=True)
    exact_derivative = torch.autograd.grad(exact.sum(), points)[0]
    torch.testing.assert_close(captum_derivative, SimpleGradient(model).attribute(points.detach(), TARGET))
    assert (captum_derivative - exact_derivative).norm() > 1e-3 * exact_derivative.norm()
    explainer = CaptumExplainer(model, "captum.attr.InputXGradient")
    assert (explainer.supports_create_graph, explainer.surrogate) == (False, "simple_gradient")
    with pytest.raises(ValueError, match="differentiate its declared surrogate 'simple_gradient'"):
        explainer.attribute(points, TARGET, create_graph=True)


class Pooled(Saliency):
    """A Captum method whose map is not shaped like the inputs."""

    def attribute(self, inputs, target=None, abs=True, additional_forward_args=None):
        return super().attribute(inputs, target=target, abs=abs).sum(1, keepdim=True)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"method": "captum.attr.GuidedBackprob"}, "cannot import 'captum.attr.GuidedBackprob'"),
        ({"method": "GuidedBackprop"}, "must be the class path of a Captum method"),
        ({"method": "no_such_package.Method"}, "No module named 'no_such_package'"),
        ({"method": "torch.nn.Linear"}, "torch.nn.Linear is not a Captum attribution method"),
        ({"method": "captum.attr.GradientAttribution"}, "does not attribute image inputs"),
        ({"method": "captum.attr.LayerGradCam"}, "attributes to a layer or a neuron"),
        ({"method": "captum.attr.NoiseTunnel"}, "give NoiseTunnel as noise_tunnel"),
        ({"method": "captum.attr.FeaturePermutation"}, "depends on its batch"),
        ({"method": "captum.attr.GuidedGradCam"}, "missing a required argument: 'layer'"),
        ({"init_args": {"multiply": True}}, "unexpected keyword argument 'multiply'"),
        ({"init_args": [1]}, "init_args must be a mapping"),
        ({"method": "captum.attr.IntegratedGradients", "attribute_args": {"nsteps": 4}},
         r"'nsteps', which captum.attr.IntegratedGradients.attribute does not take \(it takes baselines, n_steps"),
        ({"attribute_args": {"internal_batch_size": 4}}, "set the explainer's internal_batch_size instead"),
        ({"attribute_args": {"target": 1}}, "must not set target"),
        ({"noise_tunnel": {"nt_sample": 4}}, "'nt_sample', which captum.attr.NoiseTunnel.attribute does not take"),
        ({"method": "captum.attr.GradientShap", "noise_tunnel": {"stdevs": 0.1}, "attribute_args": {"stdevs": 0.1}},
         "stdevs given in both"),
        ({"internal_batch_size": 0}, "internal_batch_size must be an integer >= 1"),
    ],
)
def test_bad_settings_fail_at_construction_with_clear_errors(settings, message):
    with pytest.raises(ValueError, match=message):
        build_explainer("captum", softplus_cnn(), **settings)


def test_a_map_not_shaped_like_the_inputs_is_an_error(images):
    with pytest.raises(ValueError, match=r"returned \(4, 1, 8, 8\), not a map shaped like the inputs"):
        CaptumExplainer(softplus_cnn(), "test_explainers_captum.Pooled").attribute(images, TARGET)


def test_out_of_range_targets_fail_before_captum_indexes_them(images):
    with pytest.raises(ValueError, match="target 4 is out of range for a model with 4 classes"):
        CaptumExplainer(relu_cnn(), "captum.attr.GuidedBackprop").attribute(images, 4)


def test_evaluate_help_lists_the_captum_settings():
    from mglightning.evaluate_cli import explainer_settings_help

    text = explainer_settings_help()
    assert "mglightning.explainers.CaptumExplainer  (captum: Captum)" in text
    for line in ("method: str = 'captum.attr.Saliency'", "init_args: dict[str, Any] | None = None",
                 "attribute_args: dict[str, Any] | None = None", "noise_tunnel: dict[str, Any] | None = None"):
        assert line in text


# --- evaluated end to end -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory) -> Path:
    """A width-4 softplus ResNet-18 on 16x16 digits after one training step."""
    import pytorch_lightning as pl

    from mglightning.data import DigitsDataModule
    from mglightning.modules import ClassifierModule

    torch.manual_seed(0)
    datamodule = DigitsDataModule(batch_size=32, image_size=16)
    module = ClassifierModule(
        num_classes=10, image_size=16, mean=datamodule.mean, std=datamodule.std, model_kwargs={"width": 4}, lr=0.05
    )
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )
    trainer.fit(module, datamodule=datamodule)
    path = tmp_path_factory.mktemp("classifier") / "digits16.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_the_captum_example_config_evaluates_end_to_end(digits_checkpoint, tmp_path):
    from mglightning.cli import evaluate_main
    from mglightning.reporting import read_records

    cli = evaluate_main([
        "--config", str(ROOT / "configs" / "eval_digits.yaml"),
        "--config", str(ROOT / "configs" / "eval_digits_captum.yaml"),
        "--ckpt_path", str(digits_checkpoint),
        "--data.init_args.image_size", "16", "--data.init_args.batch_size", "2",
        "--model.max_samples", "2", "--model.bootstrap_samples", "20",
        "--model.attacks", json.dumps({"own": {"class_path": "mglightning.attacks.TopKInterpretationAttack",
                                               "init_args": {"num_steps": 2}}}),
        "--model.metrics", json.dumps({name: {"class_path": f"mglightning.metrics.{cls}"} for name, cls in (
            ("distance", "NormalizedDistance"), ("topk", "TopKIntersection"), ("ssim", "SaliencySSIM"),
            ("sparsity", "Sparsity"))}),
        "--model.convexity_iterations", "0", "--model.grid_samples", "0",
        "--trainer.accelerator", "cpu", "--trainer.logger.init_args.save_dir", str(tmp_path),
    ])
    run_dir = Path(cli.model.run_dir)
    labels = ["simple_gradient", "guided_backprop", "noise_tunnel_saliency"]
    results = json.loads((run_dir / "results.json").read_text())["results"]
    assert list(results) == labels
    assert all(results[label]["samples"] == 2 for label in labels)
    run = json.loads((run_dir / "run.json").read_text())
    surrogates = {row["method"]: row["surrogates"] for row in run["rows"]}
    assert surrogates == {"simple_gradient": {"own": "self"}, "guided_backprop": {"own": "simple_gradient"},
                          "noise_tunnel_saliency": {"own": "simple_gradient"}}
    records = read_records(run_dir).set_index(["method", "index"]).sort_index()
    assert len(records) == 2 * len(labels)
    assert (records.loc["noise_tunnel_saliency", "evals_clean"] == 8).all()  # nt_samples
    # GuidedBackprop modifies nn.ReLU only, so on the softplus classifier it is the simple gradient, attacked the
    # same way: the same records.
    for column in ("distance", "topk", "ssim", "gini", "moved"):
        assert np.allclose(
            records.loc["guided_backprop", column].astype(float), records.loc["simple_gradient", column].astype(float),
            atol=1e-5,
        ), column
