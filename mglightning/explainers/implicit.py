"""The differentiable MoreauGrad maps of `create_graph=True` (docs/reference/semantics.md section 3): the official code's
stand-in (`moreau_surrogate`), and the implicit derivative of the map itself with respect to the input (the `exact`
graph and attack): exact for plain MoreauGrad up to the CG tolerance, an estimate in regularised mode (its Hessian is
averaged over a finite number of noise draws).

The solver returns the displacement `d = z* - x` and the map `A(x) = -d / rho`. The interpretation attack needs
vector-Jacobian products `v^T dA/dx`; this module gives them without differentiating through the solver's steps,
from the equation that the solution satisfies.

**Plain MoreauGrad.** `d` solves `d = -rho g(x + d)`, `g = grad f_c`. Differentiating, with `H = hess f_c(z*)`:
`delta d = -rho H (delta x + delta d)`, so `(I + rho H) delta d = -rho H delta x` and

    dA/dx = (I + rho H)^-1 H = (I - (I + rho H)^-1) / rho.

`H` and `I + rho H` are symmetric, so `v^T dA/dx = (H u)^T` with `u` solving `(I + rho H) u = v`.

**Sparse MoreauGrad (L1).** The solver's fixed point is `d = ST_a(w)`, `w = d - gamma (g(x + d) + d / rho)`,
`a = gamma * eta`. The soft threshold's Jacobian is the 0/1 mask `M = diag(|w| > a)`, and `|w_i| > a` exactly where
`d_i != 0`: the support `S` of `d`. Differentiating the fixed point (assuming no entry sits at the threshold, so
`S` is locally constant): off `S`, `delta d = 0`; on `S`, `delta d_S = delta d_S - gamma ([H (delta x + delta d)]_S
+ delta d_S / rho)`, i.e.

    (I + rho H_SS) delta d_S = -rho H_{S,:} delta x,

the plain equation restricted to the support, independent of `gamma` as it should be (it is also what
differentiating the optimality condition `g_S + d_S / rho + eta sign(d_S) = 0` gives). So `dA/dx = M (I + rho M H
M)^-1 M H` with the inverse taken on `S`, and `v^T dA/dx = (H M u)^T` with `u` on `S` solving `u + rho M H u = M v`.

**Group-sparse MoreauGrad (L2,1).** `d = GST_a(w)` per group `G` (a `group_size x group_size` block across the
channels). A zeroed group (`||w_G|| <= a`) has Jacobian 0; a kept one, `r = ||w_G|| > a`, `w^ = w_G / r`, has

    J_G = (1 - a / r) (I - w^ w^T) + w^ w^T,

which is invertible, with `d_G = (1 - a / r) w_G`, so `d^ = w^`, `||d_G|| = r - a` and `J_G^-1 = I + (a / ||d_G||)
(I - d^ d^T)`. Applying `J_G^-1` to the differentiated fixed point `delta d_G = J_G [delta d_G - gamma ([H (delta x
+ delta d)]_G + delta d_G / rho)]` and dividing by `gamma` gives, on the kept groups `S`,

    (I + rho H_SS + rho Q) delta d_S = -rho H_{S,:} delta x,   Q = blockdiag_G (eta / ||d_G||) (I - d^_G d^_G^T),

again independent of `gamma` and the derivative of the optimality condition `g_G + d_G / rho + eta d_G / ||d_G|| =
0`. `Q` is the group norm's curvature: symmetric positive semi-definite, zero along `d_G` and `eta / ||d_G||`
across it. So the system stays symmetric, and `v^T dA/dx = (H M u)^T` with `u + rho M H u + rho Q u = M v`.

**Solving.** All three systems are `K u = M v` with `K = I + rho (M H M + Q)` on the active set (everything in plain
mode). `I / rho + H (+ Q)` on the active set is the Hessian of the Moreau objective at its solution restricted to
where the penalty is smooth, so at a local minimum, where the solver stops, `K` is positive semi-definite even when
`rho` exceeds `1 / lambda` (Theorem 1's regime makes it positive definite everywhere). `K` is applied with
Hessian-vector products (`HessianOperator`, 2 gradient evaluations per model input row) and solved by conjugate
gradients, batched, each sample stopping once its residual is below `tol` times its right-hand side. Because
`u = sum_k alpha_k p_k` over the search directions `p_k`, CG also accumulates `H u = sum_k alpha_k H p_k` from the
products it computes anyway: the gradient `H M u` costs no extra product, and it avoids forming `(v - u) / rho`,
which subtracts nearly equal vectors when `rho H` is small.

**Regularised mode** (`noise_std > 0`). The solver finds the fixed point of the Gaussian-smoothed score
`E_n f_c(z + n)`, whose Hessian is `E_n hess f_c(z* + n)`. It is estimated by the mean over a fixed set of draws:
the sample's first `graph_noise_samples` draws from its seed (`HessianOperator`'s draws; by default
`noise_samples` of them, the solver's first step's draws). The derivative is then that of the fixed point of this
sampled smoothing, an **estimate** of the smoothed map's derivative, and not the derivative of the solver's last
iterate, which depends on every step's fresh draws (its derivative weighs the Hessians at the last ~`rho /
step_size` steps' draws). More draws bring the estimate closer to that derivative; each costs 2 gradient
evaluations per CG iteration. With `average_last` the
derivative is that of the fixed point the averaged iterate approximates, and the sparse variants' support is taken
from the returned displacement.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from mglightning.checks import check_inputs, format_target
from mglightning.explainers.base import ClassScore, Explainer, graph_inputs
from mglightning.explainers.hessian import HessianOperator
from mglightning.explainers.prox import check_group_size

# `explainer` below is a MoreauGrad-family explainer; its module imports this one, so the type is named, not imported.

LinearOperator = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""`apply(vectors, samples) -> (K vectors, L vectors)` for the selected samples: the system's operator `K` and a
companion linear map `L` whose value at the solution conjugate gradients accumulates alongside."""


