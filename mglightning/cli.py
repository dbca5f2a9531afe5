"""LightningCLI front end of `train.py`: YAML configs, command-line overrides, checkpoints and a final test."""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import pytorch_lightning as pl
from jsonargparse import DefaultHelpFormatter
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import Logger

from mglightning.checkpointing import DivergenceGuard, RunCheckpoint
from mglightning.models.weights import read_weights_file
from mglightning.modules.classifier import ClassifierModule, settings_differences


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help (types, defaults) with the description and epilog printed as written, line by line."""


DATA_GROUP_TITLE = "The datamodule (`--data <class>`, listed below; `--data.help <class>` lists its settings)"


def _configure_help(parser: LightningArgumentParser) -> None:
    """Help that keeps the examples' lines, and a `--data` heading of our own (not LightningDataModule's docstring)."""
    parser.formatter_class = _HelpFormatter
    # The title jsonargparse takes from the base class's docstring breaks off at "The main advantage is:".
    parser.groups["data"].title = DATA_GROUP_TITLE


class _DropLightningTips(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing litlogger / litmodels" lines, which every run printed."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


_LIGHTNING_TIPS = _DropLightningTips()


def quiet_lightning() -> None:
    """Silence what every train/evaluate run printed that is no news to its user.

    Lightning's advertising tips (logged through its rank-zero loggers) and the FutureWarning that torch raises
    when Lightning builds its `LeafSpec` (Lightning's code, nothing a user can change). Other warnings stay.
    """
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_LIGHTNING_TIPS)  # addFilter does not add the same filter twice
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )


class TrainCLI(LightningCLI):
    """`python train.py fit --config configs/<name>.yaml`, with the data's shape linked into the model.

    Adds three groups to the usual LightningCLI options: `checkpoint.*` (a `RunCheckpoint`: best by `val/acc`
    plus `last.ckpt`, in a folder of their own per run, `checkpoints/<experiment>/version_<n>/`, with
    `checkpoints/<experiment>/last.ckpt` and `best.ckpt` linked to the newest run's), `divergence.*` (a
    `DivergenceGuard`: stop with `TrainingDiverged` at the first non-finite loss, leaving the links as they were)
    and `test_after_fit` (evaluate the best checkpoint on the test set when `fit` ends). `--ckpt_path` (resume)
    is always read with `weights_only=True` (Lightning's `--weights_only` option is not offered).

    Checked before anything is trained or written (`SettingsRefused`, naming the settings): `trainer.max_epochs`
    and `trainer.max_steps` must let `fit` train (not 0), a cosine schedule needs a finite number of epochs, and
    the model settings of a `--ckpt_path` checkpoint must equal the config's (LightningCLI would otherwise
    silently replace the config's model settings with the checkpoint's), and a resumed `fit` must have epochs
    (steps) left to train.
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # Lightning 2.6 adds `--weights_only` to every subcommand; passing false would let `--ckpt_path` run code
        # from the file. train.py's checkpoints never need it, so it is not offered (see `fit` and the others below).
        return {name: {*skipped, "weights_only"} for name, skipped in LightningCLI.subcommands().items()}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        _configure_help(parser)
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:03d}-acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        # Always on: a diverged run stops with an error instead of testing and linking a NaN model.
        parser.add_lightning_class_args(DivergenceGuard, "divergence")
        parser.add_argument(
            "--test_after_fit", type=bool, default=True, help="Test the best checkpoint when fit ends."
        )
        for name in ("num_classes", "image_size", "mean", "std"):
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        # Read `--ckpt_path` first with the package's one reader: an empty, foreign or refused file becomes an
        # error that says what it holds and what to do, before Lightning reads the whole checkpoint in `fit`.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        self._checkpoint_settings = None
        self._checkpoint_progress = None
        if ckpt_path and Path(ckpt_path).is_file():
            content = read_weights_file(ckpt_path)
            if isinstance(content, dict) and isinstance(content.get("hyper_parameters"), dict):
                self._checkpoint_settings = content["hyper_parameters"]
                self._checkpoint_progress = training_progress(content)

    def _parse_ckpt_path(self) -> None:
        """Not LightningCLI's: it replaces the config's model settings with the checkpoint's, silently.

        A resumed run whose config says another width (or learning rate, ...) would train the checkpoint's model
        and link it as the experiment's newest. Here the config's settings stay, and `after_instantiate_classes`
        refuses the run when they differ from the checkpoint's.
        """

    def before_instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        if subcommand == "fit":
            check_training_length(self.config[subcommand].trainer)

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        subcommand = self.config.get("subcommand")
        if subcommand == "fit" and self.model.hparams.get("scheduler") == "cosine" and self.trainer.max_epochs == -1:
            raise SettingsRefused(
                "model.scheduler 'cosine' decays the learning rate over trainer.max_epochs, but the run has no "
                "epoch limit (max_epochs -1, or unset with max_steps or max_time given). Set trainer.max_epochs to "
                "a number of epochs, or use model.scheduler 'constant' or 'multistep'. Nothing was trained or "
                "written."
            )
        if self._checkpoint_settings is not None:
            ckpt_path = self.config[subcommand].get("ckpt_path")
            differences = settings_differences(dict(self.model.hparams), self._checkpoint_settings)
            if differences:
                raise SettingsRefused(checkpoint_mismatch_message(ckpt_path, differences, self.trainer))
            if subcommand == "fit" and self._checkpoint_progress is not None:
                check_resume_trains(ckpt_path, *self._checkpoint_progress, self.trainer)

    # LightningCLI runs the subcommand through these methods: each reads `--ckpt_path` with weights_only=True,
    # whatever torch's default or TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD say, so that a checkpoint cannot run code
    # (train.py's checkpoints hold only tensors and plain values).
    def fit(self, model: pl.LightningModule, **kwargs) -> None:
        self.trainer.fit(model, weights_only=True, **kwargs)

    def validate(self, model: pl.LightningModule, **kwargs) -> None:
        self.trainer.validate(model, weights_only=True, **kwargs)

    def test(self, model: pl.LightningModule, **kwargs) -> None:
        self.trainer.test(model, weights_only=True, **kwargs)

    def predict(self, model: pl.LightningModule, **kwargs) -> None:
        self.trainer.predict(model, weights_only=True, **kwargs)

    def after_fit(self) -> None:
        trainer = self.trainer
        checkpoint = trainer.checkpoint_callback
        # Read before testing: loading the best checkpoint for the test restores the callback's state as it was
        # when that file was saved. Under ddp_spawn only the best path comes back to this process.
        best = checkpoint.best_model_path if checkpoint is not None else ""
        last = checkpoint.last_model_path if checkpoint is not None else ""
        if self.config["fit"].get("test_after_fit") and not trainer.fast_dev_run:
            trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None, weights_only=True)
        if trainer.is_global_zero:
            print("\n".join(self._summary_lines(best, last)), flush=True)

    def _summary_lines(self, best: str, last: str) -> list[str]:
        """Where this run's files are: the paths the checkpoint callback wrote (not guessed) and the logs."""
        import sys

        trainer = self.trainer
        lines = ["", "Training finished."]
        if best:
            lines.append(f"  best checkpoint:  {_display(best)}")
        if last:
            lines.append(f"  last checkpoint:  {_display(last)}")
        root = getattr(trainer.checkpoint_callback, "root_dirpath", None)
        if root is not None and best and not trainer.interrupted:
            links = ", ".join(_display(root / name) for name in RunCheckpoint.LINK_NAMES.values())
            lines.append(f"  now linked from:  {links}")
        if trainer.logger is not None and trainer.logger.log_dir:
            tensorboard = Path(sys.executable).parent / "tensorboard"
            command = _display(tensorboard) if tensorboard.is_file() else "tensorboard"
            lines.append(f"  TensorBoard logs: {_display(trainer.logger.log_dir)}")
            lines.append(f"  view them with:   {command} --logdir {_display(trainer.logger.save_dir)}")
        return lines


