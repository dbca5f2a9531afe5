"""MoreauGrad, Sparse MoreauGrad and Group-Sparse MoreauGrad (paper sections 4-5, Algorithm 1; docs/reference/semantics.md section 3).

All three solve, for every sample at once,

    z* = argmin_z  f_c(z) + ||z - x||^2 / (2 rho) + eta * R(z - x)

by proximal gradient descent on the displacement `d = z - x` (`R = 0`, `||.||_1` or the group norm `||.||_{2,1}`)
and return `(x - z*) / rho`, which for `R = 0` is the gradient of the Moreau envelope and tends to the simple
gradient as `rho -> 0`. (The paper's Algorithm 1 and the official code return the opposite sign; the official
code also returns `z* - x` without dividing by `rho`. Same magnitudes.)
"""

from __future__ import annotations

import math
import warnings
from typing import ClassVar

import torch
from torch import Tensor, nn

from mglightning.explainers.base import (
    ClassScore,
    Explainer,
    Explanation,
    InternalBatchSize,
    check_inputs,
    check_internal_batch_size,
    check_number,
    check_positive_int,
    format_target,
    graph_inputs,
    sum_noisy_gradients,
)
from mglightning.explainers.implicit import (
    PenaltyLinearisation,
    exact_moreau_map,
    group_soft_threshold_linearisation,
    soft_threshold_linearisation,
)
from mglightning.explainers.prox import (
    check_group_size,
    group_norms,
    unchecked_group_soft_threshold,
    unchecked_soft_threshold,
)

GRAPHS = ("surrogate", "exact")


