"""Input checks and small helpers shared by the attacks."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mglightning.explainers.base import check_inputs


def check_epsilon(epsilon: float) -> float:
    """Return ``epsilon`` as a float, or raise a ValueError unless it is a finite number > 0."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon <= 0:
        raise ValueError(
            f"`epsilon` must be a finite number > 0 (the L2 radius of the perturbation in [0, 1] pixel units), "
            f"got {epsilon!r}."
        )
    return float(epsilon)


def check_images(inputs: Tensor) -> None:
    """Raise a ValueError unless ``inputs`` is a finite floating batch ``(B, C, H, W)`` of images in [0, 1]."""
    check_inputs(inputs)
    if inputs.numel() and (inputs.min() < 0 or inputs.max() > 1):
        raise ValueError(
            f"`inputs` must be images in [0, 1] (normalisation is the model's first layer, docs/reference/semantics.md section 1), got values in "
            f"[{inputs.min().item():.4g}, {inputs.max().item():.4g}]."
        )
    if torch.is_inference_mode_enabled():
        raise ValueError(
            "attacks need autograd but are running under torch.inference_mode(); call them outside it "
            "(in Lightning, build the Trainer with inference_mode=False)."
        )


def resolve_seeds(seeds: Tensor | None, batch_size: int) -> Tensor:
    """Per-sample seeds: ``seeds`` checked to be a ``(B,)`` integer tensor, or B seeds drawn from torch's RNG."""
    if seeds is None:
        # Drawn from the global generator, so torch.manual_seed reproduces the whole attack.
        return torch.randint(0, 2**31 - 1, (batch_size,), dtype=torch.long)
    if not isinstance(seeds, Tensor) or seeds.is_floating_point() or seeds.is_complex() or seeds.dtype == torch.bool:
        raise ValueError(f"`seeds` must be None or an integer tensor with one seed per sample, got {seeds!r}.")
    if seeds.shape != (batch_size,):
        raise ValueError(f"`seeds` must have shape ({batch_size},), one seed per sample, got {tuple(seeds.shape)}.")
    return seeds


@torch.no_grad()
def predict(model: nn.Module, inputs: Tensor) -> Tensor:
    """The model's predicted class per sample (in whatever train/eval mode the model is)."""
    return model(inputs).argmax(dim=1)


def project_to_ball(candidate: Tensor, center: Tensor, epsilon: float) -> Tensor:
    """Project each sample of ``candidate`` onto the L2 ball of radius ``epsilon`` around ``center``, then clamp.

    Clamping to [0, 1] after the projection cannot leave the ball: ``center`` lies in [0, 1], so clamping only
    moves a coordinate closer to it.
    """
    offset = candidate - center
    norms = offset.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    scale = (epsilon / norms.clamp_min(torch.finfo(norms.dtype).tiny)).clamp(max=1.0)
    return (center + offset * scale).clamp(0.0, 1.0)