class SettingsRefused(ValueError):
    """A training command refused before it trained or wrote anything; the message names the settings."""


def check_training_length(trainer_config) -> None:
    """Refuse `trainer.max_epochs` or `trainer.max_steps` that let `fit` train nothing (0) or are no limit (< -1).

    `fit` with `max_epochs 0` would "finish" at once and test and link the untrained model. -1 (no limit) and
    unset (Lightning's default) are kept.
    """
    for name in ("max_epochs", "max_steps"):
        value = trainer_config.get(name)
        if value is not None and (value == 0 or value < -1):
            raise SettingsRefused(
                f"trainer.{name} {value} {'would train nothing' if value == 0 else 'is not a limit'}: give a "
                "positive number of "
                f"{'epochs' if name == 'max_epochs' else 'optimizer steps'} (or -1 for no limit"
                + (", with max_steps or max_time to stop" if name == "max_epochs" else "")
                + "). To test a checkpoint without training, use `train.py test --ckpt_path <file>`. Nothing was "
                "trained or written."
            )


def training_progress(checkpoint: dict) -> tuple[int, int] | None:
    """`(epochs, steps)` a Lightning checkpoint has trained: its fit loop's processed epochs (what the loop
    compares with `max_epochs` when it resumes) and its global step; None where it does not hold them."""
    try:
        epochs = checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]
        steps = checkpoint["global_step"]
    except (KeyError, TypeError):
        return None
    return (epochs, steps) if isinstance(epochs, int) and isinstance(steps, int) else None


