"""Any Captum attribution method as an mglightning explainer: `CaptumExplainer`, configured by class path."""

from __future__ import annotations

import importlib
import inspect
import random
import warnings
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import numpy as np
import torch
from captum import attr as captum_attr
from torch import Tensor, nn

from mglightning.checks import check_internal_batch_size
from mglightning.explainers.base import Explainer, Explanation, check_scores_shape
from mglightning.explainers.batching import chunk_ranges

# Methods that draw random numbers from the global generators (torch's, numpy's or Python's), by class name; a
# subclass of one counts too.
_NOISY = ("GradientShap", "KernelShap", "Lime", "LimeBase", "ShapleyValueSampling")
# Methods that backpropagate modified rules instead of gradients (the rest are gradient or perturbation methods).
_PROPAGATION = ("GuidedBackprop", "Deconvolution", "DeepLift", "DeepLiftShap", "LRP", "GuidedGradCam")
# `attribute` arguments the explainer sets itself: the batch, and the chunking that `internal_batch_size` controls.
_MANAGED = {
    "inputs": "the explainer passes the inputs",
    "target": "the explainer passes the target",
    "additional_forward_args": "mglightning models take the images only",
    "return_convergence_delta": "an explainer returns the map only",
    "internal_batch_size": "set the explainer's internal_batch_size instead",
    "nt_samples_batch_size": "set the explainer's internal_batch_size instead",
    "perturbations_per_eval": "set the explainer's internal_batch_size instead",
}


