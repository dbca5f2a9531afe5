"""The evaluation run as users drive it: `evaluate.py --config ... --ckpt_path ...`, on 1 or 2 processes."""

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import evaluate
from mglightning.data import DigitsDataModule
from mglightning.data.evaluation import ExactlyOnceSampler, IndexedDataset, sample_seeds
from mglightning.modules import ClassifierModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
METHODS = [
    "simple_gradient", "integrated_gradients", "smoothgrad", "sparsified_smoothgrad", "deeplift", "relex",
    "moreaugrad", "sparse_moreaugrad", "group_sparse_moreaugrad",
]
# All nine methods, with settings cut down to a few model evaluations each.
CHEAP_EXPLAINERS = json.dumps(
    [
        {"name": "simple_gradient"},
        {"name": "integrated_gradients", "settings": {"n_steps": 4}},
        {"name": "smoothgrad", "settings": {"nt_samples": 3}},
        {"name": "sparsified_smoothgrad", "settings": {"nt_samples": 3}},
        {"name": "deeplift"},
        {"name": "relex", "settings": {"num_steps": 2, "noise_samples": 2}},
        {"name": "moreaugrad", "settings": {"num_steps": 4, "noise_std": 0.1, "noise_samples": 2}},
        {"name": "sparse_moreaugrad", "settings": {"num_steps": 4, "noise_std": 0.0}},
        {"name": "group_sparse_moreaugrad", "settings": {"num_steps": 4, "noise_std": 0.0, "group_size": 4}},
    ]
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A width-4 softplus ResNet-18 on 16x16 digits, trained for a few steps."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("classifier")
    datamodule = DigitsDataModule(batch_size=64, image_size=16)
    module = ClassifierModule(
        num_classes=10, image_size=16, mean=datamodule.mean, std=datamodule.std, model_kwargs={"width": 4}, lr=0.05
    )
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=5, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )
    trainer.fit(module, datamodule=datamodule)
    path = folder / "digits16.ckpt"
    trainer.save_checkpoint(path)
    return path


def eval_args(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config", str(CONFIGS / "eval_digits.yaml"),
        "--ckpt_path", str(checkpoint),
        "--data.init_args.image_size", "16",
        "--model.explainers", CHEAP_EXPLAINERS,
        "--model.max_samples", "7",
        "--model.attack_steps", "2",
        "--model.epsilon", "0.5",
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(out),
        *extra,
    ]


def run_results(checkpoint: Path, out: Path, *extra: str) -> dict:
    evaluate.cli_main(eval_args(checkpoint, out, *extra))
    (results_file,) = out.rglob("results.json")
    return json.loads(results_file.read_text())


def per_method(results: dict) -> dict:
    return results["results"] if "results" in results else results["methods"]


def test_results_do_not_depend_on_devices_or_batch_size(checkpoint, tmp_path):
    """7 samples on 1 process and on 2 `gloo` processes, with batch sizes 1 and 4: the same numbers."""
    runs = {
        (devices, batch_size): per_method(
            run_results(
                checkpoint, tmp_path / f"{devices}x{batch_size}", "--model.batch_size", str(batch_size),
                "--trainer.devices", str(devices), "--trainer.strategy", "ddp_spawn" if devices > 1 else "auto",
            )
        )
        for devices in (1, 2)
        for batch_size in (1, 4)
    }
    reference = runs[(1, 1)]
    assert list(reference) == METHODS
    for run in runs.values():
        assert list(run) == METHODS
        for method in METHODS:
            assert run[method]["samples"] == 7
            for key in ("distance", "topk", "ssim", "gini", "zero_fraction", "attack_success"):
                assert run[method][key] == pytest.approx(reference[method][key], abs=1e-5), (method, key)