@dataclass(frozen=True)
class PenaltyLinearisation:
    """The penalty's part of the linearised fixed point at a solution `d` (see the module docstring).

    Attributes:
        active: `(B, C, H, W)` bool mask of the entries the prox keeps, where its Jacobian is invertible (`d != 0`
            for L1, the kept groups for the group norm), or `None` for all entries (no penalty).
        group_size: the groups' side for the group norm's curvature `Q`, `None` without it.
        curvature_scale: `(B, 1, H / g, 1, W / g, 1)` values `eta / ||d_G||` of the kept groups (0 elsewhere).
        directions: `(B, C, H, W)` unit vectors `d_G / ||d_G||` of the kept groups (0 elsewhere).
    """

    active: Tensor | None = None
    group_size: int | None = None
    curvature_scale: Tensor | None = None
    directions: Tensor | None = None

    def mask(self, vectors: Tensor, samples: Tensor) -> Tensor:
        """`M vectors` for the selected samples."""
        return vectors if self.active is None else vectors * self.active[samples]

    def curvature(self, vectors: Tensor, samples: Tensor) -> Tensor | None:
        """`Q vectors` for the selected samples, or `None` where the penalty has no curvature."""
        if self.group_size is None:
            return None
        blocks = _blocks(vectors, self.group_size)
        directions = _blocks(self.directions[samples], self.group_size)
        along = (blocks * directions).sum(dim=(1, 3, 5), keepdim=True)
        return (self.curvature_scale[samples] * (blocks - along * directions)).reshape(vectors.shape)