def check_resume_trains(ckpt_path: str, epochs: int, steps: int, trainer: pl.Trainer) -> None:
    """Refuse a resume whose `max_epochs`/`max_steps` the checkpoint has reached already: `fit` would train
    nothing, then test the checkpoint's model as if it were this run's."""
    for name, done, limit, unit in (("max_epochs", epochs, trainer.max_epochs, "epochs"),
                                    ("max_steps", steps, trainer.max_steps, "optimizer steps")):
        if limit is not None and limit != -1 and done >= limit:
            raise SettingsRefused(
                f"The checkpoint {ckpt_path!r} has trained {done} {unit} already, and trainer.{name} {limit} counts "
                f"the {unit} of the whole training, so resuming it would train nothing. Give trainer.{name} "
                f"greater than {done} (e.g. {done + max(limit, 1)} for {max(limit, 1)} more). Nothing was trained "
                "or written."
            )


def checkpoint_mismatch_message(ckpt_path: str, differences: dict, trainer: pl.Trainer) -> str:
    """Why a `--ckpt_path` checkpoint was refused: its model settings differ from the config's (`differences`:
    `{name: (config's, checkpoint's)}`), what was left as it was, and what to do."""
    listed = "; ".join(
        f"model.{name}: {config!r} in the config, {stored!r} in the checkpoint"
        for name, (config, stored) in differences.items()
    )
    root = getattr(trainer.checkpoint_callback, "root_dirpath", None)
    untouched = (f" {_display(root / 'last.ckpt')} and {_display(root / 'best.ckpt')} still point where they did."
                 if root is not None else "")
    return (
        f"The checkpoint {ckpt_path!r} was trained with other model settings than this run's config: {listed}. "
        "Its weights and training state belong to its own settings, so the two must agree; nothing was trained "
        "or written."
        + untouched
        + " Resume with the settings it was trained with (train.py saved them as config.yaml in that run's log "
        "folder, e.g. `--config logs/<experiment>/version_<n>/config.yaml`, or override the settings named "
        "here), or drop --ckpt_path to train these settings from scratch."
    )


