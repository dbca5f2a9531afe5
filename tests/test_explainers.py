"""Explainer interface (registry, validation, batch invariance, side effects) and the baselines against
independent references: Captum, brute-force loops over samples and noise copies, completeness."""

import warnings

import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients as CaptumIntegratedGradients
from captum.attr import Saliency
from noise_reference import sample_noise, sample_uniform
from torch import nn

from mglightning.explainers import (
    EXPLAINERS,
    CaptumExplainer,
    DeepLift,
    Explainer,
    IntegratedGradients,
    RelEx,
    SimpleGradient,
    SmoothGrad,
    SparsifiedSmoothGrad,
    build_explainer,
    explainer_settings,
    list_explainers,
)
from mglightning.random import Stream

SPEC_NAMES = {
    "simple_gradient",
    "integrated_gradients",
    "smoothgrad",
    "sparsified_smoothgrad",
    "deeplift",
    "relex",
    "moreaugrad",
    "sparse_moreaugrad",
    "group_sparse_moreaugrad",
    "caso",
    "cafo",
    "captum",
}

# Small settings that keep every method fast on the tiny network below.
FAST_SETTINGS = {
    "simple_gradient": {},
    "integrated_gradients": {"n_steps": 8},
    "smoothgrad": {"nt_samples": 5, "stdevs": 0.1},
    "sparsified_smoothgrad": {"nt_samples": 5},
    "deeplift": {},
    "relex": {"num_steps": 3, "noise_samples": 4},
    "moreaugrad": {"num_steps": 6, "noise_samples": 3},
    # eta values that zero part (not all) of the tiny network's maps.
    "sparse_moreaugrad": {"num_steps": 6, "noise_samples": 3, "eta": 2e-3},
    "group_sparse_moreaugrad": {"num_steps": 6, "noise_samples": 3, "eta": 2e-2, "group_size": 4},
}
CHUNKED_METHODS = [name for name in list_explainers() if "internal_batch_size" in explainer_settings(name)]
NOISY_METHODS = ["smoothgrad", "sparsified_smoothgrad", "relex", "moreaugrad", "sparse_moreaugrad",
                 "group_sparse_moreaugrad"]
DIFFERENTIABLE = [name for name, cls in EXPLAINERS.items() if cls.supports_create_graph]


