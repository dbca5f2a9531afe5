"""Norm-regularised adversarial training: each perturbation against its formula, balls, batch norm, training runs."""

import copy
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import train
from mglightning import ClassifierModule, load_classifier
from mglightning.modules.adversarial import AdversarialTraining

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_model(batch_norm: bool = False) -> nn.Module:
    """A softplus CNN on (3, 8, 8) images, float64 so that gradient signs are not at the mercy of rounding."""
    layers = [nn.Conv2d(3, 4, 3, padding=1)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.Softplus(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)]
    return nn.Sequential(*layers).double()


def tiny_batch(batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.rand(batch, 3, 8, 8, dtype=torch.float64)
    images[0, :, :2] = 0.0  # pixels on the box's faces, where clamping matters
    images[1, :, -2:] = 1.0
    return images, torch.randint(0, 5, (batch,))


def per_sample_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sample's own cross-entropy gradient, one sample at a time (independent of the batched code)."""
    rows = []
    for image, label in zip(images, labels):
        point = image[None].clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(F.cross_entropy(model(point), label[None]), point)
        rows.append(gradient[0])
    return torch.stack(rows)


def group_loop(values: torch.Tensor, group_size: int, per_group) -> torch.Tensor:
    """Apply `per_group(block)` to every group_size x group_size block (all channels) with explicit loops."""
    result = torch.empty_like(values)
    for b in range(values.shape[0]):
        for i in range(0, values.shape[2], group_size):
            for j in range(0, values.shape[3], group_size):
                block = values[b, :, i : i + group_size, j : j + group_size]
                result[b, :, i : i + group_size, j : j + group_size] = per_group(block)
    return result


# ------------------------------------------------------------------------------ one-step formulas


def test_fast_l1_is_the_sign_step():
    model, (images, labels) = tiny_model(), tiny_batch()
    adversarial = AdversarialTraining(mode="l1", epsilon=0.05)
    perturbed, clean_logits = adversarial.perturb(model, images, labels)
    g = per_sample_gradients(model, images, labels)
    torch.testing.assert_close(perturbed, (images + 0.05 * g.sign()).clamp(0, 1), rtol=0, atol=1e-12)
    torch.testing.assert_close(clean_logits, model(images).detach())


def test_fast_elastic_is_sign_plus_gradient_step():
    model, (images, labels) = tiny_model(), tiny_batch()
    adversarial = AdversarialTraining(mode="elastic", epsilon=0.02, epsilon2=3.0)
    perturbed, _ = adversarial.perturb(model, images, labels)
    g = per_sample_gradients(model, images, labels)
    expected = (images + 0.02 * g.sign() + 2 * 3.0 * g).clamp(0, 1)
    torch.testing.assert_close(perturbed, expected, rtol=0, atol=1e-12)
    assert not torch.equal(perturbed, (images + 0.02 * g.sign()).clamp(0, 1))  # the L2 part matters here


def test_fast_group_scales_the_gradient_to_epsilon_in_every_group():
    model, (images, labels) = tiny_model(), tiny_batch()
    adversarial = AdversarialTraining(mode="group", epsilon=0.3, group_size=4)
    perturbed, _ = adversarial.perturb(model, images, labels)
    g = per_sample_gradients(model, images, labels)
    expected = (images + group_loop(g, 4, lambda block: 0.3 * block / block.norm())).clamp(0, 1)
    torch.testing.assert_close(perturbed, expected, rtol=0, atol=1e-12)


def test_a_zero_gradient_gives_a_zero_group_step_not_nan():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5)).double()
    with torch.no_grad():
        model[1].weight.view(5, 3, 8, 8)[:, :, :4] = 0.0  # the top half of the image does not reach the logits
    images, labels = tiny_batch()
    perturbed, _ = AdversarialTraining(mode="group", epsilon=0.3, group_size=4).perturb(model, images, labels)
    assert torch.isfinite(perturbed).all()
    torch.testing.assert_close(perturbed[:, :, :4], images[:, :, :4], rtol=0, atol=0)


