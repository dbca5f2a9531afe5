"""LightningCLI front end of `evaluate.py`: the evaluation's trainer, its run folder, and the `report` command."""

from __future__ import annotations

import inspect
import os
import shlex
import sys
from pathlib import Path
from typing import Optional, Union

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import Logger

from mglightning.cli_common import configure_help


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
        # Shorter names of two model settings: `--ckpt_path FILE` is `--model.classifier FILE` and
        # `--overwrite true` is `--model.overwrite true` (the same option, not a copy written over it).
        _add_alias(parser, "--model.classifier", "--ckpt_path")
        _add_alias(parser, "--model.overwrite", "--overwrite")
        parser.add_argument(
            "--resume", type=Optional[str], default=None,
            help="Continue the run in this folder (or `last`: the newest run of this logger), skipping the samples "
            "it already recorded. Refused, without a change to the folder, when it holds an evaluation with other "
            "settings.",
        )
        configure_help(parser)
        parser.epilog = explainer_settings_help() + "\n\n" + evaluation_parts_help()
        # The classifier is built and checked against the data it is evaluated on.
        for name in ("num_classes", "image_size", "in_chans", "mean", "std"):
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config
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


def _add_alias(parser: LightningArgumentParser, option: str, alias: str) -> None:
    """`alias` as another name of `option`, on the command line and in a config (jsonargparse finds an action by
    any of its option strings, as for `add_argument(option, alias)`)."""
    action = parser._option_string_actions[option]
    action.option_strings.append(alias)
    parser._option_string_actions[alias] = action


class _FolderClaim:
    """What this command holds of its run folder: the lock, taken before anything is written into the folder,
    whether the command created the folder, and the names the folder held when the lock was taken."""

    def __init__(self, run_dir: Path, created: bool) -> None:
        from mglightning.evaluation.run_folder import RunLock

        self.run_dir = run_dir
        self.created = created
        self.lock = RunLock(run_dir).acquire()  # a busy folder is refused here, before the classifier is loaded
        self.before = frozenset(path.name for path in run_dir.iterdir())

    def undo(self, accepted: bool) -> None:
        """After a failure: remove what this command created, and nothing else.

        A folder it created goes when it holds no record (`discard_unstarted`). In a `--resume` folder that was
        refused (`accepted` False), only the logger files that appeared while this command held the lock are
        removed (Lightning opens its events file, and writes hparams.yaml when the folder lacks one, before the
        evaluator has checked the folder); the lock is released by `release`.
        """
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
        self.lock.release()


# This command's claim on its run folder (None in the processes of the other ranks).
_claim: _FolderClaim | None = None


def _run_folder(config) -> Path:
    """The run's folder (`choose_run_folder`), reserved and locked by rank 0 before anything is written.

    A process of another rank (started by torchrun, SLURM, or Lightning for the other devices, each running this
    command again) reserves nothing: the evaluator takes rank 0's folder, broadcast by the strategy, when the
    processes meet (set-up).
    """
    global _claim
    from mglightning.evaluation import choose_run_folder

    if config.model.get("overwrite") and not config.get("resume"):
        raise ValueError("--overwrite replaces a run folder given by --resume DIR; a new run gets a new folder anyway.")
    secondary = any(int(os.environ.get(name) or 0) > 0 for name in ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK"))
    resume = config.get("resume")
    run_dir = choose_run_folder(_runs_root(config), resume, reserve=not secondary)
    if not secondary:
        try:
            _claim = _FolderClaim(run_dir, created=resume is None)
        except BaseException:
            if resume is None:
                run_dir.rmdir()  # the empty folder reserved a moment ago
            raise
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
    global _claim
    arguments = sys.argv[1:] if args is None else list(args)
    if arguments[:1] == ["report"]:
        return _report_main(arguments[1:])
    # Imported here so that training does not load the explainer stack.
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from mglightning.modules.evaluator import ExplanationEvaluator, RunComplete
    from mglightning.reporting import report

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
        if _claim is not None:
            _claim.undo(accepted=evaluator is not None and evaluator.folder_checked)
        raise
    finally:
        if _claim is not None:
            _claim.release()
            _claim = None


def report_run(run_dir: str, metrics: Optional[str] = None) -> dict[str, Path]:
    """Write a run folder's results.json/.csv/.md and figures from its records, without recomputing a map.

    Args:
        run_dir: the run folder (holds run.json and records/).
        metrics: metrics to compute first from the run's stored maps (a run evaluated with model.keep_maps), as
            {label: {class_path: ..., init_args: {...}}} in YAML or JSON, or a YAML file holding that; their
            values go to <run_dir>/added/<label>.parquet and their columns into the results, e.g.
            '{ssim: {class_path: mglightning.metrics.SaliencySSIM}}'.

    Returns:
        `{output name: path}` of the files written.
    """
    from mglightning.evaluation.added import add_metrics, metrics_from_config
    from mglightning.reporting import report

    if metrics is not None:
        for label, path in add_metrics(run_dir, metrics_from_config(metrics)).items():
            print(f"  added {label}: {path}")
    return report(run_dir)[1]


def _report_main(arguments: list[str]) -> dict[str, Path]:
    """`python evaluate.py report <run_dir> [--metrics ...]`: `report_run` with its typed help."""
    from jsonargparse import CLI

    return CLI(report_run, args=arguments, prog="evaluate.py report")


def _stopped(run_dir: Path | None, status: int, rank_zero: bool) -> None:
    """What a stopped run says: it is not finished, its finished batches are kept, and how to continue."""
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
