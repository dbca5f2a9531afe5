"""What every interpretation attack shares: its result and its call."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor


@dataclass(frozen=True)
class AttackResult:
    """What one `Attack.run` call returns.

    Attributes:
        inputs: `(B, C, H, W)` perturbed images, detached, within the budget and [0, 1].
        moved: `(B,)` bool tensor, True where the returned input is not the clean one.
        gradient_evaluations: `(B,)` long CPU tensor, the model input rows of each sample that the attack sent
            through a forward+backward.
        solution: for an explainer with a solver, its solution at the returned inputs: pass it as `initial=` to
            the attacked map's solve (same seeds) to warm-start it. `None` otherwise.
    """

    inputs: Tensor
    moved: Tensor
    gradient_evaluations: Tensor
    solution: Tensor | None = None


class Attack(abc.ABC):
    """Base class of the attacks on an explainer's maps: `Attack(explainer, epsilon, **settings)`.

    The evaluation builds one attack per explainer and budget from a factory taking `(explainer, epsilon)`, so an
    attack of your own only needs that constructor and `run` (docs/guides/extending.md).

    Class attributes:
        name: a short name for the results (e.g. `topk`).

    Attributes:
        surrogate_name: whose map the attack differentiates (`self`, a registry name, or `none`).
    """

    name: ClassVar[str]
    surrogate_name: str = "none"

    @property
    def applies(self) -> bool:
        """Whether this attack applies to its explainer (e.g. an attack through a solver that the explainer does
        not have does not); an evaluation records no result for an attack that does not apply."""
        return True

    @abc.abstractmethod
    def run(
        self, inputs: Tensor, target: int | Tensor, *, seeds: Tensor | None = None, initial: Tensor | None = None
    ) -> AttackResult:
        """Attack a batch of images.

        Args:
            inputs: clean images `(B, C, H, W)` in [0, 1] (left unchanged).
            target: the class explained, an int or a `(B,)` long tensor (usually the clean prediction).
            seeds: `None` or a `(B,)` integer tensor, one seed per sample (used by noisy explainers and noise).
            initial: the clean map's solution (`Explanation.solution`), for attacks that warm-start a solver.
        """

    def perturb(
        self, inputs: Tensor, target: int | Tensor, seeds: Tensor | None = None, initial: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """`run`, returning only `(adversarial_inputs, moved_mask)`."""
        result = self.run(inputs, target, seeds=seeds, initial=initial)
        return result.inputs, result.moved
