"""Interpretation attacks (SPEC section 5).

Both attacks share ``perturb(inputs, target, seeds=None) -> (adversarial_inputs, moved_mask)`` and a
``surrogate_name`` attribute: ``TopKInterpretationAttack`` (L2-bounded top-k attack through the explainer's
differentiable map or its surrogate) and ``GaussianNoise`` (random L2 noise, the weak reference).
"""

from mglightning.attacks.noise import GaussianNoise
from mglightning.attacks.topk import TopKInterpretationAttack

__all__ = ["GaussianNoise", "TopKInterpretationAttack"]
