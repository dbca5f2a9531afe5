"""Settings that cannot give a meaningful run are refused before any work, naming the setting, touching nothing.

A resumed training whose model settings differ from its checkpoint's, a training that would train nothing
(`max_epochs 0`, a resume past its checkpoint's `max_epochs`) or a cosine schedule without an epoch limit, an
architecture without weights, a NaN baseline of the deletion/insertion metric, and the `--weights_only` option
that would let a checkpoint run code (docs/guides/reliability.md, "Settings checked before work").
"""

import os
import shutil
from pathlib import Path

import pytest
import torch

import evaluate
import train
from mglightning.cli import SettingsRefused
from mglightning.metrics import DeletionInsertionAUC
from mglightning.metrics.fidelity import deletion_insertion_auc
from mglightning.models import ClassifierSource, build_classifier
from mglightning.modules.classifier import settings_differences
from test_adversarial_training import tiny_adv_args
from test_evaluate import _synthetic_args
from test_train import tiny_digits_args


def tree(folder: Path) -> dict[str, object]:
    """Every path under `folder` with its link target, or its bytes for a file: equal trees, nothing changed."""
    listing = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_symlink():
            listing[name] = ("link", os.readlink(path))
        elif path.is_file():
            listing[name] = path.read_bytes()
        else:
            listing[name] = "folder"
    return listing


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A folder holding one finished width-4 training: ckpt/ (version_0, last/best links) and logs/."""
    folder = tmp_path_factory.mktemp("trained")
    train.cli_main(tiny_digits_args(folder, "--test_after_fit", "false"))
    return folder


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A copy of the trained folder for one test (links kept as links)."""
    shutil.copytree(trained, tmp_path / "run", symlinks=True)
    return tmp_path / "run"


def with_setting(args: list[str], name: str, value: str) -> list[str]:
    """`args` with `--name`'s value replaced (or appended)."""
    args = list(args)
    if name in args:
        args[args.index(name) + 1] = value
    else:
        args += [name, value]
    return args


# --- case 5: a resumed training with model settings other than the checkpoint's ------------------------------


@pytest.mark.parametrize(
    ("setting", "value", "named"),
    [
        ("--model.model_kwargs", '{"activation": "softplus", "beta": 1.0, "width": 8}',
         r"model.model_kwargs: \{'activation': 'softplus', 'beta': 1.0, 'width': 8\} in the config, "
         r"\{'activation': 'softplus', 'beta': 1.0, 'width': 4\} in the checkpoint"),
        ("--model.lr", "0.2", r"model.lr: 0.2 in the config, 0.05 in the checkpoint"),
        ("--model.scheduler", "constant", r"model.scheduler: 'constant' in the config, 'cosine' in the checkpoint"),
    ],
)
def test_a_resume_with_other_model_settings_is_refused_and_changes_nothing(run, setting, value, named):
    before = tree(run)
    last = run / "ckpt" / "last.ckpt"
    args = with_setting(tiny_digits_args(run, "--trainer.max_epochs", "2", "--ckpt_path", str(last)), setting, value)
    with pytest.raises(SettingsRefused, match=named) as error:
        train.cli_main(args)
    message = str(error.value)
    assert str(last) in message and "nothing was trained or written" in message
    assert "still point where they did" in message and "drop --ckpt_path" in message and "config.yaml" in message
    assert tree(run) == before, "a refused resume wrote or moved something"


def test_train_py_prints_the_refusal_without_a_traceback_and_exits_1(run, monkeypatch):
    import runpy
    import sys

    last = run / "ckpt" / "last.ckpt"
    args = with_setting(tiny_digits_args(run, "--trainer.max_epochs", "2", "--ckpt_path", str(last)),
                        "--model.model_kwargs", '{"activation": "softplus", "beta": 1.0, "width": 8}')
    before = tree(run)
    script = Path(__file__).resolve().parents[1] / "train.py"
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    with pytest.raises(SystemExit) as stop:  # in-process: a subprocess would spend most of a minute importing
        runpy.run_path(str(script), run_name="__main__")
    # SystemExit with a message: Python prints it to stderr, without a traceback, and exits with status 1.
    assert isinstance(stop.value.code, str) and stop.value.code.startswith("error: The checkpoint")
    assert "'width': 8} in the config" in stop.value.code
    assert tree(run) == before


