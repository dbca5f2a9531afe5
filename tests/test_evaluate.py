"""The evaluation run as users drive it: `evaluate.py --config ... --ckpt_path ...`, on 1 or 2 processes,
stopped and resumed, re-reported offline."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import evaluate
from mglightning.data import DigitsDataModule
from mglightning.data.evaluation import ExactlyOnceSampler, IndexedDataset, sample_seeds
from mglightning.evaluation import files as files_module
from mglightning.evaluation import AttackSpec, MetricSpec, RowSpec, RunDescription, load_maps
from mglightning.modules import ClassifierModule
from mglightning.reporting import bootstrap_interval, compare_paired, read_records, summarise_records
from full_disk import fill_the_disk

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
METHODS = [
    "simple_gradient", "integrated_gradients", "smoothgrad", "sparsified_smoothgrad", "deeplift", "relex",
    "moreaugrad", "sparse_moreaugrad", "group_sparse_moreaugrad",
]
E = "mglightning.explainers."
# All nine methods, with settings cut down to a few model evaluations each.
CHEAP_EXPLAINERS = json.dumps(
    {
        "simple_gradient": {"class_path": E + "SimpleGradient"},
        "integrated_gradients": {"class_path": E + "IntegratedGradients", "init_args": {"n_steps": 4}},
        "smoothgrad": {"class_path": E + "SmoothGrad", "init_args": {"nt_samples": 3}},
        "sparsified_smoothgrad": {"class_path": E + "SparsifiedSmoothGrad", "init_args": {"nt_samples": 3}},
        "deeplift": {"class_path": E + "DeepLift"},
        "relex": {"class_path": E + "RelEx", "init_args": {"num_steps": 2, "noise_samples": 2}},
        "moreaugrad": {"class_path": E + "MoreauGrad", "init_args": {"num_steps": 4, "noise_samples": 2}},
        "sparse_moreaugrad": {"class_path": E + "SparseMoreauGrad", "init_args": {"num_steps": 4, "noise_std": 0.0}},
        "group_sparse_moreaugrad": {
            "class_path": E + "GroupSparseMoreauGrad", "init_args": {"num_steps": 4, "noise_std": 0.0, "group_size": 4},
        },
    }
)
# Three methods covering plain, noisy and iterative: enough to compare runs, cheap enough to run several times.
FEW_EXPLAINERS = json.dumps(
    {
        "simple_gradient": {"class_path": E + "SimpleGradient"},
        "smoothgrad": {"class_path": E + "SmoothGrad", "init_args": {"nt_samples": 3}},
        "moreaugrad": {"class_path": E + "MoreauGrad", "init_args": {"num_steps": 6, "noise_samples": 2}},
    }
)
# configs/eval_digits.yaml's cheap search, as the top-k attacks that tests give on the command line search too.
CHEAP_SEARCH = {"warm_start": True, "search_settings": {"num_steps": 10}}


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


def eval_args(checkpoint: Path, out: Path, *extra: str, explainers: str = CHEAP_EXPLAINERS) -> list[str]:
    return [
        "--config", str(CONFIGS / "eval_digits.yaml"),
        "--ckpt_path", str(checkpoint),
        "--data.init_args.image_size", "16",
        "--data.init_args.batch_size", "4",
        "--model.explainers", explainers,
        "--model.max_samples", "7",
        "--model.attacks", attack_steps(2),
        "--model.epsilon", "0.5",
        "--model.bootstrap_samples", "200",
        "--model.convexity_iterations", "0",
        "--trainer.accelerator", "cpu",
        "--trainer.logger.init_args.save_dir", str(out),
        *extra,
    ]


def attack_steps(steps: int) -> str:
    """The `--model.attacks` value of the top-k attack with `steps` steps, searching as configs/eval_digits.yaml's
    attacks do (warm-started solves of 10 steps)."""
    return json.dumps({"topk": {"class_path": "mglightning.attacks.TopKInterpretationAttack",
                                "init_args": {"num_steps": steps, **CHEAP_SEARCH}}})


def results_of(run_dir: Path) -> dict:
    """`{method: {value: ..., "<metric>_ci": interval, "samples": n}}` from results.json."""
    results = json.loads((run_dir / "results.json").read_text())["results"]
    return {
        method: {**row["values"], **{f"{key}_ci": value for key, value in row["intervals"].items()},
                 "samples": row["samples"], "worst_attack": row["worst_attack"], "per_attack": row["per_attack"],
                 "surrogate": row["surrogate"], "attack": row["attack"]}
        for method, row in results.items()
    }


def only_run(out: Path) -> Path:
    (run_json,) = out.rglob("run.json")
    return run_json.parent


ROBUSTNESS_KEYS = ("distance", "topk", "ssim", "gini", "zero_fraction", "attack_success", "distance_ci", "topk_ci")


def assert_same_results(first: dict, second: dict) -> None:
    assert list(first) == list(second)
    for method in first:
        assert first[method]["samples"] == second[method]["samples"]
        for key in ROBUSTNESS_KEYS:
            assert np.allclose(first[method][key], second[method][key], atol=1e-5), (method, key)


def test_outputs_records_files_and_tensorboard(checkpoint, tmp_path, capsys):
    cli = evaluate.cli_main(eval_args(checkpoint, tmp_path, "--model.convexity_iterations", "3"))
    run_dir = Path(cli.model.run_dir)
    for name in ("run.json", "results.json", "results.csv", "results.md", "robustness.png", "saliency_grid.png",
                 "fidelity.png"):
        assert (run_dir / name).is_file(), name
    results = results_of(run_dir)
    assert list(results) == METHODS
    for row in results.values():
        assert row["samples"] == 7
        low, high = row["topk_ci"]
        assert low <= row["topk"] <= high
        assert row["evals_clean"] >= 1
        assert 0 <= row["deletion_auc"] <= 1 and 0 <= row["insertion_auc"] <= 1  # the fidelity metric in the config
    for method in METHODS:  # the convexity diagnostic concerns the MoreauGrad family only
        assert (results[method]["convex_share"] is not None) == ("moreaugrad" in method)

    records = read_records(run_dir)
    assert len(records) == 7 * len(METHODS)
    assert sorted(records["index"].unique()) == list(range(7))
    # The table is computed from the records.
    moreau = records[records["method"] == "moreaugrad"]
    assert results["moreaugrad"]["topk"] == pytest.approx(moreau["topk"].mean())

    markdown = (run_dir / "results.md").read_text()
    assert "**Classifier**" in markdown and "Namespace(" not in markdown and "MoreauGrad (" in markdown
    captured = capsys.readouterr()
    printed = captured.out
    # Progress at the level a user waits on: samples done of the total, the method and budget, the time left.
    assert "/7 samples" in captured.err and "moreaugrad: topk attack at ε=0.5" in captured.err and "left" in captured.err
    assert "TqdmWarning" not in captured.err
    assert printed.count("| method |") == 1, "one results table, ours (not Lightning's)"
    assert "Test metric" not in printed and "results.md" in printed and "Paired comparisons" in printed
    assert "Note: On the bundled digits the paper's ordering does not show" in printed  # the config's note
    assert "**Note.**" in markdown

    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for method in METHODS:
        for key in ("distance", "topk", "ssim", "gini", "zero_fraction", "attack_success", "seconds_per_image"):
            tag = f"test/{method}/{key}"
            assert tag in scalars
            assert len(events.Scalars(tag)) == 1, f"{tag} logged more than once"
    assert events.Scalars("test/moreaugrad/topk")[0].value == pytest.approx(results["moreaugrad"]["topk"], abs=1e-6)
    # The metric classes' own device-aggregated means, per attack, agree with the records.
    assert events.Scalars("test/moreaugrad/topk/topk")[0].value == pytest.approx(results["moreaugrad"]["topk"], abs=1e-5)
    images = events.Tags()["images"]
    assert any("robustness" in tag for tag in images) and any("saliency" in tag for tag in images)


def test_the_device_aggregated_means_of_two_processes_are_those_of_one(checkpoint, tmp_path):
    """`test/<row>/<attack>/<column>`, each metric's mean synced over the devices: two `ddp_spawn` processes (which
    receive the evaluator with its tensors in shared memory) log what one process logs."""
    logged = []
    for devices in (1, 2):
        distributed = ["--trainer.devices", "2", "--trainer.strategy", "ddp_spawn"] if devices == 2 else []
        out = tmp_path / f"devices{devices}"
        evaluate.cli_main(eval_args(checkpoint, out, *distributed, explainers=FEW_EXPLAINERS))
        events = EventAccumulator(str(only_run(out)), size_guidance={"scalars": 0})
        events.Reload()
        logged.append({tag: events.Scalars(tag)[0].value for tag in events.Tags()["scalars"]
                       if tag.count("/") == 3 and "seconds" not in tag})
    assert "test/moreaugrad/topk/topk" in logged[0] and logged[0].keys() == logged[1].keys()
    for tag, value in logged[0].items():
        assert logged[1][tag] == pytest.approx(value, abs=1e-5), tag


def test_report_recomputes_the_results_from_records(checkpoint, tmp_path):
    cli = evaluate.cli_main(eval_args(checkpoint, tmp_path, explainers=FEW_EXPLAINERS))
    run_dir = Path(cli.model.run_dir)
    before = results_of(run_dir)
    for name in ("results.json", "results.md", "robustness.png"):
        (run_dir / name).unlink()
    evaluate.cli_main(["report", str(run_dir)])
    assert results_of(run_dir) == before
    assert (run_dir / "robustness.png").is_file()


def test_two_runs_never_overwrite_each_other(checkpoint, tmp_path):
    for logger in ("true", "false"):
        out = tmp_path / logger
        extra = ("--trainer.default_root_dir", str(out)) + (("--trainer.logger", "false") if logger == "false" else ())
        for _ in range(2):
            evaluate.cli_main(
                eval_args(checkpoint, out, *extra, "--model.max_samples", "2", explainers=FEW_EXPLAINERS)
            )
        runs = sorted(path.parent for path in out.rglob("results.json"))
        assert len(runs) == 2 and runs[0] != runs[1]


def test_several_budgets_give_one_row_each_and_a_budget_figure(checkpoint, tmp_path):
    explainers = json.dumps({"simple_gradient": {"class_path": E + "SimpleGradient"}})
    cli = evaluate.cli_main(eval_args(checkpoint, tmp_path, "--model.epsilon", "[0.1, 2.0]", explainers=explainers))
    results = results_of(Path(cli.model.run_dir))
    assert list(results) == ["simple_gradient@eps=0.1", "simple_gradient@eps=2"]
    # A larger budget moves the map at least as far.
    assert results["simple_gradient@eps=2"]["distance"] >= results["simple_gradient@eps=0.1"]["distance"]
    assert (Path(cli.model.run_dir) / "robustness.png").is_file()


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "evaluate.py"), *args], cwd=cwd, env=environment, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def _kill_after_first_batch(process: subprocess.Popen, out: Path, timeout: float = 240) -> None:
    started = time.monotonic()
    while not list(out.rglob("records/*.parquet")):
        if process.poll() is not None:
            raise AssertionError(f"the run ended before its first batch was recorded: {process.stderr.read()}")
        if time.monotonic() - started > timeout:
            raise AssertionError("no batch recorded in time")
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the whole group: DDP workers too
    process.wait()


@pytest.mark.parametrize("devices", [1, 2])
def test_a_killed_run_resumes_to_the_uninterrupted_results(checkpoint, tmp_path, devices):
    """Kill after the first recorded batch (1 process, or 2 gloo processes), resume with `--resume`: the final
    results equal an uninterrupted single-process run's, and so does the set of records; the run stores its maps,
    and every record's are found exactly once."""
    common = ["--data.init_args.batch_size", "2", "--model.max_samples", "8"]
    reference_out = tmp_path / "reference"
    evaluate.cli_main(eval_args(checkpoint, reference_out, *common, explainers=FEW_EXPLAINERS))
    common += ["--model.keep_maps", "float16"]  # storing maps changes no record
    reference_dir = only_run(reference_out)

    out = tmp_path / "killed"
    distributed = ["--trainer.devices", "2", "--trainer.strategy", "ddp_spawn"] if devices == 2 else []
    process = _start(eval_args(checkpoint, out, *common, *distributed, explainers=FEW_EXPLAINERS), tmp_path)
    _kill_after_first_batch(process, out)
    run_dir = only_run(out)
    assert not (run_dir / "results.json").exists(), "killed too late: the run had already finished"
    recorded_before = len(read_records(run_dir))
    assert 0 < recorded_before < 8 * 3

    evaluate.cli_main(eval_args(checkpoint, out, *common, "--resume", str(run_dir), explainers=FEW_EXPLAINERS))
    assert_same_results(results_of(run_dir), results_of(reference_dir))
    columns = ["method", "index", "distance", "topk", "ssim", "gini", "moved"]
    resumed = read_records(run_dir)[columns].reset_index(drop=True)
    reference = read_records(reference_dir)[columns].reset_index(drop=True)
    pd.testing.assert_frame_equal(resumed, reference, atol=1e-5)
    keys = ["method", "attack", "index"]
    pd.testing.assert_frame_equal(load_maps(run_dir).keys[keys], read_records(run_dir)[keys])


