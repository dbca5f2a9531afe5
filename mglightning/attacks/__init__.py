"""Interpretation attacks (docs/reference/semantics.md section 5).

Every attack is an :class:`Attack` built as ``Attack(explainer, epsilon, **settings)`` whose
``run(inputs, target, seeds=None, initial=None)`` returns an :class:`AttackResult` (``perturb`` returns just
``(adversarial_inputs, moved_mask)``): ``TopKInterpretationAttack`` (L2-bounded top-k attack through the
explainer's differentiable map or its surrogate) and ``GaussianNoise`` (random L2 noise, the weak reference).
"""

from mglightning.attacks.base import Attack, AttackResult
from mglightning.attacks.noise import GaussianNoise
from mglightning.attacks.topk import TopKInterpretationAttack

__all__ = ["Attack", "AttackResult", "GaussianNoise", "TopKInterpretationAttack"]
