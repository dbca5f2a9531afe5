"""MoreauGrad, Sparse MoreauGrad and Group-Sparse MoreauGrad (paper sections 4-5, Algorithm 1; docs/reference/semantics.md section 3).

All three solve, for every sample at once,

    z* = argmin_z  f_c(z) + ||z - x||^2 / (2 rho) + eta * R(z - x)

by proximal gradient descent on the displacement `d = z - x` (`R = 0`, `||.||_1` or the group norm `||.||_{2,1}`)
and return `(x - z*) / rho`, which for `R = 0` is the gradient of the Moreau envelope and tends to the simple
gradient as `rho -> 0`. (The paper's Algorithm 1 and the official code return the opposite sign; the official
code also returns `z* - x` without dividing by `rho`. Same magnitudes.)

MoreauGrad declares the family's shared settings once; the sparse variants take them through `**settings` and add
their penalty's. The solver itself is in `mglightning.explainers.moreau_solver`, the differentiable maps of
`create_graph=True` in `mglightning.explainers.implicit`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mglightning.checks import check_choice, check_flag, check_internal_batch_size, check_number, check_positive_int
from mglightning.explainers.base import Explainer
from mglightning.explainers.batching import InternalBatchSize
from mglightning.explainers.implicit import PenaltyLinearisation, exact_moreau_map, moreau_surrogate
from mglightning.explainers.implicit import group_soft_threshold_linearisation, soft_threshold_linearisation
from mglightning.explainers.moreau_solver import (
    MoreauExplanation, SolverResult, proximal_gradient, search_zero_fraction,
)
from mglightning.explainers.prox import (
    check_group_size, group_norms, unchecked_group_soft_threshold, unchecked_soft_threshold,
)

GRAPHS = ("surrogate", "exact")


class MoreauGrad(Explainer):
    """MoreauGrad: the gradient of the class score's Moreau envelope, `(x - z*) / rho` (Zhang & Farnia 2023).

    Algorithm 1: `z_0 = x`, `z_{t+1} = z_t - step_size * (g_t + (z_t - x) / rho)` for `num_steps` steps with
    `g_t = grad f_c(z_t)`; in regularised mode (`noise_std > 0`, the default) `g_t` is the mean of
    `grad f_c(z_t + n)` over `noise_samples` fresh draws `n ~ N(0, noise_std^2 I)` per step. The whole batch is
    optimised at once with per-sample targets, no graph is kept between steps, and the noisy copies are
    evaluated in chunks of at most `internal_batch_size` rows. Sample `i`'s noise at step `t` comes from
    `seeds[i]` and `t` only (`mglightning.random`, drawn on the inputs' device); without `tol` a solve never
    waits for the device, with `tol` once per window (the stopping decision).

    Beyond the paper:

    - **Warm starts**: `explain(...)` returns the solution `d = z* - x` with the map (`Explanation.solution`);
      `attribute(..., initial=d_0)` / `explain(..., initial=d_0)` starts sample `i` from `z_0 = x + d_0[i]`
      instead of `x` (e.g. the solution of a solve at a nearby input); the solution does not depend on the
      start, only the steps needed to reach it.
    - **Early stopping** (`tol`): a sample stops once the mean of `d` over a window of `tol_window` steps (single
      steps in plain mode) moves by at most `tol` times its norm (`moreau_solver.proximal_gradient` states the
      rule; `tol` must lie above the noise's jitter of the window means). A warm start at the solution stops
      after one window. The map is still the last iterate's, as in Algorithm 1.
    - **FISTA momentum** (`accelerate=True`, with adaptive restart) on the same proximal steps. It pays in plain
      mode; in regularised mode the momentum carries the noise along and `tol` rarely triggers (measured in
      docs/background/benchmarks.md), so leave it off there.
    - **Mixed precision and memory format** (`autocast`, `channels_last`): the solver's model passes run in
      bfloat16 autocast and/or the channels-last layout, while the displacement and its updates stay in the
      inputs' dtype (float32). The attack's differentiable map (`create_graph=True`) is always computed at
      full precision.
    - **Exact graph** (`graph="exact"`): `attribute(..., create_graph=True)` returns the map itself, `-d / rho`,
      differentiable with respect to the inputs by implicit differentiation of the fixed point: its backward
      solves `(I + rho H) u = v` (restricted to the support, plus the group norm's curvature, for the sparse
      variants) by conjugate gradients on Hessian-vector products at `z*`, each sample stopping at a relative
      residual `graph_tol` or after `graph_max_iter` products (`mglightning.explainers.implicit` derives it). In
      regularised mode the Hessian is the mean over the sample's first `graph_noise_samples` draws (default
      `noise_samples`): an estimate. The default `graph="surrogate"` is the official code's stand-in
      (`moreau_surrogate`), the paper's procedure.

    `explain` returns a `MoreauExplanation`: the map, the solution `d`, `iterations` (`(B,)` long CPU tensor) and
    `gradient_evaluations` (model input rows through a forward+backward per sample, a `(B,)` long CPU tensor:
    steps x noise copies, plus one row for the surrogate differentiable map). With the exact graph the map itself
    costs nothing more, and its backward pass adds 2 x `graph_noise_samples` (2 in plain mode) per CG iteration
    and sample to the call's `gradient_evaluations` when it runs.

    Args:
        model: classifier taking `(B, C, H, W)` images in [0, 1], in eval mode.
        rho: Moreau-Yosida coefficient `rho > 0` (default 1).
        step_size: gradient step `gamma`, `0 < gamma < 2 * rho` (default 0.1).
        num_steps: steps `T` (default 300); with `tol`, the most steps.
        noise_std: noise standard deviation in [0, 1] pixel units; 0 gives the plain mode (default 0.1).
        noise_samples: noise draws per step in regularised mode (default 32).
        average_last: return the mean of the last `k` iterates instead of the last one (the official code
            uses 101); 0 (default) is Algorithm 1's output. Needs a fixed step count, so not with `tol`.
        internal_batch_size: the most model inputs per forward/backward; `"auto"` (default) fills the device's
            free memory on CUDA and takes 256 elsewhere (`resolve_internal_batch_size`); `None` evaluates all at
            once.
        tol: relative stopping tolerance on the window means, or `None` (default) to run all `num_steps`.
        tol_window: steps per window `W` of the stopping rule in regularised mode (default 10); plain mode
            compares single steps.
        accelerate: use FISTA momentum (default False).
        autocast: run the solver's forward/backward passes under bfloat16 autocast (default False: float32 maps
            are the reference; bfloat16 moves them by a fraction of a percent, see docs/background/benchmarks.md).
        channels_last: feed the solver's model passes in the channels-last memory format (default False; same
            maps to float rounding, faster convolutions on most GPUs, see docs/background/benchmarks.md).
        score: `logit` (default), `log_softmax` or `softmax`.
        graph: the map that `create_graph=True` returns: `surrogate` (default, the official code's stand-in
            `1[d != 0] * |grad f_c(x + d)|`) or `exact` (the map itself with its implicit derivative; in regularised
            mode an estimate, its Hessian averaged over `graph_noise_samples` draws).
        graph_tol: the exact graph's CG tolerance on the relative residual (default 1e-3).
        graph_max_iter: the exact graph's most CG iterations (Hessian-vector products) per sample (default 100).
        graph_noise_samples: in regularised mode, the noise draws the exact graph's Hessian is averaged over (the
            sample's first draws from its seed); `None` (default) takes `noise_samples`, the solver's first step's.

    Example:
        >>> explainer = MoreauGrad(model, rho=1.0, step_size=0.1, num_steps=300, tol=1e-2)
        >>> attr = explainer.attribute(images, target=labels, seeds=torch.arange(len(images)))
        >>> explanation = explainer.explain(images, labels, seeds=torch.arange(len(images)))
        >>> explanation.iterations            # e.g. tensor([120, 90, ...])
        >>> nearby = explainer.attribute(images + 1e-3, labels, seeds=torch.arange(len(images)),
        ...                              initial=explanation.solution)   # fewer steps
    """

    name = "moreaugrad"
    display_name = "MoreauGrad"
    family = "moreaugrad"
    supports_initial = True

    def __init__(
        self,
        model: nn.Module,
        rho: float = 1.0,
        step_size: float = 0.1,
        num_steps: int = 300,
        noise_std: float = 0.1,
        noise_samples: int = 32,
        average_last: int = 0,
        internal_batch_size: InternalBatchSize = "auto",
        tol: float | None = None,
        tol_window: int = 10,
        accelerate: bool = False,
        autocast: bool = False,
        channels_last: bool = False,
        score: str = "logit",
        graph: str = "surrogate",
        graph_tol: float = 1e-3,
        graph_max_iter: int = 100,
        graph_noise_samples: int | None = None,
    ) -> None:
        super().__init__(model, score)
        owner = type(self).__name__
        check_number(owner, "rho", rho)
        check_number(owner, "step_size", step_size)
        if step_size >= 2 * rho:
            raise ValueError(
                f"{owner}: step_size={step_size} must be below 2 * rho = {2 * rho}: the iteration diverges even "
                f"for a constant score; the default step_size is rho / 10."
            )
        check_positive_int(owner, "num_steps", num_steps)
        check_number(owner, "noise_std", noise_std, positive=False)
        check_positive_int(owner, "noise_samples", noise_samples)
        check_positive_int(owner, "average_last", average_last, minimum=0)
        if average_last > num_steps:
            raise ValueError(f"{owner}: average_last={average_last} cannot exceed num_steps={num_steps}.")
        check_internal_batch_size(owner, internal_batch_size)
        if tol is not None:
            check_number(owner, "tol", tol)
            if average_last:
                raise ValueError(
                    f"{owner}: average_last needs a fixed number of steps; use either tol or average_last, not both."
                )
        check_positive_int(owner, "tol_window", tol_window)
        for flag, value in (("accelerate", accelerate), ("autocast", autocast), ("channels_last", channels_last)):
            check_flag(owner, flag, value)
        check_choice(owner, "graph", graph, GRAPHS)
        check_number(owner, "graph_tol", graph_tol)
        check_positive_int(owner, "graph_max_iter", graph_max_iter)
        if graph_noise_samples is not None:
            check_positive_int(owner, "graph_noise_samples", graph_noise_samples)
        self.rho = rho
        self.step_size = step_size
        self.num_steps = num_steps
        self.noise_std = noise_std
        self.noise_samples = noise_samples
        self.average_last = average_last
        self.internal_batch_size = internal_batch_size
        self.tol = tol
        self.tol_window = tol_window
        self.accelerate = accelerate
        self.autocast = autocast
        self.channels_last = channels_last
        self.graph = graph
        self.graph_tol = graph_tol
        self.graph_max_iter = graph_max_iter
        self.graph_noise_samples = graph_noise_samples

    @property
    def uses_noise(self) -> bool:
        return self.noise_std > 0

    def _prox(self, displacement: Tensor, step: float, eta: Tensor | None) -> Tensor:
        """The proximal step of the penalty (with per-row weights `eta`, `None`: the setting); MoreauGrad has none."""
        return displacement

    def _penalty_linearisation(self, displacement: Tensor) -> PenaltyLinearisation:
        """The prox's linearisation at a solution, for the exact graph (`mglightning.explainers.implicit`); none."""
        return PenaltyLinearisation()

    def _explain(
        self, inputs: Tensor, target: Tensor, seeds: Tensor | None, create_graph: bool, initial: Tensor | None
    ) -> MoreauExplanation:
        solved = self._solve(inputs.detach(), target, seeds, initial)
        displacement, counts = solved.displacement, solved.gradient_evaluations.clone()
        if not create_graph:
            attribution = -displacement / self.rho
        elif self.graph == "exact":
            # The backward pass adds its Hessian-vector products to `counts` when it runs.
            attribution = exact_moreau_map(self, inputs, displacement, target, seeds, counts)
        else:
            counts += 1  # the differentiable map is one more forward+backward per sample
            attribution = moreau_surrogate(self.model, inputs, displacement, target, self.score)
        return MoreauExplanation(attribution, counts, displacement, iterations=solved.iterations, eta=solved.eta)

    def _solve(
        self, inputs: Tensor, target: Tensor, seeds: Tensor | None, initial: Tensor | None, eta: Tensor | None = None
    ) -> SolverResult:
        """The solve of `explain` (`moreau_solver.proximal_gradient`); the sparse variants add their search."""
        return proximal_gradient(self, inputs, target, seeds, initial, eta)