def _blocks(values: Tensor, group_size: int) -> Tensor:
    """`(B, C, H, W)` viewed as `(B, C, H / g, g, W / g, g)` blocks."""
    batch, channels, height, width = values.shape
    return values.reshape(batch, channels, height // group_size, group_size, width // group_size, group_size)


def soft_threshold_linearisation(displacement: Tensor) -> PenaltyLinearisation:
    """The L1 penalty's linearisation at a Sparse MoreauGrad solution: the support `d != 0`, no curvature.

    Example:
        >>> soft_threshold_linearisation(torch.tensor([[[[0.0, -0.3]]]])).active
        tensor([[[[False,  True]]]])
    """
    return PenaltyLinearisation(active=displacement != 0)


def group_soft_threshold_linearisation(displacement: Tensor, eta: float, group_size: int) -> PenaltyLinearisation:
    """The group norm's linearisation at a Group-Sparse MoreauGrad solution: the kept (non-zero) groups and the
    curvature `Q = (eta / ||d_G||) (I - d^_G d^_G^T)` on each.

    Args:
        displacement: `(B, C, H, W)` solution `d`.
        eta: the group-norm coefficient.
        group_size: the groups' side; must divide `H` and `W`.
    """
    check_group_size(displacement.shape, group_size)
    blocks = _blocks(displacement, group_size)
    norms = torch.linalg.vector_norm(blocks, dim=(1, 3, 5), keepdim=True)
    kept = norms > 0
    safe_norms = torch.where(kept, norms, torch.ones_like(norms))
    directions = torch.where(kept, blocks / safe_norms, torch.zeros_like(blocks)).reshape(displacement.shape)
    active = kept.expand_as(blocks).reshape(displacement.shape)
    scale = torch.where(kept, eta / safe_norms, torch.zeros_like(norms))
    return PenaltyLinearisation(active=active, group_size=group_size, curvature_scale=scale, directions=directions)


@dataclass(frozen=True)
class ConjugateGradientResult:
    """What `conjugate_gradient` returns.

    Attributes:
        solution: `(B, ...)` the solution `u` of `K u = b` per sample.
        companion: `(B, ...)` the companion map `L u` at the solution.
        iterations: `(B,)` long CPU tensor, the operator products each sample took.
        converged: `(B,)` bool CPU tensor, whether the sample's residual reached `tol * ||b||`.
    """

    solution: Tensor
    companion: Tensor
    iterations: Tensor
    converged: Tensor


def conjugate_gradient(
    apply: LinearOperator, rhs: Tensor, *, tol: float, max_iterations: int
) -> ConjugateGradientResult:
    """Solve `K_i u_i = b_i` for every sample `i` by conjugate gradients, batched, each sample stopping on its own.

    `K_i` must be symmetric positive (semi-)definite. Sample `i` stops when `||b_i - K_i u_i|| <= tol * ||b_i||`
    (a zero right-hand side takes no product), when `max_iterations` products are spent, or when a search direction
    has non-positive curvature `p^T K p <= 0` (then `K_i` is not positive definite and the iterate so far is kept).
    Only the samples still running are passed to `apply`.

    Args:
        apply: `apply(vectors, samples) -> (K vectors, L vectors)` for the selected samples (`samples` a long
            tensor of batch indices on the vectors' device).
        rhs: `(B, ...)` right-hand sides `b`.
        tol: relative residual tolerance, > 0.
        max_iterations: the most products per sample, >= 1.

    Example:
        >>> K = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> result = conjugate_gradient(lambda v, s: (v @ K, v), torch.tensor([[1.0, 2.0]]), tol=1e-6,
        ...                             max_iterations=10)
        >>> result.solution, result.iterations       # K^-1 b = (0.2, 0.6) in 2 steps
        (tensor([[0.2000, 0.6000]]), tensor([2]))
    """
    batch = rhs.shape[0]
    flat = rhs.flatten(1)
    solution = torch.zeros_like(flat)
    companion = torch.zeros_like(flat)
    residual = flat.clone()
    direction = flat.clone()
    squared = (residual * residual).sum(1)
    threshold = (tol**2) * squared
    iterations = torch.zeros(batch, dtype=torch.long)
    converged = (squared == 0).cpu()
    running = (~converged).nonzero().flatten().to(rhs.device)
    for _ in range(max_iterations):
        if running.numel() == 0:
            break
        p = direction[running]
        product, mapped = apply(p.view(-1, *rhs.shape[1:]), running)
        product, mapped = product.flatten(1), mapped.flatten(1)
        iterations[running.cpu()] += 1
        curvature = (p * product).sum(1)
        positive = curvature > 0
        alpha = torch.where(positive, squared[running] / torch.where(positive, curvature, 1.0), 0.0).unsqueeze(1)
        solution[running] += alpha * p
        companion[running] += alpha * mapped
        residual[running] -= alpha * product
        new_squared = (residual[running] ** 2).sum(1)
        done = new_squared <= threshold[running]
        beta = (new_squared / squared[running].clamp_min(torch.finfo(flat.dtype).tiny)).unsqueeze(1)
        direction[running] = residual[running] + beta * p
        squared[running] = new_squared
        converged[running[done].cpu()] = True
        running = running[positive & ~done]
    return ConjugateGradientResult(solution.view_as(rhs), companion.view_as(rhs), iterations, converged)


class _ImplicitSystem:
    """The linearised fixed point of one MoreauGrad solve, and its vector-Jacobian product (module docstring)."""

    def __init__(
        self,
        explainer: Explainer,
        points: Tensor,
        target: Tensor,
        seeds: Tensor | None,
        linearisation: PenaltyLinearisation,
        gradient_evaluations: Tensor,
    ) -> None:
        self.explainer = explainer
        self.points = points
        self.target = target
        self.seeds = seeds
        self.linearisation = linearisation
        self.gradient_evaluations = gradient_evaluations

    def vector_jacobian_product(self, vectors: Tensor) -> Tensor:
        explainer = self.explainer
        rho = explainer.rho
        operator = HessianOperator(
            ClassScore(explainer.model, explainer.score, self.target),
            self.points,
            internal_batch_size=explainer.internal_batch_size,
            noise_std=explainer.noise_std,
            noise_samples=explainer.graph_noise_samples or explainer.noise_samples,
            seeds=self.seeds,
        )
        linearisation = self.linearisation

        def apply(directions: Tensor, samples: Tensor) -> tuple[Tensor, Tensor]:
            _, hessian_product = operator(directions, samples)
            product = directions + rho * linearisation.mask(hessian_product, samples)
            curvature = linearisation.curvature(directions, samples)
            if curvature is not None:
                product = product + rho * curvature
            return product, hessian_product

        everyone = torch.arange(vectors.shape[0], device=vectors.device)
        rhs = linearisation.mask(vectors.detach(), everyone)
        result = conjugate_gradient(apply, rhs, tol=explainer.graph_tol, max_iterations=explainer.graph_max_iter)
        self.gradient_evaluations += operator.sample_gradient_evaluations
        if not result.converged.all():
            late = (~result.converged).nonzero().flatten().tolist()
            warnings.warn(
                f"{type(explainer).__name__} (graph='exact'): conjugate gradients stopped before the residual "
                f"reached graph_tol={explainer.graph_tol} for samples {late[:10]}{' ...' if len(late) > 10 else ''} "
                f"(graph_max_iter={explainer.graph_max_iter} reached, or I + rho H not positive definite at the "
                "solution: an unconverged solve or rho above 1 / lambda); their map gradients are approximate. "
                "Raise graph_max_iter or num_steps.",
                stacklevel=2,
            )
        return result.companion


class _ExactMoreauMap(torch.autograd.Function):
    """`A = -d / rho` as a function of the inputs: the forward returns the solved map, the backward the implicit
    vector-Jacobian product."""

    @staticmethod
    def forward(ctx, inputs: Tensor, displacement: Tensor, system: _ImplicitSystem) -> Tensor:
        ctx.system = system
        return -displacement / system.explainer.rho

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None]:
        return ctx.system.vector_jacobian_product(grad_output), None, None


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


