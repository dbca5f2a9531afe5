"""From a classifier's source to a checked classifier, in one pass: read, decide, build, load, check.

`load_classifier` (and `build_classifier`, which leaves the model on the device it was built on) takes a
`ClassifierSource` (`mglightning.models.source`: a `train.py` checkpoint, a registered or timm `arch` with its
weights, or any `module`) through these steps, each once:

1. read the source's weights file, if it has one, with `mglightning.models.weights.read_weights` (it cannot run
   code from the file), and decide what it holds;
2. build the network: from a checkpoint's hyperparameters, the registry, timm, or the `module` as given;
3. load the file's state dict into it, strictly, and the normalisation into its first layer (the model takes
   [0, 1] pixels, docs/reference/semantics.md section 1);
4. check it against the data before any run: the output size against `num_classes` (or a `class_subset`
   mapping), the input size with a zero probe, and ReLU-type activations, under which the top-k attack has no
   gradient (docs/reference/semantics.md section 5).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from mglightning.models.layers import Normalize
from mglightning.models.registry import TIMM_PREFIX, classifier_network, create_model
from mglightning.models.source import ClassifierSource, as_classifier_source
from mglightning.models.timm_models import cached_pretrained_weights, pretrained_config
from mglightning.models.weights import CHECKPOINT_SETTINGS, WeightsFile, fit_state_dict, read_weights

# Piecewise-linear activations: a network built from them has a piecewise-constant input gradient, whose input
# derivative (what the top-k attack follows, docs/reference/semantics.md section 5) is zero almost everywhere.
RELU_TYPES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.Hardtanh)

Stats = tuple[tuple[float, ...], tuple[float, ...]]


def load_classifier(
    source: ClassifierSource | str | os.PathLike,
    map_location: str | torch.device = "cpu",
    *,
    num_classes: int | None = None,
    image_size: int | None = None,
    in_chans: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """A classifier that takes [0, 1] images, in eval mode, on `map_location` (CPU by default).

    `source` is the path of a `train.py` checkpoint (its trained network comes back) or any `ClassifierSource`:
    a timm model with its pretrained weights, a registered architecture with a state dict file, any `nn.Module`.
    The data's settings, when given, fill the model's defaults (`mean`/`std` of its normalisation layer,
    `num_classes`) and are checked before use (`build_classifier`, which this calls).

    Example:
        >>> model = load_classifier("checkpoints/digits/last.ckpt")
        >>> predictions = model(images).argmax(dim=1)
        >>> model = load_classifier(ClassifierSource(arch="timm/efficientnet_b0", pretrained=True))
    """
    model = build_classifier(
        source, num_classes=num_classes, image_size=image_size, in_chans=in_chans, mean=mean, std=std
    )
    return model.to(map_location)


class ImageClassifier(nn.Module):
    """A network behind the [0, 1] normalisation layer, its scores optionally restricted to the data's classes.

    Args:
        net: the network; maps normalised images to `(B, outputs)` scores.
        normalize: the first layer (None: the network takes [0, 1] pixels as they are).
        class_subset: the network's output index of each of the data's classes (None: all outputs, in order).

    Example:
        >>> model = ImageClassifier(timm_net, Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
        >>> scores = model(images)            # images in [0, 1]
    """

    def __init__(
        self, net: nn.Module, normalize: Normalize | None = None, class_subset: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        self.normalize = normalize
        self.net = net
        indices = None if class_subset is None else torch.tensor(list(class_subset), dtype=torch.long)
        self.register_buffer("class_indices", indices)

    def forward(self, x: Tensor) -> Tensor:
        if self.normalize is not None:
            x = self.normalize(x)
        scores = self.net(x)
        return scores if self.class_indices is None else scores.index_select(1, self.class_indices)


def build_classifier(
    source: ClassifierSource | str | os.PathLike,
    *,
    num_classes: int | None = None,
    image_size: int | None = None,
    in_chans: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """Load the classifier that `source` describes, in eval mode, taking [0, 1] images, checked against the data.

    The normalisation is the model's first layer: `source.mean`/`std` when given, else the one stored with the
    model (a checkpoint, a state dict that holds one, timm's pretrained configuration; a warning if it differs
    from the data's), else the data's `mean`/`std`. A model with a `Normalize` layer of its own (every
    registered architecture) gets the values there; any other gets a `Normalize` layer in front
    (`ImageClassifier`). A `train.py` checkpoint with nothing to change comes back as the trained network itself.

    Checks before any run, each a `ValueError` naming the setting to change: a zero probe of
    `(1, in_chans, image_size, image_size)` must give `(1, num_classes)` scores (or `class_subset` must fit the
    outputs); a model with ReLU-type activations gets a warning (the top-k attack needs a differentiable
    gradient map, docs/reference/semantics.md section 5). Checks whose data setting is None are skipped.

    Args:
        source: a `ClassifierSource`, or the path of a `train.py` checkpoint.
        num_classes, image_size, in_chans, mean, std: the data's (a datamodule's attributes of the same names).

    Example:
        >>> model = build_classifier(ClassifierSource(arch="timm/efficientnet_b0", pretrained=True),
        ...                          num_classes=1000, image_size=224, in_chans=3,
        ...                          mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    """
    source = as_classifier_source(source)
    data_stats = _as_stats(mean, std)
    if source.class_subset is not None and num_classes is not None and len(source.class_subset) != num_classes:
        raise ValueError(
            f"class_subset maps {len(source.class_subset)} classes, but the data has {num_classes}: give one model "
            "output index per class of the data."
        )
    net, stored, description = _network(source, num_classes, image_size, in_chans)

    stats = _resolve_stats(source, stored, data_stats, description)
    _, inner = _first_normalize(net)
    channel_counts = {"the data": in_chans, description: None if inner is None else inner.mean.numel()}
    for owner, count in channel_counts.items():
        if stats is not None and count is not None and len(stats[0]) != count:
            raise ValueError(
                f"The classifier's normalisation has {len(stats[0])} channels but {owner} has {count}: give "
                "`mean`/`std` with one value per input channel."
            )
    if inner is not None:
        # The network normalises itself (registered architectures, checkpoints): set the values there.
        identity = ((0.0,) * inner.mean.numel(), (1.0,) * inner.mean.numel())
        values = stats if stats is not None else identity
        inner.load_state_dict(Normalize(*values).state_dict())
        normalize = None
    else:
        normalize = Normalize(*stats) if stats is not None else None
    net.eval()
    if normalize is not None:
        normalize.to(_device_of(net))

    if image_size is not None:
        probe_chans = in_chans if in_chans is not None else (len(stats[0]) if stats is not None else 3)
        outputs = _probe_outputs(net, normalize, probe_chans, image_size, description)
        _check_outputs(outputs, num_classes, source.class_subset, description)
    _warn_if_piecewise_linear(net, description)

    if normalize is None and source.class_subset is None:
        return net
    # On the network's device: a `module` may come already on a GPU.
    return ImageClassifier(net, normalize, source.class_subset).to(_device_of(net)).eval()


def _network(
    source: ClassifierSource, num_classes: int | None, image_size: int | None, in_chans: int | None
) -> tuple[nn.Module, Stats | None, str]:
    """Read, decide, build, load: the network of `source` with its weights.

    Returns the network, the normalisation stored with it (None: none) and its name in messages.
    """
    if source.checkpoint is not None:
        return *_from_checkpoint(Path(source.checkpoint)), f"the checkpoint {source.checkpoint!r}"
    if source.module is not None:
        weights = read_weights(Path(source.weights)) if source.weights is not None else None
        return source.module, _load(source.module, weights), type(source.module).__name__
    if source.arch.startswith(TIMM_PREFIX):
        return *_from_timm(source, num_classes, in_chans), source.arch
    return *_from_registry(source, num_classes, image_size, in_chans), source.arch


def _from_checkpoint(path: Path) -> tuple[nn.Module, Stats | None]:
    """The trained network of a `train.py` (`ClassifierModule`) checkpoint, and its normalisation.

    Rebuilt from the checkpoint's hyperparameters with `classifier_network`, the function `ClassifierModule`
    builds its network with, so no LightningModule is needed (and this layer does not import one).
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"Checkpoint {str(path)!r} does not exist. Train one with "
            "`python train.py fit --config configs/<name>.yaml` "
            "(checkpoints are written under checkpoints/<experiment>/)."
        )
    weights = read_weights(path, checkpoint=True)
    settings = weights.hyper_parameters
    net = classifier_network(
        **{name: settings[name] for name in CHECKPOINT_SETTINGS}, model_kwargs=settings.get("model_kwargs")
    )
    fit_state_dict(
        net, weights.state_dict, path,
        hint=f"The checkpoint's hyperparameters (arch={settings['arch']!r}, "
        f"model_kwargs={settings.get('model_kwargs')}) do not describe its own weights; it was changed "
        "after train.py wrote it.",
    )
    return net, _stats_of(_first_normalize(net)[1])


def _from_registry(
    source: ClassifierSource, num_classes: int | None, image_size: int | None, in_chans: int | None
) -> tuple[nn.Module, Stats | None]:
    kwargs = {**_output_count(source, num_classes), **source.model_kwargs}
    if image_size is not None:
        kwargs.setdefault("image_size", image_size)
    chans = kwargs.setdefault("in_chans", in_chans if in_chans is not None else 3)
    weights = read_weights(Path(source.weights)) if source.weights is not None else None
    # Identity until build_classifier sets the resolved normalisation in the model's own Normalize layer.
    net = create_model(source.arch, mean=(0.0,) * chans, std=(1.0,) * chans, **kwargs)
    return net, _load(net, weights)


def _from_timm(
    source: ClassifierSource, num_classes: int | None, in_chans: int | None
) -> tuple[nn.Module, Stats | None]:
    import timm

    name = source.arch[len(TIMM_PREFIX):]
    if not timm.is_model(name):
        raise ValueError(f"timm has no model named {name!r}; see `timm.list_models()` for the available names.")
    kwargs = dict(source.model_kwargs)
    if in_chans is not None:
        kwargs.setdefault("in_chans", in_chans)
    if not source.pretrained:
        outputs = _output_count(source, num_classes)
        weights = read_weights(Path(source.weights)) if source.weights is not None else None
        net = timm.create_model(name, **outputs, **kwargs)
        return net, _load(net, weights)

    # Pretrained: the head is part of the weights, so num_classes stays timm's unless model_kwargs change it.
    config = pretrained_config(name)
    path = Path(source.weights) if source.weights is not None else cached_pretrained_weights(name, config)
    if config.custom_load:
        # A few models (e.g. ViTs from .npz files) read their file with their own loader, which takes no pickles.
        overlay = {"file": str(path)}
    else:
        # The state dict, read here as every weights file is (it cannot run code), makes timm adapt it (head,
        # input channels) without going to the hub or opening the file itself.
        overlay = {"state_dict": read_weights(path).state_dict}
    try:
        net = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except Exception as error:  # mismatched weights fail in many ways inside timm
        raise ValueError(f"Could not load timm's weights for {name!r} from {str(path)!r}: {error}") from error
    return net, _as_stats(config.mean, config.std)


def _load(net: nn.Module, weights: WeightsFile | None) -> Stats | None:
    """Load `weights` (if any) into `net`; return the normalisation they hold for `net`'s `Normalize` layer.

    The file is a plain state dict, a `.safetensors` file or a `train.py` checkpoint (its network's entries). A
    state dict without the `Normalize` layer's entries (a network trained elsewhere) loads too: that layer then
    gets its values from the classifier's or the data's `mean`/`std`.
    """
    if weights is None:
        return None
    state = weights.state_dict
    stored = None
    name, layer = _first_normalize(net)
    if layer is not None:
        keys = [f"{name}.{buffer}" if name else buffer for buffer in ("mean", "std")]
        if all(key in state for key in keys):
            stored = _as_stats(state[keys[0]].flatten().tolist(), state[keys[1]].flatten().tolist())
        else:
            state = {**dict(zip(keys, (layer.mean, layer.std))), **state}
    fit_state_dict(
        net, state, weights.path,
        hint="For a train.py checkpoint use the classifier's `checkpoint`; otherwise check `arch` and "
        "`model_kwargs` (or the `module`) against the model the weights were saved from.",
    )
    return stored


def _as_stats(mean: Sequence[float] | None, std: Sequence[float] | None) -> Stats | None:
    if mean is None or std is None:
        return None
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _stats_of(layer: Normalize | None) -> Stats | None:
    return None if layer is None else _as_stats(layer.mean.flatten().tolist(), layer.std.flatten().tolist())


def _first_normalize(net: nn.Module) -> tuple[str, Normalize | None]:
    """The qualified name and module of the network's first `Normalize` layer (`("", None)` without one)."""
    for name, module in net.named_modules():
        if isinstance(module, Normalize):
            return name, module
    return "", None


def _device_of(net: nn.Module) -> torch.device:
    tensor = next(net.parameters(), None)
    if tensor is None:
        tensor = next(net.buffers(), torch.empty(0))
    return tensor.device


def _resolve_stats(
    source: ClassifierSource, stored: Stats | None, data: Stats | None, description: str
) -> Stats | None:
    """The first layer's (mean, std): explicit, else stored with the model, else the data's; None: no normalisation."""
    if not source.normalize:
        return None
    if source.mean is not None:
        return _as_stats(source.mean, source.std)
    if stored is not None:
        if data is not None and not _close(stored, data):
            warnings.warn(
                f"{description} normalises with its stored mean={list(stored[0])}, std={list(stored[1])}, which "
                f"differ from the data's mean={list(data[0])}, std={list(data[1])}; keeping the model's. Set the "
                "classifier's `mean`/`std` to use others.",
                stacklevel=3,
            )
        return stored
    if data is None:
        raise ValueError(
            f"{description} needs the normalisation of its first layer: give the classifier's `mean` and `std` (or "
            "a datamodule that has them), or `normalize: false` for a model that normalises its input itself."
        )
    return data


def _close(a: Stats, b: Stats) -> bool:
    return all(
        len(x) == len(y) and all(math.isclose(u, v, rel_tol=1e-4, abs_tol=1e-6) for u, v in zip(x, y))
        for x, y in zip(a, b)
    )


def _output_count(source: ClassifierSource, num_classes: int | None) -> dict[str, int]:
    """The `num_classes` setting of `arch`'s builder: `model_kwargs`', else the data's (none with a class_subset)."""
    if "num_classes" in source.model_kwargs:
        return {}
    if source.class_subset is not None:
        raise ValueError(
            f"With a class_subset, give {source.arch}'s number of outputs as model_kwargs: {{num_classes: N}}."
        )
    return {} if num_classes is None else {"num_classes": num_classes}


def _probe_outputs(
    net: nn.Module, normalize: Normalize | None, in_chans: int, image_size: int, description: str
) -> int:
    """The number of scores `net` gives for one zero image of the data's size, or an error naming the size."""
    parameter = next(net.parameters(), None)
    dtype = parameter.dtype if parameter is not None else torch.float32
    probe = torch.zeros(1, in_chans, image_size, image_size, device=_device_of(net), dtype=dtype)
    try:
        with torch.no_grad():
            scores = net(normalize(probe) if normalize is not None else probe)
    except Exception as error:  # any failure of the model's forward means it does not accept this input
        raise ValueError(
            f"{description} does not accept {in_chans}x{image_size}x{image_size} images (the data's in_chans and "
            f"image_size): {type(error).__name__}: {error}"
        ) from error
    if not isinstance(scores, Tensor) or scores.ndim != 2 or scores.shape[0] != 1:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"{description} must return (batch, classes) scores; for one image it returned {shape}.")
    return scores.shape[1]