def softplus_cnn(channels: int = 3, size: int = 8, classes: int = 4, dtype=torch.float32) -> nn.Module:
    """A tiny smooth classifier; every activation is its own module (DeepLift hooks them)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(1234)
    model = nn.Sequential(
        nn.Conv2d(channels, 6, 3, padding=1),
        nn.Softplus(),
        nn.Conv2d(6, 6, 3, stride=2, padding=1),
        nn.Softplus(),
        nn.Flatten(),
        nn.Linear(6 * (size // 2) ** 2, classes),
    )
    torch.random.set_rng_state(generator_state)
    return model.to(dtype).eval()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared machine spinning threads cost a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fast(name: str, model: nn.Module, **overrides) -> Explainer:
    return build_explainer(name, model, **{**FAST_SETTINGS.get(name, {}), **overrides})


@pytest.fixture
def model():
    return softplus_cnn()


@pytest.fixture
def images():
    return torch.rand(3, 3, 8, 8)


TARGET = torch.tensor([0, 3, 1])
SEEDS = torch.tensor([11, 22, 33])


# --- registry ------------------------------------------------------------------------------------------------


def test_registry_holds_exactly_the_spec_names():
    assert set(list_explainers()) == SPEC_NAMES == set(EXPLAINERS)
    for name, cls in EXPLAINERS.items():
        assert cls.name == name and issubclass(cls, Explainer)
        assert cls.surrogate == ("self" if cls.supports_create_graph else "simple_gradient")
        expected = {"relex": "softmax", "caso": "log_softmax", "cafo": "log_softmax"}.get(name, "logit")
        assert explainer_settings(name)["score"] == expected
    assert not any(cls.supports_create_graph for cls in (DeepLift, RelEx, SparsifiedSmoothGrad, CaptumExplainer))


def test_build_explainer_passes_settings_and_stores_model_and_score(model):
    explainer = build_explainer("smoothgrad", model, nt_samples=7, score="log_softmax")
    assert isinstance(explainer, SmoothGrad) and explainer.model is model
    assert (explainer.nt_samples, explainer.score) == (7, "log_softmax")


def test_unknown_name_lists_the_valid_names(model):
    with pytest.raises(ValueError, match="Unknown explainer 'moreau'.*simple_gradient.*group_sparse_moreaugrad"):
        build_explainer("moreau", model)


def test_unknown_setting_names_the_method_and_its_settings(model):
    with pytest.raises(ValueError, match=r"moreaugrad: unknown setting\(s\) lr, sigma; valid settings: rho, step_size"):
        build_explainer("moreaugrad", model, sigma=0.1, lr=0.1)


@pytest.mark.parametrize(
    ("name", "settings", "message"),
    [
        ("moreaugrad", {"rho": 0.0}, "rho must be > 0"),
        ("moreaugrad", {"rho": -1.0}, "rho must be > 0"),
        ("moreaugrad", {"step_size": 0.0}, "step_size must be > 0"),
        ("moreaugrad", {"rho": 1.0, "step_size": 2.0}, r"step_size=2.0 must be below 2 \* rho"),
        ("moreaugrad", {"num_steps": 0}, "num_steps must be an integer >= 1"),
        ("moreaugrad", {"num_steps": 2.5}, "num_steps must be an integer"),
        ("moreaugrad", {"noise_std": -0.1}, "noise_std must be >= 0"),
        ("moreaugrad", {"average_last": 400}, "average_last=400 cannot exceed num_steps=300"),
        ("moreaugrad", {"tol": 1e-3, "average_last": 5}, "average_last needs a fixed number of steps"),
        ("moreaugrad", {"tol": 0.0}, "tol must be > 0"),
        ("moreaugrad", {"accelerate": "yes"}, "accelerate must be True or False"),
        ("moreaugrad", {"internal_batch_size": 0}, "internal_batch_size must be an integer >= 1"),
        ("sparse_moreaugrad", {"eta": -1e-3}, "eta must be >= 0"),
        ("group_sparse_moreaugrad", {"group_size": 0}, "group_size must be an integer >= 1"),
        ("integrated_gradients", {"n_steps": 0}, "n_steps must be an integer >= 1"),
        ("smoothgrad", {"stdevs": float("nan")}, "stdevs must be a finite number"),
        ("sparsified_smoothgrad", {"l0": 1.5}, r"l0 is a share of the entries in \(0, 1\]"),
        ("relex", {"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ("relex", {"score": "logit"}, "score must be 'softmax'"),
        ("simple_gradient", {"score": "probability"}, "score must be one of"),
    ],
)
def test_invalid_settings_fail_at_construction_naming_the_method(model, name, settings, message):
    with pytest.raises(ValueError, match=f"{EXPLAINERS[name].__name__}: {message}"):
        build_explainer(name, model, **settings)


# --- input validation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SPEC_NAMES))
def test_bad_calls_fail_early_with_clear_errors(model, images, name):
    explainer = fast(name, model)
    bad_calls = [
        ((images[0], 0), {}, r"shape \(B, C, H, W\).*unsqueeze"),
        ((images.clone().fill_(float("nan")), 0), {}, "NaN or infinite"),
        ((images.long(), 0), {}, "floating tensor"),
        ((images, 4), {}, "target 4 is out of range for a model with 4 classes"),
        ((images, torch.tensor([0, 1])), {}, r"shape \(3,\)"),
        ((images, -1), {}, "non-negative"),
        ((images, torch.tensor([0.0, 1.0, 2.0])), {}, "integer class indices"),
        ((images, 0), {"seeds": torch.tensor([1, 2])}, r"seeds must have shape \(3,\)"),
        ((images, 0), {"seeds": torch.tensor([1.0, 2.0, 3.0])}, "seeds must be an integer tensor"),
    ]
    for args, kwargs, message in bad_calls:
        with pytest.raises(ValueError, match=message):
            explainer.attribute(*args, **kwargs)


@pytest.mark.parametrize(
    "target",
    [
        np.array([0, 3, 1]),
        np.array([0, 3, 1], dtype=np.int32),
        np.array([[0], [3], [1]], dtype=np.uint8),
        torch.tensor([[0, 3, 1]]),
        torch.tensor([[0], [3], [1]], dtype=torch.int32),
    ],
    ids=["numpy_int64", "numpy_int32", "numpy_uint8_column", "tensor_row", "tensor_int32_column"],
)
def test_integer_targets_of_any_shape_that_squeezes_to_the_batch_are_accepted(model, images, target):
    expected = SimpleGradient(model).attribute(images, TARGET)
    assert torch.equal(SimpleGradient(model).attribute(images, target), expected)


def test_one_class_for_all_samples_in_any_integer_form(model, images):
    expected = SimpleGradient(model).attribute(images, torch.tensor([2, 2, 2]))
    for target in (2, np.int64(2), np.array(2, dtype=np.int16), torch.tensor(2, dtype=torch.int32)):
        assert torch.equal(SimpleGradient(model).attribute(images, target), expected)
    one = SimpleGradient(model).attribute(images[:1], torch.tensor([2]))
    for target in (np.array([[2]]), torch.tensor([[[2]]])):  # one sample: every singleton shape
        assert torch.equal(SimpleGradient(model).attribute(images[:1], target), one)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (np.array([[0, 1], [2, 3], [0, 1]]), r"have shape \(3,\).*got \(3, 2\)"),
        (np.array([0.0, 1.0, 2.0]), "integer class indices, got dtype torch.float64"),
        (np.array([True, False, True]), "integer class indices, got dtype torch.bool"),
        (np.array(["a", "b", "c"]), "target must be an int or integer class indices.*got ndarray"),
        ([0, 1, 2], "target must be an int or integer class indices.*got list"),
        (np.array([0, -1, 2]), "non-negative"),
    ],
)
def test_bad_targets_are_refused_clearly(model, images, target, message):
    with pytest.raises(ValueError, match=message):
        SimpleGradient(model).attribute(images, target)


def test_inputs_of_another_dtype_than_the_model_are_refused_with_the_fix(model, images):
    with pytest.raises(ValueError, match=r"inputs are torch.float64 but the model's parameters are torch.float32: "
                                         r"cast the inputs with inputs.to\(torch.float32\)"):
        SimpleGradient(model).attribute(images.double(), TARGET)
    with pytest.raises(ValueError, match="got a numpy array: convert it with torch.from_numpy"):
        SimpleGradient(model).attribute(images.numpy(), TARGET)
    # Autocast casts the inputs itself, so any floating inputs go.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert SimpleGradient(model).attribute(images.bfloat16(), TARGET).shape == images.shape


def test_group_size_must_divide_the_image(model, images):
    explainer = fast("group_sparse_moreaugrad", model, group_size=3)
    with pytest.raises(ValueError, match=r"GroupSparseMoreauGrad: group_size=3 must divide .* \[1, 2, 4, 8\]"):
        explainer.attribute(images, 0)


@pytest.mark.parametrize("name", ["deeplift", "relex", "sparsified_smoothgrad", "captum"])
def test_methods_without_create_graph_name_their_surrogate(model, images, name):
    with pytest.raises(ValueError, match="differentiate its declared surrogate 'simple_gradient'"):
        fast(name, model).attribute(images, 0, create_graph=True)


def test_inference_mode_is_refused_with_the_lightning_fix(model, images):
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode=False"):
        SimpleGradient(model).attribute(images, 0)


def test_works_under_no_grad(model, images):
    with torch.no_grad():
        attributions = SimpleGradient(model).attribute(images, TARGET)
    torch.testing.assert_close(attributions, SimpleGradient(model).attribute(images, TARGET))


def test_batch_norm_in_training_mode_is_warned_about_and_left_as_found(images):
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(72, 4)).train()
    with pytest.warns(UserWarning, match="call model.eval"):
        SimpleGradient(model).attribute(images, 0)
    assert model.training and model[1].training


# --- the contract every method keeps -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SPEC_NAMES))
def test_a_batch_equals_each_sample_alone(model, images, name):
    explainer = fast(name, model)
    together = explainer.attribute(images, TARGET, seeds=SEEDS)
    assert together.shape == images.shape and together.dtype == images.dtype
    for i in range(len(images)):
        alone = explainer.attribute(images[i : i + 1], TARGET[i : i + 1], seeds=SEEDS[i : i + 1])
        torch.testing.assert_close(together[i : i + 1], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", CHUNKED_METHODS)
def test_chunked_equals_unchunked(model, images, name):
    whole = fast(name, model, internal_batch_size=None).attribute(images, TARGET, seeds=SEEDS)
    for chunk in (1, 5):
        chunked = fast(name, model, internal_batch_size=chunk).attribute(images, TARGET, seeds=SEEDS)
        torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SPEC_NAMES))
@pytest.mark.parametrize("training", [False, True])
def test_inputs_grads_and_mode_are_left_untouched(name, training):
    model = softplus_cnn().train(training)
    for parameter in model.parameters():
        parameter.grad = torch.full_like(parameter, 0.5)
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    images.grad = torch.full_like(images, 0.25)
    before = images.detach().clone()
    explainer = fast(name, model)
    explainer.attribute(images, 1, seeds=SEEDS[:2])
    if explainer.supports_create_graph:
        explainer.attribute(images, 1, seeds=SEEDS[:2], create_graph=True)
    assert torch.equal(images.detach(), before) and images.requires_grad and images.is_leaf
    assert torch.equal(images.grad, torch.full_like(images, 0.25))
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert all(module.training == training for module in model.modules())


@pytest.mark.parametrize("name", NOISY_METHODS)
def test_noise_follows_the_seeds(model, images, name):
    explainer = fast(name, model, **({"noise_std": 0.2} if "moreau" in name else {}))
    torch.manual_seed(5)
    first = explainer.attribute(images, TARGET)
    torch.manual_seed(5)
    assert torch.equal(explainer.attribute(images, TARGET), first)  # seeds=None draws from the global RNG
    seeded = explainer.attribute(images, TARGET, seeds=SEEDS)
    assert torch.equal(explainer.attribute(images, TARGET, seeds=SEEDS), seeded)
    assert not torch.allclose(explainer.attribute(images, TARGET, seeds=SEEDS + 1), seeded)


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_create_graph_maps_are_differentiable_with_respect_to_the_inputs(model, images, name):
    images = images.clone().requires_grad_(True)
    attributions = fast(name, model).attribute(images, TARGET, seeds=SEEDS, create_graph=True)
    (gradient,) = torch.autograd.grad(attributions.abs().sum(), images)
    assert gradient.abs().sum() > 0


@pytest.mark.parametrize("name", ["simple_gradient", "integrated_gradients", "smoothgrad"])
def test_create_graph_maps_pass_gradcheck(name):
    model = softplus_cnn(channels=1, size=4, classes=3, dtype=torch.float64)
    explainer = fast(name, model, **({"n_steps": 3} if name == "integrated_gradients" else {}))
    images = torch.rand(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    target, seeds = torch.tensor([2, 0]), torch.tensor([3, 4])

    def attribution(x):
        return explainer.attribute(x, target, seeds=seeds, create_graph=True)

    # The create_graph map equals the plain one.
    torch.testing.assert_close(attribution(images).detach(), explainer.attribute(images, target, seeds=seeds))
    assert torch.autograd.gradcheck(attribution, (images,))


# --- baselines against independent references ---------------------------------------------------------------


@pytest.mark.parametrize("score", ["logit", "log_softmax", "softmax"])
def test_simple_gradient_equals_captum_saliency(model, images, score):
    head = {"logit": nn.Identity(), "log_softmax": nn.LogSoftmax(dim=1), "softmax": nn.Softmax(dim=1)}[score]
    expected = Saliency(nn.Sequential(model, head)).attribute(images.clone().requires_grad_(), target=TARGET, abs=False)
    actual = SimpleGradient(model, score=score).attribute(images, TARGET)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("internal_batch_size", [None, 7])
def test_integrated_gradients_equal_captum_right_riemann(model, images, internal_batch_size):
    expected = CaptumIntegratedGradients(model).attribute(
        images.clone(), target=TARGET, n_steps=16, method="riemann_right", internal_batch_size=internal_batch_size
    )
    actual = IntegratedGradients(model, n_steps=16, internal_batch_size=internal_batch_size).attribute(images, TARGET)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_integrated_gradients_are_complete_up_to_the_discretisation_error():
    model = softplus_cnn(dtype=torch.float64)
    images = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    logits = model(images).gather(1, TARGET[:, None]).squeeze(1)
    baseline_logits = model(torch.zeros_like(images)).gather(1, TARGET[:, None]).squeeze(1)
    delta = logits - baseline_logits
    errors = []
    for steps in (4, 32, 256):
        totals = IntegratedGradients(model, n_steps=steps).attribute(images, TARGET).sum(dim=(1, 2, 3))
        errors.append((totals - delta).abs().max().item())
    # A right Riemann sum's error shrinks like 1/m.
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-2 * delta.abs().max().item()
    assert errors[1] < 2 * errors[2] * 256 / 32


def _seeded_noise(seed, copies, shape, std, dtype=torch.float32):
    """The documented noise protocol: sample i's copies j < copies, drawn from seeds[i] and j alone."""
    return sample_noise(seed, copies, shape, std, dtype=dtype)


