"""The MoreauGrad family's solver (paper Algorithm 1; docs/reference/semantics.md section 3): proximal gradient
descent on the displacement `d = z - x`, and the sparse variants' search for the `eta` that gives each map a
target share of zeros.

Both work on a MoreauGrad-family explainer: its settings (`rho`, `step_size`, `num_steps`, `tol`, ...) and hooks
(`_prox`, `_penalty_norms`); `mglightning.explainers.moreaugrad` declares them and calls in here.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mglightning.explainers.base import ClassScore, Explanation, sum_noisy_gradients

# `explainer` below is a MoreauGrad-family explainer; its module imports this one, so the type is named, not imported.


@dataclass(frozen=True)
class MoreauExplanation(Explanation):
    """What a MoreauGrad-family `explain` call returns: the `Explanation` (its `solution` the displacement
    `d = z* - x`) and how the solver got there.

    Attributes:
        iterations: `(B,)` long CPU tensor, the solver steps each sample took (with the target search of the
            sparse variants, over all its solves).
        eta: `(B,)` CPU tensor, the penalty weight of each sample's map for the sparse variants (the `eta`
            setting, or the one the target search found); `None` for MoreauGrad.
    """

    iterations: Tensor | None = None
    eta: Tensor | None = None


@dataclass(frozen=True)
class SolverResult:
    """What one proximal gradient solve returns.

    Attributes:
        displacement: `(B, C, H, W)` the final (or averaged) `d = z - x`.
        iterations: `(B,)` long CPU tensor, the steps each sample took.
        gradient_evaluations: `(B,)` long CPU tensor, the model input rows each sample sent through a
            forward+backward (steps x noise copies).
        eta: `(B,)` CPU tensor, each sample's penalty weight for the sparse variants, `None` without a penalty.
    """

    displacement: Tensor
    iterations: Tensor
    gradient_evaluations: Tensor
    eta: Tensor | None = None


def proximal_gradient(
    explainer, inputs: Tensor, target: Tensor, seeds: Tensor | None, initial: Tensor | None, eta: Tensor | None = None
) -> SolverResult:
    """Proximal gradient descent on `d = z - x` for the whole batch, from `d = initial` (or 0), with `explainer`'s
    settings (Algorithm 1's steps, as `MoreauGrad` describes them): the final (or averaged) `d`, with each
    sample's steps and cost. `eta`: the sparse variants' penalty weight per sample, `(B,)` (`None`: the `eta`
    setting).

    The stopping rule of `tol`: the iterates are grouped in windows of `W` consecutive steps (`W = tol_window`
    in regularised mode, `W = 1` in plain mode) and `m_k` is the mean displacement `d = z - x` over window `k`;
    `m_0` is the starting displacement (0, or `initial`). A sample has converged after window `k` when
    `||m_k - m_{k-1}|| <= tol * ||m_k||`, and then costs no more model evaluations. In plain mode this is "a
    step moved `d` by less than `tol * ||d||`"; in regularised mode the fresh noise moves every single step,
    and the window means average that jitter out, so `tol` must lie above the jitter of the window means
    (about 1% for 2 noise copies and `W = 10` on the digits ResNet; it falls with more copies). A warm start at
    the solution stops after one window (one step in plain mode). The map is still the last iterate's, as in
    Algorithm 1; the windows only decide when to stop.
    """
    batch = inputs.shape[0]
    model = explainer.model
    if explainer.autocast or explainer.channels_last:
        model = _SolverPasses(model, explainer.autocast, explainer.channels_last)
    objective = ClassScore(model, explainer.score, target)
    chunk_size = explainer._rows_per_pass(objective, inputs)
    # On the device once: every step draws its noise there from them.
    seeds = seeds.to(inputs.device) if explainer.uses_noise else None
    copies = explainer.noise_samples if explainer.uses_noise else 1
    step = explainer.step_size
    displacement = torch.zeros_like(inputs) if initial is None else initial.clone()
    extrapolated = displacement.clone() if explainer.accelerate else None  # FISTA's point y
    momentum_t = torch.ones(batch, dtype=inputs.dtype, device=inputs.device)
    averaged = torch.zeros_like(inputs) if explainer.average_last else None
    iterations = torch.full((batch,), explainer.num_steps, dtype=torch.long)
    active = torch.arange(batch, device=inputs.device)
    active_on_host = torch.arange(batch)  # the same samples, to record their steps without reading the device
    # The stopping rule's window means: m_0 is the start, each window of W steps is summed and compared.
    window = explainer.tol_window if explainer.uses_noise else 1
    if explainer.tol is not None:
        previous_mean = displacement.clone()
        window_sum = torch.zeros_like(inputs)

    for iteration in range(explainer.num_steps):
        if explainer.tol is None:  # every sample takes every step: whole tensors, no gathers, no syncs
            points, current, t, row_eta = inputs, displacement, momentum_t, eta
            start = extrapolated if explainer.accelerate else current
        else:
            points, current, t = inputs[active], displacement[active], momentum_t[active]
            row_eta = None if eta is None else eta[active]
            start = extrapolated[active] if explainer.accelerate else current
        gradient = mean_gradient(explainer, points + start, active, objective, seeds, iteration, chunk_size)
        updated = explainer._prox(start - step * (gradient + start / explainer.rho), step, row_eta)
        if explainer.accelerate:
            next_start, t = _fista_extrapolation(start, current, updated, t)

        if explainer.tol is None:
            displacement, momentum_t = updated, t
            if explainer.accelerate:
                extrapolated = next_start
            if averaged is not None and iteration >= explainer.num_steps - explainer.average_last:
                averaged += updated
            continue

        displacement[active] = updated
        momentum_t[active] = t
        if explainer.accelerate:
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
        converged = moved <= explainer.tol * torch.linalg.vector_norm(mean.flatten(1), dim=1)
        previous_mean[active] = mean
        flags = converged.tolist()  # the window's decision: the solve's one wait for the device
        if any(flags):
            converged = torch.tensor(flags)
            iterations[active_on_host[converged]] = iteration + 1
            active_on_host = active_on_host[~converged]
            if active_on_host.numel() == 0:
                break
            active = active_on_host.to(inputs.device)

    if averaged is not None:
        displacement = averaged / explainer.average_last
    return SolverResult(displacement, iterations, iterations * copies)


def mean_gradient(
    explainer, points: Tensor, sample_ids: Tensor, objective: ClassScore, seeds: Tensor | None, step: int,
    chunk_size: int | None,
) -> Tensor:
    """The mean of `grad f_c` over the `noise_samples` noisy copies of each point at solver step `step` (the
    gradient itself without `seeds`), the copies evaluated in chunks of at most `chunk_size` rows."""
    copies = explainer.noise_samples if seeds is not None else 1
    summed = sum_noisy_gradients(
        objective, points, sample_ids, seeds=seeds, copies=copies, std=explainer.noise_std, chunk_size=chunk_size,
        step=step,
    )
    return summed / copies


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


def search_zero_fraction(
    explainer, inputs: Tensor, target: Tensor, seeds: Tensor | None, initial: Tensor | None
) -> SolverResult:
    """Each sample's `eta` searched on `log eta` until its map's zero share is the (achievable) target; every
    round is one batched solve of the samples still searching, each with its own `eta`.

    The search starts at the target quantile of the magnitudes the penalty compares with `eta` (`|grad f_c(x)|`
    per entry or per group), where one proximal step from `x` gives the target share (exact as `rho -> 0` and for
    a linear score); after a solve that zeroes `k` units where the target asks for `n`, it moves `log eta` by the
    difference of those log-quantiles at `n` and `k` (the magnitudes at `z*` taken as those at `x` up to a
    scale). Safeguarded as in Brent's method: a move is used only inside the bracket of known too-dense /
    too-sparse `eta`s and while that bracket at least halves per round, otherwise it bisects (or widens an open
    bracket by 4x). A sample stops once within `search_tolerance`, or when its bracket is narrower than 0.1% of
    `eta` (no `eta` reaches the target: the share jumps past it); after `search_rounds` rounds every sample keeps
    its closest map, and a warning names how many missed.
    """
    batch, device = inputs.shape[0], inputs.device
    goal = explainer.achievable_zero_fraction(inputs.shape)
    dtype = torch.promote_types(inputs.dtype, torch.float32)
    everyone = torch.arange(batch, device=device)
    # The model behind every proposal: the map zeroes the entries (groups) whose |grad f_c(z*)| lies below eta,
    # and the gradient's magnitudes at z* are those at x up to a scale. So the search starts where one proximal
    # step from x gives the target share (the target quantile of the magnitudes at x; exact as rho -> 0), and a
    # solve that zeroes k units instead of the target's n moves eta by the ratio of the quantiles at n and k.
    objective = ClassScore(explainer.model, explainer.score, target)
    chunk_size = explainer._rows_per_pass(objective, inputs)
    gradient = mean_gradient(explainer, inputs, everyone, objective, None, 0, chunk_size)
    norms = explainer._penalty_norms(gradient).to(dtype).sort(dim=1).values.clamp_min(torch.finfo(dtype).tiny)
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
    for _ in range(explainer.search_rounds):
        rows = active.cpu()
        solved = proximal_gradient(
            explainer,
            inputs[active],
            target[active],
            None if seeds is None else seeds[rows],
            None if initial is None else initial[active],
            log_eta[active].exp().to(inputs.dtype),
        )
        displacement = solved.displacement
        evaluations[rows] += solved.gradient_evaluations
        iterations[rows] += solved.iterations
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
        active = active[(miss > explainer.search_tolerance) & (new_width > _SEARCH_RESOLUTION)]
        if active.numel() == 0:
            break
    missed = best_miss > explainer.search_tolerance
    if missed.any():
        warnings.warn(
            f"{type(explainer).__name__}: the zero share of {int(missed.sum())} of {batch} maps is up to "
            f"{float(best_miss.max()):.3g} from the target {goal:.4g} "
            f"(search_tolerance={explainer.search_tolerance}): either no eta reaches it (the share jumps past the "
            f"target where several of its {explainer.zero_unit} units reach zero at the same eta) or "
            f"{explainer.search_rounds} search_rounds were too few. They keep the closest map found.",
            stacklevel=5,
        )
    return SolverResult(best, iterations, evaluations, eta=best_log_eta.exp().cpu())


_SEARCH_EXPANSION = math.log(4.0)  # log-eta step while a sample's target share is not yet bracketed
_SEARCH_RESOLUTION = 1e-3  # the narrowest log-eta bracket searched


def _next_log_eta(low: Tensor, high: Tensor) -> Tensor:
    """The search's next `log eta` per sample: the midpoint once bracketed, else a factor 4 beyond the known end."""
    below, above = torch.isfinite(low), torch.isfinite(high)
    return torch.where(below & above, (low + high) / 2, torch.where(below, low + _SEARCH_EXPANSION,
                                                                     high - _SEARCH_EXPANSION))
