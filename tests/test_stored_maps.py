"""Stored maps (`model.keep_maps`): written per batch before the records, found exactly once per record key after a
killed run is resumed, and metrics added after the run from them (`evaluate.py report --metrics`) equal the same
metrics computed during the run."""

import hashlib
import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

import evaluate
from mglightning.evaluation import BatchMaps, MapWriter, NotStoredError, load_maps, read_records
from mglightning.evaluation.added import NotStored
from mglightning.metrics import MapBatch, SampleMetric
from mglightning.metrics.functional import saliency_ssim
from test_evaluate import (  # noqa: F401
    FEW_EXPLAINERS,
    _kill_after_first_batch,
    _start,
    checkpoint,
    eval_args,
    only_run,
    results_of,
)

KEYS = ["method", "attack", "index"]
E = "mglightning.explainers."
M = "mglightning.metrics."
TOPK_ONLY = json.dumps({"topk": {"class_path": M + "TopKIntersection"}})
IN_RUN = json.dumps({"topk": {"class_path": M + "TopKIntersection"}, "ssim": {"class_path": M + "SaliencySSIM"},
                     "sparsity": {"class_path": M + "Sparsity"}})
ADDED = "{ssim: {class_path: mglightning.metrics.SaliencySSIM}, sparsity: {class_path: mglightning.metrics.Sparsity}}"
SAMPLES = ["--model.max_samples", "5"]
FIDELITY = "{fidelity: {class_path: mglightning.metrics.DeletionInsertionAUC, init_args: {steps: 4}}}"


class InputWeightedShift(SampleMetric):
    """A test metric that reads the inputs: the attacked map's mass on bright pixels of the attacked input."""

    outputs = {"bright_mass": None}

    def measure(self, batch: MapBatch) -> dict:
        return {"bright_mass": (batch.attacked.abs() * (batch.attacked_inputs > 0.5)).flatten(1).sum(dim=1)}


@pytest.fixture(scope="module")
def in_run(checkpoint, tmp_path_factory) -> Path:
    """A run that computed top-k, SSIM and sparsity during the evaluation and stored no maps."""
    out = tmp_path_factory.mktemp("in_run")
    evaluate.cli_main(eval_args(checkpoint, out, *SAMPLES, "--model.metrics", IN_RUN, explainers=FEW_EXPLAINERS))
    return only_run(out)


def _folder_digest(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


# Measured: float32 storage gives the in-run values exactly; float16 within 5e-6 (SSIM) and 1.2e-5 (Gini).
@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-6), ("float16", 1e-4)])
def test_a_metric_added_from_stored_maps_equals_the_same_metric_computed_in_the_run(
    checkpoint, in_run, tmp_path, capsys, dtype, tolerance
):
    """A run with top-k only and stored maps, then `report --metrics` adds SSIM and sparsity: per record they equal
    a run that computed them during the evaluation (float32 storage: to float round-off; float16: to its 2^-11
    relative precision), and the run's records are not rewritten."""
    cli = evaluate.cli_main(eval_args(checkpoint, tmp_path, *SAMPLES, "--model.metrics", TOPK_ONLY,
                                      "--model.keep_maps", dtype, explainers=FEW_EXPLAINERS))
    run_dir = Path(cli.model.run_dir)
    records_before = _folder_digest(run_dir / "records")
    capsys.readouterr()
    evaluate.cli_main(["report", str(run_dir), "--metrics", ADDED])
    printed = capsys.readouterr().out
    assert _folder_digest(run_dir / "records") == records_before
    assert "| SSIM ↑ [95% CI] |" in printed and "| Gini |" in printed and "added/): sparsity, ssim" in printed

    added = read_records(run_dir)[KEYS + ["topk"]]
    for label in ("ssim", "sparsity"):
        added = added.merge(pd.read_parquet(run_dir / "added" / f"{label}.parquet"), on=KEYS, validate="one_to_one")
    reference = read_records(in_run)
    assert len(added) == len(reference) == 5 * 3
    compared = added.merge(reference, on=KEYS, suffixes=("", "_in_run"), validate="one_to_one")
    # Storing maps changes no record.
    assert (compared["topk"] - compared["topk_in_run"]).abs().max() < 1e-12
    for column in ("ssim", "gini", "zero_fraction"):
        assert (compared[column] - compared[f"{column}_in_run"]).abs().max() <= tolerance, column
    assert compared["ssim"].std() > 0  # the values are not all the same (a comparison that cannot fail)

    # The results rows carry the added columns, and a plain `report` keeps them.
    evaluate.cli_main(["report", str(run_dir)])
    ours, theirs = results_of(run_dir), results_of(in_run)
    for method in theirs:
        for column in ("topk", "ssim", "gini"):
            assert ours[method][column] == pytest.approx(theirs[method][column], abs=tolerance)
    assert [metric["label"] for metric in json.loads((run_dir / "results.json").read_text())["run_info"]["metrics"]] \
        == ["topk", "sparsity", "ssim"]