def _gradient_of_one_image(model, image, target):
    image = image.detach().clone().requires_grad_(True)
    return torch.autograd.grad(model(image[None])[0, target], image)[0]


def test_smoothgrad_equals_a_brute_force_mean_over_the_same_noise(model, images):
    actual = SmoothGrad(model, stdevs=0.2, nt_samples=6, internal_batch_size=4).attribute(images, TARGET, seeds=SEEDS)
    for i in range(len(images)):
        noise = _seeded_noise(int(SEEDS[i]), 6, images.shape[1:], 0.2)
        expected = torch.stack([_gradient_of_one_image(model, images[i] + n, TARGET[i]) for n in noise]).mean(0)
        torch.testing.assert_close(actual[i], expected, rtol=0, atol=1e-6)


def _sparsify_numpy(gradient, flatten, l0):
    """Levine et al.'s transform of one copy, literally: cap at the flatten-th largest |g|, keep the top l0."""
    magnitudes = np.abs(gradient.numpy().ravel()).astype(np.float64)
    size = magnitudes.size
    cap = np.sort(magnitudes)[::-1][max(1, int(flatten * size)) - 1]
    capped = np.minimum(magnitudes, cap) / cap
    kept = np.argsort(-capped, kind="stable")[: max(1, int(l0 * size))]
    result = np.zeros_like(capped)
    result[kept] = capped[kept]
    return torch.from_numpy(result.reshape(gradient.shape))


