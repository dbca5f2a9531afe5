"""Per-sample Hessians of a per-sample scalar function, without ever forming them (CASO, convexity diagnostics).

The functions here work on a batch of points and a function `fn(points, sample_index) -> (N,)` that gives one
scalar per row, where row `r` belongs to sample `sample_index[r]` (the signature of `ClassScore` and
`ClassCrossEntropy`). Rows are independent, so the Hessian of `fn(points).sum()` is block-diagonal and one double
backpropagation gives every row's own Hessian-vector product `H_r v_r`.

Cost unit: a gradient evaluation is one model input row through a forward+backward; a Hessian-vector product
(a forward, a backward that keeps its graph and a backward through it) counts as **2**.

Eigenvalues come from power iteration on Hessian-vector products, as in the CASO reference code
(`singlasahil14/CASO`, `explainers.py`, `_power_eigen`): that code returns the Rayleigh quotient of plain power
iteration, which converges to the eigenvalue of largest *magnitude* (with its sign). For the cross-entropy of a
piecewise-linear (ReLU) network the Hessian `W^T (diag(p) - p p^T) W` is positive semi-definite, so that is also
the algebraically largest eigenvalue, the `sigma_max` the reference adds to `lambda2` to make its objective
concave. Softplus networks have indefinite Hessians, so `largest_eigenvalue` returns the **algebraically
largest** eigenvalue: when the dominant eigenvalue `d` comes out negative it runs a second power iteration on the
shifted operator `H - d I` (spectrum `[0, lambda_max - d]`) and adds `d` back. `smallest_eigenvalue` does the
mirror image (shift by a positive dominant eigenvalue). Power iteration converges at the rate
`|lambda_2 / lambda_1|^k` of the operator it runs on: give close eigenvalues more iterations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from mglightning.checks import check_internal_batch_size, check_number, check_positive_int, format_seeds
from mglightning.explainers.base import ClassScore
from mglightning.explainers.batching import InternalBatchSize, chunk_ranges, resolve_internal_batch_size
from mglightning.random import Stream, normal, uniform

ScalarFunction = Callable[[Tensor, Tensor], Tensor]
"""`fn(points, sample_index) -> (N,)`: one scalar per row; row `r` belongs to sample `sample_index[r]`."""


class ClassCrossEntropy(ClassScore):
    """The cross-entropy loss of each sample's target class, `l(x) = -log softmax(model(x))[c]`, per row.

    Args:
        model: classifier returning `(N, num_classes)` logits.
        target: `(B,)` long tensor, one class per sample.

    Example:
        >>> loss = ClassCrossEntropy(model, torch.tensor([3, 1]))
        >>> loss(images)                      # (2,) per-sample cross-entropies
    """

    def __init__(self, model: nn.Module, target: Tensor) -> None:
        super().__init__(model, "log_softmax", target)

    def __call__(self, points: Tensor, sample_index: Tensor | None = None) -> Tensor:
        return -super().__call__(points, sample_index)


def hessian_vector_product(
    fn: ScalarFunction, points: Tensor, vectors: Tensor, sample_index: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Each row's gradient `grad fn_r(points_r)` and Hessian-vector product `H_r vectors_r` by double backprop.

    `H_r` is never formed. The rows are evaluated in one pass; chunking is `HessianOperator`'s job.

    Args:
        fn: `fn(points, sample_index) -> (N,)`, one scalar per row (e.g. a `ClassScore`).
        points: `(N, ...)` points.
        vectors: the `(N, ...)` directions, one per row.
        sample_index: `(N,)` long tensor mapping rows to samples, passed to `fn` (default: `arange(N)`).

    Returns:
        `(gradient, hvp)`, both shaped like `points`, detached.

    Example:
        >>> objective = ClassScore(model, "logit", labels)
        >>> gradient, hvp = hessian_vector_product(objective, images, torch.randn_like(images))
    """
    if vectors.shape != points.shape:
        raise ValueError(f"vectors must be shaped like points {tuple(points.shape)}, got {tuple(vectors.shape)}.")
    if sample_index is None:
        sample_index = torch.arange(points.shape[0], device=points.device)
    with torch.enable_grad():
        points = points.detach().requires_grad_(True)
        values = fn(points, sample_index)
        if values.shape != points.shape[:1]:
            raise ValueError(
                f"fn must return one scalar per row, shape ({points.shape[0]},), got {tuple(values.shape)}."
            )
        (gradient,) = torch.autograd.grad(
            values.sum(), points, create_graph=True, allow_unused=True, materialize_grads=True
        )
        if not gradient.requires_grad:  # fn is (locally) linear in the points: its Hessian is zero
            return gradient.detach(), torch.zeros_like(gradient)
        (hvp,) = torch.autograd.grad(
            gradient, points, grad_outputs=vectors.detach(), allow_unused=True, materialize_grads=True
        )
    return gradient.detach(), hvp


