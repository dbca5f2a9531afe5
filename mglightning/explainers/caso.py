"""CASO and CAFO: interpretation from a quadratic (CASO) or linear (CAFO) model of the loss, with group features.

Singla, Wallace, Feng & Feizi, "Understanding Impacts of High-Order Loss Approximations and Features in Deep
Learning Interpretation", ICML 2019 (reference code: `singlasahil14/CASO`, `explainers.py`). For each sample, with
`l(x) = -log softmax(model(x))[c]` the cross-entropy of the explained class `c`, `g = grad l(x)` and
`H = hess l(x)` (input space, [0, 1] pixel units; the model normalises inside, as in the reference code, so its
`lambda1` and `lambda2` need no conversion):

    delta* = argmax_delta  g^T delta + 1/2 delta^T H delta - lambda2/2 ||delta||_2^2 - lambda1 R(delta)

with `R = ||.||_1`, or the group norm `sum_S ||delta_S||_2` over `group_size x group_size` spatial blocks across
all channels. **Sign**: the map is `delta*` itself, the perturbation that *raises the loss* (lowers the class's
probability) the most; it points against the simple gradient of the class's log-probability, whose sign the
other explainers keep. Metrics and pictures use magnitudes, which the sign does not change.

- **CAFO** drops the Hessian term: `delta* = ST_lambda1(g) / lambda2` (or `GST_lambda1(g) / lambda2`) exactly.
- **CASO** keeps it. The objective is concave only when `lambda2 > lambda_max(H)`, so, as the reference code does,
  `lambda2` is replaced by `lambda2_eff = sigma_max + lambda2`, with `sigma_max` the largest eigenvalue of `H`
  from power iteration on Hessian-vector products (`mglightning.explainers.hessian`; the algebraically largest
  one, also for softplus networks' indefinite Hessians). The problem is solved by FISTA with a backtracking
  line search (prox = soft threshold), `H delta` by double backpropagation: `H` is never formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mglightning.checks import check_internal_batch_size, check_number, check_positive_int
from mglightning.explainers.base import Explainer, Explanation, graph_inputs, sample_counts, sum_noisy_gradients
from mglightning.explainers.batching import InternalBatchSize
from mglightning.explainers.hessian import ClassCrossEntropy, HessianOperator
from mglightning.explainers.prox import check_group_size, group_soft_threshold, soft_threshold

# Halvings of a sample's step before its line search gives up and takes the (then negligible) step anyway;
# only a NaN curvature can get there, since the test always holds for small enough steps.
_MAX_BACKTRACKS = 40


@dataclass(frozen=True)
class CASOExplanation(Explanation):
    """What a `CASO.explain` call returns: the `Explanation` and the curvature it used.

    Attributes:
        sigma_max: `(B,)` CPU tensor, each sample's largest Hessian eigenvalue (power iteration).
        lambda2_effective: `(B,)` CPU tensor, the L2 weight used, `sigma_max + lambda2`.
    """

    sigma_max: Tensor | None = None
    lambda2_effective: Tensor | None = None


class _SecondOrderBase(Explainer):
    """What CASO and CAFO share: the loss, the group-feature prox and the settings checks."""

    family = "second_order"

    def __init__(
        self,
        model: nn.Module,
        lambda1: float,
        lambda2: float,
        group_size: int | None,
        noise_std: float,
        noise_samples: int,
        internal_batch_size: InternalBatchSize,
        score: str,
    ) -> None:
        super().__init__(model, score)
        owner = type(self).__name__
        if score != "log_softmax":
            raise ValueError(
                f"{owner}: score must be 'log_softmax' (its loss is the cross-entropy, minus the log-softmax score), "
                f"got {score!r}."
            )
        check_number(owner, "lambda1", lambda1, positive=False)
        check_number(owner, "lambda2", lambda2)
        if group_size is not None:
            check_positive_int(owner, "group_size", group_size)
        check_number(owner, "noise_std", noise_std, positive=False)
        check_positive_int(owner, "noise_samples", noise_samples)
        check_internal_batch_size(owner, internal_batch_size)
        self.lambda1 = lambda1
        self.lambda2 = lambda2
        self.group_size = group_size
        self.noise_std = noise_std
        self.noise_samples = noise_samples
        self.internal_batch_size = internal_batch_size

    @property
    def copies(self) -> int:
        """Noisy copies per sample (1 without smoothing)."""
        return self.noise_samples if self.noise_std > 0 else 1

    def check_input_shape(self, shape: torch.Size) -> None:
        if self.group_size is not None:
            check_group_size(shape, self.group_size, type(self).__name__)

    def _prox(self, values: Tensor, thresholds: Tensor) -> Tensor:
        """The proximal operator of `thresholds[i] * R` on each sample's `values[i]`.

        Uses `prox_{aR}(v) = a prox_R(v / a)` (R is positively homogeneous), so one call serves per-sample steps.
        """
        if self.lambda1 == 0:
            return values
        scale = thresholds.view(-1, *([1] * (values.ndim - 1)))
        scaled = values / scale
        if self.group_size is None:
            return scale * soft_threshold(scaled, 1.0)
        return scale * group_soft_threshold(scaled, 1.0, self.group_size)


class CAFO(_SecondOrderBase):
    """CAFO (context-aware first order, Singla et al. 2019): `delta* = ST_lambda1(g) / lambda2`, exactly.

    `g` is the gradient of the explained class's cross-entropy (the mean over `noise_samples` seeded noisy
    copies when `noise_std > 0`, drawn as in `SmoothGrad`); with `group_size` the soft threshold is the group
    soft threshold over `group_size x group_size` blocks across channels. The map raises the loss (see the
    module docstring for the sign) and is differentiable (`create_graph=True`) at the cost of one gradient.

    Its `Explanation.gradient_evaluations`: one model input row per noisy copy.

    Args:
        model: classifier taking `(B, C, H, W)` images in [0, 1], in eval mode.
        lambda1: sparsity weight `>= 0` (default 1e-4, the reference's); 0 gives `g / lambda2`.
        lambda2: L2 weight `> 0` (default 4, the reference's).
        group_size: `None` (default) for the elementwise L1 penalty, or the side of the square spatial blocks of
            the group penalty (must divide the image height and width).
        noise_std: smoothing noise in [0, 1] pixel units; 0 (default) is no smoothing, the reference smooths
            with 0.15 (of the image range).
        noise_samples: noisy copies when `noise_std > 0` (default 16, the reference's).
        internal_batch_size: the most model inputs per forward/backward; `"auto"` (default: fill the free
            memory on CUDA, 256 elsewhere) or `None` (all at once).
        score: must be `log_softmax`: the loss is the cross-entropy, minus the log-softmax score (an attack's
            simple-gradient surrogate explains the same score).

    Example:
        >>> attr = CAFO(model, lambda1=1e-3).attribute(images, target=labels)
    """

    name = "cafo"
    display_name = "CAFO"

    def __init__(
        self,
        model: nn.Module,
        lambda1: float = 1e-4,
        lambda2: float = 4.0,
        group_size: int | None = None,
        noise_std: float = 0.0,
        noise_samples: int = 16,
        internal_batch_size: InternalBatchSize = "auto",
        score: str = "log_softmax",
    ) -> None:
        super().__init__(model, lambda1, lambda2, group_size, noise_std, noise_samples, internal_batch_size, score)

    @property
    def uses_noise(self) -> bool:
        return self.noise_std > 0

    def _explain(
        self, inputs: Tensor, target: Tensor, seeds: Tensor | None, create_graph: bool, initial: Tensor | None
    ) -> Explanation:
        points = graph_inputs(inputs) if create_graph else inputs.detach()
        batch = inputs.shape[0]
        loss = ClassCrossEntropy(self.model, target)
        summed = sum_noisy_gradients(
            loss,
            points,
            torch.arange(batch, device=inputs.device),
            seeds=seeds if self.uses_noise else None,
            copies=self.copies,
            std=self.noise_std,
            chunk_size=self._rows_per_pass(loss, inputs),
            create_graph=create_graph,
        )
        thresholds = torch.full((batch,), float(self.lambda1), dtype=inputs.dtype, device=inputs.device)
        attribution = self._prox(summed / self.copies, thresholds) / self.lambda2
        return Explanation(attribution, sample_counts(batch, self.copies))


class CASO(_SecondOrderBase):
    """CASO (context-aware second order, Singla et al. 2019): the maximiser of the loss's quadratic model.

    `delta* = argmax g^T d + d^T H d / 2 - lambda2_eff ||d||^2 / 2 - lambda1 R(d)` with
    `lambda2_eff = sigma_max + lambda2` per sample, `sigma_max` the largest eigenvalue of `H` from
    `power_iterations` Hessian-vector products (power iteration from a start drawn from the sample's seed), and
    `g`, `H` the gradient and Hessian of the explained class's cross-entropy (their means over `noise_samples`
    seeded noisy copies when `noise_std > 0`). Solved for the whole batch at once by `num_steps` FISTA steps
    from `d = 0` (the reference's momentum `(k - 2) / (k + 1)`), each with a per-sample backtracking line search
    that starts at `step_size` and halves the step until the quadratic's sufficient-decrease test holds.
    Beyond the reference code, a sample's reduced step carries over to its next steps (Beck & Teboulle's
    backtracking FISTA; the reference restarts from `step_size`), and `H d` of the momentum point is obtained
    from the previous products by linearity, so a step costs one Hessian-vector product per line-search trial.
    With `lambda1 = 0` and enough steps the map is `(lambda2_eff I - H)^{-1} g`.

    Its map is not differentiable at a reasonable cost (it would take third derivatives through every step), so
    an interpretation attack differentiates the declared surrogate, the simple gradient.

    `explain` returns a `CASOExplanation`: with the map, `sigma_max` and `lambda2_effective` (`sigma_max + lambda2`),
    `(B,)` CPU tensors, and `gradient_evaluations` (model input rows through a forward+backward, a Hessian-vector
    product counted as 2 rows per noisy copy; the gradient comes with the first product).

    Args:
        model: classifier taking `(B, C, H, W)` images in [0, 1], in eval mode.
        lambda1: sparsity weight `>= 0` (default 1e-4, the reference's).
        lambda2: L2 weight `> 0` added to `sigma_max` (default 4, the reference's).
        num_steps: FISTA steps (default 10, the reference's).
        step_size: the line search's first step (default 0.05, the reference's).
        power_iterations: Hessian-vector products of the power iteration (default 10, the reference's); samples
            whose dominant eigenvalue is negative take twice as many (see `mglightning.explainers.hessian`).
        group_size: `None` (default) for the elementwise L1 penalty, or the side of the square spatial blocks of
            the group penalty (must divide the image height and width).
        noise_std: smoothing noise in [0, 1] pixel units; 0 (default) is no smoothing, the reference smooths
            with 0.15 (of the image range).
        noise_samples: noisy copies when `noise_std > 0` (default 16, the reference's).
        internal_batch_size: the most model inputs per pass; `"auto"` (default: fill the free memory on CUDA,
            256 elsewhere; a Hessian-vector product's row is planned at twice a gradient's) or `None` (all at once).
        score: must be `log_softmax`: the loss is the cross-entropy, minus the log-softmax score (the attack's
            simple-gradient surrogate explains the same score).

    Example:
        >>> explainer = CASO(model, lambda1=1e-3, num_steps=20)
        >>> explanation = explainer.explain(images, target=labels, seeds=torch.arange(len(images)))
        >>> explanation.attribution, explanation.sigma_max   # the maps, each sample's largest Hessian eigenvalue
    """

    name = "caso"
    display_name = "CASO"
    supports_create_graph = False
    surrogate = "simple_gradient"

    def __init__(
        self,
        model: nn.Module,
        lambda1: float = 1e-4,
        lambda2: float = 4.0,
        num_steps: int = 10,
        step_size: float = 0.05,
        power_iterations: int = 10,
        group_size: int | None = None,
        noise_std: float = 0.0,
        noise_samples: int = 16,
        internal_batch_size: InternalBatchSize = "auto",
        score: str = "log_softmax",
    ) -> None:
        super().__init__(model, lambda1, lambda2, group_size, noise_std, noise_samples, internal_batch_size, score)
        owner = type(self).__name__
        check_positive_int(owner, "num_steps", num_steps)
        check_number(owner, "step_size", step_size)
        check_positive_int(owner, "power_iterations", power_iterations)
        self.num_steps = num_steps
        self.step_size = step_size
        self.power_iterations = power_iterations

    @property
    def uses_noise(self) -> bool:
        return True  # the power iteration's starting vectors are random even without smoothing

    def _explain(
        self, inputs: Tensor, target: Tensor, seeds: Tensor | None, create_graph: bool, initial: Tensor | None
    ) -> CASOExplanation:
        loss = ClassCrossEntropy(self.model, target)
        operator = HessianOperator(
            loss,
            inputs,
            internal_batch_size=self._rows_per_pass(loss, inputs, passes=4.0),
            noise_std=self.noise_std,
            noise_samples=self.noise_samples,
            seeds=seeds,
        )
        estimate = operator.largest_eigenvalue(self.power_iterations, seeds)
        lambda2_eff = estimate.values + self.lambda2
        delta = self._fista(operator, operator.gradient(), lambda2_eff)
        return CASOExplanation(
            delta,
            operator.sample_gradient_evaluations,
            sigma_max=estimate.values.cpu(),
            lambda2_effective=lambda2_eff.cpu(),
        )

    def _fista(self, operator: HessianOperator, gradient: Tensor, lambda2_eff: Tensor) -> Tensor:
        """Minimise `q(d) + lambda1 R(d)`, `q(d) = -g.d - d.Hd / 2 + lambda2_eff ||d||^2 / 2`, per sample.

        `grad q(d) = lambda2_eff d - g - H d`. The line search accepts a trial `b` from `v` when
        `q(b) <= q(v) + grad q(v).(b - v) + ||b - v||^2 / (2 t)`, which for the quadratic `q` is exactly
        `lambda2_eff ||e||^2 - e.He <= ||e||^2 / t` with `e = b - v`: one product `H e` per trial, and then
        `H b = H v + H e`.
        """
        batch = gradient.shape[0]

        def per_sample(values: Tensor) -> Tensor:
            return values.view(-1, *([1] * (gradient.ndim - 1)))

        delta, h_delta = torch.zeros_like(gradient), torch.zeros_like(gradient)
        previous, h_previous = delta, h_delta
        steps = torch.full((batch,), float(self.step_size), dtype=gradient.dtype, device=gradient.device)
        for k in range(1, self.num_steps + 1):
            momentum = max(k - 2, 0) / (k + 1)
            point = delta + momentum * (delta - previous)
            h_point = h_delta + momentum * (h_delta - h_previous)
            descent = per_sample(lambda2_eff) * point - gradient - h_point  # grad q at the momentum point
            previous, h_previous = delta, h_delta
            delta, h_delta = delta.clone(), h_delta.clone()
            pending = torch.arange(batch, device=gradient.device)
            for trial in range(_MAX_BACKTRACKS + 1):
                t = steps[pending]
                start = point[pending]
                candidate = self._prox(start - per_sample(t) * descent[pending], t * self.lambda1)
                change = candidate - start
                _, h_change = operator(change, pending)
                squared = change.flatten(1).square().sum(1)
                curvature = lambda2_eff[pending] * squared - (change * h_change).flatten(1).sum(1)
                accepted = curvature <= squared / t
                if trial == _MAX_BACKTRACKS:
                    accepted = torch.ones_like(accepted)
                # The trial's one wait for the device: how many samples accepted. A stable sort puts them first,
                # each part in its order, so the rest are selected by slicing instead of masks (a wait each).
                order = torch.argsort((~accepted).to(torch.int8), stable=True)
                count = int(accepted.sum())
                taken, rest = order[:count], order[count:]
                done = pending[taken]
                delta[done] = candidate[taken]
                h_delta[done] = h_point[done] + h_change[taken]
                pending = pending[rest]
                if pending.numel() == 0:
                    break
                steps[pending] = steps[pending] / 2
        return delta