def _display(path: str | Path) -> str:
    """`path` relative to the working directory when it lies below it (shorter, and what the README shows)."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def train_main(args: list[str] | None = None) -> TrainCLI:
    """Run the training CLI with `args` (the command line when None); returns the CLI (model, trainer, ...)."""
    quiet_lightning()
    return TrainCLI(
        ClassifierModule,
        pl.LightningDataModule,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )


EVALUATE_DESCRIPTION = """Evaluate explainers of an image classifier under interpretation attacks.

  python evaluate.py --config configs/eval_digits.yaml --ckpt_path checkpoints/digits/last.ckpt
  python evaluate.py --config configs/eval_digits.yaml --ckpt_path ... --resume last   # continue a stopped run
  python evaluate.py report logs/eval_digits/version_0                                # tables/figures from records
  python evaluate.py report logs/eval_digits/version_0 --metrics metrics.yaml         # + metrics from stored maps

Each run writes into a new version folder of its logger (or --resume's folder): run.json, per-sample records,
results.json/.csv/.md, robustness.png, saliency_grid.png and TensorBoard events."""


class EvaluationTrainer(pl.Trainer):
    """The `Trainer` of an evaluation, with only the settings that apply to one.

    Explanations need autograd (`inference_mode=False`), the evaluator's datamodule splits the samples over
    devices itself (`use_distributed_sampler=False`), and the evaluator shows its own progress bar.

    Args:
        accelerator: `cpu`, `gpu`, `auto`, ...
        devices: devices per node (e.g. 4, or `auto`).
        num_nodes: number of nodes.
        strategy: `auto`, `ddp`, `ddp_spawn`, ...
        precision: Lightning precision of the classifier's forward passes (e.g. `32-true`).
        logger: the TensorBoard logger (its version folder is the run folder), or false.
        callbacks: extra callbacks.
        default_root_dir: where runs go without a logger (`<default_root_dir>/evaluations/version_N`).
        deterministic: use deterministic algorithms.
    """

    def __init__(
        self,
        accelerator: str = "auto",
        devices: list[int] | str | int = "auto",
        num_nodes: int = 1,
        strategy: str = "auto",
        precision: Optional[str] = None,
        logger: Optional[Union[Logger, bool]] = None,
        callbacks: Optional[Union[list[Callback], Callback]] = None,
        default_root_dir: Optional[str] = None,
        deterministic: Optional[bool] = None,
    ) -> None:
        super().__init__(
            accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy, precision=precision,
            logger=logger, callbacks=callbacks, default_root_dir=default_root_dir, deterministic=deterministic,
            inference_mode=False, use_distributed_sampler=False, enable_progress_bar=False,
            enable_model_summary=False,
        )


class EvaluateCLI(LightningCLI):
    """`python evaluate.py --config configs/eval_<name>.yaml --ckpt_path <classifier checkpoint>`."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--ckpt_path", type=Optional[str], default=None,
            help="The classifier checkpoint to evaluate (same as --model.classifier).",
        )
        parser.add_argument(
            "--resume", type=Optional[str], default=None,
            help="Continue the run in this folder (or `last`: the newest run of this logger), skipping the samples "
            "it already recorded. Refused, without a change to the folder, when it holds an evaluation with other "
            "settings.",
        )
        parser.add_argument(
            "--overwrite", type=bool, default=False,
            help="With --resume: once the new evaluation has been checked, move the folder's run into "
            "<folder>/replaced-<time>/ and evaluate from scratch.",
        )
        _configure_help(parser)
        parser.epilog = explainer_settings_help() + "\n\n" + evaluation_parts_help()
        # The classifier is built and checked against the data it is evaluated on.
        for name in ("num_classes", "image_size", "in_chans", "mean", "std"):
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config
        if config.get("ckpt_path"):
            config.model.classifier = config.ckpt_path
        config.model.overwrite = bool(config.get("overwrite"))
        if config.model.get("run_dir") is not None:
            # evaluate.py chooses (and locks) the folder itself; a given one would be silently replaced.
            raise ValueError(
                f"--model.run_dir {config.model.run_dir!r}: evaluate.py chooses the run folder itself, a new "
                "<logger save_dir>/<name>/version_<n>/. Name it with --trainer.logger.init_args.save_dir and "
                "--trainer.logger.init_args.name, or continue a folder with --resume DIR."
            )
        run_dir = _run_folder(config)
        config.model.run_dir = str(run_dir)
        logger = config.trainer.get("logger")
        if getattr(logger, "init_args", None) is not None:
            # The logger writes into the same folder: version `<name>` under save_dir `<parent>`, no experiment name.
            logger.init_args.save_dir = str(run_dir.parent)
            logger.init_args.name = ""
            logger.init_args.version = run_dir.name


