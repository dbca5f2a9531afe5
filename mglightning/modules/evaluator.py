"""The evaluation LightningModule: explain, attack, explain again and measure, on any number of devices."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric, Metric, MetricCollection, SumMetric

from mglightning.attacks import GaussianNoise, TopKInterpretationAttack
from mglightning.data.evaluation import ExactlyOnceSampler, IndexedDataset, sample_seeds
from mglightning.explainers import build_explainer
from mglightning.metrics import NormalizedDistance, SaliencySSIM, Sparsity, TopKIntersection
from mglightning.modules.classifier import load_classifier
from mglightning import reporting


@dataclass
class ExplainerConfig:
    """One explainer of the evaluation: its registered `name`, its `settings`, and an optional display `label`
    (needed when the same method appears twice, e.g. two values of `rho`)."""

    name: str
    settings: dict[str, Any] = field(default_factory=dict)
    label: str | None = None


class ExplanationEvaluator(pl.LightningModule):
    """Robustness of explanations under an interpretation attack (the paper's section 6.4), run by `trainer.test`.

    For every test sample: the prediction, each method's clean map, the attack on that method, the attacked
    map, the metrics of SPEC section 6 and each method's time per image. Samples are split over devices exactly
    once and noise seeds come from `seed` and the dataset index, so results do not depend on the number of
    devices or the batch size. At the end rank 0 writes `results.json/.csv/.md`, a robustness bar chart and a
    saliency grid into the run's log folder, and logs the same to TensorBoard.

    Args:
        checkpoint: a classifier checkpoint written by `train.py` (`mglightning.load_classifier`).
        explainers: the methods to compare, each `{name, settings, label}`.
        epsilon: the attack's L2 budget in [0, 1] pixel units, or a list of budgets (one results row per
            explainer and budget, named `<explainer>@eps=<budget>`).
        attack: `topk` (the L2-bounded top-k interpretation attack) or `gaussian` (random noise of norm epsilon).
        attack_steps: iterations of the top-k attack.
        attack_step_size: its step size (default `epsilon / 100`, as the official code).
        topk_fraction: share of the clean map's non-zero entries in the top-k set (attack and metric).
        surrogate: `self` (attack each method through its own differentiable map, or its declared surrogate)
            or `simple_gradient` (attack every method through the simple gradient).
        target: explain the model's `prediction` (default) or the dataset `label`.
        max_samples: evaluate the first `max_samples` test samples (all when None); capped at the test set size.
        batch_size: samples per device and step.
        seed: global seed of every noise draw.
        grid_samples: samples shown in the saliency grid.
        num_workers: data-loading workers.
    """

    def __init__(
        self,
        checkpoint: str | None,
        explainers: list[ExplainerConfig],
        epsilon: float | list[float] = 0.5,
        attack: Literal["topk", "gaussian"] = "topk",
        attack_steps: int = 10,
        attack_step_size: float | None = None,
        topk_fraction: float = 0.4,
        surrogate: Literal["self", "simple_gradient"] = "self",
        target: Literal["prediction", "label"] = "prediction",
        max_samples: int | None = None,
        batch_size: int = 16,
        seed: int = 0,
        grid_samples: int = 4,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if checkpoint is None:
            raise ValueError("No classifier checkpoint given: pass --ckpt_path <file> (or model.checkpoint in the config).")
        if not explainers:
            raise ValueError("Give at least one explainer, e.g. `explainers: [{name: simple_gradient}]`.")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be positive (or null for the whole test set), got {max_samples}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        self.save_hyperparameters()
        self.classifier = load_classifier(checkpoint)
        # Explanations differentiate with respect to the inputs only; frozen weights skip their gradients.
        self.classifier.requires_grad_(False)

        epsilons = [float(e) for e in (epsilon if isinstance(epsilon, (list, tuple)) else [epsilon])]
        if not epsilons:
            raise ValueError("Give at least one attack budget epsilon.")
        self.labels: list[str] = []
        self.explainers = {}
        for config in explainers:
            config = config if isinstance(config, ExplainerConfig) else ExplainerConfig(**config)
            label = config.label or config.name
            if label in self.explainers:
                raise ValueError(f"Explainer {label!r} is listed twice; give the copies distinct `label`s.")
            self.labels.append(label)
            self.explainers[label] = build_explainer(config.name, self.classifier, **config.settings)

        # One row of results per (explainer, epsilon); the row is named after the explainer alone when a
        # single budget is evaluated.
        self.rows: list[tuple[str, str, float]] = [
            (label if len(epsilons) == 1 else f"{label}@eps={eps:g}", label, eps)
            for label in self.labels
            for eps in epsilons
        ]
        self.attacks = {}
        for row, label, eps in self.rows:
            if attack == "topk":
                self.attacks[row] = TopKInterpretationAttack(
                    self.explainers[label],
                    epsilon=eps,
                    num_steps=attack_steps,
                    step_size=attack_step_size,
                    topk_fraction=topk_fraction,
                    surrogate=surrogate,
                )
            else:
                self.attacks[row] = GaussianNoise(eps, model=self.classifier)

        # Metrics sit in lists parallel to `self.rows` and `self.labels` (names may hold characters that
        # module names cannot).
        self.robustness = nn.ModuleList(
            MetricCollection(
                {
                    "distance": NormalizedDistance(),
                    "topk": TopKIntersection(fraction=topk_fraction),
                    "ssim": SaliencySSIM(),
                }
            )
            for _ in self.rows
        )
        self.attack_success = nn.ModuleList(MeanMetric() for _ in self.rows)
        self.sparsity = nn.ModuleList(Sparsity() for _ in self.labels)
        self.seconds_per_image = nn.ModuleList(MeanMetric() for _ in self.labels)
        self.samples = SumMetric()
        self.accuracy = MeanMetric()
        self.data_source: pl.LightningDataModule | None = None
        self.results: dict[str, dict[str, Any]] = {}
        self._grid: list[dict[str, Any]] = []

    # ----------------------------------------------------------------------------------------------- data
    def attach_datamodule(self, datamodule: pl.LightningDataModule) -> None:
        """The datamodule whose `test_dataset` is evaluated (its loader is built here, with our sampler)."""
        self.data_source = datamodule

    def prepare_data(self) -> None:
        self._require_datamodule().prepare_data()

    def setup(self, stage: str) -> None:
        datamodule = self._require_datamodule()
        datamodule.trainer = self.trainer
        datamodule.setup("test")
        size = len(datamodule.test_dataset)
        requested = self.hparams.max_samples
        if requested is not None and requested > size:
            warnings.warn(f"max_samples={requested} is larger than the test set; evaluating all {size} samples.")
        self.num_samples_total = size if requested is None else min(requested, size)

    def test_dataloader(self) -> DataLoader:
        dataset = IndexedDataset(self._require_datamodule().test_dataset)
        sampler = ExactlyOnceSampler(
            dataset, self.num_samples_total, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank
        )
        return DataLoader(
            dataset, batch_size=self.hparams.batch_size, sampler=sampler, num_workers=self.hparams.num_workers
        )

    def _require_datamodule(self) -> pl.LightningDataModule:
        if self.data_source is None:
            raise RuntimeError("Call `attach_datamodule(datamodule)` before `trainer.test(evaluator)`.")
        return self.data_source

    # ------------------------------------------------------------------------------------------- the run
    def on_test_start(self) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "Explanations need gradients: build the Trainer with `inference_mode=False` "
                "(evaluate.py does this by default)."
            )
        self.classifier.eval()
        # Fresh metric states in every process: with `ddp_spawn` on CPU the states pickled to the workers live in
        # shared memory, and in-place updates from two ranks would land in the same tensor.
        for module in self.modules():
            if isinstance(module, Metric):
                module.reset()

    def test_step(self, batch, batch_idx: int) -> None:
        images, labels, indices = batch

        with torch.no_grad():
            predictions = self.classifier(images).argmax(dim=1)
        target = predictions if self.hparams.target == "prediction" else labels
        seeds = sample_seeds(self.hparams.seed, indices)
        self.samples.update(torch.tensor(float(len(images)), device=self.device))
        self.accuracy.update((predictions == labels).float())
        keep = indices < self.hparams.grid_samples
        record = {"index": indices[keep].cpu(), "image": images[keep].cpu(), "label": labels[keep].cpu(),
                  "prediction": predictions[keep].cpu(), "maps": {}}

        for label_index, label in enumerate(self.labels):
            explainer = self.explainers[label]
            started = time.perf_counter()
            clean = explainer.attribute(images, target, seeds=seeds)
            if clean.is_cuda:  # kernels run asynchronously: wait for them before reading the clock
                torch.cuda.synchronize(clean.device)
            seconds = time.perf_counter() - started
            self.sparsity[label_index].update(clean)
            self.seconds_per_image[label_index].update(torch.tensor(seconds / len(images)), weight=len(images))
            for row_index, (row, row_label, _) in enumerate(self.rows):
                if row_label != label:
                    continue
                attacked_images, moved = self.attacks[row].perturb(images, target, seeds=seeds)
                attacked = explainer.attribute(attacked_images, target, seeds=seeds)
                self.robustness[row_index].update(clean, attacked)
                self.attack_success[row_index].update(moved.float())
                if keep.any():
                    record["maps"][row] = (clean[keep].cpu(), attacked_images[keep].cpu(), attacked[keep].cpu())
        if keep.any():
            self._grid.append(record)

    def on_test_epoch_end(self) -> None:
        # Each metric is computed (and so synchronised over devices) exactly once, in the same order on every rank.
        samples = int(self.samples.compute())
        accuracy = float(self.accuracy.compute())
        sparsity = {label: metric.compute() for label, metric in zip(self.labels, self.sparsity)}
        seconds = {label: float(metric.compute()) for label, metric in zip(self.labels, self.seconds_per_image)}
        results: dict[str, dict[str, Any]] = {}
        for row_index, (row, label, _) in enumerate(self.rows):
            robustness = self.robustness[row_index].compute()
            results[row] = {
                "distance": float(robustness["distance"]),
                "topk": float(robustness["topk"]),
                "ssim": float(robustness["ssim"]),
                "gini": float(sparsity[label]["gini"]),
                "zero_fraction": float(sparsity[label]["zero_fraction"]),
                "attack_success": float(self.attack_success[row_index].compute()),
                "seconds_per_image": seconds[label],
                "surrogate": getattr(self.attacks[row], "surrogate_name", "none (random noise)"),
                "samples": samples,
            }
            for key, value in results[row].items():
                if isinstance(value, float):
                    self.log(f"test/{row}/{key}", value, rank_zero_only=True)
        self.log("test/accuracy", accuracy, rank_zero_only=True)
        self.log("test/samples", float(samples), rank_zero_only=True)
        self.results = results
        grid = self._gather_grid()
        # `trainer.log_dir` is a collective call (a broadcast): every rank asks for it, rank 0 writes.
        out_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        if self.trainer.is_global_zero:
            self._write_outputs(results, grid, out_dir, samples=samples, accuracy=accuracy)

    def _gather_grid(self) -> list[dict[str, Any]]:
        """The grid samples from every rank (each rank holds those that its share of the data contained)."""
        records = self._grid
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[list[dict[str, Any]]] = [None] * dist.get_world_size()  # type: ignore[list-item]
            dist.all_gather_object(gathered, records)
            records = [record for rank_records in gathered for record in rank_records]
        self._grid = []
        return records

    def _write_outputs(
        self, results: dict[str, dict[str, Any]], grid: list[dict[str, Any]], out_dir: Path, samples: int, accuracy: float
    ) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        hp = self.hparams
        run_info = {
            "checkpoint": str(hp.checkpoint),
            "dataset": type(self.data_source).__name__,
            "samples": samples,
            "accuracy": accuracy,
            "attack": hp.attack,
            "epsilon": hp.epsilon,
            "rows": [{"row": row, "explainer": label, "epsilon": eps} for row, label, eps in self.rows],
            "attack_steps": hp.attack_steps,
            "topk_fraction": hp.topk_fraction,
            "target": hp.target,
            "seed": hp.seed,
            "devices": self.trainer.world_size,
            "explainers": [
                {"label": label, "name": type(self.explainers[label]).__name__} for label in self.labels
            ],
        }
        paths = reporting.write_results(results, out_dir, run_info=run_info)
        figures = {"robustness": reporting.robustness_bar_chart(results)}
        if grid:
            figures["saliency_grid"] = self._saliency_grid(grid)
        experiment = getattr(self.logger, "experiment", None) if self.logger is not None else None
        if experiment is not None and hasattr(experiment, "add_figure"):
            reporting.log_to_tensorboard(experiment, results, figures, step=self.global_step, run_info=run_info)
        for name, figure in figures.items():
            paths[name] = out_dir / f"{name}.png"
            reporting.save_figure(figure, paths[name])
        self.output_paths = paths
        print("\n" + reporting.format_results_table(results))
        print(f"\nEvaluated {run_info['samples']} samples (clean accuracy {run_info['accuracy']:.4f}).")
        for name, path in paths.items():
            print(f"  {name}: {path}")
        if experiment is not None:
            print(f"  TensorBoard: tensorboard --logdir {Path(out_dir).parent}")

    def _saliency_grid(self, grid: list[dict[str, Any]]):
        order = torch.cat([record["index"] for record in grid]).argsort()

        def stack(get):
            return torch.cat([get(record) for record in grid])[order]

        inputs = stack(lambda r: r["image"])
        rows = [row for row, _, _ in self.rows]
        clean = {row: stack(lambda r, m=row: r["maps"][m][0]) for row in rows}
        attacked_inputs = {row: stack(lambda r, m=row: r["maps"][m][1]) for row in rows}
        attacked = {row: stack(lambda r, m=row: r["maps"][m][2]) for row in rows}
        return reporting.saliency_grid(
            inputs, attacked_inputs, clean, attacked,
            labels=stack(lambda r: r["label"]), predictions=stack(lambda r: r["prediction"]),
            sample_ids=stack(lambda r: r["index"]), num_samples=len(inputs),
        )
