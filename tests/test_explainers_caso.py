"""CASO and CAFO against closed forms (linear-softmax Hessian, dense ridge solves, soft thresholds), dense
eigenvalues, optimality conditions, brute-force noise loops, a counting wrapper, and the slides' claim that the
two agree on confident predictions and not on unconfident ones."""

import pytest
import torch
from noise_reference import sample_noise
from test_cost import CountingModel
from test_explainers import _one_thread, softplus_cnn  # noqa: F401  (the fixture applies here too)
from torch import nn

from mglightning.explainers import (
    CAFO,
    CASO,
    EXPLAINERS,
    SimpleGradient,
    build_explainer,
    soft_threshold,
)
from mglightning.explainers.hessian import ClassCrossEntropy, hessian_vector_product
from mglightning.models.layers import Normalize

SHAPE = (3, 2, 2)  # the linear-softmax model's (C, H, W)
DIM = 12
CLASSES = 5


def linear_softmax(seed: int = 0) -> nn.Module:
    """`logits = W (x - mean) / std + b` in float64: a linear-softmax model with its normalisation inside."""
    torch.manual_seed(seed)
    linear = nn.Linear(DIM, CLASSES).double()
    with torch.no_grad():
        linear.weight.mul_(4)
    model = nn.Sequential(Normalize([0.5, 0.4, 0.3], [0.5, 1.0, 2.0]), nn.Flatten(), linear).double()
    return model.eval().requires_grad_(False)


def closed_form(model: nn.Module, points: torch.Tensor, target: torch.Tensor):
    """`g = W_eff^T (p - e_c)` and `H = W_eff^T (diag(p) - p p^T) W_eff`, with `W_eff = W / std` (pixel units)."""
    normalize, linear = model[0], model[2]
    weight = linear.weight / normalize.std.double().expand(1, *SHAPE).reshape(1, DIM)
    p = torch.softmax(model(points), 1)
    gradient = (p - nn.functional.one_hot(target, CLASSES)) @ weight
    hessian = weight.T @ (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) @ weight
    return gradient, hessian


def dense_loss_hessians(model, points, target):
    """Each sample's dense Hessian of its cross-entropy, one sample at a time."""
    loss = ClassCrossEntropy(model, target)
    hessians = []
    for i, point in enumerate(points):
        index = torch.tensor([i])
        hessians.append(
            torch.autograd.functional.hessian(lambda z: loss(z.view(1, *point.shape), index).sum(), point.flatten())
        )
    return torch.stack(hessians)


def loss_gradients(model, points, target):
    """Per-sample `grad CE` by a loop over samples (independent of the explainers' batching)."""
    gradients = []
    for point, c in zip(points, target):
        point = point.detach().clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(model(point[None]), c[None])
        gradients.append(torch.autograd.grad(loss, point)[0])
    return torch.stack(gradients)


