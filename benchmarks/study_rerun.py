"""Re-run one model of the CIFAR-10 study from its published weights and compare the records with the committed ones.

    python benchmarks/study_rerun.py --seed 0 --samples 2 --data-dir data/cifar10

Evaluates the first `--samples` test images with `configs/eval_cifar10_study.yaml` and the published
`checkpoints/cifar10_study/seed<k>.safetensors` (in a temporary folder, with a batch size of its own: a sample's
records do not depend on its batch), then compares every record column except the timings (`seconds_*`) with the
study's records of the same samples in `docs/results/cifar10_study/seed<k>/records/`. Prints one JSON object: the
columns compared, the number of records, the largest absolute difference of each numeric column and whether every
column is identical; exits 1 when one differs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mglightning.evaluation import read_records  # noqa: E402

STUDY = REPO / "docs" / "results" / "cifar10_study"
KEY = ["method", "attack", "index"]


def compare(committed, rerun) -> dict:
    columns = [column for column in committed.columns if not column.startswith("seconds_")]
    committed = committed[committed["index"].isin(rerun["index"].unique())]
    left = committed[columns].sort_values(KEY).reset_index(drop=True)
    right = rerun[columns].sort_values(KEY).reset_index(drop=True)
    result = {"records": len(right), "committed_records": len(left), "columns": columns, "max_abs_difference": {}}
    identical = len(left) == len(right) and len(right) > 0
    for column in columns if identical else []:
        a, b = left[column].to_numpy(), right[column].to_numpy()
        if a.dtype.kind in "fc":
            same = np.array_equal(a, b, equal_nan=True)
            finite = np.isfinite(a) & np.isfinite(b)
            result["max_abs_difference"][column] = float(np.abs(a[finite] - b[finite]).max()) if finite.any() else 0.0
        else:
            same = bool((a == b).all())
        identical &= same
    result["identical"] = bool(identical)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="which published model (0, 1 or 2)")
    parser.add_argument("--samples", type=int, default=2, help="the first this many test images")
    parser.add_argument("--data-dir", required=True, help="the folder holding cifar-10-batches-py/")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        command = [
            sys.executable, "evaluate.py", "--config", "configs/eval_cifar10_study.yaml",
            "--model.classifier.weights", f"checkpoints/cifar10_study/seed{args.seed}.safetensors",
            "--data.init_args.data_dir", args.data_dir, "--data.init_args.batch_size", str(args.samples),
            "--model.max_samples", str(args.samples), "--trainer.logger.init_args.save_dir", folder,
            "--trainer.logger.init_args.name", "rerun",
        ]
        subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        rerun = read_records(next(Path(folder, "rerun").glob("version_*")))
    result = compare(read_records(STUDY / f"seed{args.seed}"), rerun)
    result.update(seed=args.seed, samples=args.samples)
    print(json.dumps(result, indent=2))
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
