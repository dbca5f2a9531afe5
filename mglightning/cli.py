"""LightningCLI front end of `train.py`: YAML configs, command-line overrides, checkpoints and a final test."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
import torch
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


class EvaluateCLI(LightningCLI):
    """`python evaluate.py --config configs/eval_<name>.yaml --ckpt_path <classifier checkpoint>`."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--ckpt_path", type=Optional[str], default=None,
            help="The classifier checkpoint to evaluate (same as --model.checkpoint).",
        )
        # Explanations need autograd, and the evaluator splits samples over devices itself.
        parser.set_defaults({"trainer.inference_mode": False, "trainer.use_distributed_sampler": False})

    def before_instantiate_classes(self) -> None:
        if self.config.get("ckpt_path"):
            self.config.model.checkpoint = self.config.ckpt_path


def evaluate_main(args: list[str] | None = None) -> EvaluateCLI:
    """Evaluate explainers under attack; returns the CLI (its `model.results` holds the per-method numbers)."""
    # Imported here so that training does not load the explainer stack.
    from mglightning.modules.evaluator import ExplanationEvaluator

    cli = EvaluateCLI(
        ExplanationEvaluator,
        pl.LightningDataModule,
        subclass_mode_data=True,
        run=False,
        args=args,
        save_config_kwargs={"overwrite": True},
    )
    evaluator, datamodule = cli.model, cli.datamodule
    check_compatible(evaluator.classifier, datamodule)
    evaluator.attach_datamodule(datamodule)
    cli.trainer.test(evaluator)
    return cli


def check_compatible(classifier, datamodule) -> None:
    """Fail before the run when the checkpoint's classifier cannot take this data."""
    num_classes = getattr(classifier, "num_classes", None)
    if num_classes is not None and num_classes != datamodule.num_classes:
        raise ValueError(
            f"The checkpoint's classifier has {num_classes} classes but {type(datamodule).__name__} has "
            f"{datamodule.num_classes}: evaluate it on the dataset it was trained on."
        )
    probe = torch.zeros(1, datamodule.in_chans, datamodule.image_size, datamodule.image_size)
    try:
        with torch.no_grad():
            classifier(probe)
    except RuntimeError as error:
        raise ValueError(
            f"The checkpoint's classifier cannot take {datamodule.image_size}x{datamodule.image_size} images with "
            f"{datamodule.in_chans} channels from {type(datamodule).__name__}: {error}"
        ) from error