def test_sparsified_smoothgrad_equals_a_brute_force_loop(model, images):
    settings = {"stdevs": 0.1, "nt_samples": 4, "flatten": 0.05, "l0": 0.3}
    actual = SparsifiedSmoothGrad(model, **settings, internal_batch_size=3).attribute(images, TARGET, seeds=SEEDS)
    for i in range(len(images)):
        noise = _seeded_noise(int(SEEDS[i]), 4, images.shape[1:], 0.1)
        copies = [
            _sparsify_numpy(_gradient_of_one_image(model, images[i] + n, TARGET[i]), 0.05, 0.3) for n in noise
        ]
        torch.testing.assert_close(actual[i].double(), torch.stack(copies).mean(0), rtol=0, atol=1e-6)
    # Each copy keeps int(0.3 * 192) = 57 entries: the mean of 4 copies has at most 4 * 57 non-zeros.
    assert ((actual != 0).flatten(1).sum(1) <= 4 * 57).all()
    assert actual.max() <= 1 and actual.min() >= 0


def test_relex_equals_a_per_sample_loop_with_torch_sgd():
    model = softplus_cnn(dtype=torch.float64)
    images = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    settings = {"num_steps": 4, "noise_samples": 5, "noise_std": 0.1, "lr": 0.1, "momentum": 0.99,
                "lambda1": 1e-2, "lambda2": 1.0}
    actual = RelEx(model, **settings, internal_batch_size=4).attribute(images, TARGET[:2], seeds=SEEDS[:2])
    for i in range(2):
        start = sample_uniform(int(SEEDS[i]), (1, 8, 8), Stream.RELEX_MASK, dtype=torch.float64)
        mask = (start / 100).requires_grad_(True)
        optimizer = torch.optim.SGD([mask], lr=0.1, momentum=0.99)
        for step in range(4):
            noisy = images[i] + sample_noise(int(SEEDS[i]), 5, (3, 8, 8), 0.1, step=step, dtype=torch.float64)
            foreground = torch.softmax(model(noisy * mask), 1)[:, TARGET[i]]
            background = torch.softmax(model(noisy * (1 - mask)), 1)[:, TARGET[i]]
            loss = (-torch.log(foreground) - torch.log(1 - background + 1e-7)).mean() + 1e-2 * mask.abs().sum()
            (gradient,) = torch.autograd.grad(loss, mask)
            mask.grad = gradient / gradient.norm()
            optimizer.step()
            with torch.no_grad():
                mask.clamp_(0, 1)
        torch.testing.assert_close(actual[i], mask.detach().expand(3, 8, 8), rtol=0, atol=1e-9)


