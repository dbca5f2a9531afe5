"""Cheap search, exact measurement: an attack may search with approximate maps, but every reported map is the
explainer's own, as configured, cold, with the sample's seeds; a sample the attack did not move costs nothing."""

import functools

import pytest
import torch
from torch import nn

from mglightning.attacks import Attack, AttackResult, GaussianNoise, TopKInterpretationAttack
from mglightning.data.evaluation import sample_seeds
from mglightning.evaluation import measure_batch
from mglightning.explainers import MoreauGrad, SimpleGradient, SmoothGrad, SparseMoreauGrad
from mglightning.metrics import TopKIntersection


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Softplus(beta=5.0), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)
    ).eval().requires_grad_(False)


def batch(size: int = 5):
    torch.manual_seed(1)
    return torch.rand(size, 3, 8, 8), torch.zeros(size, dtype=torch.long), torch.arange(10, 10 + size)


class HalfAttack(Attack):
    """A test attack: shifts the even samples and returns the odd ones as they were, and reports every sample as
    moved (a careless attack: the evaluation must not trust its `moved` flags)."""

    name = "half"

    def __init__(self, explainer, epsilon: float) -> None:
        self.epsilon = epsilon

    def run(self, inputs, target, *, seeds=None, initial=None) -> AttackResult:
        shifted = inputs.clone()
        shifted[0::2] = (inputs[0::2] + self.epsilon / inputs[0].numel() ** 0.5).clamp(0, 1)
        everything = torch.ones(len(inputs), dtype=torch.bool)
        return AttackResult(shifted, everything, torch.zeros(len(inputs), dtype=torch.long))


SEARCH = {"num_steps": 3, "noise_samples": 1, "average_last": 0}
EXPLAINERS = {
    "moreaugrad": functools.partial(MoreauGrad, rho=0.2, step_size=0.02, num_steps=12, noise_std=0.1,
                                    noise_samples=3, average_last=4),
    "sparse_moreaugrad": functools.partial(SparseMoreauGrad, rho=0.2, step_size=0.02, num_steps=12, noise_std=0.1,
                                           noise_samples=3, average_last=4, eta=0.01),
    "smoothgrad": functools.partial(SmoothGrad, nt_samples=3),
}
ATTACKS = {
    "own": functools.partial(TopKInterpretationAttack, num_steps=3, warm_start=True, search_settings=SEARCH),
    "exact": functools.partial(TopKInterpretationAttack, num_steps=2, surrogate="exact", distinct_only=True,
                               warm_start=True, search_settings={**SEARCH, "graph_max_iter": 5}),
    "noise": GaussianNoise,
    "half": HalfAttack,
}


def test_every_reported_map_is_the_cold_map_bit_for_bit_whatever_the_attack_searched_with():
    model = tiny_model()
    images, labels, indices = batch()
    explainers = {label: factory(model) for label, factory in EXPLAINERS.items()}
    measured = measure_batch(
        model, images, labels, indices, explainers=explainers, epsilons=[0.5], attacks=ATTACKS,
        metrics={"topk": TopKIntersection()}, seed=3, keep_maps=True, keep_inputs=True,
    )
    seeds = sample_seeds(3, indices)
    target = model(images).argmax(dim=1)
    for label, factory in EXPLAINERS.items():
        fresh = factory(model)  # a new explainer as configured: nothing of the attacks' searches carried over
        assert torch.equal(measured.maps.clean[label], fresh.attribute(images, target, seeds=seeds))
        for attack in ATTACKS:
            if (label, attack) == ("smoothgrad", "exact"):
                continue  # distinct_only: the exact attack does not apply to SmoothGrad
            inputs = measured.maps.attacked_inputs[(label, attack)]
            cold = fresh.attribute(inputs, target, seeds=seeds)
            assert torch.equal(measured.maps.attacked[(label, attack)], cold), (label, attack)


def test_a_sample_returned_clean_keeps_its_clean_map_and_costs_nothing():
    model = tiny_model()
    images, labels, indices = batch()
    explainers = {"moreaugrad": EXPLAINERS["moreaugrad"](model)}
    measured = measure_batch(
        model, images, labels, indices, explainers=explainers, epsilons=[0.5], attacks={"half": HalfAttack},
        metrics={"topk": TopKIntersection()}, keep_maps=True,
    )
    evals = {record.index: record.evals_attacked for record in measured.records}
    topk = {record.index: record.values["topk"] for record in measured.records}
    clean, attacked = measured.maps.clean["moreaugrad"], measured.maps.attacked[("moreaugrad", "half")]
    for position, index in enumerate(indices.tolist()):
        if position % 2:  # returned as it was: the clean map itself, no solve
            assert torch.equal(attacked[position], clean[position]) and evals[index] == 0 and topk[index] == 1.0
        else:
            assert not torch.equal(attacked[position], clean[position]) and evals[index] == 12 * 3


def test_the_cheap_search_costs_less_than_the_explainers_own_maps():
    model = tiny_model()
    images, labels, indices = batch()
    explainer = EXPLAINERS["moreaugrad"](model)
    target = model(images).argmax(dim=1)
    seeds = sample_seeds(0, indices)
    clean = explainer.explain(images, target, seeds=seeds)
    full = TopKInterpretationAttack(explainer, 0.5, num_steps=3)
    cheap = TopKInterpretationAttack(explainer, 0.5, num_steps=3, warm_start=True, search_settings=SEARCH)
    full_cost = full.run(images, target, seeds=seeds).gradient_evaluations
    cheap_cost = cheap.run(images, target, seeds=seeds, initial=clean.solution).gradient_evaluations
    # 4 map evaluations: 12 steps x 3 draws + 1 (the stand-in map) against 3 steps x 1 draw + 1.
    assert full_cost.tolist() == [4 * 37] * 5 and cheap_cost.tolist() == [4 * 4] * 5
    # The explainer that makes the reported maps keeps its settings.
    assert (explainer.num_steps, explainer.noise_samples, explainer.average_last) == (12, 3, 4)
    assert cheap.differentiated_explainer is not explainer and cheap.differentiated_explainer.num_steps == 3


def test_search_settings_reach_solvers_only_and_refuse_unknown_names():
    model = tiny_model()
    transfer = TopKInterpretationAttack(SmoothGrad(model), 0.5, surrogate="simple_gradient", search_settings=SEARCH)
    assert isinstance(transfer.differentiated_explainer, SimpleGradient)  # no solver: nothing to make cheaper
    with pytest.raises(ValueError, match=r"`search_settings` \['num_stpes'\] are not settings of MoreauGrad"):
        TopKInterpretationAttack(MoreauGrad(model), 0.5, search_settings={"num_stpes": 3})
    with pytest.raises(ValueError, match="`search_settings` must be a mapping"):
        TopKInterpretationAttack(MoreauGrad(model), 0.5, search_settings=3)


def test_an_attacks_search_settings_reach_its_differentiated_map_over_the_explainers_own():
    explainer = MoreauGrad(tiny_model(), num_steps=12, noise_samples=3)
    attack = TopKInterpretationAttack(explainer, 0.5, num_steps=3, search_settings={"num_steps": 4, "noise_samples": 2})
    assert (attack.differentiated_explainer.num_steps, attack.differentiated_explainer.noise_samples) == (4, 2)
    assert (explainer.num_steps, explainer.noise_samples) == (12, 3)  # the reported maps keep the explainer's
