"""Interpretation attacks (docs/reference/semantics.md section 5): per-sample brute-force reference, budget, label rule, seeds."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from mglightning.attacks import GaussianNoise, TopKInterpretationAttack
from mglightning.explainers import SimpleGradient, build_explainer

NUM_CLASSES = 5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread beats two threads contending for a shared CPU (by 10-50x here)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class _Centre(nn.Module):
    """Maps [0, 1] pixels to about [-2, 2], as a dataset normalisation layer does (docs/reference/semantics.md section 1)."""

    def forward(self, inputs):
        return (inputs - 0.5) / 0.25


def _softplus_net(dtype=torch.float32):
    """A tiny softplus CNN for 3x8x8 images: its simple gradient has a non-zero input derivative."""
    net = nn.Sequential(
        _Centre(),
        nn.Conv2d(3, 6, 3, padding=1),
        nn.Softplus(beta=2.0),
        nn.Conv2d(6, 6, 3, stride=2, padding=1),
        nn.Softplus(beta=2.0),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, NUM_CLASSES),
    )
    return net.to(dtype).eval()


def _images(batch=6, dtype=torch.float32, seed=0):
    images = torch.rand(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    images[:, 0, 0, :4] = 0.0  # pixels on the box's faces, where clamping matters
    images[:, 1, 0, :4] = 1.0
    return images


def _prediction(model, images):
    with torch.no_grad():
        return model(images).argmax(dim=1)


def _l2_offsets(adversarial, clean):
    return (adversarial - clean).flatten(1).norm(dim=1)


# ---------------------------------------------------------------- independent references
def _brute_topk_set(magnitudes, fraction):
    """Indices of the top-k magnitudes by a plain sort (zeros excluded, ties to the lower index)."""
    flat = np.abs(magnitudes.detach().numpy()).ravel()
    k = max(1, int(fraction * np.count_nonzero(flat)))
    return sorted(index for _, index in sorted((-v, i) for i, v in enumerate(flat) if v != 0)[:k])


def _gradient_map(model, image, target, create_graph):
    """The simple gradient of one image's target logit, straight from autograd (not from the explainer)."""
    if not image.requires_grad:
        image = image.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(model(image)[0, target], image, create_graph=create_graph)
    return gradient, image


def _reference_attack(model, images, targets, epsilon, num_steps, step_size, fraction):
    """docs/reference/semantics.md section 5 written out for one sample at a time with the simple gradient; counts rejections."""
    adversarial, moved, rejected = [], [], 0
    for image, target in zip(images, targets.tolist()):
        image = image[None]
        clean_class = _prediction(model, image).item()
        top_k = _brute_topk_set(_gradient_map(model, image, target, False)[0], fraction)
        best, best_objective, best_step = image, math.inf, None
        iterate = image.clone()
        for step in range(num_steps + 1):
            gradient, leaf = _gradient_map(model, iterate, target, True)
            magnitudes = gradient.abs().flatten()
            objective = magnitudes[top_k].sum() / magnitudes.sum()
            keeps_class = _prediction(model, leaf).item() == clean_class
            rejected += not keeps_class
            if keeps_class and objective.item() < best_objective:
                best, best_objective, best_step = leaf.detach().clone(), objective.item(), step
            if step == num_steps:
                break
            (direction,) = torch.autograd.grad(objective, leaf)
            iterate = leaf.detach() - step_size * direction.sign()
            offset = iterate - image
            if offset.norm() > epsilon:
                iterate = image + offset * (epsilon / offset.norm())
            iterate = iterate.clamp(0, 1)
        adversarial.append(best)
        moved.append(best_step is not None and best_step > 0)
    return torch.cat(adversarial), torch.tensor(moved), rejected


def _objective(model, images, targets, clean_images, fraction):
    """``D`` of each image with K from the matching clean image, by the brute-force top-k set."""
    values = []
    for image, clean, target in zip(images, clean_images, targets.tolist()):
        top_k = _brute_topk_set(_gradient_map(model, clean[None], target, False)[0], fraction)
        magnitudes = _gradient_map(model, image[None], target, False)[0].abs().flatten()
        values.append((magnitudes[top_k].sum() / magnitudes.sum()).item())
    return torch.tensor(values)