def moreau_surrogate(
    model: nn.Module, inputs: Tensor, displacement: Tensor, target: int | Tensor, score: str = "logit"
) -> Tensor:
    """The differentiable stand-in for a MoreauGrad map that the interpretation attack uses (docs/reference/semantics.md section 3).

    `1[d != 0] * |grad f_c(x + d)|` with the graph to `inputs` kept, for a displacement `d = z* - x` that was
    solved without a graph and is held fixed here (as in the official code). `attribute(..., create_graph=True)`
    of the MoreauGrad family returns exactly this with its own `d` under the default `graph="surrogate"`
    (`graph="exact"` returns the map itself with its implicit derivative instead).

    Args:
        model: the classifier.
        inputs: `(B, C, H, W)` images; the result is differentiable with respect to them when they require grad.
        displacement: `(B, C, H, W)` displacement `d`, treated as a constant.
        target: an int or a `(B,)` long tensor.
        score: `logit` (default), `log_softmax` or `softmax`.

    Example:
        >>> explainer = MoreauGrad(model, noise_std=0.0)
        >>> d = -explainer.rho * explainer.attribute(x, target)
        >>> surrogate = moreau_surrogate(model, x.requires_grad_(), d, target)
        >>> # the same as explainer.attribute(x, target, create_graph=True)
    """
    check_inputs(inputs)
    if displacement.shape != inputs.shape:
        raise ValueError(
            f"displacement must be shaped like inputs {tuple(inputs.shape)}, got {tuple(displacement.shape)}."
        )
    target = format_target(target, inputs)
    displacement = displacement.detach()
    with torch.enable_grad():
        gradient = ClassScore(model, score, target).gradient(graph_inputs(inputs) + displacement, create_graph=True)
    return (displacement != 0) * gradient.abs()


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
    - **Early stopping** (`tol`): the iterates are grouped in windows of `W` consecutive steps (`W = tol_window`
      in regularised mode, `W = 1` in plain mode) and `m_k` is the mean displacement `d = z - x` over window `k`;
      `m_0` is the starting displacement (0, or `initial`). A sample has converged after window `k` when
      `||m_k - m_{k-1}|| <= tol * ||m_k||`, and then costs no more model evaluations. In plain mode this is "a
      step moved `d` by less than `tol * ||d||`"; in regularised mode the fresh noise moves every single step,
      and the window means average that jitter out, so `tol` must lie above the jitter of the window means
      (about 1% for 2 noise copies and `W = 10` on the digits ResNet; it falls with more copies). A warm start at
      the solution stops after one window (one step in plain mode). The map is still the last iterate's, as in
      Algorithm 1; the windows only decide when to stop.
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

    After each call: `last_iterations` (`(B,)` long tensor), and
    `last_gradient_evaluations` / `last_sample_gradient_evaluations` (model input rows through a
    forward+backward, in total and per sample as a `(B,)` long CPU tensor: steps x noise copies, plus one row for
    the surrogate differentiable map). With the exact graph the map itself costs nothing more, and its backward
    pass adds 2 x `graph_noise_samples` (2 in plain mode) per CG iteration and sample to the
    `Explanation.gradient_evaluations` of the call when it runs (not to the `last_*` attributes).

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
        >>> explainer.last_iterations            # e.g. tensor([120, 90, ...])
        >>> solved = explainer.explain(images, labels, seeds=torch.arange(len(images)))
        >>> nearby = explainer.attribute(images + 1e-3, labels, seeds=torch.arange(len(images)),
        ...                              initial=solved.solution)   # fewer steps
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
            if not isinstance(value, bool):
                raise ValueError(f"{owner}: {flag} must be True or False, got {value!r}.")
        if graph not in GRAPHS:
            raise ValueError(f"{owner}: graph must be one of {GRAPHS}, got {graph!r}.")
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
        self.last_iterations: Tensor | None = None
        self.last_gradient_evaluations: int | None = None
        self.last_sample_gradient_evaluations: Tensor | None = None

    @property
    def uses_noise(self) -> bool:
        return self.noise_std > 0

    def _prox(self, displacement: Tensor, step: float, eta: Tensor | None) -> Tensor:
        """The proximal step of the penalty (with per-row weights `eta`, `None`: the setting); MoreauGrad has none."""
        return displacement

    def _penalty_linearisation(self, displacement: Tensor) -> PenaltyLinearisation:
        """The prox's linearisation at a solution, for the exact graph (`mglightning.explainers.implicit`); none."""
        return PenaltyLinearisation()

    def _check_shape(self, inputs: Tensor) -> None:
        """Hook for settings that constrain the image shape."""

    def _explain(
        self, inputs: Tensor, target: Tensor, seeds: Tensor | None, create_graph: bool, initial: Tensor | None
    ) -> Explanation:
        self._check_shape(inputs)
        displacement = self._solve(inputs.detach(), target, seeds, initial)
        if not create_graph:
            attribution = -displacement / self.rho
        elif self.graph == "exact":
            # The backward pass adds its Hessian-vector products to this count when it runs.
            counts = self.last_sample_gradient_evaluations.clone()
            attribution = exact_moreau_map(self, inputs, displacement, target, seeds, counts)
            return Explanation(attribution, counts, displacement)
        else:
            # The differentiable map is one more forward+backward per sample.
            self.last_sample_gradient_evaluations += 1
            self.last_gradient_evaluations += inputs.shape[0]
            attribution = moreau_surrogate(self.model, inputs, displacement, target, self.score)
        return Explanation(attribution, self.last_sample_gradient_evaluations.clone(), displacement)

    def _attribute(self, inputs: Tensor, target: Tensor, seeds: Tensor | None, create_graph: bool) -> Tensor:
        return self._explain(inputs, target, seeds, create_graph, None).attribution

    def _mean_gradient(
        self, points: Tensor, sample_ids: Tensor, objective: ClassScore, seeds: Tensor | None, step: int,
        chunk_size: int | None,
    ) -> Tensor:
        copies = self.noise_samples if seeds is not None else 1
        summed = sum_noisy_gradients(
            objective,
            points,
            sample_ids,
            seeds=seeds,
            copies=copies,
            std=self.noise_std,
            chunk_size=chunk_size,
            step=step,
        )
        return summed / copies

    def _solve(
        self, inputs: Tensor, target: Tensor, seeds: Tensor | None, initial: Tensor | None, eta: Tensor | None = None
    ) -> Tensor:
        """Proximal gradient descent on `d = z - x` for the whole batch, from `d = initial` (or 0); returns the
        final (or averaged) `d`. `eta`: the sparse variants' penalty weight per sample, `(B,)` (`None`: the
        `eta` setting)."""
        batch = inputs.shape[0]
        model = self.model
        if self.autocast or self.channels_last:
            model = _SolverPasses(model, self.autocast, self.channels_last)
        objective = ClassScore(model, self.score, target)
        chunk_size = self._rows_per_pass(objective, inputs)
        # On the device once: every step draws its noise there from them.
        seeds = seeds.to(inputs.device) if self.uses_noise else None
        copies = self.noise_samples if self.uses_noise else 1
        step = self.step_size
        displacement = torch.zeros_like(inputs) if initial is None else initial.clone()
        extrapolated = displacement.clone() if self.accelerate else None  # FISTA's point y
        momentum_t = torch.ones(batch, dtype=inputs.dtype, device=inputs.device)
        averaged = torch.zeros_like(inputs) if self.average_last else None
        iterations = torch.full((batch,), self.num_steps, dtype=torch.long)
        active = torch.arange(batch, device=inputs.device)
        active_on_host = torch.arange(batch)  # the same samples, to record their steps without reading the device
        # The stopping rule's window means: m_0 is the start, each window of W steps is summed and compared.
        window = self.tol_window if self.uses_noise else 1
        if self.tol is not None:
            previous_mean = displacement.clone()
            window_sum = torch.zeros_like(inputs)

        for iteration in range(self.num_steps):
            if self.tol is None:  # every sample takes every step: whole tensors, no gathers, no syncs
                points, current, t, row_eta = inputs, displacement, momentum_t, eta
                start = extrapolated if self.accelerate else current
            else:
                points, current, t = inputs[active], displacement[active], momentum_t[active]
                row_eta = None if eta is None else eta[active]
                start = extrapolated[active] if self.accelerate else current
            gradient = self._mean_gradient(points + start, active, objective, seeds, iteration, chunk_size)
            updated = self._prox(start - step * (gradient + start / self.rho), step, row_eta)
            if self.accelerate:
                next_start, t = _fista_extrapolation(start, current, updated, t)

            if self.tol is None:
                displacement, momentum_t = updated, t
                if self.accelerate:
                    extrapolated = next_start
                if averaged is not None and iteration >= self.num_steps - self.average_last:
                    averaged += updated
                continue

            displacement[active] = updated
            momentum_t[active] = t
            if self.accelerate:
                extrapolated[active] = next_start
            if window == 1:  # the plain mode's window is the step itself: skip the sums
                mean = updated
            else:
                window_sum[active] += updated
                if (iteration + 1) % window:
                    continue
                mean = window_sum[active] / window
                window_sum[active] = 0
            moved = torch.linalg.vector_norm((mean - previous_mean[active]).flatten(1), dim=1)
            converged = moved <= self.tol * torch.linalg.vector_norm(mean.flatten(1), dim=1)
            previous_mean[active] = mean
            flags = converged.tolist()  # the window's decision: the solve's one wait for the device
            if any(flags):
                converged = torch.tensor(flags)
                iterations[active_on_host[converged]] = iteration + 1
                active_on_host = active_on_host[~converged]
                if active_on_host.numel() == 0:
                    break
                active = active_on_host.to(inputs.device)

        self.last_iterations = iterations
        self.last_sample_gradient_evaluations = iterations * copies
        self.last_gradient_evaluations = int(self.last_sample_gradient_evaluations.sum())
        if averaged is not None:
            return averaged / self.average_last
        return displacement