def exact_moreau_map(
    explainer: Explainer,
    inputs: Tensor,
    displacement: Tensor,
    target: Tensor,
    seeds: Tensor | None = None,
    gradient_evaluations: Tensor | None = None,
) -> Tensor:
    """The MoreauGrad map `-d / rho` of a solved displacement, differentiable with respect to `inputs` exactly.

    The value is the solver's map; its backward pass is the implicit derivative of the fixed point (module
    docstring), solved by conjugate gradients on Hessian-vector products at `z* = x + d` with the explainer's
    `graph_tol` and `graph_max_iter`, the penalty's linearisation from `explainer._penalty_linearisation(d)`, and in
    regularised mode the Hessian averaged over the sample's first `graph_noise_samples` (default `noise_samples`)
    draws from `seeds`. The map can
    be differentiated once (no double backward); `inputs` may carry a graph of their own, through which the
    gradient flows on.

    Args:
        explainer: the MoreauGrad-family explainer that solved `d` (its model, score, `rho`, noise, chunking and
            `graph_*` settings are used).
        inputs: `(B, C, H, W)` images; the map is differentiable with respect to them (a detached copy is used when
            they do not require grad).
        displacement: `(B, C, H, W)` solution `d = z* - x` at `inputs`.
        target: `(B,)` long tensor of explained classes.
        seeds: `(B,)` seeds of the solve (needed in regularised mode).
        gradient_evaluations: a `(B,)` long CPU tensor to which the backward pass adds, in place, each sample's
            Hessian-vector-product cost (2 per model input row per product) when it runs; `None` to not count.

    Example:
        >>> explainer = MoreauGrad(model, noise_std=0.0, graph="exact")
        >>> x = images.clone().requires_grad_(True)
        >>> attribution = explainer.attribute(x, target, create_graph=True)    # exact_moreau_map inside
        >>> (gradient,) = torch.autograd.grad((attribution * v).sum(), x)       # v^T dA/dx
    """
    if displacement.shape != inputs.shape:
        raise ValueError(
            f"displacement must be shaped like inputs {tuple(inputs.shape)}, got {tuple(displacement.shape)}."
        )
    displacement = displacement.detach()
    if gradient_evaluations is None:
        gradient_evaluations = torch.zeros(inputs.shape[0], dtype=torch.long)
    system = _ImplicitSystem(
        explainer,
        inputs.detach() + displacement,
        target,
        seeds,
        explainer._penalty_linearisation(displacement),
        gradient_evaluations,
    )
    return _ExactMoreauMap.apply(graph_inputs(inputs), displacement, system)
