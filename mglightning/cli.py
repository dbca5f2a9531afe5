"""LightningCLI front end of `train.py`: YAML configs, command-line overrides, checkpoints and a final test."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from mglightning.modules.classifier import ClassifierModule


class TrainCLI(LightningCLI):
    """`python train.py fit --config configs/<name>.yaml`, with the data's shape linked into the model.

    Adds two groups to the usual LightningCLI options: `checkpoint.*` (a `ModelCheckpoint`: best by `val/acc`
    plus `last.ckpt`, under `checkpoints/<experiment>/`) and `test_after_fit` (evaluate the best checkpoint on
    the test set when `fit` ends).
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:03d}-acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_argument(
            "--test_after_fit", type=bool, default=True, help="Test the best checkpoint when fit ends."
        )
        for name in ("num_classes", "image_size", "mean", "std"):
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")

    def after_fit(self) -> None:
        trainer = self.trainer
        checkpoint = trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint is not None else ""
        if self.config["fit"].get("test_after_fit") and not trainer.fast_dev_run:
            trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)
        if trainer.is_global_zero:
            lines = ["", "Training finished."]
            if best:
                lines.append(f"  best checkpoint: {best}")
                lines.append(f"  last checkpoint: {Path(best).parent / 'last.ckpt'}")
            if trainer.logger is not None and trainer.logger.log_dir:
                lines.append(f"  TensorBoard logs: {trainer.logger.log_dir}")
                lines.append(f"  view them with:   tensorboard --logdir {Path(trainer.logger.save_dir)}")
            print("\n".join(lines), flush=True)


def train_main(args: list[str] | None = None) -> TrainCLI:
    """Run the training CLI with `args` (the command line when None); returns the CLI (model, trainer, ...)."""
    return TrainCLI(
        ClassifierModule,
        pl.LightningDataModule,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )
