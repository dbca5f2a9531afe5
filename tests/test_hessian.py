"""Per-sample Hessian utilities against dense Hessians (`torch.autograd.functional.hessian`, `eigvalsh`)."""

import pytest
import torch
from noise_reference import sample_noise
from torch import nn

from mglightning.explainers.base import ClassScore
from mglightning.explainers.hessian import (
    ClassCrossEntropy,
    HessianOperator,
    hessian_vector_product,
    largest_eigenvalue,
    smallest_eigenvalue,
)

SHAPE = (3, 2, 2)  # (C, H, W): 12 input dimensions, small enough for dense Hessians
BATCH = 6


@pytest.fixture
def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Softplus(), nn.Linear(16, 5)).double().eval()
    points = torch.rand(BATCH, *SHAPE, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    return model, points, target


def objectives(model, target):
    """The cross-entropy (nearly PSD Hessian) and a logit (indefinite Hessian) of a softplus MLP."""
    return {"cross_entropy": ClassCrossEntropy(model, target), "logit": ClassScore(model, "logit", target)}


def dense_hessians(fn, points):
    """Each sample's dense `(D, D)` Hessian, one sample at a time."""
    hessians = []
    for i, point in enumerate(points):
        index = torch.tensor([i])
        hessians.append(
            torch.autograd.functional.hessian(lambda z: fn(z.view(1, *point.shape), index).sum(), point.flatten())
        )
    return torch.stack(hessians)


@pytest.mark.parametrize("kind", ["cross_entropy", "logit"])
def test_hvp_and_gradient_match_the_dense_hessian(problem, kind):
    model, points, target = problem
    fn = objectives(model, target)[kind]
    vectors = torch.randn_like(points)
    gradient, hvp = hessian_vector_product(fn, points, vectors)
    hessians = dense_hessians(fn, points)
    expected = torch.einsum("bij,bj->bi", hessians, vectors.flatten(1)).view_as(points)
    torch.testing.assert_close(hvp, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gradient, fn.gradient(points))
    assert hessians.abs().max() > 1e-3  # a real Hessian, not zeros


def test_cross_entropy_is_minus_log_softmax(problem):
    model, points, target = problem
    expected = nn.functional.cross_entropy(model(points), target, reduction="none")
    torch.testing.assert_close(ClassCrossEntropy(model, target)(points), expected)


@pytest.mark.parametrize("kind", ["cross_entropy", "logit"])
def test_extreme_eigenvalues_match_eigvalsh(problem, kind):
    model, points, target = problem
    fn = objectives(model, target)[kind]
    spectrum = torch.linalg.eigvalsh(dense_hessians(fn, points))
    seeds = torch.arange(BATCH) + 100
    largest = largest_eigenvalue(fn, points, 400, seeds)
    smallest = smallest_eigenvalue(fn, points, 400, seeds)
    torch.testing.assert_close(largest.values, spectrum[:, -1], rtol=1e-3, atol=0)
    torch.testing.assert_close(smallest.values, spectrum[:, 0], rtol=1e-3, atol=0)
    # Both eigenvalues are of either sign here, and the vectors are eigenvectors.
    assert (spectrum[:, -1] > 0).all() and (spectrum[:, 0] < 0).all()
    for estimate in (largest, smallest):
        _, product = hessian_vector_product(fn, points, estimate.vectors)
        residual = product - estimate.values.view(-1, 1, 1, 1) * estimate.vectors
        assert residual.flatten(1).norm(dim=1).max() < 0.05 * estimate.values.abs().min()


def test_the_shifted_pass_runs_exactly_where_the_dominant_eigenvalue_has_the_other_sign(problem):
    model, points, target = problem
    fn = objectives(model, target)["logit"]
    spectrum = torch.linalg.eigvalsh(dense_hessians(fn, points))
    negative_dominant = spectrum[:, 0].abs() > spectrum[:, -1]
    assert negative_dominant.any() and not negative_dominant.all()  # the test exercises both branches
    largest = largest_eigenvalue(fn, points, 50, torch.arange(BATCH))
    smallest = smallest_eigenvalue(fn, points, 50, torch.arange(BATCH))
    assert largest.sample_gradient_evaluations.tolist() == [200 if n else 100 for n in negative_dominant]
    assert smallest.sample_gradient_evaluations.tolist() == [100 if n else 200 for n in negative_dominant]
    assert largest.gradient_evaluations == int(largest.sample_gradient_evaluations.sum())


def test_zero_hessian_gives_zero_products_and_eigenvalues():
    linear = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).double()
    points = torch.rand(2, *SHAPE, dtype=torch.float64)
    fn = ClassScore(linear, "logit", torch.tensor([0, 2]))
    gradient, hvp = hessian_vector_product(fn, points, torch.randn_like(points))
    assert torch.equal(hvp, torch.zeros_like(points))
    torch.testing.assert_close(gradient[0].flatten(), linear[1].weight[0].detach())
    assert torch.equal(largest_eigenvalue(fn, points, 3, torch.arange(2)).values, torch.zeros(2, dtype=torch.float64))