class _PenalisedMoreauGrad(MoreauGrad):
    """What Sparse and Group-Sparse MoreauGrad share: the penalty weight `eta` or a target zero share, which a
    per-sample search turns into one `eta` per sample (described in `SparseMoreauGrad`), and the warning when a
    fixed `eta` zeroes whole maps.

    Args:
        model: classifier taking `(B, C, H, W)` images in [0, 1], in eval mode.
        eta: the penalty's coefficient `eta >= 0`; `None` (default) is the official code's (`default_eta`: 5e-3 for
            the L1 norm, 5e-2 for the group norm) unless `target_zero_fraction` is given. Exclusive with
            `target_zero_fraction`.
        target_zero_fraction: the share of exactly-zero entries of every map, in (0, 1), instead of `eta`
            (default `None`: use `eta`).
        search_rounds: the most solves of the target search (default 12).
        search_tolerance: how far a map's zero share may lie from the target (default 0.01).
        **settings: MoreauGrad's settings (`rho`, `step_size`, `num_steps`, `noise_std`, ...), as in `MoreauGrad`.
    """

    default_eta: ClassVar[float]
    zero_unit: ClassVar[str]  # what one unit of zeros is ("entry", "group"), for messages

    def __init__(
        self,
        model: nn.Module,
        eta: float | None = None,
        target_zero_fraction: float | None = None,
        search_rounds: int = 12,
        search_tolerance: float = 0.01,
        **settings: Any,
    ) -> None:
        super().__init__(model, **settings)
        owner = type(self).__name__
        if target_zero_fraction is None:
            eta = self.default_eta if eta is None else eta
            check_number(owner, "eta", eta, positive=False)
        else:
            if eta is not None:
                raise ValueError(
                    f"{owner}: give either eta or target_zero_fraction, not both: the search for "
                    f"target_zero_fraction={target_zero_fraction} sets each sample's eta itself."
                )
            check_number(owner, "target_zero_fraction", target_zero_fraction)
            if target_zero_fraction >= 1:
                raise ValueError(
                    f"{owner}: target_zero_fraction must lie in (0, 1) (the share of exactly-zero map entries), "
                    f"got {target_zero_fraction}."
                )
        check_positive_int(owner, "search_rounds", search_rounds)
        check_number(owner, "search_tolerance", search_tolerance)
        self.eta = eta
        self.target_zero_fraction = target_zero_fraction
        self.search_rounds = search_rounds
        self.search_tolerance = search_tolerance

    def _zero_quantum(self, shape: torch.Size) -> float:
        """The share of a map that one unit of zeros is (an entry, or a group)."""
        raise NotImplementedError

    def _penalty_norms(self, gradient: Tensor) -> Tensor:
        """`(B, n)`: what the proximal step compares with `step_size * eta`, per entry or per group."""
    def _solve(
        self, inputs: Tensor, target: Tensor, seeds: Tensor | None, initial: Tensor | None, eta: Tensor | None = None
    ) -> SolverResult:
        if eta is None and self.target_zero_fraction is not None:
            return search_zero_fraction(self, inputs, target, seeds, initial)
        solved = super()._solve(inputs, target, seeds, initial, eta)
        if eta is None:
            self._warn_on_zero_maps(solved.displacement)
            solved = replace(solved, eta=torch.full((inputs.shape[0],), float(self.eta)))
        return solved
        return solved

    def _warn_on_zero_maps(self, displacement: Tensor) -> None:
        if self.eta == 0:
            return
        zero_maps = int((displacement.flatten(1) == 0).all(dim=1).sum())
        if zero_maps:
            warnings.warn(
                f"{type(self).__name__}: eta={self.eta:g} zeroes the whole map of {zero_maps} of "
                f"{displacement.shape[0]} samples, so those maps show nothing; use a smaller eta (the zero share "
                "depends on the model's gradient scale) or set target_zero_fraction instead, which finds an eta "
                "per sample.",
                stacklevel=5,
            )

    def achievable_zero_fraction(self, shape: torch.Size | tuple[int, ...]) -> float:
        """The zero share the search aims at on `(B, C, H, W)` inputs of `shape`: `target_zero_fraction` rounded to
        the nearest whole number of entries (groups for the group-sparse variant); a `ValueError` when that is
        none or all of them.

        Example:
            >>> GroupSparseMoreauGrad(model, group_size=4, target_zero_fraction=0.3).achievable_zero_fraction(
            ...     (1, 3, 32, 32))
            0.296875
        """
        if self.target_zero_fraction is None:
            raise ValueError(f"{type(self).__name__} has a fixed eta={self.eta}; no target_zero_fraction was set.")
        quantum = self._zero_quantum(shape)
        units, total = round(self.target_zero_fraction / quantum), round(1 / quantum)
        if not 0 < units < total:
            raise ValueError(
                f"{type(self).__name__}: target_zero_fraction={self.target_zero_fraction} cannot be reached on "
                f"{tuple(shape[1:])} inputs: zeros come in units of one {self.zero_unit} ({quantum:.4g} of a map), so "
                f"the closest share would be {units * quantum:g}; choose a target between {quantum:.4g} and "
                f"{1 - quantum:.4g}."
            )
        return units * quantum


