"""Gradient baselines (docs/reference/semantics.md section 4): simple gradient, integrated gradients, SmoothGrad and Sparsified SmoothGrad."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mglightning.checks import check_internal_batch_size, check_number, check_positive_int, check_share
from mglightning.explainers.base import Explainer, Explanation, graph_inputs, sample_counts, sum_noisy_gradients
from mglightning.explainers.batching import InternalBatchSize, chunk_ranges


class SimpleGradient(Explainer):
    """Simple gradient `grad f_c(x)` (Simonyan et al. 2013; paper eq. 2), Captum's `Saliency(abs=False)`.

    Args:
        model: classifier taking `(B, C, H, W)` images in [0, 1], in eval mode.
        score: `logit` (default), `log_softmax` or `softmax`.

    Example:
        >>> attr = SimpleGradient(model).attribute(images, target=labels)
    """

    name = "simple_gradient"
    display_name = "Simple gradient"
    family = "gradient"

    def _explain(
        self, inputs: Tensor, target: Tensor, seeds: Tensor | None, create_graph: bool, initial: Tensor | None
    ) -> Explanation:
        points = graph_inputs(inputs) if create_graph else inputs
        attribution = self._objective(target).gradient(points, create_graph=create_graph)
        return Explanation(attribution, sample_counts(inputs.shape[0], 1))


class IntegratedGradients(Explainer):
    """Integrated gradients with a zero baseline and a right Riemann sum (Sundararajan et al. 2017; paper eq. 3).

    `IG(x) = x / m * sum_{i=1..m} grad f_c(i/m * x)`, Captum's `IntegratedGradients(method="riemann_right")`.
    The attributions sum to `f_c(x) - f_c(0)` up to the discretisation error (completeness).

    Args:
        model: classifier taking `(B, C, H, W)` images in [0, 1], in eval mode.
        n_steps: `m`, the points on the path from the baseline to the input (default 50).
        internal_batch_size: the most model inputs per forward/backward (the `B * m` path points are
            chunked); `"auto"` (default: fill the free memory on CUDA, 256 elsewhere; see
            `resolve_internal_batch_size`) or `None` (all at once).
        score: `logit` (default), `log_softmax` or `softmax`.

    Example:
        >>> attr = IntegratedGradients(model, n_steps=64).attribute(images, target=labels)
    """

    name = "integrated_gradients"
    display_name = "Integrated gradients"
    family = "gradient"

    def __init__(
        self, model: nn.Module, n_steps: int = 50, internal_batch_size: InternalBatchSize = "auto", score: str = "logit"
    ) -> None:
        super().__init__(model, score)
        check_positive_int(type(self).__name__, "n_steps", n_steps)
        check_internal_batch_size(type(self).__name__, internal_batch_size)
        self.n_steps = n_steps
        self.internal_batch_size = internal_batch_size

    def _explain(
        self, inputs: Tensor, target: Tensor, seeds: Tensor | None, create_graph: bool, initial: Tensor | None
    ) -> Explanation:
        objective = self._objective(target)
        inputs = graph_inputs(inputs) if create_graph else inputs.detach()
        steps = self.n_steps
        summed = torch.zeros_like(inputs)
        chunk_size = self._rows_per_pass(objective, inputs)
        # Rows are (sample, step) pairs, sample-major; row r is the point (r % m + 1) / m * x[r // m].
        for start, stop in chunk_ranges(inputs.shape[0] * steps, chunk_size):
            rows = torch.arange(start, stop, device=inputs.device)
            sample_index = rows // steps
            alphas = ((rows % steps) + 1).to(inputs.dtype) / steps
            points = alphas.view(-1, 1, 1, 1) * inputs[sample_index]
            gradients = objective.gradient(points, sample_index, create_graph=create_graph)
            summed = summed.index_add(0, sample_index, gradients)
        return Explanation(inputs * summed / steps, sample_counts(inputs.shape[0], steps))


class SmoothGrad(Explainer):
    """SmoothGrad (Smilkov et al. 2017): the mean of `grad f_c(x + n_i)` over draws `n_i ~ N(0, stdevs^2 I)`.

    Sample `i`'s copy `j` is `x_i + stdevs * normal(seeds[i], stream=Stream.NOISE, step=0, copy_index=j)`
    (`mglightning.random`, drawn on the inputs' device), the same whatever the batch, the chunks or the device.

    Args:
        model: classifier taking `(B, C, H, W)` images in [0, 1], in eval mode.
        stdevs: noise standard deviation in [0, 1] pixel units (default 0.15, the paper's 10-20% of the range).
        nt_samples: noise draws per sample (default 50).
        internal_batch_size: the most model inputs per forward/backward (the `B * nt_samples` noisy copies
            are chunked); `"auto"` (default: fill the free memory on CUDA, 256 elsewhere) or `None` (all at once).
        score: `logit` (default), `log_softmax` or `softmax`.

    Example:
        >>> attr = SmoothGrad(model, stdevs=0.1).attribute(images, target=labels, seeds=torch.arange(len(images)))
    """

    name = "smoothgrad"
    display_name = "SmoothGrad"
    family = "smoothing"

    def __init__(
        self,
        model: nn.Module,
        stdevs: float = 0.15,
        nt_samples: int = 50,
        internal_batch_size: InternalBatchSize = "auto",
        score: str = "logit",
    ) -> None:
        super().__init__(model, score)
        owner = type(self).__name__
        check_number(owner, "stdevs", stdevs, positive=False)
        check_positive_int(owner, "nt_samples", nt_samples)
        check_internal_batch_size(owner, internal_batch_size)
        self.stdevs = stdevs
        self.nt_samples = nt_samples
        self.internal_batch_size = internal_batch_size

    @property
    def uses_noise(self) -> bool:
        return True

    def _noisy_mean(
        self, inputs: Tensor, target: Tensor, seeds: Tensor, create_graph: bool, transform=None
    ) -> Explanation:
        """The mean of `transform(grad f_c)` over the `nt_samples` noisy copies of each sample."""
        inputs = graph_inputs(inputs) if create_graph else inputs.detach()
        objective = self._objective(target)
        summed = sum_noisy_gradients(
            objective,
            inputs,
            torch.arange(inputs.shape[0], device=inputs.device),
            seeds=seeds,
            copies=self.nt_samples,
            std=self.stdevs,
            chunk_size=self._rows_per_pass(objective, inputs),
            create_graph=create_graph,
            transform=transform,
        )
        return Explanation(summed / self.nt_samples, sample_counts(inputs.shape[0], self.nt_samples))

    def _explain(
        self, inputs: Tensor, target: Tensor, seeds: Tensor | None, create_graph: bool, initial: Tensor | None
    ) -> Explanation:
        return self._noisy_mean(inputs, target, seeds, create_graph)


def sparsify_magnitudes(gradients: Tensor, flatten: float, l0: float) -> Tensor:
    """Levine et al.'s per-copy transform: cap `|g|` at its `flatten`-quantile top value `F`, scale by `1/F`,
    keep the `l0` share of largest entries (ties to the lower flat index) and zero the rest.

    Args:
        gradients: `(N, C, H, W)` gradients, one row per noisy copy.
        flatten: share of `d = C*H*W`; `F` is the `max(1, floor(flatten * d))`-th largest `|g|`.
        l0: share of `d` kept; the `max(1, floor(l0 * d))` largest entries survive.
    """
    magnitudes = gradients.abs().flatten(1)
    size = magnitudes.shape[1]
    cap = magnitudes.topk(max(1, int(flatten * size)), dim=1).values[:, -1:]
    # A zero gradient stays zero instead of becoming 0/0; a NaN gradient stays NaN (never silently zero).
    capped = torch.where(cap == 0, 0.0, torch.minimum(magnitudes, cap) / cap)
    kept = torch.sort(capped, dim=1, descending=True, stable=True).indices[:, : max(1, int(l0 * size))]
    sparse = torch.zeros_like(capped).scatter(1, kept, capped.gather(1, kept))
    return sparse.view_as(gradients)


class SparsifiedSmoothGrad(SmoothGrad):
    """Sparsified SmoothGrad (Levine et al. 2019, "Certifiably robust interpretation in deep learning").

    For each noisy copy `g = |grad f_c(x + n)|` is capped at its `flatten`-share largest value `F`, scaled
    to `min(g, F) / F`, and all but its `l0`-share largest entries are zeroed; the map is the mean over
    copies (non-negative). Its top-k selection is not differentiable, so an attack uses the surrogate
    `simple_gradient`. The noise is drawn as in `SmoothGrad`.

    Args:
        model: classifier taking `(B, C, H, W)` images in [0, 1], in eval mode.
        stdevs: noise standard deviation in [0, 1] pixel units (default 0.1).
        nt_samples: noise draws per sample (default 256, the official comparison).
        flatten: share of entries above which magnitudes are capped (default 0.01).
        l0: share of entries kept per copy (default 0.1).
        internal_batch_size: the most model inputs per forward/backward; `"auto"` (default) or `None` (all at
            once), as in `SmoothGrad`.
        score: `logit` (default), `log_softmax` or `softmax`.

    Example:
        >>> attr = SparsifiedSmoothGrad(model).attribute(images, target=labels)
    """

    name = "sparsified_smoothgrad"
    display_name = "Sparsified SmoothGrad"
    family = "smoothing"
    supports_create_graph = False
    surrogate = "simple_gradient"

    def __init__(
        self,
        model: nn.Module,
        stdevs: float = 0.1,
        nt_samples: int = 256,
        flatten: float = 0.01,
        l0: float = 0.1,
        internal_batch_size: InternalBatchSize = "auto",
        score: str = "logit",
    ) -> None:
        super().__init__(model, stdevs, nt_samples, internal_batch_size, score)
        owner = type(self).__name__
        check_share(owner, "flatten", flatten)
        check_share(owner, "l0", l0)
        self.flatten = flatten
        self.l0 = l0

    def _explain(
        self, inputs: Tensor, target: Tensor, seeds: Tensor | None, create_graph: bool, initial: Tensor | None
    ) -> Explanation:
        return self._noisy_mean(
            inputs, target, seeds, create_graph, transform=lambda g: sparsify_magnitudes(g, self.flatten, self.l0)
        )
