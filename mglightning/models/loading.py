"""The classifier of an evaluation, in any form researchers hold it, behind the [0, 1] normalisation layer.

A `ClassifierSource` names exactly one of:

- `checkpoint`: a checkpoint written by `train.py` (a plain string is one; it holds the architecture, the
  weights and the normalisation);
- `arch`: a registered architecture (`resnet18`) or `timm/<name>`, with `pretrained: true` (timm's pretrained
  weights, read from the local Hugging Face or timm cache, or from a `weights` file; never downloaded at run
  time) or a plain state dict file as `weights` (without either, only with `random_weights: true`: an
  untrained network is refused unless asked for);
- `module`: any `nn.Module` (in YAML by `class_path`/`init_args`), with optional `weights`.

`build_classifier` loads it, puts the normalisation first (the model takes [0, 1] pixels, docs/reference/semantics.md
section 1) and checks it against the data before any run: the output size against `num_classes` (or a
`class_subset` mapping), the input size with a zero probe, and ReLU-type activations, under which the top-k attack
has no gradient (docs/reference/semantics.md section 5).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from mglightning.models.layers import Normalize
from mglightning.models.registry import TIMM_PREFIX, classifier_network, create_model
from mglightning.models.weights import (
    fit_state_dict,
    is_train_checkpoint,
    read_state_dict,
    read_weights_file,
    state_dict_of,
)

if TYPE_CHECKING:
    from timm.models import PretrainedCfg

# Piecewise-linear activations: a network built from them has a piecewise-constant input gradient, whose input
# derivative (what the top-k attack follows, docs/reference/semantics.md section 5) is zero almost everywhere.
RELU_TYPES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.Hardtanh)

# ClassifierSource holds these itself, so `model_kwargs` may not set them a second time.
_RESERVED_KWARGS = ("pretrained", "weights", "mean", "std")

Stats = tuple[tuple[float, ...], tuple[float, ...]]


@dataclass
class ClassifierSource:
    """Where an evaluation's classifier comes from: exactly one of `checkpoint`, `arch` or `module`.

    The evaluator's `model.classifier` in YAML is one of these (a plain string is a `train.py` checkpoint):

    ```yaml
    classifier: checkpoints/digits/last.ckpt            # a train.py checkpoint
    classifier: {arch: timm/efficientnet_b0, pretrained: true}
    classifier: {arch: resnet18, weights: resnet18_state_dict.pt, model_kwargs: {width: 16}}
    classifier:
      module: {class_path: my_package.MyNet, init_args: {depth: 4}}
      weights: my_net.pt
    classifier: {arch: resnet18, random_weights: true}   # an untrained network, on purpose
    ```

    Args:
        checkpoint: a checkpoint written by `train.py`; it holds the architecture, the weights and the
            normalisation.
        arch: a registered model name (see `mglightning.models.list_models()`) or `timm/<name>` for any timm model.
        module: any `nn.Module` mapping `(B, C, H, W)` images to `(B, classes)` scores; in YAML given by
            `class_path`/`init_args`.
        pretrained: with a timm `arch`, load timm's pretrained weights: from `weights` when given, else from the
            local Hugging Face cache (`$HF_HOME/hub`) or timm's older cache (`$TORCH_HOME/hub/checkpoints`).
            Nothing is downloaded; a missing file is an error that says where it was expected and how to fetch it.
        weights: a weights file (`.safetensors`, or a `torch.save` file, read with `weights_only=True` by
            `mglightning.models.read_weights_file`, so that it cannot run code). With
            `pretrained`: timm's weight file for the model. Otherwise: the state dict of the model that `arch`
            with `model_kwargs` (or `module`) builds, e.g. written by `torch.save(model.state_dict(), path)`.
        model_kwargs: further settings of `arch`'s builder (`mglightning.models.create_model` or
            `timm.create_model`), e.g. `{width: 16, activation: softplus}`. `num_classes` defaults to the data's
            (for timm's pretrained weights: their head's), `image_size` and `in_chans` to the data's.
        mean: the per-channel mean of the model's first layer, the normalisation. Default: the normalisation
            stored with the model (a checkpoint, a state dict that holds one, timm's pretrained configuration),
            else the data's.
        std: the per-channel standard deviation of that normalisation (given with `mean`, or neither).
        normalize: False for a model that normalises its input itself: it then gets the [0, 1] pixels unchanged.
        class_subset: for a model with more outputs than the data has classes: the model's output index of each
            of the data's classes, in the data's class order (e.g. the ImageNet indices of a 10-class subset).
        random_weights: evaluate an `arch` with the random weights it is initialised with (no `weights`, no
            `pretrained`), e.g. as an untrained reference. Without it such an `arch` is refused: explaining an
            untrained network by mistake gives results that look like any others. A `module` is used as built.

    Example:
        >>> source = ClassifierSource(arch="resnet18", weights="resnet18.pt", model_kwargs={"width": 16})
        >>> model = build_classifier(source, num_classes=10, image_size=32, in_chans=3,
        ...                          mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
    """

    checkpoint: str | None = None
    arch: str | None = None
    module: nn.Module | None = None
    pretrained: bool = False
    weights: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    mean: list[float] | None = None
    std: list[float] | None = None
    normalize: bool = True
    class_subset: list[int] | None = None
    random_weights: bool = False

    def __post_init__(self) -> None:
        forms = [name for name in ("checkpoint", "arch", "module") if getattr(self, name) is not None]
        if len(forms) != 1:
            raise ValueError(
                "Give the classifier as exactly one of `checkpoint` (a train.py checkpoint), `arch` (a registered "
                f"name or timm/<name>) or `module` (class_path/init_args); got {forms or 'none'}."
            )
        is_timm = self.arch is not None and self.arch.startswith(TIMM_PREFIX)
        if self.pretrained and not is_timm:
            raise ValueError(
                "pretrained: true needs arch: timm/<name> (timm's pretrained weights); for other models give their "
                "weights file as `weights`."
            )
        if self.checkpoint is not None and (self.weights is not None or self.model_kwargs):
            raise ValueError(
                "A train.py checkpoint holds its architecture and weights: `weights` and `model_kwargs` go with "
                "`arch` or `module`, not with `checkpoint`."
            )
        if self.module is not None and self.model_kwargs:
            raise ValueError("A `module`'s settings go in its init_args; `model_kwargs` is for `arch`.")
        reserved = sorted(set(self.model_kwargs) & set(_RESERVED_KWARGS))
        if reserved:
            raise ValueError(
                f"model_kwargs may not set {reserved}: use the classifier's own `pretrained`, `weights`, `mean` "
                "and `std` settings."
            )
        if (self.mean is None) != (self.std is None):
            raise ValueError("Give both `mean` and `std` of the classifier's normalisation, or neither.")
        if not self.normalize and self.mean is not None:
            raise ValueError("normalize: false takes no `mean`/`std`: the model gets [0, 1] pixels unchanged.")
        if self.class_subset is not None:
            indices = list(self.class_subset)
            if not indices or min(indices) < 0 or len(set(indices)) != len(indices):
                raise ValueError(
                    "class_subset must list distinct, non-negative model output indices, one per class of the "
                    f"data; got {indices}."
                )
        untrained = self.arch is not None and self.weights is None and not self.pretrained
        if untrained and not self.random_weights:
            raise ValueError(
                f"The classifier `arch: {self.arch}` has no weights, so it would be evaluated with random ones. "
                "Give its trained weights: `weights: <file>` (a state dict or .safetensors file of this arch and "
                "model_kwargs)"
                + (", `pretrained: true` (timm's pretrained weights)" if is_timm else "")
                + " or a train.py checkpoint (`checkpoint: <file>`, or --ckpt_path <file>); or set "
                "`random_weights: true` to evaluate the untrained network on purpose."
            )
        if self.random_weights and not untrained:
            raise ValueError(
                "random_weights: true is for an `arch` given without `weights` or `pretrained`; this classifier "
                "has weights (or is a `checkpoint` or `module`): drop random_weights."
            )


def as_classifier_source(source: ClassifierSource | str | os.PathLike) -> ClassifierSource:
    """`source` as a `ClassifierSource`; a path (str or `Path`) is a `train.py` checkpoint."""
    if isinstance(source, ClassifierSource):
        return source
    if isinstance(source, (str, os.PathLike)):
        return ClassifierSource(checkpoint=os.fspath(source))
    raise TypeError(
        f"A classifier is a ClassifierSource or the path of a train.py checkpoint, got {type(source).__name__}."
    )


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
    if source.checkpoint is not None:
        net = _load_checkpoint(Path(source.checkpoint))
        stored = _stats_of(_first_normalize(net)[1])
        description = f"the checkpoint {source.checkpoint!r}"
    elif source.module is not None:
        net = source.module
        stored = _load_state_dict(net, Path(source.weights)) if source.weights is not None else None
        description = type(net).__name__
    elif source.arch.startswith(TIMM_PREFIX):
        net, stored = _build_timm(source, num_classes, in_chans)
        description = source.arch
    else:
        net, stored = _build_registered(source, num_classes, image_size, in_chans)
        description = source.arch

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


def _load_checkpoint(path: Path) -> nn.Module:
    """The trained network of a `train.py` (`ClassifierModule`) checkpoint.

    Rebuilt from the checkpoint's hyperparameters with `classifier_network`, the function `ClassifierModule`
    builds its network with, so no LightningModule is needed (and this layer does not import one).
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"Checkpoint {str(path)!r} does not exist. Train one with "
            "`python train.py fit --config configs/<name>.yaml` "
            "(checkpoints are written under checkpoints/<experiment>/)."
        )
    checkpoint = read_weights_file(path)
    if not is_train_checkpoint(checkpoint):
        found = sorted(checkpoint)[:5] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"{str(path)!r} is not a mglightning classifier checkpoint: a train.py checkpoint holds `state_dict` "
            f"and `hyper_parameters` with the architecture (`arch`), this file holds {found}. Pass a checkpoint "
            "written by `python train.py fit`, or give a plain state dict as the classifier's `weights` together "
            "with its `arch` (or `module`)."
        )
    hyperparameters = checkpoint["hyper_parameters"]
    settings = ("arch", "num_classes", "image_size", "mean", "std")
    absent = [name for name in settings if name not in hyperparameters]
    if absent:
        raise ValueError(
            f"The train.py checkpoint {str(path)!r} lacks the hyperparameters {absent} that rebuild its network; "
            "it was not written by this version of train.py."
        )
    net = classifier_network(
        **{name: hyperparameters[name] for name in settings}, model_kwargs=hyperparameters.get("model_kwargs")
    )
    fit_state_dict(
        net, state_dict_of(checkpoint, path), path,
        hint=f"The checkpoint's hyperparameters (arch={hyperparameters['arch']!r}, "
        f"model_kwargs={hyperparameters.get('model_kwargs')}) do not describe its own weights; it was changed "
        "after train.py wrote it.",
    )
    return net


