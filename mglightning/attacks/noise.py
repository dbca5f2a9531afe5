"""Random L2 noise: the weak reference attack of SPEC section 5."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mglightning.attacks._common import check_epsilon, check_images, predict, resolve_seeds


class GaussianNoise:
    """Add a random perturbation of L2 norm ``epsilon`` to each image (a weaker reference than the top-k attack).

    Sample ``i`` gets the direction of a standard normal draw from its own seed ``seeds[i]`` (drawn on the CPU
    in float64, so the noise does not depend on the batch, the device or the dtype), scaled to L2 norm
    ``epsilon``; the result is clamped to [0, 1], which can only shorten the perturbation. With ``model`` given,
    the same label rule as :class:`TopKInterpretationAttack` applies: a sample whose prediction changes is
    returned clean and reported as not moved. Without a model every sample is moved.

    It has :class:`TopKInterpretationAttack`'s cost and warm-start attributes, so both are read the same way:
    :attr:`last_gradient_evaluations` is 0 and :attr:`last_sample_gradient_evaluations` zeros (no gradient is
    computed; the label check is forward-only), and :attr:`last_displacement` is None (nothing was solved).

    Args:
        epsilon: L2 norm of the perturbation in [0, 1] pixel units, > 0.
        model: the classifier whose prediction must be kept, or None to skip the label check. Default None.

    Example:
        >>> noise = GaussianNoise(epsilon=0.5)
        >>> inputs = torch.full((2, 3, 8, 8), 0.5)
        >>> noisy, moved = noise.perturb(inputs, target=0, seeds=torch.tensor([0, 1]))
        >>> (noisy - inputs).flatten(1).norm(dim=1), moved
        (tensor([0.5000, 0.5000]), tensor([True, True]))
    """

    surrogate_name = "none"  # nothing is differentiated; the same attribute as TopKInterpretationAttack's

    def __init__(self, epsilon: float, model: nn.Module | None = None) -> None:
        self.epsilon = check_epsilon(epsilon)
        self.model = model
        self.last_gradient_evaluations: int | None = None
        self.last_sample_gradient_evaluations: Tensor | None = None
        self.last_displacement: Tensor | None = None

    def perturb(
        self, inputs: Tensor, target: int | Tensor, seeds: Tensor | None = None, initial: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Perturb a batch of images.

        Args:
            inputs: clean images ``(B, C, H, W)`` in [0, 1] (left unchanged).
            target: unused (the noise does not depend on the class); kept so every attack has the same call.
            seeds: ``None`` or a ``(B,)`` integer tensor, one seed per sample; ``None`` draws them from torch's
                global RNG.
            initial: unused (nothing is solved); kept so every attack has the same call.

        Returns:
            ``(noisy_inputs, moved_mask)``, the second a ``(B,)`` bool tensor, True where the sample changed.
        """
        check_images(inputs)
        seeds = resolve_seeds(seeds, inputs.shape[0])
        self.last_sample_gradient_evaluations = torch.zeros(inputs.shape[0], dtype=torch.long)
        self.last_gradient_evaluations = 0
        clean = inputs.detach()
        # One generator per sample (a loop over noise draws, not over the model) keeps sample i's noise a
        # function of seeds[i] alone.
        directions = torch.stack(
            [
                torch.randn(clean.shape[1:], generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
                for seed in seeds.tolist()
            ]
        )
        directions = directions / directions.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        noisy = (clean + self.epsilon * directions.to(device=clean.device, dtype=clean.dtype)).clamp(0.0, 1.0)
        moved = (noisy != clean).flatten(1).any(dim=1)
        if self.model is not None:
            moved &= predict(self.model, noisy) == predict(self.model, clean)
        return torch.where(moved.view(-1, 1, 1, 1), noisy, clean), moved
