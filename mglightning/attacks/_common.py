"""Input checks and small helpers shared by the attacks (the argument checks themselves are `mglightning.checks`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mglightning.checks import check_autograd, check_inputs, check_number, format_seeds


def check_epsilon(owner: str, epsilon: float) -> float:
    """Return `epsilon` as a float, or raise a `ValueError` naming `owner` unless it is a finite number > 0 (the L2
    radius of the perturbation in [0, 1] pixel units)."""
    check_number(owner, "epsilon", epsilon)
    return float(epsilon)


def check_images(owner: str, inputs: Tensor) -> None:
    """Raise a `ValueError` unless `inputs` is a finite floating batch `(B, C, H, W)` of images in [0, 1], and an
    `AutogradDisabledError` under `torch.inference_mode()`."""
    check_inputs(inputs)
    if inputs.min() < 0 or inputs.max() > 1:
        raise ValueError(
            f"{owner}: inputs must be images in [0, 1] (normalisation is the model's first layer, "
            f"docs/reference/semantics.md section 1), got values in [{inputs.min().item():.4g}, "
            f"{inputs.max().item():.4g}]."
        )
    check_autograd(owner)


def resolve_seeds(seeds: Tensor | None, batch_size: int) -> Tensor:
    """Per-sample seeds: `seeds` checked to be `(B,)` integers, or B seeds drawn from torch's global RNG."""
    if seeds is None:
        # Drawn from the global generator, so torch.manual_seed reproduces the whole attack.
        return torch.randint(0, 2**31 - 1, (batch_size,), dtype=torch.long)
    return format_seeds(seeds, batch_size)


@torch.no_grad()
def predict(model: nn.Module, inputs: Tensor) -> Tensor:
    """The model's predicted class per sample (in whatever train/eval mode the model is)."""
    return model(inputs).argmax(dim=1)


def project_to_ball(candidate: Tensor, center: Tensor, epsilon: float) -> Tensor:
    """Project each sample of `candidate` onto the L2 ball of radius `epsilon` around `center`, then clamp.

    Clamping to [0, 1] after the projection cannot leave the ball: `center` lies in [0, 1], so clamping only
    moves a coordinate closer to it.
    """
    offset = candidate - center
    norms = offset.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    scale = (epsilon / norms.clamp_min(torch.finfo(norms.dtype).tiny)).clamp(max=1.0)
    return (center + offset * scale).clamp(0.0, 1.0)
