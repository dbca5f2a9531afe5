"""What every explainer shares: the base class, its result `Explanation`, the class score `f_c` and per-sample noise.

Conventions (docs/reference/semantics.md sections 1-2): inputs are `(B, C, H, W)` images in [0, 1]; `target` holds one class per
sample; noisy methods draw sample `i`'s noise only from `seeds[i]`, so a sample's map does not depend on
its batch, its position in it, the chunk size (`mglightning.explainers.batching`) or the device.
"""

from __future__ import annotations

import abc
import inspect
import warnings
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import Tensor, nn

from mglightning.checks import check_autograd, check_choice, check_inputs, format_seeds, format_target
from mglightning.explainers.batching import chunk_ranges, probing, resolve_internal_batch_size
from mglightning.random import Stream, normal

SCORES = ("logit", "log_softmax", "softmax")

# Layers whose training-mode output depends on the rest of the batch or on random draws.
_BATCH_DEPENDENT = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


class ClassScore:
    """The score `f_c` of each sample's target class, evaluated on rows that each belong to one sample.

    Args:
        model: classifier returning `(N, num_classes)` logits.
        score: `logit`, `log_softmax` or `softmax` (docs/reference/semantics.md section 1).
        target: `(B,)` long tensor, one class per sample.

    Example:
        >>> objective = ClassScore(model, "logit", torch.tensor([3, 1]))
        >>> gradient = objective.gradient(images)            # (2, C, H, W)
    """

    def __init__(self, model: nn.Module, score: str, target: Tensor) -> None:
        self.model = model
        self.score = score
        self.target = target
        self._max_target = int(target.max())

    def select(self, logits: Tensor, sample_index: Tensor | None = None, score: str | None = None) -> Tensor:
        """Pick row `r`'s score of class `target[sample_index[r]]` from `(N, num_classes)` logits."""
        check_scores_shape(logits, self._max_target)
        score = score or self.score
        if score == "log_softmax":
            logits = torch.log_softmax(logits, dim=1)
        elif score == "softmax":
            logits = torch.softmax(logits, dim=1)
        target = self.target if sample_index is None else self.target[sample_index]
        return logits.gather(1, target.unsqueeze(1)).squeeze(1)

    def __call__(self, points: Tensor, sample_index: Tensor | None = None) -> Tensor:
        """`f_c(points)`: one score per row; row `r` belongs to sample `sample_index[r]` (default: `r`)."""
        return self.select(self.model(points), sample_index)

    def gradient(self, points: Tensor, sample_index: Tensor | None = None, create_graph: bool = False) -> Tensor:
        """`grad f_c(points)` row by row (samples are independent, so the gradient of the sum is per row).

        With `create_graph=False` the points are detached first and no graph survives the call; with
        `create_graph=True` they must require grad and the result can be differentiated through them.
        """
        if not create_graph:
            points = points.detach().requires_grad_(True)
        scores = self(points, sample_index)
        (gradient,) = torch.autograd.grad(
            scores.sum(), points, create_graph=create_graph, allow_unused=True, materialize_grads=True
        )
        return gradient


@dataclass(frozen=True)
class Explanation:
    """What one `Explainer.explain` call returns; methods with more to report return a subclass
    (`MoreauExplanation`, `CASOExplanation`).

    Attributes:
        attribution: the signed map, shaped like the inputs (what `attribute` returns).
        gradient_evaluations: `(B,)` long CPU tensor, the model input rows of each sample that the call sent
            through a forward+backward (a Hessian-vector product counts 2). Its sum is the call's total.
        solution: the solver's state at the answer, for methods with a solver (`supports_initial`): pass it as
            `initial=` to a call at nearby inputs (same seeds) to warm-start it. The MoreauGrad family's is the
            displacement `d = z* - x`, detached. `None` for methods without one.
    """

    attribution: Tensor
    gradient_evaluations: Tensor
    solution: Tensor | None = None


def sample_counts(batch: int, per_sample: int) -> Tensor:
    """`Explanation.gradient_evaluations` of a call that sent `per_sample` model input rows of each of its `batch`
    samples through a forward+backward: a `(B,)` long CPU tensor.

    Example:
        >>> sample_counts(4, 50)     # e.g. SmoothGrad with nt_samples=50
        tensor([50, 50, 50, 50])
    """
    return torch.full((batch,), per_sample, dtype=torch.long)


