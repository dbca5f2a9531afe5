"""Checkpoints of a training run: one folder per run, and `last.ckpt`/`best.ckpt` links to the newest run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint


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
    no links are made. Takes the arguments of `ModelCheckpoint`.

    Example:
        >>> callback = RunCheckpoint(dirpath="checkpoints/digits", monitor="val/acc", mode="max", save_last=True)
        >>> # Trainer(callbacks=[callback]).fit(...) writes checkpoints/digits/version_0/last.ckpt and links
        >>> # checkpoints/digits/last.ckpt -> version_0/last.ckpt
    """

    LINK_NAMES = {"last": "last.ckpt", "best": "best.ckpt"}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
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
    temporary = link.with_name(f".{link.name}.tmp")
    temporary.unlink(missing_ok=True)
    try:
        temporary.symlink_to(os.path.relpath(target, link.parent))
    except OSError:  # e.g. Windows without the right to create links
        shutil.copyfile(target, temporary)
    os.replace(temporary, link)
