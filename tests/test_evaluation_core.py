"""The evaluation core as parts: your own attack and metric by class_path, the batch function without Lightning,
the record type defined once, and a run folder that work cannot be lost from."""

import functools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pandas as pd
import pytest
import torch

import evaluate
import mglightning.evaluation.files as files_module
from mglightning import load_classifier
from mglightning.attacks import Attack, AttackResult, TopKInterpretationAttack
from mglightning.data import DigitsDataModule
from mglightning.evaluation import (
    OutOfSpaceError,
    Record,
    RunDescription,
    RunFolderBusyError,
    RunLock,
    measure_batch,
    read_records,
    record_schema,
)
from mglightning.explainers import MoreauGrad, SimpleGradient, SmoothGrad
from mglightning.metrics import DeletionInsertionAUC, MapBatch, SampleMetric
from mglightning.evaluation.measure import default_metrics
from test_evaluate import CHEAP_SEARCH, FEW_EXPLAINERS, ROOT, attack_steps, checkpoint, eval_args, only_run, results_of  # noqa: F401
from full_disk import empty_the_disk, fill_the_disk


class BrightenAttack(Attack):
    """A test attack: add `amount` to every pixel (clamped), within the L2 budget."""

    name = "brighten"

    def __init__(self, explainer, epsilon: float, amount: float = 0.05) -> None:
        self.explainer, self.epsilon, self.amount = explainer, epsilon, amount

    def run(self, inputs, target, *, seeds=None, initial=None) -> AttackResult:
        shift = torch.full_like(inputs, self.amount)
        norm = shift.flatten(1).norm(dim=1).clamp_min(1e-12)
        shift = shift * (self.epsilon / norm).clamp(max=1.0).view(-1, 1, 1, 1)
        moved = torch.ones(len(inputs), dtype=torch.bool)
        return AttackResult((inputs + shift).clamp(0, 1), moved, torch.zeros(len(inputs), dtype=torch.long))