def test_a_resume_with_the_checkpoints_settings_goes_on(run):
    last = run / "ckpt" / "last.ckpt"
    cli = train.cli_main(tiny_digits_args(run, "--trainer.max_epochs", "2", "--ckpt_path", str(last),
                                          "--test_after_fit", "false"))
    assert cli.model.hparams.model_kwargs["width"] == 4 and cli.trainer.current_epoch == 2
    assert os.readlink(run / "ckpt" / "last.ckpt") == os.path.join("version_1", "last.ckpt")


def test_an_adversarial_resume_with_its_own_settings_goes_on(tmp_path):
    # The adversarial settings are a dataclass in the config and a plain dict in the checkpoint: not a difference.
    train.cli_main(tiny_adv_args("digits_adv_group.yaml", tmp_path))
    cli = train.cli_main(tiny_adv_args("digits_adv_group.yaml", tmp_path, "--trainer.max_epochs", "2",
                                       "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt")))
    assert cli.trainer.current_epoch == 2


def test_the_data_linked_settings_are_compared_too(run):
    # image_size comes from the datamodule (linked into the model): a checkpoint of 16x16 digits resumed on 32x32.
    before = tree(run)
    last = run / "ckpt" / "last.ckpt"
    args = with_setting(tiny_digits_args(run, "--ckpt_path", str(last)), "--data.init_args.image_size", "32")
    with pytest.raises(SettingsRefused, match=r"model.image_size: 32 in the config, 16 in the checkpoint"):
        train.cli_main(args)
    assert tree(run) == before


def test_testing_a_checkpoint_with_other_model_settings_is_refused_too(run):
    # LightningCLI would test the checkpoint's model while the config (and its logs) say width 8.
    args = tiny_digits_args(run, "--ckpt_path", str(run / "ckpt" / "last.ckpt"))
    args = with_setting(args, "--model.model_kwargs", '{"activation": "softplus", "beta": 1.0, "width": 8}')
    before = tree(run)
    with pytest.raises(SettingsRefused, match=r"'width': 8\} in the config, .*'width': 4\} in the checkpoint"):
        train.cli_main(["test", *args[1:]])  # tiny_digits_args starts with "fit"
    assert tree(run) == before


def test_settings_differences_compares_values_not_their_spelling():
    same = {"mean": [0.1, 0.2], "adversarial": {"mode": "none", "epsilon": 1.0}, "lr": 1, "_instantiator": "a"}
    stored = {"mean": (0.1, 0.2), "adversarial": {"mode": "none", "epsilon": 1.0}, "lr": 1.0, "_instantiator": "b"}
    assert settings_differences(same, stored) == {}
    assert settings_differences({"mean": [0.1, 0.2], "nesterov": False}, {"mean": (0.1, 0.3), "nesterov": 0}) == {
        "mean": ([0.1, 0.2], (0.1, 0.3)), "nesterov": (False, 0)}
    assert settings_differences({"width": 4}, {}) == {}, "a setting the checkpoint does not hold is not compared"


# --- case 8: a training that would train nothing ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (("--trainer.max_epochs", "0", "--model.scheduler", "constant"), r"trainer.max_epochs 0 would train nothing"),
        (("--trainer.max_epochs", "-2", "--model.scheduler", "constant"),
         r"trainer.max_epochs -2 is not a limit: give a positive"),
        (("--trainer.max_steps", "0"), r"trainer.max_steps 0 would train nothing"),
        (("--trainer.max_epochs", "-1", "--trainer.max_steps", "8"),
         r"model.scheduler 'cosine' .* trainer.max_epochs.* no epoch limit"),
    ],
)
def test_a_training_that_cannot_run_as_asked_is_refused_before_it_writes(tmp_path, extra, named):
    with pytest.raises(SettingsRefused, match=named):
        train.cli_main(tiny_digits_args(tmp_path, *extra))
    assert not list(tmp_path.iterdir()), "a refused training wrote something"


