"""The evaluation LightningModule: a shell that wires `mglightning.evaluation.measure_batch` to Lightning.

It handles what a single batch does not, each concern in its own module: the devices (each sample exactly once,
any number of processes), the run folder (`mglightning.evaluation.run_folder.RunFolder`: its lock, resume,
`--overwrite`), the run description (`mglightning.evaluation.description.describe_run`), writing each batch's
records, maps and grid samples, the progress bar (`mglightning.modules.progress.EvaluationProgress`), the
device-aggregated metrics logged for TensorBoard and, at the end, the report (`mglightning.reporting.report`).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MetricCollection

from mglightning.attacks import Attack
from mglightning.evaluation.description import RunDescription, describe_run
from mglightning.evaluation.files import atomic_write_bytes
from mglightning.evaluation.maps import MapWriter
from mglightning.evaluation.measure import (
    AttackFactory,
    GridSample,
    build_attack,
    default_attacks,
    default_metrics,
    measure_batch,
    method_rows,
    metric_columns,
    metric_specs,
)
from mglightning.evaluation.records import RecordWriter, read_records
from mglightning.evaluation.run_folder import RunFolder, RunFolderBusyError, discard_logger_events
from mglightning.evaluation.settings import check_evaluation_settings
from mglightning.explainers.base import Explainer
from mglightning.models.loading import ClassifierSource, build_classifier
from mglightning.metrics import SampleMetric
from mglightning.modules.progress import EvaluationProgress
from mglightning.reporting import report

ExplainerFactory = Callable[[nn.Module], Explainer]


class RunComplete(Exception):
    """The run folder already holds every planned sample's records: nothing is left to evaluate."""

    def __init__(self, run_dir: Path, samples: int) -> None:
        super().__init__(f"{run_dir} is complete: all {samples} samples are recorded.")
        self.run_dir = run_dir
        self.samples = samples


