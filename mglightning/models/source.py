"""What an evaluation's classifier may be: a `ClassifierSource`, checked when it is declared.

A source names exactly one of a `train.py` checkpoint, a registered or timm architecture with its weights, or
any `nn.Module`; every setting that cannot describe a classifier is refused here, before any file is read.
`mglightning.models.loading` takes a source to a checked classifier.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from mglightning.models.registry import TIMM_PREFIX

# ClassifierSource holds these itself, so `model_kwargs` may not set them a second time.
_RESERVED_KWARGS = ("pretrained", "weights", "mean", "std")


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

