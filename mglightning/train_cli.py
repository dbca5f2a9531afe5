"""LightningCLI front end of `train.py`: YAML configs, command-line overrides, checkpoints and a final test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from mglightning.checkpointing import DivergenceGuard, RunCheckpoint
from mglightning.cli_common import configure_help, display_path, quiet_lightning
from mglightning.models.weights import read_weights_file
from mglightning.modules.classifier import ClassifierModule, settings_differences


class TrainCLI(LightningCLI):
    """`python train.py fit --config configs/<name>.yaml`, with the data's shape linked into the model.

    Adds three groups to the usual LightningCLI options: `checkpoint.*` (a `RunCheckpoint`: best by `val/acc`
    plus `last.ckpt`, in a folder of their own per run, `checkpoints/<experiment>/version_<n>/`, with
    `checkpoints/<experiment>/last.ckpt` and `best.ckpt` linked to the newest run's), `divergence.*` (a
    `DivergenceGuard`: stop with `TrainingDiverged` at the first non-finite loss, leaving the links as they were)
    and `test_after_fit` (evaluate the best checkpoint on the test set when `fit` ends). `--ckpt_path` (resume)
    is always read with `weights_only=True` (Lightning's `--weights_only` option is not offered).

    Checked before anything is trained or written (`SettingsRefused`, naming the settings): `trainer.max_epochs`
    and `trainer.max_steps` must let `fit` train (not 0), a cosine schedule needs a finite number of epochs, and
    the model settings of a `--ckpt_path` checkpoint must equal the config's (LightningCLI would otherwise
    silently replace the config's model settings with the checkpoint's), and a resumed `fit` must have epochs
    (steps) left to train.
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # Lightning 2.6 adds `--weights_only` to every subcommand; passing false would let `--ckpt_path` run code
        # from the file. train.py's checkpoints never need it, so it is not offered (see `fit` and the others below).
        return {name: {*skipped, "weights_only"} for name, skipped in LightningCLI.subcommands().items()}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        configure_help(parser)
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")  # its defaults: best by val/acc, and last.ckpt
        # Always on: a diverged run stops with an error instead of testing and linking a NaN model.
        parser.add_lightning_class_args(DivergenceGuard, "divergence")
        parser.add_argument(
            "--test_after_fit", type=bool, default=True, help="Test the best checkpoint when fit ends."
        )
        for name in ("num_classes", "image_size", "mean", "std"):
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        # Read `--ckpt_path` first with the package's one reader: an empty, foreign or refused file becomes an
        # error that says what it holds and what to do, before Lightning reads the whole checkpoint in `fit`.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        self._checkpoint_settings = None
        self._checkpoint_progress = None
        if ckpt_path and Path(ckpt_path).is_file():
            content = read_weights_file(ckpt_path)
            if isinstance(content, dict) and isinstance(content.get("hyper_parameters"), dict):
                self._checkpoint_settings = content["hyper_parameters"]
                self._checkpoint_progress = training_progress(content)

    def _parse_ckpt_path(self) -> None:
        """Not LightningCLI's: it replaces the config's model settings with the checkpoint's, silently.

        A resumed run whose config says another width (or learning rate, ...) would train the checkpoint's model
        and link it as the experiment's newest. Here the config's settings stay, and `after_instantiate_classes`
        refuses the run when they differ from the checkpoint's.
        """

    def before_instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        if subcommand == "fit":
            check_training_length(self.config[subcommand].trainer)

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        subcommand = self.config.get("subcommand")
        if subcommand == "fit" and self.model.hparams.get("scheduler") == "cosine" and self.trainer.max_epochs == -1:
            raise SettingsRefused(
                "model.scheduler 'cosine' decays the learning rate over trainer.max_epochs, but the run has no "
                "epoch limit (max_epochs -1, or unset with max_steps or max_time given). Set trainer.max_epochs to "
                "a number of epochs, or use model.scheduler 'constant' or 'multistep'. Nothing was trained or "
                "written."
            )
        if self._checkpoint_settings is not None:
            ckpt_path = self.config[subcommand].get("ckpt_path")
            differences = settings_differences(dict(self.model.hparams), self._checkpoint_settings)
            if differences:
                raise SettingsRefused(checkpoint_mismatch_message(ckpt_path, differences, self.trainer))
            if subcommand == "fit" and self._checkpoint_progress is not None:
                check_resume_trains(ckpt_path, *self._checkpoint_progress, self.trainer)

    # LightningCLI runs the subcommand through these methods: each reads `--ckpt_path` with weights_only=True,
    # whatever torch's default or TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD say, so that a checkpoint cannot run code
    # (train.py's checkpoints hold only tensors and plain values).
    def fit(self, model: pl.LightningModule, **kwargs) -> None:
        self.trainer.fit(model, weights_only=True, **kwargs)

    def validate(self, model: pl.LightningModule, **kwargs) -> None:
        self.trainer.validate(model, weights_only=True, **kwargs)

    def test(self, model: pl.LightningModule, **kwargs) -> None:
        self.trainer.test(model, weights_only=True, **kwargs)

    def predict(self, model: pl.LightningModule, **kwargs) -> None:
        self.trainer.predict(model, weights_only=True, **kwargs)

    def after_fit(self) -> None:
        trainer = self.trainer
        checkpoint = trainer.checkpoint_callback
        # Read before testing: loading the best checkpoint for the test restores the callback's state as it was
        # when that file was saved. Under ddp_spawn only the best path comes back to this process.
        best = checkpoint.best_model_path if checkpoint is not None else ""
        last = checkpoint.last_model_path if checkpoint is not None else ""
        if self.config["fit"].get("test_after_fit") and not trainer.fast_dev_run:
            trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None, weights_only=True)
        if trainer.is_global_zero:
            print("\n".join(self._summary_lines(best, last)), flush=True)

    def _summary_lines(self, best: str, last: str) -> list[str]:
        """Where this run's files are: the paths the checkpoint callback wrote (not guessed) and the logs."""
        trainer = self.trainer
        lines = ["", "Training finished."]
        if best:
            lines.append(f"  best checkpoint:  {display_path(best)}")
        if last:
            lines.append(f"  last checkpoint:  {display_path(last)}")
        root = getattr(trainer.checkpoint_callback, "root_dirpath", None)
        if root is not None and best and not trainer.interrupted:
            links = ", ".join(display_path(root / name) for name in RunCheckpoint.LINK_NAMES.values())
            lines.append(f"  now linked from:  {links}")
        if trainer.logger is not None and trainer.logger.log_dir:
            tensorboard = Path(sys.executable).parent / "tensorboard"
            command = display_path(tensorboard) if tensorboard.is_file() else "tensorboard"
            lines.append(f"  TensorBoard logs: {display_path(trainer.logger.log_dir)}")
            lines.append(f"  view them with:   {command} --logdir {display_path(trainer.logger.save_dir)}")
        return lines


