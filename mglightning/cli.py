"""The command-line entry points that `train.py` and `evaluate.py` call.

`train_main` runs the training CLI (`mglightning.train_cli`), `evaluate_main` the evaluation CLI and its `report`
command (`mglightning.evaluate_cli`); both are LightningCLI front ends whose options are the typed `__init__`
parameters of the module, the datamodule and the trainer, with YAML configs merged in order.
"""

from mglightning.cli_common import quiet_lightning
from mglightning.evaluate_cli import EvaluateCLI, evaluate_main, report_run
from mglightning.train_cli import SettingsRefused, TrainCLI, train_main

__all__ = ["EvaluateCLI", "SettingsRefused", "TrainCLI", "evaluate_main", "quiet_lightning", "report_run", "train_main"]
