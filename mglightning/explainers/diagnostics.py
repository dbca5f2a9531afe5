"""Local convexity diagnostic for MoreauGrad (beyond the paper): is `rho < 1 / lambda` near each input?

Theorem 1 and Corollary 1 of the paper hold when the explained score `f_c` is `lambda`-weakly convex (its Hessian
is `>= -lambda I` everywhere) and `rho < 1 / lambda`: the Moreau problem is then strongly convex, Algorithm 1
converges to its unique solution, and the map moves by at most `epsilon / min(rho, 1/lambda - rho)` under any
perturbation of L2 norm `epsilon`. With `rho` too large for the network the problem is non-convex and the map has
no such guarantee.

`local_convexity` estimates, per sample, `lambda = max(0, -lambda_min(H))` with `H` the Hessian of `f_c` at the
input (or, for regularised MoreauGrad, the Hessian of the Gaussian-smoothed score `E f_c(x + n)`, averaged over
seeded noisy copies), by power iteration on Hessian-vector products (`mglightning.explainers.hessian`).

**A local estimate, not a certificate.** The theorem needs the bound on the whole region the solve and the attack
visit; this looks at one point. And power iteration's Rayleigh quotient is never below the true smallest
eigenvalue, so an unconverged estimate *under*-states `lambda`: the share of samples in the convex regime is, if
anything, optimistic. Give it enough iterations (`num_iterations`) for the network at hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mglightning.checks import (
    check_choice,
    check_inputs,
    check_internal_batch_size,
    check_number,
    check_positive_int,
    format_seeds,
    format_target,
)
from mglightning.explainers.base import SCORES, ClassScore
from mglightning.explainers.batching import InternalBatchSize
from mglightning.explainers.hessian import HessianOperator


def corollary_bound(weak_convexity: Tensor, rho: float, epsilon: float) -> Tensor:
    """The paper's Corollary 1 bound `epsilon / min(rho, 1/lambda - rho)` on `||MG(x + delta) - MG(x)||_2`.

    `lambda = 0` (a convex score) gives `epsilon / rho`; `rho >= 1 / lambda` (outside Theorem 1) gives `inf`.

    Args:
        weak_convexity: `(B,)` non-negative `lambda` per sample.
        rho: the Moreau coefficient, > 0 (same units as `1 / lambda`: pixel units for our models).
        epsilon: the perturbation's L2 norm, >= 0.

    Returns:
        A `(B,)` tensor of bounds (`inf` where `rho * lambda >= 1`).

    Example:
        >>> corollary_bound(torch.tensor([0.0, 1.0, 4.0]), rho=0.2, epsilon=0.1)
        tensor([0.5000, 0.5000,    inf])
    """
    check_number("corollary_bound", "rho", rho)
    check_number("corollary_bound", "epsilon", epsilon, positive=False)
    if (weak_convexity < 0).any():
        raise ValueError("corollary_bound: weak_convexity must be >= 0 (lambda = max(0, -smallest eigenvalue)).")
    margin = 1.0 / weak_convexity - rho  # inf - rho = inf where lambda = 0
    denominator = torch.clamp(margin, max=rho)
    return torch.where(margin > 0, epsilon / denominator, torch.full_like(margin, math.inf))


@dataclass
class ConvexityDiagnostic:
    """Per-sample result of `local_convexity`.

    Attributes:
        smallest_eigenvalue: `(B,)` estimate of the smallest eigenvalue of the (smoothed) score's Hessian.
        weak_convexity: `(B,)` `lambda = max(0, -smallest_eigenvalue)`.
        rho: the Moreau coefficient tested.
        convex: `(B,)` bool, `rho * lambda < 1` (Theorem 1's condition `rho < 1 / lambda`).
        bound: `(B,)` Corollary 1's bound for `epsilon` (`inf` where not convex), or `None` without `epsilon`.
        sample_gradient_evaluations: `(B,)` long CPU tensor, the cost per sample (a Hessian-vector product
            counts 2 per model input row).
    """

    smallest_eigenvalue: Tensor
    weak_convexity: Tensor
    rho: float
    convex: Tensor
    bound: Tensor | None
    sample_gradient_evaluations: Tensor

    @property
    def convex_share(self) -> float:
        """The share of samples in the convex regime."""
        return float(self.convex.float().mean())

    @property
    def gradient_evaluations(self) -> int:
        """Total gradient evaluations (model input rows through a forward+backward) of the diagnostic."""
        return int(self.sample_gradient_evaluations.sum())


def local_convexity(
    model: nn.Module,
    inputs: Tensor,
    target: int | Tensor,
    rho: float,
    epsilon: float | None = None,
    *,
    num_iterations: int = 30,
    score: str = "logit",
    noise_std: float = 0.0,
    noise_samples: int = 1,
    seeds: Tensor | None = None,
    internal_batch_size: InternalBatchSize = "auto",
) -> ConvexityDiagnostic:
    """Estimate each sample's local weak-convexity `lambda` and whether MoreauGrad's `rho < 1 / lambda` holds.

    Batched: all samples' power iterations run together, each on its own Hessian (one double backpropagation per
    product gives every row's product). Costs `num_iterations` Hessian-vector products per sample, twice that
    for samples whose dominant eigenvalue is positive (a second, shifted power iteration finds the smallest).
    See the module docstring: a local estimate at the input, not a certificate.

    Args:
        model: classifier taking `(B, C, H, W)` images in [0, 1], in eval mode.
        inputs: `(B, C, H, W)` images.
        target: the explained class, an int or a `(B,)` long tensor.
        rho: the MoreauGrad coefficient to test, in the inputs' (pixel) units.
        epsilon: an attack budget (L2, pixel units) for Corollary 1's bound; `None` skips the bound.
        num_iterations: Hessian-vector products per power iteration (default 30).
        score: the explained score, `logit` (default), `log_softmax` or `softmax`.
        noise_std: for regularised MoreauGrad, the noise of the smoothed score `E f_c(x + n)` whose Hessian is
            estimated (mean over `noise_samples` seeded copies, fixed for all products); 0 (default) uses `f_c`.
        noise_samples: noisy copies per sample when `noise_std > 0`.
        seeds: `(B,)` integer tensor; sample `i`'s starting vector and noise come from `seeds[i]` only (`None`:
            drawn from torch's global RNG).
        internal_batch_size: the most model input rows per pass; `"auto"` (default: fill the free memory on CUDA,
            256 elsewhere) or `None` (all at once).

    Returns:
        A `ConvexityDiagnostic`.

    Example:
        >>> diagnostic = local_convexity(model, images, labels, rho=0.06, epsilon=0.25, seeds=torch.arange(8))
        >>> diagnostic.convex_share, diagnostic.weak_convexity, diagnostic.bound
    """
    owner = "local_convexity"
    check_number(owner, "rho", rho)
    if epsilon is not None:
        check_number(owner, "epsilon", epsilon, positive=False)
    check_positive_int(owner, "num_iterations", num_iterations)
    check_choice(owner, "score", score, SCORES)
    check_number(owner, "noise_std", noise_std, positive=False)
    check_positive_int(owner, "noise_samples", noise_samples)
    check_internal_batch_size(owner, internal_batch_size)
    check_inputs(inputs)
    target = format_target(target, inputs)
    seeds = format_seeds(seeds, inputs.shape[0])
    if seeds is None:
        seeds = torch.randint(0, 2**62, (inputs.shape[0],), dtype=torch.long)
    operator = HessianOperator(
        ClassScore(model, score, target),
        inputs.detach(),
        internal_batch_size=internal_batch_size,
        noise_std=noise_std,
        noise_samples=noise_samples,
        seeds=seeds,
    )
    estimate = operator.smallest_eigenvalue(num_iterations, seeds)
    smallest = estimate.values.detach()
    weak_convexity = (-smallest).clamp(min=0)
    convex = rho * weak_convexity < 1
    bound = None if epsilon is None else corollary_bound(weak_convexity, rho, epsilon)
    return ConvexityDiagnostic(
        smallest_eigenvalue=smallest,
        weak_convexity=weak_convexity,
        rho=float(rho),
        convex=convex,
        bound=bound,
        sample_gradient_evaluations=estimate.sample_gradient_evaluations,
    )