# The run folder that the first process chose, for the processes Lightning launches for the other devices
# (they run this same command again and must not choose a folder of their own).
RUN_DIR_VARIABLE = "MGLIGHTNING_EVALUATION_RUN_DIR"


class _FolderClaim:
    """What this command holds of its run folder: the lock, taken before anything is written into the folder,
    whether the command created the folder, and the names the folder held when the lock was taken."""

    def __init__(self, run_dir: Path, created: bool) -> None:
        from mglightning.evaluation.run_folder import COMMAND_LOCK_VARIABLE, RunLock

        self.run_dir = run_dir
        self.created = created
        self.lock = RunLock(run_dir).acquire()  # a busy folder is refused here, before the classifier is loaded
        self.before = frozenset(path.name for path in run_dir.iterdir())
        os.environ[COMMAND_LOCK_VARIABLE] = str(run_dir)

    def undo(self, accepted: bool) -> None:
        """After a failure: remove what this command created, and nothing else.

        A folder it created goes when it holds no record (`discard_unstarted`). In a `--resume` folder that was
        refused (`accepted` False), only the logger files that appeared while this command held the lock are
        removed (Lightning opens its events file, and writes hparams.yaml when the folder lacks one, before the
        evaluator has checked the folder); the lock is released by `release`.
        """
        import sys

        from mglightning.evaluation import discard_unstarted

        if not self.lock.held:
            return
        if self.created:
            if discard_unstarted(self.run_dir, self.lock):
                print(f"The run stopped before its first record; {self.run_dir} was removed.", file=sys.stderr)
        elif not accepted:
            for path in self.run_dir.iterdir():
                own = path.name.startswith("events.out.tfevents.") or path.name == "hparams.yaml"
                if own and path.name not in self.before and path.is_file():
                    path.unlink()

    def release(self) -> None:
        from mglightning.evaluation.run_folder import COMMAND_LOCK_VARIABLE

        self.lock.release()
        os.environ.pop(COMMAND_LOCK_VARIABLE, None)


# This command's claim on its run folder (None in the processes Lightning launches for the other devices).
_claim: _FolderClaim | None = None


def _run_folder(config) -> Path:
    """The run's folder, decided here once for every process (`choose_run_folder`), and locked by the process
    that decided it before anything is written."""
    global _claim
    from mglightning.evaluation import choose_run_folder

    if os.environ.get(RUN_DIR_VARIABLE):
        return Path(os.environ[RUN_DIR_VARIABLE])
    if config.get("overwrite") and not config.get("resume"):
        raise ValueError("--overwrite replaces a run folder given by --resume DIR; a new run gets a new folder anyway.")
    # A process that torchrun or SLURM started as another rank reserves nothing: the evaluator takes rank 0's folder
    # when the processes meet (set-up).
    secondary = int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0) > 0
    resume = config.get("resume")
    run_dir = choose_run_folder(_runs_root(config), resume, reserve=not secondary)
    if not secondary:
        try:
            _claim = _FolderClaim(run_dir, created=resume is None)
        except BaseException:
            if resume is None:
                run_dir.rmdir()  # the empty folder reserved a moment ago
            raise
    os.environ[RUN_DIR_VARIABLE] = str(run_dir)
    return run_dir


