"""Checks of an evaluation's own settings, run before any work (before the classifier is even loaded): each error
names the setting and how to fix it. The explainers, attacks and metrics check their settings themselves."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mglightning.evaluation.maps import MAP_DTYPES

__all__ = ["check_evaluation_settings"]


def check_evaluation_settings(
    *,
    classifier: Any,
    explainer_labels: Sequence[str],
    attack_labels: Sequence[str] | None,
    epsilon: float | Sequence[float],
    max_samples: int | None,
    bootstrap_samples: int,
    convexity_iterations: int,
    keep_maps: str | None,
    keep_inputs: bool,
) -> list[float]:
    """Refuse impossible settings of `ExplanationEvaluator` (the arguments of the same names; `attack_labels` None
    for the default attacks); returns the budgets `epsilon` as a list of floats."""
    if classifier is None:
        raise ValueError("No classifier given: pass --ckpt_path <file> (or model.classifier in the config).")
    if not explainer_labels:
        raise ValueError(
            "Give at least one explainer, e.g. `explainers: {simple_gradient: "
            "{class_path: mglightning.explainers.SimpleGradient}}`."
        )
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be positive (or null for the whole test set), got {max_samples}.")
    if bootstrap_samples < 1:
        raise ValueError(f"bootstrap_samples must be positive, got {bootstrap_samples}.")
    if isinstance(convexity_iterations, bool) or not isinstance(convexity_iterations, int) or convexity_iterations < 0:
        raise ValueError(f"convexity_iterations must be an integer >= 0 (0 skips it), got {convexity_iterations!r}.")
    epsilons = [float(e) for e in (epsilon if isinstance(epsilon, (list, tuple)) else [epsilon])]
    if not epsilons:
        raise ValueError("Give at least one attack budget epsilon.")
    _check_distinct(epsilons, [str(label) for label in explainer_labels], list(attack_labels or []),
                    keep_maps is not None)
    if keep_maps is not None and keep_maps not in MAP_DTYPES:
        raise ValueError(f"keep_maps must be one of {sorted(MAP_DTYPES)} (or null: no maps), got {keep_maps!r}.")
    if keep_inputs and keep_maps is None:
        raise ValueError("keep_inputs stores the inputs beside the maps: set keep_maps (float16 or float32) too.")
    if attack_labels is not None and not attack_labels:
        raise ValueError("Give at least one attack, e.g. `attacks: {topk: {class_path: "
                         "mglightning.attacks.TopKInterpretationAttack}}` (or leave `attacks` out).")
    return epsilons


def _check_distinct(epsilons: list[float], explainer_labels: list[str], attack_labels: list[str],
                    keep_maps: bool) -> None:
    """Refuse, before any work, settings whose results rows or stored maps would share a name (the run would
    compute everything, then find two records, or two maps, under one key)."""
    seen: dict[str, float] = {}
    for eps in epsilons:
        if f"{eps:g}" in seen:
            raise ValueError(
                f"model.epsilon lists the budget {eps:g} twice ({seen[f'{eps:g}']!r} and {eps!r}): each budget is one "
                f"results row named <explainer>@eps={eps:g}. List each budget once."
            )
        seen[f"{eps:g}"] = eps
    if keep_maps:
        slashed = [label for label in explainer_labels + attack_labels if "/" in label]
        if slashed:
            raise ValueError(f"model.keep_maps names each stored map by its explainer and attack labels: labels "
                             f"{slashed} hold '/', with which two maps could share a name; rename them.")
