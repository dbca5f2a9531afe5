"""Layers shared by the model builders."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

ACTIVATIONS = ("softplus", "relu")


class Normalize(nn.Module):
    """Per-channel `(x - mean) / std`: the first layer of every classifier, so models take [0, 1] images."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean and std must have one value per channel, got {len(mean)} and {len(std)}.")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be positive, got {tuple(std)}.")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def make_activation(name: str, beta: float = 1.0) -> nn.Module:
    """A fresh activation module (one per use: Captum's DeepLift hooks modules and breaks on reuse)."""
    if name == "softplus":
        return nn.Softplus(beta=beta)
    if name == "relu":
        # Not in-place: in-place activations break input-gradient hooks.
        return nn.ReLU()
    raise ValueError(f"Unknown activation {name!r}; choose one of {ACTIVATIONS}.")
