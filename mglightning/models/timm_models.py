"""timm classifiers (ImageNet's EfficientNet-b0 in the paper) and timm's pretrained weights on this machine.

`TimmClassifier` puts a timm model behind the same [0, 1] normalisation layer as every mglightning model;
`pretrained_config` and `cached_pretrained_weights` find the configuration and the local file of timm's
pretrained weights, which mglightning never downloads at run time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence
from urllib.parse import urlparse

import torch
from torch import nn

from mglightning.models.layers import Normalize

if TYPE_CHECKING:
    from timm.models import PretrainedCfg


class TimmClassifier(nn.Module):
    """`Normalize` followed by a timm model, so that it takes images in [0, 1] like every mglightning model.

    Args:
        timm_name: the timm model name, e.g. `efficientnet_b0`.
        num_classes: output classes (timm replaces the head if it differs from the pretrained one).
        pretrained: load timm's pretrained weights (needs them in the local Hugging Face cache or internet).
        image_size: accepted for a uniform interface with the other builders (timm models are size-agnostic).
        in_chans: input channels.
        mean, std: normalisation statistics; default to the pretrained configuration's.
    """

    def __init__(
        self,
        timm_name: str,
        num_classes: int = 1000,
        pretrained: bool = False,
        image_size: int = 224,
        in_chans: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        import timm

        if not timm.is_model(timm_name):
            raise ValueError(
                f"timm has no model named {timm_name!r}; see `timm.list_models()` for the available names."
            )
        try:
            self.net = timm.create_model(
                timm_name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans
            )
        except Exception as error:  # timm raises several kinds of errors when the hub cannot be reached
            if not pretrained:
                raise
            raise RuntimeError(
                f"Could not load pretrained weights for timm model {timm_name!r} ({type(error).__name__}: {error}). "
                "Without internet, download them once on a connected machine into the Hugging Face cache "
                "(HF_HOME), or build the model with pretrained=False and pass weights=<local file>."
            ) from error
        config = self.net.pretrained_cfg
        self.num_classes = num_classes
        self.normalize = Normalize(mean or config.get("mean"), std or config.get("std"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def pretrained_config(name: str) -> PretrainedCfg:
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


def cached_pretrained_weights(name: str, config: PretrainedCfg) -> Path:
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