class ExplanationEvaluator(pl.LightningModule):
    """Robustness of explanations under interpretation attacks (the paper's section 6.4), run by `trainer.test`.

    For every test sample, explainer, budget and attack: the clean map, the attack, the attacked map and every
    metric (`mglightning.evaluation.measure_batch`), written as records to `<run_dir>/records/` when the batch is
    done. At the end rank 0 computes the results rows (with several attacks, each sample at its worst case over
    them) with 95% bootstrap intervals, writes `results.json/.csv/.md` and the figures, prints the table and logs
    the same to TensorBoard, with the device-aggregated means of every metric under each attack.

    Samples are split over devices exactly once and noise seeds come from `seed` and the dataset index, so the
    records do not depend on the number of devices or the batch size. A run folder that already holds records of
    the same evaluation (`run.json`'s fingerprint) is resumed; one of another evaluation is refused without a
    change, unless `overwrite` moves its contents aside first. One process at a time holds the folder's lock.

    Run with `trainer.test(evaluator, datamodule=datamodule)` on a trainer with `inference_mode=False`
    (`evaluate.py` does all this).

    Args:
        classifier: the classifier: a `train.py` checkpoint path, or a `ClassifierSource` (`{checkpoint}`,
            `{arch: timm/<name>, pretrained: true}`, `{arch, weights}`, `{module: {class_path, init_args}}`, or
            `{arch, random_weights: true}` for an untrained network on purpose), with the data's normalisation as
            its first layer.
        explainers: `{label: explainer}` in YAML as `{class_path: mglightning.explainers.MoreauGrad, init_args:
            {rho: 0.06}}` (the model is passed in); the label names the method's results rows.
        attacks: `{label: attack}` in YAML as `{class_path: mglightning.attacks.TopKInterpretationAttack,
            init_args: {num_steps: 10}}` (the explainer and budget are passed in); your own attack subclasses
            `mglightning.attacks.Attack`. With several, each sample counts at its worst case over them. Default:
            `{topk: TopKInterpretationAttack}`. The cheap search is the top-k attack's own: `init_args:
            {warm_start: true, search_settings: {num_steps: 10, average_last: 0}}` starts each step's MoreauGrad
            solve from the previous step's solution (the first from the clean map's) and takes 10 steps. Only the
            search is cheaper: the clean and attacked maps are always the explainer's, cold.
        metrics: `{label: metric}` in YAML as `{class_path: mglightning.metrics.TopKIntersection, init_args:
            {fraction: 0.4}}`; your own metric subclasses `mglightning.metrics.SampleMetric`. Default: distance,
            top-k intersection, SSIM and sparsity.
        epsilon: the attacks' L2 budget in [0, 1] pixel units, or a list of budgets (one results row per explainer
            and budget, named `<label>@eps=<budget>`).
        target: explain the model's `prediction` (default) or the dataset `label`.
        max_samples: evaluate the first `max_samples` test samples (all when None); capped at the test set size.
        seed: global seed of every noise draw and of the bootstrap.
        grid_samples: samples shown in the saliency grid (the first dataset indices).
        bootstrap_samples: resamples of the bootstrap intervals.
        convexity_iterations: with `n > 0`, estimate per sample the weak convexity `lambda` of the explained score
            by `n` power iterations on Hessian-vector products, and record for each MoreauGrad-family row whether
            `rho < 1 / lambda` (results column `convex share`) and Corollary 1's bound. 0 (default) skips it.
        keep_maps: store every clean and attacked map in `<run_dir>/maps/` as `float16` or `float32`
            (`mglightning.evaluation.load_maps` reads them with their records; `evaluate.py report <run_dir>
            --metrics ...` computes a metric thought of later from them). Default null: no maps. Not part of the
            run's fingerprint (it changes no record), but a resume must keep it as the run started.
        keep_inputs: with `keep_maps`, store the clean and attacked inputs too (for added metrics that read them).
        run_dir: the run folder; default the logger's folder (`trainer.log_dir`). `evaluate.py` sets it.
        overwrite: when `run_dir` holds another evaluation, move its contents into `run_dir/replaced-<time>/`
            (only after the new evaluation has been checked) instead of refusing it.
        note: a remark printed under the results table and written into `results.md`.
        num_classes: the data's class count, for checking the classifier (`evaluate.py` links it from the data).
        image_size: the data's image size, likewise.
        in_chans: the data's channel count, likewise.
        mean: the data's per-channel mean, for the classifier's normalisation layer.
        std: the data's per-channel standard deviation, likewise.
    """

    def __init__(
        self,
        classifier: ClassifierSource | str | None,
        explainers: dict[str, ExplainerFactory],
        attacks: dict[str, Callable[[Explainer, float], Attack]] | None = None,
        metrics: dict[str, SampleMetric] | None = None,
        epsilon: float | list[float] = 0.5,
        target: Literal["prediction", "label"] = "prediction",
        max_samples: int | None = None,
        seed: int = 0,
        grid_samples: int = 4,
        bootstrap_samples: int = 1000,
        convexity_iterations: int = 0,
        keep_maps: Literal["float16", "float32"] | None = None,
        keep_inputs: bool = False,
        run_dir: str | None = None,
        overwrite: bool = False,
        note: str | None = None,
        num_classes: int | None = None,
        image_size: int | None = None,
        in_chans: int | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
    ) -> None:
        super().__init__()
        epsilons = check_evaluation_settings(
            classifier=classifier, explainer_labels=list(explainers or {}),
            attack_labels=None if attacks is None else list(attacks), epsilon=epsilon, max_samples=max_samples,
            bootstrap_samples=bootstrap_samples, convexity_iterations=convexity_iterations, keep_maps=keep_maps,
            keep_inputs=keep_inputs,
        )
        self.classifier_source = classifier
        self.epsilons = epsilons
        self.target_kind = target
        self.max_samples = max_samples
        self.seed = seed
        self.grid_samples = grid_samples
        self.bootstrap_samples = bootstrap_samples
        self.convexity_iterations = convexity_iterations
        self.keep_maps = keep_maps
        self.keep_inputs = bool(keep_inputs)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.overwrite = bool(overwrite)
        self.note = note

        self.classifier = build_classifier(
            classifier, num_classes=num_classes, image_size=image_size, in_chans=in_chans, mean=mean, std=std
        )
        # Explanations differentiate with respect to the inputs only; frozen weights skip their gradients.
        self.classifier.requires_grad_(False)
        self.explainers: dict[str, Explainer] = {}
        for label, factory in explainers.items():
            explainer = factory(self.classifier)
            if not isinstance(explainer, Explainer):
                raise ValueError(
                    f"explainers[{label!r}] built a {type(explainer).__name__}, not an mglightning Explainer; use "
                    "class_path: mglightning.explainers.<Method>."
                )
            self.explainers[str(label)] = explainer
        self.attack_factories: dict[str, AttackFactory] = dict(attacks) if attacks is not None else default_attacks()
        self.metrics = dict(metrics) if metrics is not None else default_metrics()
        self.columns = metric_columns(self.metrics)
        self.rows = method_rows(list(self.explainers), epsilons)
        # Every attack is built here first, so that a misspelt or impossible setting fails before the run
        # (`measure_batch` builds them from the same factories for each batch).
        self.attacks = {}
        for _, label, eps in self.rows:
            for attack_label, factory in self.attack_factories.items():
                try:
                    self.attacks[(label, eps, attack_label)] = build_attack(factory, self.explainers[label], eps)
                except (TypeError, ValueError) as error:
                    raise ValueError(f"attacks[{attack_label!r}] on explainers[{label!r}] at ε={eps:g}: {error}") from None
        # The run description's `warm_start`: whether an attack warm-starts its solves (an attack's own setting).
        self.warm_start = any(getattr(attack, "warm_start", False) is True for attack in self.attacks.values())
        # The device-aggregated mean of every metric, per results row and attack (torchmetrics states, synced).
        self.aggregates = MetricCollection(
            {
                _aggregate_key(row, attack_label, label): metric.clone()
                for row, _, _ in self.rows for attack_label in self.attack_factories
                for label, metric in self.metrics.items()
            },
            compute_groups=False,
        )
        self.result_rows = None  # the ResultRows, on rank 0 after the run
        self.output_paths: dict[str, Path] = {}
        self.description: RunDescription | None = None
        self.samples_to_evaluate: list[int] = []  # the dataset indices this run evaluates, over every device
        self._folder: RunFolder | None = None
        self._progress: EvaluationProgress | None = None
        self._writer: RecordWriter | None = None
        self._map_writer: MapWriter | None = None

    @property
    def folder_checked(self) -> bool:
        """Whether the run folder was accepted (a refused run changed nothing in it)."""
        return self._folder is not None and self._folder.checked

    def configure_callbacks(self) -> list[pl.Callback]:
        """The progress bar, on whatever trainer runs the evaluation (`test_step` names each phase in it)."""
        return [EvaluationProgress()]

    # ------------------------------------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "evaluate_on"):
            raise RuntimeError(
                "Run the evaluator as trainer.test(evaluator, datamodule=datamodule) with an mglightning "
                "ImageDataModule (it provides the exactly-once evaluation loader)."
            )
        if datamodule.test_dataset is None:
            datamodule.setup("test")
        self._check_shapes(datamodule)
        size = len(datamodule.test_dataset)
        if self.max_samples is not None and self.max_samples > size:
            warnings.warn(f"max_samples={self.max_samples} is larger than the test set; evaluating all {size} samples.")
        planned = size if self.max_samples is None else min(self.max_samples, size)

        # `trainer.log_dir` is a collective call (a broadcast): every rank asks for it.
        log_dir = self.trainer.log_dir
        run_dir = self.run_dir or Path(log_dir or self.trainer.default_root_dir)
        # Processes started apart (torchrun, SLURM: one per node) each named a folder; rank 0's is the run's.
        run_dir = Path(self.trainer.strategy.broadcast(str(run_dir), src=0))
        self.run_dir = run_dir
        self.description = describe_run(
            classifier=self.classifier_source, datamodule=datamodule, planned_samples=planned,
            explainers=self.explainers, attack_factories=self.attack_factories, attacks=self.attacks,
            metrics=metric_specs(self.metrics), rows=self.rows, epsilons=self.epsilons, target=self.target_kind,
            seed=self.seed, warm_start=self.warm_start, convexity_iterations=self.convexity_iterations,
            bootstrap_samples=self.bootstrap_samples, grid_samples=self.grid_samples, keep_maps=self.keep_maps,
            keep_inputs=self.keep_inputs, note=self.note,
        )
        self._folder = RunFolder(run_dir, self.trainer.is_global_zero)
        try:
            done = self._folder.open(self.description, self.overwrite, self.trainer.strategy.barrier)
        except (RunFolderBusyError, ValueError):  # refused: the folder stays as it was found
            discard_logger_events(self.logger)
            raise
        remaining = [index for index in range(planned) if index not in done]
        if not remaining:
            self._folder.release()
            discard_logger_events(self.logger)
            raise RunComplete(run_dir, planned)
        if done and self.trainer.is_global_zero:
            print(f"Resuming {run_dir}: {len(done)} of {planned} samples already recorded, {len(remaining)} to go.")
        datamodule.evaluate_on(remaining)
        self.samples_to_evaluate = remaining
        self._writer = RecordWriter(run_dir, self.trainer.global_rank, self.description.metric_columns)
        # States of this process's own: `ddp_spawn` sends the module to its processes with its tensors in shared
        # memory, where one device's in-place sums (a metric's sample count) would add to the others'.
        self.aggregates.reset()
        if self.keep_maps is not None:
            self._map_writer = MapWriter(run_dir, self.trainer.global_rank, self.keep_maps)
        if done and self.trainer.is_global_zero:
            self._accumulate(read_records(run_dir, self.description.metric_columns))

    def _check_shapes(self, datamodule) -> None:
        """Settings that depend on the image size (e.g. `group_size`) fail here, before the first batch."""
        shape = torch.Size((1, datamodule.in_chans, datamodule.image_size, datamodule.image_size))
        for label, explainer in self.explainers.items():
            try:
                explainer.check_input_shape(shape)
            except ValueError as error:
                raise ValueError(f"explainers[{label!r}]: {error}") from None

    # ------------------------------------------------------------------------------------------- the run
    def on_test_start(self) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "Explanations need gradients: build the Trainer with `inference_mode=False` "
                "(evaluate.py does this by default)."
            )
        self.classifier.eval()
        self._progress = next((cb for cb in self.trainer.callbacks if isinstance(cb, EvaluationProgress)), None)

    def test_step(self, batch, batch_idx: int) -> None:
        images, labels, indices = batch
        measured = measure_batch(
            self.classifier, images, labels, indices, explainers=self.explainers, epsilons=self.epsilons,
            attacks=self.attack_factories, metrics=self.metrics, seed=self.seed, target=self.target_kind,
            convexity_iterations=self.convexity_iterations,
            grid_samples=self.grid_samples, rank=self.trainer.global_rank,
            model_name=f"{type(self.classifier).__name__} ({self.classifier_source})",
            progress=self._progress.describe if self._progress is not None else None,
            keep_maps=self._map_writer is not None, keep_inputs=self.keep_inputs,
        )
        # The grid samples and maps first: a batch whose records exist always has them, so a resumed run that
        # skips it misses nothing.
        if measured.grid is not None:
            self._save_grid(measured.grid)
        if measured.maps is not None:
            self._map_writer.write(measured.maps)
        self._writer.write(measured.records)
        self._accumulate(_frame(measured.records))

    def _accumulate(self, frame) -> None:
        """Add the metric values of records (new, or recorded by an earlier run) to the aggregated metrics."""
        for row, _, _ in self.rows:
            for attack_label in self.attack_factories:
                part = frame[(frame["method"] == row) & (frame["attack"] == attack_label)]
                if not len(part):
                    continue
                for label in self.metrics:
                    self.aggregates[_aggregate_key(row, attack_label, label)].accumulate({
                        output: torch.tensor(part[column].to_numpy(dtype="float64"))
                        for column, (owner, output) in self.columns.items() if owner == label
                    })

    def _save_grid(self, grid: GridSample) -> None:
        buffer = io.BytesIO()
        torch.save(grid.to_dict(), buffer)
        folder = self.run_dir / "grid"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / f"samples-{int(grid.index.min())}-rank{self.trainer.global_rank:03d}.pt",
                           buffer.getvalue())

    def on_test_epoch_end(self) -> None:
        # Every rank's records are on disk before rank 0 reads them, and every rank takes part in the sync.
        self.trainer.strategy.barrier("records written")
        with warnings.catch_warnings():  # a rank that evaluated no sample has nothing to add, which is fine
            warnings.filterwarnings("ignore", message=".*compute.*was called before the.*update")
            means = {key: metric.compute() for key, metric in self.aggregates.items(keep_base=True, copy_state=False)}
        if not self.trainer.is_global_zero:
            return
        experiment = getattr(self.logger, "experiment", None) if self.logger is not None else None
        if experiment is not None and not hasattr(experiment, "add_figure"):
            experiment = None
        # At step 0, like the report's scalars: a logged `step` is the step, and keeps Lightning from adding an
        # `epoch` scalar. The means are already synced; rank 0 logs them as they are.
        self.log_dict({**self._aggregate_scalars(means), "step": 0.0}, logger=experiment is not None,
                      batch_size=1, sync_dist=True, rank_zero_only=True)
        self.result_rows, self.output_paths = report(self.run_dir, experiment=experiment)
        if experiment is not None:
            print(f"  TensorBoard: tensorboard --logdir {self.run_dir.parent}")

    def _aggregate_scalars(self, means: dict[str, Any]) -> dict[str, torch.Tensor]:
        """`test/<row>/<attack>/<column>`: each metric's mean over every sample, aggregated over the devices."""
        scalars = {}
        for row, explainer_label, eps in self.rows:
            for attack_label in self.attack_factories:
                if not self.attacks[(explainer_label, eps, attack_label)].applies:
                    continue
                for label, metric in self.metrics.items():
                    value = means[_aggregate_key(row, attack_label, label)]
                    outputs = value if isinstance(value, dict) else {next(iter(metric.outputs)): value}
                    for column, (owner, output) in self.columns.items():
                        if owner == label:
                            scalars[f"test/{row}/{attack_label}/{column}"] = outputs[output]
        return scalars

    def on_test_end(self) -> None:
        self.release_run_folder()

    def release_run_folder(self) -> None:
        """Release the run folder's lock now (a process that ends releases it anyway), e.g. after a failed run."""
        if self._folder is not None:
            self._folder.release()


def _aggregate_key(row: str, attack_label: str, metric_label: str) -> str:
    """The key in `ExplanationEvaluator.aggregates` of a metric's aggregate for one results row and attack: a module
    name, so each "." (a budget has one) is written as "\u2024" (ONE DOT LEADER)."""
    return f"{row}/{attack_label}/{metric_label}".replace(".", "\u2024")


def _frame(records):
    import pandas as pd

    return pd.DataFrame([record.row() for record in records])