# ------------------------------------------------------------------------------ iterative attacks


def test_iterative_first_steps_match_their_formulas():
    model, (images, labels) = tiny_model(), tiny_batch()
    g = per_sample_gradients(model, images, labels)
    l1 = AdversarialTraining(mode="l1", training="iterative", epsilon=0.05, steps=1)
    # The reference's step is 0.3 * epsilon.
    torch.testing.assert_close(
        l1.perturb(model, images, labels)[0], (images + 0.015 * g.sign()).clamp(0, 1), rtol=0, atol=1e-12
    )
    group = AdversarialTraining(mode="group", training="iterative", epsilon=0.1, group_size=4, steps=1, step_size=2.0)
    step = 2.0 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    projected = group_loop(step, 4, lambda block: block * min(1.0, 0.1 / block.norm().item()))
    torch.testing.assert_close(
        group.perturb(model, images, labels)[0], (images + projected).clamp(0, 1), rtol=0, atol=1e-12
    )


def test_iterative_elastic_ascends_the_penalised_loss():
    model, (images, labels) = tiny_model(), tiny_batch()
    epsilon, epsilon2, step = 0.01, 0.5, 0.5
    adversarial = AdversarialTraining(
        mode="elastic", training="iterative", epsilon=epsilon, epsilon2=epsilon2, steps=2, step_size=step
    )

    def unit(v):
        return v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)

    first = (images + step * unit(per_sample_gradients(model, images, labels))).clamp(0, 1)
    delta = first - images
    assert (delta.abs() > epsilon).any()  # the penalty is active at the second step
    # d/dd ||relu(|d| - eps)||^2 / (4 eps2) = sign(d) relu(|d| - eps) / (2 eps2), in closed form.
    ascent = per_sample_gradients(model, first, labels) - delta.sign() * F.relu(delta.abs() - epsilon) / (2 * epsilon2)
    expected = (first + step * unit(ascent)).clamp(0, 1)
    torch.testing.assert_close(adversarial.perturb(model, images, labels)[0], expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("step_size", [None, 0.05])
def test_iterative_l1_stays_in_the_linf_ball_and_the_box(step_size):
    model, (images, labels) = tiny_model(), tiny_batch()
    adversarial = AdversarialTraining(mode="l1", training="iterative", epsilon=0.03, step_size=step_size)
    perturbed, _ = adversarial.perturb(model, images, labels)
    offset = (perturbed - images).abs()
    assert offset.max() <= 0.03 + 1e-12 and offset.max() >= 0.03 - 1e-12  # reaches the boundary
    assert perturbed.min() >= 0 and perturbed.max() <= 1
    assert F.cross_entropy(model(perturbed), labels) > F.cross_entropy(model(images), labels)


@pytest.mark.parametrize("step_size", [None, 1.0])
def test_iterative_group_stays_in_every_group_ball_and_the_box(step_size):
    model, (images, labels) = tiny_model(), tiny_batch()
    adversarial = AdversarialTraining(
        mode="group", training="iterative", epsilon=0.2, group_size=2, step_size=step_size
    )
    perturbed, _ = adversarial.perturb(model, images, labels)
    norms = group_loop(perturbed - images, 2, lambda block: block.norm().expand_as(block))
    assert norms.max() <= 0.2 * (1 + 1e-9) and norms.max() >= 0.2 * (1 - 1e-6)
    assert perturbed.min() >= 0 and perturbed.max() <= 1
    assert F.cross_entropy(model(perturbed), labels) > F.cross_entropy(model(images), labels)


def test_default_step_sizes():
    shape = (2, 3, 8, 8)
    assert AdversarialTraining(mode="l1", epsilon=0.1).resolved_step_size(shape) == pytest.approx(0.03)
    elastic = AdversarialTraining(mode="elastic", epsilon=0.1, epsilon2=1.0)
    assert elastic.resolved_step_size(shape) == pytest.approx(0.03 * math.sqrt(192))
    group = AdversarialTraining(mode="group", epsilon=0.1, group_size=4)
    assert group.resolved_step_size(shape) == pytest.approx(0.03 * 2)
    assert AdversarialTraining(mode="l1", epsilon=0.1, step_size=0.5).resolved_step_size(shape) == 0.5


# ------------------------------------------------------------------------------ batch norm and side effects


def test_batch_norm_normalises_with_the_batch_and_keeps_its_running_statistics():
    model, (images, labels) = tiny_model(batch_norm=True), tiny_batch(8)
    model.train()
    batch_norm = model[1]
    before = {name: buffer.clone() for name, buffer in batch_norm.named_buffers()}
    adversarial = AdversarialTraining(mode="l1", training="iterative", epsilon=0.05, steps=3)
    perturbed, _ = adversarial.perturb(model, images, labels)
    for name, buffer in batch_norm.named_buffers():
        assert torch.equal(buffer, before[name]), name
    assert batch_norm.track_running_stats and model.training

    # The same attack on a copy that does update its statistics (batch statistics normalise in both).
    reference = copy.deepcopy(model)
    x = images.clone()
    for _ in range(3):
        point = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(reference(point), labels, reduction="sum"), point)
        x = (images + (x + 0.015 * g.sign() - images).clamp(-0.05, 0.05)).clamp(0, 1)
    torch.testing.assert_close(perturbed, x, rtol=0, atol=1e-12)
    assert not torch.equal(reference[1].running_mean, before["running_mean"])