def explainer_settings_help() -> str:
    """The registered explainers and their settings with types and defaults, for `evaluate.py --help`.

    One line per explainer, then its settings as `name: type = default`, wrapped under it (the help is printed
    as written, so the lines stay).
    """
    from mglightning.explainers import EXPLAINERS

    lines = ["explainers (model.explainers: {label: {class_path: <class>, init_args: {setting: value}}}):"]
    for cls in EXPLAINERS.values():
        lines.append(f"  {cls.__module__.rsplit('.', 1)[0]}.{cls.__name__}  ({cls.name}: {cls.display_name})")
        settings = []
        for name, parameter in cls.setting_parameters().items():
            annotation = parameter.annotation if isinstance(parameter.annotation, str) else getattr(
                parameter.annotation, "__name__", str(parameter.annotation)
            )
            settings.append(f"{name}: {annotation} = {parameter.default!r}")
        line = ""
        for setting in settings:  # packed into lines of at most ~100 characters, never split inside a setting
            if line and len(line) + len(setting) > 92:
                lines.append(f"      {line.rstrip(', ')}")
                line = ""
            line += f"{setting}, "
        lines.append(f"      {line.rstrip(', ')}")
    return "\n".join(lines)


def _runs_root(config) -> Path:
    """The folder that holds this configuration's run folders: the TensorBoard logger's, or
    `<default_root_dir>/evaluations` without one."""
    logger = config.trainer.get("logger")
    init_args = getattr(logger, "init_args", None) if logger not in (None, False, True) else None
    if init_args is not None and init_args.get("save_dir") is not None:
        return Path(init_args.save_dir) / (init_args.get("name") or "")
    return Path(config.trainer.get("default_root_dir") or ".") / "evaluations"