class RecordingModel(nn.Module):
    """Wraps a model and records the predicted classes of every forward pass."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.predictions = []

    def forward(self, inputs):
        logits = self.model(inputs)
        self.predictions.append(logits.detach().argmax(dim=1))
        return logits


class FlipsWhenMoved(nn.Module):
    """Predicts another class for any input near one of ``anchors`` but not exactly equal to it.

    The bump is a constant added to a non-target logit, so the target logit's gradient, and with it the
    attack's steps, are those of the wrapped model; only the label rule sees the difference.
    """

    def __init__(self, model, anchors, radius):
        super().__init__()
        self.model = model
        self.radius = radius
        self.register_buffer("anchors", anchors.clone())
        self.register_buffer("flip_class", (_prediction(model, anchors) + 1) % NUM_CLASSES)

    def forward(self, inputs):
        logits = self.model(inputs)
        distances = (inputs.detach()[:, None] - self.anchors[None]).flatten(2).norm(dim=2)
        nearest = distances.argmin(dim=1)
        moved_near_anchor = (distances.min(dim=1).values > 0) & (distances.min(dim=1).values <= self.radius)
        bump = torch.zeros_like(logits)
        bump[torch.arange(len(inputs)), self.flip_class[nearest]] = 1e3
        return logits + bump * moved_near_anchor[:, None]


# ---------------------------------------------------------------- the top-k attack
@pytest.mark.parametrize("step_size", [0.05, 0.01])  # projected from the first step / from the fourth step on
def test_attack_matches_per_sample_brute_force_reference(step_size):
    model = _softplus_net(torch.float64)
    # Two ordinary images with pixels on the box's faces, three close to the decision boundary.
    images = torch.cat([_images(batch=2, dtype=torch.float64), _near_boundary_images(model, 3, 0.02, torch.float64)])
    targets = _prediction(model, images)
    attack = TopKInterpretationAttack(SimpleGradient(model), epsilon=0.5, num_steps=5, step_size=step_size)
    adversarial, moved = attack.perturb(images, targets)
    expected, expected_moved, rejected = _reference_attack(model, images, targets, 0.5, 5, step_size, 0.4)
    torch.testing.assert_close(adversarial, expected, rtol=0, atol=1e-10)
    assert moved.tolist() == expected_moved.tolist()
    assert moved.any() and rejected > 0  # the label rule and the clamp both had work to do
    assert (adversarial[:2] == 0).any() and (adversarial[:2] == 1).any()


def test_attack_lowers_topk_objective_of_simple_gradient():
    model = _softplus_net(torch.float64)
    images = _images(batch=8, dtype=torch.float64)
    targets = _prediction(model, images)
    attack = TopKInterpretationAttack(SimpleGradient(model), epsilon=1.0, num_steps=10)
    assert attack.step_size == pytest.approx(0.01)  # docs/reference/semantics.md section 5: epsilon / 100
    adversarial, moved = attack.perturb(images, targets)
    clean_objective = _objective(model, images, targets, images, 0.4)
    attacked_objective = _objective(model, adversarial, targets, images, 0.4)
    assert moved.all()
    assert (attacked_objective < clean_objective).all()
    assert (attacked_objective - clean_objective).mean() < -0.01


def _near_boundary_images(model, count, distance, dtype=torch.float32):
    """Images about ``distance`` (L2) from the decision boundary, found by bisection between two classes."""
    pool = _images(batch=64, dtype=dtype, seed=1)  # all have the same face pixels, so interpolations keep them
    classes = _prediction(model, pool)
    majority = classes.mode().values
    starts = pool[classes == majority][:count]
    ends = pool[classes != majority][:1].expand_as(starts)
    assert len(starts) == count, "the pool needs more images of the majority class"
    low, high = torch.zeros(count, 1, 1, 1, dtype=dtype), torch.ones(count, 1, 1, 1, dtype=dtype)
    for _ in range(40):  # invariant: low is classified as `majority`, high is not
        middle = (low + high) / 2
        same = (_prediction(model, starts + middle * (ends - starts)) == majority).view(-1, 1, 1, 1)
        low, high = torch.where(same, middle, low), torch.where(same, high, middle)
    length = (ends - starts).flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    images = starts + (low - distance / length).clamp_min(0) * (ends - starts)
    assert (_prediction(model, images) == majority).all()
    return images


def test_attack_stays_in_ball_and_box_and_never_changes_the_prediction():
    recorder = RecordingModel(_softplus_net())
    epsilon = 0.5
    images = _near_boundary_images(recorder, count=8, distance=0.1)
    clean_prediction = _prediction(recorder, images)
    attack = TopKInterpretationAttack(SimpleGradient(recorder), epsilon=epsilon, num_steps=10, step_size=0.05)
    recorder.predictions.clear()
    adversarial, moved = attack.perturb(images, clean_prediction)
    # Some iterates did change the prediction, so the label rule had something to reject.
    assert any((p != clean_prediction).any() for p in recorder.predictions if len(p) == len(images))
    assert (_l2_offsets(adversarial, images) <= epsilon * (1 + 1e-6)).all()
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert torch.equal(_prediction(recorder, adversarial), clean_prediction)
    assert torch.equal(adversarial[~moved], images[~moved])
    assert (_l2_offsets(adversarial[moved], images[moved]) > 0).all() and moved.any()


def test_sample_without_eligible_iterate_stays_unmoved():
    base = _softplus_net()
    images = _images(batch=6)
    epsilon = 0.5
    blocked = torch.tensor([True, False, True, False, False, True])
    model = FlipsWhenMoved(base, images[blocked], radius=epsilon)
    targets = _prediction(model, images)
    assert torch.equal(targets, _prediction(base, images))
    adversarial, moved = TopKInterpretationAttack(SimpleGradient(model), epsilon=epsilon).perturb(images, targets)
    assert not moved[blocked].any()
    assert torch.equal(adversarial[blocked], images[blocked])
    assert moved[~blocked].all()  # the other samples of the same batch are attacked as usual
    assert torch.equal(_prediction(model, adversarial), targets)


def test_attack_is_batch_invariant_and_reproducible_with_a_noisy_explainer():
    model = _softplus_net(torch.float64)
    images = _images(batch=4, dtype=torch.float64)
    targets = _prediction(model, images)
    seeds = torch.tensor([11, 12, 13, 14])
    explainer = build_explainer("smoothgrad", model, nt_samples=4, stdevs=0.1)
    attack = TopKInterpretationAttack(explainer, epsilon=0.5, num_steps=3, step_size=0.05)
    assert attack.surrogate_name == "self"
    batch_result, batch_moved = attack.perturb(images, targets, seeds=seeds)
    for i in range(len(images)):
        single, single_moved = attack.perturb(images[i : i + 1], targets[i : i + 1], seeds=seeds[i : i + 1])
        torch.testing.assert_close(single, batch_result[i : i + 1], rtol=0, atol=1e-10)
        assert single_moved.item() == batch_moved[i].item()
    again, _ = attack.perturb(images, targets, seeds=seeds)
    assert torch.equal(again, batch_result)
    torch.manual_seed(5)
    unseeded, _ = attack.perturb(images, targets)
    torch.manual_seed(5)
    assert torch.equal(attack.perturb(images, targets)[0], unseeded)


def test_method_without_create_graph_is_attacked_through_its_surrogate():
    model = _softplus_net(torch.float64)
    images = _images(batch=3, dtype=torch.float64)
    targets = _prediction(model, images)
    expected, expected_moved = TopKInterpretationAttack(SimpleGradient(model), epsilon=0.5, num_steps=3).perturb(
        images, targets
    )
    deeplift = build_explainer("deeplift", model)
    assert not deeplift.supports_create_graph and deeplift.surrogate == "simple_gradient"
    attack = TopKInterpretationAttack(deeplift, epsilon=0.5, num_steps=3)
    assert attack.surrogate_name == "simple_gradient"
    adversarial, moved = attack.perturb(images, targets)
    torch.testing.assert_close(adversarial, expected, rtol=0, atol=1e-12)
    assert torch.equal(moved, expected_moved)
    # Asking for the simple-gradient surrogate replaces a differentiable method's own map too.
    smoothgrad = build_explainer("smoothgrad", model, nt_samples=2, stdevs=0.1)
    forced = TopKInterpretationAttack(smoothgrad, epsilon=0.5, num_steps=3, surrogate="simple_gradient")
    assert forced.surrogate_name == "simple_gradient"
    torch.testing.assert_close(forced.perturb(images, targets)[0], expected, rtol=0, atol=1e-12)


def test_moreaugrad_is_attacked_through_its_differentiable_map():
    model = _softplus_net()
    images = _images(batch=3)
    targets = _prediction(model, images)
    explainer = build_explainer("sparse_moreaugrad", model, num_steps=5)
    attack = TopKInterpretationAttack(explainer, epsilon=0.5, num_steps=2, step_size=0.05)
    assert attack.surrogate_name == "self" and attack.differentiated_explainer is explainer
    adversarial, moved = attack.perturb(images, targets)
    assert (_l2_offsets(adversarial, images) <= 0.5 * (1 + 1e-6)).all()
    assert torch.equal(_prediction(model, adversarial), targets)


def test_map_that_does_not_depend_on_the_input_leaves_samples_unmoved():
    """A linear model's gradient map is constant: D has no input gradient and no iterate can improve on it."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, NUM_CLASSES)).eval()
    images = _images(batch=3)
    adversarial, moved = TopKInterpretationAttack(SimpleGradient(model), epsilon=0.5).perturb(images, 1)
    assert not moved.any() and torch.equal(adversarial, images)


