"""The run folder's failure paths: a refused command changes no byte of what was there, a live run keeps its
files, the grid works whatever attacks apply, and damaged files are named with what they held and how to
recover."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import evaluate
from mglightning.attacks import Attack, AttackResult
from mglightning.evaluation import RunFolderBusyError, read_records
from test_evaluate import FEW_EXPLAINERS, ROOT, checkpoint, eval_args, only_run, results_of  # noqa: F401


ADDED = "{extra_ssim: {class_path: mglightning.metrics.SaliencySSIM}}"  # a metric added after the run


def _hashes(folder: Path) -> dict[str, str]:
    """Every file below `folder` (hidden ones included) with the SHA-256 of its bytes."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def _finished_run(checkpoint, out: Path, *extra: str) -> Path:
    evaluate.cli_main(eval_args(checkpoint, out, "--model.max_samples", "2", *extra, explainers=FEW_EXPLAINERS))
    return only_run(out)


def _environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}


class GatedAttack(Attack):
    """A test attack that waits, at its first batch, until the file `gate` exists (writing `<gate>.waiting` when
    it starts to wait), then leaves the inputs as they are: a run held before its first record."""

    name = "gated"

    def __init__(self, explainer, epsilon: float, gate: str = "") -> None:
        self.explainer, self.epsilon, self.gate = explainer, epsilon, Path(gate)

    def run(self, inputs, target, *, seeds=None, initial=None) -> AttackResult:
        Path(f"{self.gate}.waiting").touch()
        started = time.monotonic()
        while not self.gate.exists():
            if time.monotonic() - started > 120:
                raise TimeoutError(f"the test never opened {self.gate}")
            time.sleep(0.05)
        return AttackResult(inputs.clone(), torch.zeros(len(inputs), dtype=torch.bool),
                            torch.zeros(len(inputs), dtype=torch.long))


# ------------------------------------------------------------------------------------- refused commands


def test_a_refused_resume_of_a_folder_without_records_changes_no_byte_and_exits_non_zero(checkpoint, tmp_path):
    run_dir = _finished_run(checkpoint, tmp_path)
    (run_dir / "records").rename(tmp_path / "records-moved-away")  # moved away, or never written
    (run_dir / "hparams.yaml").unlink()  # Lightning's logger writes one into a folder that lacks it
    before = _hashes(run_dir)
    args = eval_args(checkpoint, tmp_path, "--model.max_samples", "2", "--resume", str(run_dir), "--model.seed", "1",
                     explainers=FEW_EXPLAINERS)
    finished = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *args], cwd=tmp_path, env=_environment(),
                              capture_output=True, text=True, timeout=240)
    assert finished.returncode != 0
    assert "other settings (differing: seed)" in finished.stderr and "nothing in it was changed" in finished.stderr
    assert "was removed" not in finished.stderr
    assert _hashes(run_dir) == before


def test_a_resume_refused_for_a_bad_setting_changes_no_byte(checkpoint, tmp_path):
    run_dir = _finished_run(checkpoint, tmp_path)
    before = _hashes(run_dir)
    with pytest.raises(ValueError, match="bootstrap_samples must be positive"):
        evaluate.cli_main(eval_args(checkpoint, tmp_path, "--model.max_samples", "2", "--resume", str(run_dir),
                                    "--model.bootstrap_samples", "0", explainers=FEW_EXPLAINERS))
    assert _hashes(run_dir) == before  # the lock it took is gone too