class Explainer(abc.ABC):
    """Base class of the explainers, in Captum's shape: settings in the constructor, the batch in `attribute`.

    Subclasses set the class attributes and implement `_explain`, their one hook; `explain` (and `attribute`,
    its map) validates the call and leaves `inputs`, all `.grad`s and the model's train/eval mode as they were.

    Class attributes:
        name: the registry name (`build_explainer(name, ...)`).
        display_name: the name shown in tables and figures (e.g. "Sparse MoreauGrad").
        family: the kind of method: `gradient`, `smoothing`, `propagation`, `perturbation`, `moreaugrad` or
            `second_order` (figures highlight the `moreaugrad` family).
        supports_create_graph: whether `attribute(..., create_graph=True)` is available.
        surrogate: `"self"` when it is, otherwise the registry name of the method whose differentiable map
            an interpretation attack uses instead (docs/reference/semantics.md section 5).
        supports_initial: whether the method has a solver that `explain(..., initial=...)` can warm-start.

    Args:
        model: classifier taking `(B, C, H, W)` images in [0, 1] and returning `(B, num_classes)` logits.
            Put it in eval mode first: batch norm in training mode makes a sample's map depend on its batch.
        score: the class score explained: `logit` (default), `log_softmax` or `softmax`.
    """

    name: ClassVar[str]
    display_name: ClassVar[str]
    family: ClassVar[str]
    supports_create_graph: ClassVar[bool] = True
    surrogate: ClassVar[str] = "self"
    supports_initial: ClassVar[bool] = False

    def __init__(self, model: nn.Module, score: str = "logit") -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"{type(self).__name__}: model must be a torch.nn.Module, got {type(model).__name__}.")
        check_choice(type(self).__name__, "score", score, SCORES)
        self.model = model
        self.score = score

    @property
    def uses_noise(self) -> bool:
        """Whether the method draws random numbers (and so uses `seeds`)."""
        return False

    def check_input_shape(self, shape: torch.Size) -> None:
        """Raise a `ValueError` when the settings cannot work on images of `shape` `(B, C, H, W)` (e.g. a
        `group_size` that does not divide the image); `attribute` calls it, an evaluation calls it before its
        first batch. Nothing to check by default."""

    def attribute(
        self,
        inputs: Tensor,
        target: int | Tensor,
        *,
        seeds: Tensor | None = None,
        create_graph: bool = False,
        initial: Tensor | None = None,
    ) -> Tensor:
        """Attribute each sample's class score to its input pixels.

        Args:
            inputs: `(B, C, H, W)` float images, of the floating dtype of the model's parameters (float64 images
                for a float32 model are refused with an error, not cast).
            target: the class explained: an int for all samples, or one integer class per sample in a tensor or
                numpy array of any shape that squeezes to `(B,)` (e.g. `(B,)` or `(B, 1)`).
            seeds: `(B,)` integer tensor, sample `i`'s noise comes only from `seeds[i]`; `None` draws one
                seed per sample from torch's global RNG (so `torch.manual_seed` reproduces the maps).
                Methods without noise check its length and ignore it.
            create_graph: return a map that can be differentiated with respect to `inputs` (for the
                interpretation attack); methods with `supports_create_graph = False` raise a `ValueError`.
            initial: a warm start for methods with a solver (`supports_initial`): the `solution` of an `explain`
                call at nearby inputs with the same seeds. Methods without a solver refuse it.

        Returns:
            A signed tensor shaped like `inputs`.
        """
        return self.explain(inputs, target, seeds=seeds, create_graph=create_graph, initial=initial).attribution

    def explain(
        self,
        inputs: Tensor,
        target: int | Tensor,
        *,
        seeds: Tensor | None = None,
        create_graph: bool = False,
        initial: Tensor | None = None,
    ) -> Explanation:
        """`attribute`, returning the map with its cost and the solver's state (`Explanation`).

        Takes the same arguments as `attribute`.

        Example:
            >>> explanation = MoreauGrad(model).explain(images, target, seeds=seeds)
            >>> nearby = MoreauGrad(model).explain(images + 1e-3, target, seeds=seeds, initial=explanation.solution)
        """
        if create_graph and not self.supports_create_graph:
            raise ValueError(
                f"{type(self).__name__} cannot return a differentiable map (create_graph=True); "
                f"differentiate its declared surrogate {self.surrogate!r} instead "
                f"(build_explainer({self.surrogate!r}, model))."
            )
        check_inputs(inputs, self.model)
        self.check_input_shape(inputs.shape)
        target = format_target(target, inputs)
        seeds = format_seeds(seeds, inputs.shape[0])
        initial = self._format_initial(initial, inputs)
        if self.uses_noise and seeds is None:
            seeds = torch.randint(0, 2**62, (inputs.shape[0],), dtype=torch.long)
        check_autograd(type(self).__name__)
        if any(module.training and isinstance(module, _BATCH_DEPENDENT) for module in self.model.modules()):
            warnings.warn(
                f"{type(self).__name__}: the model has batch norm or dropout layers in training mode, which make "
                "each map depend on its batch and the noise of the forward pass; call model.eval() first.",
                stacklevel=3,
            )
        # The first forward pass of the call checks the model's scores (no extra model evaluation).
        handle = self.model.register_forward_hook(_FiniteScoresCheck(self.model))
        try:
            with torch.enable_grad():
                return self._explain(inputs, target, seeds, create_graph, initial)
        finally:
            handle.remove()

    def _format_initial(self, initial: Tensor | None, inputs: Tensor) -> Tensor | None:
        """`initial` checked against the inputs and moved to their device and dtype (`None` stays `None`)."""
        if initial is None:
            return None
        owner = type(self).__name__
        if not self.supports_initial:
            raise ValueError(f"{owner} has no solver to warm-start; call it without initial=.")
        if not isinstance(initial, Tensor) or initial.shape != inputs.shape:
            shape = tuple(initial.shape) if isinstance(initial, Tensor) else type(initial).__name__
            raise ValueError(
                f"{owner}: initial must be shaped like inputs {tuple(inputs.shape)} (the solution of an explain "
                f"call on a batch of the same shape, Explanation.solution), got {shape}."
            )
        if not initial.is_floating_point() or not torch.isfinite(initial).all():
            raise ValueError(f"{owner}: initial must be a finite floating tensor.")
        return initial.detach().to(device=inputs.device, dtype=inputs.dtype)

    @abc.abstractmethod
    def _explain(
        self, inputs: Tensor, target: Tensor, seeds: Tensor | None, create_graph: bool, initial: Tensor | None
    ) -> Explanation:
        """The method itself, on validated arguments: `target` a `(B,)` long tensor, `seeds` set when noisy,
        `initial` a checked warm start (always `None` without `supports_initial`)."""

    def _objective(self, target: Tensor) -> ClassScore:
        return ClassScore(self.model, self.score, target)

    def _rows_per_pass(
        self, fn: Callable[[Tensor, Tensor], Tensor], inputs: Tensor, passes: float = 2.0
    ) -> int | None:
        """This call's chunk size: the method's `internal_batch_size`, `"auto"` resolved for `inputs`' device
        (`resolve_internal_batch_size`; the probe's measurement is kept for later calls)."""
        cache = self.__dict__.setdefault("_saved_bytes_per_row", {})
        return resolve_internal_batch_size(self.internal_batch_size, fn, inputs, passes=passes, cache=cache)

    @classmethod
    def setting_parameters(cls) -> dict[str, inspect.Parameter]:
        """The constructor's settings (everything but `model`), in order, as `inspect.Parameter`s.

        A constructor that passes `**settings` on to its parent's (`super().__init__(model, **settings)`) takes
        the parent's settings too: the parent's come first, then its own (LightningCLI reads the same settings).
        """
        constructors = []  # from the class down to the first constructor that passes nothing on
        for owner in cls.__mro__:
            if "__init__" in vars(owner):
                constructors.append(inspect.signature(owner.__init__).parameters)
                if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in constructors[-1].values()):
                    break
        return {
            name: parameter
            for parameters in reversed(constructors)
            for name, parameter in parameters.items()
            if name not in ("self", "model") and parameter.kind is not inspect.Parameter.VAR_KEYWORD
        }

    @classmethod
    def settings(cls) -> dict[str, object]:
        """The constructor's settings (everything but `model`) with their defaults."""
        return {name: parameter.default for name, parameter in cls.setting_parameters().items()}

    def __repr__(self) -> str:
        values = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.settings())
        return f"{type(self).__name__}({values})"


