"""The training LightningModule: a registered classifier trained with cross-entropy."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from mglightning.models import create_model


class ClassifierModule(pl.LightningModule):
    """Trains `create_model(arch, ...)` with cross-entropy; the checkpoint alone rebuilds the network.

    The architecture's settings are saved as hyperparameters, so `ClassifierModule.load_from_checkpoint(path)`
    (or `mglightning.load_classifier(path)`) needs nothing but the checkpoint file.

    Args:
        arch: registered model name (`resnet18`) or `timm/<name>`.
        num_classes: output classes (linked from the datamodule by the CLI).
        image_size: input height/width (linked from the datamodule).
        mean, std: the data's per-channel statistics for the model's normalisation layer (linked).
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
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}.")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay}.")
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}.")
        self.save_hyperparameters()
        self.net = create_model(
            arch,
            num_classes=num_classes,
            image_size=image_size,
            in_chans=len(mean),
            mean=tuple(mean),
            std=tuple(std),
            **(model_kwargs or {}),
        )
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def model_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, labels = batch[0], batch[1]
        logits = self(images)
        return F.cross_entropy(logits, labels), logits.argmax(dim=1), labels

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, preds, labels = self.model_step(batch)
        self.train_acc(preds, labels)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
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


def load_classifier(path: str | Path, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """The network of a `ClassifierModule` checkpoint, in eval mode, on `map_location` (CPU by default).

    Example:
        >>> model = load_classifier("checkpoints/digits/last.ckpt")
        >>> predictions = model(images).argmax(dim=1)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Checkpoint {str(path)!r} does not exist. Train one with `python train.py fit --config configs/<name>.yaml` "
            "(checkpoints are written under checkpoints/<experiment>/)."
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    hyperparameters = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
    if "arch" not in hyperparameters or "state_dict" not in checkpoint:
        raise ValueError(
            f"{str(path)!r} is not a mglightning classifier checkpoint (no architecture in its hyperparameters); "
            "pass a checkpoint written by `python train.py fit`, or build the model with "
            "`mglightning.models.create_model(name, weights=path)` for a plain state dict."
        )
    # Rebuild from the dictionary already in memory rather than reading the file a second time.
    settings = {name: value for name, value in hyperparameters.items() if not name.startswith("_")}
    module = ClassifierModule(**settings)
    module.load_state_dict(checkpoint["state_dict"])
    return module.net.to(map_location).eval()
