"""The MoreauGrad family against closed forms (quadratic, linear, L1 "networks"), brute-force loops and its
own guarantees: sparsity, group structure, the tol/accelerate solver options and the attack surrogate."""

import pytest
import torch
from noise_reference import sample_noise
from test_explainers import _one_thread, softplus_cnn  # noqa: F401  (the fixture applies here too)
from torch import nn

from mglightning.explainers import (
    GroupSparseMoreauGrad,
    MoreauGrad,
    SimpleGradient,
    SparseMoreauGrad,
    group_soft_threshold,
    moreau_surrogate,
    soft_threshold,
)

SHAPE = (2, 4, 4)  # (C, H, W) of the closed-form tests' images
DIM = 2 * 4 * 4


class QuadraticAndLinear(nn.Module):
    """Class 0: `0.5 z^T A z + b^T z`; class 1: `a^T z`; class 2: `||z||_1` (as a ReLU network)."""

    def __init__(self, A, b, a):
        super().__init__()
        self.A, self.b, self.a = A, b, a

    def forward(self, z):
        z = z.flatten(1)
        quadratic = 0.5 * ((z @ self.A) * z).sum(1) + z @ self.b
        l1 = (torch.relu(z) + torch.relu(-z)).sum(1)
        return torch.stack([quadratic, z @ self.a, l1], dim=1)


@pytest.fixture
def closed_form():
    generator = torch.Generator().manual_seed(7)
    Q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=generator, dtype=torch.float64))
    A = Q @ torch.diag(torch.linspace(0.1, 2.0, DIM, dtype=torch.float64)) @ Q.T  # positive definite
    b = torch.randn(DIM, generator=generator, dtype=torch.float64)
    a = torch.randn(DIM, generator=generator, dtype=torch.float64)
    images = torch.rand(3, *SHAPE, generator=generator, dtype=torch.float64)
    return QuadraticAndLinear(A, b, a), images


def exact_quadratic_moreaugrad(model, images, rho):
    """`(x - z*) / rho` with `z* = (A + I / rho)^-1 (x / rho - b)`, the minimiser's closed form."""
    x = images.flatten(1)
    z_star = torch.linalg.solve(model.A + torch.eye(DIM, dtype=torch.float64) / rho, (x / rho - model.b).T).T
    return ((x - z_star) / rho).view_as(images)


@pytest.mark.parametrize(
    "solver", [{}, {"accelerate": True}, {"tol": 1e-9}, {"tol": 1e-9, "accelerate": True}], ids=str
)
@pytest.mark.parametrize("rho", [0.5, 1.0])
def test_quadratic_matches_the_exact_minimiser(closed_form, rho, solver):
    model, images = closed_form
    explainer = MoreauGrad(model, rho=rho, step_size=0.1, num_steps=250, noise_std=0.0, **solver)
    expected = exact_quadratic_moreaugrad(model, images, rho)
    torch.testing.assert_close(explainer.attribute(images, 0), expected, rtol=0, atol=1e-4)


def test_linear_score_gives_its_gradient_for_any_rho(closed_form):
    model, images = closed_form
    for rho in (0.05, 1.0, 10.0):
        explainer = MoreauGrad(model, rho=rho, step_size=rho / 2, num_steps=60, noise_std=0.0)
        torch.testing.assert_close(
            explainer.attribute(images, 1), model.a.view(1, *SHAPE).expand_as(images), rtol=0, atol=1e-4
        )


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_sparse_moreaugrad_of_a_linear_score_is_the_soft_threshold_solution(closed_form, eta):
    model, images = closed_form
    rho = 0.5
    explainer = SparseMoreauGrad(model, rho=rho, step_size=0.1, num_steps=200, noise_std=0.0, eta=eta)
    # d* = z* - x = ST_{rho eta}(-rho a), and the map is -d* / rho.
    expected = -soft_threshold(-rho * model.a, rho * eta).view(1, *SHAPE) / rho
    attributions = explainer.attribute(images, 1)
    torch.testing.assert_close(attributions, expected.expand_as(images), rtol=0, atol=1e-6)
    assert (attributions == 0).any() and (attributions != 0).any()