def test_a_second_resume_of_a_live_run_is_refused_and_leaves_the_live_run_whole(checkpoint, tmp_path):
    gate = tmp_path / "gate"
    attacks = json.dumps({"gated": {"class_path": "test_run_folder_failures.GatedAttack",
                                    "init_args": {"gate": str(gate)}}})
    out = tmp_path / "runs"
    args = eval_args(checkpoint, out, "--model.max_samples", "2", "--model.attacks", attacks,
                     explainers=FEW_EXPLAINERS)
    live = subprocess.Popen([sys.executable, str(ROOT / "evaluate.py"), *args], cwd=tmp_path, env=_environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        started = time.monotonic()
        while not Path(f"{gate}.waiting").exists():  # the live run is in its first batch, before any record
            assert live.poll() is None, live.communicate()[1]
            assert time.monotonic() - started < 120, "the live run never reached its first batch"
            time.sleep(0.05)
        run_dir = only_run(out)
        before = _hashes(run_dir)
        assert {"run.json", ".lock"} <= set(before) and not list(run_dir.glob("records/*.parquet"))
        with pytest.raises(RunFolderBusyError, match=rf"another process \(host .*, PID {live.pid}"):
            evaluate.cli_main(eval_args(checkpoint, out, "--model.max_samples", "2", "--model.attacks", attacks,
                                        "--resume", str(run_dir),
                                        explainers=FEW_EXPLAINERS))
        assert _hashes(run_dir) == before
    finally:
        gate.touch()
        stdout, stderr = live.communicate(timeout=240)
    assert live.returncode == 0, stderr
    assert results_of(run_dir)["moreaugrad"]["samples"] == 2
    assert len(read_records(run_dir)) == 2 * 3


def test_duplicate_budgets_are_refused_before_any_work_naming_the_setting(checkpoint, tmp_path):
    for budgets in ("[0.5, 0.5]", "[0.5, 0.50000001]"):  # the second pair would share the row name @eps=0.5
        started = time.monotonic()
        with pytest.raises(ValueError, match=r"model.epsilon lists the budget 0.5 twice"):
            evaluate.cli_main(eval_args(checkpoint, tmp_path, "--model.epsilon", budgets, explainers=FEW_EXPLAINERS))
        assert time.monotonic() - started < 30
    assert not [path for path in tmp_path.rglob("*") if path.is_file()]  # the reserved folder went too


def test_stored_map_labels_that_would_collide_are_refused_at_the_start(checkpoint, tmp_path):
    attacks = json.dumps({"top/k": {"class_path": "mglightning.attacks.TopKInterpretationAttack",
                                    "init_args": {"num_steps": 2}}})
    with pytest.raises(ValueError, match=r"keep_maps.*\['top/k'\].*'/'"):
        evaluate.cli_main(eval_args(checkpoint, tmp_path, "--model.attacks", attacks, "--model.keep_maps", "float16",
                                    explainers=FEW_EXPLAINERS))


# ------------------------------------------------------------------------------------- the saliency grid


def test_the_grid_shows_each_method_under_the_first_attack_that_applies_to_it(checkpoint, tmp_path):
    from mglightning.evaluation import load_maps

    # `exact` first: it applies to MoreauGrad only (distinct_only), so the simple gradient and SmoothGrad are
    # drawn under `topk`, MoreauGrad under `exact`.
    attacks = json.dumps({
        "exact": {"class_path": "mglightning.attacks.TopKInterpretationAttack",
                  "init_args": {"num_steps": 2, "surrogate": "exact", "distinct_only": True}},
        "topk": {"class_path": "mglightning.attacks.TopKInterpretationAttack", "init_args": {"num_steps": 2}},
    })
    run_dir = _finished_run(checkpoint, tmp_path, "--model.attacks", attacks, "--model.keep_maps", "float32")
    assert (run_dir / "saliency_grid.png").is_file() and (run_dir / "results.json").is_file()
    grid = {}
    for path in (run_dir / "grid").glob("*.pt"):
        part = torch.load(path, weights_only=True)
        for method, maps in part["attacked"].items():
            for position, index in enumerate(part["index"].tolist()):
                grid[(method, index)] = maps[position]
    assert {method for method, _ in grid} == {"simple_gradient", "smoothgrad", "moreaugrad"}
    for method, attack in (("simple_gradient", "topk"), ("smoothgrad", "topk"), ("moreaugrad", "exact")):
        stored = load_maps(run_dir, method=method, attack=attack)
        for position, index in enumerate(stored.keys["index"].tolist()):
            torch.testing.assert_close(grid[(method, index)], stored.attacked[position])


# ------------------------------------------------------------------------------------- damaged files


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else b"")


def _small_run(checkpoint, out: Path, *extra: str) -> Path:
    """Four samples in two batches of two: two files of each kind."""
    return _finished_run(checkpoint, out, "--model.max_samples", "4", "--data.init_args.batch_size", "2", *extra)


