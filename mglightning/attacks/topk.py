"""The L2-bounded top-k interpretation attack (docs/reference/semantics.md section 5; Ghorbani et al. 2019, Levine et al. 2019)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from mglightning.attacks._common import check_epsilon, check_images, predict, project_to_ball, resolve_seeds
from mglightning.checks import check_choice, check_flag, check_number, check_positive_int, check_share
from mglightning.attacks.base import Attack, AttackResult
from mglightning.explainers import MoreauGrad, build_explainer
from mglightning.metrics import topk_count, topk_mask

SURROGATE_CHOICES = ("self", "exact", "simple_gradient")


def _resolve_surrogate(explainer, surrogate: str, search_settings: Mapping[str, Any]):
    """The explainer whose ``create_graph=True`` map the attack differentiates, and its name for the results.

    ``search_settings`` reach a differentiated map with a solver (``supports_initial``), on a copy built with them
    over its own settings, so that the explainer that makes the reported maps keeps its own settings.
    """
    if surrogate == "self" and explainer.supports_create_graph:
        return _with_settings(explainer, search_settings), "self"
    if surrogate == "exact":
        if not isinstance(explainer, MoreauGrad):
            raise ValueError(
                f"`surrogate='exact'` differentiates a MoreauGrad-family map exactly; {type(explainer).__name__} is "
                "not of that family: use 'self' (its own map or declared surrogate) or 'simple_gradient'."
            )
        return _with_settings(explainer, {**search_settings, "graph": "exact"}), "exact"
    # Either asked for, or the method cannot build a differentiable map and declares what stands in for it.
    name = "simple_gradient" if surrogate == "simple_gradient" else explainer.surrogate
    return _with_settings(build_explainer(name, explainer.model, score=explainer.score), search_settings), name


def _with_settings(explainer, settings: Mapping[str, Any]):
    """``explainer`` itself without settings (or without a solver to take them), else a new one of its class with
    ``settings`` over its own; a setting its class does not take is an error."""
    if not settings or not explainer.supports_initial:
        return explainer
    own = {name: getattr(explainer, name) for name in explainer.settings()}
    unknown = sorted(set(settings) - set(own))
    if unknown:
        raise ValueError(
            f"`search_settings` {unknown} are not settings of {type(explainer).__name__} (it takes "
            f"{', '.join(sorted(own))})."
        )
    return type(explainer)(explainer.model, **{**own, **settings})


def _distinct(explainer, surrogate: str) -> bool:
    """Whether attacking `explainer` through `surrogate` differs from attacking it through its own map."""
    if surrogate == "exact":
        return isinstance(explainer, MoreauGrad)
    if surrogate == "simple_gradient":
        return explainer.supports_create_graph and explainer.name != "simple_gradient"
    return True


class TopKInterpretationAttack(Attack):
    """Move an interpretation's top-k mass elsewhere with an L2-bounded perturbation that keeps the prediction.

    With the magnitude map ``s(x') = |A(x')|`` and the top-k set ``K`` of the clean map (``k = max(1,
    floor(topk_fraction * nnz))``, no zeros, ties to the lower flat index, as in
    :class:`~mglightning.metrics.TopKIntersection`), the attack minimises per sample
    ``D(x') = sum_K s(x') / sum s(x')`` (an all-zero map counts as ``D = 0``) by ``num_steps`` signed
    gradient steps, ``x' <- x' - step_size * sign(grad D)``, each followed by projection onto the L2 ball of
    radius ``epsilon`` around the clean input and clamping to [0, 1].

    Every iterate is scored before its step, and the last iterate after the final step is scored too. An
    iterate is eligible only if the model still predicts the clean prediction; each sample returns its
    eligible iterate with the lowest ``D`` (strictly below the clean ``D``, else the clean input itself, which is
    then reported as not moved).

    ``A`` is the map ``explainer.attribute(x', target, seeds=seeds, create_graph=True)``; for the MoreauGrad
    family that is, with its default ``graph="surrogate"``, the official code's stand-in map (docs/reference/semantics.md section 3). ``K`` and
    every ``D`` come from the same map that is differentiated. A method without ``create_graph`` support
    (``supports_create_graph = False``) is attacked through its declared ``explainer.surrogate``.

    Surrogates (``surrogate=``):

    - ``"self"``: the explainer's own differentiable map (for the MoreauGrad family whatever its ``graph``
      setting gives: the official stand-in ``1[d != 0] * |grad f_c(x + d)|`` by default, the paper's procedure),
      or its declared surrogate.
    - ``"exact"``: for a MoreauGrad-family explainer, a copy of it with ``graph="exact"``: the map itself,
      differentiated by implicit differentiation of the solver's fixed point (conjugate gradients on
      Hessian-vector products, :mod:`mglightning.explainers.implicit`), the derivative of the map that is
      measured instead of the stand-in's; in regularised mode an estimate (the Hessian is averaged over the
      noise draws, ``graph_noise_samples``). Other methods raise a ``ValueError``.
    - ``"simple_gradient"``: every method through the simple gradient of the same model and score (transfer).

    :attr:`surrogate_name` says which was used (``"self"``, ``"exact"`` or a registry name).

    The same per-sample seeds are passed to the explainer at every step, so a noisy method's objective is the same
    function throughout the attack and each sample's result does not depend on its batch. The model's train/eval
    mode, the inputs and the parameters' ``.grad`` are left as they were.

    The sign step needs ``D`` to have a gradient: a map that is piecewise constant in the input (the simple
    gradient of a ReLU network) gives a zero step and leaves samples unmoved; attack softplus networks.

    **Cost.** :meth:`run`'s ``gradient_evaluations`` (``(B,)`` long CPU tensor) hold the model input rows that the
    attack's ``num_steps + 1`` map evaluations sent through a forward+backward (the sum of the differentiated
    explainer's own counts). With ``surrogate="exact"`` that includes the ``num_steps`` backward passes'
    Hessian-vector products (2 rows per product and noise copy, CG iterations x products), which the explainer's
    ``Explanation.gradient_evaluations`` receive when the backward runs. Not included: the backward through the
    other differentiated maps (one more pass per row of the map's graph, i.e. per sample for the simple gradient
    and the MoreauGrad surrogate) and the label checks (forward-only, one row per sample and iterate).

    **Cheap search** (``search_settings``): the maps the attack searches with may be cheaper than the maps an
    evaluation reports, e.g. ``{num_steps: 10, average_last: 0}`` with ``warm_start=True`` for the MoreauGrad family:
    each step's solve then takes 10 steps from the previous step's solution instead of all the explainer's steps
    from zero. The settings reach a differentiated map with a solver (``supports_initial``, the MoreauGrad family)
    on a copy of it; other maps (the simple gradient of the transfer attack) have no solver and ignore them. Only
    the search is approximate: the evaluation makes the clean and the attacked maps with the explainer itself,
    exactly as configured and cold (:func:`mglightning.evaluation.measure_batch`).

    **Warm starts** (``warm_start=True``; only the MoreauGrad family has a solver to warm-start, the option does
    nothing for other methods): each step's Moreau solve starts from the previous step's solution
    (``initial=``), the first from ``run(..., initial=d)`` if given (the clean map's solution,
    ``explainer.explain(inputs, target, seeds=seeds).solution``), and the result's ``solution`` holds, per
    sample, the solution at the returned input: at the chosen iterate, or at the clean input for samples not
    moved. Passing it as ``initial`` to the attacked map's solve (same seeds)
    starts that solve at its own solution, so with the explainer's ``tol`` it stops after one window. With the
    explainer's ``tol`` the warm-started solves stop early; without it they run all their steps from a better
    start. The default is a cold start for every solve (the paper's procedure).

    Args:
        explainer: an mglightning explainer (``model``, ``score``, ``attribute``, ``supports_create_graph``,
            ``surrogate``), e.g. from :func:`mglightning.explainers.build_explainer`.
        epsilon: L2 radius of the perturbation in [0, 1] pixel units, > 0.
        num_steps: number of signed gradient steps, >= 1. Default 10.
        step_size: size of each signed step (per pixel), > 0. Default ``epsilon / 100`` (official code).
        topk_fraction: share of the clean map's non-zero entries in ``K``, in (0, 1]. Default 0.4.
        surrogate: ``"self"`` (the explainer's own differentiable map, or its declared surrogate), ``"exact"``
            (the MoreauGrad family's implicit map derivative, an estimate in regularised mode) or ``"simple_gradient"``. Default ``"self"``.
        warm_start: start each MoreauGrad solve from the previous step's solution. Default False (cold starts).
        distinct_only: for an attack ensemble: attack only a method for which this surrogate is not its own attack
            already (`exact`: the MoreauGrad family; `simple_gradient`: methods with a differentiable map of their
            own, the simple gradient aside); for the others the attack does not apply (`applies` is False, an
            evaluation records nothing for it) instead of refusing them (`exact`) or repeating their own attack.
            Default False.
        search_settings: settings of the differentiated map's solver for the search, over the explainer's own
            (``{num_steps: 10, average_last: 0}``; see *Cheap search*). Default None: the explainer's settings.

    Example:
        >>> from mglightning.explainers import SimpleGradient
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 16), torch.nn.Softplus(),
        ...                             torch.nn.Linear(16, 3))
        >>> attack = TopKInterpretationAttack(SimpleGradient(model), epsilon=0.5, num_steps=5)
        >>> inputs = torch.rand(4, 3, 4, 4)
        >>> result = attack.run(inputs, target=model(inputs).argmax(dim=1))
        >>> result.inputs.shape, result.moved.shape, attack.surrogate_name, int(result.gradient_evaluations.sum())
        (torch.Size([4, 3, 4, 4]), torch.Size([4]), 'self', 24)

        Warm-started MoreauGrad, clean map and attacked map included (the fast evaluation preset):

        >>> from mglightning.explainers import MoreauGrad
        >>> target, seeds = model(inputs).argmax(dim=1), torch.arange(4)
        >>> explainer = MoreauGrad(model, noise_std=0.1, noise_samples=8, tol=0.03, tol_window=10)
        >>> clean = explainer.explain(inputs, target, seeds=seeds)
        >>> attack = TopKInterpretationAttack(explainer, epsilon=0.5, warm_start=True)
        >>> result = attack.run(inputs, target, seeds=seeds, initial=clean.solution)
        >>> attacked_map = explainer.attribute(result.inputs, target, seeds=seeds, initial=result.solution)
    """

    name = "topk"

    def __init__(
        self,
        explainer,
        epsilon: float,
        num_steps: int = 10,
        step_size: float | None = None,
        topk_fraction: float = 0.4,
        surrogate: str = "self",
        warm_start: bool = False,
        distinct_only: bool = False,
        search_settings: Mapping[str, Any] | None = None,
    ) -> None:
        required = ("model", "score", "attribute", "supports_create_graph", "surrogate")
        missing = [name for name in required if not hasattr(explainer, name)]
        if missing:
            raise ValueError(
                f"`explainer` must be an mglightning explainer (see mglightning.explainers.build_explainer); "
                f"{type(explainer).__name__} lacks {', '.join(missing)}."
            )
        owner = type(self).__name__
        self.epsilon = check_epsilon(owner, epsilon)
        check_positive_int(owner, "num_steps", num_steps)
        if step_size is None:
            step_size = self.epsilon / 100
        check_number(owner, "step_size", step_size)
        check_share(owner, "topk_fraction", topk_fraction)
        check_choice(owner, "surrogate", surrogate, SURROGATE_CHOICES)
        check_flag(owner, "warm_start", warm_start)
        self.explainer = explainer
        self.model = explainer.model
        self.num_steps = num_steps
        self.step_size = float(step_size)
        self.topk_fraction = float(topk_fraction)
        check_flag(owner, "distinct_only", distinct_only)
        self.distinct_only = distinct_only
        if search_settings is not None and not isinstance(search_settings, Mapping):
            raise ValueError(
                f"`search_settings` must be a mapping of solver settings (e.g. {{num_steps: 10, average_last: 0}}) "
                f"or None, got {search_settings!r}."
            )
        self.search_settings = dict(search_settings or {})
        self._applies = not distinct_only or _distinct(explainer, surrogate)
        if self._applies:
            self.differentiated_explainer, self.surrogate_name = _resolve_surrogate(
                explainer, surrogate, self.search_settings
            )
        else:
            self.differentiated_explainer, self.surrogate_name = None, surrogate
        self.warm_start = warm_start

    @property
    def applies(self) -> bool:
        """False for a `distinct_only` attack whose surrogate is the method's own attack (or impossible for it)."""
        return self._applies

    @property
    def warm_starts(self) -> bool:
        """Whether the solves are warm-started: ``warm_start`` is set and the differentiated map has a solver."""
        return self.warm_start and isinstance(self.differentiated_explainer, MoreauGrad)

    def run(
        self, inputs: Tensor, target: int | Tensor, *, seeds: Tensor | None = None, initial: Tensor | None = None
    ) -> AttackResult:
        """Attack a batch of images.

        Args:
            inputs: clean images ``(B, C, H, W)`` in [0, 1] (left unchanged).
            target: the class explained, an int or a ``(B,)`` long tensor (usually the clean prediction).
            seeds: ``None`` or a ``(B,)`` integer tensor, passed to the explainer at every step; ``None`` draws
                one seed per sample from torch's global RNG.
            initial: with warm starts, the ``(B, C, H, W)`` solution to start the first solve (at the clean
                inputs) from, the clean map's ``Explanation.solution`` with the same seeds; ignored without warm
                starts. Default None (the first solve starts cold).

        Returns:
            An :class:`AttackResult`: the best eligible iterate per sample (detached, within the L2 ball and
            [0, 1], same prediction as the clean input), a ``(B,)`` bool tensor, True where that iterate is not
            the clean input, the per-sample cost and, with warm starts, the solution at the returned input.
        """
        if not self._applies:
            raise ValueError(
                f"this {self.surrogate_name} attack does not apply to {type(self.explainer).__name__} "
                "(distinct_only): it is that method's own attack already, or the method has no such map."
            )
        check_images(type(self).__name__, inputs)
        seeds = resolve_seeds(seeds, inputs.shape[0])
        if not self.warm_starts:
            initial = None  # else the differentiated explainer checks it at the first solve
        with torch.enable_grad():
            return self._perturb(inputs.detach().clone(), target, seeds, initial)

    def _objective(
        self, iterate: Tensor, target: int | Tensor, seeds: Tensor, topk: Tensor | None, initial: Tensor | None
    ):
        """``D(iterate)`` per sample with its graph, the top-k mask (computed here on the first call), the
        solver's solution (None without warm starts) and the map's cost (an exact graph's backward adds to it)."""
        explanation = self.differentiated_explainer.explain(
            iterate, target, seeds=seeds, create_graph=True, initial=initial
        )
        attribution = explanation.attribution
        magnitudes = attribution.abs().flatten(1)
        if topk is None:
            clean_map = attribution.detach()
            topk = topk_mask(clean_map, topk_count(clean_map, self.topk_fraction)).flatten(1)
        total = magnitudes.sum(dim=1).clamp_min(torch.finfo(magnitudes.dtype).tiny)
        solution = explanation.solution if self.warm_starts else None
        return (magnitudes * topk).sum(dim=1) / total, topk, solution, explanation.gradient_evaluations

    def _perturb(
        self, clean: Tensor, target: int | Tensor, seeds: Tensor, initial: Tensor | None
    ) -> AttackResult:
        clean_prediction = predict(self.model, clean)
        best = clean.clone()
        best_objective = torch.full((clean.shape[0],), math.inf, dtype=clean.dtype, device=clean.device)
        moved = torch.zeros(clean.shape[0], dtype=torch.bool, device=clean.device)
        iterate, topk = clean.clone(), None
        evaluations = torch.zeros(clean.shape[0], dtype=torch.long)
        best_displacement = None
        for step in range(self.num_steps + 1):
            iterate.requires_grad_(True)
            objective, topk, solution, cost = self._objective(iterate, target, seeds, topk, initial)
            if solution is not None:
                initial = solution
                if best_displacement is None:  # the solution at the clean input, for samples never moved
                    best_displacement = initial.clone()
            keeps_class = predict(self.model, iterate.detach()) == clean_prediction
            improved = keeps_class & (objective.detach() < best_objective)
            best[improved] = iterate.detach()[improved]
            best_objective[improved] = objective.detach()[improved]
            moved[improved] = step > 0  # step 0 is the clean input itself
            if best_displacement is not None:
                best_displacement[improved] = initial[improved]
            if step == self.num_steps:
                evaluations += cost
                break
            gradient = torch.zeros_like(iterate)
            if objective.requires_grad:
                (step_gradient,) = torch.autograd.grad(objective.sum(), iterate, allow_unused=True)
                if step_gradient is not None:
                    gradient = step_gradient
            evaluations += cost  # after the backward, which may add to it
            iterate = project_to_ball(iterate.detach() - self.step_size * gradient.sign(), clean, self.epsilon)
        return AttackResult(best, moved, evaluations, best_displacement)
