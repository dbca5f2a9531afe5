"""What every explainer shares: the base class, the class score `f_c`, per-sample noise and chunking.

Conventions (docs/reference/semantics.md sections 1-2): inputs are `(B, C, H, W)` images in [0, 1]; `target` holds one class per
sample; noisy methods draw sample `i`'s noise only from `seeds[i]`, so a sample's map does not depend on
its batch, its position in it, the chunk size or the device.
"""

from __future__ import annotations

import abc
import inspect
import math
import warnings
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator, Literal, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

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
    """What one `Explainer.explain` call returns.

    Attributes:
        attribution: the signed map, shaped like the inputs (what `attribute` returns).
        gradient_evaluations: `(B,)` long CPU tensor, the model input rows of each sample that the call sent
            through a forward+backward (a Hessian-vector product counts 2).
        solution: the solver's state at the answer, for methods with a solver (`supports_initial`): pass it as
            `initial=` to a call at nearby inputs (same seeds) to warm-start it. The MoreauGrad family's is the
            displacement `d = z* - x`, detached. `None` for methods without one.
    """

    attribution: Tensor
    gradient_evaluations: Tensor
    solution: Tensor | None = None


class Explainer(abc.ABC):
    """Base class of the explainers, in Captum's shape: settings in the constructor, the batch in `attribute`.

    Subclasses set the class attributes and implement `_attribute`; `attribute` validates the call and
    leaves `inputs`, all `.grad`s and the model's train/eval mode as they were.

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
        if score not in SCORES:
            raise ValueError(f"{type(self).__name__}: score must be one of {SCORES}, got {score!r}.")
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
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "Explainers need autograd, which torch.inference_mode() disables; call attribute outside "
                "it (with Lightning: Trainer(inference_mode=False))."
            )
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
                f"call on a batch of the same shape), got {shape}."
            )
        if not initial.is_floating_point() or not torch.isfinite(initial).all():
            raise ValueError(f"{owner}: initial must be a finite floating tensor.")
        return initial.detach().to(device=inputs.device, dtype=inputs.dtype)

    def _explain(
        self, inputs: Tensor, target: Tensor, seeds: Tensor | None, create_graph: bool, initial: Tensor | None
    ) -> Explanation:
        """The method on validated arguments; by default `_attribute` and the count it records."""
        attribution = self._attribute(inputs, target, seeds, create_graph)
        return Explanation(attribution, self.last_sample_gradient_evaluations.clone())

    @abc.abstractmethod
    def _attribute(self, inputs: Tensor, target: Tensor, seeds: Tensor | None, create_graph: bool) -> Tensor:
        """The method itself, on validated arguments (`target` a `(B,)` long tensor, `seeds` set when noisy)."""

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
    def settings(cls) -> dict[str, object]:
        """The constructor's settings (everything but `model`) with their defaults."""
        parameters = inspect.signature(cls.__init__).parameters
        return {name: p.default for name, p in parameters.items() if name not in ("self", "model")}

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
        if self.done or not isinstance(output, Tensor) or _probing.get():
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


def check_inputs(inputs: Tensor, model: nn.Module | None = None) -> None:
    """Raise a `ValueError` unless `inputs` is a non-empty, finite, floating `(B, C, H, W)` tensor, of the floating
    dtype of `model`'s parameters when a model is given (not checked under autocast, which casts itself)."""
    if isinstance(inputs, np.ndarray):
        raise ValueError(
            "inputs must be a torch.Tensor of shape (B, C, H, W), got a numpy array: convert it with "
            "torch.from_numpy(inputs) (with Quantus, use mglightning.integrations.quantus.explain_func, which does)."
        )
    if not isinstance(inputs, Tensor):
        raise ValueError(f"inputs must be a torch.Tensor of shape (B, C, H, W), got {type(inputs).__name__}.")
    if inputs.ndim != 4:
        raise ValueError(
            f"inputs must have shape (B, C, H, W), got {inputs.ndim} dimensions {tuple(inputs.shape)}; "
            "add a batch dimension with inputs.unsqueeze(0) for a single image."
        )
    if inputs.shape[0] == 0:
        raise ValueError("inputs is an empty batch.")
    if not inputs.is_floating_point():
        raise ValueError(f"inputs must be a floating tensor (images in [0, 1]), got {inputs.dtype}.")
    if not torch.isfinite(inputs).all():
        raise ValueError("inputs contains NaN or infinite values.")
    if model is not None and not torch.is_autocast_enabled(inputs.device.type):
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        if dtype is not None and inputs.dtype != dtype:
            raise ValueError(
                f"inputs are {inputs.dtype} but the model's parameters are {dtype}: cast the inputs with "
                f"inputs.to({dtype}) (or the model with model.to({inputs.dtype}))."
            )


