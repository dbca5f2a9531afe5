"""The parts the evaluation LightningModule wires together, each on its own: the run folder's lifecycle
(`RunFolder`), the run description's weights hash, the progress callback and the evaluator's own settings checks.
The evaluations through `evaluate.py` (tests/test_evaluate.py, tests/test_run_folder_failures.py) test them wired."""

from __future__ import annotations

import hashlib
import pickle
from types import SimpleNamespace

import pytest
import torch

from mglightning.evaluation.description import RunDescription, file_sha256, weights_file
from mglightning.evaluation.run_folder import RunFolder, RunFolderBusyError, RunLock
from mglightning.evaluation.settings import check_evaluation_settings
from mglightning.models.loading import ClassifierSource
from mglightning.modules.progress import EvaluationProgress


def _description(seed: int = 0, keep_maps: str | None = None) -> RunDescription:
    return RunDescription(
        classifier="c.ckpt", classifier_sha256=None, dataset="d", data_settings={}, test_set_size=4,
        planned_samples=4, explainers=(), attacks=(), metrics=(), rows=(), epsilons=(0.5,), target="prediction",
        seed=seed, warm_start=False, convexity_iterations=0, keep_maps=keep_maps,
    )


def _no_barrier(name: str) -> None:
    pass


def _contents(folder) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_a_run_folder_is_locked_described_and_released(tmp_path):
    folder = RunFolder(tmp_path, rank_zero=True)
    assert folder.open(_description(), overwrite=False, barrier=_no_barrier) == set()
    assert folder.checked
    assert RunDescription.load(tmp_path) == _description()
    with pytest.raises(RunFolderBusyError):  # held until released
        RunLock(tmp_path).acquire()
    folder.release()
    RunLock(tmp_path).acquire().release()
    # The same evaluation again: accepted, nothing recorded yet.
    again = RunFolder(tmp_path, rank_zero=True)
    assert again.open(_description(), overwrite=False, barrier=_no_barrier) == set()
    again.release()


@pytest.mark.parametrize("other", [_description(seed=1), _description(keep_maps="float16")],
                         ids=["other settings", "other stored maps"])
def test_a_refused_run_folder_is_left_as_it_was_and_unlocked(tmp_path, other):
    RunFolder(tmp_path, rank_zero=True).open(_description(), overwrite=False, barrier=_no_barrier)
    (tmp_path / ".lock").unlink(missing_ok=True)  # as if that run's process had ended
    before = _contents(tmp_path)
    refused = RunFolder(tmp_path, rank_zero=True)
    with pytest.raises(ValueError, match="seed" if other.seed else "keep_maps"):
        refused.open(other, overwrite=False, barrier=_no_barrier)
    assert not refused.checked
    assert _contents(tmp_path) == before
    RunLock(tmp_path).acquire().release()  # the refused run released its lock


def test_overwrite_moves_the_old_run_aside(tmp_path, capsys):
    RunFolder(tmp_path, rank_zero=True).open(_description(), overwrite=False, barrier=_no_barrier)
    (tmp_path / ".lock").unlink()
    folder = RunFolder(tmp_path, rank_zero=True)
    steps = []
    assert folder.open(_description(seed=1), overwrite=True, barrier=steps.append) == set()
    folder.release()
    assert steps == ["run folder locked", "run folder checked", "records read", "run described"]
    (aside,) = tmp_path.glob("replaced-*")
    assert RunDescription.load(aside).seed == 0 and RunDescription.load(tmp_path).seed == 1
    assert f"moved to {aside}" in capsys.readouterr().out


def test_the_weights_file_is_identified_by_its_sha256(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"weights" * 1000)
    assert file_sha256(path) == hashlib.sha256(b"weights" * 1000).hexdigest()
    assert file_sha256(tmp_path / "missing.pt") is None and file_sha256(None) is None
    assert weights_file(str(path)) == str(path)
    assert weights_file(ClassifierSource(arch="resnet18", weights=str(path))) == str(path)
    assert weights_file(ClassifierSource(arch="timm/resnet18", pretrained=True)) is None


def test_the_progress_callback_counts_rank_zero_samples_and_names_the_phase(capsys):
    progress = EvaluationProgress()
    pickle.dumps(progress)  # ddp_spawn sends the trainer, with its callbacks, to its processes
    trainer = SimpleNamespace(global_rank=0, world_size=2, is_global_zero=True)
    progress.on_test_start(trainer, SimpleNamespace(samples_to_evaluate=[0, 1, 2, 3, 5]))
    progress.describe("moreaugrad: topk attack at ε=0.5")
    progress.on_test_batch_end(trainer, None, None, (torch.zeros(2, 1, 4, 4), None, None), 0)
    assert progress.bar.n == 2 and progress.bar.total == 3
    progress.on_test_epoch_end(trainer, None)
    assert progress.bar is None
    err = capsys.readouterr().err
    assert "2/3 samples of rank 0 (1/2) · moreaugrad: topk attack at ε=0.5" in err


def test_the_evaluation_settings_are_checked_naming_the_setting():
    settings = dict(classifier="c.ckpt", explainer_labels=["a"], attack_labels=None, epsilon=[0.5, 1],
                    max_samples=None, bootstrap_samples=10, convexity_iterations=0, keep_maps=None,
                    keep_inputs=False)
    assert check_evaluation_settings(**settings) == [0.5, 1.0]
    for change, message in [({"classifier": None}, "No classifier"), ({"explainer_labels": []}, "explainer"),
                            ({"max_samples": 0}, "max_samples"), ({"convexity_iterations": True}, "convexity"),
                            ({"epsilon": [0.5, 0.50]}, "twice"), ({"keep_inputs": True}, "keep_maps"),
                            ({"attack_labels": []}, "at least one attack")]:
        with pytest.raises(ValueError, match=message):
            check_evaluation_settings(**{**settings, **change})