class MeanMagnitudeShift(SampleMetric):
    """A test metric: how much the mean map magnitude grew under the attack."""

    outputs = {"shift": False}

    def __init__(self, scale: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scale = scale

    def measure(self, batch: MapBatch) -> dict:
        grown = batch.attacked.abs().flatten(1).mean(dim=1) - batch.clean.abs().flatten(1).mean(dim=1)
        return {"shift": self.scale * grown}


def _own_parts() -> list[str]:
    attacks = {
        "topk": {"class_path": "mglightning.attacks.TopKInterpretationAttack",
                 "init_args": {"num_steps": 2, **CHEAP_SEARCH}},
        "brighten": {"class_path": "test_evaluation_core.BrightenAttack", "init_args": {"amount": 0.1}},
    }
    metrics = {
        "topk": {"class_path": "mglightning.metrics.TopKIntersection"},
        "growth": {"class_path": "test_evaluation_core.MeanMagnitudeShift", "init_args": {"scale": 2.0}},
    }
    return ["--model.attacks", json.dumps(attacks), "--model.metrics", json.dumps(metrics)]


def test_your_own_attack_and_metric_by_class_path_land_in_records_and_table(checkpoint, tmp_path, capsys):
    cli = evaluate.cli_main(eval_args(checkpoint, tmp_path, *_own_parts(), explainers=FEW_EXPLAINERS))
    run_dir = Path(cli.model.run_dir)
    records = read_records(run_dir)
    assert set(records["attack"]) == {"topk", "brighten"}
    assert {"topk", "growth"} <= set(records.columns) and "distance" not in records.columns
    assert len(records) == 7 * 3 * 2 and records["growth"].notna().all()
    brightened = records[records["attack"] == "brighten"]
    assert brightened["moved"].all() and (brightened["evals_attack"] == 0).all()
    results = results_of(run_dir)
    for method, row in results.items():
        part = records[records["method"] == method].pivot(index="index", columns="attack", values="growth")
        assert row["growth"] == pytest.approx(part.max(axis=1).mean())  # the worst (highest) shift per sample
        assert row["per_attack"]["brighten"]["growth"] == pytest.approx(part["brighten"].mean())
        assert sum(row["worst_attack"].values()) == 7
    printed = capsys.readouterr().out
    assert "| growth ↓ [95% CI] |" in printed and "worst attack by top-k (samples)" in printed  # the first metric
    assert "test_evaluation_core.BrightenAttack (amount=0.1)" in (run_dir / "results.md").read_text()


def test_the_batch_function_gives_the_records_of_evaluate_py(checkpoint, tmp_path):
    cli = evaluate.cli_main(eval_args(checkpoint, tmp_path, explainers=FEW_EXPLAINERS))
    recorded = read_records(Path(cli.model.run_dir))

    model = load_classifier(checkpoint)
    datamodule = DigitsDataModule(image_size=16, batch_size=4)
    datamodule.setup("test")
    samples = [datamodule.test_dataset[i] for i in range(7)]
    images = torch.stack([image for image, _ in samples])
    labels = torch.tensor([label for _, label in samples])
    metrics = {**default_metrics(), "fidelity": DeletionInsertionAUC(steps=16)}  # eval_digits.yaml's metrics
    # The settings as the run used them (the command line's explainers merge into the config's).
    settings = {spec.label: spec.settings for spec in RunDescription.load(cli.model.run_dir).explainers}
    assert settings["moreaugrad"]["num_steps"] == 6 and settings["smoothgrad"]["nt_samples"] == 3
    explainers = {
        "simple_gradient": SimpleGradient(model, **settings["simple_gradient"]),
        "smoothgrad": SmoothGrad(model, **settings["smoothgrad"]),
        "moreaugrad": MoreauGrad(model, **settings["moreaugrad"]),
    }
    # eval_digits.yaml's cheap search: warm-started attack solves with its search settings.
    search = RunDescription.load(cli.model.run_dir).attacks[0].settings["search_settings"]
    assert search == {"num_steps": 10}
    measured = measure_batch(
        model, images, labels, torch.arange(7), explainers=explainers, epsilons=[0.5], metrics=metrics,
        attacks={"topk": functools.partial(TopKInterpretationAttack, num_steps=2, warm_start=True,
                                           search_settings=search)},
    )
    direct = pd.DataFrame([record.row() for record in measured.records])
    optional = ["weak_convexity", "convex", "bound", "bound_holds"]  # not computed: None here, null (NaN) in Parquet
    direct[optional] = direct[optional].astype("float64")
    timing = [column for column in direct.columns if column.startswith("seconds_")]
    key = ["method", "attack", "index"]
    direct = direct.drop(columns=timing).sort_values(key).reset_index(drop=True)
    recorded = recorded.drop(columns=timing).sort_values(key).reset_index(drop=True)[list(direct.columns)]
    pd.testing.assert_frame_equal(direct, recorded, check_dtype=False, atol=1e-6, rtol=1e-5)


def test_the_record_type_is_the_only_definition_of_a_record():
    own = [item.name for item in fields(Record) if item.name != "values"]
    assert record_schema(["topk"]).names == own + ["topk"]
    record = Record(index=0, label=1, prediction=1, target=1, method="m", explainer="e", epsilon=0.5, attack="a",
                    moved=True, seconds_clean=0.0, seconds_attack=0.0, seconds_attacked=0.0, evals_clean=1.0,
                    evals_attack=1.0, evals_attacked=1.0, values={"topk": 0.5})
    assert list(record.row()) == own + ["topk"]
    # Every own column says how the results summarise it and how it combines over attacks.
    for item in fields(Record):
        if item.name != "values":
            assert {"arrow", "summary", "across_attacks", "title"} <= set(item.metadata), item.name
    with pytest.raises(ValueError, match="clash"):
        Record(**{**record.__dict__, "values": {"index": 1.0}}).row()


# ------------------------------------------------------------------------------- the run folder's guarantees


def _snapshot(folder: Path) -> dict:
    """Every file below `folder` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def _finished_run(checkpoint, out: Path, *extra: str) -> Path:
    evaluate.cli_main(eval_args(checkpoint, out, "--model.max_samples", "2", *extra, explainers=FEW_EXPLAINERS))
    return only_run(out)


def test_overwrite_with_a_mistyped_checkpoint_fails_before_touching_the_folder(checkpoint, tmp_path):
    run_dir = _finished_run(checkpoint, tmp_path)
    before = _snapshot(run_dir)
    with pytest.raises(FileNotFoundError):
        evaluate.cli_main(eval_args(tmp_path / "typo.ckpt", tmp_path, "--model.max_samples", "2", "--resume",
                                    str(run_dir), "--overwrite", "true", explainers=FEW_EXPLAINERS))
    assert _snapshot(run_dir) == before
    # A checked --overwrite moves the old run aside instead of deleting it.
    evaluate.cli_main(eval_args(checkpoint, tmp_path, "--model.max_samples", "2", "--model.epsilon", "0.7",
                                "--resume", str(run_dir), "--overwrite", "true", explainers=FEW_EXPLAINERS))
    (aside,) = run_dir.glob("replaced-*")
    assert (aside / "run.json").is_file() and list((aside / "records").glob("*.parquet"))
    assert json.loads((aside / "run.json").read_text())["epsilons"] == [0.5]
    assert RunDescription.load(run_dir).epsilons == (0.7,)


def test_a_second_process_on_the_same_folder_is_refused_at_once(checkpoint, tmp_path):
    run_dir = _finished_run(checkpoint, tmp_path)
    (run_dir / "results.json").unlink()
    holder = RunLock(run_dir).acquire()  # another process's lock (a lock is per open file, as across processes)
    try:
        before = _snapshot(run_dir)
        started = time.monotonic()
        with pytest.raises(RunFolderBusyError, match=rf"another process \(host .*, PID {os.getpid()}"):
            evaluate.cli_main(eval_args(checkpoint, tmp_path, "--model.max_samples", "3", "--resume", str(run_dir),
                                        explainers=FEW_EXPLAINERS))
        assert time.monotonic() - started < 30  # refused before any sample
        assert _snapshot(run_dir) == before
    finally:
        holder.release()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    stale = tmp_path / ".lock"
    stale.write_text(json.dumps({"host": "somewhere", "pid": 999999, "since": 0}))
    lock = RunLock(tmp_path).acquire()  # no live process holds the OS lock
    assert json.loads(stale.read_text())["pid"] == os.getpid()
    lock.release()
    assert not stale.exists()


def test_a_refused_resume_changes_nothing_in_the_folder(checkpoint, tmp_path):
    run_dir = _finished_run(checkpoint, tmp_path)
    before = _snapshot(run_dir)
    with pytest.raises(ValueError, match="other settings.*epsilons.*nothing in it was changed"):
        evaluate.cli_main(eval_args(checkpoint, tmp_path, "--model.max_samples", "2", "--model.epsilon", "0.7",
                                    "--resume", str(run_dir), explainers=FEW_EXPLAINERS))
    assert _snapshot(run_dir) == before


def test_a_finished_run_resumed_says_so_and_prints_its_table(checkpoint, tmp_path, capsys):
    run_dir = _finished_run(checkpoint, tmp_path)
    capsys.readouterr()
    evaluate.cli_main(eval_args(checkpoint, tmp_path, "--model.max_samples", "2", "--resume", "last",
                                explainers=FEW_EXPLAINERS))
    captured = capsys.readouterr()
    assert f"{run_dir} is complete: all 2 samples are recorded" in captured.out
    assert captured.out.count("| method |") == 1
    assert "Total length of `DataLoader`" not in captured.out + captured.err


def test_sigterm_keeps_the_finished_batches_and_exits_non_zero_with_the_resume_command(checkpoint, tmp_path):
    args = eval_args(checkpoint, tmp_path, "--data.init_args.batch_size", "1", "--model.max_samples", "7",
                     explainers=FEW_EXPLAINERS)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, str(ROOT / "evaluate.py"), *args], cwd=tmp_path, env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    while not list(tmp_path.rglob("records/*.parquet")):
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() - started < 240, "no batch recorded in time"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 143, stderr
    run_dir = only_run(tmp_path)
    assert "NOT finished" in stderr and f"--resume {run_dir}" in stderr
    recorded = set(read_records(run_dir)["index"])
    assert 0 < len(recorded) < 7 and not (run_dir / "results.json").exists()
    evaluate.cli_main(args + ["--resume", str(run_dir)])
    assert results_of(run_dir)["moreaugrad"]["samples"] == 7


def test_a_full_disk_says_so_leaves_no_temporary_file_and_resume_regenerates_the_grid(checkpoint, tmp_path,
                                                                                        monkeypatch):
    real = files_module.atomic_write_bytes
    grid_writes, failures = [], []

    def full_for_the_grid(path, data):
        if path.parent.name == "grid":
            grid_writes.append(path)
        if len(grid_writes) == 2 and not failures:  # the second batch's grid samples: the disk is full
            failures.append(path)
            # The real writer, on a disk that fills up half-way through the file.
            fill_the_disk(monkeypatch)
            try:
                return real(path, data)
            finally:
                empty_the_disk(monkeypatch)
        return real(path, data)

    monkeypatch.setattr("mglightning.modules.evaluator.atomic_write_bytes", full_for_the_grid)
    args = eval_args(checkpoint, tmp_path, "--data.init_args.batch_size", "2", "--model.max_samples", "4",
                     explainers=FEW_EXPLAINERS)
    with pytest.raises(OutOfSpaceError, match=r"No space left on the device of .*grid.*--resume"):
        evaluate.cli_main(args)
    run_dir = failures[0].parent.parent
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name], "a temporary file was left behind"
    assert len(list((run_dir / "records").glob("*.parquet"))) == 1, "only the first batch's records are kept"
    monkeypatch.setattr("mglightning.modules.evaluator.atomic_write_bytes", real)
    evaluate.cli_main(args + ["--resume", str(run_dir)])
    assert (run_dir / "saliency_grid.png").is_file()
    grid_indices = sorted(
        int(i) for path in (run_dir / "grid").glob("*.pt") for i in torch.load(path, weights_only=True)["index"]
    )
    assert grid_indices == [0, 1, 2, 3]


def test_a_run_refused_at_its_first_batch_leaves_no_folder_that_resume_last_would_pick(checkpoint, tmp_path):
    broken = tmp_path / "nan.ckpt"
    state = torch.load(checkpoint, weights_only=False)
    state["state_dict"] = {key: value * float("nan") if value.is_floating_point() else value
                           for key, value in state["state_dict"].items()}
    torch.save(state, broken)
    out = tmp_path / "runs"
    with pytest.raises(ValueError, match="NaN or infinite scores"):
        evaluate.cli_main(eval_args(broken, out, explainers=FEW_EXPLAINERS))
    assert not list(out.rglob("run.json"))
    with pytest.raises(ValueError, match="no evaluation run"):
        evaluate.cli_main(eval_args(checkpoint, out, "--resume", "last", explainers=FEW_EXPLAINERS))


def test_help_lists_the_attacks_and_metrics_settings_with_their_types(capsys):
    with pytest.raises(SystemExit):
        evaluate.cli_main(["--help"])
    text = capsys.readouterr().out
    for needle in ("mglightning.attacks.TopKInterpretationAttack", "num_steps: int = 10", "surrogate: str = 'self'",
                   "mglightning.attacks.GaussianNoise", "mglightning.metrics.TopKIntersection",
                   "fraction: float = 0.4", "mglightning.metrics.DeletionInsertionAUC", "steps: int = 20",
                   "--model.attacks", "--model.metrics"):
        assert needle in text, needle