class SparseMoreauGrad(_PenalisedMoreauGrad):
    """Sparse MoreauGrad: the L1-regularised Moreau envelope, `(x - z*) / rho` (paper Definitions 4-5).

    `z* = argmin_z f_c(z) + ||z - x||^2 / (2 rho) + eta * ||z - x||_1`, solved by MoreauGrad's steps followed by
    `z <- x + ST_{step_size * eta}(z - x)` (soft threshold). Larger `eta` gives sparser maps; entries with
    `z*_i = x_i` are exactly zero. A fixed `eta` is absolute, so the share of zeros it gives depends on the model's
    gradient scale (from none to the whole map); when it zeroes whole maps the call warns.

    **Target sparsity** (`target_zero_fraction` instead of `eta`): each sample gets its own `eta`, chosen so that
    the share of exactly-zero entries of its map is the target within `search_tolerance`, by a safeguarded search
    on `log eta` (`moreau_solver.search_zero_fraction` describes it); after `search_rounds` rounds every sample
    keeps its closest map, and a warning names how many missed. The cost per sample, in gradient evaluations, is 1
    (the gradient at `x`) plus its rounds' solves (steps x noise copies each); on the digits quickstart the
    search took 1.0-1.2 solves per sample on average in plain mode, 1.0-2.1 in regularised mode
    (docs/reference/explainers.md). Zeros come one entry at a time (`1 / (C H W)` of a map), and the target is rounded to the
    nearest such share (`achievable_zero_fraction`). `explain` returns each sample's `eta` in
    `MoreauExplanation.eta` (`(B,)`, CPU; the setting itself with a fixed `eta`).

    It takes MoreauGrad's settings as they are (`rho`, `step_size`, `num_steps`, `noise_std`, ..., `score`, `graph`).

    Args:
        eta: L1 coefficient `eta >= 0`; `None` (default) is the official code's 5e-3 unless `target_zero_fraction`
            is given. Exclusive with `target_zero_fraction`.
        target_zero_fraction: the share of exactly-zero entries of every map, in (0, 1), instead of `eta`
            (default `None`: use `eta`).
        search_rounds: the most solves of the target search (default 12).
        search_tolerance: how far a map's zero share may lie from the target (default 0.01).

    Example:
        >>> attr = SparseMoreauGrad(model, eta=5e-3).attribute(images, target=labels)
        >>> explainer = SparseMoreauGrad(model, target_zero_fraction=0.8)
        >>> explanation = explainer.explain(images, target=labels)   # each map 80% zeros (+- 0.01)
        >>> explanation.eta                                           # the eta found for each sample
    """

    name = "sparse_moreaugrad"
    display_name = "Sparse MoreauGrad"
    family = "moreaugrad"
    default_eta = 5e-3
    zero_unit = "entry"

    def _zero_quantum(self, shape: torch.Size) -> float:
        return 1 / math.prod(shape[1:])

    def _penalty_norms(self, gradient: Tensor) -> Tensor:
        return gradient.abs().flatten(1)

    def _prox(self, displacement: Tensor, step: float, eta: Tensor | None) -> Tensor:
        return unchecked_soft_threshold(displacement, step * (self.eta if eta is None else eta))

    def _penalty_linearisation(self, displacement: Tensor) -> PenaltyLinearisation:
        return soft_threshold_linearisation(displacement)