def test_resume_refuses_a_changed_config(checkpoint, tmp_path):
    cli = evaluate.cli_main(eval_args(checkpoint, tmp_path, "--model.max_samples", "2", explainers=FEW_EXPLAINERS))
    run_dir = Path(cli.model.run_dir)
    with pytest.raises(ValueError, match="other settings.*epsilons"):
        evaluate.cli_main(
            eval_args(
                checkpoint, tmp_path, "--model.max_samples", "2", "--model.epsilon", "0.7", "--resume", str(run_dir),
                explainers=FEW_EXPLAINERS,
            )
        )
    # --overwrite starts that folder afresh instead.
    evaluate.cli_main(
        eval_args(
            checkpoint, tmp_path, "--model.max_samples", "2", "--model.epsilon", "0.7", "--resume", str(run_dir),
            "--overwrite", "true", explainers=FEW_EXPLAINERS,
        )
    )
    assert json.loads((run_dir / "run.json").read_text())["epsilons"] == [0.7]


def test_results_do_not_depend_on_batch_size(checkpoint, tmp_path):
    runs = []
    for batch_size in ("1", "4"):
        out = tmp_path / batch_size
        evaluate.cli_main(
            eval_args(checkpoint, out, "--data.init_args.batch_size", batch_size, explainers=FEW_EXPLAINERS)
        )
        runs.append(results_of(only_run(out)))
    assert_same_results(*runs)