def test_perturb_leaves_inputs_gradients_and_mode_alone():
    model, (images, labels) = tiny_model(), tiny_batch()
    model.eval()
    copy_of_images = images.clone()
    AdversarialTraining(mode="group", training="iterative", epsilon=0.1, group_size=4).perturb(model, images, labels)
    assert torch.equal(images, copy_of_images) and images.grad is None
    assert all(parameter.grad is None for parameter in model.parameters()) and not model.training


def test_mode_none_returns_the_clean_batch():
    model, (images, labels) = tiny_model(), tiny_batch()
    perturbed, clean_logits = AdversarialTraining().perturb(model, images, labels)
    assert torch.equal(perturbed, images)
    torch.testing.assert_close(clean_logits, model(images).detach())


# ------------------------------------------------------------------------------ bad settings


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"mode": "l1"}, "epsilon must be a number > 0"),
        ({"mode": "l1", "epsilon": 0.0}, "epsilon must be a number > 0"),
        ({"mode": "group", "epsilon": -0.1, "group_size": 2}, "epsilon must be a number > 0"),
        ({"mode": "l1", "epsilon": 8.0}, "larger than the whole \\[0, 1\\] pixel range"),
        ({"mode": "elastic", "epsilon": 0.01}, "epsilon2 must be a number > 0"),
        ({"mode": "l1", "epsilon": 0.01, "epsilon2": 0.1}, "epsilon2 is used only by mode 'elastic'"),
        ({"mode": "group", "epsilon": 0.1}, "group_size must be an integer >= 1"),
        ({"mode": "l1", "epsilon": 0.01, "group_size": 4}, "group_size is used only by mode 'group'"),
        ({"mode": "l1", "epsilon": 0.01, "steps": 0}, "steps must be an integer >= 1"),
        ({"mode": "l1", "epsilon": 0.01, "step_size": 0}, "step_size must be a number > 0"),
        ({"mode": "linf", "epsilon": 0.01}, "mode must be one of none, l1, elastic, group"),
        ({"mode": "l1", "training": "pgd", "epsilon": 0.01}, "training must be one of fast, iterative"),
    ],
)
def test_bad_settings_are_clear_errors(settings, message):
    with pytest.raises(ValueError, match=message):
        AdversarialTraining(**settings)