def _unrecord_newest_batch(run_dir: Path) -> set[int]:
    """Remove the newest batch's records, leaving its maps (what a kill between the two writes leaves), and add
    noise to those maps, so that a reader that took them instead of the re-evaluated ones would show."""
    from safetensors import safe_open

    newest = max((run_dir / "records").glob("*.parquet"), key=lambda path: int(path.name.split("-")[1]))
    unrecorded = set(pd.read_parquet(newest)["index"])
    newest.unlink()
    (stale,) = [path for path in (run_dir / "maps").glob("*.safetensors")
                if set(load_file(path)["index"].tolist()) == unrecorded]
    with safe_open(str(stale), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = {name: value if name == "index" or name.endswith(".scale") else value + torch.randn_like(value)
               for name, value in load_file(stale).items()}
    save_file(tensors, stale, metadata=metadata)
    return unrecorded


def _check_once(run_dir: Path, unrecorded: set[int], samples: int):
    """The unrecorded batch's samples have two maps files; the loader returns each record's maps exactly once."""
    copies = pd.Series([index for path in (run_dir / "maps").glob("*.safetensors")
                        for index in load_file(path)["index"].tolist()]).value_counts()
    # (a kill between a batch's two writes may have left another such batch)
    assert unrecorded <= set(copies[copies > 1].index), "the unrecorded batch was evaluated again"
    stored = load_maps(run_dir)
    records = read_records(run_dir)
    assert len(records) == samples * 3
    pd.testing.assert_frame_equal(stored.keys[KEYS], records[KEYS])  # every record's maps, once, in its order
    return stored, records


def test_a_batch_with_maps_but_no_records_is_evaluated_again_and_its_maps_found_once(checkpoint, tmp_path):
    """A finished run loses its newest batch's records (its maps stay, altered); `--resume` evaluates that batch
    again, and every record's maps (clean, attacked, inputs, attacked inputs) are found exactly once, equal to
    those of the finished run."""
    args = eval_args(checkpoint, tmp_path, "--data.init_args.batch_size", "2", "--model.max_samples", "6",
                     "--model.keep_maps", "float32", "--model.keep_inputs", "true", "--model.metrics", IN_RUN,
                     explainers=FEW_EXPLAINERS)
    run_dir = Path(evaluate.cli_main(args).model.run_dir)
    finished = load_maps(run_dir)
    unrecorded = _unrecord_newest_batch(run_dir)
    evaluate.cli_main([*args, "--resume", str(run_dir)])
    stored, records = _check_once(run_dir, unrecorded, samples=6)
    assert stored.keys[KEYS].equals(finished.keys[KEYS])
    for name in ("clean", "attacked", "inputs", "attacked_inputs"):
        torch.testing.assert_close(getattr(stored, name), getattr(finished, name), atol=1e-6, rtol=1e-5, msg=name)

    # With the inputs stored, a metric that reads them is computed post hoc, equal to the same computation on the
    # loaded maps; filters by method and attack select those rows.
    spec = json.dumps({"bright_mass": {"class_path": "test_stored_maps.InputWeightedShift"}})
    evaluate.cli_main(["report", str(run_dir), "--metrics", spec])
    with pytest.raises(NotStoredError, match="'fidelity' .DeletionInsertionAUC. cannot be computed.*runs the model"):
        evaluate.cli_main(["report", str(run_dir), "--metrics", FIDELITY])
    moreau = load_maps(run_dir, method="moreaugrad", attack="topk")
    assert set(moreau.keys["method"]) == {"moreaugrad"} and len(moreau) == 6
    values = moreau.keys[KEYS].merge(pd.read_parquet(run_dir / "added" / "bright_mass.parquet"), on=KEYS)
    expected = (moreau.attacked.abs() * (moreau.attacked_inputs > 0.5)).flatten(1).sum(dim=1)
    measured = torch.tensor(values["bright_mass"].to_list(), dtype=torch.float64)
    assert torch.allclose(measured, expected.double(), atol=1e-9)
    assert expected.std() > 0


# ~30 s; covered without it by the test above (a batch with maps but no records) and by test_evaluate.py's killed
# runs, which store maps and check that every record's are found once.
@pytest.mark.slow
def test_a_killed_run_resumes_with_the_maps_of_every_sample_exactly_once(checkpoint, tmp_path):
    """Kill a float16 run after its first recorded batch, unrecord its newest batch as above, `--resume`: every
    record's maps are found exactly once, and they are the maps its values were measured on."""
    common = ["--data.init_args.batch_size", "2", "--model.max_samples", "6", "--model.keep_maps", "float16"]
    out = tmp_path / "killed"
    process = _start(eval_args(checkpoint, out, *common, explainers=FEW_EXPLAINERS), tmp_path)
    _kill_after_first_batch(process, out)
    run_dir = only_run(out)
    assert not (run_dir / "results.json").exists(), "killed too late: the run had already finished"
    unrecorded = _unrecord_newest_batch(run_dir)
    evaluate.cli_main(eval_args(checkpoint, out, *common, "--resume", str(run_dir), explainers=FEW_EXPLAINERS))
    stored, records = _check_once(run_dir, unrecorded, samples=6)
    ssim = saliency_ssim(stored.clean, stored.attacked).double()
    assert torch.allclose(ssim, torch.tensor(records["ssim"].to_list(), dtype=torch.float64), atol=1e-4)
    assert ssim.std() > 0


def test_a_resume_must_keep_the_maps_setting(checkpoint, tmp_path):
    """Storing maps changes no record, so it is not in the fingerprint; but turning it on (or off, or changing the
    dtype) when resuming would leave recorded samples without maps: refused, with nothing changed."""
    args = eval_args(checkpoint, tmp_path, "--model.max_samples", "2", "--model.keep_maps", "float16",
                     explainers=json.dumps({"simple_gradient": {"class_path": E + "SimpleGradient"}}))
    run_dir = Path(evaluate.cli_main(args).model.run_dir)
    before = _folder_digest(run_dir)
    for changed in (["--model.keep_maps", "null"], ["--model.keep_maps", "float32"], ["--model.keep_inputs", "true"]):
        with pytest.raises(ValueError, match="started with keep_maps=float16, keep_inputs=False.*Nothing in it"):
            evaluate.cli_main([*args, *changed, "--resume", str(run_dir)])
        assert _folder_digest(run_dir) == before
    fingerprint = json.loads((run_dir / "run.json").read_text())["fingerprint"]
    from mglightning.evaluation import RunDescription

    assert RunDescription.load(run_dir).fingerprint == fingerprint
    with pytest.raises(ValueError, match="keep_inputs stores the inputs beside the maps"):
        evaluate.cli_main([*args[:-2], "--model.keep_maps", "null", "--model.keep_inputs", "true"])


def test_metrics_that_need_what_was_not_stored_are_refused_clearly(checkpoint, in_run, tmp_path):
    with pytest.raises(ValueError, match="holds no stored maps.*keep_maps"):
        evaluate.cli_main(["report", str(in_run), "--metrics", ADDED])
    assert not (in_run / "added").exists()

    cli = evaluate.cli_main(eval_args(checkpoint, tmp_path, "--model.max_samples", "2", "--model.keep_maps", "float16",
                                      "--model.metrics", TOPK_ONLY, explainers=FEW_EXPLAINERS))
    run_dir = Path(cli.model.run_dir)
    with pytest.raises(ValueError, match="'fidelity' .DeletionInsertionAUC. failed on the stored maps.*not the model, "
                                         "the explainer and the inputs"):
        evaluate.cli_main(["report", str(run_dir), "--metrics", FIDELITY])
    spec = json.dumps({"bright_mass": {"class_path": "test_stored_maps.InputWeightedShift"}})
    with pytest.raises(NotStoredError, match="reads the inputs.*keep_inputs: true"):
        evaluate.cli_main(["report", str(run_dir), "--metrics", spec])
    with pytest.raises(ValueError, match="column 'topk' is already one of the run's metrics"):
        evaluate.cli_main(["report", str(run_dir), "--metrics", TOPK_ONLY])
    with pytest.raises(ValueError, match="fraktion"):  # checked as model.metrics are
        evaluate.cli_main(["report", str(run_dir), "--metrics",
                           "{k: {class_path: mglightning.metrics.TopKIntersection, init_args: {fraktion: 0.3}}}"])
    assert not (run_dir / "added").exists()
    # A YAML file works as well as a string.
    (tmp_path / "added.yaml").write_text("ssim:\n  class_path: mglightning.metrics.SaliencySSIM\n")
    evaluate.cli_main(["report", str(run_dir), "--metrics", str(tmp_path / "added.yaml")])
    assert "ssim" in results_of(run_dir)["moreaugrad"]


def test_an_added_metric_that_lacks_records_is_left_out_with_the_command_to_recompute_it(checkpoint, tmp_path, capsys):
    """Added to a stopped run, then the run went on: the added values cover only some records, so the report
    leaves that metric out rather than average it over a subset."""
    args = eval_args(checkpoint, tmp_path, "--model.max_samples", "2", "--model.keep_maps", "float16",
                     "--model.metrics", TOPK_ONLY, explainers=FEW_EXPLAINERS)
    run_dir = Path(evaluate.cli_main(args).model.run_dir)
    evaluate.cli_main(["report", str(run_dir), "--metrics", "{ssim: {class_path: mglightning.metrics.SaliencySSIM}}"])
    added = run_dir / "added" / "ssim.parquet"
    pq.write_table(pq.read_table(added).slice(1), added)  # as if one record had come after it
    capsys.readouterr()
    evaluate.cli_main(["report", str(run_dir)])
    printed = capsys.readouterr().out
    assert "added/ssim.parquet lacks 1 of the 6 records" in printed and "--metrics '{\"ssim\"" in printed
    assert "ssim" not in results_of(run_dir)["moreaugrad"]


def test_float16_maps_keep_their_relative_precision_at_any_scale(tmp_path):
    """float16 files store each map over its largest magnitude: maps of magnitude 1e-9 (below float16's range) and
    1e6 (above it) come back to 2^-11 of their maximum, exact zeros stay zero, float32 files are exact."""
    torch.manual_seed(0)
    maps = torch.randn(3, 3, 8, 8) * torch.tensor([1e-9, 1.0, 1e6]).view(3, 1, 1, 1)
    maps[:, 0] = 0.0
    for dtype, tolerance in (("float16", 2.0**-11), ("float32", 0.0)):
        batch = BatchMaps(torch.arange(3), clean={"sg": maps}, attacked={("sg", "topk"): -maps}, methods={"sg": "sg"})
        path = MapWriter(tmp_path / dtype, rank=0, dtype=dtype).write(batch)
        tensors = load_file(path)
        clean = tensors["clean/sg"].float()
        if dtype == "float16":
            clean = clean * tensors["clean/sg.scale"].view(-1, 1, 1, 1)
        error = (clean - maps).abs().flatten(1).amax(dim=1) / maps.abs().flatten(1).amax(dim=1)
        assert (error <= tolerance).all(), (dtype, error)
        assert (clean[:, 0] == 0).all()
    with pytest.raises(ValueError, match="keep_maps must be one of"):
        MapWriter(tmp_path, rank=0, dtype="bfloat16")


def test_what_was_not_stored_refuses_every_use_by_name():
    missing = NotStored("it reads the inputs, which this run did not store")
    uses = [lambda: missing(torch.zeros(1)), lambda: missing.shape, lambda: missing[0], lambda: missing * 2,
            lambda: torch.zeros(1) + missing, lambda: torch.cat([missing]), lambda: torch.nn.functional.relu(missing),
            lambda: missing > 0.5]
    for use in uses:
        with pytest.raises(NotStoredError, match="reads the inputs"):
            use()