def evaluation_parts_help() -> str:
    """The attacks and metrics an evaluation can be given, with their settings' types and defaults."""
    from mglightning.attacks import GaussianNoise, TopKInterpretationAttack
    from mglightning.metrics import DeletionInsertionAUC, NormalizedDistance, SaliencySSIM, Sparsity, TopKIntersection

    sections = [
        ("attacks (model.attacks: {label: {class_path: <class>, init_args: {setting: value}}}; your own subclasses "
         "mglightning.attacks.Attack; several: each sample counts at its worst case)",
         (TopKInterpretationAttack, GaussianNoise), ("self", "explainer", "epsilon")),
        ("metrics (model.metrics: {label: {class_path: <class>, init_args: {setting: value}}}; your own subclasses "
         "mglightning.metrics.SampleMetric)",
         (NormalizedDistance, TopKIntersection, SaliencySSIM, Sparsity, DeletionInsertionAUC),
         ("self", "model", "kwargs")),
    ]
    blocks = []
    for title, classes, skipped in sections:
        lines = [title + ":"]
        for cls in classes:
            lines.append(f"  {cls.__module__.rsplit('.', 1)[0]}.{cls.__name__}")
            for name, parameter in inspect.signature(cls.__init__).parameters.items():
                if name in skipped:
                    continue
                annotation = parameter.annotation if isinstance(parameter.annotation, str) else getattr(
                    parameter.annotation, "__name__", str(parameter.annotation))
                lines.append(f"      {name}: {annotation} = {parameter.default!r}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def evaluate_main(args: list[str] | None = None) -> EvaluateCLI | dict[str, Path]:
    """Evaluate explainers under attack; returns the CLI (its `model.result_rows` hold the results on rank 0).

    `evaluate_main(["report", run_dir])` recomputes the tables and figures of a run folder from its records;
    `evaluate_main(["report", run_dir, "--metrics", spec])` first adds metrics computed from its stored maps.
    A run stopped by SIGTERM (a scheduler's preemption) or SIGINT keeps its finished batches and exits with
    status 143 or 130, printing the command that continues it.
    """
    import sys

    global _claim
    arguments = sys.argv[1:] if args is None else list(args)
    if arguments[:1] == ["report"]:
        return _report_main(arguments[1:])
    # Imported here so that training does not load the explainer stack.
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from mglightning.modules.evaluator import ExplanationEvaluator, RunComplete
    from mglightning.reporting import report

    launched = os.environ.get(RUN_DIR_VARIABLE) is None
    cli = None
    try:
        cli = EvaluateCLI(
            ExplanationEvaluator,
            pl.LightningDataModule,
            subclass_mode_data=True,
            trainer_class=EvaluationTrainer,
            run=False,
            args=args,  # None: LightningCLI reads the command line itself (and does not warn about both)
            save_config_callback=RunConfigSaver,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            parser_kwargs={"description": EVALUATE_DESCRIPTION},
        )
        evaluator = cli.model
        try:
            cli.trainer.test(evaluator, datamodule=cli.datamodule, verbose=False)
        except RunComplete as complete:
            if cli.trainer.is_global_zero:
                print(f"{complete} Nothing left to evaluate; its results:")
                evaluator.result_rows, evaluator.output_paths = report(complete.run_dir)
            return cli
        except (SIGTERMException, KeyboardInterrupt, SystemExit) as stop:
            status = 143 if isinstance(stop, SIGTERMException) else 130
            if isinstance(stop, SystemExit) and not isinstance(stop, SIGTERMException) and not cli.trainer.interrupted:
                raise
            _stopped(evaluator.run_dir, status, cli.trainer.is_global_zero)
            raise SystemExit(status) from None
        if cli.trainer.is_global_zero:
            print(f"  run folder: {evaluator.run_dir}  (re-report: python evaluate.py report {evaluator.run_dir})")
        return cli
    except BaseException:
        evaluator = cli.model if cli is not None and isinstance(cli.model, ExplanationEvaluator) else None
        if evaluator is not None:
            evaluator.release_run_folder()  # the process may go on (a notebook, a test): free the folder now
        if launched and _claim is not None:
            _claim.undo(accepted=evaluator is not None and evaluator.folder_checked)
        raise
    finally:
        if launched:
            if _claim is not None:
                _claim.release()
                _claim = None
            os.environ.pop(RUN_DIR_VARIABLE, None)


def _report_main(arguments: list[str]) -> dict[str, Path]:
    """`python evaluate.py report <run_dir> [--metrics ...]`: the results of a run folder from its records, with
    metrics added from its stored maps first when `--metrics` names some."""
    import argparse

    from mglightning.evaluation.added import add_metrics, metrics_from_config
    from mglightning.reporting import report

    parser = argparse.ArgumentParser(
        prog="evaluate.py report",
        description="Write results.json/.csv/.md and the figures of an evaluation run folder from its records, "
        "without recomputing a map.",
    )
    parser.add_argument("run_dir", help="the run folder (holds run.json and records/)")
    parser.add_argument(
        "--metrics", default=None,
        help="metrics to compute from the run's stored maps (a run evaluated with model.keep_maps), as "
        "{label: {class_path: ..., init_args: {...}}} in YAML or JSON, or a YAML file holding that; their values "
        "go to <run_dir>/added/<label>.parquet and their columns into the results, e.g. "
        "'{ssim: {class_path: mglightning.metrics.SaliencySSIM}}'",
    )
    options = parser.parse_args(arguments)
    if options.metrics is not None:
        for label, path in add_metrics(options.run_dir, metrics_from_config(options.metrics)).items():
            print(f"  added {label}: {path}")
    return report(options.run_dir)[1]


def _stopped(run_dir: Path | None, status: int, rank_zero: bool) -> None:
    """What a stopped run says: it is not finished, its finished batches are kept, and how to continue."""
    import shlex
    import sys

    if not rank_zero or run_dir is None:
        return
    signal_name = "SIGTERM" if status == 143 else "SIGINT"
    command = [Path(sys.argv[0]).name, *[a for a in sys.argv[1:] if not a.startswith("--resume")], "--resume",
               str(run_dir)]
    print(
        f"\nStopped by {signal_name}: the run is NOT finished. Its finished batches are recorded in {run_dir}; "
        f"continue it with:\n  python {shlex.join(command)}",
        file=sys.stderr, flush=True,
    )


class RunConfigSaver(SaveConfigCallback):
    """Saves the evaluation's config as `config.yaml` in its run folder, once the run has been checked.

    LightningCLI's own callback writes at set-up, before the evaluator has checked the run folder; a refused
    resume would then have rewritten the folder's config. This one writes when the test starts.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pass

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.parser.save(self.config, str(Path(pl_module.run_dir) / self.config_filename), skip_none=False,
                             overwrite=True, multifile=False)
