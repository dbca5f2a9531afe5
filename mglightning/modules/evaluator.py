"""The evaluation LightningModule: a thin shell around `mglightning.evaluation.measure_batch`.

It handles what a single batch does not: the devices (each sample exactly once, any number of processes), the
run folder (its lock, resume, `--overwrite`), writing each batch's records and grid samples, the progress bar,
the device-aggregated metrics for TensorBoard and, at the end, the report (`mglightning.reporting.report`).
"""

from __future__ import annotations

import platform
import sys
import threading
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import nn
from tqdm.auto import tqdm

from mglightning.attacks import Attack
from mglightning.evaluation.description import (
    AttackSpec,
    ExplainerSpec,
    RowSpec,
    RunDescription,
    RunDescriptionError,
)
from mglightning.evaluation.maps import MAP_DTYPES, MapWriter
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
from mglightning.evaluation.files import DamagedFileError, atomic_write_bytes
from mglightning.evaluation.records import RecordWriter, read_records, recorded_indices
from mglightning.evaluation.run_folder import RunFolderBusyError, RunLock, locked_by_command, move_aside
from mglightning.explainers.base import Explainer
from mglightning.models.loading import ClassifierSource, build_classifier
from mglightning.metrics import SampleMetric
from mglightning.random import NOISE_PROTOCOL
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
        if classifier is None:
            raise ValueError("No classifier given: pass --ckpt_path <file> (or model.classifier in the config).")
        if not explainers:
            raise ValueError(
                "Give at least one explainer, e.g. `explainers: {simple_gradient: "
                "{class_path: mglightning.explainers.SimpleGradient}}`."
            )
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be positive (or null for the whole test set), got {max_samples}.")
        if bootstrap_samples < 1:
            raise ValueError(f"bootstrap_samples must be positive, got {bootstrap_samples}.")
        if isinstance(convexity_iterations, bool) or not isinstance(convexity_iterations, int) or convexity_iterations < 0:
            raise ValueError(f"convexity_iterations must be an integer >= 0 (0 skips it), got {convexity_iterations!r}.")
        epsilons = [float(e) for e in (epsilon if isinstance(epsilon, (list, tuple)) else [epsilon])]
        if not epsilons:
            raise ValueError("Give at least one attack budget epsilon.")
        _check_distinct(epsilons, [str(label) for label in explainers], list(attacks or {}), keep_maps is not None)
        if keep_maps is not None and keep_maps not in MAP_DTYPES:
            raise ValueError(f"keep_maps must be one of {sorted(MAP_DTYPES)} (or null: no maps), got {keep_maps!r}.")
        if keep_inputs and keep_maps is None:
            raise ValueError("keep_inputs stores the inputs beside the maps: set keep_maps (float16 or float32) too.")
        if attacks is not None and not attacks:
            raise ValueError("Give at least one attack, e.g. `attacks: {topk: {class_path: "
                             "mglightning.attacks.TopKInterpretationAttack}}` (or leave `attacks` out).")
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
        self.aggregates = nn.ModuleList(
            [metric.clone() for _ in self.rows for _ in self.attack_factories for metric in self.metrics.values()]
        )
        self.result_rows = None  # the ResultRows, on rank 0 after the run
        self.output_paths: dict[str, Path] = {}
        self.description: RunDescription | None = None
        self._progress: _Progress | None = None
        self._writer: RecordWriter | None = None
        self._map_writer: MapWriter | None = None
        self._lock: RunLock | None = None
        self.folder_checked = False  # whether the run folder was accepted (a refused run changed nothing in it)

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
        description = self.describe(datamodule, planned)
        self.description = description
        strategy = self.trainer.strategy
        # evaluate.py took the lock before it wrote anything; run on its own, the evaluator takes it here.
        if self.trainer.is_global_zero and not locked_by_command(run_dir):
            try:
                self._lock = RunLock(run_dir).acquire()
            except RunFolderBusyError:
                self._discard_own_events()
                raise
        strategy.barrier("run folder locked")
        existing = _existing_description(run_dir)
        if existing is not None and existing.fingerprint != description.fingerprint and not self.overwrite:
            self._release()
            self._discard_own_events()
            changed = existing.differences(description) if isinstance(existing, RunDescription) else ["unreadable"]
            raise ValueError(
                f"{run_dir} holds an evaluation with other settings (differing: {', '.join(changed) or 'unknown'}), "
                "so its records cannot be resumed; nothing in it was changed. Evaluate into a new folder "
                "(evaluate.py makes one unless --resume is given), or pass --overwrite true to move the old run "
                "aside and start afresh."
            )
        stored = (description.keep_maps, description.keep_inputs)
        kept = (existing.keep_maps, existing.keep_inputs) if isinstance(existing, RunDescription) else stored
        if kept != stored and not self.overwrite:
            self._release()
            self._discard_own_events()
            raise ValueError(
                f"{run_dir} was started with keep_maps={existing.keep_maps}, keep_inputs={existing.keep_inputs}; "
                f"resuming it with keep_maps={description.keep_maps}, keep_inputs={description.keep_inputs} would "
                "leave some of its samples without stored maps (or inputs). Nothing in it was changed. Resume with "
                "the run's settings, evaluate into a new folder, or pass --overwrite true to start it afresh."
            )
        strategy.barrier("run folder checked")
        replacing = existing is not None and self.overwrite
        expected = {row.method: list(row.surrogates) for row in description.rows}
        try:  # read before anything is written: a damaged records file refuses the run, the folder as it was
            done = set() if replacing else recorded_indices(run_dir, expected, description.metric_columns)
        except DamagedFileError:
            self._release()
            self._discard_own_events()
            raise
        strategy.barrier("records read")
        self.folder_checked = True
        if self.trainer.is_global_zero:
            if replacing:
                aside = move_aside(run_dir)
                print(f"--overwrite: the previous run in {run_dir} was moved to {aside}.")
            description.save(run_dir)
        strategy.barrier("run described")
        remaining = [index for index in range(planned) if index not in done]
        if not remaining:
            self._release()
            self._discard_own_events()
            raise RunComplete(run_dir, planned)
        if done and self.trainer.is_global_zero:
            print(f"Resuming {run_dir}: {len(done)} of {planned} samples already recorded, {len(remaining)} to go.")
        datamodule.evaluate_on(remaining)
        self._remaining = remaining
        self._writer = RecordWriter(run_dir, self.trainer.global_rank, description.metric_columns)
        if self.keep_maps is not None:
            self._map_writer = MapWriter(run_dir, self.trainer.global_rank, self.keep_maps)
        if done and self.trainer.is_global_zero:
            self._accumulate(read_records(run_dir, description.metric_columns))

    def _check_shapes(self, datamodule) -> None:
        """Settings that depend on the image size (e.g. `group_size`) fail here, before the first batch."""
        shape = torch.Size((1, datamodule.in_chans, datamodule.image_size, datamodule.image_size))
        for label, explainer in self.explainers.items():
            try:
                explainer.check_input_shape(shape)
            except ValueError as error:
                raise ValueError(f"explainers[{label!r}]: {error}") from None

    def describe(self, datamodule, planned: int) -> RunDescription:
        """The run's description: every setting that changes a record, and how to report them."""
        explainers = tuple(
            ExplainerSpec(
                label=label, name=explainer.name, display_name=explainer.display_name, family=explainer.family,
                class_path=_class_path(type(explainer)),
                settings={name: getattr(explainer, name) for name in explainer.settings()},
            )
            for label, explainer in self.explainers.items()
        )
        first_row = self.rows[0]
        built = {label: self.attacks[(first_row[1], first_row[2], label)] for label in self.attack_factories}
        attacks = tuple(
            AttackSpec(label=label, name=getattr(built[label], "name", label), class_path=_class_path(type(built[label])),
                       settings=_factory_settings(factory))
            for label, factory in self.attack_factories.items()
        )
        metrics = metric_specs(self.metrics)
        rows = tuple(
            RowSpec(
                method=row, label=label, explainer=self.explainers[label].name,
                display_name=self.explainers[label].display_name + ("" if len(self.epsilons) == 1 else f" (ε={eps:g})"),
                family=self.explainers[label].family, epsilon=eps,
                surrogates={attack_label: getattr(self.attacks[(label, eps, attack_label)], "surrogate_name", "none")
                            for attack_label in self.attack_factories if self.attacks[(label, eps, attack_label)].applies},
            )
            for row, label, eps in self.rows
        )
        data_settings = {
            key: value
            for key, value in dict(getattr(datamodule, "hparams", {})).items()
            if key not in ("batch_size", "num_workers", "pin_memory")
        }
        attack_names = ", ".join(self.attack_factories)
        return RunDescription(
            classifier=str(self.classifier_source),
            classifier_sha256=_file_sha256(_weights_file(self.classifier_source)),
            dataset=type(datamodule).__name__, data_settings=data_settings,
            test_set_size=len(datamodule.test_dataset), planned_samples=planned,
            explainers=explainers, attacks=attacks, metrics=metrics, rows=rows, epsilons=tuple(self.epsilons),
            target=self.target_kind, seed=self.seed, warm_start=self.warm_start,
            convexity_iterations=self.convexity_iterations, noise_protocol=NOISE_PROTOCOL,
            bootstrap_samples=self.bootstrap_samples,
            grid_samples=self.grid_samples, keep_maps=self.keep_maps, keep_inputs=self.keep_inputs,
            versions={"python": platform.python_version(), "torch": torch.__version__},
            title=f"{type(datamodule).__name__}, {attack_names} attack" + ("s" if len(self.attack_factories) > 1 else ""),
            note=self.note,
        )

    # ------------------------------------------------------------------------------------------- the run
    def on_test_start(self) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "Explanations need gradients: build the Trainer with `inference_mode=False` "
                "(evaluate.py does this by default)."
            )
        self.classifier.eval()
        share = len(self._remaining[self.trainer.global_rank :: self.trainer.world_size])
        unit = "samples" if self.trainer.world_size == 1 else f"samples of rank 0 (1/{self.trainer.world_size})"
        self._progress = _Progress(share, unit, enabled=self.trainer.is_global_zero and share > 0)

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
        if self._progress is not None:
            self._progress.advance(len(images))

    def _accumulate(self, frame) -> None:
        """Add the metric values of records (new, or recorded by an earlier run) to the aggregated metrics."""
        position = 0
        for row, _, _ in self.rows:
            for attack_label in self.attack_factories:
                part = frame[(frame["method"] == row) & (frame["attack"] == attack_label)]
                for label, metric in self.metrics.items():
                    aggregate = self.aggregates[position]
                    position += 1
                    if len(part):
                        aggregate.accumulate({
                            output: torch.tensor(part[column].to_numpy(dtype="float64"))
                            for column, (owner, output) in self.columns.items() if owner == label
                        })

    def _save_grid(self, grid: GridSample) -> None:
        import io

        buffer = io.BytesIO()
        torch.save(grid.to_dict(), buffer)
        folder = self.run_dir / "grid"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / f"samples-{int(grid.index.min())}-rank{self.trainer.global_rank:03d}.pt",
                           buffer.getvalue())

    def on_test_epoch_end(self) -> None:
        if self._progress is not None:
            self._progress.close()
        # Every rank's records are on disk before rank 0 reads them, and every rank takes part in the sync.
        self.trainer.strategy.barrier("records written")
        with warnings.catch_warnings():  # a rank that evaluated no sample has nothing to add, which is fine
            warnings.filterwarnings("ignore", message=".*compute.*was called before the.*update")
            aggregated = [metric.compute() for metric in self.aggregates]
        if not self.trainer.is_global_zero:
            return
        experiment = getattr(self.logger, "experiment", None) if self.logger is not None else None
        if experiment is not None and not hasattr(experiment, "add_figure"):
            experiment = None
        if experiment is not None:
            self._log_aggregates(experiment, aggregated)
        self.result_rows, self.output_paths = report(self.run_dir, experiment=experiment)
        if experiment is not None:
            print(f"  TensorBoard: tensorboard --logdir {self.run_dir.parent}")

    def _log_aggregates(self, experiment, aggregated: list) -> None:
        """`test/<row>/<attack>/<column>`: each metric's mean over every sample, aggregated over the devices."""
        position = 0
        for row, explainer_label, eps in self.rows:
            for attack_label in self.attack_factories:
                applies = self.attacks[(explainer_label, eps, attack_label)].applies
                for label, metric in self.metrics.items():
                    value = aggregated[position]
                    position += 1
                    if not applies:
                        continue
                    outputs = value if isinstance(value, dict) else {next(iter(metric.outputs)): value}
                    for column, (owner, output) in self.columns.items():
                        if owner == label:
                            experiment.add_scalar(f"test/{row}/{attack_label}/{column}", float(outputs[output]), 0)

    def on_test_end(self) -> None:
        self._release()

    def release_run_folder(self) -> None:
        """Release the run folder's lock now (a process that ends releases it anyway), e.g. after a failed run."""
        self._release()

    def _discard_own_events(self) -> None:
        """A refused run leaves its folder as it found it: Lightning opens the logger's events file at set-up,
        before the folder is checked; this closes and removes that one file (never an earlier run's)."""
        experiment = getattr(self.logger, "_experiment", None) if self.logger is not None else None
        path = getattr(getattr(getattr(experiment, "file_writer", None), "event_writer", None), "_file_name", None)
        if path:
            experiment.close()
            Path(path).unlink(missing_ok=True)
            self.logger._experiment = None

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


