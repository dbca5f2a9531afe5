"""The evaluation LightningModule: explain, attack, explain again and measure, on any number of devices.

Every evaluated sample becomes one record per (method, budget), streamed to `<run_dir>/records/` as the run
goes (`mglightning.reporting.records`); the tables, intervals and figures are computed from those records at the
end (`mglightning.reporting.report`), so a stopped run resumes where it stopped and a finished one can be
re-reported offline.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mglightning.attacks import GaussianNoise, TopKInterpretationAttack
from mglightning.data.evaluation import sample_seeds
from mglightning.explainers.base import Explainer, check_finite_scores
from mglightning.metrics.fidelity import deletion_insertion_auc
from mglightning.metrics.functional import (
    _normalized_distance_update,
    _saliency_ssim_update,
    _sparsity_update,
    _topk_intersection_update,
)
from mglightning.explainers.diagnostics import corollary_bound, local_convexity
from mglightning.models.loading import ClassifierSource, build_classifier
from mglightning.reporting import RecordWriter, load_run_info, recorded_indices, report
from mglightning.reporting.results import atomic_write_text

ExplainerFactory = Callable[[nn.Module], Explainer]


class ExplanationEvaluator(pl.LightningModule):
    """Robustness of explanations under an interpretation attack (the paper's section 6.4), run by `trainer.test`.

    For every test sample: the prediction, each method's clean map, the attack on that method under each budget,
    the attacked map, the metrics of SPEC section 6, the time and the gradient evaluations spent. Each sample's
    results are written as records to `<run_dir>/records/` when its batch is done; at the end rank 0 computes
    the results rows with 95% bootstrap intervals, writes `results.json/.csv/.md` and the figures into the run
    folder, prints the table and logs the same to TensorBoard.

    Samples are split over devices exactly once (the datamodule's evaluation loader, `evaluate_on`) and noise
    seeds come from `seed` and the dataset index, so the records do not depend on the number of devices or the
    batch size. A run folder that already holds records of the same evaluation (same settings, classifier file
    and data: `run.json`'s fingerprint) is resumed: its recorded samples are skipped. A folder of a different
    evaluation is refused.

    Run with `trainer.test(evaluator, datamodule=datamodule)`, the trainer built with `inference_mode=False`
    (`evaluate.py` does all this).

    Args:
        classifier: the classifier: a `train.py` checkpoint path, or a `ClassifierSource` (`{checkpoint}`,
            `{arch: timm/<name>, pretrained: true}`, `{arch, weights}`, `{module: {class_path, init_args}}`;
            `mglightning.models.build_classifier`), with the data's normalisation as its first layer.
        explainers: `{label: factory}`, each factory taking the model and returning an explainer, e.g. an
            explainer class or, in YAML, `{class_path: mglightning.explainers.MoreauGrad, init_args: {rho: 0.06}}`.
            The label names the method's results rows (several entries may use one class with other settings).
        epsilon: the attack's L2 budget in [0, 1] pixel units, or a list of budgets (one results row per
            explainer and budget, named `<label>@eps=<budget>`).
        attack: `topk` (the L2-bounded top-k interpretation attack) or `gaussian` (random noise of norm epsilon).
        attack_steps: iterations of the top-k attack.
        attack_step_size: its step size (default `epsilon / 100`, as the official code).
        topk_fraction: share of the clean map's non-zero entries in the top-k set (attack and metric).
        surrogate: `self` (attack each method through its own differentiable map, or its declared surrogate)
            or `simple_gradient` (attack every method through the simple gradient).
        target: explain the model's `prediction` (default) or the dataset `label`.
        max_samples: evaluate the first `max_samples` test samples (all when None); capped at the test set size.
        seed: global seed of every noise draw and of the bootstrap.
        grid_samples: samples shown in the saliency grid (the first dataset indices).
        bootstrap_samples: resamples of the bootstrap intervals.
        fidelity_steps: with `n > 0`, the fidelity of every clean map to the model: the areas under the deletion
            and insertion curves of `n` steps (`mglightning.metrics.deletion_insertion_auc`; results columns
            `deletion_auc` ↓ and `insertion_auc` ↑, figure `fidelity.png`). 0 (default) skips it.
        warm_start: start every MoreauGrad solve of the attack from the previous step's solution, and the attacked
            map from the last attack iterate's (the fast preset, with `tol` in the explainers); default cold starts.
        convexity_iterations: with `n > 0`, estimate per sample the weak convexity `lambda` of the explained score
            by `n` power iterations on Hessian-vector products (`mglightning.explainers.diagnostics`), and record for
            each MoreauGrad-family row whether `rho < 1 / lambda` (results column `convex share`) and Corollary 1's
            bound. A local estimate, not a certificate. 0 (default) skips it.
        run_dir: the run folder; default the logger's folder (`trainer.log_dir`).
        note: a remark printed under the results table and written into `results.md` (e.g. what the data can and
            cannot show).
        num_classes, image_size, in_chans, mean, std: the data's, for building and checking the classifier
            (`evaluate.py` links them from the datamodule).
    """

    def __init__(
        self,
        classifier: ClassifierSource | str | None,
        explainers: dict[str, ExplainerFactory],
        epsilon: float | list[float] = 0.5,
        attack: Literal["topk", "gaussian"] = "topk",
        attack_steps: int = 10,
        attack_step_size: float | None = None,
        topk_fraction: float = 0.4,
        surrogate: Literal["self", "simple_gradient"] = "self",
        target: Literal["prediction", "label"] = "prediction",
        max_samples: int | None = None,
        seed: int = 0,
        grid_samples: int = 4,
        bootstrap_samples: int = 1000,
        fidelity_steps: int = 0,
        warm_start: bool = False,
        convexity_iterations: int = 0,
        run_dir: str | None = None,
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
        if isinstance(fidelity_steps, bool) or not isinstance(fidelity_steps, int) or fidelity_steps < 0:
            raise ValueError(f"fidelity_steps must be an integer >= 0 (0 skips the fidelity curves), got {fidelity_steps!r}.")
        if bootstrap_samples < 1:
            raise ValueError(f"bootstrap_samples must be positive, got {bootstrap_samples}.")
        epsilons = [float(e) for e in (epsilon if isinstance(epsilon, (list, tuple)) else [epsilon])]
        if not epsilons:
            raise ValueError("Give at least one attack budget epsilon.")
        self.classifier_source = classifier
        self.epsilons = epsilons
        self.attack_kind = attack
        self.attack_steps = attack_steps
        self.attack_step_size = attack_step_size
        self.topk_fraction = topk_fraction
        self.surrogate = surrogate
        self.target_kind = target
        self.max_samples = max_samples
        self.seed = seed
        self.grid_samples = grid_samples
        self.bootstrap_samples = bootstrap_samples
        self.fidelity_steps = fidelity_steps
        self.warm_start = bool(warm_start)
        if isinstance(convexity_iterations, bool) or not isinstance(convexity_iterations, int) or convexity_iterations < 0:
            raise ValueError(f"convexity_iterations must be an integer >= 0 (0 skips it), got {convexity_iterations!r}.")
        self.convexity_iterations = convexity_iterations
        self.run_dir = Path(run_dir) if run_dir is not None else None
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

        # One results row per (explainer, budget); named after the explainer alone when one budget is evaluated.
        self.rows: list[tuple[str, str, float]] = [
            (label if len(epsilons) == 1 else f"{label}@eps={eps:g}", label, eps)
            for label in self.explainers
            for eps in epsilons
        ]
        self.attacks = {}
        for row, label, eps in self.rows:
            if attack == "topk":
                self.attacks[row] = TopKInterpretationAttack(
                    self.explainers[label], epsilon=eps, num_steps=attack_steps, step_size=attack_step_size,
                    topk_fraction=topk_fraction, surrogate=surrogate, warm_start=self.warm_start,
                )
            else:
                self.attacks[row] = GaussianNoise(self.explainers[label], eps)
        self.result_rows = None  # the ResultRows, on rank 0 after the run
        self.output_paths: dict[str, Path] = {}
        self._progress = None
        self._writer: RecordWriter | None = None

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
        self.run_dir = run_dir
        run_info = self._run_info(datamodule, planned)
        _check_run_folder(run_dir, run_info)  # every rank, so a foreign folder fails everywhere alike
        self.trainer.strategy.barrier("run folder checked")
        if self.trainer.is_global_zero and not (run_dir / "run.json").is_file():
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "run.json", json.dumps(run_info, indent=2, default=str) + "\n")
        done = recorded_indices(run_dir, [row for row, _, _ in self.rows])
        self.trainer.strategy.barrier("records read")
        remaining = [index for index in range(planned) if index not in done]
        if done and self.trainer.is_global_zero:
            print(f"Resuming {run_dir}: {len(done)} of {planned} samples already recorded, {len(remaining)} to go.")
        datamodule.evaluate_on(remaining)
        self._remaining = remaining
        self._writer = RecordWriter(run_dir, self.trainer.global_rank)

    def _check_shapes(self, datamodule) -> None:
        """Settings that depend on the image size (e.g. `group_size`) fail here, before the first batch."""
        shape = torch.Size((1, datamodule.in_chans, datamodule.image_size, datamodule.image_size))
        for label, explainer in self.explainers.items():
            try:
                explainer.check_input_shape(shape)
            except ValueError as error:
                raise ValueError(f"explainers[{label!r}]: {error}") from None

    def _run_info(self, datamodule, planned: int) -> dict[str, Any]:
        explainers = [
            {
                "label": label,
                "name": explainer.name,
                "display_name": explainer.display_name,
                "family": explainer.family,
                "class": f"{type(explainer).__module__}.{type(explainer).__qualname__}",
                "settings": {name: getattr(explainer, name) for name in explainer.settings()},
            }
            for label, explainer in self.explainers.items()
        ]
        rows = [
            {
                "method": row,
                "label": label,
                "explainer": self.explainers[label].name,
                "display_name": self._display_name(label, eps),
                "family": self.explainers[label].family,
                "epsilon": eps,
                "surrogate": getattr(self.attacks[row], "surrogate_name", "none (random noise)"),
            }
            for row, label, eps in self.rows
        ]
        attack = {"kind": self.attack_kind}
        if self.attack_kind == "topk":
            attack.update(
                steps=self.attack_steps,
                step_size=self.attack_step_size if self.attack_step_size is not None else "epsilon / 100",
                topk_fraction=self.topk_fraction,
                surrogate=self.surrogate,
            )
        data_settings = {
            key: value
            for key, value in dict(getattr(datamodule, "hparams", {})).items()
            if key not in ("batch_size", "num_workers", "pin_memory")
        }
        evaluation = {
            "classifier": str(self.classifier_source),
            "classifier_sha256": _file_sha256(_weights_file(self.classifier_source)),
            "dataset": type(datamodule).__name__,
            "data_settings": data_settings,
            "test_set_size": len(datamodule.test_dataset),
            "planned_samples": planned,
            "explainers": explainers,
            "rows": rows,
            "epsilons": self.epsilons,
            "attack": attack,
            "target": self.target_kind,
            "seed": self.seed,
            "fidelity_steps": self.fidelity_steps,
            "warm_start": self.warm_start,
            "convexity_iterations": self.convexity_iterations,
        }
        fingerprint = hashlib.sha256(json.dumps(evaluation, sort_keys=True, default=str).encode()).hexdigest()
        return {
            **evaluation,
            "fingerprint": fingerprint,
            "bootstrap_samples": self.bootstrap_samples,
            "grid_samples": self.grid_samples,
            "versions": {"python": platform.python_version(), "torch": torch.__version__},
            "title": f"{type(datamodule).__name__}, {self.attack_kind} attack",
            "note": self.note,
        }

    # ------------------------------------------------------------------------------------------- the run
    def on_test_start(self) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "Explanations need gradients: build the Trainer with `inference_mode=False` "
                "(evaluate.py does this by default)."
            )
        self.classifier.eval()
        share = len(self._remaining[self.trainer.global_rank :: self.trainer.world_size])
        self._progress_unit = "samples" if self.trainer.world_size == 1 else f"samples of rank 0 (1/{self.trainer.world_size})"
        self._progress = tqdm(
            total=share, desc=self._progress_unit, unit="sample", dynamic_ncols=True, file=sys.stderr,
            disable=not self.trainer.is_global_zero or share == 0,
            bar_format="{n:.1f}/{total} {desc} |{bar}| {elapsed} elapsed, {remaining} left",
        )

    def test_step(self, batch, batch_idx: int) -> None:
        images, labels, indices = batch
        with torch.no_grad():
            logits = self.classifier(images)
        check_finite_scores(logits, f"{type(self.classifier).__name__} ({self.classifier_source})")
        predictions = logits.argmax(dim=1)
        target = predictions if self.target_kind == "prediction" else labels
        seeds = sample_seeds(self.seed, indices.cpu())
        batch_size = len(images)
        base = {
            "index": indices.tolist(), "label": labels.tolist(), "prediction": predictions.tolist(),
            "target": target.tolist(),
        }
        records: list[dict[str, Any]] = []
        grid = self._grid_part(images, labels, predictions, indices)
        step = 1.0 / len(self.rows)

        for label, explainer in self.explainers.items():
            self._show(label, None)
            started = _clock(images)
            explained = explainer.explain(images, target, seeds=seeds)
            clean = explained.attribution
            seconds_clean = (_clock(images) - started) / batch_size
            evals_clean = explained.gradient_evaluations.double().tolist()
            clean_solution = explained.solution if self.warm_start else None
            convexity = None
            if self.convexity_iterations and explainer.family == "moreaugrad":
                convexity = local_convexity(
                    self.classifier, images, target, rho=explainer.rho, num_iterations=self.convexity_iterations,
                    score=explainer.score,
                )
            gini, zero_share = _sparsity_update(clean.detach())
            fidelity = {}
            if self.fidelity_steps:
                with torch.no_grad():
                    deletion, insertion = deletion_insertion_auc(
                        self.classifier, images, clean.detach(), target, steps=self.fidelity_steps
                    )
                fidelity = {"deletion_auc": deletion.tolist(), "insertion_auc": insertion.tolist()}
            for row, row_label, eps in self.rows:
                if row_label != label:
                    continue
                self._show(label, eps)
                started = _clock(images)
                attack = self.attacks[row]
                result = attack.run(images, target, seeds=seeds, initial=clean_solution)
                attacked_images, moved = result.inputs, result.moved
                seconds_attack = (_clock(images) - started) / batch_size
                evals_attack = result.gradient_evaluations.double().tolist()
                started = _clock(images)
                attacked_explanation = explainer.explain(
                    attacked_images, target, seeds=seeds, initial=result.solution if self.warm_start else None
                )
                attacked = attacked_explanation.attribution
                seconds_attacked = (_clock(images) - started) / batch_size
                evals_attacked = attacked_explanation.gradient_evaluations.double().tolist()
                metrics = {
                    "distance": _normalized_distance_update(clean, attacked),
                    "topk": _topk_intersection_update(clean, attacked, self.topk_fraction),
                    "ssim": _saliency_ssim_update(clean, attacked),
                }
                diagnostic = {}
                if convexity is not None:
                    diagnostic = {
                        "weak_convexity": convexity.weak_convexity.tolist(),
                        "convex": convexity.convex.float().tolist(),
                        "bound": [
                            value if math.isfinite(value) else None
                            for value in corollary_bound(convexity.weak_convexity, explainer.rho, eps).tolist()
                        ],
                    }
                for position in range(batch_size):
                    records.append(
                        {
                            **{key: values[position] for key, values in base.items()},
                            "method": row,
                            "explainer": explainer.name,
                            "epsilon": eps,
                            **{key: float(values[position]) for key, values in metrics.items()},
                            "gini": float(gini[position]),
                            "zero_fraction": float(zero_share[position]),
                            **{key: values[position] for key, values in fidelity.items()},
                            **{key: values[position] for key, values in diagnostic.items()},
                            "moved": bool(moved[position]),
                            "seconds_clean": seconds_clean,
                            "seconds_attack": seconds_attack,
                            "seconds_attacked": seconds_attacked,
                            "evals_clean": evals_clean[position],
                            "evals_attack": evals_attack[position],
                            "evals_attacked": evals_attacked[position],
                            "rank": self.trainer.global_rank,
                        }
                    )
                if grid is not None:
                    keep = grid["keep"]
                    grid["clean"][row] = clean[keep].detach().cpu()
                    grid["attacked_input"][row] = attacked_images[keep].detach().cpu()
                    grid["attacked"][row] = attacked[keep].detach().cpu()
                if self._progress is not None:
                    self._progress.update(batch_size * step)
        # The batch's records land in one file, only once all its methods are done.
        self._writer.write(records)
        if grid is not None:
            self._save_grid(grid)

    def _show(self, label: str, epsilon: float | None) -> None:
        if self._progress is not None and not self._progress.disable:
            what = f"{label}: clean map" if epsilon is None else f"{label}: attack at ε={epsilon:g}"
            self._progress.set_description_str(f"{self._progress_unit} · {what}", refresh=True)

    def _grid_part(self, images: Tensor, labels: Tensor, predictions: Tensor, indices: Tensor) -> dict | None:
        keep = (indices < self.grid_samples).cpu()
        if not keep.any():
            return None
        return {
            "keep": keep, "index": indices.cpu()[keep], "image": images.cpu()[keep], "label": labels.cpu()[keep],
            "prediction": predictions.cpu()[keep], "clean": {}, "attacked_input": {}, "attacked": {},
        }

    def _save_grid(self, grid: dict[str, Any]) -> None:
        folder = self.run_dir / "grid"
        folder.mkdir(parents=True, exist_ok=True)
        grid = {key: value for key, value in grid.items() if key != "keep"}
        grid["display_names"] = {row: self._display_name(label, eps) for row, label, eps in self.rows}
        grid["families"] = {row: self.explainers[label].family for row, label, _ in self.rows}
        name = f"rank{self.trainer.global_rank:03d}-{int(grid['index'].min())}.pt"
        torch.save(grid, folder / f".{name}.tmp")
        (folder / f".{name}.tmp").replace(folder / name)

    def _display_name(self, label: str, epsilon: float) -> str:
        """A results row's name in tables and figures: the method's, with the budget when there are several."""
        suffix = "" if len(self.epsilons) == 1 else f" (ε={epsilon:g})"
        return self.explainers[label].display_name + suffix

    def on_test_epoch_end(self) -> None:
        if self._progress is not None:
            self._progress.close()
        # Every rank's records are on disk before rank 0 reads them.
        self.trainer.strategy.barrier("records written")
        if not self.trainer.is_global_zero:
            return
        experiment = getattr(self.logger, "experiment", None) if self.logger is not None else None
        if experiment is not None and not hasattr(experiment, "add_figure"):
            experiment = None
        self.result_rows, self.output_paths = report(self.run_dir, experiment=experiment)
        if experiment is not None:
            print(f"  TensorBoard: tensorboard --logdir {self.run_dir.parent}")


def _clock(reference: Tensor) -> float:
    """Seconds on a monotonic clock, after the device's queued kernels have finished (CUDA runs asynchronously)."""
    if reference.is_cuda:
        torch.cuda.synchronize(reference.device)
    return time.perf_counter()


def _sample_evaluations(source: Any, batch_size: int) -> list[float]:
    """Per-sample gradient evaluations that an explainer or attack reports for its last call (NaN if it doesn't)."""
    counts = getattr(source, "last_sample_gradient_evaluations", None)
    if counts is None:
        return [math.nan] * batch_size
    return [float(value) for value in torch.as_tensor(counts).tolist()]


def _weights_file(source: ClassifierSource | str) -> str | None:
    """The file holding the classifier's weights, for the run's fingerprint (None for timm's cache)."""
    if isinstance(source, ClassifierSource):
        return source.checkpoint or source.weights
    return str(source)


def _file_sha256(path: str | Path | None) -> str | None:
    """SHA-256 of a file (the classifier's weights), read in 1 MiB blocks; None for what is not a file."""
    if path is None:
        return None
    path = Path(str(path))
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_run_folder(run_dir: Path, run_info: dict[str, Any]) -> None:
    """Refuse a run folder whose `run.json` describes another evaluation (its records cannot be resumed)."""
    if not (run_dir / "run.json").is_file():
        return
    existing = load_run_info(run_dir)
    if existing.get("fingerprint") == run_info["fingerprint"]:
        return
    changed = sorted(
        key for key in set(existing) | set(run_info)
        if key not in ("fingerprint", "versions", "bootstrap_samples", "grid_samples", "title")
        and existing.get(key) != run_info.get(key)
    )
    raise ValueError(
        f"{run_dir} holds an evaluation with other settings (differing: {', '.join(changed) or 'unknown'}), so its "
        "records cannot be resumed. Evaluate into a new folder (evaluate.py makes a new version folder unless "
        "--resume is given), or pass --overwrite true to discard the old records."
    )