def test_a_group_size_that_does_not_divide_the_image_fails_when_the_module_is_built():
    adversarial = AdversarialTraining(mode="group", epsilon=0.1, group_size=5)
    with pytest.raises(ValueError, match="group_size=5 must divide the image height 32 and width 32"):
        ClassifierModule(image_size=32, model_kwargs={"width": 4}, adversarial=adversarial)


# ------------------------------------------------------------------------------ training


def tiny_module(**settings) -> ClassifierModule:
    return ClassifierModule(
        num_classes=3, image_size=8, model_kwargs={"width": 4}, optimizer="sgd", lr=0.05, scheduler="constant",
        **settings,
    )


def tiny_loader() -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(12, 3, 8, 8, generator=generator)
    labels = torch.randint(0, 3, (12,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=4)


def fit(module: ClassifierModule, **trainer_settings) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, **trainer_settings,
    )
    trainer.fit(module, train_dataloaders=tiny_loader())
    return trainer


def test_mode_none_trains_exactly_as_plain_cross_entropy_training():
    torch.manual_seed(0)
    module = tiny_module(adversarial=AdversarialTraining(mode="none", epsilon=0.1))
    initial = copy.deepcopy(module.state_dict())
    fit(module)

    # Today's training, written out: SGD on the clean batches' cross-entropy, the network in training mode.
    plain = tiny_module()
    plain.load_state_dict(initial)
    plain.train()
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for images, labels in tiny_loader():
        optimizer.zero_grad()
        F.cross_entropy(plain(images), labels).backward()
        optimizer.step()
    for name, value in plain.state_dict().items():
        assert torch.equal(module.state_dict()[name], value), name

    # The comparison can tell adversarial training apart.
    adversarial = tiny_module(adversarial=AdversarialTraining(mode="l1", epsilon=0.1))
    adversarial.load_state_dict(initial)
    fit(adversarial)
    assert not torch.equal(adversarial.net.fc.weight, module.net.fc.weight)


def test_adversarial_training_logs_its_metrics():
    module = tiny_module(adversarial=AdversarialTraining(mode="group", training="iterative", epsilon=0.2, group_size=4))
    trainer = fit(module)
    metrics = trainer.callback_metrics
    for name in ("train/adv_loss", "train/clean_loss", "train/clean_acc", "train/adv_acc"):
        assert name in metrics and torch.isfinite(metrics[name]), name
    assert "train/loss" not in metrics