def test_group_sparse_moreaugrad_of_a_linear_score_is_the_group_soft_threshold_solution(closed_form):
    model, images = closed_form
    rho, eta = 0.5, 2.5  # threshold 1.25 lies between the block norms of rho * a
    explainer = GroupSparseMoreauGrad(
        model, rho=rho, step_size=0.1, num_steps=200, noise_std=0.0, eta=eta, group_size=2
    )
    expected = -group_soft_threshold(-rho * model.a.view(1, *SHAPE), rho * eta, 2) / rho
    attributions = explainer.attribute(images, 1)
    torch.testing.assert_close(attributions, expected.expand_as(images), rtol=0, atol=1e-6)
    assert (attributions == 0).any() and (attributions != 0).any()


def test_moreau_gradient_of_the_l1_norm_is_the_huber_gradient(closed_form):
    # The Moreau envelope of ||z||_1 is the Huber function; its gradient is clip(x / rho, -1, 1).
    model, _ = closed_form
    images = torch.linspace(-1.5, 1.5, 3 * DIM, dtype=torch.float64).view(3, *SHAPE)
    rho = 1.0
    # A nonsmooth score: plain steps oscillate by about step_size around the kink; the average damps that.
    explainer = MoreauGrad(model, rho=rho, step_size=2e-3, num_steps=5000, noise_std=0.0, average_last=2000)
    expected = torch.clamp(images / rho, -1, 1)
    torch.testing.assert_close(explainer.attribute(images, 2), expected, rtol=0, atol=3e-3)


def test_small_rho_approaches_the_simple_gradient():
    model = softplus_cnn()
    images = torch.rand(4, 3, 8, 8)
    target = torch.tensor([0, 1, 2, 3])
    moreau = MoreauGrad(model, rho=1e-3, step_size=5e-4, num_steps=40, noise_std=0.0).attribute(images, target)
    simple = SimpleGradient(model).attribute(images, target)
    cosine = torch.nn.functional.cosine_similarity(moreau.flatten(1), simple.flatten(1))
    assert (cosine > 0.999).all()
    # A large rho smooths: the map moves away from the simple gradient.
    smooth = MoreauGrad(model, rho=20.0, step_size=2.0, num_steps=40, noise_std=0.0).attribute(images, target)
    assert (torch.nn.functional.cosine_similarity(smooth.flatten(1), simple.flatten(1)) < cosine).all()


def test_regularised_mode_equals_algorithm_1_as_a_per_sample_loop():
    model = softplus_cnn(dtype=torch.float64)
    images = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    target, seeds = torch.tensor([2, 1]), torch.tensor([5, 9])
    rho, step, steps, copies, std = 1.0, 0.2, 4, 3, 0.1
    explainer = MoreauGrad(model, rho=rho, step_size=step, num_steps=steps, noise_std=std, noise_samples=copies,
                           internal_batch_size=4)
    explanation = explainer.explain(images, target, seeds=seeds)
    actual = explanation.attribution
    for i in range(2):
        z = images[i].clone()
        for t in range(steps):
            noise = sample_noise(int(seeds[i]), copies, (3, 8, 8), std, step=t, dtype=torch.float64)
            noisy = (z + noise).requires_grad_(True)
            mean_gradient = torch.autograd.grad(model(noisy)[:, target[i]].sum(), noisy)[0].mean(0)
            z = (1 - step / rho) * z - step * (mean_gradient - images[i] / rho)  # Algorithm 1's update
        torch.testing.assert_close(actual[i], (images[i] - z) / rho, rtol=0, atol=1e-12)
    assert explanation.iterations.tolist() == [steps, steps]
    assert int(explanation.gradient_evaluations.sum()) == 2 * steps * copies


def test_sparsity_grows_monotonically_with_eta():
    model = softplus_cnn()
    images = torch.rand(2, 3, 8, 8)
    target = torch.tensor([1, 2])
    zero_shares = []
    for eta in (0.0, 2e-4, 5e-4, 1e-3, 2e-3, 1e-2):
        explainer = SparseMoreauGrad(model, rho=1.0, step_size=0.2, num_steps=50, noise_std=0.0, eta=eta)
        zero_shares.append((explainer.attribute(images, target) == 0).float().mean().item())
    assert zero_shares == sorted(zero_shares)
    assert zero_shares[0] == 0.0 and 0.0 < zero_shares[3] < 1.0 and zero_shares[-1] > 0.9


