"""The evaluation's records do not change when the code is reorganised.

A small evaluation with every explainer (MoreauGrad family in plain and regularised mode, the `eta` search, CASO
and CAFO), every attack (own, exact, transfer, noise; cheap search with warm start), every metric (sanity and
fidelity included) and the convexity diagnostic, on a seeded random width-4 ResNet-18 and the bundled digits, is
compared with the records committed in `tests/data/records_reference.csv`, column by column. The timing columns
(`seconds_*`) are left out; keys, flags and evaluation counts must be equal, floats equal to 1e-6 relative: a
change of behaviour moves them by far more, and another CPU's kernels (the CI machine's) may move the last bits.
On one machine the comparison is bit for bit (`benchmarks/records_identity.py`, for the quickstart and the
patches testbed).

Write the reference again (only when a change of the records is intended, and say so in the commit):

    OMP_NUM_THREADS=1 python tests/test_records_identity.py --write
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evaluate  # noqa: E402
from mglightning.evaluation import read_records  # noqa: E402
from mglightning.models import create_model  # noqa: E402

REFERENCE = Path(__file__).resolve().parent / "data" / "records_reference.csv"
E = "mglightning.explainers."
EXPLAINERS = {
    "simple_gradient": {"class_path": E + "SimpleGradient"},
    "integrated_gradients": {"class_path": E + "IntegratedGradients", "init_args": {"n_steps": 4}},
    "smoothgrad": {"class_path": E + "SmoothGrad", "init_args": {"nt_samples": 3}},
    "sparsified_smoothgrad": {"class_path": E + "SparsifiedSmoothGrad", "init_args": {"nt_samples": 3}},
    "deeplift": {"class_path": E + "DeepLift"},
    "relex": {"class_path": E + "RelEx", "init_args": {"num_steps": 2, "noise_samples": 2}},
    "moreaugrad": {"class_path": E + "MoreauGrad",
                   "init_args": {"num_steps": 6, "noise_std": 0.1, "noise_samples": 2, "average_last": 2}},
    "moreaugrad_plain": {"class_path": E + "MoreauGrad", "init_args": {"num_steps": 6, "noise_std": 0.0}},
    "sparse_moreaugrad": {"class_path": E + "SparseMoreauGrad", "init_args": {"num_steps": 4, "noise_std": 0.0}},
    "sparse_moreaugrad_target": {"class_path": E + "SparseMoreauGrad",
                                 "init_args": {"num_steps": 4, "noise_std": 0.0, "target_zero_fraction": 0.5}},
    "group_sparse_moreaugrad": {"class_path": E + "GroupSparseMoreauGrad",
                                "init_args": {"num_steps": 4, "noise_std": 0.0, "group_size": 4}},
    "caso": {"class_path": E + "CASO", "init_args": {"lambda1": 0.0, "num_steps": 3}},
    "cafo": {"class_path": E + "CAFO", "init_args": {"lambda1": 0.0}},
}
TOPK = "mglightning.attacks.TopKInterpretationAttack"
# The cheap search with warm starts: the top-k attacks' own settings.
SEARCH = {"warm_start": True, "search_settings": {"num_steps": 3}}
ATTACKS = {
    "own": {"class_path": TOPK, "init_args": {"num_steps": 2, "topk_fraction": 0.4, "surrogate": "self", **SEARCH}},
    "exact": {"class_path": TOPK, "init_args": {"num_steps": 2, "topk_fraction": 0.4, "surrogate": "exact",
                                                "distinct_only": True, **SEARCH}},
    "transfer": {"class_path": TOPK, "init_args": {"num_steps": 2, "topk_fraction": 0.4,
                                                   "surrogate": "simple_gradient", "distinct_only": True, **SEARCH}},
    "noise": {"class_path": "mglightning.attacks.GaussianNoise"},
}
TIMINGS = ["seconds_clean", "seconds_attack", "seconds_attacked"]
KEYS = ["index", "method", "attack"]


def evaluate_small(out: Path) -> pd.DataFrame:
    """The small evaluation's records, without the timing columns, in a fixed order (one torch thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        weights = out / "resnet.pt"
        out.mkdir(parents=True, exist_ok=True)
        torch.save(create_model("resnet18", num_classes=10, image_size=16, in_chans=3, width=4).state_dict(), weights)
        classifier = out / "classifier.yaml"
        classifier.write_text(
            f"model:\n  classifier: {{arch: resnet18, weights: {weights}, model_kwargs: {{width: 4}}}}\n"
        )
        cli = evaluate.cli_main([
            "--config", str(ROOT / "configs" / "eval_digits.yaml"), "--config", str(classifier),
            "--data.init_args.image_size", "16", "--data.init_args.batch_size", "3",
            "--model.explainers", json.dumps(EXPLAINERS), "--model.attacks", json.dumps(ATTACKS),
            "--model.max_samples", "5", "--model.epsilon", "[0.3, 1.0]",
            "--model.bootstrap_samples", "50", "--model.convexity_iterations", "3", "--model.grid_samples", "0",
            "--trainer.accelerator", "cpu", "--trainer.logger.init_args.save_dir", str(out / "runs"),
        ])
    finally:
        torch.set_num_threads(threads)
    records = read_records(Path(cli.model.run_dir)).drop(columns=TIMINGS)
    return records.sort_values(KEYS, kind="stable").reset_index(drop=True)


def test_the_records_are_those_of_the_reference(tmp_path):
    records = evaluate_small(tmp_path)
    reference = pd.read_csv(REFERENCE, keep_default_na=False, na_values=[""])
    assert list(records.columns) == list(reference.columns)
    assert len(records) == len(reference)
    for column in records.columns:
        ours, theirs = records[column], reference[column]
        if pd.api.types.is_float_dtype(ours) or pd.api.types.is_float_dtype(theirs):
            ours, theirs = ours.astype(float).to_numpy(), theirs.astype(float).to_numpy()
            exact = column.startswith("evals_") or column in ("convex", "bound_holds")
            assert np.array_equal(np.isnan(ours), np.isnan(theirs)), column
            if exact:
                assert np.array_equal(ours, theirs, equal_nan=True), column
            else:
                np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-9, equal_nan=True, err_msg=column)
        else:
            assert ours.astype(str).tolist() == theirs.astype(str).tolist(), column


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: python tests/test_records_identity.py --write")
    with tempfile.TemporaryDirectory() as folder:
        frame = evaluate_small(Path(folder))
    REFERENCE.parent.mkdir(exist_ok=True)
    frame.to_csv(REFERENCE, index=False, float_format="%.17g")
    print(f"wrote {REFERENCE}: {len(frame)} records, {len(frame.columns)} columns")