@pytest.fixture
def linear_problem():
    model = linear_softmax()
    points = torch.rand(4, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, points, model(points).argmax(1)


@pytest.fixture
def cnn_problem():
    """The tiny softplus CNN with its weights tripled: curved enough that the Hessian term matters (eigenvalues
    of either sign up to about 0.5, against lambda2 = 0.5 in the optimality test) and unconfident (p_max < 0.8)."""
    model = softplus_cnn(dtype=torch.float64)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3)
    points = torch.rand(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    return model, points, torch.tensor([0, 3, 1])


# --- closed forms ---------------------------------------------------------------------------------------------


def test_linear_softmax_hessian_is_w_diag_p_minus_ppt_w(linear_problem):
    model, points, target = linear_problem
    loss = ClassCrossEntropy(model, target)
    basis = torch.eye(DIM, dtype=torch.float64)
    # Column j of each sample's Hessian is its HVP with e_j.
    columns = [hessian_vector_product(loss, points, basis[j].view(1, *SHAPE).expand_as(points))[1] for j in range(DIM)]
    hessians = torch.stack([c.flatten(1) for c in columns], dim=2)
    expected_gradient, expected_hessian = closed_form(model, points, target)
    torch.testing.assert_close(hessians, expected_hessian, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss.gradient(points).flatten(1), expected_gradient)


@pytest.mark.parametrize("step_size", [0.05, 10.0], ids=["reference_step", "backtracking_from_a_huge_step"])
def test_caso_without_l1_is_the_dense_ridge_solution(linear_problem, step_size):
    model, points, target = linear_problem
    explainer = CASO(model, lambda1=0.0, num_steps=80, step_size=step_size, power_iterations=200)
    explanation = explainer.explain(points, target, seeds=torch.arange(4))
    attribution = explanation.attribution
    gradient, hessian = closed_form(model, points, target)
    sigma_max = torch.linalg.eigvalsh(hessian)[:, -1]
    torch.testing.assert_close(explanation.sigma_max, sigma_max, rtol=1e-6, atol=0)
    torch.testing.assert_close(explanation.lambda2_effective, explanation.sigma_max + 4.0)
    lambda2_eff = explanation.sigma_max.view(-1, 1, 1) + 4.0
    expected = torch.linalg.solve(lambda2_eff * torch.eye(DIM, dtype=torch.float64) - hessian, gradient)
    torch.testing.assert_close(attribution.flatten(1), expected, rtol=0, atol=1e-4 * expected.abs().max().item())
    # The Hessian matters here: the ridge solution is not a multiple of g.
    cosine = nn.functional.cosine_similarity(expected, gradient, dim=1)
    assert (cosine < 0.999).any()


def test_caso_with_smoothing_solves_the_mean_hessian_of_the_seeded_copies(linear_problem):
    model, points, target = linear_problem
    seeds, copies, std = torch.tensor([5, 6, 7, 8]), 3, 0.3
    explainer = CASO(model, lambda1=0.0, num_steps=80, power_iterations=200, noise_std=std, noise_samples=copies)
    explanation = explainer.explain(points, target, seeds=seeds)
    attribution = explanation.attribution
    for i in range(len(points)):
        noise = sample_noise(int(seeds[i]), copies, SHAPE, std, dtype=torch.float64)
        gradient, hessian = closed_form(model, points[i] + noise, target[i].expand(copies))
        gradient, hessian = gradient.mean(0), hessian.mean(0)
        sigma_max = torch.linalg.eigvalsh(hessian)[-1]
        torch.testing.assert_close(explanation.sigma_max[i], sigma_max, rtol=1e-6, atol=0)
        expected = torch.linalg.solve((sigma_max + 4.0) * torch.eye(DIM, dtype=torch.float64) - hessian, gradient)
        torch.testing.assert_close(attribution[i].flatten(), expected, rtol=0, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("group_size", [None, 2])
@pytest.mark.parametrize("problem", ["linear_problem", "cnn_problem"])
def test_cafo_is_the_thresholded_loss_gradient_over_lambda2(problem, group_size, request):
    model, points, target = request.getfixturevalue(problem)
    gradient = loss_gradients(model, points, target)
    # The median entry (or block norm): the threshold zeroes about half of the map.
    size = group_size or 1
    blocks = gradient.unfold(2, size, size).unfold(3, size, size)
    lambda1 = float(blocks.square().sum((1, 4, 5)).sqrt().median())
    attribution = CAFO(model, lambda1=lambda1, lambda2=3.0, group_size=group_size).attribute(points, target)
    if group_size is None:
        expected = soft_threshold(gradient, lambda1) / 3.0
    else:  # a literal loop over the blocks
        expected = torch.zeros_like(gradient)
        for i in range(len(points)):
            for row in range(0, points.shape[2], group_size):
                for column in range(0, points.shape[3], group_size):
                    block = gradient[i, :, row : row + group_size, column : column + group_size]
                    shrink = max(0.0, 1 - lambda1 / float(block.norm()))
                    expected[i, :, row : row + group_size, column : column + group_size] = shrink * block / 3.0
    torch.testing.assert_close(attribution, expected)
    assert (attribution == 0).any() and (attribution != 0).any()


def test_the_maps_raise_the_loss_they_point_against_the_log_probability_gradient(cnn_problem):
    model, points, target = cnn_problem
    simple = SimpleGradient(model, score="log_softmax").attribute(points, target)
    torch.testing.assert_close(CAFO(model, lambda1=0.0, lambda2=2.0).attribute(points, target), -simple / 2.0)
    caso = CASO(model, lambda1=0.0).attribute(points, target, seeds=torch.arange(3))
    assert (nn.functional.cosine_similarity(caso.flatten(1), -simple.flatten(1), dim=1) > 0.9).all()


def test_smoothed_cafo_is_the_mean_gradient_over_the_seeded_noise(cnn_problem):
    model, points, target = cnn_problem
    seeds = torch.tensor([4, 9, 1])
    attribution = CAFO(model, lambda1=0.0, lambda2=2.0, noise_std=0.15, noise_samples=5, internal_batch_size=4)
    actual = attribution.attribute(points, target, seeds=seeds)
    for i in range(len(points)):
        noise = sample_noise(int(seeds[i]), 5, (3, 8, 8), 0.15, dtype=torch.float64)
        expected = loss_gradients(model, points[i] + noise, target[i].expand(5)).mean(0) / 2.0
        torch.testing.assert_close(actual[i], expected)


# --- the power iteration and the solver on a softplus network ------------------------------------------------


def test_sigma_max_matches_eigvalsh_of_the_dense_hessian(cnn_problem):
    model, points, target = cnn_problem
    explainer = CASO(model, power_iterations=300, num_steps=1)
    explanation = explainer.explain(points, target, seeds=torch.tensor([3, 4, 5]))
    expected = torch.linalg.eigvalsh(dense_loss_hessians(model, points, target))[:, -1]
    torch.testing.assert_close(explanation.sigma_max, expected, rtol=1e-3, atol=0)


@pytest.mark.parametrize("group_size", [None, 2])
def test_caso_satisfies_the_optimality_conditions_of_its_problem(cnn_problem, group_size):
    """KKT of `min -g.d - d.Hd/2 + lam_eff ||d||^2/2 + lambda1 R(d)`: with the residual `r = g + Hd - lam_eff d`,
    `r = lambda1 * d/|d|` (per entry, or per block) where the solution is non-zero and `|r| <= lambda1` where it
    is zero. Checked with the dense Hessian."""
    model, points, target = cnn_problem
    gradient = loss_gradients(model, points, target)
    size = group_size or 1
    lambda1 = float(gradient.unfold(2, size, size).unfold(3, size, size).square().sum((1, 4, 5)).sqrt().quantile(0.7))
    explainer = CASO(model, lambda1=lambda1, lambda2=0.5, num_steps=300, power_iterations=50, group_size=group_size)
    explanation = explainer.explain(points, target, seeds=torch.arange(3))
    delta = explanation.attribution
    hessians = dense_loss_hessians(model, points, target)
    lambda2_eff = explanation.lambda2_effective.view(-1, 1, 1, 1)
    residual = gradient + torch.einsum("bij,bj->bi", hessians, delta.flatten(1)).view_as(delta) - lambda2_eff * delta
    tolerance = 1e-3 * lambda1
    if group_size is None:
        groups_residual, groups_delta = residual.flatten(1)[..., None], delta.flatten(1)[..., None]
    else:
        def blocks(values):
            b, c, h, w = values.shape
            values = values.view(b, c, h // group_size, group_size, w // group_size, group_size)
            return values.permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * group_size**2)

        groups_residual, groups_delta = blocks(residual), blocks(delta)
    norms = groups_delta.norm(dim=2)
    nonzero = norms > 0
    assert nonzero.any() and (~nonzero).any()
    direction = groups_delta / norms.clamp_min(1e-300)[..., None]
    assert (groups_residual - lambda1 * direction)[nonzero].abs().max() < tolerance
    assert groups_residual.norm(dim=2)[~nonzero].max() <= lambda1 + tolerance


# --- the explainer contract -----------------------------------------------------------------------------------


@pytest.mark.parametrize("noise_std", [0.0, 0.1])
@pytest.mark.parametrize("cls", [CASO, CAFO])
def test_a_batch_equals_each_sample_alone(cls, noise_std):
    model, images = softplus_cnn(), torch.rand(3, 3, 8, 8)
    target, seeds = torch.tensor([0, 3, 1]), torch.tensor([11, 22, 33])
    explainer = cls(model, noise_std=noise_std, noise_samples=3)
    together = explainer.explain(images, target, seeds=seeds)
    for i in range(3):
        alone = explainer.explain(images[i : i + 1], target[i : i + 1], seeds=seeds[i : i + 1])
        torch.testing.assert_close(together.attribution[i : i + 1], alone.attribution, rtol=0, atol=1e-6)
        if cls is CASO:
            torch.testing.assert_close(together.sigma_max[i : i + 1], alone.sigma_max, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("noise_std", [0.0, 0.1])
@pytest.mark.parametrize("cls", [CASO, CAFO])
def test_chunked_equals_unchunked(cls, noise_std):
    model, images = softplus_cnn(), torch.rand(3, 3, 8, 8)
    target, seeds = torch.tensor([0, 3, 1]), torch.tensor([11, 22, 33])
    settings = {"noise_std": noise_std, "noise_samples": 3}
    whole = cls(model, **settings, internal_batch_size=None).attribute(images, target, seeds=seeds)
    for chunk in (1, 4):
        chunked = cls(model, **settings, internal_batch_size=chunk).attribute(images, target, seeds=seeds)
        torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cls", [CASO, CAFO])
@pytest.mark.parametrize("training", [False, True])
def test_inputs_grads_and_mode_are_left_untouched(cls, training):
    model = softplus_cnn().train(training)
    for parameter in model.parameters():
        parameter.grad = torch.full_like(parameter, 0.5)
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    images.grad = torch.full_like(images, 0.25)
    before = images.detach().clone()
    explainer = cls(model, noise_std=0.1, noise_samples=2)
    explainer.attribute(images, 1, seeds=torch.tensor([1, 2]))
    if explainer.supports_create_graph:
        explainer.attribute(images, 1, seeds=torch.tensor([1, 2]), create_graph=True)
    assert torch.equal(images.detach(), before) and images.requires_grad and images.is_leaf
    assert torch.equal(images.grad, torch.full_like(images, 0.25))
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert all(module.training == training for module in model.modules())


@pytest.mark.parametrize(
    "cls, settings, message",
    [
        (CASO, {"lambda2": 0.0}, "lambda2 must be > 0"),
        (CAFO, {"lambda2": -1.0}, "lambda2 must be > 0"),
        (CASO, {"lambda1": -1e-3}, "lambda1 must be >= 0"),
        (CAFO, {"lambda1": float("nan")}, "lambda1 must be a finite number"),
        (CASO, {"num_steps": 0}, "num_steps must be an integer >= 1"),
        (CASO, {"power_iterations": 0}, "power_iterations must be an integer >= 1"),
        (CASO, {"step_size": 0.0}, "step_size must be > 0"),
        (CAFO, {"group_size": 0}, "group_size must be an integer >= 1"),
        (CASO, {"noise_samples": 0}, "noise_samples must be an integer >= 1"),
        (CAFO, {"noise_std": -0.1}, "noise_std must be >= 0"),
        (CASO, {"internal_batch_size": 0}, "internal_batch_size must be an integer >= 1"),
        (CAFO, {"score": "logit"}, "score must be 'log_softmax'"),
    ],
)
def test_bad_settings_fail_at_construction_naming_the_class(cls, settings, message):
    with pytest.raises(ValueError, match=f"{cls.__name__}: {message}"):
        cls(softplus_cnn(), **settings)


def test_bad_calls_fail_with_clear_errors():
    model, images = softplus_cnn(), torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="CASO: group_size=3 must divide the image height 8"):
        CASO(model, group_size=3).attribute(images, 0)
    with pytest.raises(ValueError, match="differentiate its declared surrogate 'simple_gradient'"):
        CASO(model).attribute(images.requires_grad_(True), 0, create_graph=True)


def test_cafo_create_graph_map_passes_gradcheck():
    model = softplus_cnn(channels=1, size=4, classes=3, dtype=torch.float64)
    images = torch.rand(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    target, seeds = torch.tensor([2, 0]), torch.tensor([3, 4])
    for settings in ({"lambda1": 0.0}, {"lambda1": 1e-3, "group_size": 2}, {"lambda1": 0.0, "noise_std": 0.1}):
        explainer = CAFO(model, noise_samples=2, **settings)

        def attribution(x):
            return explainer.attribute(x, target, seeds=seeds, create_graph=True)

        torch.testing.assert_close(attribution(images).detach(), explainer.attribute(images, target, seeds=seeds))
        assert torch.autograd.gradcheck(attribution, (images,))


@pytest.mark.parametrize("noise_std", [0.0, 0.1])
def test_gradient_evaluations_count_an_hvp_as_two_rows(noise_std):
    """Chunked, every Hessian-vector product is one forward pass of its rows (then two backward passes): CASO counts
    2 per forward row. When all rows fit in one chunk, one forward pass serves the whole solve and the count is the
    same (it counts products, not passes). CAFO counts its one gradient per row."""
    model = CountingModel(softplus_cnn())
    images, target, seeds = torch.rand(3, 3, 8, 8), torch.tensor([0, 1, 3]), torch.tensor([4, 5, 6])
    copies = 2 if noise_std else 1
    chunked = CASO(model, noise_std=noise_std, noise_samples=2, internal_batch_size=1)
    per_sample = chunked.explain(images, target, seeds=seeds).gradient_evaluations
    assert int(per_sample.sum()) == 2 * model.rows
    assert per_sample.dtype == torch.long and per_sample.device.type == "cpu" and per_sample.shape == (3,)
    model.rows_per_call.clear()
    whole = CASO(model, noise_std=noise_std, noise_samples=2, internal_batch_size=None)
    whole_cost = whole.explain(images, target, seeds=seeds).gradient_evaluations
    assert model.rows_per_call == [3 * copies]
    assert torch.equal(whole_cost, per_sample)
    for i in range(3):  # each sample alone costs what the batch call said it cost
        alone = chunked.explain(images[i : i + 1], target[i : i + 1], seeds=seeds[i : i + 1])
        assert alone.gradient_evaluations.tolist() == [per_sample[i]]
    model.rows_per_call.clear()
    cafo = CAFO(model, noise_std=noise_std, noise_samples=2)
    assert int(cafo.explain(images, target, seeds=seeds).gradient_evaluations.sum()) == model.rows == 3 * copies


def test_registered_with_names_families_and_surrogates():
    assert EXPLAINERS["caso"] is CASO and EXPLAINERS["cafo"] is CAFO
    assert (CASO.display_name, CAFO.display_name) == ("CASO", "CAFO")
    assert CASO.family == CAFO.family == "second_order"
    assert not CASO.supports_create_graph and CASO.surrogate == "simple_gradient"
    assert CAFO.supports_create_graph and CAFO.surrogate == "self"
    explainer = build_explainer("caso", softplus_cnn(), lambda1=1e-3, num_steps=4)
    assert (explainer.lambda1, explainer.num_steps, explainer.lambda2) == (1e-3, 4, 4.0)


# --- the slides' claim ------------------------------------------------------------------------------------------


def test_caso_and_cafo_agree_on_confident_predictions_and_differ_on_unconfident_ones():
    """A softplus MLP trained in about a second on 10 noisy class prototypes, explained on held-out samples and on
    blends of several prototypes (the unconfident predictions whose probability spreads over many classes, where
    the Hessian term matters). lambda1 = 0, as the reference README compares them; other settings the defaults."""
    generator = torch.Generator().manual_seed(0)
    classes, dim = 10, 16
    prototypes = torch.rand(classes, dim, generator=generator)
    labels = torch.arange(600) % classes
    samples = (prototypes[labels] + 0.25 * torch.randn(600, dim, generator=generator)).clamp(0, 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(dim, 32), nn.Softplus(), nn.Linear(32, classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(samples[:400]), labels[:400]).backward()
        optimizer.step()
    model.eval().requires_grad_(False)
    weights = torch.rand(200, classes, generator=generator).pow(3)
    blends = (weights / weights.sum(1, keepdim=True)) @ prototypes
    images = torch.cat([samples[400:], blends]).view(-1, 1, 4, 4)
    with torch.no_grad():
        confidence, prediction = model(images).softmax(1).max(1)
    assert (prediction[:200] == labels[400:]).double().mean() > 0.9
    order = confidence.argsort()
    count = len(images) // 10
    groups = torch.cat([order[:count], order[-count:]])
    caso = CASO(model, lambda1=0.0).attribute(images[groups], prediction[groups], seeds=groups)
    cafo = CAFO(model, lambda1=0.0).attribute(images[groups], prediction[groups])
    cosine = nn.functional.cosine_similarity(caso.flatten(1), cafo.flatten(1), dim=1)
    least, most = cosine[:count], cosine[count:]
    assert confidence[order[:count]].max() < 0.7 and confidence[order[-count:]].min() > 0.999
    assert most.median() > 0.9999
    assert least.median() < 0.99 and least.max() < most.min()