@pytest.mark.parametrize("training", [True, False])
def test_inputs_model_mode_and_parameter_grads_are_left_untouched(training):
    model = _softplus_net().train(training)
    images = _images(batch=3)
    images_before = images.clone()
    targets = _prediction(model, images)
    with torch.no_grad():  # e.g. a Lightning test step: the attack turns autograd back on for itself
        TopKInterpretationAttack(SimpleGradient(model), epsilon=0.3, num_steps=2).perturb(images, targets)
    GaussianNoise(SimpleGradient(model), 0.3).perturb(images, targets)
    assert model.training is training
    assert torch.equal(images, images_before) and images.grad is None and not images.requires_grad
    assert all(parameter.grad is None for parameter in model.parameters())


def test_attack_under_inference_mode_says_how_to_fix_it():
    model = _softplus_net()
    attack = TopKInterpretationAttack(SimpleGradient(model), epsilon=0.3)
    with torch.inference_mode(), pytest.raises(ValueError, match="inference_mode=False"):
        attack.perturb(_images(batch=2), 0)


@pytest.mark.parametrize("epsilon", [0, 0.0, -0.1, float("nan"), float("inf"), True, "0.1"])
def test_epsilon_must_be_positive(epsilon):
    model = _softplus_net()
    with pytest.raises(ValueError, match=r"epsilon must be (a finite number|> 0)"):
        TopKInterpretationAttack(SimpleGradient(model), epsilon=epsilon)
    with pytest.raises(ValueError, match=r"epsilon must be (a finite number|> 0)"):
        GaussianNoise(None, epsilon)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_steps": 0}, "num_steps"),
        ({"num_steps": 2.5}, "num_steps"),
        ({"step_size": 0.0}, "step_size"),
        ({"step_size": -0.01}, "step_size"),
        ({"topk_fraction": 0.0}, r"topk_fraction.*\(0, 1\]"),
        ({"topk_fraction": 1.5}, r"topk_fraction.*\(0, 1\]"),
        ({"surrogate": "deeplift"}, r"surrogate must be one of \('self', 'exact', 'simple_gradient'\)"),
        ({"surrogate": "exact"}, "not of that family"),
    ],
)
def test_bad_attack_settings_raise_clear_errors(settings, message):
    with pytest.raises(ValueError, match=message):
        TopKInterpretationAttack(SimpleGradient(_softplus_net()), epsilon=0.1, **settings)