class _SolverPasses(nn.Module):
    """The model as the solver calls it: inputs in channels-last layout and/or the forward under bfloat16 autocast.

    The scores come back in float32, so the score selection, the gradients with respect to the (float32) points
    and everything the solver accumulates stay at full precision.
    """

    def __init__(self, model: nn.Module, autocast: bool, channels_last: bool) -> None:
        super().__init__()
        self.model = model
        self.autocast = autocast
        self.channels_last = channels_last

    def forward(self, points: Tensor) -> Tensor:
        if self.channels_last:
            points = points.contiguous(memory_format=torch.channels_last)
        with torch.autocast(points.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.model(points).float()


def _fista_extrapolation(start: Tensor, current: Tensor, updated: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """FISTA's next point `y = d_new + (t - 1) / t_next * (d_new - d)` and `t_next`, per sample.

    With adaptive restart (O'Donoghue & Candes 2015): where the step from `y` points against the momentum
    (`<y - d_new, d_new - d> > 0`), the momentum is dropped and `t` restarts at 1.
    """
    t_next = (1 + torch.sqrt(1 + 4 * t * t)) / 2
    beta = (t - 1) / t_next
    restart = ((start - updated) * (updated - current)).flatten(1).sum(1) > 0
    beta = torch.where(restart, 0.0, beta)
    t_next = torch.where(restart, 1.0, t_next)
    return updated + beta.view(-1, 1, 1, 1) * (updated - current), t_next


class _PenalisedMoreauGrad(MoreauGrad):
    """What Sparse and Group-Sparse MoreauGrad share: the penalty weight `eta` or a target zero share, which a
    per-sample search turns into one `eta` per sample (described in `SparseMoreauGrad`), and the warning when a
    fixed `eta` zeroes whole maps."""

    default_eta: ClassVar[float]
    zero_unit: ClassVar[str]  # what one unit of zeros is ("entry", "group"), for messages

    def _init_penalty(
        self, eta: float | None, target_zero_fraction: float | None, search_rounds: int, search_tolerance: float
    ) -> None:
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
        self.last_eta: Tensor | None = None

    def _zero_quantum(self, shape: torch.Size) -> float:
        """The share of a map that one unit of zeros is (an entry, or a group)."""
        raise NotImplementedError

    def _penalty_norms(self, gradient: Tensor) -> Tensor:
        """`(B, n)`: what the proximal step compares with `step_size * eta`, per entry or per group."""
        raise NotImplementedError

    def _solve(
        self, inputs: Tensor, target: Tensor, seeds: Tensor | None, initial: Tensor | None, eta: Tensor | None = None
    ) -> Tensor:
        if eta is None and self.target_zero_fraction is not None:
            return self._solve_at_zero_fraction(inputs, target, seeds, initial)
        displacement = super()._solve(inputs, target, seeds, initial, eta)
        if eta is None:
            self.last_eta = torch.full((inputs.shape[0],), float(self.eta))
            self._warn_on_zero_maps(displacement)
        return displacement

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

    def _solve_at_zero_fraction(
        self, inputs: Tensor, target: Tensor, seeds: Tensor | None, initial: Tensor | None
    ) -> Tensor:
        """Each sample's `eta` searched on `log eta` until its map's zero share is the (achievable) target; every
        round is one batched solve of the samples still searching, each with its own `eta`."""
        batch, device = inputs.shape[0], inputs.device
        goal = self.achievable_zero_fraction(inputs.shape)
        dtype = torch.promote_types(inputs.dtype, torch.float32)
        everyone = torch.arange(batch, device=device)
        # The model behind every proposal: the map zeroes the entries (groups) whose |grad f_c(z*)| lies below eta,
        # and the gradient's magnitudes at z* are those at x up to a scale. So the search starts where one proximal
        # step from x gives the target share (the target quantile of the magnitudes at x; exact as rho -> 0), and a
        # solve that zeroes k units instead of the target's n moves eta by the ratio of the quantiles at n and k.
        objective = ClassScore(self.model, self.score, target)
        gradient = self._mean_gradient(inputs, everyone, objective, None, 0, self._rows_per_pass(objective, inputs))
        norms = self._penalty_norms(gradient).to(dtype).sort(dim=1).values.clamp_min(torch.finfo(dtype).tiny)
        # thresholds[:, k - 1]: log of the midpoint between the k-th and (k+1)-th smallest, which zeroes exactly k
        thresholds = ((norms[:, :-1] + norms[:, 1:]) / 2).log()
        units = norms.shape[1]
        goal_units = round(goal * units)
        log_eta = thresholds[:, goal_units - 1].clone()
        low = torch.full_like(log_eta, -math.inf)  # log eta known to give too few zeros
        high = torch.full_like(log_eta, math.inf)  # ... and too many
        width = torch.full_like(log_eta, math.inf)  # the bracket's width before the last round
        best = torch.zeros_like(inputs)
        best_miss = torch.full_like(log_eta, math.inf)
        best_log_eta = log_eta.clone()
        evaluations = torch.ones(batch, dtype=torch.long)  # the gradient at x
        iterations = torch.zeros(batch, dtype=torch.long)
        active = everyone
        for _ in range(self.search_rounds):
            rows = active.cpu()
            displacement = MoreauGrad._solve(
                self,
                inputs[active],
                target[active],
                None if seeds is None else seeds[rows],
                None if initial is None else initial[active],
                log_eta[active].exp().to(inputs.dtype),
            )
            evaluations[rows] += self.last_sample_gradient_evaluations
            iterations[rows] += self.last_iterations
            share = (displacement == 0).flatten(1).sum(1).to(dtype) / displacement[0].numel()
            miss = (share - goal).abs()
            better = miss < best_miss[active]
            best[active[better]] = displacement[better]
            best_miss[active[better]] = miss[better]
            best_log_eta[active[better]] = log_eta[active[better]]
            too_sparse = share > goal
            current = log_eta[active]
            low_now = torch.where(too_sparse, low[active], current)
            high_now = torch.where(too_sparse, current, high[active])
            zeroed = (share * units).round().long().clamp(1, units - 1)
            proposal = current + thresholds[active, goal_units - 1] - thresholds[active, zeroed - 1]
            # Safeguarded as in Brent's method: the proposal only inside the bracket, and only while the bracket
            # at least halves each round; otherwise bisect (or widen the bracket by 4x while it is open).
            new_width = high_now - low_now
            trusted = (proposal > low_now) & (proposal < high_now) & (new_width <= width[active] / 2)
            log_eta[active] = torch.where(trusted, proposal, _next_log_eta(low_now, high_now))
            low[active], high[active], width[active] = low_now, high_now, new_width
            # A bracket narrower than 0.1% of eta means the share jumps past the target (e.g. several groups reach
            # zero at the same eta): no eta reaches it, stop.
            active = active[(miss > self.search_tolerance) & (new_width > _SEARCH_RESOLUTION)]
            if active.numel() == 0:
                break
        self.last_eta = best_log_eta.exp().cpu()
        self.last_iterations = iterations
        self.last_sample_gradient_evaluations = evaluations
        self.last_gradient_evaluations = int(evaluations.sum())
        missed = best_miss > self.search_tolerance
        if missed.any():
            warnings.warn(
                f"{type(self).__name__}: the zero share of {int(missed.sum())} of {batch} maps is up to "
                f"{float(best_miss.max()):.3g} from the target {goal:.4g} (search_tolerance={self.search_tolerance}): "
                f"either no eta reaches it (the share jumps past the target where several of its {self.zero_unit} "
                f"units reach zero at the same eta) or {self.search_rounds} search_rounds were too few. They keep the "
                "closest map found.",
                stacklevel=5,
            )
        return best


_SEARCH_EXPANSION = math.log(4.0)  # log-eta step while a sample's target share is not yet bracketed
_SEARCH_RESOLUTION = 1e-3  # the narrowest log-eta bracket searched


def _next_log_eta(low: Tensor, high: Tensor) -> Tensor:
    """The search's next `log eta` per sample: the midpoint once bracketed, else a factor 4 beyond the known end."""
    below, above = torch.isfinite(low), torch.isfinite(high)
    return torch.where(below & above, (low + high) / 2, torch.where(below, low + _SEARCH_EXPANSION,
                                                                     high - _SEARCH_EXPANSION))


class SparseMoreauGrad(_PenalisedMoreauGrad):
    """Sparse MoreauGrad: the L1-regularised Moreau envelope, `(x - z*) / rho` (paper Definitions 4-5).

    `z* = argmin_z f_c(z) + ||z - x||^2 / (2 rho) + eta * ||z - x||_1`, solved by MoreauGrad's steps followed by
    `z <- x + ST_{step_size * eta}(z - x)` (soft threshold). Larger `eta` gives sparser maps; entries with
    `z*_i = x_i` are exactly zero. A fixed `eta` is absolute, so the share of zeros it gives depends on the model's
    gradient scale (from none to the whole map); when it zeroes whole maps the call warns.

    **Target sparsity** (`target_zero_fraction` instead of `eta`): each sample gets its own `eta`, chosen so that
    the share of exactly-zero entries of its map is the target within `search_tolerance`. The search works on
    `log eta`, per sample. It starts at the target quantile of `|grad f_c(x)|` (where one proximal step from `x`
    gives the target share; exact as `rho -> 0` and for a linear score); after a solve that zeroes `k` entries where
    the target asks for `n`, it moves `log eta` by the difference of those log-quantiles at `n` and `k` (the
    magnitudes at `z*` taken as those at `x` up to a scale). Safeguarded as in Brent's method: a move is used only
    inside the bracket of known too-dense / too-sparse `eta`s and while that bracket at least halves per round,
    otherwise it bisects (or widens an open bracket by 4x). Every round is a full solve of the samples still
    searching, all in one batched solve with each sample's own `eta`. A sample stops once within
    `search_tolerance`, or when its bracket is narrower than 0.1% of `eta` (no `eta` reaches the target: the share
    jumps past it); after `search_rounds` rounds every sample keeps its closest map, and a warning names how many
    missed. The cost per sample, in gradient evaluations, is 1 (the gradient at `x`) plus the sum of its rounds'
    solves (steps x noise copies each), counted in `last_sample_gradient_evaluations`; on the digits quickstart the
    search took 1.0-1.2 solves per sample on average in plain mode, 1.0-2.1 in regularised mode
    (docs/reference/explainers.md). Zeros come one entry at a time (`1 / (C H W)` of a map), and the target is rounded to the
    nearest such share (`achievable_zero_fraction`). `last_eta` (`(B,)`, CPU) holds each sample's `eta` after a call
    (the setting itself with a fixed `eta`).

    `model`, `rho`, `step_size`, `num_steps`, `noise_std`, `noise_samples`, `average_last`, `internal_batch_size`,
    `tol`, `tol_window`, `accelerate`, `autocast`, `channels_last`, `score`, `graph`, `graph_tol`, `graph_max_iter`
    and `graph_noise_samples` are as in `MoreauGrad`.

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
        >>> attr = explainer.attribute(images, target=labels)   # each map 80% zeros (+- 0.01)
        >>> explainer.last_eta                                   # the eta found for each sample
    """

    name = "sparse_moreaugrad"
    display_name = "Sparse MoreauGrad"
    family = "moreaugrad"
    default_eta = 5e-3
    zero_unit = "entry"

    def __init__(
        self,
        model: nn.Module,
        rho: float = 1.0,
        step_size: float = 0.1,
        num_steps: int = 300,
        noise_std: float = 0.1,
        noise_samples: int = 32,
        eta: float | None = None,
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
        target_zero_fraction: float | None = None,
        search_rounds: int = 12,
        search_tolerance: float = 0.01,
    ) -> None:
        super().__init__(
            model, rho, step_size, num_steps, noise_std, noise_samples, average_last, internal_batch_size, tol,
            tol_window, accelerate, autocast, channels_last, score, graph=graph, graph_tol=graph_tol,
            graph_max_iter=graph_max_iter, graph_noise_samples=graph_noise_samples,
        )
        self._init_penalty(eta, target_zero_fraction, search_rounds, search_tolerance)

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

    `model`, `rho`, `step_size`, `num_steps`, `noise_std`, `noise_samples`, `average_last`, `internal_batch_size`,
    `tol`, `tol_window`, `accelerate`, `autocast`, `channels_last`, `score`, `graph`, `graph_tol`, `graph_max_iter`
    and `graph_noise_samples` are as in `MoreauGrad`.

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

    def __init__(
        self,
        model: nn.Module,
        rho: float = 1.0,
        step_size: float = 0.1,
        num_steps: int = 300,
        noise_std: float = 0.1,
        noise_samples: int = 32,
        eta: float | None = None,
        group_size: int = 14,
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
        target_zero_fraction: float | None = None,
        search_rounds: int = 12,
        search_tolerance: float = 0.01,
    ) -> None:
        super().__init__(
            model, rho, step_size, num_steps, noise_std, noise_samples, average_last, internal_batch_size, tol,
            tol_window, accelerate, autocast, channels_last, score, graph=graph, graph_tol=graph_tol,
            graph_max_iter=graph_max_iter, graph_noise_samples=graph_noise_samples,
        )
        check_positive_int(type(self).__name__, "group_size", group_size)
        self.group_size = group_size
        self._init_penalty(eta, target_zero_fraction, search_rounds, search_tolerance)

    def check_input_shape(self, shape: torch.Size) -> None:
        try:
            check_group_size(shape, self.group_size)
        except ValueError as error:
            raise ValueError(f"{type(self).__name__}: {error}") from None

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