def test_resuming_a_checkpoint_that_reached_max_epochs_is_refused(run):
    # The checkpoint trained 1 epoch; `fit` with max_epochs 1 would stop at once and test it as this run's model.
    before = tree(run)
    last = run / "ckpt" / "last.ckpt"
    with pytest.raises(SettingsRefused, match=r"has trained 1 epochs already, and trainer.max_epochs 1 counts.*"
                       r"greater than 1 \(e.g. 2 for 1 more\)"):
        train.cli_main(tiny_digits_args(run, "--ckpt_path", str(last)))
    with pytest.raises(SettingsRefused, match=r"has trained 4 optimizer steps already, and trainer.max_steps 3"):
        train.cli_main(tiny_digits_args(run, "--ckpt_path", str(last), "--trainer.max_epochs", "3",
                                        "--trainer.max_steps", "3"))
    assert tree(run) == before


def test_a_refused_training_leaves_the_previous_runs_links(run):
    before = tree(run)
    with pytest.raises(SettingsRefused, match="max_epochs 0"):
        train.cli_main(tiny_digits_args(run, "--trainer.max_epochs", "0", "--model.scheduler", "constant"))
    assert tree(run) == before


# --- case 8: non-finite metric settings --------------------------------------------------------------------------


@pytest.mark.parametrize("baseline", [float("nan"), float("inf"), torch.tensor([0.0, float("nan")])])
def test_a_non_finite_deletion_insertion_baseline_is_refused_at_construction(baseline):
    with pytest.raises(ValueError, match="deletion/insertion: baseline must be finite|baseline must be a finite"):
        DeletionInsertionAUC(baseline=baseline)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))
    images = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match="baseline"):
        deletion_insertion_auc(model, images, torch.rand_like(images), torch.tensor([0, 1]), baseline=baseline)


def test_a_finite_baseline_still_works():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))
    images = torch.rand(2, 3, 4, 4)
    for baseline in (0.5, torch.full((1, 3, 1, 1), 0.25)):
        deletion, insertion = deletion_insertion_auc(model, images, images, torch.tensor([0, 1]), baseline=baseline)
        assert torch.isfinite(deletion).all() and torch.isfinite(insertion).all()


# --- case 6: an architecture without weights -------------------------------------------------------------------


def test_an_architecture_without_weights_is_refused_unless_asked_for():
    with pytest.raises(ValueError, match=r"`arch: resnet18` has no weights.*`weights: <file>`.*random_weights: true"):
        ClassifierSource(arch="resnet18", model_kwargs={"width": 4})
    with pytest.raises(ValueError, match=r"`arch: timm/resnet10t` has no weights.*`pretrained: true`"):
        ClassifierSource(arch="timm/resnet10t")
    with pytest.raises(ValueError, match="random_weights: true is for an `arch` given without `weights`"):
        ClassifierSource(arch="resnet18", weights="w.pt", random_weights=True)
    model = build_classifier(
        ClassifierSource(arch="resnet18", model_kwargs={"width": 4, "activation": "softplus"}, random_weights=True),
        num_classes=3, image_size=16, in_chans=3, mean=[0.5] * 3, std=[0.25] * 3,
    )
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 3)


def test_an_evaluation_of_a_weightless_classifier_is_refused_before_it_records(tmp_path):
    config = tmp_path / "classifier.yaml"
    config.write_text("model:\n  classifier: {arch: resnet18, model_kwargs: {width: 4, activation: softplus}}\n")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="has no weights.*random_weights: true"):
        evaluate.cli_main(_synthetic_args(out, config))
    assert not [path for path in out.rglob("*") if path.is_file()], "a refused evaluation wrote files"


# --- case 11: no --weights_only -----------------------------------------------------------------------------------


def test_there_is_no_weights_only_option(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.cli_main(tiny_digits_args(tmp_path, "--weights_only", "false"))
    assert "weights_only" in capsys.readouterr().err
    for subcommand in ("fit", "test"):
        with pytest.raises(SystemExit):
            train.cli_main([subcommand, "--help"])
        assert "--weights_only" not in capsys.readouterr().out


def test_every_subcommand_reads_the_checkpoint_weights_only(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's default turned to weights_only=False
    calls = []
    load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    args = tiny_digits_args(tmp_path, "--ckpt_path", str(trained / "ckpt" / "last.ckpt"))
    train.cli_main(["test", *args[1:]])  # tiny_digits_args starts with "fit"
    assert calls and all(value is True for value in calls), calls
