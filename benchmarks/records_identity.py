"""Two evaluation run folders' records compared bit for bit: the check that a reorganisation changed no result.

Run the same evaluation before and after a change (same config, checkpoint, samples and seeds, same machine and
torch threads), then compare the two run folders:

  OMP_NUM_THREADS=1 python evaluate.py --config configs/eval_digits.yaml --ckpt_path checkpoints/digits/last.ckpt
  ... (check out the other commit, run it again) ...
  python benchmarks/records_identity.py logs/eval_digits/version_0 logs/eval_digits/version_1

Every record column but the timings (`seconds_*`) must be equal, floats bit for bit (NaN equal to NaN), and so
must every stored map (`maps/`, when the runs stored them) and the results' values and intervals (`results.json`,
everything but the run's description). Prints one JSON object: `identical`, the number of records, and the
columns, maps and results that differ with their largest difference. Exits 1 when they differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from mglightning.evaluation import read_records  # noqa: E402

TIMINGS = ("seconds_clean", "seconds_attack", "seconds_attacked")
KEYS = ["index", "method", "attack"]


def _largest_difference(first, second) -> float | None:
    try:
        a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    except (TypeError, ValueError):
        return None
    finite = np.isfinite(a) & np.isfinite(b)
    return float(np.abs(a[finite] - b[finite]).max()) if finite.any() else None


def compare_records(first: Path, second: Path) -> dict:
    a = read_records(first).drop(columns=list(TIMINGS)).sort_values(KEYS, kind="stable").reset_index(drop=True)
    b = read_records(second).drop(columns=list(TIMINGS)).sort_values(KEYS, kind="stable").reset_index(drop=True)
    if list(a.columns) != list(b.columns) or len(a) != len(b):
        return {"records": [len(a), len(b)], "columns": [list(a.columns), list(b.columns)], "differ": ["shape"]}
    differ = {}
    for column in a.columns:
        x, y = a[column].to_numpy(), b[column].to_numpy()
        if x.dtype.kind == "f" or y.dtype.kind == "f":
            same = np.array_equal(x.astype(float), y.astype(float), equal_nan=True)
        else:
            same = x.tolist() == y.tolist()
        if not same:
            differ[column] = _largest_difference(x, y)
    return {"records": len(a), "differ": differ}


def compare_maps(first: Path, second: Path) -> dict:
    files_a = sorted(p.relative_to(first) for p in (first / "maps").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(second) for p in (second / "maps").rglob("*") if p.is_file())
    if files_a != files_b:
        return {"files": [len(files_a), len(files_b)], "differ": ["file list"]}
    differ = [str(name) for name in files_a if (first / name).read_bytes() != (second / name).read_bytes()]
    return {"files": len(files_a), "differ": differ}


def compare_results(first: Path, second: Path) -> dict:
    a = json.loads((first / "results.json").read_text())["results"]
    b = json.loads((second / "results.json").read_text())["results"]
    timing = ("seconds", "rows_per_second")
    differ = []

    def walk(x, y, path):
        if isinstance(x, dict) and isinstance(y, dict):
            if set(x) != set(y):
                differ.append(path + " (keys)")
                return
            for key in x:
                if not any(word in key for word in timing):
                    walk(x[key], y[key], f"{path}.{key}" if path else key)
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{path}[{i}]")
        elif x != y and not (isinstance(x, float) and isinstance(y, float) and np.isnan(x) and np.isnan(y)):
            differ.append(path)

    walk(a, b, "")
    return {"differ": differ}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", type=Path, help="a run folder (with run.json and records/)")
    parser.add_argument("second", type=Path, help="the run folder to compare it with")
    arguments = parser.parse_args(argv)
    for folder in (arguments.first, arguments.second):
        if not (folder / "run.json").is_file():
            parser.error(f"{folder} is not an evaluation run folder (no run.json); give the folder evaluate.py printed.")
    report = {
        "first": str(arguments.first),
        "second": str(arguments.second),
        "records": compare_records(arguments.first, arguments.second),
        "maps": compare_maps(arguments.first, arguments.second),
        "results": compare_results(arguments.first, arguments.second),
    }
    report["identical"] = not any(report[part]["differ"] for part in ("records", "maps", "results"))
    print(json.dumps(report, indent=1))
    return 0 if report["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
