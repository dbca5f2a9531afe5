"""The local convexity diagnostic against dense Hessians (`torch.linalg.eigvalsh`) and Corollary 1's closed form."""

import math

import pytest
import torch
from noise_reference import sample_noise
from torch import nn

from mglightning.explainers.diagnostics import corollary_bound, local_convexity

SHAPE = (2, 2, 3)  # (C, H, W): 12 input dimensions, small enough for dense Hessians
BATCH = 5


@pytest.fixture
def softplus_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 24), nn.Softplus(beta=3.0), nn.Linear(24, 4)).double().eval()
    images = torch.rand(BATCH, *SHAPE, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 3, 1])
    return model, images, target


def dense_smallest_eigenvalues(model, images, target, noise=None):
    """Each sample's smallest eigenvalue of the dense Hessian of its logit (mean Hessian over `noise` copies)."""
    values = []
    for i, image in enumerate(images):
        copies = image.unsqueeze(0) if noise is None else image + noise[i]
        hessian = sum(
            torch.autograd.functional.hessian(lambda z: model(z.view(1, *SHAPE))[0, target[i]], copy.flatten())
            for copy in copies
        ) / len(copies)
        values.append(torch.linalg.eigvalsh(hessian)[0])
    return torch.stack(values)


def test_smallest_eigenvalue_matches_dense_hessian(softplus_mlp):
    model, images, target = softplus_mlp
    expected = dense_smallest_eigenvalues(model, images, target)
    assert (expected < 0).all()  # an indefinite Hessian: the test exercises the weak-convexity branch
    diagnostic = local_convexity(model, images, target, rho=0.1, num_iterations=400, seeds=torch.arange(BATCH))
    torch.testing.assert_close(diagnostic.smallest_eigenvalue, expected, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(diagnostic.weak_convexity, -expected)
    assert torch.equal(diagnostic.convex, 0.1 * -expected < 1)
    # Up to two power iterations of 400 Hessian-vector products, each counted as 2 evaluations per row.
    assert set(diagnostic.sample_gradient_evaluations.tolist()) <= {800, 1600}


def test_smoothed_score_matches_mean_dense_hessian(softplus_mlp):
    model, images, target = softplus_mlp
    seeds = torch.arange(10, 10 + BATCH)
    # The noise HessianOperator documents: sample i's copies j < 3, drawn from seeds[i] and j alone.
    noise = torch.stack([sample_noise(int(s), 3, SHAPE, 0.2, dtype=torch.float64) for s in seeds])
    expected = dense_smallest_eigenvalues(model, images, target, noise)
    diagnostic = local_convexity(
        model, images, target, rho=0.1, num_iterations=400, noise_std=0.2, noise_samples=3, seeds=seeds,
        internal_batch_size=4,
    )
    torch.testing.assert_close(diagnostic.smallest_eigenvalue, expected, rtol=1e-6, atol=1e-8)


def test_convex_score_has_no_weak_convexity():
    # A sum of softplus units of a linear map is convex: its Hessian is positive semi-definite.
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Softplus(), nn.Linear(8, 1, bias=False)).double()
    with torch.no_grad():
        model[3].weight.abs_()
    images = torch.rand(3, *SHAPE, dtype=torch.float64)
    diagnostic = local_convexity(model, images, 0, rho=0.5, epsilon=0.2, num_iterations=200, seeds=torch.arange(3))
    assert (diagnostic.weak_convexity == 0).all()
    assert diagnostic.convex.all() and diagnostic.convex_share == 1.0
    torch.testing.assert_close(diagnostic.bound, torch.full((3,), 0.2 / 0.5, dtype=torch.float64))


def test_batch_equals_each_sample_alone(softplus_mlp):
    model, images, target = softplus_mlp
    seeds = torch.arange(BATCH)
    batch = local_convexity(model, images, target, rho=0.3, epsilon=0.1, num_iterations=20, seeds=seeds)
    for i in range(BATCH):
        alone = local_convexity(model, images[i : i + 1], target[i : i + 1], rho=0.3, epsilon=0.1,
                                num_iterations=20, seeds=seeds[i : i + 1])
        torch.testing.assert_close(alone.smallest_eigenvalue, batch.smallest_eigenvalue[i : i + 1])
        torch.testing.assert_close(alone.bound, batch.bound[i : i + 1])


def test_corollary_bound_closed_form():
    lam = torch.tensor([0.0, 1.0, 2.0, 4.0, 5.0])
    rho = 0.2
    # min(rho, 1/lambda - rho): 0.2, min(0.2, 0.8), min(0.2, 0.3), min(0.2, 0.05), 1/5 - 0.2 = 0 -> no guarantee
    expected = torch.tensor([0.5, 0.5, 0.5, 0.1 / 0.05, math.inf])
    torch.testing.assert_close(corollary_bound(lam, rho, 0.1), expected)
    diagnostic_convex = rho * lam < 1
    assert diagnostic_convex.tolist() == [True, True, True, True, False]


@pytest.mark.parametrize(
    "settings, message",
    [({"rho": 0.0}, "rho"), ({"rho": 1.0, "epsilon": -1.0}, "epsilon"), ({"rho": 1.0, "num_iterations": 0},
     "num_iterations"), ({"rho": 1.0, "score": "probability"}, "score"), ({"rho": 1.0, "noise_std": -0.1},
     "noise_std")],
)
def test_bad_settings_fail_before_any_computation(softplus_mlp, settings, message):
    model, images, target = softplus_mlp
    with pytest.raises(ValueError, match=message):
        local_convexity(model, images, target, **settings)