class NonFiniteScoresError(ValueError):
    """The model returned NaN or infinite scores: the model (or its checkpoint) is broken, not the explainer."""


class _FiniteScoresCheck:
    """Forward hook that checks the model's first output of an `attribute` call for NaN/inf, then goes quiet."""

    def __init__(self, model: nn.Module) -> None:
        self.model_name = type(model).__name__
        self.done = False

    def __call__(self, module: nn.Module, args: tuple, output: object) -> None:
        if self.done or not isinstance(output, Tensor) or probing.get():
            return
        self.done = True
        check_finite_scores(output.detach(), self.model_name)


def check_finite_scores(scores: Tensor, model_name: str) -> None:
    """Raise `NonFiniteScoresError` naming the model when `scores` holds NaN or infinite values."""
    finite = torch.isfinite(scores)
    if not finite.all():
        bad = (~finite).flatten(1).any(dim=1).nonzero().flatten().tolist() if scores.ndim > 1 else []
        raise NonFiniteScoresError(
            f"The model {model_name} returned NaN or infinite scores (rows {bad[:10]}{' ...' if len(bad) > 10 else ''} "
            "of its input). The model or its checkpoint is broken (e.g. diverged training, wrong weights, inputs "
            "outside what it was trained on); no attribution of these scores is meaningful."
        )