def test_outputs_files_and_tensorboard(checkpoint, tmp_path, capsys):
    cli = evaluate.cli_main(eval_args(checkpoint, tmp_path, "--model.batch_size", "4"))
    log_dir = Path(cli.trainer.log_dir)
    for name in ("results.json", "results.csv", "results.md", "robustness.png", "saliency_grid.png"):
        assert (log_dir / name).is_file(), name
    table = (log_dir / "results.md").read_text()
    assert all(method in table for method in METHODS)
    printed = capsys.readouterr().out
    assert "moreaugrad" in printed and "results.md" in printed

    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for method in METHODS:
        for key in ("distance", "topk", "ssim", "gini", "zero_fraction", "attack_success", "seconds_per_image"):
            assert f"test/{method}/{key}" in scalars
    images = events.Tags()["images"]
    assert any("robustness" in tag for tag in images) and any("saliency" in tag for tag in images)
    distance = events.Scalars("test/moreaugrad/distance")[0].value
    assert distance == pytest.approx(cli.model.results["moreaugrad"]["distance"], abs=1e-6)


def test_several_budgets_give_one_row_each(checkpoint, tmp_path):
    cli = evaluate.cli_main(
        eval_args(
            checkpoint, tmp_path, "--model.explainers", '[{"name": "simple_gradient"}]',
            "--model.epsilon", "[0.1, 2.0]", "--model.batch_size", "4",
        )
    )
    rows = cli.model.results
    assert list(rows) == ["simple_gradient@eps=0.1", "simple_gradient@eps=2"]
    # A larger budget moves the map at least as far.
    assert rows["simple_gradient@eps=2"]["distance"] >= rows["simple_gradient@eps=0.1"]["distance"]


def test_max_samples_beyond_the_test_set_is_capped_with_a_warning(checkpoint, tmp_path):
    size = len(DigitsDataModule(image_size=16).test_indices)
    with pytest.warns(UserWarning, match="larger than the test set"):
        cli = evaluate.cli_main(
            eval_args(
                checkpoint, tmp_path, "--model.explainers", '[{"name": "simple_gradient"}]',
                "--model.max_samples", "100000", "--model.batch_size", "128", "--model.attack_steps", "1",
            )
        )
    assert cli.model.results["simple_gradient"]["samples"] == size


@pytest.mark.parametrize(
    "extra, error, message",
    [
        (("--model.explainers", '[{"name": "gradcam"}]'), ValueError, "gradcam"),
        (("--model.explainers", '[{"name": "moreaugrad", "settings": {"rhoo": 1}}]'), ValueError, "rhoo"),
        (("--model.epsilon", "0"), ValueError, "epsilon"),
        (("--model.epsilon", "-1"), ValueError, "epsilon"),
    ],
)
def test_bad_settings_fail_before_the_run(checkpoint, tmp_path, extra, error, message):
    with pytest.raises(error, match=message):
        evaluate.cli_main(eval_args(checkpoint, tmp_path, *extra))
    assert not list(tmp_path.rglob("results.json"))


def test_missing_or_incompatible_checkpoint_fails_before_the_run(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate.cli_main(eval_args(tmp_path / "missing.ckpt", tmp_path))
    with pytest.raises(ValueError, match="cannot take 32x32|classes"):
        evaluate.cli_main(
            eval_args(checkpoint, tmp_path)[:4] + eval_args(checkpoint, tmp_path)[6:]
            + ["--data", "mglightning.data.SyntheticDataModule", "--data.num_classes", "5"]
        )


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sampler_visits_every_sample_exactly_once(world_size):
    dataset = IndexedDataset([(torch.zeros(1), 0)] * 20)
    seen = [i for rank in range(world_size) for i in ExactlyOnceSampler(dataset, 7, world_size, rank)]
    assert sorted(seen) == list(range(7))


def test_sample_seeds_depend_on_index_and_global_seed_only():
    indices = torch.tensor([0, 1, 2, 3])
    seeds = sample_seeds(0, indices)
    assert len(set(seeds.tolist())) == 4
    torch.testing.assert_close(sample_seeds(0, indices[2:]), seeds[2:])
    assert not torch.equal(sample_seeds(1, indices), seeds)


@pytest.mark.parametrize("config", ["eval_digits.yaml", "eval_cifar10.yaml", "eval_tinyimagenet.yaml", "eval_imagenet.yaml"])
def test_evaluation_configs_are_valid(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.cli_main(["--config", str(CONFIGS / config), "--print_config"])
    assert exit_info.value.code == 0
    assert "group_sparse_moreaugrad" in capsys.readouterr().out