def test_a_failing_write_leaves_no_truncated_results_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    path.write_text('{"complete": true}\n')
    fill_the_disk(monkeypatch)
    with pytest.raises(OSError, match="No space"):
        files_module.atomic_write_bytes(path, json.dumps({"complete": False, "rows": list(range(1000))}).encode())
    assert json.loads(path.read_text()) == {"complete": True}, "the previous file is intact"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"], "no temporary file left behind"


def test_a_model_with_nan_outputs_is_refused(checkpoint, tmp_path):
    broken = tmp_path / "nan.ckpt"
    state = torch.load(checkpoint, weights_only=False)
    state["state_dict"] = {key: value * float("nan") if value.is_floating_point() else value
                           for key, value in state["state_dict"].items()}
    torch.save(state, broken)
    with pytest.raises(ValueError, match="NaN or infinite scores"):
        evaluate.cli_main(eval_args(broken, tmp_path, explainers=FEW_EXPLAINERS))
    assert not list(tmp_path.rglob("results.json"))


def test_group_size_that_does_not_divide_the_images_fails_before_the_first_batch(checkpoint, tmp_path):
    explainers = json.dumps({"group": {"class_path": E + "GroupSparseMoreauGrad", "init_args": {"group_size": 5}}})
    with pytest.raises(ValueError, match="group.*5"):
        evaluate.cli_main(eval_args(checkpoint, tmp_path, explainers=explainers))
    assert not list(tmp_path.rglob("*.parquet"))