def format_target(target: int | Tensor | np.ndarray, inputs: Tensor) -> Tensor:
    """`target` as a `(B,)` long tensor on the inputs' device, after checking its type, shape and sign.

    An int (or a 0-d integer tensor or array) is every sample's class; a tensor or numpy array of integers of
    any shape that squeezes to `(B,)` (e.g. Quantus's `(B,)` int32 arrays, or `(B, 1)` labels) gives one class
    per sample.
    """
    batch = inputs.shape[0]
    if isinstance(target, np.ndarray) and target.dtype.kind in "biufc":
        target = torch.tensor(target)
    if isinstance(target, np.integer):
        target = int(target)
    if isinstance(target, Tensor) and target.ndim == 0 and not (target.is_floating_point() or target.is_complex()):
        target = target.item()
    if isinstance(target, bool) or not isinstance(target, (int, Tensor)):
        raise ValueError(
            f"target must be an int or integer class indices (a tensor or numpy array of shape ({batch},)), "
            f"got {type(target).__name__}."
        )
    if isinstance(target, int):
        target = torch.full((batch,), target, dtype=torch.long)
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}.")
    if target.ndim != 1 and target.numel() == batch and target.squeeze().ndim <= 1:
        target = target.reshape(batch)  # (B, 1), (1, B), ...: all but one dimension of size 1
    if target.shape != (batch,):
        raise ValueError(
            f"target must be an int or have shape ({batch},) (one class per sample; shapes that squeeze to it, "
            f"like ({batch}, 1), are accepted), got {tuple(target.shape)}."
        )
    if (target < 0).any():
        raise ValueError(f"target must hold non-negative class indices, got {target.tolist()}.")
    return target.to(device=inputs.device, dtype=torch.long)


def format_seeds(seeds: Tensor | Sequence[int] | None, batch: int) -> Tensor | None:
    """`seeds` as a `(B,)` long CPU tensor (or `None`), after checking its type and length."""
    if seeds is None:
        return None
    seeds = torch.as_tensor(seeds)
    if seeds.is_floating_point() or seeds.is_complex() or seeds.dtype == torch.bool:
        raise ValueError(f"seeds must be an integer tensor, got dtype {seeds.dtype}.")
    if seeds.shape != (batch,):
        raise ValueError(f"seeds must have shape ({batch},) (one seed per sample), got {tuple(seeds.shape)}.")
    return seeds.to(device="cpu", dtype=torch.long)


def chunk_ranges(total: int, chunk_size: int | None) -> Iterator[tuple[int, int]]:
    """`(start, stop)` pairs covering `range(total)` in chunks of at most `chunk_size` (`None`: one chunk)."""
    step = total if chunk_size is None else chunk_size
    for start in range(0, total, max(step, 1)):
        yield start, min(start + step, total)


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


def check_positive_int(owner: str, name: str, value: object, minimum: int = 1) -> None:
    """Raise a `ValueError` naming `owner` unless `value` is an int of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}.")


def check_number(owner: str, name: str, value: object, *, positive: bool = True) -> None:
    """Raise a `ValueError` naming `owner` unless `value` is a finite number, `> 0` (`positive`) or `>= 0`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}.")
    if positive and value <= 0:
        raise ValueError(f"{owner}: {name} must be > 0, got {value!r}.")
    if not positive and value < 0:
        raise ValueError(f"{owner}: {name} must be >= 0, got {value!r}.")


def check_internal_batch_size(owner: str, value: object) -> None:
    """Raise a `ValueError` naming `owner` unless `value` is `None`, `"auto"` or a positive int."""
    if value is None or (isinstance(value, str) and value == AUTO):
        return
    if isinstance(value, str):
        raise ValueError(f"{owner}: internal_batch_size must be an integer >= 1, 'auto' or None, got {value!r}.")
    check_positive_int(owner, "internal_batch_size", value)


# --- internal_batch_size="auto" ---------------------------------------------------------------------------

AUTO = "auto"
InternalBatchSize = Union[int, Literal["auto"], None]
"""The type of the explainers' `internal_batch_size`: rows per pass, `"auto"` (`resolve_internal_batch_size`) or
`None` (all rows at once)."""