def _check_outputs(outputs: int, num_classes: int | None, class_subset: list[int] | None, description: str) -> None:
    if class_subset is not None:
        if max(class_subset) >= outputs:
            raise ValueError(
                f"class_subset names output {max(class_subset)}, but {description} has {outputs} outputs."
            )
    elif num_classes is not None and outputs != num_classes:
        raise ValueError(
            f"{description} has {outputs} outputs but the data has {num_classes} classes: give the model's output "
            "index of each class as the classifier's `class_subset`, or a model with that many outputs "
            "(`model_kwargs: {num_classes: ...}` builds a new, untrained head)."
        )


def _warn_if_piecewise_linear(net: nn.Module, description: str) -> None:
    found = [
        f"{name} ({type(module).__name__})" for name, module in net.named_modules() if isinstance(module, RELU_TYPES)
    ]
    if found:
        warnings.warn(
            f"{description} has {len(found)} ReLU-type activations (e.g. {', '.join(found[:3])}): its gradient map "
            "is piecewise constant in the input, so the top-k interpretation attack, which differentiates the map "
            "(docs/reference/semantics.md section 5), gets no gradient and cannot move it. Explain a smooth network to "
            "attack it, e.g. the softplus ResNet-18 (`arch: resnet18` with `model_kwargs: {activation: softplus}`, "
            "trained by train.py), or replace the ReLUs of your module with `nn.Softplus(beta)`.",
            stacklevel=3,
        )