@dataclass
class EigenEstimate:
    """An eigenvalue estimate per sample.

    Attributes:
        values: `(B,)` eigenvalue estimates (Rayleigh quotients of the last power-iteration vector).
        vectors: `(B, ...)` unit-norm eigenvector estimates.
        sample_gradient_evaluations: `(B,)` long CPU tensor, the gradient evaluations each sample used (an HVP
            counts 2 per model input row).
    """

    values: Tensor
    vectors: Tensor
    sample_gradient_evaluations: Tensor

    @property
    def gradient_evaluations(self) -> int:
        """Total gradient evaluations (model input rows through a forward+backward) of the estimate."""
        return int(self.sample_gradient_evaluations.sum())


class HessianOperator:
    """`v -> H_i v_i` for every sample `i`, with `H_i` the Hessian of `fn` at `points[i]`, or its mean over seeded
    noisy copies `points[i] + n_ij`, `n_ij ~ N(0, noise_std^2 I)`, `j < noise_samples`.

    Sample `i`'s copy `j` is `points[i] + noise_std * normal(seeds[i], stream=Stream.NOISE, step=0,
    copy_index=j)` (`mglightning.random`: `SmoothGrad`'s copies, drawn on the points' device), and every product
    uses the same copies, so the averaged Hessian is one fixed linear operator.

    Memory and work: when all `B * noise_samples` model input rows fit in one chunk (`internal_batch_size`), the
    first product runs the forward pass and the backward pass that keeps its graph once, and every product reuses
    that graph (a product is then one backward pass through the gradient: about 1.5 forward+backward passes in
    wall time instead of about 3). Otherwise every product runs all three passes chunk by chunk, regenerating the
    noise, so no more than `internal_batch_size` rows are ever held. Either way a product is counted as 2
    gradient evaluations per row.

    Attributes:
        sample_gradient_evaluations: `(B,)` long CPU tensor, the gradient evaluations spent on each sample so far
            (2 per model input row of every product that included the sample).

    Args:
        fn: `fn(points, sample_index) -> (N,)`, one scalar per row (e.g. `ClassScore`, `ClassCrossEntropy`).
        points: `(B, ...)` points, one per sample.
        internal_batch_size: the most model input rows per pass; `None` evaluates all at once (default);
            `"auto"` fills the free memory on CUDA (a row planned at 4 times the tensors its forward pass saves)
            and takes 256 elsewhere (`resolve_internal_batch_size`).
        noise_std: standard deviation of the noisy copies; 0 (default) uses the points themselves.
        noise_samples: noisy copies per sample when `noise_std > 0` (default 1).
        seeds: `(B,)` integer tensor, sample `i`'s noise comes from `seeds[i]` only; needed when `noise_std > 0`.

    Example:
        >>> operator = HessianOperator(ClassCrossEntropy(model, labels), images, internal_batch_size=64)
        >>> gradient, hvp = operator(torch.randn_like(images))
        >>> sigma_max = operator.largest_eigenvalue(20, seeds=torch.arange(len(images))).values
    """

    def __init__(
        self,
        fn: ScalarFunction,
        points: Tensor,
        *,
        internal_batch_size: InternalBatchSize = None,
        noise_std: float = 0.0,
        noise_samples: int = 1,
        seeds: Tensor | None = None,
    ) -> None:
        owner = type(self).__name__
        check_internal_batch_size(owner, internal_batch_size)
        check_number(owner, "noise_std", noise_std, positive=False)
        check_positive_int(owner, "noise_samples", noise_samples)
        seeds = format_seeds(seeds, points.shape[0])
        if noise_std > 0 and seeds is None:
            raise ValueError(f"{owner}: noisy copies (noise_std > 0) need seeds, one per sample.")
        self.fn = fn
        self.points = points.detach()
        self.internal_batch_size = resolve_internal_batch_size(internal_batch_size, fn, self.points, passes=4.0)
        self.noise_std = noise_std
        self.copies = noise_samples if noise_std > 0 else 1
        self.seeds = seeds if seeds is None else seeds.to(self.points.device)
        self._evaluations = torch.zeros(points.shape[0], dtype=torch.long, device=self.points.device)
        rows = points.shape[0] * self.copies
        self.reuses_graph = self.internal_batch_size is None or rows <= self.internal_batch_size
        self._gradient: Tensor | None = None
        self._graph: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def sample_gradient_evaluations(self) -> Tensor:
        """`(B,)` long CPU tensor, the gradient evaluations spent on each sample so far."""
        return self._evaluations.cpu()

    def _broadcast(self, values: Tensor) -> Tensor:
        """`(S,)` per-sample values viewed to multiply `(S, ...)` tensors."""
        return values.view(-1, *([1] * (self.points.ndim - 1)))

    def gradient(self) -> Tensor:
        """Every sample's (mean over copies) gradient: a by-product of the products (of the first one when the
        graph is reused, else of the last one with all samples), or of one product with zero vectors."""
        if self._gradient is None:
            self(torch.zeros_like(self.points))
        return self._gradient

    def __call__(self, vectors: Tensor, samples: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The (mean over copies) gradient and Hessian-vector product of the selected samples.

        Args:
            vectors: `(S, ...)` directions, one per selected sample.
            samples: `(S,)` long tensor, which samples (default: all, in order).

        Returns:
            `(gradient, hvp)`, both `(S, ...)`, detached.
        """
        points = self.points if samples is None else self.points[samples]
        if vectors.shape != points.shape:
            raise ValueError(
                f"vectors must be shaped like the selected points {tuple(points.shape)}, got {tuple(vectors.shape)}."
            )
        selected = torch.arange(points.shape[0], device=points.device) if samples is None else samples
        # Counted on the device: a product never waits for it (the count is read once, when asked for).
        self._evaluations.index_add_(0, selected, torch.full_like(selected, 2 * self.copies))
        if self.reuses_graph:
            return self._reused_graph_products(vectors, samples)
        gradient, hvp = self._chunked_products(points, vectors, selected)
        if samples is None:
            self._gradient = gradient
        return gradient, hvp

    def _noisy_rows(self, points: Tensor, samples: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        """`(index, rows)` chunks of the rows `points[index] (+ noise)`, `index` the position in `points`."""
        copies = self.copies
        for start, stop in chunk_ranges(points.shape[0] * copies, self.internal_batch_size):
            row_index = torch.arange(start, stop, device=points.device)
            index = row_index // copies
            rows = points[index]
            if self.noise_std > 0:
                noise = normal(self.seeds[samples[index]], points.shape[1:], stream=Stream.NOISE,
                               copy_index=row_index % copies, dtype=points.dtype)
                rows = rows + noise.mul_(self.noise_std)
            yield index, rows

    def _chunked_products(self, points: Tensor, vectors: Tensor, samples: Tensor) -> tuple[Tensor, Tensor]:
        gradient, hvp = torch.zeros_like(points), torch.zeros_like(points)
        for index, rows in self._noisy_rows(points, samples):
            row_gradient, row_hvp = hessian_vector_product(self.fn, rows, vectors[index], samples[index])
            gradient.index_add_(0, index, row_gradient)
            hvp.index_add_(0, index, row_hvp)
        return gradient / self.copies, hvp / self.copies

    def _reused_graph_products(self, vectors: Tensor, samples: Tensor | None) -> tuple[Tensor, Tensor]:
        if self._graph is None:  # the forward and first backward pass of every row, kept for all products
            samples_all = torch.arange(self.points.shape[0], device=self.points.device)
            ((index, rows),) = self._noisy_rows(self.points, samples_all)
            with torch.enable_grad():
                rows = rows.detach().requires_grad_(True)
                values = self.fn(rows, index)
                if values.shape != rows.shape[:1]:
                    raise ValueError(
                        f"fn must return one scalar per row, shape ({rows.shape[0]},), got {tuple(values.shape)}."
                    )
                (row_gradient,) = torch.autograd.grad(
                    values.sum(), rows, create_graph=True, allow_unused=True, materialize_grads=True
                )
            self._graph = (rows, row_gradient, index)
            self._gradient = torch.zeros_like(self.points).index_add_(0, index, row_gradient.detach()) / self.copies
        rows, row_gradient, index = self._graph
        if samples is not None:  # the other samples' rows get zero directions (their products are not needed)
            vectors = torch.zeros_like(self.points).index_copy_(0, samples, vectors)
        if row_gradient.requires_grad:
            (row_hvp,) = torch.autograd.grad(
                row_gradient, rows, grad_outputs=vectors[index].detach(), retain_graph=True, allow_unused=True,
                materialize_grads=True,
            )
        else:  # fn is (locally) linear in the points: its Hessian is zero
            row_hvp = torch.zeros_like(rows)
        hvp = torch.zeros_like(self.points).index_add_(0, index, row_hvp) / self.copies
        if samples is None:
            return self._gradient, hvp
        return self._gradient[samples], hvp[samples]

    def start_vectors(self, seeds: Tensor) -> Tensor:
        """Unit-norm power-iteration starts: sample `i`'s is uniform in `[-0.5, 0.5]` (as the reference's), drawn
        from `seeds[i]` (`Stream.POWER_ITERATION`, on the points' device)."""
        seeds = seeds.to(self.points.device)
        starts = uniform(seeds, self.points.shape[1:], stream=Stream.POWER_ITERATION, dtype=self.points.dtype) - 0.5
        return starts / self._broadcast(torch.linalg.vector_norm(starts.flatten(1), dim=1))

    def power_iteration(
        self, vectors: Tensor, num_iterations: int, samples: Tensor | None = None, shift: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Power iteration on `H_i - shift_i I` from unit `vectors`: the Rayleigh quotients of the last iterates
        (the dominant eigenvalue of the shifted operator, with its sign) and the final unit vectors.

        Args:
            vectors: `(S, ...)` unit-norm starts.
            num_iterations: products with the operator.
            samples: `(S,)` long tensor, which samples (default: all).
            shift: `(S,)` shifts (default: none).
        """
        check_positive_int(type(self).__name__, "num_iterations", num_iterations)
        for _ in range(num_iterations):
            _, product = self(vectors, samples)
            if shift is not None:
                product = product - self._broadcast(shift) * vectors
            values = (vectors * product).flatten(1).sum(1)
            norms = torch.linalg.vector_norm(product.flatten(1), dim=1)
            # A zero product (a zero Hessian) stays zero: its Rayleigh quotient 0 is then exact.
            vectors = product / self._broadcast(norms.clamp_min(torch.finfo(norms.dtype).tiny))
        return values, vectors

    def _extreme(self, num_iterations: int, seeds: Tensor | None, largest: bool) -> EigenEstimate:
        """The algebraically largest (`largest=True`) or smallest eigenvalue per sample (see the module doc)."""
        batch = self.points.shape[0]
        seeds = format_seeds(seeds, batch)
        if seeds is None:
            seeds = torch.randint(0, 2**62, (batch,), dtype=torch.long)
        before = self.sample_gradient_evaluations.clone()
        starts = self.start_vectors(seeds)
        values, vectors = self.power_iteration(starts, num_iterations)
        # Where the dominant eigenvalue has the wrong sign, the wanted one is the dominant one of H - d I.
        wrong = (values < 0) if largest else (values > 0)
        samples = wrong.nonzero().flatten()
        if samples.numel():
            shift = values[samples]
            shifted, shifted_vectors = self.power_iteration(starts[samples], num_iterations, samples, shift)
            values = values.index_copy(0, samples, shifted + shift)
            vectors = vectors.index_copy(0, samples, shifted_vectors)
        return EigenEstimate(values, vectors, self.sample_gradient_evaluations - before)

    def largest_eigenvalue(self, num_iterations: int, seeds: Tensor | None = None) -> EigenEstimate:
        """The algebraically largest eigenvalue of each sample's Hessian (`sigma_max` of CASO), by power iteration.

        Costs `num_iterations` products per sample, twice that for samples whose dominant eigenvalue is negative.

        Args:
            num_iterations: products per power iteration.
            seeds: `(B,)` integer tensor for the starting vectors (`None`: drawn from torch's global RNG).
        """
        return self._extreme(num_iterations, seeds, largest=True)

    def smallest_eigenvalue(self, num_iterations: int, seeds: Tensor | None = None) -> EigenEstimate:
        """The algebraically smallest (most negative) eigenvalue of each sample's Hessian, by power iteration.

        Costs `num_iterations` products per sample, twice that for samples whose dominant eigenvalue is positive.

        Args:
            num_iterations: products per power iteration.
            seeds: `(B,)` integer tensor for the starting vectors (`None`: drawn from torch's global RNG).
        """
        return self._extreme(num_iterations, seeds, largest=False)


def largest_eigenvalue(
    fn: ScalarFunction,
    points: Tensor,
    num_iterations: int = 20,
    seeds: Tensor | None = None,
    *,
    internal_batch_size: InternalBatchSize = None,
) -> EigenEstimate:
    """The algebraically largest eigenvalue of the Hessian of `fn` at each point, by power iteration on HVPs.

    Args:
        fn: `fn(points, sample_index) -> (N,)`, one scalar per row (e.g. `ClassCrossEntropy(model, labels)`).
        points: `(B, ...)` points.
        num_iterations: Hessian-vector products per power iteration (default 20).
        seeds: `(B,)` integer tensor, sample `i`'s starting vector comes from `seeds[i]` only.
        internal_batch_size: the most model input rows per pass (`None`: all at once; `"auto"`: as in
            `HessianOperator`).

    Returns:
        An `EigenEstimate`: `.values` is `(B,)`, `.sample_gradient_evaluations` the cost per sample.

    Example:
        >>> estimate = largest_eigenvalue(ClassCrossEntropy(model, labels), images, 50, seeds=torch.arange(8))
        >>> estimate.values, estimate.gradient_evaluations
    """
    operator = HessianOperator(fn, points, internal_batch_size=internal_batch_size)
    return operator.largest_eigenvalue(num_iterations, seeds)


def smallest_eigenvalue(
    fn: ScalarFunction,
    points: Tensor,
    num_iterations: int = 20,
    seeds: Tensor | None = None,
    *,
    internal_batch_size: InternalBatchSize = None,
) -> EigenEstimate:
    """The algebraically smallest (most negative) eigenvalue of the Hessian of `fn` at each point.

    Power iteration on HVPs; where the dominant eigenvalue `d` is positive, a second one on `H - d I`.
    A negative value measures how far `fn` is from convex there (its weak-convexity constant is `-value`).

    Args:
        fn: `fn(points, sample_index) -> (N,)`, one scalar per row (e.g. `ClassScore(model, "logit", labels)`).
        points: `(B, ...)` points.
        num_iterations: Hessian-vector products per power iteration (default 20).
        seeds: `(B,)` integer tensor, sample `i`'s starting vector comes from `seeds[i]` only.
        internal_batch_size: the most model input rows per pass (`None`: all at once; `"auto"`: as in
            `HessianOperator`).

    Returns:
        An `EigenEstimate`: `.values` is `(B,)`, `.sample_gradient_evaluations` the cost per sample.

    Example:
        >>> estimate = smallest_eigenvalue(ClassScore(model, "logit", labels), images, 50, seeds=torch.arange(8))
        >>> weak_convexity = (-estimate.values).clamp(min=0)
    """
    operator = HessianOperator(fn, points, internal_batch_size=internal_batch_size)
    return operator.smallest_eigenvalue(num_iterations, seeds)
