"""The exact MoreauGrad graph (`graph="exact"`, `mglightning.explainers.implicit`) against closed forms, finite
differences and brute-force Jacobians, its cost bookkeeping, and the top-k attack through it (`surrogate="exact"`)."""

import pytest
import torch
from torch import nn

import mglightning.explainers.implicit as implicit
from mglightning.attacks import TopKInterpretationAttack
from mglightning.explainers import (
    ClassScore,
    GroupSparseMoreauGrad,
    MoreauGrad,
    SimpleGradient,
    SparseMoreauGrad,
)
from mglightning.explainers.implicit import conjugate_gradient

SHAPE = (1, 4, 4)
DIM = 16


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Quadratic(nn.Module):
    """Class 0: `0.5 z^T A z + b^T z`; class 1: zero."""

    def __init__(self, A, b):
        super().__init__()
        self.A, self.b = A, b

    def forward(self, z):
        z = z.flatten(1)
        score = 0.5 * ((z @ self.A) * z).sum(1) + z @ self.b
        return torch.stack([score, torch.zeros_like(score)], dim=1)


def softplus_mlp(seed=3):
    """A tiny float64 softplus classifier of 1x4x4 images (smooth, with a non-trivial Hessian)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(DIM, 8), nn.Softplus(beta=2.0), nn.Linear(8, 3))
    torch.random.set_rng_state(generator_state)
    return model.double().eval()


def softplus_cnn():
    """A tiny float32 softplus CNN of 3x8x8 images, for the attack."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.Softplus(beta=2.0),
        nn.Conv2d(6, 6, 3, stride=2, padding=1),
        nn.Softplus(beta=2.0),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 4),
    )
    torch.random.set_rng_state(generator_state)
    return model.eval()


# Converged solves (FISTA to a relative step of 1e-14) and tight CG: the errors left are finite differences'.
CONVERGED = dict(rho=0.5, step_size=0.25, num_steps=20000, noise_std=0.0, tol=1e-14, accelerate=True,
                 graph="exact", graph_tol=1e-12, graph_max_iter=200)


def build(kind, model, **overrides):
    settings = {**CONVERGED, **overrides}
    if kind == "plain":
        return MoreauGrad(model, **settings)
    if kind == "sparse":
        return SparseMoreauGrad(model, eta=0.02, **settings)
    return GroupSparseMoreauGrad(model, eta=0.05, group_size=2, **settings)


def vjp(explainer, images, target, vectors, seeds=None):
    inputs = images.clone().requires_grad_(True)
    attribution = explainer.attribute(inputs, target, seeds=seeds, create_graph=True)
    (gradient,) = torch.autograd.grad((attribution * vectors).sum(), inputs)
    return gradient


def full_jacobians(explainer, images, target):
    """Per-sample `dA/dx` twice: rows from one vector-Jacobian product per basis vector, columns from central
    differences of the map along each basis vector (samples are independent, so all move at once)."""
    batch = images.shape[0]
    rows, columns = [], []
    step = 1e-5
    for k in range(DIM):
        basis = torch.zeros(batch, DIM, dtype=images.dtype)
        basis[:, k] = 1
        basis = basis.view_as(images)
        rows.append(vjp(explainer, images, target, basis).flatten(1))
        forward, backward = (explainer.attribute(images + sign * step * basis, target) for sign in (1, -1))
        columns.append(((forward - backward) / (2 * step)).flatten(1))
    return torch.stack(rows, dim=1), torch.stack(columns, dim=2)


def relative_error(estimate, reference):
    return float(torch.linalg.vector_norm(estimate - reference) / torch.linalg.vector_norm(reference))


def check_support_margins(kind, explainer, images, target):
    """The active set must be stable under the finite-difference step: no entry (group) near the threshold."""
    d = explainer.explain(images, target).solution
    g = ClassScore(explainer.model, "logit", target).gradient(images + d)
    if kind == "sparse":
        # Support entries well away from 0, off-support optimality |g_i| <= eta strictly.
        assert (d != 0).any() and (d == 0).any()
        assert d[d != 0].abs().min() > 1e-4 and g[d == 0].abs().max() < explainer.eta - 1e-4
    elif kind == "group":
        norms = lambda t: torch.linalg.vector_norm(t.reshape(-1, 1, 2, 2, 2, 2), dim=(1, 3, 5))  # noqa: E731
        kept = norms(d) > 0
        assert kept.any() and (~kept).any()
        assert norms(d)[kept].min() > 1e-4 and norms(g)[~kept].max() < explainer.eta - 1e-4


