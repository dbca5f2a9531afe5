"""RelEx (Lim et al. 2021, "Building reliable explanations of unreliable neural networks"), docs/reference/semantics.md section 4."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mglightning.checks import check_internal_batch_size, check_number, check_positive_int
from mglightning.explainers.base import ClassScore, Explainer, Explanation, sample_counts
from mglightning.explainers.batching import InternalBatchSize, chunk_ranges
from mglightning.random import Stream, normal, uniform

# Keeps log(1 - p) finite when the background score reaches 1 (the official code's constant).
_LOG_EPS = 1e-7


class RelEx(Explainer):
    """RelEx: a per-sample mask `m in [0, 1]^{H x W}` that keeps the class probability of `x * m` high and that of
    `x * (1 - m)` low, averaged over noisy copies of `x`.

    Per sample, the loss is the mean over `noise_samples` fresh noisy copies `x~ = x + n` of
    `-log p_c(x~ * m) - lambda2 * log(1 - p_c(x~ * (1 - m)) + 1e-7)`, plus `lambda1 * ||m||_1`. The mask starts
    uniform in [0, 0.01), and each of the `num_steps` SGD steps (momentum `momentum`, rate `lr`) uses the loss
    gradient divided by its L2 norm, then clips `m` to [0, 1] (as in the official code). The map is `m` repeated
    over the channels. Sample `i`'s initial mask (`Stream.RELEX_MASK`) and its noise at step `t`
    (`Stream.NOISE`, step `t`) come from `seeds[i]` (`mglightning.random`, drawn on the inputs' device); the mask
    optimisation is not differentiable, so an attack uses the surrogate `simple_gradient`.

    Args:
        model: classifier taking `(B, C, H, W)` images in [0, 1], in eval mode.
        num_steps: SGD iterations (default 50).
        noise_samples: noisy copies per iteration (default 50).
        noise_std: noise standard deviation in [0, 1] pixel units (default 0.1).
        lr: SGD learning rate (default 0.1).
        momentum: SGD momentum (default 0.99).
        lambda1: L1 coefficient of the mask (default 1e-4).
        lambda2: weight of the background term (default 1).
        internal_batch_size: the most model inputs per forward/backward (each noisy copy is evaluated twice,
            masked and inverse-masked); `"auto"` (default: fill the free memory on CUDA, 256 elsewhere) or
            `None` (all at once).
        score: must be `softmax`: RelEx's loss is defined on class probabilities.

    Example:
        >>> attr = RelEx(model).attribute(images, target=labels, seeds=torch.arange(len(images)))
    """

    name = "relex"
    display_name = "RelEx"
    family = "perturbation"
    supports_create_graph = False
    surrogate = "simple_gradient"

    def __init__(
        self,
        model: nn.Module,
        num_steps: int = 50,
        noise_samples: int = 50,
        noise_std: float = 0.1,
        lr: float = 0.1,
        momentum: float = 0.99,
        lambda1: float = 1e-4,
        lambda2: float = 1.0,
        internal_batch_size: InternalBatchSize = "auto",
        score: str = "softmax",
    ) -> None:
        super().__init__(model, score)
        owner = type(self).__name__
        if score != "softmax":
            raise ValueError(
                f"{owner}: score must be 'softmax' (its loss is defined on class probabilities), got {score!r}."
            )
        check_positive_int(owner, "num_steps", num_steps)
        check_positive_int(owner, "noise_samples", noise_samples)
        check_number(owner, "noise_std", noise_std, positive=False)
        check_number(owner, "lr", lr)
        check_number(owner, "momentum", momentum, positive=False)
        if momentum >= 1:
            raise ValueError(f"{owner}: momentum must be in [0, 1), got {momentum}.")
        check_number(owner, "lambda1", lambda1, positive=False)
        check_number(owner, "lambda2", lambda2, positive=False)
        check_internal_batch_size(owner, internal_batch_size)
        self.num_steps = num_steps
        self.noise_samples = noise_samples
        self.noise_std = noise_std
        self.lr = lr
        self.momentum = momentum
        self.lambda1 = lambda1
        self.lambda2 = lambda2
        self.internal_batch_size = internal_batch_size

    @property
    def uses_noise(self) -> bool:
        return True

    def _explain(
        self, inputs: Tensor, target: Tensor, seeds: Tensor | None, create_graph: bool, initial: Tensor | None
    ) -> Explanation:
        inputs = inputs.detach()
        batch, _, height, width = inputs.shape
        seeds = seeds.to(inputs.device)
        mask = uniform(seeds, (1, height, width), stream=Stream.RELEX_MASK, dtype=inputs.dtype) / 100
        velocity = torch.zeros_like(mask)
        objective = self._objective(target)
        # Each noisy copy is two model inputs (masked and inverse-masked).
        rows = self._rows_per_pass(objective, inputs)
        copies_per_chunk = None if rows is None else max(1, rows // 2)
        for step in range(self.num_steps):
            gradient = self._loss_gradient(inputs, mask, objective, seeds, step, copies_per_chunk)
            norm = torch.linalg.vector_norm(gradient.flatten(1), dim=1).clamp_min(torch.finfo(mask.dtype).tiny)
            velocity = self.momentum * velocity + gradient / norm.view(-1, 1, 1, 1)
            mask = (mask - self.lr * velocity).clamp(0, 1)
        # Every step sends each noisy copy through the model twice (masked and inverse-masked).
        counts = sample_counts(batch, self.num_steps * 2 * self.noise_samples)
        return Explanation(mask.expand_as(inputs).clone(), counts)

    def _loss_gradient(
        self, inputs: Tensor, mask: Tensor, objective: ClassScore, seeds: Tensor, step: int,
        copies_per_chunk: int | None,
    ) -> Tensor:
        """Gradient of every sample's loss with respect to its mask, the noisy copies evaluated in chunks."""
        copies = self.noise_samples
        batch = inputs.shape[0]
        mask = mask.detach().requires_grad_(True)
        gradient = torch.zeros_like(mask)
        for start, stop in chunk_ranges(batch * copies, copies_per_chunk):
            row_index = torch.arange(start, stop, device=inputs.device)
            sample_index = row_index // copies
            noise = normal(seeds[sample_index], inputs.shape[1:], stream=Stream.NOISE, step=step,
                           copy_index=row_index % copies, dtype=inputs.dtype)
            noisy = inputs[sample_index] + noise.mul_(self.noise_std)
            sample_mask = mask[sample_index]
            logits = self.model(torch.cat([noisy * sample_mask, noisy * (1 - sample_mask)]))
            rows = stop - start
            foreground = objective.select(logits[:rows], sample_index, "log_softmax")
            background = objective.select(logits[rows:], sample_index, "softmax")
            loss = (-foreground - self.lambda2 * torch.log(1 - background + _LOG_EPS)).sum() / copies
            gradient += torch.autograd.grad(loss, mask)[0]
        return gradient + self.lambda1 * torch.sign(mask.detach())
