"""The progress display of an evaluation: a Lightning callback around one tqdm bar on rank 0.

`ExplanationEvaluator` returns it from `configure_callbacks`, so every trainer that runs an evaluation shows it,
and hands its `describe` to `mglightning.evaluation.measure_batch`, which names each phase as it starts.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from tqdm.auto import tqdm


class EvaluationProgress(Callback):
    """The evaluation's progress bar: samples done (per finished batch, so the time left is measured on whole
    batches), what is running now, and a clock that keeps ticking through a long attack step.

    Only rank 0 shows it, counting its own share of the evaluator's `samples_to_evaluate` (every device gets every
    `world_size`-th of them). On a terminal a thread refreshes it every second; a log file gets it once per batch.
    """

    def __init__(self) -> None:
        # Made when the run starts: the callback stays picklable (`ddp_spawn` sends the trainer to its processes).
        self.bar: tqdm | None = None
        self._unit = ""
        self._live = False
        self._stop: threading.Event | None = None
        self._ticker: threading.Thread | None = None

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        share = len(pl_module.samples_to_evaluate[trainer.global_rank :: trainer.world_size])
        enabled = trainer.is_global_zero and share > 0
        self._unit = "samples" if trainer.world_size == 1 else f"samples of rank 0 (1/{trainer.world_size})"
        self.bar = tqdm(
            total=share, desc=self._unit, unit="sample", dynamic_ncols=True, file=sys.stderr, disable=not enabled,
            smoothing=0, bar_format="{n}/{total} {desc} |{bar}| {elapsed} elapsed, {remaining} left",
        )
        self._live = enabled and sys.stderr.isatty()
        if self._live:
            self._stop = threading.Event()
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self.bar.refresh()

    def describe(self, what: str) -> None:
        """Show what is running now (e.g. `moreaugrad: topk attack at ε=0.5`)."""
        if self.bar is not None and not self.bar.disable:
            self.bar.set_description_str(f"{self._unit} · {what}", refresh=self._live)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.bar is not None:
            images, _, _ = batch
            self.bar.update(len(images))

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self._ticker is not None:
            self._stop.set()
            self._ticker.join()
            self._ticker = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None
