"""The training LightningModule: a registered classifier trained with cross-entropy."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Mapping, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from mglightning.models import classifier_network
from mglightning.models.weights import state_dict_mismatch
from mglightning.modules.adversarial import AdversarialTraining


class ClassifierModule(pl.LightningModule):
    """Trains `create_model(arch, ...)` with cross-entropy; the checkpoint alone rebuilds the network.

    The architecture's settings are saved as hyperparameters, so `ClassifierModule.load_from_checkpoint(path)`
    (or `mglightning.load_classifier(path)`) needs nothing but the checkpoint file.

    With `adversarial.mode` other than `none` it trains on each device's batch perturbed by norm-regularised
    adversarial training (`mglightning.modules.adversarial.AdversarialTraining`) and logs `train/adv_loss`,
    `train/adv_acc`, `train/clean_loss` and `train/clean_acc` instead of `train/loss` and `train/acc`.

    Args:
        arch: registered model name (`resnet18`) or `timm/<name>`.
        num_classes: output classes (linked from the datamodule by the CLI).
        image_size: input height/width (linked from the datamodule).
        mean: the data's per-channel mean, for the model's normalisation layer (linked from the datamodule).
        std: the data's per-channel standard deviation, for the same layer (linked from the datamodule).
        model_kwargs: further settings of the model builder, e.g. `{activation: softplus, beta: 1.0, width: 64}`.
        optimizer: `sgd` (momentum, the paper's) or `adamw`.
        lr: initial learning rate.
        momentum: SGD momentum.
        weight_decay: L2 penalty (decoupled for AdamW).
        nesterov: Nesterov momentum for SGD.
        scheduler: `cosine` (to zero over the run's epochs), `multistep` (divide by `1/gamma` at `milestones`)
            or `constant`.
        milestones: epochs of the multi-step decay.
        gamma: multi-step decay factor.
        adversarial: norm-regularised adversarial training (`mode: l1|elastic|group`, `training: fast|iterative`,
            `epsilon`, `epsilon2`, `group_size`, `steps`, `step_size`; see
            `mglightning.modules.adversarial.AdversarialTraining`): train on perturbed batches so that the
            simple gradient becomes sparse or group-sparse. Default `mode: none`, standard training.
    """

    def __init__(
        self,
        arch: str = "resnet18",
        num_classes: int = 10,
        image_size: int = 32,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        model_kwargs: dict[str, Any] | None = None,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        scheduler: Literal["cosine", "multistep", "constant"] = "cosine",
        milestones: Sequence[int] = (150, 250),
        gamma: float = 0.1,
        adversarial: AdversarialTraining = AdversarialTraining(),
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}.")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay}.")
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}.")
        if isinstance(adversarial, dict):  # a checkpoint's hyperparameters hold the settings as a plain dict
            adversarial = AdversarialTraining(**adversarial)
        # `image_size` comes from the datamodule: a group size that does not divide it fails before any batch.
        adversarial.check_input_shape((1, len(mean), image_size, image_size))
        self.adversarial = adversarial
        self.save_hyperparameters(ignore=["adversarial"])
        # Stored as a plain dict, so checkpoints stay readable with torch.load(weights_only=True).
        self.hparams["adversarial"] = dataclasses.asdict(adversarial)
        self.net = classifier_network(
            arch, num_classes=num_classes, image_size=image_size, mean=mean, std=std, model_kwargs=model_kwargs
        )
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.train_clean_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.train_adv_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def model_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, labels = batch[0], batch[1]
        logits = self(images)
        return F.cross_entropy(logits, labels), logits.argmax(dim=1), labels

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if self.adversarial.enabled:
            return self.adversarial_training_step(batch)
        loss, preds, labels = self.model_step(batch)
        self.train_acc(preds, labels)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def adversarial_training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Train on this device's batch perturbed by `self.adversarial` (the perturbed batch only, as the paper)."""
        images, labels = batch[0], batch[1]
        perturbed, clean_logits = self.adversarial.perturb(self.net, images, labels)
        logits = self(perturbed)
        loss = F.cross_entropy(logits, labels)
        self.train_clean_acc(clean_logits.argmax(dim=1), labels)
        self.train_adv_acc(logits.argmax(dim=1), labels)
        self.log("train/adv_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        # The clean loss comes from the perturbation's first pass (batch statistics, like train/loss without it).
        self.log("train/clean_loss", F.cross_entropy(clean_logits, labels), on_step=True, on_epoch=True)
        self.log("train/clean_acc", self.train_clean_acc, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/adv_acc", self.train_adv_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, preds, labels = self.model_step(batch)
        self.val_acc(preds, labels)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        loss, preds, labels = self.model_step(batch)
        self.test_acc(preds, labels)
        self.log("test/loss", loss, on_epoch=True, sync_dist=True)
        self.log("test/acc", self.test_acc, on_epoch=True)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning loads the weights right after this hook, strictly; a checkpoint of another architecture or
        # width (`--ckpt_path` with other settings) would fail there as a bare "Error(s) in loading state_dict
        # for ClassifierModule" naming neither the file nor the settings.
        problems = state_dict_mismatch(self, checkpoint.get("state_dict", {}))
        if problems is None:
            return
        # The file's name, where a trainer reads it (fit/test with ckpt_path; not load_from_checkpoint's call).
        path = self._trainer.ckpt_path if self._trainer is not None else None
        differences = [
            f"{name}={stored!r} in the checkpoint, {current!r} in this run"
            for name, (current, stored) in settings_differences(
                self.hparams, checkpoint.get("hyper_parameters", {})
            ).items()
        ]
        raise ValueError(
            f"The checkpoint{f' {str(path)!r}' if path else ''} does not fit the model of this run: {problems}."
            + (f" Its settings differ: {'; '.join(differences)}." if differences else "")
            + " Resume with the settings it was trained with (the config.yaml in its run's log folder), or drop "
            "--ckpt_path to train from scratch."
        )

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay,
                nesterov=hp.nesterov,
            )
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "constant":
            return optimizer
        if hp.scheduler == "cosine":
            # Epoch-wise cosine decay over the whole run, so its length comes from the trainer.
            total_epochs = self.trainer.max_epochs
            if total_epochs is None or total_epochs < 1:
                raise ValueError("scheduler='cosine' needs a finite trainer.max_epochs; set it or use 'multistep'.")
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_epochs)
        else:
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(hp.milestones), gamma=hp.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def settings_differences(settings: Mapping[str, Any], stored: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The hyperparameters that differ between a run's `settings` and a checkpoint's `stored` ones.

    Returns `{name: (run's value, checkpoint's value)}` for the names both hold (Lightning's own `_`-prefixed
    entries left out). A tuple and a list with the same items are the same setting (a checkpoint stores
    `(0.5, 0.5)` where a config says `[0.5, 0.5]`), and so are numbers equal to float precision (a mean computed
    from the data twice).

    Example:
        >>> settings_differences({"lr": 0.1, "mean": [0.5]}, {"lr": 0.05, "mean": (0.5,)})
        {'lr': (0.1, 0.05)}
    """
    return {
        name: (settings[name], stored[name])
        for name in settings
        if name in stored and not name.startswith("_") and not _same_setting(settings[name], stored[name])
    }


def _same_setting(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_setting(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same_setting(a[key], b[key]) for key in a)
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return type(a) is type(b) and a == b
