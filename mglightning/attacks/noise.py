"""Random L2 noise: the weak reference attack of docs/reference/semantics.md section 5."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mglightning.attacks._common import check_epsilon, check_images, predict, resolve_seeds
from mglightning.attacks.base import Attack, AttackResult
from mglightning.random import Stream, normal


class GaussianNoise(Attack):
    """Add a random perturbation of L2 norm ``epsilon`` to each image (a weaker reference than the top-k attack).

    Sample ``i`` gets the direction of a standard normal draw from its own seed ``seeds[i]``
    (``mglightning.random``, ``Stream.ATTACK``; drawn in float64 on the inputs' device, so the noise does not
    depend on the batch, the device or the dtype beyond the final rounding), scaled to L2 norm
    ``epsilon``; the result is clamped to [0, 1], which can only shorten the perturbation. With an explainer
    given, the same label rule as :class:`TopKInterpretationAttack` applies to its model: a sample whose
    prediction changes is returned clean and reported as not moved. Without one every sample is moved.

    Its result reports no cost (no gradient is computed; the label check is forward-only) and no solution
    (nothing was solved).

    Args:
        explainer: the explainer under attack (its model's prediction must be kept), or None to skip the label
            check. The noise itself does not depend on it.
        epsilon: L2 norm of the perturbation in [0, 1] pixel units, > 0.

    Example:
        >>> noise = GaussianNoise(None, epsilon=0.5)
        >>> inputs = torch.full((2, 3, 8, 8), 0.5)
        >>> noisy, moved = noise.perturb(inputs, target=0, seeds=torch.tensor([0, 1]))
        >>> (noisy - inputs).flatten(1).norm(dim=1), moved
        (tensor([0.5000, 0.5000]), tensor([True, True]))
    """

    name = "gaussian"
    surrogate_name = "none"  # nothing is differentiated

    def __init__(self, explainer: object | None, epsilon: float) -> None:
        if explainer is not None and not isinstance(getattr(explainer, "model", None), nn.Module):
            raise ValueError(
                f"GaussianNoise takes the explainer under attack (or None), got {type(explainer).__name__}."
            )
        self.epsilon = check_epsilon(type(self).__name__, epsilon)
        self.model = explainer.model if explainer is not None else None

    def run(
        self, inputs: Tensor, target: int | Tensor, *, seeds: Tensor | None = None, initial: Tensor | None = None
    ) -> AttackResult:
        """Perturb a batch of images.

        Args:
            inputs: clean images ``(B, C, H, W)`` in [0, 1] (left unchanged).
            target: unused (the noise does not depend on the class); kept so every attack has the same call.
            seeds: ``None`` or a ``(B,)`` integer tensor, one seed per sample; ``None`` draws them from torch's
                global RNG.
            initial: unused (nothing is solved); kept so every attack has the same call.

        Returns:
            An :class:`AttackResult` with the noisy inputs and a ``(B,)`` bool tensor, True where the sample
            changed.
        """
        check_images(type(self).__name__, inputs)
        seeds = resolve_seeds(seeds, inputs.shape[0])
        clean = inputs.detach()
        directions = normal(seeds.to(clean.device), clean.shape[1:], stream=Stream.ATTACK, dtype=torch.float64)
        directions = directions / directions.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        noisy = (clean + self.epsilon * directions.to(device=clean.device, dtype=clean.dtype)).clamp(0.0, 1.0)
        moved = (noisy != clean).flatten(1).any(dim=1)
        if self.model is not None:
            moved &= predict(self.model, noisy) == predict(self.model, clean)
        cost = torch.zeros(inputs.shape[0], dtype=torch.long)
        return AttackResult(torch.where(moved.view(-1, 1, 1, 1), noisy, clean), moved, cost)