def test_not_an_explainer_is_rejected():
    with pytest.raises(ValueError, match="mglightning explainer"):
        TopKInterpretationAttack(_softplus_net(), epsilon=0.1)


@pytest.mark.parametrize(
    ("inputs", "seeds", "message"),
    [
        (torch.rand(3, 8, 8), None, r"\(B, C, H, W\)"),
        (torch.rand(2, 3, 8, 8) * 2, None, r"in \[0, 1\]"),
        (torch.ones(2, 3, 8, 8, dtype=torch.long), None, "floating"),
        (torch.rand(2, 3, 8, 8), torch.tensor([1, 2, 3]), r"shape \(2,\)"),
        (torch.rand(2, 3, 8, 8), torch.tensor([1.0, 2.0]), "integer tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(inputs, seeds, message):
    model = _softplus_net()
    for attack in (TopKInterpretationAttack(SimpleGradient(model), epsilon=0.1), GaussianNoise(SimpleGradient(model), 0.1)):
        with pytest.raises(ValueError, match=message):
            attack.perturb(inputs, 0, seeds=seeds)


# ---------------------------------------------------------------- Gaussian noise
def test_gaussian_noise_has_norm_epsilon_and_stays_in_the_box():
    inputs = 0.25 + 0.5 * torch.rand(5, 3, 8, 8)
    noisy, moved = GaussianNoise(None, 0.3).perturb(inputs, 0, seeds=torch.arange(5))
    torch.testing.assert_close(_l2_offsets(noisy, inputs), torch.full((5,), 0.3))
    assert moved.all()
    at_faces = _images(batch=5)
    noisy, _ = GaussianNoise(None, 3.0).perturb(at_faces, 0, seeds=torch.arange(5))
    assert noisy.min() >= 0 and noisy.max() <= 1
    assert (_l2_offsets(noisy, at_faces) <= 3.0 * (1 + 1e-6)).all()


def test_gaussian_noise_depends_only_on_each_samples_seed():
    inputs = _images(batch=4, dtype=torch.float64)
    seeds = torch.tensor([3, 1, 4, 1])
    noisy, _ = GaussianNoise(None, 0.2).perturb(inputs, 0, seeds=seeds)
    for i in range(4):
        single, _ = GaussianNoise(None, 0.2).perturb(inputs[i : i + 1], 0, seeds=seeds[i : i + 1])
        torch.testing.assert_close(single, noisy[i : i + 1], rtol=0, atol=1e-12)
    same_image = inputs[[0, 0]]
    pair, _ = GaussianNoise(None, 0.2).perturb(same_image, 0, seeds=torch.tensor([1, 2]))
    assert not torch.equal(pair[0], pair[1])
    torch.manual_seed(7)
    first, _ = GaussianNoise(None, 0.2).perturb(inputs, 0)
    torch.manual_seed(7)
    assert torch.equal(GaussianNoise(None, 0.2).perturb(inputs, 0)[0], first)


def test_gaussian_noise_keeps_the_label_when_given_the_model():
    images = _images(batch=6)
    blocked = torch.tensor([False, True, False, False, True, False])
    model = FlipsWhenMoved(_softplus_net(), images[blocked], radius=1.0)
    noisy, moved = GaussianNoise(SimpleGradient(model), 0.5).perturb(images, 0, seeds=torch.arange(6))
    assert moved.tolist() == (~blocked).tolist()
    assert torch.equal(noisy[blocked], images[blocked])
    assert torch.equal(_prediction(model, noisy), _prediction(model, images))
    # Without the model the label is not checked: every sample moves.
    assert GaussianNoise(None, 0.5).perturb(images, 0, seeds=torch.arange(6))[1].all()


def test_ensemble_members_apply_only_where_they_differ_from_a_methods_own_attack():
    from mglightning.explainers import MoreauGrad, SmoothGrad

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 8), torch.nn.Softplus(), torch.nn.Linear(8, 3))
    methods = {"sg": SimpleGradient(model), "smooth": SmoothGrad(model, nt_samples=2),
               "deeplift": build_explainer("deeplift", model), "moreau": MoreauGrad(model, num_steps=3, noise_std=0.0)}
    applies = {
        surrogate: {name: TopKInterpretationAttack(e, 0.5, surrogate=surrogate, distinct_only=True).applies
                    for name, e in methods.items()}
        for surrogate in ("exact", "simple_gradient")
    }
    assert applies["exact"] == {"sg": False, "smooth": False, "deeplift": False, "moreau": True}
    assert applies["simple_gradient"] == {"sg": False, "smooth": True, "deeplift": False, "moreau": True}
    with pytest.raises(ValueError, match="does not apply"):
        TopKInterpretationAttack(methods["sg"], 0.5, surrogate="exact", distinct_only=True).run(torch.rand(2, 3, 4, 4), 0)
    with pytest.raises(ValueError, match="surrogate='exact'"):  # without distinct_only it is refused at once
        TopKInterpretationAttack(methods["sg"], 0.5, surrogate="exact")