def test_group_sparse_maps_are_zero_on_whole_groups():
    model = softplus_cnn()
    images = torch.rand(2, 3, 8, 8)
    explainer = GroupSparseMoreauGrad(model, num_steps=20, noise_samples=4, eta=1e-2, group_size=2)
    attributions = explainer.attribute(images, torch.tensor([1, 2]), seeds=torch.tensor([0, 1]))
    zero = (attributions == 0).reshape(2, 3, 4, 2, 4, 2)
    assert torch.equal(zero.all(dim=(1, 3, 5)), zero.any(dim=(1, 3, 5)))  # each 2x2 block, all channels
    group_zero = zero.all(dim=(1, 3, 5))
    assert group_zero.any() and not group_zero.all()


class TwoSpeeds(nn.Module):
    """Class 0 is strongly curved (the solver converges fast), class 1 linear (slow)."""

    def forward(self, z):
        z = z.flatten(1)
        return torch.stack([2.0 * (z**2).sum(1) + z.sum(1), 0.5 * z.sum(1)], dim=1)


def test_tol_stops_each_sample_on_its_own_and_saves_evaluations():
    model = TwoSpeeds()
    images = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    target = torch.tensor([0, 1, 0])
    explainer = MoreauGrad(model, step_size=0.1, num_steps=500, noise_std=0.0, tol=1e-6)
    explanation = explainer.explain(images, target)
    attributions, iterations = explanation.attribution, explanation.iterations
    assert iterations[0] == iterations[2] < iterations[1] < 500
    assert int(explanation.gradient_evaluations.sum()) == iterations.sum().item()
    exact = MoreauGrad(model, step_size=0.1, num_steps=500, noise_std=0.0).attribute(images, target)
    torch.testing.assert_close(attributions, exact, rtol=0, atol=1e-4)
    # Stopping is decided per sample, so a sample alone stops at the same step with the same map.
    alone = MoreauGrad(model, step_size=0.1, num_steps=500, noise_std=0.0, tol=1e-6)
    alone_solved = alone.explain(images[1:2], target[1:2])
    torch.testing.assert_close(alone_solved.attribution, attributions[1:2], rtol=0, atol=1e-12)
    assert alone_solved.iterations.tolist() == [iterations[1].item()]


def test_tol_in_regularised_mode_counts_every_noisy_copy():
    model = softplus_cnn()
    images = torch.rand(2, 3, 8, 8)
    explainer = MoreauGrad(model, num_steps=30, noise_samples=3, noise_std=0.05, tol=0.05)
    explanation = explainer.explain(images, torch.tensor([1, 2]), seeds=torch.tensor([3, 4]))
    assert int(explanation.gradient_evaluations.sum()) == 3 * explanation.iterations.sum().item()


def test_accelerate_needs_fewer_steps_for_the_same_solution(closed_form):
    model, images = closed_form
    expected = exact_quadratic_moreaugrad(model, images, rho=1.0)
    steps_to_converge = {}
    for accelerate in (False, True):
        explainer = MoreauGrad(model, step_size=0.1, num_steps=1000, noise_std=0.0, tol=1e-8, accelerate=accelerate)
        explanation = explainer.explain(images, 0)
        torch.testing.assert_close(explanation.attribution, expected, rtol=0, atol=1e-5)
        steps_to_converge[accelerate] = explanation.iterations.max().item()
    assert steps_to_converge[True] <= steps_to_converge[False] / 2


