"""Norm-regularised adversarial training: perturbations whose dual norm structures the simple gradient.

Gong, Dou & Farnia, "Structured Gradient-based Interpretations via Norm-Regularized Adversarial Training"
(CVPR 2024; reference code `peterant330/AdvGrad`, `imagenet_train.py`). Training on the worst-case input in a
norm ball adds, to first order, the dual norm of the input gradient to the loss:
`max_{||d|| <= eps} L(x + d) ~ L(x) + eps * ||grad_x L||_*`. An L-inf ball penalises the L1 norm (sparse
gradients), a per-group L2 ball (the L2,inf norm) the group L2,1 norm (group-sparse gradients), and the
elastic-net-regularised perturbation the elastic net. :class:`AdversarialTraining` computes these perturbations
for a training batch; `ClassifierModule(adversarial=...)` trains on them.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mglightning.explainers.prox import check_group_size

MODES = ("none", "l1", "elastic", "group")
TRAININGS = ("fast", "iterative")
# The reference's iterative l1 attack steps 0.3 * epsilon per iteration; our defaults for the two modes whose
# reference step is an absolute L2 length in normalised units take the same 0.3 of the set's L2 radius.
STEP_FRACTION = 0.3


@dataclass(frozen=True)
class AdversarialTraining:
    """The perturbation of norm-regularised adversarial training (Gong, Dou & Farnia, CVPR 2024).

    With `g` the gradient of the training batch's cross-entropy with respect to the input (each sample's own
    loss, as the reference's summed loss), the perturbed batch is, per mode:

    - `l1` (L-inf ball, penalises `||g||_1`: sparse gradients). `fast`: `x + epsilon * sign(g)`.
      `iterative`: `steps` sign steps of `step_size`, each projected onto the L-inf ball of radius `epsilon`
      (PGD from `x`, no random start).
    - `elastic` (elastic net). `fast`: `x + epsilon * sign(g) + 2 * epsilon2 * g`. `iterative`: `steps` ascent
      steps of L2 length `step_size` along the normalised gradient of
      `loss(x + d) - ||relu(|d| - epsilon)||^2 / (4 * epsilon2)` (a soft penalty, no projection).
    - `group` (per-group L2 ball, the L2,inf norm; penalises the group L2,1 norm: group-sparse gradients).
      Groups are `group_size x group_size` spatial blocks across all channels. `fast`: `g` scaled to L2 norm
      `epsilon` in every group. `iterative`: `steps` steps of L2 length `step_size` along the normalised
      gradient, each followed by projecting every group onto the L2 ball of radius `epsilon`.
    - `none`: no perturbation (standard training; every other setting is ignored).

    **Units.** Budgets are in [0, 1] pixel units like everything else in mglightning. The reference works on
    normalised images `x_n = (x - mean) / std`; with the dataset's std `s` (a scalar where the channels
    differ), `epsilon_pixel = epsilon_normalised * s` (l1, elastic, group) and
    `epsilon2_pixel = epsilon2_normalised * s^2`; a step in normalised units is `step * s` pixels. The
    reference's README example `--epsilon 0.01 --epsilon2 0.05` on ImageNette (s ~ 0.226) is
    `epsilon = 0.00226`, `epsilon2 = 0.00256` here.

    **As in the reference:** the formulas above, 7 iterations with step `0.3 * epsilon` (l1), unit-L2-normalised
    gradient steps (elastic, group), iterations that start at the clean input, the network in training mode
    while perturbing (batch-norm layers normalise with the batch's statistics), and training on the perturbed
    batch alone. **Ours:** every iterate and the result are clamped to [0, 1] (the reference perturbs
    normalised images without a box; clamping never leaves the L-inf or group ball, as the clean input is
    inside the box); batch-norm *running* statistics are not updated by the perturbation's passes (the
    reference updates them on every pass, 8 times per step with iterative training), so they follow only the
    batches the network is trained on; groups span all channels (the reference groups each channel separately;
    ours matches Group-Sparse MoreauGrad's groups); a group or sample with a zero gradient gets a zero step
    (the reference divides by zero); the default `step_size` of `elastic` and `group` (the reference's are 0.3
    and 1.0 in normalised L2 units, which have no pixel-unit meaning without the dataset's std).

    Args:
        mode: `none`, `l1`, `elastic` or `group`.
        training: `fast` (one step) or `iterative` (`steps` projected steps).
        epsilon: the budget in [0, 1] pixel units, > 0: the L-inf radius (`l1`), the elastic net's L1 weight
            (`elastic`), the L2 radius of every group (`group`). Required unless `mode` is `none`.
        epsilon2: the elastic net's L2 weight, > 0; required by `elastic` and used only there.
        group_size: side of the square groups, which must divide the image height and width; required by
            `group` and used only there.
        steps: iterations of `iterative` training (the reference's 7).
        step_size: the step of `iterative` training: per pixel for `l1` (default `0.3 * epsilon`, the
            reference's), the L2 length of each step for `elastic` (default `0.3 * epsilon * sqrt(C*H*W)`, the L2
            length of the l1 step) and `group` (default `0.3 * epsilon * sqrt(number of groups)`, 0.3 of the
            L2 radius of the set of group-bounded perturbations).

    Example:
        >>> adversarial = AdversarialTraining(mode="l1", epsilon=8 / 255)
        >>> perturbed, clean_logits = adversarial.perturb(model, images, labels)
        >>> loss = F.cross_entropy(model(perturbed), labels)   # what ClassifierModule trains on

        In a training config: `model: {adversarial: {mode: group, epsilon: 0.2, group_size: 4}}`.
    """

    mode: Literal["none", "l1", "elastic", "group"] = "none"
    training: Literal["fast", "iterative"] = "fast"
    epsilon: Optional[float] = None
    epsilon2: Optional[float] = None
    group_size: Optional[int] = None
    steps: int = 7
    step_size: Optional[float] = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"model.adversarial.mode must be one of {', '.join(MODES)}; got {self.mode!r}.")
        if self.mode == "none":
            return
        if self.training not in TRAININGS:
            raise ValueError(
                f"model.adversarial.training must be one of {', '.join(TRAININGS)}; got {self.training!r}."
            )
        _check_positive_number("epsilon", self.epsilon, f"set the perturbation budget of mode {self.mode!r}")
        if self.mode in ("l1", "elastic") and self.epsilon > 1:
            raise ValueError(
                f"model.adversarial.epsilon={self.epsilon} is larger than the whole [0, 1] pixel range; budgets are "
                "in [0, 1] pixel units (a budget on normalised images is epsilon * std in pixels)."
            )
        if self.mode == "elastic":
            _check_positive_number("epsilon2", self.epsilon2, "mode 'elastic' needs the elastic net's L2 weight")
        elif self.epsilon2 is not None:
            raise ValueError(
                f"model.adversarial.epsilon2 is used only by mode 'elastic', not {self.mode!r}; remove it."
            )
        if self.mode == "group":
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(
                    f"model.adversarial.group_size must be an integer >= 1 dividing the image size for mode "
                    f"'group', got {self.group_size!r}."
                )
        elif self.group_size is not None:
            raise ValueError(
                f"model.adversarial.group_size is used only by mode 'group', not {self.mode!r}; remove it."
            )
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"model.adversarial.steps must be an integer >= 1, got {self.steps!r}.")
        if self.step_size is not None:
            _check_positive_number("step_size", self.step_size, "or leave it null for the mode's default")

    @property
    def enabled(self) -> bool:
        """Whether training is adversarial (`mode` is not `none`)."""
        return self.mode != "none"

    def check_input_shape(self, shape: torch.Size | tuple[int, ...]) -> None:
        """Raise a `ValueError` if images of `shape` (`(B, C, H, W)`) cannot be split into groups.

        `ClassifierModule` calls it with the datamodule's image size when it is built, before any batch.
        """
        if self.mode != "group":
            return
        try:
            check_group_size(tuple(shape), self.group_size)
        except ValueError as error:
            raise ValueError(f"model.adversarial: {error}") from None

    def resolved_step_size(self, shape: torch.Size | tuple[int, ...]) -> float:
        """The step of `iterative` training for images of `shape` (`step_size`, or the mode's default)."""
        if self.step_size is not None:
            return float(self.step_size)
        channels, height, width = shape[-3:]
        if self.mode == "l1":
            return STEP_FRACTION * self.epsilon
        if self.mode == "elastic":
            return STEP_FRACTION * self.epsilon * math.sqrt(channels * height * width)
        return STEP_FRACTION * self.epsilon * math.sqrt((height // self.group_size) * (width // self.group_size))

    def perturb(self, model: nn.Module, inputs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The perturbed batch to train on, and the model's logits on the clean batch.

        The model is used in the mode it is in (training: batch-norm layers use the batch's statistics), but
        batch-norm running statistics are left as they were. Parameters' `.grad` and `inputs` are not touched.

        Args:
            model: the classifier, taking `(B, C, H, W)` images in [0, 1].
            inputs: the clean batch in [0, 1].
            labels: `(B,)` class indices.

        Returns:
            `(perturbed, clean_logits)`: the perturbed images in [0, 1] (detached; `inputs` itself for mode
            `none`) and the detached logits of the clean batch from the first gradient pass (free: every mode's
            first pass is at the clean input), for the clean accuracy and loss.
        """
        self.check_input_shape(inputs.shape)
        clean = inputs.detach()
        with torch.enable_grad(), _running_statistics_frozen(model):
            if self.mode == "none":
                return clean, model(clean).detach()
            gradient, clean_logits = self._ascent_direction(model, clean, torch.zeros_like(clean), labels)
            if self.training == "fast":
                perturbed = clean + self._fast_step(gradient)
            else:
                perturbed = self._iterate(model, clean, labels, gradient)
        return perturbed.clamp(0.0, 1.0).detach(), clean_logits

    def _ascent_direction(self, model: nn.Module, clean: Tensor, delta: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The gradient of the attack's objective at `clean + delta`, and the logits there."""
        points = (clean + delta).requires_grad_(True)
        logits = model(points)
        # Each sample's own loss (the reference multiplies the mean by the batch size), so `g` per sample does
        # not depend on the batch size.
        objective = F.cross_entropy(logits, labels, reduction="sum")
        if self.mode == "elastic":
            excess = F.relu((points - clean).abs() - self.epsilon)
            objective = objective - excess.square().sum() / (4 * self.epsilon2)
        (gradient,) = torch.autograd.grad(objective, points)
        return gradient, logits.detach()

    def _fast_step(self, gradient: Tensor) -> Tensor:
        if self.mode == "l1":
            return self.epsilon * gradient.sign()
        if self.mode == "elastic":
            return self.epsilon * gradient.sign() + 2 * self.epsilon2 * gradient
        return self.epsilon * gradient / _group_norms(gradient, self.group_size).clamp_min(_tiny(gradient))

    def _iterate(self, model: nn.Module, clean: Tensor, labels: Tensor, gradient: Tensor) -> Tensor:
        step_size = self.resolved_step_size(clean.shape)
        delta = torch.zeros_like(clean)
        for step in range(self.steps):
            if step > 0:
                gradient, _ = self._ascent_direction(model, clean, delta, labels)
            if self.mode == "l1":
                delta = (delta + step_size * gradient.sign()).clamp(-self.epsilon, self.epsilon)
            else:
                delta = delta + step_size * _unit_l2(gradient)
                if self.mode == "group":
                    norms = _group_norms(delta, self.group_size)
                    delta = delta * (self.epsilon / norms.clamp_min(_tiny(delta))).clamp(max=1.0)
            # Clamping to the box only moves a coordinate towards the clean input, so it stays in the ball.
            delta = (clean + delta).clamp(0.0, 1.0) - clean
        return clean + delta


def _check_positive_number(name: str, value: object, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"model.adversarial.{name} must be a number > 0 ({hint}), got {value!r}.")


def _tiny(values: Tensor) -> float:
    return torch.finfo(values.dtype).tiny


def _unit_l2(values: Tensor) -> Tensor:
    """Each sample scaled to L2 norm 1 (an all-zero sample stays zero)."""
    norms = torch.linalg.vector_norm(values.flatten(1), dim=1).view(-1, *([1] * (values.ndim - 1)))
    return values / norms.clamp_min(_tiny(values))


def _group_norms(values: Tensor, group_size: int) -> Tensor:
    """The L2 norm of each `group_size x group_size` block across all channels, broadcast to its pixels."""
    batch, channels, height, width = values.shape
    blocks = values.reshape(batch, channels, height // group_size, group_size, width // group_size, group_size)
    norms = torch.linalg.vector_norm(blocks, dim=(1, 3, 5), keepdim=True)
    return norms.expand_as(blocks).reshape(values.shape)


@contextmanager
def _running_statistics_frozen(model: nn.Module) -> Iterator[None]:
    """Batch-norm layers in training mode normalise with the batch's statistics but do not update their running
    statistics (nor their batch counter) inside the block."""
    layers = [
        module
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and module.track_running_stats
    ]
    # A training-mode batch norm without running-statistics tracking normalises with the batch's statistics and
    # updates nothing: exactly what the perturbation's passes need.
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True