def _load_state_dict(net: nn.Module, path: Path) -> Stats | None:
    """Load a weights file into `net`; return the normalisation it holds for `net`'s `Normalize` layer.

    The file is a plain state dict, a `.safetensors` file or a `train.py` checkpoint (`read_state_dict`). A
    state dict without the `Normalize` layer's entries (a network trained elsewhere) loads too: that layer then
    gets its values from the classifier's or the data's `mean`/`std`.
    """
    state = read_state_dict(path)
    stored = None
    name, layer = _first_normalize(net)
    if layer is not None:
        keys = [f"{name}.{buffer}" if name else buffer for buffer in ("mean", "std")]
        if all(key in state for key in keys):
            stored = _as_stats(state[keys[0]].flatten().tolist(), state[keys[1]].flatten().tolist())
        else:
            state = {**dict(zip(keys, (layer.mean, layer.std))), **state}
    fit_state_dict(
        net, state, path,
        hint="For a train.py checkpoint use the classifier's `checkpoint`; otherwise check `arch` and "
        "`model_kwargs` (or the `module`) against the model the weights were saved from.",
    )
    return stored


def _output_count(source: ClassifierSource, num_classes: int | None) -> dict[str, int]:
    """The `num_classes` setting of `arch`'s builder: `model_kwargs`', else the data's (none with a class_subset)."""
    if "num_classes" in source.model_kwargs:
        return {}
    if source.class_subset is not None:
        raise ValueError(
            f"With a class_subset, give {source.arch}'s number of outputs as model_kwargs: {{num_classes: N}}."
        )
    return {} if num_classes is None else {"num_classes": num_classes}