@pytest.mark.parametrize("how", ["truncated", "empty"])
def test_a_damaged_records_file_is_named_by_report_and_resume_which_change_nothing(checkpoint, tmp_path, how):
    from mglightning.evaluation import DamagedFileError

    run_dir = _small_run(checkpoint, tmp_path)
    first, _ = sorted((run_dir / "records").glob("*.parquet"))
    _damage(first, how)
    before = _hashes(run_dir)
    advice = (rf"{first} is damaged .*the other 1 records files are intact and hold 2 samples.*Move the damaged file "
              rf"out of .*records and run the same evaluate.py command with --resume {run_dir}")
    with pytest.raises(DamagedFileError, match=advice):
        evaluate.cli_main(["report", str(run_dir)])
    args = eval_args(checkpoint, tmp_path, "--model.max_samples", "4", "--data.init_args.batch_size", "2",
                     explainers=FEW_EXPLAINERS)
    with pytest.raises(DamagedFileError, match=advice):
        evaluate.cli_main(args + ["--resume", str(run_dir)])
    assert _hashes(run_dir) == before
    # The advice works: without the file, --resume evaluates its samples again.
    first.rename(tmp_path / first.name)
    evaluate.cli_main(args + ["--resume", str(run_dir)])
    assert results_of(run_dir)["moreaugrad"]["samples"] == 4


@pytest.mark.parametrize("how", ["truncated", "empty", "entries", "index"])
def test_a_damaged_stored_maps_file_is_named_with_its_batch_records_and_the_way_back(checkpoint, tmp_path, how):
    from safetensors.torch import load_file, save
    from mglightning.evaluation import DamagedFileError, load_maps

    run_dir = _small_run(checkpoint, tmp_path, "--model.keep_maps", "float16")
    first = min((run_dir / "maps").glob("*.safetensors"), key=lambda path: int(path.stem.split("-")[1]))
    paired = min((run_dir / "records").glob("*.parquet"), key=lambda path: int(path.stem.split("-")[1]))
    if how in ("truncated", "empty"):
        _damage(first, how)
    else:  # edited metadata: entries that are not a list of keys, or an index that is not the samples'
        from safetensors import safe_open

        with safe_open(str(first), framework="pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(first)
        if how == "entries":
            metadata["entries"] = json.dumps({"kind": "clean"})
        else:
            tensors["index"] = tensors["index"].float()
        first.write_bytes(save(tensors, metadata=metadata))
    advice = (rf"{first} is damaged .*it held the maps of the batch whose records are {paired}\n"
              rf"The other 1 maps files are intact.*--resume {run_dir}")
    with pytest.raises(DamagedFileError, match=advice):
        load_maps(run_dir)
    with pytest.raises(DamagedFileError, match=advice):
        evaluate.cli_main(["report", str(run_dir), "--metrics", ADDED])
    # The advice works: without the file and its batch's records, --resume stores those maps again.
    first.rename(tmp_path / first.name)
    paired.rename(tmp_path / paired.name)
    evaluate.cli_main(eval_args(checkpoint, tmp_path, "--model.max_samples", "4", "--data.init_args.batch_size", "2",
                                "--model.keep_maps", "float16", "--resume", str(run_dir), explainers=FEW_EXPLAINERS))
    assert sorted(set(load_maps(run_dir).keys["index"])) == [0, 1, 2, 3]


def test_a_damaged_added_metric_or_grid_file_is_left_out_with_a_warning_and_the_report_goes_on(
    checkpoint, tmp_path, capsys
):
    run_dir = _small_run(checkpoint, tmp_path, "--model.keep_maps", "float16")
    evaluate.cli_main(["report", str(run_dir), "--metrics", ADDED])
    assert "extra_ssim" in results_of(run_dir)["moreaugrad"]
    _damage(run_dir / "added" / "extra_ssim.parquet", "truncated")
    grid = sorted((run_dir / "grid").glob("*.pt"))[-1]
    _damage(grid, "empty")
    (run_dir / "saliency_grid.png").unlink()
    capsys.readouterr()
    first_index = grid.name.split("-")[1]
    with pytest.warns(UserWarning, match=rf"{grid} is damaged .*from dataset index {first_index}\. The saliency grid "
                                         "leaves them out; the records and results are intact"):
        evaluate.cli_main(["report", str(run_dir)])
    printed = capsys.readouterr().out
    assert f"WARNING: {run_dir / 'added' / 'extra_ssim.parquet'} is damaged" in printed
    assert "the added metric 'extra_ssim' is left out; the run's records are intact" in printed
    assert "extra_ssim" not in results_of(run_dir)["moreaugrad"] and results_of(run_dir)["moreaugrad"]["samples"] == 4
    assert (run_dir / "saliency_grid.png").is_file()