@pytest.mark.parametrize("noise_std", [0.0, 0.1])
def test_quadratic_score_has_the_closed_form_jacobian(noise_std):
    """`f = 0.5 z^T A z + b^T z` (A indefinite, rho * lambda < 1): the map is linear in x with Jacobian
    `(I - (I + rho A)^-1) / rho`; every noisy copy has the same Hessian A, so regularised mode has it too."""
    generator = torch.Generator().manual_seed(7)
    Q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=generator, dtype=torch.float64))
    A = Q @ torch.diag(torch.linspace(-1.5, 2.0, DIM, dtype=torch.float64)) @ Q.T
    b = torch.randn(DIM, generator=generator, dtype=torch.float64)
    images = torch.rand(3, *SHAPE, generator=generator, dtype=torch.float64)
    rho = 0.5
    explainer = MoreauGrad(Quadratic(A, b), rho=rho, step_size=0.1, num_steps=300, noise_std=noise_std,
                           noise_samples=3, graph="exact", graph_tol=1e-12)
    eye = torch.eye(DIM, dtype=torch.float64)
    jacobian = (eye - torch.linalg.inv(eye + rho * A)) / rho
    vectors = torch.randn(images.shape, generator=generator, dtype=torch.float64)
    gradient = vjp(explainer, images, 0, vectors, seeds=torch.arange(3))
    torch.testing.assert_close(gradient.flatten(1), vectors.flatten(1) @ jacobian, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", ["plain", "sparse", "group"])
def test_jacobian_matches_brute_force_finite_differences(kind):
    model = softplus_mlp()
    images = torch.rand(2, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    target = model(images).argmax(1)
    explainer = build(kind, model)
    check_support_margins(kind, explainer, images, target)
    by_vjp, by_differences = full_jacobians(explainer, images, target)
    assert relative_error(by_vjp, by_differences) <= 1e-3
    # The sparse variants' zeroed entries stay zero nearby: their rows of the Jacobian vanish.
    if kind != "plain":
        inactive = explainer.explain(images, target).solution.flatten(1) == 0
        assert by_vjp[inactive].abs().max() == 0 and by_vjp[~inactive].abs().max() > 0


def directional_errors(explainer, images, target, seed=11):
    """`|v^T (dA/dx) delta - v^T (A(x + h delta) - A(x - h delta)) / 2h| / |...|` per sample, random `v`, `delta`."""
    generator = torch.Generator().manual_seed(seed)
    vectors, delta = (torch.randn(images.shape, generator=generator, dtype=torch.float64) for _ in range(2))
    analytic = (vjp(explainer, images, target, vectors) * delta).flatten(1).sum(1)
    step = 1e-5
    forward, backward = (explainer.attribute(images + sign * step * delta, target) for sign in (1, -1))
    numeric = ((forward - backward) * vectors).flatten(1).sum(1) / (2 * step)
    return (analytic - numeric).abs() / numeric.abs()


@pytest.mark.parametrize("kind", ["plain", "sparse", "group"])
def test_vector_jacobian_product_matches_a_directional_difference_in_chunks(kind):
    """A random v^T (dA/dx) delta against the central difference, with the Hessian products in chunks of 1 row."""
    model = softplus_mlp()
    images = torch.rand(2, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    target = model(images).argmax(1)
    assert directional_errors(build(kind, model, internal_batch_size=1), images, target).max() <= 1e-3


def test_the_group_curvature_term_is_needed(monkeypatch):
    """Without the group norm's curvature Q the derivative is wrong (so the checks above can fail)."""
    model = softplus_mlp()
    images = torch.rand(2, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    target = model(images).argmax(1)
    explainer = build("group", model)
    assert directional_errors(explainer, images, target).max() <= 1e-3
    with_curvature = GroupSparseMoreauGrad._penalty_linearisation
    monkeypatch.setattr(
        GroupSparseMoreauGrad,
        "_penalty_linearisation",
        lambda self, d: implicit.PenaltyLinearisation(active=with_curvature(self, d).active),
    )
    assert directional_errors(explainer, images, target).min() > 1e-2


def test_gradient_flows_on_through_a_graph_the_inputs_carry():
    model = softplus_mlp()
    explainer = build("plain", model)
    base = torch.rand(2, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    target = model(base).argmax(1)
    vectors = torch.randn(base.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    scale = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    attribution = explainer.attribute(base * scale, target, create_graph=True)
    (by_scale,) = torch.autograd.grad((attribution * vectors).sum(), scale)
    # Chain rule: d/ds v^T A(s x) = v^T (dA/dx) x at s x.
    expected = (vjp(explainer, base * 0.8, target, vectors) * base).sum()
    torch.testing.assert_close(by_scale, expected, rtol=1e-10, atol=0)
    # The value is the solver's map itself.
    torch.testing.assert_close(attribution.detach(), explainer.attribute(base * 0.8, target), rtol=0, atol=0)


def test_regularised_mode_is_batch_and_chunk_invariant():
    """A sample's Hessian draws come from its own seed: alone, in a batch, or with products in chunks of 2 rows."""
    model = softplus_mlp()
    images = torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    target = model(images).argmax(1)
    vectors = torch.randn(images.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    seeds = torch.tensor([10, 11, 12])
    settings = dict(rho=0.5, step_size=0.1, num_steps=30, noise_std=0.1, noise_samples=4, graph="exact",
                    graph_tol=1e-10)
    batched = vjp(MoreauGrad(model, **settings), images, target, vectors, seeds)
    chunked = vjp(MoreauGrad(model, internal_batch_size=2, **settings), images, target, vectors, seeds)
    alone = vjp(MoreauGrad(model, **settings), images[1:2], target[1:2], vectors[1:2], seeds[1:2])
    torch.testing.assert_close(chunked, batched, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(alone, batched[1:2], rtol=1e-9, atol=1e-12)
    # The noise changes the Hessian: the plain mode's derivative differs, and so does one over other draws.
    plain = vjp(MoreauGrad(model, **{**settings, "noise_std": 0.0}), images, target, vectors)
    assert relative_error(plain, batched) > 1e-3
    more_draws = vjp(MoreauGrad(model, graph_noise_samples=16, **settings), images, target, vectors, seeds)
    assert relative_error(more_draws, batched) > 1e-3


@pytest.mark.parametrize(("kind", "draws"), [("plain", None), ("sparse", 3), ("group", None)])
def test_cost_counts_every_model_row_and_hessian_products_twice(kind, draws):
    """Counted against a forward hook: rows of the solve count 1, rows of the backward's Hessian-vector products 2
    (with products in chunks, every product runs its own forward). A sample with a zero cotangent costs nothing in
    the backward pass."""
    model = softplus_mlp()
    images = torch.rand(2, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    target = model(images).argmax(1)
    explainer = build(kind, model, noise_std=0.1, noise_samples=2, num_steps=40, tol=None, accelerate=False,
                      graph_tol=1e-6, internal_batch_size=3, graph_noise_samples=draws)
    rows = {"solve": 0, "backward": 0}
    phase = ["solve"]
    handle = model.register_forward_hook(lambda module, args, output: rows.__setitem__(
        phase[0], rows[phase[0]] + args[0].shape[0]
    ))
    system_vjp = implicit._ImplicitSystem.vector_jacobian_product

    def in_backward(self, vectors):
        phase[0] = "backward"
        try:
            return system_vjp(self, vectors)
        finally:
            phase[0] = "solve"

    implicit._ImplicitSystem.vector_jacobian_product = in_backward
    try:
        inputs = images.clone().requires_grad_(True)
        explanation = explainer.explain(inputs, target, seeds=torch.tensor([1, 2]), create_graph=True)
        before = explanation.gradient_evaluations.clone()
        vectors = torch.ones_like(images)
        vectors[1] = 0
        torch.autograd.grad((explanation.attribution * vectors).sum(), inputs)
    finally:
        implicit._ImplicitSystem.vector_jacobian_product = system_vjp
        handle.remove()
    assert before.tolist() == [40 * 2, 40 * 2]
    assert rows["solve"] == int(before.sum()) and rows["backward"] > 0
    added = explanation.gradient_evaluations - before
    assert added[1] == 0 and added[0] == 2 * rows["backward"]
    assert rows["backward"] % (draws or 2) == 0  # every product runs all the Hessian's draws


def test_cost_is_the_same_whether_the_hessian_graph_is_reused_or_rebuilt():
    model = softplus_mlp()
    images = torch.rand(2, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    target = model(images).argmax(1)
    vectors = torch.randn(images.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    results = []
    for chunk in (None, 1):  # one graph for every product, or every product chunk by chunk
        explainer = build("sparse", model, noise_std=0.1, noise_samples=2, num_steps=40, tol=None,
                          accelerate=False, graph_tol=1e-8, internal_batch_size=chunk)
        inputs = images.clone().requires_grad_(True)
        explanation = explainer.explain(inputs, target, seeds=torch.tensor([1, 2]), create_graph=True)
        (gradient,) = torch.autograd.grad((explanation.attribution * vectors).sum(), inputs)
        results.append((gradient, explanation.gradient_evaluations))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-9, atol=1e-12)
    assert torch.equal(results[0][1], results[1][1])


def test_unconverged_conjugate_gradients_warn():
    model = softplus_mlp()
    images = torch.rand(2, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    explainer = build("plain", model, graph_max_iter=1)
    with pytest.warns(UserWarning, match="graph_max_iter"):
        vjp(explainer, images, model(images).argmax(1), torch.ones_like(images))


def test_conjugate_gradient_matches_a_direct_solve_with_per_sample_stopping():
    generator = torch.Generator().manual_seed(0)
    size = 12
    matrices = []
    for condition in (1.0, 10.0, 1000.0):
        Q, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
        matrices.append(Q @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(condition)), size,
                                                      dtype=torch.float64)) @ Q.T)
    K = torch.stack(matrices)
    rhs = torch.randn(3, size, generator=generator, dtype=torch.float64)
    rhs = torch.cat([rhs, torch.zeros(1, size, dtype=torch.float64)])
    K = torch.cat([K, torch.eye(size, dtype=torch.float64)[None]])

    def apply(vectors, samples):
        product = torch.einsum("sij,sj->si", K[samples], vectors)
        return product, 2 * vectors

    result = conjugate_gradient(apply, rhs, tol=1e-10, max_iterations=100)
    torch.testing.assert_close(result.solution, torch.linalg.solve(K, rhs), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(result.companion, 2 * result.solution, rtol=1e-12, atol=1e-12)
    assert result.converged.all()
    iterations = result.iterations.tolist()
    assert iterations[0] == 1 and iterations[3] == 0 and iterations[1] <= size < iterations[2] + size
    assert iterations[1] < iterations[2]


def test_graph_settings_are_checked():
    model = softplus_mlp()
    with pytest.raises(ValueError, match=r"graph must be one of \('surrogate', 'exact'\)"):
        MoreauGrad(model, graph="unrolled")
    with pytest.raises(ValueError, match="graph_tol"):
        SparseMoreauGrad(model, graph_tol=0.0)
    with pytest.raises(ValueError, match="graph_max_iter"):
        GroupSparseMoreauGrad(model, graph_max_iter=0)
    with pytest.raises(ValueError, match="graph_noise_samples"):
        MoreauGrad(model, graph_noise_samples=0)


@pytest.mark.parametrize("kind", ["plain", "group"])
def test_attack_through_the_exact_graph_moves_samples_and_counts_its_cost(kind):
    model = softplus_cnn()
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    target = model(images).argmax(1)
    settings = dict(rho=0.2, step_size=0.05, num_steps=20, noise_std=0.0)
    if kind == "plain":
        explainer = MoreauGrad(model, **settings)
    else:
        explainer = GroupSparseMoreauGrad(model, eta=0.01, group_size=2, **settings)  # about 60% zeros
    exact = TopKInterpretationAttack(explainer, epsilon=0.5, num_steps=3, surrogate="exact")
    assert exact.surrogate_name == "exact" and exact.differentiated_explainer.graph == "exact"
    assert explainer.graph == "surrogate"  # the explainer making the maps is not changed
    result = exact.run(images, target, seeds=torch.arange(4))
    assert result.moved.any()
    assert torch.equal(model(result.inputs).argmax(1), target)
    assert ((result.inputs - images).flatten(1).norm(dim=1) <= 0.5 * (1 + 1e-6)).all()
    # 4 solves of 20 steps, plus 3 backward passes of at least one Hessian-vector product (2 rows) each.
    assert (result.gradient_evaluations >= 4 * 20 + 3 * 2).all()
    surrogate = TopKInterpretationAttack(explainer, epsilon=0.5, num_steps=3).run(images, target)
    assert (surrogate.gradient_evaluations == 4 * (20 + 1)).all()
    # Warm-started, the attack hands back the solution at the returned input, as with the surrogate.
    warm = TopKInterpretationAttack(explainer, epsilon=0.5, num_steps=3, surrogate="exact", warm_start=True)
    warm_result = warm.run(images, target, initial=explainer.explain(images, target).solution)
    torch.testing.assert_close(
        warm_result.solution, explainer.explain(warm_result.inputs, target).solution, rtol=0, atol=1e-3
    )


def test_exact_attack_refuses_methods_outside_the_moreaugrad_family():
    with pytest.raises(ValueError, match="not of that family"):
        TopKInterpretationAttack(SimpleGradient(softplus_cnn()), epsilon=0.5, surrogate="exact")
