"""A made-up evaluated run (`mglightning.reporting.EvaluatedRun`) for tests of the results files and TensorBoard
output: one top-k attack and metric, one MoreauGrad explainer, every field settable.
Import it from a test as `from evaluated_runs import evaluated_run` (pytest puts `tests/` on the path).
"""

from __future__ import annotations

from typing import Any

from mglightning.evaluation.description import AttackSpec, ExplainerSpec, MetricSpec, RunDescription
from mglightning.reporting import EvaluatedRun


def evaluated_run(samples: int = 64, accuracy: float = 0.9, **fields: Any) -> EvaluatedRun:
    """An `EvaluatedRun` whose description's fields are `fields` where given."""
    description = {
        "classifier": "model.ckpt", "classifier_sha256": None, "dataset": "CIFAR10DataModule", "data_settings": {},
        "test_set_size": 100, "planned_samples": samples, "target": "prediction", "seed": 0, "warm_start": False,
        "convexity_iterations": 0, "rows": (), "epsilons": (0.5,),
        "explainers": (ExplainerSpec(label="moreaugrad", name="moreaugrad", display_name="MoreauGrad",
                                     family="moreaugrad", class_path="mglightning.explainers.MoreauGrad",
                                     settings={"rho": 0.06}),),
        "attacks": (AttackSpec(label="topk", name="topk", class_path="mglightning.attacks.TopKInterpretationAttack",
                               settings={"num_steps": 10}),),
        "metrics": (MetricSpec(label="topk", class_path="mglightning.metrics.TopKIntersection", settings={},
                               columns={"topk": True}, needs_attack=True, interval=True),),
    }
    return EvaluatedRun(RunDescription(**{**description, **fields}), samples, accuracy)