class GroupSparseMoreauGrad(_PenalisedMoreauGrad):
    """Group-Sparse MoreauGrad: the L2,1-regularised Moreau envelope, `(x - z*) / rho` (paper Definitions 4-5).

    The penalty is `eta * sum_S ||z_S - x_S||_2` over `group_size x group_size` pixel blocks across all channels,
    applied by `z <- x + GST_{step_size * eta}(z - x)` after each step; whole blocks of the map are exactly zero.

    **Target sparsity** (`target_zero_fraction` instead of `eta`): the per-sample search of `SparseMoreauGrad`,
    started at the target quantile of the gradient's group norms. The zero share is still counted per entry, but
    groups zero whole blocks, so the shares a map can have are multiples of one group's share
    `group_size^2 / (H W)`: the target is rounded to the nearest multiple (e.g. 0.3 becomes 19/64 = 0.297 for 32x32
    images and `group_size=4`), and a target that would round to no group or to all of them is refused.

    It takes MoreauGrad's settings as they are (`rho`, `step_size`, `num_steps`, `noise_std`, ..., `score`, `graph`).

    Args:
        eta: group-norm coefficient `eta >= 0`; `None` (default) is the official code's 5e-2 unless
            `target_zero_fraction` is given. Exclusive with `target_zero_fraction`.
        group_size: block side; must divide the image height and width (default 14, for 224x224 images; use
            e.g. 4 or 8 for 32x32).
        target_zero_fraction, search_rounds, search_tolerance: as in `SparseMoreauGrad`.

    Example:
        >>> attr = GroupSparseMoreauGrad(model, eta=5e-2, group_size=4).attribute(cifar_images, target=labels)
        >>> half = GroupSparseMoreauGrad(model, group_size=4, target_zero_fraction=0.5).attribute(cifar_images, labels)
    """

    name = "group_sparse_moreaugrad"
    display_name = "Group-sparse MoreauGrad"
    family = "moreaugrad"
    default_eta = 5e-2
    zero_unit = "group"

    def __init__(self, model: nn.Module, group_size: int = 14, **settings: Any) -> None:
        super().__init__(model, **settings)
        check_positive_int(type(self).__name__, "group_size", group_size)
        self.group_size = group_size

    def check_input_shape(self, shape: torch.Size) -> None:
        check_group_size(shape, self.group_size, type(self).__name__)

    def _zero_quantum(self, shape: torch.Size) -> float:
        return self.group_size**2 / (shape[-2] * shape[-1])

    def _penalty_norms(self, gradient: Tensor) -> Tensor:
        return group_norms(gradient, self.group_size).flatten(1)

    def _prox(self, displacement: Tensor, step: float, eta: Tensor | None) -> Tensor:
        return unchecked_group_soft_threshold(displacement, step * (self.eta if eta is None else eta), self.group_size)

    def _penalty_linearisation(self, displacement: Tensor) -> PenaltyLinearisation:
        if self.target_zero_fraction is not None:
            # The group prox's curvature term scales with eta; one eta per sample is not wired into it.
            raise ValueError(
                f"{type(self).__name__}: graph='exact' needs a fixed eta; target_zero_fraction searches one per sample."
            )
        return group_soft_threshold_linearisation(displacement, self.eta, self.group_size)