def test_batch_invariance_of_the_eigenvalues(problem):
    model, points, target = problem
    seeds = torch.arange(BATCH) * 7
    batched = largest_eigenvalue(ClassScore(model, "logit", target), points, 30, seeds)
    for i in range(BATCH):
        objective = ClassScore(model, "logit", target[i : i + 1])
        alone = largest_eigenvalue(objective, points[i : i + 1], 30, seeds[i : i + 1])
        torch.testing.assert_close(alone.values, batched.values[i : i + 1])
        torch.testing.assert_close(alone.vectors, batched.vectors[i : i + 1])


def test_noisy_operator_is_the_mean_dense_hessian_of_the_seeded_copies(problem):
    model, points, target = problem
    fn = ClassCrossEntropy(model, target)
    seeds, copies, std = torch.arange(BATCH) + 3, 4, 0.2
    vectors = torch.randn_like(points)
    gradient, hvp = HessianOperator(fn, points, noise_std=std, noise_samples=copies, seeds=seeds)(vectors)
    expected_hvp, expected_gradient = [], []
    for i in range(BATCH):
        noise = sample_noise(int(seeds[i]), copies, SHAPE, std, dtype=points.dtype)
        copies_i = points[i] + noise
        index = torch.full((copies,), i)
        hessians = torch.stack([dense_hessians(lambda z, _: fn(z, index[:1]), copy[None])[0] for copy in copies_i])
        expected_hvp.append((hessians.mean(0) @ vectors[i].flatten()).view(SHAPE))
        expected_gradient.append(fn.gradient(copies_i, index).mean(0))
    torch.testing.assert_close(hvp, torch.stack(expected_hvp))
    torch.testing.assert_close(gradient, torch.stack(expected_gradient))


@pytest.mark.parametrize("noise_std", [0.0, 0.1])
def test_chunked_equals_unchunked_and_counts_two_per_row(problem, noise_std):
    model, points, target = problem
    fn = ClassCrossEntropy(model, target)
    seeds, vectors = torch.arange(BATCH), torch.randn_like(points)
    whole = HessianOperator(fn, points, noise_std=noise_std, noise_samples=3, seeds=seeds)
    chunked = HessianOperator(fn, points, noise_std=noise_std, noise_samples=3, seeds=seeds, internal_batch_size=2)
    for expected, actual in zip(whole(vectors), chunked(vectors)):
        torch.testing.assert_close(actual, expected)
    subset = torch.tensor([4, 1])
    for expected, actual in zip(whole(vectors)[1][subset], chunked(vectors[subset], subset)[1]):
        torch.testing.assert_close(actual, expected)
    copies = 3 if noise_std else 1
    expected = [2 * copies * (2 if i in (1, 4) else 1) for i in range(BATCH)]  # samples 1 and 4 twice
    assert chunked.sample_gradient_evaluations.tolist() == expected


def test_inputs_and_parameter_grads_untouched(problem):
    model, points, target = problem
    points.requires_grad_(True)
    before = points.detach().clone()
    largest_eigenvalue(ClassCrossEntropy(model, target), points, 3, torch.arange(BATCH))
    assert torch.equal(points.detach(), before) and points.grad is None
    assert all(p.grad is None for p in model.parameters())


def test_bad_arguments_raise(problem):
    model, points, target = problem
    fn = ClassCrossEntropy(model, target)
    with pytest.raises(ValueError, match="vectors must be shaped like points"):
        hessian_vector_product(fn, points, points[:2])
    with pytest.raises(ValueError, match="one scalar per row"):
        hessian_vector_product(lambda z, _: model(z), points, points)
    with pytest.raises(ValueError, match="need seeds"):
        HessianOperator(fn, points, noise_std=0.1, noise_samples=2)
    with pytest.raises(ValueError, match="num_iterations"):
        largest_eigenvalue(fn, points, 0)
    with pytest.raises(ValueError, match="internal_batch_size"):
        HessianOperator(fn, points, internal_batch_size=0)
