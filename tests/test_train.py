"""The training CLI as users drive it: `train.py fit --config ...` with overrides, through `cli_main(args)`."""

from pathlib import Path

import pytest
import torch

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