def _build_registered(
    source: ClassifierSource, num_classes: int | None, image_size: int | None, in_chans: int | None
) -> tuple[nn.Module, Stats | None]:
    kwargs = {**_output_count(source, num_classes), **source.model_kwargs}
    if image_size is not None:
        kwargs.setdefault("image_size", image_size)
    chans = kwargs.setdefault("in_chans", in_chans if in_chans is not None else 3)
    # Identity until build_classifier sets the resolved normalisation in the model's own Normalize layer.
    net = create_model(source.arch, mean=(0.0,) * chans, std=(1.0,) * chans, **kwargs)
    stored = _load_state_dict(net, Path(source.weights)) if source.weights is not None else None
    return net, stored


def _build_timm(
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
        net = timm.create_model(name, **_output_count(source, num_classes), **kwargs)
        stored = _load_state_dict(net, Path(source.weights)) if source.weights is not None else None
        return net, stored

    # Pretrained: the head is part of the weights, so num_classes stays timm's unless model_kwargs change it.
    config = _pretrained_config(name)
    path = Path(source.weights) if source.weights is not None else _cached_timm_weights(name, config)
    if config.custom_load:
        # A few models (e.g. ViTs from .npz files) read their file with their own loader, which takes no pickles.
        overlay = {"file": str(path)}
    else:
        # The state dict, read here as every weights file is (it cannot run code), makes timm adapt it (head,
        # input channels) without going to the hub or opening the file itself.
        overlay = {"state_dict": read_state_dict(path)}
    try:
        net = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except Exception as error:  # mismatched weights fail in many ways inside timm
        raise ValueError(f"Could not load timm's weights for {name!r} from {str(path)!r}: {error}") from error
    return net, _as_stats(config.mean, config.std)


def _pretrained_config(name: str) -> PretrainedCfg:
    """timm's pretrained configuration of `name` (`<model>` or `<model>.<tag>`), with a clear error if none."""
    from timm.models import get_pretrained_cfg

    try:
        config = get_pretrained_cfg(name)
    except RuntimeError as error:  # an unknown tag
        raise ValueError(f"timm has no pretrained weights {name!r}: {error}") from error
    if config is None or not (config.hf_hub_id or config.url or config.file):
        raise ValueError(
            f"timm has no pretrained weights for {name!r}; give `weights: <file>`, or see "
            "`timm.list_models(pretrained=True)`."
        )
    return config


def _hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, from the environment as it is now.

    huggingface_hub reads these variables once, when it is imported; reading them here honours a change made
    later in the process. Same precedence as `huggingface_hub.constants`.
    """
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.path.expandvars(os.environ[variable])).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
    )
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def _cached_timm_weights(name: str, config: PretrainedCfg) -> Path:
    """timm's pretrained weight file for `name` in the local caches; never downloads.

    Looks where `timm.create_model(name, pretrained=True)` would have stored it: the Hugging Face hub cache
    (`<cache>/models--timm--<model>.<tag>/snapshots/<revision>/model.safetensors`, `refs/main` naming the
    revision), then timm's older torch hub cache (`$TORCH_HOME/hub/checkpoints/<file of the url>`).
    """
    from huggingface_hub import try_to_load_from_cache

    if config.file:
        return Path(config.file)
    looked = []
    if config.hf_hub_id:
        repo_id, _, revision = config.hf_hub_id.partition("@")
        filenames = [config.hf_hub_filename] if config.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        cache = _hf_hub_cache()
        for filename in filenames:
            found = try_to_load_from_cache(repo_id, filename, cache_dir=cache, revision=revision or None)
            if isinstance(found, str):
                return Path(found)
            folder = cache / f"models--{repo_id.replace('/', '--')}"
            looked.append(str(folder / "snapshots" / f"<{revision or 'refs/main'}>" / filename))
    if config.url:
        legacy = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(config.url).path)
        if legacy.is_file():
            return legacy
        looked.append(str(legacy))
    fetch = f"hf download {repo_id}" if config.hf_hub_id else f"wget -P {legacy.parent} {config.url}"
    raise FileNotFoundError(
        f"timm's pretrained weights for {name!r} are not on this machine, and mglightning does not download at "
        f"run time. Looked for: {'; '.join(looked)}. On a machine with internet, fetch them with `{fetch}` or "
        f"`python -c \"import timm; timm.create_model('{name}', pretrained=True)\"` and copy the cache folder "
        "here (HF_HOME and TORCH_HOME choose where it is read), or give the file as the classifier's `weights`."
    )


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