def test_deeplift_sums_to_delta_on_the_softplus_resnet18():
    from mglightning.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, image_size=32, width=4, activation="softplus").eval()
    model = model.double()
    images = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    target = torch.tensor([3, 7])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Captum warnings reach the user
        attributions = DeepLift(model).attribute(images, target)
    delta = (model(images) - model(torch.zeros_like(images))).gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(attributions.sum(dim=(1, 2, 3)), delta, rtol=1e-6, atol=1e-8)
    # Not the simple gradient times the input: the rescale rule differs on a non-linear network.
    gradient_times_input = images * SimpleGradient(model).attribute(images, target)
    assert (attributions - gradient_times_input).norm() > 0.05 * gradient_times_input.norm()


class _NaNAfter(nn.Module):
    """Wraps a model and turns the scores of the samples in `broken` into NaN (or infinity)."""

    def __init__(self, model: nn.Module, value: float = float("nan")) -> None:
        super().__init__()
        self.model, self.value = model, value

    def forward(self, x):
        scores = self.model(x)
        return scores + self.value * (x.flatten(1)[:, :1] > -1)  # every row, still differentiable


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", sorted(EXPLAINERS))
def test_a_model_with_non_finite_scores_is_an_error_naming_the_model(model, images, name, value):
    broken = _NaNAfter(model, value)
    explainer = fast(name, broken)
    with pytest.raises(ValueError, match="model _NaNAfter returned NaN or infinite scores"):
        explainer.attribute(images, target=0)


def test_sparsified_smoothgrad_keeps_nan_gradients_nan():
    from mglightning.explainers import sparsify_magnitudes

    gradients = torch.ones(2, 1, 4, 4)
    gradients[1, 0, 0, 0] = float("nan")
    sparse = sparsify_magnitudes(gradients, flatten=0.1, l0=0.5)
    assert not torch.isnan(sparse[0]).any()
    assert torch.isnan(sparse[1]).any(), "a NaN gradient must not become a zero map"