class _Progress:
    """The evaluation's progress bar: samples done (per finished batch, so the time left is measured on whole
    batches), what is running now, and a clock that keeps ticking through a long attack step."""

    def __init__(self, total: int, unit: str, enabled: bool) -> None:
        self.unit = unit
        self.bar = tqdm(
            total=total, desc=unit, unit="sample", dynamic_ncols=True, file=sys.stderr, disable=not enabled,
            smoothing=0, bar_format="{n}/{total} {desc} |{bar}| {elapsed} elapsed, {remaining} left",
        )
        self._stop = threading.Event()
        self._ticker = None
        self._live = enabled and sys.stderr.isatty()  # a log file gets the bar per batch, not every second
        if self._live:
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self.bar.refresh()

    def describe(self, what: str) -> None:
        if not self.bar.disable:
            self.bar.set_description_str(f"{self.unit} · {what}", refresh=self._live)

    def advance(self, samples: int) -> None:
        self.bar.update(samples)

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        self.bar.close()


def _check_distinct(epsilons: list[float], explainer_labels: list[str], attack_labels: list[str],
                    keep_maps: bool) -> None:
    """Refuse, before any work, settings whose results rows or stored maps would share a name (the run would
    compute everything, then find two records, or two maps, under one key)."""
    seen: dict[str, float] = {}
    for eps in epsilons:
        if f"{eps:g}" in seen:
            raise ValueError(
                f"model.epsilon lists the budget {eps:g} twice ({seen[f'{eps:g}']!r} and {eps!r}): each budget is one "
                f"results row named <explainer>@eps={eps:g}. List each budget once."
            )
        seen[f"{eps:g}"] = eps
    if keep_maps:
        slashed = [label for label in explainer_labels + attack_labels if "/" in label]
        if slashed:
            raise ValueError(f"model.keep_maps names each stored map by its explainer and attack labels: labels "
                             f"{slashed} hold '/', with which two maps could share a name; rename them.")


def _existing_description(run_dir: Path) -> RunDescription | object | None:
    """The folder's run description: None without one; an unreadable one still blocks a resume."""
    if not (run_dir / "run.json").is_file():
        return None
    try:
        return RunDescription.load(run_dir)
    except RunDescriptionError:
        return _UNREADABLE


class _Unreadable:
    fingerprint = None


_UNREADABLE = _Unreadable()


def _weights_file(source: ClassifierSource | str) -> str | None:
    """The file holding the classifier's weights, for the run's fingerprint (None for timm's cache)."""
    if isinstance(source, ClassifierSource):
        return source.checkpoint or source.weights
    return str(source)


def _file_sha256(path: str | Path | None) -> str | None:
    """SHA-256 of a file (the classifier's weights), read in 1 MiB blocks; None for what is not a file."""
    import hashlib

    if path is None or not Path(str(path)).is_file():
        return None
    digest = hashlib.sha256()
    with open(Path(str(path)), "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _frame(records):
    import pandas as pd

    return pd.DataFrame([record.row() for record in records])


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _factory_settings(factory: Any) -> dict[str, Any]:
    """The settings a factory passes: the config's `init_args` (a partial's keywords), none for a bare class."""
    return dict(getattr(factory, "keywords", {}) or {})