def test_max_samples_beyond_the_test_set_is_capped_with_a_warning(checkpoint, tmp_path):
    size = len(DigitsDataModule(image_size=16).test_indices)
    explainers = json.dumps({"simple_gradient": {"class_path": E + "SimpleGradient"}})
    with pytest.warns(UserWarning, match="larger than the test set"):
        cli = evaluate.cli_main(
            eval_args(checkpoint, tmp_path, "--model.max_samples", "100000", "--data.init_args.batch_size", "128",
                      "--model.attacks", attack_steps(1), explainers=explainers)
        )
    assert results_of(Path(cli.model.run_dir))["simple_gradient"]["samples"] == size


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--model.explainers", json.dumps({"x": {"class_path": E + "GradCam"}})), "GradCam"),
        (("--model.explainers", json.dumps({"x": {"class_path": E + "MoreauGrad", "init_args": {"rhoo": 1}}})), "rhoo"),
        (("--model.epsilon", "0"), "epsilon"),
        (("--model.attacks", json.dumps({"topk": {"class_path": "mglightning.attacks.TopKInterpretationAttack",
                                                  "init_args": {"num_steps": 0}}})),
         "attacks['topk'] on explainers['simple_gradient'] at ε=0.5: TopKInterpretationAttack: num_steps must be an "
         "integer >= 1, got 0"),
        (("--model.epsilon", "-1"), "epsilon"),
        (("--model.run_dir", "elsewhere"), "--model.run_dir 'elsewhere': evaluate.py chooses the run folder"),
    ],
)
def test_bad_settings_fail_before_the_run(checkpoint, tmp_path, extra, message):
    with pytest.raises((ValueError, SystemExit)) as error:
        evaluate.cli_main(eval_args(checkpoint, tmp_path, *extra))
    assert not list(tmp_path.rglob("*.parquet"))
    if error.type is ValueError:
        assert message in str(error.value)


