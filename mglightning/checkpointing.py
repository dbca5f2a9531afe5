"""Checkpoints of a training run: one folder per run, `last.ckpt`/`best.ckpt` links to the newest run, and a
guard that stops a diverged run before it writes or links a checkpoint of a broken model."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """A `ModelCheckpoint` that writes each training run into its own folder under `dirpath`.

    Plain `ModelCheckpoint` writes a second run into the same folder as `last-v1.ckpt` and leaves `last.ckpt`
    to the first run, so a command that reads `last.ckpt` silently gets the old model. Here run `version_<n>`
    of the logger (the name of its TensorBoard folder; the next free `version_<n>` when there is no logger)
    writes `<dirpath>/version_<n>/best-....ckpt` and `last.ckpt`, and when `fit` ends `<dirpath>/last.ckpt` and
    `<dirpath>/best.ckpt` are replaced by relative links to that run's files (copies where the file system
    refuses links). So `<dirpath>/last.ckpt` is always the newest run's, and no run overwrites another.
    Resuming (`fit --ckpt_path ...`) is a new run with a new folder; its best checkpoint is the best of the
    epochs it trained. With `dirpath=None` Lightning's own per-run folder (`<log_dir>/checkpoints`) is used and
    no links are made. Takes the arguments of `ModelCheckpoint`, with train.py's defaults: the best checkpoint by
    `val/acc` (`best-epoch<epoch>-acc<val/acc>.ckpt`) and `last.ckpt`.

    Example:
        >>> callback = RunCheckpoint(dirpath="checkpoints/digits")  # best by val/acc, and last.ckpt
        >>> # Trainer(callbacks=[callback]).fit(...) writes checkpoints/digits/version_0/last.ckpt and links
        >>> # checkpoints/digits/last.ckpt -> version_0/last.ckpt
    """

    LINK_NAMES = {"last": "last.ckpt", "best": "best.ckpt"}

    def __init__(
        self,
        dirpath: str | Path | None = None,
        filename: str | None = "best-epoch{epoch:03d}-acc{val/acc:.4f}",
        monitor: str | None = "val/acc",
        mode: str = "max",
        save_last: bool | Literal["link"] | None = True,
        auto_insert_metric_name: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            dirpath=dirpath, filename=filename, monitor=monitor, mode=mode, save_last=save_last,
            auto_insert_metric_name=auto_insert_metric_name, **kwargs,
        )
        self.root_dirpath = Path(self.dirpath) if self.dirpath else None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.root_dirpath is not None:
            # Rank 0's folder name wins: the parent class broadcasts `dirpath` to the other ranks.
            self.dirpath = str(self.root_dirpath / self._run_name(trainer))
        super().setup(trainer, pl_module, stage)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.root_dirpath is not None:
            for kind, target in (("last", self.last_model_path), ("best", self.best_model_path)):
                if target and Path(target).is_file():
                    _replace_with_link(self.root_dirpath / self.LINK_NAMES[kind], Path(target))
        trainer.strategy.barrier()

    def _run_name(self, trainer: pl.Trainer) -> str:
        if trainer.loggers:
            version = trainer.loggers[0].version
            return version if isinstance(version, str) else f"version_{version}"
        taken = [int(p.name[len("version_"):]) for p in self.root_dirpath.glob("version_*")
                 if p.name[len("version_"):].isdigit()]
        return f"version_{max(taken, default=-1) + 1}"


def _replace_with_link(link: Path, target: Path) -> None:
    """Point `link` at `target` with a relative symbolic link (a copy if links fail), replacing `link` atomically."""
    link.parent.mkdir(parents=True, exist_ok=True)  # a resumed run that trained no epoch wrote nothing there
    temporary = link.with_name(f".{link.name}.tmp")
    temporary.unlink(missing_ok=True)
    try:
        temporary.symlink_to(os.path.relpath(target, link.parent))
    except OSError:  # e.g. Windows without the right to create links
        shutil.copyfile(target, temporary)
    os.replace(temporary, link)


DIVERGED_FILE = "DIVERGED.txt"


class TrainingDiverged(RuntimeError):
    """Training stopped because its loss or its weights stopped being finite (raised by `DivergenceGuard`)."""


class DivergenceGuard(Callback):
    """Stop training at the first non-finite training loss, or non-finite weights, with an error that says so.

    A NaN or infinite loss makes every later update NaN, so the run cannot recover; training on would write,
    test and link checkpoints of a broken model. The guard checks the training loss after every step (all ranks
    agree: one rank's NaN stops them all) and the weights at the end of each epoch, before validation and the
    epoch's checkpoints. On divergence it writes `DIVERGED.txt` (the error message) into the run's checkpoint
    folder and its log folder, and raises `TrainingDiverged` naming the epoch, the step, the loss and the likely
    causes. Since `fit` does not end normally, `RunCheckpoint` does not move `last.ckpt`/`best.ckpt`: they keep
    pointing at the previous run's files, and the checkpoints this run wrote before diverging stay in its folder.

    Args:
        patience: how many consecutive steps with a non-finite loss to tolerate before stopping (0: stop at the
            first). A finite loss resets the count. Non-finite weights always stop the run.
    """

    def __init__(self, patience: int = 0) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"divergence.patience must be an integer >= 0, got {patience!r}.")
        self.patience = patience
        self._non_finite_steps = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:  # a training_step that skipped the batch
            return
        local = not torch.isfinite(loss.detach()).all()
        # One collective per step: a rank that raised alone would leave the others waiting in the next all-reduce.
        if not trainer.strategy.reduce_boolean_decision(bool(local), all=False):
            self._non_finite_steps = 0
            return
        self._non_finite_steps += 1
        if self._non_finite_steps > self.patience:
            value = loss.detach().float().mean().item() if local else math.nan
            self._stop(
                trainer, pl_module,
                f"the training loss is {value} at epoch {trainer.current_epoch}, step {trainer.global_step} "
                f"(batch {batch_idx} of the epoch)"
                + (f", after {self._non_finite_steps} non-finite steps in a row" if self.patience else ""),
            )

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._check_weights(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs before the epoch's checkpoint when there is no validation: Lightning calls checkpoint callbacks last.
        self._check_weights(trainer, pl_module)

    def _check_weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        broken = [name for name, tensor in pl_module.state_dict().items()
                  if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
        if trainer.strategy.reduce_boolean_decision(bool(broken), all=False):
            self._stop(
                trainer, pl_module,
                f"the weights are no longer finite at the end of epoch {trainer.current_epoch}, step "
                f"{trainer.global_step}"
                + (f" ({len(broken)} tensors, e.g. {', '.join(broken[:3])})" if broken else ""),
            )

    def _stop(self, trainer: pl.Trainer, pl_module: pl.LightningModule, what: str) -> None:
        lr = getattr(pl_module.hparams, "lr", None) if hasattr(pl_module, "hparams") else None
        folders = _run_folders(trainer)
        message = (
            f"Training diverged: {what}. Likely causes: a learning rate too high for this model and batch size"
            + (f" (model.lr = {lr}; try one ten times smaller)" if lr is not None else "")
            + ", or inputs that are not finite or not in [0, 1] (check the datamodule's images and labels)."
        )
        root = getattr(trainer.checkpoint_callback, "root_dirpath", None)
        if root is not None:
            message += f" {root / 'last.ckpt'} and {root / 'best.ckpt'} were not moved to this run's checkpoints."
        if folders:
            message += f" Marked as diverged: {', '.join(str(folder / DIVERGED_FILE) for folder in folders)}."
        if trainer.is_global_zero:
            for folder in folders:
                folder.mkdir(parents=True, exist_ok=True)
                (folder / DIVERGED_FILE).write_text(message + "\n")
        raise TrainingDiverged(message)


def _run_folders(trainer: pl.Trainer) -> list[Path]:
    """This run's checkpoint folder (`RunCheckpoint`'s `version_<n>`) and log folder, where they exist."""
    folders = []
    callback = trainer.checkpoint_callback
    if callback is not None and callback.dirpath:
        folders.append(Path(callback.dirpath))
    if trainer.logger is not None and trainer.logger.log_dir:
        folders.append(Path(trainer.logger.log_dir))
    return list(dict.fromkeys(folders))
