"""Counted work and the cheap MoreauGrad under attack: gradient evaluations against a counting wrapper around the
model, warm starts and the windowed stopping rule against brute-force loops, mixed precision on the CPU."""

import pytest
import torch
from noise_reference import sample_noise
from test_explainers import FAST_SETTINGS, _one_thread, softplus_cnn  # noqa: F401  (the fixture applies here too)
from torch import nn

from mglightning.attacks import GaussianNoise, TopKInterpretationAttack
from mglightning.explainers import (
    EXPLAINERS,
    GroupSparseMoreauGrad,
    SimpleGradient,
    MoreauGrad,
    SparseMoreauGrad,
    build_explainer,
    list_explainers,
)

FAMILIES = {"gradient", "smoothing", "propagation", "perturbation", "moreaugrad", "second_order"}


class CountingModel(nn.Module):
    """Counts model input rows: `rows` (`rows_per_call`) of every forward pass that autograd records, and
    `backward_rows`, the rows of every backward pass that reaches the model's input. A gradient is one of each; a
    Hessian-vector product by double backpropagation is one forward and two backward passes (counted 2). Forward
    passes under `torch.no_grad()` (label checks) are not counted."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.rows_per_call: list[int] = []
        self.backward_rows = 0

    @property
    def rows(self) -> int:
        return sum(self.rows_per_call)

    def reset(self) -> None:
        self.rows_per_call.clear()
        self.backward_rows = 0

    def _count_backward(self, gradient):
        self.backward_rows += gradient.shape[0]

    def forward(self, inputs):
        if torch.is_grad_enabled():
            self.rows_per_call.append(inputs.shape[0])
            if inputs.requires_grad:
                inputs.register_hook(self._count_backward)
        return self.model(inputs)


def _settings(name: str) -> dict:
    # Methods added to the registry later run with their defaults on the tiny model.
    settings = dict(FAST_SETTINGS.get(name, {}))
    if EXPLAINERS[name].family == "second_order":
        # Chunks smaller than the batch: every Hessian-vector product then runs all its passes (unchunked, the
        # products reuse one forward pass and graph and are still counted 2, which no wrapper can see).
        settings["internal_batch_size"] = 2
    return settings


def _images(batch=3, seed=0, dtype=torch.float32):
    return torch.rand(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("name", list_explainers())
def test_every_explainer_has_a_display_name_and_a_family(name):
    cls = EXPLAINERS[name]
    assert isinstance(cls.display_name, str) and cls.display_name
    assert cls.family in FAMILIES
    if name.endswith("moreaugrad"):
        assert cls.family == "moreaugrad"


@pytest.mark.parametrize("name", list_explainers())
def test_gradient_evaluations_match_a_counting_wrapper(name):
    model = CountingModel(softplus_cnn())
    images, target, seeds = _images(), torch.tensor([0, 1, 3]), torch.tensor([4, 5, 6])
    explainer = build_explainer(name, model, **_settings(name))
    per_sample = explainer.explain(images, target, seeds=seeds).gradient_evaluations
    second_order = explainer.family == "second_order"
    assert int(per_sample.sum()) == model.backward_rows > 0
    if not second_order:  # first-order methods: one forward per backward
        assert model.backward_rows == model.rows
    assert per_sample.dtype == torch.long and per_sample.device.type == "cpu" and per_sample.shape == (3,)
    # Per sample: each sample attributed alone costs what the batch call said it cost.
    for i in range(3):
        model.reset()
        alone = explainer.explain(images[i : i + 1], target[i : i + 1], seeds=seeds[i : i + 1])
        assert alone.gradient_evaluations.tolist() == [per_sample[i]]
        if not second_order:  # a lone sample fits one chunk, where second-order products reuse their graph
            assert model.rows == per_sample[i]


@pytest.mark.parametrize("name", [name for name, cls in EXPLAINERS.items() if cls.supports_create_graph])
def test_differentiable_maps_count_their_rows_too(name):
    model = CountingModel(softplus_cnn())
    explainer = build_explainer(name, model, **_settings(name))
    explanation = explainer.explain(_images().requires_grad_(True), 1, seeds=torch.tensor([1, 2, 3]), create_graph=True)
    assert int(explanation.gradient_evaluations.sum()) == model.rows


class TwoSpeeds(nn.Module):
    """Class 0 is strongly curved (the solver converges fast), class 1 linear (slow)."""

    def forward(self, z):
        z = z.flatten(1)
        return torch.stack([2.0 * (z**2).sum(1) + z.sum(1), 0.5 * z.sum(1)], dim=1)


def test_moreaugrad_counts_differ_per_sample_when_samples_stop_early():
    model = CountingModel(TwoSpeeds())
    images, target = _images(), torch.tensor([0, 1, 0])
    explainer = MoreauGrad(model, num_steps=500, noise_std=0.0, tol=1e-6)
    explanation = explainer.explain(images, target)
    assert torch.equal(explanation.gradient_evaluations, explanation.iterations)
    assert explanation.gradient_evaluations.unique().numel() > 1
    assert int(explanation.gradient_evaluations.sum()) == model.rows


@pytest.mark.parametrize("surrogate_name", ["self", "simple_gradient"])
@pytest.mark.parametrize("name", ["simple_gradient", "smoothgrad", "deeplift", "moreaugrad"])
def test_attack_counts_match_a_counting_wrapper(name, surrogate_name):
    model = CountingModel(softplus_cnn())
    images, target, seeds = _images(4), torch.tensor([0, 1, 2, 3]), torch.arange(4)
    explainer = build_explainer(name, model, **_settings(name))
    attack = TopKInterpretationAttack(explainer, epsilon=0.5, num_steps=3, surrogate=surrogate_name)
    per_sample = attack.run(images, target, seeds=seeds).gradient_evaluations
    assert model.rows == int(per_sample.sum())
    assert per_sample.dtype == torch.long and per_sample.shape == (4,)
    # num_steps + 1 map evaluations, each the differentiated map's own count.
    rows_per_map = 1 if attack.surrogate_name == "simple_gradient" or name == "simple_gradient" else None
    if rows_per_map is not None:
        assert per_sample.tolist() == [4] * 4


def test_warm_started_attack_counts_match_a_counting_wrapper():
    model = CountingModel(softplus_cnn())
    images, target, seeds = _images(4), torch.tensor([0, 1, 2, 3]), torch.arange(4)
    explainer = SparseMoreauGrad(model, num_steps=40, noise_samples=3, eta=2e-3, tol=0.05, tol_window=4)
    clean = explainer.explain(images, target, seeds=seeds)
    model.reset()
    attack = TopKInterpretationAttack(explainer, epsilon=0.5, num_steps=4, warm_start=True)
    result = attack.run(images, target, seeds=seeds, initial=clean.solution)
    assert model.rows == int(result.gradient_evaluations.sum())
    cold = TopKInterpretationAttack(explainer, epsilon=0.5, num_steps=4).run(images, target, seeds=seeds)
    assert (result.gradient_evaluations < cold.gradient_evaluations).all()


def test_gaussian_noise_costs_no_gradient_evaluations():
    model = CountingModel(softplus_cnn())
    noise = GaussianNoise(SimpleGradient(model), 0.5)
    result = noise.run(_images(), 0, seeds=torch.arange(3))
    assert model.rows == 0  # the label check runs under no_grad and is not counted here
    assert result.gradient_evaluations.tolist() == [0, 0, 0] and result.solution is None


def _plain(cls=MoreauGrad, **settings):
    settings = {"rho": 1.0, "step_size": 0.2, "noise_std": 0.0, **settings}
    if cls is SparseMoreauGrad:
        settings["eta"] = 2e-3
    if cls is GroupSparseMoreauGrad:
        settings.update(eta=1e-2, group_size=2)  # zeroes part of each map (2e-2 zeroed them all)
    return cls(softplus_cnn(dtype=torch.float64), **settings)


@pytest.mark.parametrize("cls", [MoreauGrad, SparseMoreauGrad, GroupSparseMoreauGrad])
def test_warm_start_from_the_exact_solution_takes_one_step(cls):
    images, target = _images(dtype=torch.float64), torch.tensor([0, 1, 3])
    exact = _plain(cls, num_steps=2000, tol=1e-13)
    solved = exact.explain(images, target)
    solution = solved.attribution
    assert (solved.iterations < 2000).all()  # it converged
    warm = _plain(cls, num_steps=100, tol=1e-6)
    warm.model = exact.model
    warm_solved = warm.explain(images, target, initial=solved.solution)
    assert warm_solved.iterations.tolist() == [1, 1, 1]
    assert int(warm_solved.gradient_evaluations.sum()) == 3
    torch.testing.assert_close(warm_solved.attribution, solution, rtol=0, atol=1e-10)


@pytest.mark.parametrize("cls", [MoreauGrad, SparseMoreauGrad])
def test_warm_and_cold_solves_agree_to_the_tolerance(cls):
    images, target = _images(dtype=torch.float64), torch.tensor([0, 1, 3])
    explainer = _plain(cls, num_steps=3000, tol=1e-8)
    reference = _plain(cls, num_steps=5000, tol=1e-14).attribute(images, target)
    cold_solved = explainer.explain(images, target)
    cold, cold_steps = cold_solved.attribution, cold_solved.iterations
    # Warm start from the solution at a nearby input, as an attack step provides it.
    nearby = explainer.explain((images + 0.02 * _images(seed=1, dtype=torch.float64)).clamp(0, 1), target)
    warm_solved = explainer.explain(images, target, initial=nearby.solution)
    warm = warm_solved.attribution
    assert (warm_solved.iterations < cold_steps).all()
    # Both stop within about tol / (1 - contraction) of the solution: step 0.2 with rho 1 contracts by >= 0.8.
    scale = reference.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    for solution in (cold, warm):
        assert ((solution - reference).flatten(1).norm(dim=1) <= 1e-8 / 0.2 * scale.flatten() * 1.5).all()
    torch.testing.assert_close(warm / scale, cold / scale, rtol=0, atol=2e-7)


def test_regularised_stopping_rule_is_the_window_mean_rule_of_a_brute_force_loop():
    model = softplus_cnn(dtype=torch.float64)
    images, target, seeds = _images(2, dtype=torch.float64), torch.tensor([2, 1]), torch.tensor([5, 9])
    rho, step, copies, std, window, tol, steps = 1.0, 0.2, 3, 0.1, 4, 0.05, 60
    initial = 0.3 * _images(2, seed=3, dtype=torch.float64) - 0.15
    explainer = MoreauGrad(model, rho=rho, step_size=step, num_steps=steps, noise_std=std, noise_samples=copies,
                           tol=tol, tol_window=window, internal_batch_size=5)
    explanation = explainer.explain(images, target, seeds=seeds, initial=initial)
    actual = explanation.attribution
    for i in range(2):
        d, previous_mean, window_sum, stop = initial[i].clone(), initial[i].clone(), 0, steps
        for t in range(1, steps + 1):
            noise = sample_noise(int(seeds[i]), copies, (3, 8, 8), std, step=t - 1, dtype=torch.float64)
            noisy = (images[i] + d + noise).requires_grad_(True)
            gradient = torch.autograd.grad(model(noisy)[:, target[i]].sum(), noisy)[0].mean(0)
            d = d - step * (gradient + d / rho)
            window_sum = window_sum + d
            if t % window == 0:
                mean = window_sum / window
                if (mean - previous_mean).norm() <= tol * mean.norm():
                    stop = t
                    break
                previous_mean, window_sum = mean, 0
        assert explanation.iterations[i] == stop
        torch.testing.assert_close(actual[i], -d / rho, rtol=0, atol=1e-12)
    assert (explanation.iterations < steps).all() and (explanation.iterations % window == 0).all()
    assert int(explanation.gradient_evaluations.sum()) == copies * int(explanation.iterations.sum())


def test_regularised_warm_start_at_its_own_solution_stops_after_one_window():
    model = softplus_cnn()
    images, target, seeds = _images(), torch.tensor([0, 1, 3]), torch.arange(3)
    settings = {"noise_std": 0.05, "noise_samples": 8, "step_size": 0.2}
    long_run = MoreauGrad(model, num_steps=150, **settings)
    solved = long_run.explain(images, target, seeds=seeds)
    warm = MoreauGrad(model, num_steps=150, tol=0.05, tol_window=5, **settings)
    assert warm.explain(images, target, seeds=seeds, initial=solved.solution).iterations.tolist() == [5, 5, 5]
    cold = MoreauGrad(model, num_steps=150, tol=0.05, tol_window=5, **settings)
    assert (cold.explain(images, target, seeds=seeds).iterations > 5).all()


def test_the_solution_is_the_displacement_behind_the_map():
    explainer = _plain(SparseMoreauGrad, num_steps=20)
    images = _images(dtype=torch.float64)
    explanation = explainer.explain(images, 2)
    torch.testing.assert_close(explanation.solution, -explainer.rho * explanation.attribution, rtol=0, atol=0)
    assert explanation.gradient_evaluations.tolist() == explanation.iterations.tolist() == [20] * 3  # a row a step
    graph = explainer.explain(images.requires_grad_(True), 2, create_graph=True)
    assert graph.attribution.requires_grad and not graph.solution.requires_grad


def test_methods_without_a_solver_refuse_a_warm_start():
    explainer = build_explainer("smoothgrad", softplus_cnn(), nt_samples=2)
    assert explainer.explain(_images(), 0, seeds=torch.arange(3)).solution is None
    with pytest.raises(ValueError, match="SmoothGrad has no solver to warm-start"):
        explainer.attribute(_images(), 0, initial=torch.zeros(3, 3, 8, 8))


def test_warm_started_attack_hands_over_the_solution_at_the_returned_inputs():
    model = softplus_cnn(dtype=torch.float64)
    images, target, seeds = _images(4, dtype=torch.float64), torch.tensor([0, 1, 2, 3]), torch.arange(4)
    explainer = MoreauGrad(model, step_size=0.2, num_steps=500, noise_std=0.0, tol=1e-9)
    clean = explainer.explain(images, target, seeds=seeds)
    attack = TopKInterpretationAttack(explainer, epsilon=0.5, num_steps=4, warm_start=True)
    result = attack.run(images, target, seeds=seeds, initial=clean.solution)
    adversarial, moved = result.inputs, result.moved
    assert moved.any()
    handed_over = result.solution
    attacked_solved = explainer.explain(adversarial, target, seeds=seeds, initial=handed_over)
    attacked = attacked_solved.attribution
    assert attacked_solved.iterations.tolist() == [1] * 4  # it starts at its own solution
    cold = MoreauGrad(model, step_size=0.2, num_steps=500, noise_std=0.0, tol=1e-12).attribute(adversarial, target)
    torch.testing.assert_close(attacked, cold, rtol=0, atol=1e-7)
    torch.testing.assert_close(-handed_over / explainer.rho, cold, rtol=0, atol=1e-7)


def test_cold_start_stays_the_default_and_ignores_initial():
    model = softplus_cnn()
    images, target, seeds = _images(), torch.tensor([0, 1, 3]), torch.arange(3)
    explainer = MoreauGrad(model, num_steps=8, noise_samples=2)
    attack = TopKInterpretationAttack(explainer, epsilon=0.5, num_steps=3)
    assert attack.warm_start is False
    first = attack.run(images, target, seeds=seeds)
    second = attack.run(images, target, seeds=seeds, initial=torch.ones_like(images))
    assert torch.equal(first.inputs, second.inputs)
    assert int(first.gradient_evaluations.sum()) == int(second.gradient_evaluations.sum()) == 3 * 4 * (8 * 2 + 1)
    assert second.solution is None
    # Methods without a solver accept the option and are unchanged by it.
    plain = TopKInterpretationAttack(build_explainer("smoothgrad", model, nt_samples=3), 0.5, 3)
    warm = TopKInterpretationAttack(build_explainer("smoothgrad", model, nt_samples=3), 0.5, 3, warm_start=True)
    warm_result = warm.run(images, target, seeds=seeds)
    assert torch.equal(plain.perturb(images, target, seeds=seeds)[0], warm_result.inputs)
    assert warm_result.solution is None


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"tol_window": 0}, "tol_window must be an integer >= 1"),
        ({"autocast": "yes"}, "autocast must be True or False"),
        ({"channels_last": 1}, "channels_last must be True or False"),
    ],
)
def test_bad_solver_settings_raise_clear_errors(settings, message):
    with pytest.raises(ValueError, match=message):
        MoreauGrad(softplus_cnn(), **settings)


@pytest.mark.parametrize(
    "initial, message",
    [
        (torch.zeros(2, 3, 8, 8), r"initial must be shaped like inputs \(3, 3, 8, 8\)"),
        ([0.0], "initial must be shaped like inputs"),
        (torch.full((3, 3, 8, 8), float("nan")), "initial must be a finite floating tensor"),
        (torch.zeros(3, 3, 8, 8, dtype=torch.long), "initial must be a finite floating tensor"),
    ],
)
def test_bad_initial_displacement_raises_before_any_model_evaluation(initial, message):
    model = CountingModel(softplus_cnn())
    with pytest.raises(ValueError, match=message):
        MoreauGrad(model, num_steps=3).attribute(_images(), 0, initial=initial)
    assert model.rows == 0


def test_bad_attack_warm_start_arguments_raise_clear_errors():
    explainer = MoreauGrad(softplus_cnn(), num_steps=3, noise_samples=2)
    with pytest.raises(ValueError, match="warm_start must be True or False"):
        TopKInterpretationAttack(explainer, 0.5, warm_start="yes")
    attack = TopKInterpretationAttack(explainer, 0.5, warm_start=True)
    with pytest.raises(ValueError, match=r"initial must be shaped like inputs \(3, 3, 8, 8\)"):
        attack.perturb(_images(), 0, initial=torch.zeros(1, 3, 8, 8))


@pytest.mark.parametrize("autocast, channels_last, tolerance", [(False, True, 1e-5), (True, False, 3e-2),
                                                                 (True, True, 3e-2)])
def test_mixed_precision_and_channels_last_stay_close_to_float32(autocast, channels_last, tolerance):
    model = softplus_cnn()
    images, target, seeds = _images(), torch.tensor([0, 1, 3]), torch.arange(3)
    settings = {"num_steps": 20, "noise_samples": 4, "step_size": 0.2}
    reference = MoreauGrad(model, **settings).attribute(images, target, seeds=seeds)
    explainer = MoreauGrad(model, autocast=autocast, channels_last=channels_last, **settings)
    inputs, outputs = [], []

    def record(module, args, output):
        inputs.append(args[0])
        outputs.append(output)

    hook = model[0].register_forward_hook(record)
    explanation = explainer.explain(images, target, seeds=seeds)
    attributions = explanation.attribution
    hook.remove()
    assert attributions.dtype == torch.float32 == explanation.solution.dtype
    assert all(y.dtype == (torch.bfloat16 if autocast else torch.float32) for y in outputs)
    assert all(x.is_contiguous(memory_format=torch.channels_last) == channels_last for x in inputs)
    error = (attributions - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1)
    assert (error < tolerance).all()
    assert autocast is False or (error > 0).any()  # bfloat16 really ran
    assert int(explanation.gradient_evaluations.sum()) == 3 * 20 * 4