def test_average_last_is_the_mean_of_the_last_iterates(closed_form):
    model, images = closed_form
    settings = {"rho": 1.0, "step_size": 0.3, "noise_std": 0.0}
    averaged = MoreauGrad(model, num_steps=10, average_last=3, **settings).attribute(images, 0)
    last_three = [MoreauGrad(model, num_steps=steps, **settings).attribute(images, 0) for steps in (8, 9, 10)]
    torch.testing.assert_close(averaged, torch.stack(last_three).mean(0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls", [SparseMoreauGrad, GroupSparseMoreauGrad])
def test_average_last_of_the_sparse_variants_is_the_mean_of_their_last_iterates(cls):
    # The paper-settings configs return the official code's mean of the last iterates for all three methods.
    model = softplus_cnn(dtype=torch.float64)
    images = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    target, seeds = torch.tensor([1, 3]), torch.tensor([0, 1])
    settings = {"rho": 1.0, "step_size": 0.2, "noise_std": 0.05, "noise_samples": 2,
                "eta": 2e-3 if cls is SparseMoreauGrad else 1e-2}
    if cls is GroupSparseMoreauGrad:
        settings["group_size"] = 2
    averaged = cls(model, num_steps=10, average_last=3, **settings).attribute(images, target, seeds=seeds)
    # The same seeds draw the same noise for the first steps of a shorter solve, so steps 8, 9, 10 are its iterates.
    last_three = [
        cls(model, num_steps=steps, **settings).attribute(images, target, seeds=seeds) for steps in (8, 9, 10)
    ]
    torch.testing.assert_close(averaged, torch.stack(last_three).mean(0), rtol=0, atol=1e-12)
    assert (averaged == 0).any() and (averaged != 0).any()
    with pytest.raises(ValueError, match="either tol or average_last"):
        cls(model, num_steps=10, average_last=3, tol=1e-3, **settings)


def test_gradient_evaluations_count_model_rows():
    model = softplus_cnn()
    images = torch.rand(3, 3, 8, 8)
    plain = MoreauGrad(model, num_steps=4, noise_std=0.0)
    solved = plain.explain(images, 1)
    assert int(solved.gradient_evaluations.sum()) == 3 * 4 and solved.iterations.tolist() == [4, 4, 4]
    regularised = MoreauGrad(model, num_steps=4, noise_samples=5, internal_batch_size=7)
    graph = regularised.explain(images, 1, create_graph=True)
    assert int(graph.gradient_evaluations.sum()) == 3 * 4 * 5 + 3  # the surrogate adds one pass


def test_no_graph_survives_between_solver_steps():
    model = softplus_cnn()
    inputs_seen = []
    model.register_forward_pre_hook(lambda module, args: inputs_seen.append(args[0]))
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    MoreauGrad(model, num_steps=5, noise_samples=2).attribute(images * 1.0, 1)
    # Every model input is a fresh leaf: nothing links a step's gradient to earlier steps or to the inputs.
    assert len(inputs_seen) == 5 and all(x.is_leaf and x.requires_grad for x in inputs_seen)


@pytest.mark.parametrize("cls", [MoreauGrad, SparseMoreauGrad, GroupSparseMoreauGrad])
def test_create_graph_returns_the_surrogate_of_the_solved_displacement(cls):
    model = softplus_cnn(dtype=torch.float64)
    images = torch.rand(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    target, seeds = torch.tensor([0, 2]), torch.tensor([1, 2])
    settings = {"num_steps": 8, "noise_samples": 2, "noise_std": 0.1}
    if cls is not MoreauGrad:
        settings["eta"] = 2e-3 if cls is SparseMoreauGrad else 1e-2  # about half of each map zero
    if cls is GroupSparseMoreauGrad:
        settings["group_size"] = 2
    explainer = cls(model, **settings)
    displacement = -explainer.rho * explainer.attribute(images, target, seeds=seeds)
    surrogate = explainer.attribute(images, target, seeds=seeds, create_graph=True)
    assert surrogate.grad_fn is not None
    expected = (displacement != 0) * SimpleGradient(model).attribute(images + displacement, target).abs()
    torch.testing.assert_close(surrogate.detach(), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(surrogate, moreau_surrogate(model, images, displacement, target), rtol=0, atol=0)
    if cls is not MoreauGrad:
        assert (surrogate[displacement == 0] == 0).all() and (displacement == 0).any() and (displacement != 0).any()


def test_surrogate_with_the_displacement_held_fixed_passes_gradcheck():
    # attribute(create_graph=True) differentiates through x + d with d solved without a graph; a plain
    # gradcheck of attribute would re-solve d at every perturbed x, so check the surrogate for a fixed d.
    model = softplus_cnn(channels=1, size=4, classes=3, dtype=torch.float64)
    images = torch.rand(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([2, 0])
    explainer = SparseMoreauGrad(model, num_steps=20, noise_std=0.0, eta=1e-3)
    displacement = -explainer.rho * explainer.attribute(images, target)
    assert (displacement == 0).any() and (displacement != 0).any()
    assert torch.autograd.gradcheck(lambda x: moreau_surrogate(model, x, displacement, target), (images,))


def test_surrogate_rejects_a_displacement_of_the_wrong_shape():
    model = softplus_cnn()
    with pytest.raises(ValueError, match="displacement must be shaped like inputs"):
        moreau_surrogate(model, torch.rand(2, 3, 8, 8), torch.zeros(1, 3, 8, 8), 0)


# ----------------------------------------------------------------------------------------------- target sparsity


def _zero_share(maps):
    return (maps == 0).flatten(1).double().mean(1)


def test_target_zero_fraction_of_a_linear_score_is_reached_in_one_round(closed_form):
    # For a linear score the solution zeroes exactly the entries with |a_i| <= eta, so the search's start (the target
    # quantile of |grad f_c(x)|) is already the answer: one solve, and the map is the closed form at the eta found.
    model, images = closed_form
    explainer = SparseMoreauGrad(model, rho=0.5, step_size=0.1, num_steps=200, noise_std=0.0, target_zero_fraction=0.25)
    explanation = explainer.explain(images, 1)
    attributions = explanation.attribution
    assert torch.equal(_zero_share(attributions), torch.full((3,), 0.25, dtype=torch.float64))
    assert explanation.gradient_evaluations.tolist() == [1 + 200] * 3  # the gradient at x, one solve
    eta = float(explanation.eta[0])
    magnitudes = model.a.abs().sort().values
    assert magnitudes[DIM // 4 - 1] < eta < magnitudes[DIM // 4]  # zeroes the 8 smallest of the 32 entries
    expected = -soft_threshold(-0.5 * model.a, 0.5 * eta).view(1, *SHAPE) / 0.5
    torch.testing.assert_close(attributions, expected.expand_as(images), rtol=0, atol=1e-6)


@pytest.mark.parametrize("noise_std", [0.0, 0.05], ids=["plain", "regularised"])
@pytest.mark.parametrize("cls", [SparseMoreauGrad, GroupSparseMoreauGrad])
def test_target_zero_fraction_holds_for_every_map_and_the_eta_found_reproduces_it(cls, noise_std):
    model = softplus_cnn(dtype=torch.float64)
    images = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    target, seeds = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7])
    settings = {"rho": 1.0, "step_size": 0.2, "num_steps": 30, "noise_std": noise_std, "noise_samples": 2}
    if cls is GroupSparseMoreauGrad:
        settings["group_size"] = 2  # 16 groups: the achievable shares are multiples of 1/16
    explainer = cls(model, target_zero_fraction=0.6, **settings)
    explanation = explainer.explain(images, target, seeds=seeds)
    attributions = explanation.attribution
    goal = 10 / 16 if cls is GroupSparseMoreauGrad else 0.6  # 0.6 rounds to 10 of 16 groups
    assert ((_zero_share(attributions) - goal).abs() <= explainer.search_tolerance).all()
    # Each sample's eta, given as a fixed eta to that sample alone, gives its map: the search is per sample.
    for i in range(4):
        fixed = cls(model, eta=float(explanation.eta[i]), **settings)
        alone = fixed.attribute(images[i : i + 1], target[i : i + 1], seeds=seeds[i : i + 1])
        torch.testing.assert_close(alone, attributions[i : i + 1], rtol=0, atol=1e-10)
    # ... and it is the same alone as in the batch.
    alone = cls(model, target_zero_fraction=0.6, **settings)
    alone_solved = alone.explain(images[2:3], target[2:3], seeds=seeds[2:3])
    torch.testing.assert_close(alone_solved.attribution, attributions[2:3], rtol=0, atol=1e-10)
    assert alone_solved.eta[0] == explanation.eta[2]


def test_target_search_counts_every_solve_in_gradient_evaluations():
    model = softplus_cnn()
    rows = []
    model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    images = torch.rand(3, 3, 8, 8)
    explainer = SparseMoreauGrad(model, num_steps=10, noise_samples=3, noise_std=0.05, internal_batch_size=5,
                                 target_zero_fraction=0.7)
    explanation = explainer.explain(images, torch.tensor([0, 1, 2]), seeds=torch.tensor([0, 1, 2]))
    assert sum(rows) == int(explanation.gradient_evaluations.sum())
    # Per sample: 1 (the gradient at x) plus steps x copies per round it took part in.
    rounds = (explanation.gradient_evaluations - 1) / (10 * 3)
    assert torch.equal(rounds, rounds.round()) and (rounds >= 1).all()
    assert explanation.iterations.tolist() == (10 * rounds).long().tolist()


def test_group_target_is_rounded_to_whole_groups_and_unreachable_ones_are_refused():
    model = softplus_cnn()
    images = torch.rand(2, 3, 8, 8)
    settings = {"num_steps": 20, "noise_std": 0.0, "group_size": 2}
    explainer = GroupSparseMoreauGrad(model, target_zero_fraction=0.3, **settings)  # 4.8 of 16 groups -> 5
    shares = _zero_share(explainer.attribute(images, torch.tensor([1, 2])))
    assert torch.equal(shares, torch.full((2,), 5 / 16, dtype=torch.float64))
    assert explainer.achievable_zero_fraction(images.shape) == 5 / 16
    assert SparseMoreauGrad(model, target_zero_fraction=0.3).achievable_zero_fraction(images.shape) == 58 / 192
    for target, closest in ((0.02, "0"), (0.98, "1")):
        with pytest.raises(ValueError, match=rf"units of one group \(0.0625 of a map\), so the closest share would "
                                             rf"be {closest}; choose a target between 0.0625 and 0.9375"):
            GroupSparseMoreauGrad(model, target_zero_fraction=target, **settings).attribute(images, 1)


def test_a_target_that_no_eta_reaches_warns_and_keeps_the_closest_map(closed_form):
    # A linear score whose 4 groups have norms 1, 2, 2, 3: two of them always vanish together, so 2 zero groups
    # (share 0.5) cannot be reached; the closest shares are 1/4 and 3/4.
    model, _ = closed_form
    a = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    for (top, left), norm in zip(((0, 0), (0, 2), (2, 0), (2, 2)), (1.0, 2.0, 2.0, 3.0)):
        a[..., top : top + 2, left : left + 2] = norm / 2
    linear = nn.Sequential(nn.Flatten(), nn.Linear(16, 1, bias=False, dtype=torch.float64))
    linear[1].weight.data = a.view(1, 16)
    images = torch.rand(1, 1, 4, 4, dtype=torch.float64)
    explainer = GroupSparseMoreauGrad(linear, rho=0.5, num_steps=100, noise_std=0.0, group_size=2,
                                      target_zero_fraction=0.5)
    with pytest.warns(UserWarning, match=r"zero share of 1 of 1 maps is up to 0.25 from the target 0.5"):
        attributions = explainer.attribute(images, 0)
    assert _zero_share(attributions).item() in (0.25, 0.75)


def test_target_zero_fraction_settings_are_checked():
    model = softplus_cnn()
    with pytest.raises(ValueError, match="either eta or target_zero_fraction, not both"):
        SparseMoreauGrad(model, eta=1e-3, target_zero_fraction=0.5)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="target_zero_fraction"):
            GroupSparseMoreauGrad(model, target_zero_fraction=bad)
    with pytest.raises(ValueError, match="search_rounds"):
        SparseMoreauGrad(model, target_zero_fraction=0.5, search_rounds=0)
    # Without a target, eta defaults to the official code's values.
    assert SparseMoreauGrad(model).eta == 5e-3 and GroupSparseMoreauGrad(model).eta == 5e-2
    assert SparseMoreauGrad(model, target_zero_fraction=0.5).eta is None


def test_a_fixed_eta_that_zeroes_whole_maps_warns_once_per_call(recwarn):
    model = softplus_cnn()
    images = torch.rand(3, 3, 8, 8)
    target = torch.tensor([0, 1, 2])
    SparseMoreauGrad(model, num_steps=5, noise_std=0.0, eta=1e-6).attribute(images, target)
    assert not [w for w in recwarn if "zeroes the whole map" in str(w.message)]
    explainer = SparseMoreauGrad(model, num_steps=5, noise_std=0.0, eta=10.0)
    with pytest.warns(UserWarning, match=r"eta=10 zeroes the whole map of 3 of 3 samples.*smaller eta.*"
                                         r"target_zero_fraction") as caught:
        explanation = explainer.explain(images, target)
    assert len([w for w in caught if "zeroes the whole map" in str(w.message)]) == 1
    assert explanation.eta.tolist() == [10.0] * 3
