"""DeepLIFT (rescale rule, zero baseline) through Captum (docs/reference/semantics.md section 4)."""

from __future__ import annotations

import warnings

from captum.attr import DeepLift as CaptumDeepLift
from torch import Tensor, nn

from mglightning.explainers.base import Explainer, Explanation, check_scores_shape, sample_counts


class DeepLift(Explainer):
    """DeepLIFT with the rescale rule and a zero baseline (Shrikumar et al. 2017), computed by Captum's `DeepLift`.

    The attributions sum to `f_c(x) - f_c(0)` (summation-to-delta). Captum hooks the activation modules, so
    every activation must be its own module instance, used once per forward pass (docs/reference/semantics.md section 1); reused modules give
    wrong attributions. For `score="softmax"` an `nn.Softmax` module is appended (Captum has a rule for it); for
    `log_softmax` an `nn.LogSoftmax`, which Captum passes through as a plain gradient. DeepLIFT's modified
    backward pass is not differentiable, so an attack uses the surrogate `simple_gradient`.

    Args:
        model: classifier taking `(B, C, H, W)` images in [0, 1], in eval mode.
        score: `logit` (default), `log_softmax` or `softmax`.

    Example:
        >>> attr = DeepLift(model).attribute(images, target=labels)
    """

    name = "deeplift"
    display_name = "DeepLIFT"
    family = "propagation"
    supports_create_graph = False
    surrogate = "simple_gradient"

    def _explain(
        self, inputs: Tensor, target: Tensor, seeds: Tensor | None, create_graph: bool, initial: Tensor | None
    ) -> Explanation:
        layers = [self.model, _TargetRangeCheck(int(target.max()))]
        if self.score == "softmax":
            layers.append(nn.Softmax(dim=1))
        elif self.score == "log_softmax":
            layers.append(nn.LogSoftmax(dim=1))
        network = nn.Sequential(*layers)
        with warnings.catch_warnings():
            # Captum announces on every call that it hooks the activations (and removes the hooks afterwards).
            warnings.filterwarnings("ignore", message="Setting forward, backward hooks")
            inputs = inputs.detach().clone().requires_grad_(True)
            attributions = CaptumDeepLift(network).attribute(inputs, target=target)
        # Captum runs one forward+backward on the inputs and their baselines, concatenated.
        return Explanation(attributions.detach(), sample_counts(inputs.shape[0], 2))


class _TargetRangeCheck(nn.Module):
    """Identity on the logits that fails clearly when a target class is out of range (before Captum indexes it)."""

    def __init__(self, max_target: int) -> None:
        super().__init__()
        self.max_target = max_target

    def forward(self, logits: Tensor) -> Tensor:
        check_scores_shape(logits, self.max_target)
        return logits