class SettingsRefused(ValueError):
    """A training command refused before it trained or wrote anything; the message names the settings."""


def check_training_length(trainer_config) -> None:
    """Refuse `trainer.max_epochs` or `trainer.max_steps` that let `fit` train nothing (0) or are no limit (< -1).

    `fit` with `max_epochs 0` would "finish" at once and test and link the untrained model. -1 (no limit) and
    unset (Lightning's default) are kept.
    """
    for name in ("max_epochs", "max_steps"):
        value = trainer_config.get(name)
        if value is not None and (value == 0 or value < -1):
            raise SettingsRefused(
                f"trainer.{name} {value} {'would train nothing' if value == 0 else 'is not a limit'}: give a "
                "positive number of "
                f"{'epochs' if name == 'max_epochs' else 'optimizer steps'} (or -1 for no limit"
                + (", with max_steps or max_time to stop" if name == "max_epochs" else "")
                + "). To test a checkpoint without training, use `train.py test --ckpt_path <file>`. Nothing was "
                "trained or written."
            )


def training_progress(checkpoint: dict) -> tuple[int, int] | None:
    """`(epochs, steps)` a Lightning checkpoint has trained: its fit loop's processed epochs (what the loop
    compares with `max_epochs` when it resumes) and its global step; None where it does not hold them."""
    try:
        epochs = checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]
        steps = checkpoint["global_step"]
    except (KeyError, TypeError):
        return None
    return (epochs, steps) if isinstance(epochs, int) and isinstance(steps, int) else None


def check_resume_trains(ckpt_path: str, epochs: int, steps: int, trainer: pl.Trainer) -> None:
    """Refuse a resume whose `max_epochs`/`max_steps` the checkpoint has reached already: `fit` would train
    nothing, then test the checkpoint's model as if it were this run's."""
    for name, done, limit, unit in (("max_epochs", epochs, trainer.max_epochs, "epochs"),
                                    ("max_steps", steps, trainer.max_steps, "optimizer steps")):
        if limit is not None and limit != -1 and done >= limit:
            raise SettingsRefused(
                f"The checkpoint {ckpt_path!r} has trained {done} {unit} already, and trainer.{name} {limit} counts "
                f"the {unit} of the whole training, so resuming it would train nothing. Give trainer.{name} "
                f"greater than {done} (e.g. {done + max(limit, 1)} for {max(limit, 1)} more). Nothing was trained "
                "or written."
            )


def checkpoint_mismatch_message(ckpt_path: str, differences: dict, trainer: pl.Trainer) -> str:
    """Why a `--ckpt_path` checkpoint was refused: its model settings differ from the config's (`differences`:
    `{name: (config's, checkpoint's)}`), what was left as it was, and what to do."""
    listed = "; ".join(
        f"model.{name}: {config!r} in the config, {stored!r} in the checkpoint"
        for name, (config, stored) in differences.items()
    )
    root = getattr(trainer.checkpoint_callback, "root_dirpath", None)
    untouched = (f" {display_path(root / 'last.ckpt')} and {display_path(root / 'best.ckpt')} still point where they did."
                 if root is not None else "")
    return (
        f"The checkpoint {ckpt_path!r} was trained with other model settings than this run's config: {listed}. "
        "Its weights and training state belong to its own settings, so the two must agree; nothing was trained "
        "or written."
        + untouched
        + " Resume with the settings it was trained with (train.py saved them as config.yaml in that run's log "
        "folder, e.g. `--config logs/<experiment>/version_<n>/config.yaml`, or override the settings named "
        "here), or drop --ckpt_path to train these settings from scratch."
    )


def train_main(args: list[str] | None = None) -> TrainCLI:
    """Run the training CLI with `args` (the command line when None); returns the CLI (model, trainer, ...)."""
    quiet_lightning()
    return TrainCLI(
        ClassifierModule,
        pl.LightningDataModule,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )
