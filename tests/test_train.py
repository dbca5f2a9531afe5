"""The training CLI as users drive it: `train.py fit --config ...` with overrides, through `cli_main(args)`."""

import os
import re
from pathlib import Path

import pytest
import torch
import yaml

import train
from mglightning import load_classifier

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_digits_args(tmp_path: Path, *extra: str) -> list[str]:
    """The quickstart config shrunk to seconds: 16x16 digits, width-4 ResNet-18, a few batches."""
    return [
        "fit",
        "--config", str(CONFIGS / "digits.yaml"),
        "--data.init_args.image_size", "16",
        "--data.init_args.batch_size", "32",
        "--model.model_kwargs", '{"activation": "softplus", "beta": 1.0, "width": 4}',
        "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "4",
        "--trainer.limit_val_batches", "2",
        "--trainer.limit_test_batches", "2",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
        "--checkpoint.dirpath", str(tmp_path / "ckpt"),
        *extra,
    ]


def test_fit_writes_checkpoints_logs_and_reloads(tmp_path, capsys):
    cli = train.cli_main(tiny_digits_args(tmp_path))
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    assert best.is_file() and (tmp_path / "ckpt" / "last.ckpt").is_file()
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    printed = capsys.readouterr().out
    assert "best checkpoint:" in printed and "tensorboard --logdir" in printed

    # The checkpoint alone rebuilds the network and reproduces the validation accuracy it was saved with.
    model = load_classifier(best)
    assert not model.training and next(model.parameters()).device.type == "cpu"
    datamodule = cli.datamodule
    correct = total = 0
    with torch.no_grad():
        for batch_index, (images, labels) in enumerate(datamodule.val_dataloader()):
            if batch_index == 2:  # limit_val_batches
                break
            correct += (model(images).argmax(1) == labels).sum().item()
            total += len(labels)
    assert correct / total == pytest.approx(cli.trainer.checkpoint_callback.best_model_score.item(), abs=1e-6)


def printed_paths(output: str) -> dict[str, Path]:
    """The `best checkpoint:`/`last checkpoint:` lines of the summary that training prints, as absolute paths."""
    paths = {}
    for line in output.splitlines():
        label, _, value = line.strip().partition(":")
        if label in ("best checkpoint", "last checkpoint"):
            paths[label.split()[0]] = Path(value.strip()).absolute()
    return paths


def demo_checkpoint() -> tuple[Path, Path]:
    """What `make demo` does: the training config it runs and the checkpoint it then evaluates."""
    makefile = (CONFIGS.parent / "Makefile").read_text()
    recipe = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    train_config = re.search(r"train\.py fit --config (\S+)", recipe).group(1)
    evaluated = re.search(r"evaluate\.py .*--ckpt_path (\S+)", recipe).group(1)
    return Path(train_config), Path(evaluated)


@pytest.mark.parametrize("logger", [True, False])
def test_a_second_run_into_the_same_folder_is_the_one_printed_and_evaluated(tmp_path, capsys, logger):
    # The demo evaluates `<checkpoint.dirpath of its training config>/last.ckpt`.
    train_config, evaluated = demo_checkpoint()
    dirpath = Path(yaml.safe_load((CONFIGS.parent / train_config).read_text())["checkpoint"]["dirpath"])
    assert evaluated == dirpath / "last.ckpt"

    logger_args = [] if logger else ["--trainer.logger", "false", "--trainer.callbacks", "[]"]  # no LR monitor
    runs = []
    for seed in (0, 1):  # two different models, so that a stale file cannot pass for the new one
        cli = train.cli_main(tiny_digits_args(tmp_path, "--seed_everything", str(seed), *logger_args))
        callback = cli.trainer.checkpoint_callback
        printed = printed_paths(capsys.readouterr().out)
        # (The final test reloads the best checkpoint and with it the callback's state of that time, so the last
        # checkpoint is looked up in the run's folder.)
        assert printed == {"best": Path(callback.best_model_path), "last": Path(callback.dirpath) / "last.ckpt"}
        assert printed["best"].is_file() and printed["last"].is_file()
        runs.append((printed, {k: v.clone() for k, v in cli.model.state_dict().items()}))

    (first, _), (second, second_weights) = runs
    assert first["last"].parent.name == "version_0" and second["last"].parent.name == "version_1"
    assert first["last"].is_file(), "the first run's checkpoints are kept"
    # What the demo's command evaluates, in this test's checkpoint folder: the second run's last checkpoint.
    for link, printed in (("last.ckpt", second["last"]), ("best.ckpt", second["best"])):
        assert (tmp_path / "ckpt" / link).resolve() == printed.resolve()
    evaluated_weights = torch.load(tmp_path / "ckpt" / evaluated.name, weights_only=False)["state_dict"]
    assert evaluated_weights.keys() == second_weights.keys()
    for name, value in evaluated_weights.items():
        torch.testing.assert_close(value, second_weights[name], rtol=0, atol=0)


def test_links_fall_back_to_copies_where_symbolic_links_are_refused(tmp_path, monkeypatch):
    from mglightning.checkpointing import _replace_with_link

    (tmp_path / "version_0").mkdir()
    (tmp_path / "version_0" / "last.ckpt").write_bytes(b"old")
    (tmp_path / "version_1").mkdir()
    (tmp_path / "version_1" / "last.ckpt").write_bytes(b"new")
    _replace_with_link(tmp_path / "last.ckpt", tmp_path / "version_0" / "last.ckpt")
    assert (tmp_path / "last.ckpt").is_symlink() and (tmp_path / "last.ckpt").read_bytes() == b"old"

    def refuse(self, target):
        raise OSError("symbolic links are not allowed here")

    monkeypatch.setattr(Path, "symlink_to", refuse)
    _replace_with_link(tmp_path / "last.ckpt", tmp_path / "version_1" / "last.ckpt")
    assert not (tmp_path / "last.ckpt").is_symlink() and (tmp_path / "last.ckpt").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "version_0", "version_1"]


@pytest.mark.slow  # 1 minute on 2 cores; test_fit_writes_checkpoints_logs_and_reloads runs the same path in seconds
def test_the_quickstart_config_reaches_the_accuracy_the_readme_reports(tmp_path):
    cli = train.cli_main(
        [
            "fit",
            "--config", str(CONFIGS / "digits.yaml"),
            "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
            "--checkpoint.dirpath", str(tmp_path / "ckpt"),
        ]
    )
    # README: test accuracy 98.3% after the 8 epochs of `make demo`; other machines' arithmetic moves it a little.
    assert cli.trainer.callback_metrics["test/acc"].item() >= 0.95


def test_resume_from_checkpoint_continues_the_run(tmp_path):
    train.cli_main(tiny_digits_args(tmp_path, "--test_after_fit", "false"))
    last = tmp_path / "ckpt" / "last.ckpt"
    steps_first_run = torch.load(last, weights_only=False)["global_step"]
    cli = train.cli_main(
        tiny_digits_args(tmp_path, "--trainer.max_epochs", "2", "--ckpt_path", str(last), "--test_after_fit", "false")
    )
    assert cli.trainer.current_epoch == 2
    assert cli.trainer.global_step == 2 * steps_first_run


def test_two_process_cpu_ddp_training(tmp_path):
    cli = train.cli_main(
        tiny_digits_args(
            tmp_path,
            "--trainer.accelerator", "cpu",
            "--trainer.devices", "2",
            "--trainer.strategy", "ddp_spawn",
            "--test_after_fit", "false",
        )
    )
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
    # Each process loads half of the global batch.
    assert cli.datamodule.hparams.batch_size == 32


def test_unknown_model_name_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="Unknown model 'resnet19'"):
        train.cli_main(tiny_digits_args(tmp_path, "--model.arch", "resnet19"))


def test_invalid_config_value_is_rejected_by_the_cli(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.cli_main(tiny_digits_args(tmp_path, "--model.optimizer", "rmsprop"))
    assert "rmsprop" in capsys.readouterr().err


def test_missing_checkpoint_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        train.cli_main(tiny_digits_args(tmp_path, "--ckpt_path", str(tmp_path / "missing.ckpt")))
    with pytest.raises(FileNotFoundError, match="does not exist.*train.py fit"):
        load_classifier(tmp_path / "missing.ckpt")


def test_a_file_that_is_no_classifier_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a mglightning classifier checkpoint"):
        load_classifier(path)


def fast_dev_run_args(config: str, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config", str(CONFIGS / config),
        "--trainer.fast_dev_run", "true",
        "--trainer.accelerator", "cpu",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
        "--checkpoint.dirpath", str(tmp_path / "ckpt"),
        "--data.init_args.num_workers", "0",
        "--data.init_args.batch_size", "8",
        *extra,
    ]


def test_cifar10_config_runs_on_a_cifar10_folder(tmp_path):
    from fake_datasets import write_fake_cifar10

    root = write_fake_cifar10(tmp_path / "cifar10")
    cli = train.cli_main(fast_dev_run_args("cifar10_resnet18.yaml", tmp_path, "--data.init_args.data_dir", str(root)))
    assert cli.model.hparams.num_classes == 10 and cli.model.hparams.image_size == 32


def test_tinyimagenet_config_runs_on_the_official_layout(tmp_path):
    from fake_datasets import write_fake_tinyimagenet

    root = write_fake_tinyimagenet(tmp_path / "tiny-imagenet-200")
    cli = train.cli_main(
        fast_dev_run_args(
            "tinyimagenet_resnet18.yaml", tmp_path,
            "--data.init_args.data_dir", str(root), "--data.init_args.num_classes", "3",
            "--model.model_kwargs", '{"width": 8}',
        )
    )
    assert cli.model.hparams.image_size == 64 and cli.model.net.conv1.stride == (2, 2)


def test_imagenet_config_runs_on_an_image_folder(tmp_path):
    from fake_datasets import write_fake_imagenet

    root = write_fake_imagenet(tmp_path / "imagenet")
    train.cli_main(
        fast_dev_run_args(
            "imagenet_efficientnet_b0.yaml", tmp_path,
            "--data.init_args.data_dir", str(root), "--data.init_args.num_classes", "3",
            "--data.init_args.image_size", "64", "--data.init_args.val_fraction", "0.34",
            "--model.model_kwargs", '{"pretrained": false}', "--trainer.precision", "32-true",
        )
    )


def test_missing_data_folder_fails_before_training(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train.cli_main(fast_dev_run_args("cifar10_resnet18.yaml", tmp_path, "--data.init_args.data_dir", str(missing)))


# --- a diverged training ---------------------------------------------------------------------------------------


def test_a_diverged_training_stops_exits_non_zero_and_leaves_the_links(tmp_path):
    import subprocess
    import sys

    train.cli_main(tiny_digits_args(tmp_path, "--test_after_fit", "false"))  # a good run: the links point at it
    links = {name: (tmp_path / "ckpt" / name).resolve() for name in ("last.ckpt", "best.ckpt")}
    assert all(target.parent.name == "version_0" for target in links.values())

    root = CONFIGS.parent
    result = subprocess.run(
        [sys.executable, str(root / "train.py"), *tiny_digits_args(tmp_path, "--model.lr", "1e6",
                                                                     "--trainer.max_epochs", "2")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode != 0, result.stdout + result.stderr
    message = re.search(r"error: Training diverged: .*", result.stderr).group(0)
    assert re.search(r"the training loss is nan at epoch 0, step \d+", message)
    assert "learning rate" in message and "model.lr = 1000000.0" in message and "inputs" in message
    assert "Training finished" not in result.stdout and "Traceback" not in result.stderr
    assert {name: (tmp_path / "ckpt" / name).resolve() for name in links} == links, "the links were moved"
    for folder in (tmp_path / "ckpt" / "version_1", tmp_path / "logs" / "digits" / "version_1"):
        assert "Training diverged" in (folder / "DIVERGED.txt").read_text()
    assert not list((tmp_path / "ckpt" / "version_1").glob("*.ckpt")), "no checkpoint of the diverged model"


def test_divergence_patience_tolerates_that_many_non_finite_steps(tmp_path):
    from mglightning.checkpointing import TrainingDiverged

    steps = []
    for patience in (0, 2):
        with pytest.raises(TrainingDiverged) as error:
            train.cli_main(tiny_digits_args(tmp_path / str(patience), "--model.lr", "1e6",
                                            "--trainer.limit_train_batches", "12",
                                            "--divergence.patience", str(patience)))
        steps.append(int(re.search(r"step (\d+)", str(error.value)).group(1)))
    assert steps[1] == steps[0] + 2
    assert "after 3 non-finite steps in a row" in str(error.value)


def test_non_finite_weights_stop_the_run_before_its_checkpoint(tmp_path):
    import pytorch_lightning as pl

    from mglightning.checkpointing import DivergenceGuard, RunCheckpoint, TrainingDiverged
    from mglightning.data import DigitsDataModule
    from mglightning.modules import ClassifierModule

    class Poison(pl.Callback):
        """NaN weights after the step, with a finite loss: only the guard's check of the weights sees them."""

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            with torch.no_grad():
                pl_module.net.fc.weight.fill_(float("nan"))

    data = DigitsDataModule(image_size=16, batch_size=32)
    module = ClassifierModule(num_classes=10, image_size=16, mean=data.mean, std=data.std,
                              model_kwargs={"activation": "softplus", "width": 4})
    checkpoint = RunCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="val/acc", mode="max", save_last=True)
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[DivergenceGuard(), Poison(), checkpoint],
    )
    with pytest.raises(TrainingDiverged, match=r"weights are no longer finite at the end of epoch 0.*net\.fc\.weight"):
        trainer.fit(module, datamodule=data)
    assert not list((tmp_path / "ckpt").rglob("*.ckpt"))
    assert (tmp_path / "ckpt" / "version_0" / "DIVERGED.txt").is_file()


def test_a_run_prints_no_advertising_tips_and_no_leafspec_warning(tmp_path, caplog, recwarn):
    import logging

    with caplog.at_level(logging.INFO):
        train.cli_main(tiny_digits_args(tmp_path, "--test_after_fit", "false"))
    logged = [record.getMessage() for record in caplog.records]
    assert any("GPU available" in message for message in logged)  # Lightning's other messages still come through
    assert not [message for message in logged if "litlogger" in message or "litmodels" in message]
    assert not [w for w in recwarn if "LeafSpec" in str(w.message)]