def test_a_misspelt_setting_in_yaml_fails_before_the_run(checkpoint, tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text(
        "model:\n  explainers:\n    mg:\n      class_path: mglightning.explainers.MoreauGrad\n"
        "      init_args: {rho: 0.1, num_stepz: 3}\n"
    )
    with pytest.raises(SystemExit):
        evaluate.cli_main(eval_args(checkpoint, tmp_path) + ["--config", str(config)])
    assert "num_stepz" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.parquet"))


def test_help_lists_every_explainer_setting_with_its_type_and_no_training_options(capsys):
    with pytest.raises(SystemExit):
        evaluate.cli_main(["--help"])
    text = capsys.readouterr().out
    assert "Evaluate explainers" in text
    for needle in ("MoreauGrad", "rho: float = 1.0", "group_size: int = 14", "nt_samples: int", "--resume"):
        assert needle in text, needle
    for training_option in ("--optimizer", "--lr_scheduler", "--trainer.max_epochs", "Customize every aspect of training"):
        assert training_option not in text, training_option


def test_missing_or_incompatible_checkpoint_fails_before_the_run(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate.cli_main(eval_args(tmp_path / "missing.ckpt", tmp_path))
    with pytest.raises(ValueError, match="cannot take 32x32|classes"):
        evaluate.cli_main(
            eval_args(checkpoint, tmp_path)[:4] + eval_args(checkpoint, tmp_path)[8:]
            + ["--data", "mglightning.data.SyntheticDataModule", "--data.num_classes", "5"]
        )


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sampler_visits_every_sample_exactly_once(world_size):
    dataset = IndexedDataset([(torch.zeros(1), 0)] * 20)
    wanted = [0, 1, 2, 5, 6, 9, 11]
    seen = [i for rank in range(world_size) for i in ExactlyOnceSampler(dataset, wanted, world_size, rank)]
    assert sorted(seen) == wanted


def test_sample_seeds_depend_on_index_and_global_seed_only():
    indices = torch.tensor([0, 1, 2, 3])
    seeds = sample_seeds(0, indices)
    assert len(set(seeds.tolist())) == 4
    torch.testing.assert_close(sample_seeds(0, indices[2:]), seeds[2:])
    assert not torch.equal(sample_seeds(1, indices), seeds)


def test_bootstrap_interval_matches_a_brute_force_resampling_loop():
    values = np.random.default_rng(3).normal(size=23)
    low, high = bootstrap_interval(values, resamples=500, seed=7)
    rng = np.random.default_rng(7)
    draws = rng.integers(0, len(values), size=(500, len(values)))
    means = [float(np.mean([values[j] for j in draws[i]])) for i in range(500)]
    assert low == pytest.approx(np.percentile(means, 2.5))
    assert high == pytest.approx(np.percentile(means, 97.5))
    assert low < values.mean() < high


def _description(methods, attacks=("topk",)) -> RunDescription:
    """A run description of `methods` (`(name, family)`) under `attacks`, with the three robustness metrics."""
    metrics = tuple(
        MetricSpec(label=name, class_path="x", settings={}, columns={name: higher}, needs_attack=True, interval=True)
        for name, higher in (("distance", False), ("topk", True), ("ssim", True))
    )
    rows = tuple(
        RowSpec(method=m, label=m, explainer=m, display_name=m, family=f, epsilon=1.0,
                surrogates={attack: "self" for attack in attacks})
        for m, f in methods
    )
    return RunDescription(
        classifier="c", classifier_sha256=None, dataset="d", data_settings={}, test_set_size=20, planned_samples=20,
        explainers=(), attacks=tuple(AttackSpec(label=a, name=a, class_path="x", settings={}) for a in attacks),
        metrics=metrics, rows=rows, epsilons=(1.0,), target="prediction", seed=0, warm_start=False,
        convexity_iterations=0,
    )


def _records(entries) -> pd.DataFrame:
    base = {"label": 0, "prediction": 0, "target": 0, "explainer": "x", "epsilon": 1.0, "moved": True,
            "seconds_clean": 0.0, "seconds_attack": 0.0, "seconds_attacked": 0.0, "evals_clean": 1.0,
            "evals_attack": 1.0, "evals_attacked": 1.0, "weak_convexity": None, "convex": None, "bound": None,
            "map_change": None, "bound_holds": None,
            "rank": 0}
    return pd.DataFrame([{**base, **entry} for entry in entries])


def test_paired_comparison_says_which_side_is_robust():
    description = _description((("simple_gradient", "gradient"), ("moreaugrad", "moreaugrad")))
    records = _records(
        {"method": method, "attack": "topk", "index": i, "distance": d, "topk": t, "ssim": 0.5}
        for i in range(20)
        for method, d, t in (("simple_gradient", 0.5 + 0.01 * i, 0.6), ("moreaugrad", 0.2 + 0.01 * i, 0.6 - 0.1))
    )
    rows = summarise_records(records, description, resamples=200)
    verdicts = {c.metric: c.verdict for c in compare_paired(records, rows, description, resamples=200)}
    assert verdicts == {"distance": "more robust", "topk": "less robust", "ssim": "no clear difference"}


def test_worst_case_over_attacks_takes_each_metric_at_its_worst_per_sample():
    description = _description((("simple_gradient", "gradient"),), attacks=("own", "transfer"))
    records = _records(
        [
            {"method": "simple_gradient", "attack": "own", "index": 0, "distance": 0.2, "topk": 0.9, "ssim": 0.4,
             "moved": False, "evals_attack": 10.0},
            {"method": "simple_gradient", "attack": "transfer", "index": 0, "distance": 0.3, "topk": 0.8, "ssim": 0.6,
             "moved": True, "evals_attack": 5.0},
            {"method": "simple_gradient", "attack": "own", "index": 1, "distance": 0.5, "topk": 0.5, "ssim": 0.5},
            {"method": "simple_gradient", "attack": "transfer", "index": 1, "distance": 0.1, "topk": 0.7, "ssim": 0.9},
        ]
    )
    (row,) = summarise_records(records, description, resamples=50)
    assert row.values["distance"] == pytest.approx((0.3 + 0.5) / 2)  # the highest distance per sample
    assert row.values["topk"] == pytest.approx((0.8 + 0.5) / 2)  # the lowest top-k
    assert row.values["ssim"] == pytest.approx((0.4 + 0.5) / 2)  # the lowest SSIM, from either attack
    assert row.values["attack_success"] == 1.0  # moved by some attack
    assert row.values["evals_attack"] == pytest.approx((15.0 + 2.0) / 2)  # the ensemble's cost adds up
    assert row.worst_attack == {"own": 1, "transfer": 1} and row.worst_attack_metric == "distance"  # the first
    assert row.per_attack["own"]["topk"] == pytest.approx(0.7) and row.per_attack["transfer"]["topk"] == pytest.approx(0.75)
    assert row.attack == "worst of own, transfer" and row.surrogate == "own: self, transfer: self"


# Each evaluation config's fast preset (an overlay names the config's explainers and attacks), and the configs whose
# top-k attacks search cheaply (configs/presets/full_cost_search.yaml switches that off).
FAST_PRESETS = {"eval_digits.yaml": "fast_digits.yaml", "eval_digits_full.yaml": "fast_digits_full.yaml",
                "eval_cifar10_study.yaml": "fast_cifar10_study.yaml", "eval_cifar10.yaml": "fast.yaml",
                "eval_tinyimagenet.yaml": "fast.yaml", "eval_imagenet.yaml": "fast.yaml", "eval_patches.yaml": "fast.yaml"}
CHEAP_SEARCH_CONFIGS = ("eval_digits.yaml", "eval_digits_full.yaml", "eval_patches.yaml")


@pytest.mark.parametrize(
    "config, preset",
    [(config, None) for config in FAST_PRESETS] + list(FAST_PRESETS.items())
    + [(config, "full_cost_search.yaml") for config in CHEAP_SEARCH_CONFIGS],
)
def test_evaluation_configs_are_valid(config, preset, capsys):
    import yaml

    overlay = ["--config", str(CONFIGS / "presets" / preset)] if preset else []
    with pytest.raises(SystemExit) as exit_info:
        evaluate.cli_main(["--config", str(CONFIGS / config), *overlay, "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "mglightning.explainers.SparseMoreauGrad" in printed
    model = yaml.safe_load(printed)["model"]
    own = yaml.safe_load((CONFIGS / config).read_text())["model"]
    # An overlay keeps the config's explainers and attacks, all of them, with their own settings.
    assert set(model["explainers"]) == set(own["explainers"]) and set(model["attacks"]) == set(own["attacks"])
    for label, spec in own["explainers"].items():
        settings = model["explainers"][label]["init_args"]
        solver = spec["class_path"].endswith("MoreauGrad")
        fast = preset is not None and preset.startswith("fast") and solver
        expected = {**spec.get("init_args", {}), **({"tol": 0.03, "tol_window": 10, "average_last": 0} if fast else {})}
        assert {name: settings[name] for name in expected} == expected, label
    searches = {label: (spec["init_args"]["warm_start"], spec["init_args"]["search_settings"])
                for label, spec in model["attacks"].items() if spec["class_path"].endswith("TopKInterpretationAttack")}
    if preset == "full_cost_search.yaml":
        assert set(searches.values()) == {(False, None)}
    elif preset is not None:
        assert all(warm for warm, _ in searches.values())
    elif config in CHEAP_SEARCH_CONFIGS:
        assert all(warm and search for warm, search in searches.values())


def test_warm_started_fast_preset_costs_less_and_agrees(checkpoint, tmp_path):
    explainers = json.dumps(
        {"moreaugrad": {"class_path": E + "MoreauGrad",
                        "init_args": {"num_steps": 60, "noise_std": 0.0, "tol": 0.01, "tol_window": 1}}}
    )
    runs = {}
    for warm in ("false", "true"):
        out = tmp_path / warm
        evaluate.cli_main(eval_args(checkpoint, out, "--model.attacks.topk.init_args.warm_start", warm,
                                    "--model.max_samples", "4", explainers=explainers))
        runs[warm] = results_of(only_run(out))["moreaugrad"]
    assert runs["true"]["evals_attack"] < runs["false"]["evals_attack"]
    # Only the search is warm-started: the attacked maps are cold in both runs (tests/test_evaluation_cost.py).
    assert runs["true"]["topk"] == pytest.approx(runs["false"]["topk"], abs=0.05)


def _synthetic_args(out: Path, classifier_yaml: Path) -> list[str]:
    return [
        "--config", str(CONFIGS / "eval_digits.yaml"), "--config", str(classifier_yaml),
        "--data", "mglightning.data.SyntheticDataModule", "--data.init_args.num_classes", "3",
        "--data.init_args.image_size", "16", "--data.init_args.batch_size", "4",
        "--model.explainers", FEW_EXPLAINERS, "--model.max_samples", "4", "--model.attacks", attack_steps(1),
        "--model.bootstrap_samples", "50", "--model.convexity_iterations", "0",
        "--trainer.accelerator", "cpu", "--trainer.logger.init_args.save_dir", str(out),
    ]


def test_any_classifier_form_is_evaluated_end_to_end(tmp_path):
    """A registered architecture and a timm architecture with plain state dicts, and a user module by class_path:
    each evaluated on synthetic data without a training step (timm's pretrained cache: tests/test_loading.py)."""
    import timm

    from mglightning.models import create_model

    torch.manual_seed(0)
    state_file = tmp_path / "resnet.pt"
    torch.save(create_model("resnet18", num_classes=3, image_size=16, in_chans=3, width=4).state_dict(), state_file)
    timm_file = tmp_path / "timm.pt"
    torch.save(timm.create_model("resnet10t", num_classes=3, pretrained=False).state_dict(), timm_file)
    forms = {
        "state_dict": f"model:\n  classifier: {{arch: resnet18, weights: {state_file}, model_kwargs: {{width: 4}}}}\n",
        "module": "model:\n  classifier:\n    module:\n      class_path: test_loading.TinyNet\n"
                  "      init_args: {num_classes: 3}\n",
        "timm_weights": f"model:\n  classifier: {{arch: timm/resnet10t, weights: {timm_file}}}\n",
    }
    for name, text in forms.items():
        config = tmp_path / f"{name}.yaml"
        config.write_text(text)
        out = tmp_path / name
        evaluate.cli_main(_synthetic_args(out, config))
        results = results_of(only_run(out))
        assert set(results) == {"simple_gradient", "smoothgrad", "moreaugrad"}, name
        assert results["simple_gradient"]["samples"] == 4, name


def test_a_classifier_with_the_wrong_number_of_classes_is_refused(tmp_path):
    from mglightning.models import create_model

    state_file = tmp_path / "resnet.pt"
    torch.save(create_model("resnet18", num_classes=5, image_size=16, in_chans=3, width=4).state_dict(), state_file)
    config = tmp_path / "c.yaml"
    config.write_text(f"model:\n  classifier: {{arch: resnet18, weights: {state_file}, model_kwargs: {{width: 4, num_classes: 5}}}}\n")
    with pytest.raises(ValueError, match="5"):
        evaluate.cli_main(_synthetic_args(tmp_path / "out", config))