def check_scores_shape(logits: Tensor, max_target: int) -> None:
    """Raise a `ValueError` unless `logits` is `(N, num_classes)` with `max_target < num_classes`."""
    if logits.ndim != 2:
        raise ValueError(f"The model must return (N, num_classes) scores, got shape {tuple(logits.shape)}.")
    if max_target >= logits.shape[1]:
        raise ValueError(f"target {max_target} is out of range for a model with {logits.shape[1]} classes.")


def graph_inputs(inputs: Tensor) -> Tensor:
    """The tensor to build a differentiable map on: `inputs` itself when it requires grad (so the map is
    differentiable with respect to it), otherwise a detached copy that does (`inputs` is never modified)."""
    return inputs if inputs.requires_grad else inputs.detach().requires_grad_(True)


def sum_noisy_gradients(
    objective: ClassScore,
    points: Tensor,
    sample_ids: Tensor,
    *,
    seeds: Tensor | None,
    copies: int,
    std: float,
    chunk_size: int | None,
    step: int = 0,
    create_graph: bool = False,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """`sum_j transform(grad f_c(points[p] + n_pj))` for every point `p`, over `copies` noise draws.

    The noise of point `p`'s copy `j` is `std * normal(seeds[sample_ids[p]], stream=Stream.NOISE, step=step,
    copy_index=j)` (`mglightning.random`), drawn on the points' device chunk by chunk: it depends on the sample's
    seed, the step and the copy only, not on the other points or the chunks. The `len(points) * copies` model
    inputs are evaluated in chunks of at most `chunk_size` rows. Without `seeds` no noise is added (`copies` must
    then be 1): plain, chunked gradients.

    Args:
        objective: the class score; row `r` uses the target of sample `sample_ids[p]`.
        points: `(P, C, H, W)` points, one per sample taking part.
        sample_ids: `(P,)` long tensor on the points' device: the sample (index into the batch) of each point.
        seeds: the batch's `(B,)` seeds (moved to the points' device if elsewhere: keep them there across
            steps), or `None` for no noise.
        copies: noise draws per point.
        std: noise standard deviation.
        chunk_size: the most model inputs per forward/backward (`None`: all at once).
        step: the solver step, which selects fresh noise (default 0).
        create_graph: keep the graph so the result is differentiable with respect to `points`.
        transform: optional function applied to each chunk of per-row gradients before summing.
    """
    if seeds is None and copies != 1:
        raise ValueError("Noise-free gradients take exactly one copy per point.")
    if seeds is None and (chunk_size is None or points.shape[0] <= chunk_size):
        # One chunk of the points themselves: skip the gather and scatter (the plain solver's every step).
        gradients = objective.gradient(points, sample_ids, create_graph=create_graph)
        return gradients if transform is None else transform(gradients)
    if seeds is not None:
        seeds = seeds.to(points.device)
    total = torch.zeros_like(points)
    for start, stop in chunk_ranges(points.shape[0] * copies, chunk_size):
        row_index = torch.arange(start, stop, device=points.device)
        point_index = row_index // copies
        rows = points[point_index]
        if seeds is not None:
            noise = normal(
                seeds[sample_ids[point_index]], points.shape[1:], stream=Stream.NOISE, step=step,
                copy_index=row_index % copies, dtype=points.dtype,
            )
            rows = rows + noise.mul_(std)
        gradients = objective.gradient(rows, sample_ids[point_index], create_graph=create_graph)
        if transform is not None:
            gradients = transform(gradients)
        total = total.index_add(0, point_index, gradients)
    return total