class CaptumExplainer(Explainer):
    """A `captum.attr` attribution method (Kokhlikyan et al. 2020, "Captum: a unified and generic model
    interpretability library for PyTorch") under the mglightning explainer contract.

    The method is named by its class path and built as `method(network, **init_args)`, `network` being the
    model (followed by a softmax or log-softmax layer for those scores); each call runs
    `attribute(inputs, target=target, **attribute_args)`. With `noise_tunnel` the method is wrapped in Captum's
    `NoiseTunnel`, whose `attribute` settings (`nt_type`, `nt_samples`, `stdevs`, ...) it holds. The map is
    returned as Captum computes it, detached; for `Saliency` the default is `abs=False`, the signed gradient, as
    every mglightning map is signed (give `abs: true` for Captum's default).

    **Chunking.** A deterministic method attributes the batch in chunks of at most `internal_batch_size`
    samples; `internal_batch_size` is also passed where Captum takes it (`IntegratedGradients`, an inner method of
    `NoiseTunnel`), as `nt_samples_batch_size` to `NoiseTunnel` and as `perturbations_per_eval` (that many
    perturbations of a chunk per forward pass) to the perturbation methods. Methods that multiply a sample's model
    inputs without a Captum setting to chunk them (`GradientShap`'s `n_samples`, `DeepLift`'s baselines) send those
    rows at once.

    **Noise.** Captum draws its noise from the global generators, over the whole batch at once, so its map of a
    sample depends on the batch. A method that draws noise (`NoiseTunnel`, `GradientShap`, `KernelShap`, `Lime`,
    `ShapleyValueSampling`) is therefore run **one sample at a time**: sample `i` under `torch.random.fork_rng`
    with torch's CPU generator and the inputs' device's seeded with `seeds[i]`, numpy's global generator with
    `seeds[i] % 2**32` and Python's `random` with `seeds[i]` (all restored afterwards). A sample's map then equals
    Captum's on that sample alone after that seeding, whatever its batch. Noise drawn on a GPU comes from the GPU's
    generator, so maps are batch-invariant but not device-invariant. `FeaturePermutation` shuffles features across
    the samples of a batch, so its map depends on the batch by definition; it is refused.

    **Attack surrogate.** Captum computes its gradients with `torch.autograd.grad` without `create_graph`, so no
    Captum map is differentiable with respect to the inputs (`InputXGradient`'s output carries a graph through the
    input factor only, which is not the map's derivative): `supports_create_graph` is False and an attack uses the
    simple gradient.

    **Cost.** `Explanation.gradient_evaluations` counts the model input rows of every forward pass a call runs,
    measured by a hook on the model (a chunk's rows shared equally by its samples). For gradient and propagation
    methods each row is one forward+backward, the same unit as the other explainers; for perturbation methods
    (`Occlusion`, `FeatureAblation`, `ShapleyValueSampling`, `KernelShap`, `Lime`) the rows are forward passes
    only, so the count overstates their cost in gradient evaluations (a forward pass has no backward).

    Args:
        model: classifier taking `(B, C, H, W)` images in [0, 1], in eval mode.
        method: class path of a `captum.attr` attribution method on the inputs, e.g. `captum.attr.GuidedBackprop`,
            `captum.attr.Occlusion` (layer and neuron methods attribute to a layer and are refused).
        init_args: the method's constructor settings after its model (e.g. `{multiply_by_inputs: false}`).
        attribute_args: its `attribute` settings (e.g. Occlusion's `{sliding_window_shapes: [3, 4, 4], strides: 2}`);
            lists become tuples, and `baselines` given as a number is a constant image of that value (a list of
            numbers: one constant image each, a baseline distribution for `GradientShap`).
        noise_tunnel: wrap the method in Captum's `NoiseTunnel` with these `attribute` settings (e.g.
            `{nt_type: smoothgrad, nt_samples: 8, stdevs: 0.1}`; Captum's default `stdevs` is 1.0, the whole pixel
            range); `None` (default) uses the method alone.
        internal_batch_size: the most samples (or model inputs, where Captum chunks them) per forward pass, as
            above; `None` attributes the whole batch at once (default 256).
        score: `logit` (default), `log_softmax` or `softmax`.

    Example:
        >>> attr = CaptumExplainer(model, "captum.attr.GuidedBackprop").attribute(images, target=labels)
        >>> smooth = CaptumExplainer(model, "captum.attr.Saliency", noise_tunnel={"nt_samples": 8, "stdevs": 0.1})
        >>> attr = smooth.attribute(images, target=labels, seeds=torch.arange(len(images)))
    """

    name = "captum"
    display_name = "Captum"
    family = "gradient"  # each instance takes its method's family
    supports_create_graph = False
    surrogate = "simple_gradient"

    def __init__(
        self,
        model: nn.Module,
        method: str = "captum.attr.Saliency",
        init_args: dict[str, Any] | None = None,
        attribute_args: dict[str, Any] | None = None,
        noise_tunnel: dict[str, Any] | None = None,
        internal_batch_size: int | None = 256,
        score: str = "logit",
    ) -> None:
        super().__init__(model, score)
        owner = type(self).__name__
        check_internal_batch_size(owner, internal_batch_size)
        self.method_class = _attribution_class(method)
        self.method = method
        self.init_args = _checked_mapping(owner, "init_args", init_args)
        self.attribute_args = _checked_mapping(owner, "attribute_args", attribute_args)
        self.noise_tunnel = None if noise_tunnel is None else _checked_mapping(owner, "noise_tunnel", noise_tunnel)
        self.internal_batch_size = internal_batch_size
        self._check_settings()
        short = self.method_class.__name__
        if self.noise_tunnel is None:
            self.display_name = f"Captum {short}"
            self.family = _family(self.method_class)
        else:
            nt_type = self.noise_tunnel.get("nt_type", "smoothgrad")
            self.display_name = f"Captum NoiseTunnel({short}{'' if nt_type == 'smoothgrad' else ', ' + nt_type})"
            self.family = "smoothing"

    @property
    def uses_noise(self) -> bool:
        noisy = tuple(getattr(captum_attr, name) for name in _NOISY)
        return self.noise_tunnel is not None or issubclass(self.method_class, noisy)

    def _check_settings(self) -> None:
        """Unknown or missing settings fail here, before any computation."""
        owner, cls = type(self).__name__, self.method_class
        try:
            inspect.signature(cls).bind(None, **self.init_args)
        except TypeError as error:
            accepted = ", ".join(list(inspect.signature(cls).parameters)[1:]) or "none"
            raise ValueError(
                f"{owner}: {self.method}(model, **init_args) cannot be built with init_args {self.init_args}: {error} "
                f"(its settings after the model: {accepted})."
            ) from None
        _check_attribute_keys(owner, "attribute_args", self.attribute_args, cls.attribute, self.method)
        if self.noise_tunnel is not None:
            # NoiseTunnel passes what it does not take to the method, so its own settings are checked strictly.
            _check_attribute_keys(
                owner, "noise_tunnel", self.noise_tunnel, captum_attr.NoiseTunnel.attribute, "captum.attr.NoiseTunnel",
                strict=True,
            )
            overlap = sorted(set(self.noise_tunnel) & set(self.attribute_args))
            if overlap:
                raise ValueError(f"{owner}: {', '.join(overlap)} given in both noise_tunnel and attribute_args.")

    def _explain(
        self, inputs: Tensor, target: Tensor, seeds: Tensor | None, create_graph: bool, initial: Tensor | None
    ) -> Explanation:
        network = self.model
        if self.score == "softmax":
            network = nn.Sequential(self.model, nn.Softmax(dim=1))
        elif self.score == "log_softmax":
            network = nn.Sequential(self.model, nn.LogSoftmax(dim=1))
        attribution = self.method_class(network, **self.init_args)
        if self.noise_tunnel is not None:
            attribution = captum_attr.NoiseTunnel(attribution)
        batch, noisy = inputs.shape[0], self.uses_noise
        # Noisy methods one sample at a time (each under its own seed); the others in chunks of samples.
        chunks = [(i, i + 1) for i in range(batch)] if noisy else chunk_ranges(batch, self.internal_batch_size)
        rows = _ForwardRows(int(target.max()))
        handle = self.model.register_forward_hook(rows)
        maps, counts = [], torch.zeros(batch, dtype=torch.long)
        try:
            for start, stop in chunks:
                points = inputs[start:stop].detach().clone().requires_grad_(True)
                seeded = _seeded_global_rng(int(seeds[start]), points.device) if noisy else nullcontext()
                before = rows.rows
                with seeded, warnings.catch_warnings():
                    # Captum announces on every call that it hooks the activations (and removes the hooks afterwards).
                    warnings.filterwarnings("ignore", message="Setting .*hooks")
                    result = attribution.attribute(points, target=target[start:stop], **self._call_arguments(points))
                if not isinstance(result, Tensor) or result.shape != points.shape:
                    shape = tuple(result.shape) if isinstance(result, Tensor) else type(result).__name__
                    raise ValueError(
                        f"{type(self).__name__}: {self.method} returned {shape}, not a map shaped like the inputs "
                        f"{tuple(points.shape)}; only methods that attribute to the input pixels can be evaluated."
                    )
                maps.append(result.detach().to(inputs.dtype))
                counts[start:stop] = _shared(rows.rows - before, stop - start)
        finally:
            handle.remove()
        return Explanation(torch.cat(maps), counts)

    def _call_arguments(self, points: Tensor) -> dict[str, Any]:
        """`attribute`'s keyword arguments for one chunk: the settings with their YAML values made Captum's, and the
        chunking that bounds a forward pass to `internal_batch_size` model inputs."""
        arguments = {**(self.noise_tunnel or {}), **self.attribute_args}
        for name, value in arguments.items():
            if name == "baselines" and (_is_number(value) or _is_number_list(value)):
                arguments[name] = _constant_images(value, points)
            elif isinstance(value, list):
                arguments[name] = tuple(value)
        inner = inspect.signature(self.method_class.attribute).parameters
        if "abs" in inner:
            arguments.setdefault("abs", False)
        if self.internal_batch_size is not None:
            per_sample = max(1, self.internal_batch_size // points.shape[0])
            if "internal_batch_size" in inner:
                arguments["internal_batch_size"] = self.internal_batch_size
            if self.noise_tunnel is not None:
                arguments["nt_samples_batch_size"] = per_sample
            elif "perturbations_per_eval" in inner:
                arguments["perturbations_per_eval"] = per_sample
        return arguments


class _ForwardRows:
    """Forward hook: counts the model input rows of every forward pass, and checks the first scores' shape against
    the largest target (before Captum indexes them)."""

    def __init__(self, max_target: int) -> None:
        self.max_target = max_target
        self.rows = 0

    def __call__(self, module: nn.Module, args: tuple, output: object) -> None:
        if self.rows == 0 and isinstance(output, Tensor):
            check_scores_shape(output, self.max_target)
        self.rows += args[0].shape[0]


@contextmanager
def _seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """The global generators seeded with `seed` inside the block and restored after it: torch's CPU generator and
    `device`'s, numpy's (with `seed % 2**32`) and Python's `random`."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    forked = [device] if device.type != "cpu" else []
    try:
        with torch.random.fork_rng(devices=forked, device_type=device.type if forked else "cuda"):
            torch.random.default_generator.manual_seed(seed)
            if device.type == "cuda":
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
            elif device.type != "cpu":
                getattr(torch, device.type).manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def _attribution_class(method: object) -> type:
    """The class at the class path `method`, checked to be a Captum attribution method on the inputs."""
    owner = "CaptumExplainer"
    example = "captum.attr.GuidedBackprop or captum.attr.Occlusion"
    if not isinstance(method, str) or "." not in method:
        raise ValueError(f"{owner}: method must be the class path of a Captum method, e.g. {example}; got {method!r}.")
    module_name, _, class_name = method.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"{owner}: cannot import {method!r} ({error}); give a class path such as {example}.") from None
    if not (inspect.isclass(cls) and issubclass(cls, captum_attr.Attribution)):
        raise ValueError(f"{owner}: {method} is not a Captum attribution method (an Attribution), e.g. {example}.")
    if issubclass(cls, (captum_attr.LayerAttribution, captum_attr.NeuronAttribution)):
        raise ValueError(
            f"{owner}: {method} attributes to a layer or a neuron, not to the input pixels; use an input attribution "
            f"method (e.g. {example})."
        )
    if issubclass(cls, captum_attr.NoiseTunnel):
        raise ValueError(
            f"{owner}: give NoiseTunnel as noise_tunnel: {{nt_type: smoothgrad, nt_samples: ..., stdevs: ...}} with "
            "the method it wraps as method (e.g. captum.attr.Saliency)."
        )
    if issubclass(cls, captum_attr.FeaturePermutation):
        raise ValueError(
            f"{owner}: {method} shuffles features across the samples of a batch, so a sample's map depends on its "
            "batch; use captum.attr.FeatureAblation or captum.attr.Occlusion instead."
        )
    attribute = getattr(cls, "attribute", None)
    if not callable(attribute) or not {"inputs", "target"} <= set(inspect.signature(attribute).parameters):
        raise ValueError(f"{owner}: {method} does not attribute image inputs for targets; use e.g. {example}.")
    return cls


def _checked_mapping(owner: str, name: str, value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise ValueError(f"{owner}: {name} must be a mapping of setting names to values, got {value!r}.")
    return dict(value)


def _check_attribute_keys(
    owner: str, name: str, settings: dict[str, Any], function, method: str, strict: bool = False
) -> None:
    """Raise a `ValueError` for a setting that the explainer sets itself or that `function` does not take (any is
    taken by a function with `**kwargs`, unless `strict`)."""
    parameters = inspect.signature(function).parameters
    named = [p for p, value in parameters.items() if value.kind != inspect.Parameter.VAR_KEYWORD and p != "self"]
    takes_any = not strict and any(value.kind == inspect.Parameter.VAR_KEYWORD for value in parameters.values())
    for key in settings:
        if key in _MANAGED:
            raise ValueError(f"{owner}: {name} must not set {key} ({_MANAGED[key]}).")
        if key not in named and not takes_any:
            accepted = ", ".join(p for p in named if p not in _MANAGED)
            raise ValueError(
                f"{owner}: {name} has {key!r}, which {method}.attribute does not take (it takes {accepted})."
            )


def _family(cls: type) -> str:
    if any(base.__name__ in _PROPAGATION for base in cls.__mro__):
        return "propagation"
    if issubclass(cls, captum_attr.PerturbationAttribution):
        return "perturbation"
    return "gradient"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_number_list(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_number(item) for item in value)


def _constant_images(value: float | list[float], points: Tensor) -> Tensor:
    """A number: a constant image per sample of the chunk; a list of numbers: one constant image per number."""
    if isinstance(value, (list, tuple)):
        levels = torch.tensor(value, dtype=points.dtype, device=points.device)
        return levels.view(-1, 1, 1, 1).expand(-1, *points.shape[1:]).contiguous()
    return torch.full_like(points, float(value)).detach()


def _shared(rows: int, samples: int) -> Tensor:
    """`rows` model inputs split over `samples` samples, as equally as integers allow (the first take the rest)."""
    counts = torch.full((samples,), rows // samples, dtype=torch.long)
    counts[: rows % samples] += 1
    return counts