def test_bf16_mixed_precision_adversarial_training_on_cpu():
    module = tiny_module(adversarial=AdversarialTraining(mode="l1", training="iterative", epsilon=0.05, steps=2))
    trainer = fit(module, precision="bf16-mixed")
    assert torch.isfinite(trainer.callback_metrics["train/adv_loss"])
    # Under autocast the perturbation stays float32, in its ball and in the box.
    images, labels = next(iter(tiny_loader()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        perturbed, clean_logits = module.adversarial.perturb(module.net, images, labels)
    assert perturbed.dtype == torch.float32 and clean_logits.dtype == torch.bfloat16
    assert (perturbed - images).abs().max() <= 0.05 + 1e-6 and perturbed.min() >= 0 and perturbed.max() <= 1


# ------------------------------------------------------------------------------ the training CLI


# The base config of each data set's adversarial-training overlay (configs/<data set>_adv_<mode>.yaml).
ADVERSARIAL_BASES = {"digits": "digits.yaml", "cifar10": "cifar10_resnet18.yaml",
                     "tinyimagenet": "tinyimagenet_resnet18.yaml"}


def adversarial_configs(overlay: str) -> list[str]:
    """`--config <base> --config <overlay>`: an adversarial-training overlay on its data set's base config."""
    base = ADVERSARIAL_BASES[overlay.split("_adv_")[0]]
    return ["--config", str(CONFIGS / base), "--config", str(CONFIGS / overlay)]


def tiny_adv_args(config: str, tmp_path: Path, *extra: str) -> list[str]:
    """A digits adversarial config shrunk to seconds (as tests/test_train.py shrinks the quickstart)."""
    return [
        "fit",
        *adversarial_configs(config),
        "--data.init_args.image_size", "16",
        "--data.init_args.batch_size", "32",
        "--model.model_kwargs", '{"activation": "softplus", "beta": 1.0, "width": 4}',
        "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
        "--checkpoint.dirpath", str(tmp_path / "ckpt"),
        "--test_after_fit", "false",
        *extra,
    ]


@pytest.mark.parametrize("config, mode", [("digits_adv_l1.yaml", "l1"), ("digits_adv_group.yaml", "group")])
def test_digits_adversarial_configs_train_and_reload(config, mode, tmp_path):
    cli = train.cli_main(tiny_adv_args(config, tmp_path))
    assert cli.model.adversarial.mode == mode
    assert "train/adv_acc" in cli.trainer.callback_metrics
    # The checkpoint records the settings and still rebuilds the network alone.
    last = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=False)["hyper_parameters"]["adversarial"]["mode"] == mode
    assert isinstance(load_classifier(last), nn.Module)


def test_the_cli_rejects_a_group_size_that_does_not_divide_the_datamodules_images(tmp_path):
    with pytest.raises(ValueError, match="group_size=5 must divide the image height 16"):
        train.cli_main(tiny_adv_args("digits_adv_group.yaml", tmp_path, "--model.adversarial.group_size", "5"))
    assert not (tmp_path / "ckpt").exists()


def test_the_cli_rejects_elastic_without_epsilon2(tmp_path):
    with pytest.raises(ValueError, match="epsilon2 must be a number > 0"):
        train.cli_main(tiny_adv_args("digits_adv_l1.yaml", tmp_path, "--model.adversarial.mode", "elastic"))


def test_two_process_gloo_ddp_adversarial_training(tmp_path):
    cli = train.cli_main(
        tiny_adv_args(
            "digits_adv_group.yaml", tmp_path,
            "--model.adversarial.training", "iterative", "--model.adversarial.steps", "2",
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp_spawn",
        )
    )
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
    assert torch.isfinite(cli.trainer.callback_metrics["train/adv_loss"])


def fast_dev_run_args(config: str, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "fit",
        *adversarial_configs(config),
        "--trainer.fast_dev_run", "true",
        "--trainer.accelerator", "cpu",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
        "--checkpoint.dirpath", str(tmp_path / "ckpt"),
        "--data.init_args.num_workers", "0",
        "--data.init_args.batch_size", "8",
        "--model.model_kwargs", '{"width": 4}',
        *extra,
    ]


@pytest.mark.parametrize("config", ["cifar10_adv_l1.yaml", "cifar10_adv_group.yaml"])
def test_cifar10_adversarial_configs_run_on_a_cifar10_folder(config, tmp_path):
    from fake_datasets import write_fake_cifar10

    root = write_fake_cifar10(tmp_path / "cifar10")
    cli = train.cli_main(fast_dev_run_args(config, tmp_path, "--data.init_args.data_dir", str(root)))
    assert cli.model.adversarial.enabled and "train/adv_loss" in cli.trainer.callback_metrics


@pytest.mark.parametrize("config", ["tinyimagenet_adv_l1.yaml", "tinyimagenet_adv_group.yaml"])
def test_tinyimagenet_adversarial_configs_run_on_the_official_layout(config, tmp_path):
    from fake_datasets import write_fake_tinyimagenet

    root = write_fake_tinyimagenet(tmp_path / "tiny-imagenet-200")
    cli = train.cli_main(
        fast_dev_run_args(config, tmp_path, "--data.init_args.data_dir", str(root), "--data.init_args.num_classes", "3")
    )
    assert cli.model.adversarial.enabled and "train/adv_loss" in cli.trainer.callback_metrics