AUTO_CPU_ROWS = 256
"""`"auto"` off CUDA: a CPU runs no faster on larger passes, and this bounds the host memory."""
AUTO_MEMORY_SHARE = 0.5
"""`"auto"` on CUDA: the share of the available device memory that one pass may take."""
AUTO_MAX_ROWS = 65536
_NOISE_BYTES_PER_ELEMENT = 32  # a noisy row's Philox words, uniforms and normals while they are drawn
_PROBE_ROWS = 2
_probing: ContextVar[bool] = ContextVar("probing", default=False)


def resolve_internal_batch_size(
    value: InternalBatchSize,
    fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    *,
    passes: float = 2.0,
    available_bytes: int | None = None,
    cache: dict | None = None,
) -> int | None:
    """The rows per model pass that `internal_batch_size=value` means for rows shaped like `inputs[0]`.

    An int or `None` (all at once) is returned as it is. `"auto"`:

    - on a CUDA device, `floor(AUTO_MEMORY_SHARE * available / row_bytes)` rows, at least 1 and at most
      `AUTO_MAX_ROWS`, with `available` the device's free memory (`torch.cuda.mem_get_info`) plus what PyTorch's
      allocator holds unused, and `row_bytes = passes * S + 32 * elements` per row: `S` the bytes of the tensors
      a forward pass of `fn` saves for its backward pass, measured once on two copies of `inputs[0]` (the
      model's parameters not counted), `passes` 2 for gradients (the backward pass's buffers at most as large
      again) and 4 for Hessian-vector products, plus the noise being drawn;
    - on any other device, `AUTO_CPU_ROWS` (256).

    The chunks never change a map beyond float rounding (the noise does not depend on them), but the chosen
    size depends on the memory free at the time: set an int for bit-identical reruns, or a smaller one if a
    pass runs out of memory (the rule's estimate has not been checked on a GPU yet).

    Args:
        value: the `internal_batch_size` setting.
        fn: `fn(rows, sample_index) -> (N,)`, the per-row score the passes differentiate (e.g. `ClassScore`).
        inputs: `(B, C, H, W)` inputs of the call (only `inputs[0]`, its device and dtype are used).
        passes: the multiple of `S` one row holds at the peak of a pass (2: gradients, 4: Hessian-vector products).
        available_bytes: the device memory to plan for, instead of asking the device (on any device).
        cache: a dict that keeps `S` between calls (keyed by the row shape, dtype and device).

    Example:
        >>> resolve_internal_batch_size("auto", ClassScore(model, "logit", labels), images)   # CPU: 256
        256
    """
    if value != AUTO:
        return value
    if available_bytes is None:
        available_bytes = _available_device_bytes(inputs.device)
        if available_bytes is None:
            return AUTO_CPU_ROWS
    key = (tuple(inputs.shape[1:]), inputs.dtype, inputs.device)
    saved = None if cache is None else cache.get(key)
    if saved is None:
        saved = saved_bytes_per_row(fn, inputs[:1].detach().expand(_PROBE_ROWS, *inputs.shape[1:]))
        if cache is not None:
            cache[key] = saved
    row_bytes = passes * saved + _NOISE_BYTES_PER_ELEMENT * inputs[0].numel()
    return int(min(AUTO_MAX_ROWS, max(1, AUTO_MEMORY_SHARE * available_bytes // row_bytes)))


def saved_bytes_per_row(fn: Callable[[Tensor, Tensor], Tensor], rows: Tensor) -> float:
    """The bytes of the tensors that a forward pass of `fn` on `rows` saves for its backward pass, per row.

    Counted with `torch.autograd.graph.saved_tensors_hooks`, each storage once; storages of the model's
    parameters (`fn.model`) are not counted, they do not grow with the rows.

    Example:
        >>> saved_bytes_per_row(ClassScore(model, "logit", labels), images[:2])   # CIFAR-10's ResNet-18: 6.9e6
    """
    model = getattr(fn, "model", None)
    parameters = set() if model is None else {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    points = rows.detach().clone().requires_grad_(True)
    token = _probing.set(True)  # the probe is not the call's first pass: the finite-scores check waits
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            fn(points, torch.zeros(points.shape[0], dtype=torch.long, device=points.device))
    finally:
        _probing.reset(token)
    return sum(storages.values()) / points.shape[0]


def _available_device_bytes(device: torch.device) -> int | None:
    """The memory a CUDA device has for new tensors: free, plus held unused by PyTorch's allocator; `None` for
    other devices."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
