"""The evaluation at full cost against the cheap-search evaluation: same samples and seeds, JSON output.

Runs `evaluate.py` twice on the same config, checkpoint, samples and seeds:

  full   every attack searches with the explainers' own maps, cold (the overlay
         configs/presets/full_cost_search.yaml): the cost of the evaluation before the cheap search
  cheap  the config as it is (its top-k attacks' `warm_start` and `search_settings`: each attack step's MoreauGrad
         solve is short and warm-started); the reported maps are the explainers' own, cold, in both runs

and prints, per method, each run's gradient evaluations per image (model input rows through a forward+backward:
the clean map, every attack's search and every attacked map, from the records' `evals_*` columns) and seconds per
image, and the paired difference cheap - full of each sample's worst-case top-k intersection over the attacks,
with its paired 95% percentile bootstrap interval (resampling samples, seeded). `accepted` says whether every
method's mean difference is at most `--tolerance` (0.01) and its interval inside +-`--interval-bound` (0.02).

The full run's `evals_attacked` of a sample that no attack moved is 0 here (its attacked map is the clean map,
not computed again); the evaluation before this change (commit b9c0d88) computed that map again, which the
`evals_per_image_recomputing_unmoved` figure adds back (the clean map's cost per such sample and attack).

Examples (docs/background/benchmarks.md):
  OMP_NUM_THREADS=1 python benchmarks/evaluation_cost.py --config configs/eval_patches.yaml \\
      --ckpt-path checkpoints/patches/last.ckpt --epsilon 0.738 --samples 32
  OMP_NUM_THREADS=1 python benchmarks/evaluation_cost.py --config configs/eval_digits.yaml \\
      --ckpt-path checkpoints/digits/last.ckpt --samples 16

Prints one JSON object on stdout and writes it to `--output` (default benchmarks/results/evaluation_cost_<config
stem>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import evaluate  # noqa: E402
from mglightning.evaluation import RunDescription, read_records  # noqa: E402
from mglightning.reporting.statistics import bootstrap_interval, worst_case  # noqa: E402

RUNS = {"full": ["--config", str(ROOT / "configs" / "presets" / "full_cost_search.yaml")], "cheap": []}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="an evaluation config, e.g. configs/eval_patches.yaml")
    parser.add_argument("--ckpt-path", required=True, help="the classifier checkpoint")
    parser.add_argument("--samples", type=int, default=None, help="first test samples (default: the config's)")
    parser.add_argument("--epsilon", type=float, default=None, help="one budget (default: the config's)")
    parser.add_argument("--explainers", nargs="+", default=None,
                        help="evaluate only these explainer labels of the config (default: all)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="further evaluate.py arguments for both runs (last on the line)")
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--interval-bound", type=float, default=0.02)
    parser.add_argument("--resamples", type=int, default=10000, help="bootstrap resamples of the paired interval")
    parser.add_argument("--full-run", default=None,
                        help="an existing run folder of the full-cost evaluation (same config, samples and seeds) to "
                             "compare with instead of running it again")
    parser.add_argument("--workdir", default=None, help="where the two run folders go (default: a temporary one)")
    parser.add_argument("--output", default=None, help="the JSON file (default benchmarks/results/...)")
    return parser.parse_args(argv)


def evaluation_args(args: argparse.Namespace, out: Path) -> list[str]:
    extra = ["--config", args.config, "--ckpt_path", args.ckpt_path, "--trainer.logger.init_args.save_dir", str(out),
             "--trainer.accelerator", "cpu"]
    if args.samples is not None:
        extra += ["--model.max_samples", str(args.samples)]
    if args.epsilon is not None:
        extra += ["--model.epsilon", str(args.epsilon)]
    if args.explainers:
        import yaml

        config = yaml.safe_load(Path(args.config).read_text())
        explainers = config["model"]["explainers"]
        missing = sorted(set(args.explainers) - set(explainers))
        if missing:
            raise SystemExit(f"--explainers {missing} are not explainers of {args.config} ({', '.join(explainers)}).")
        extra += ["--model.explainers", json.dumps({k: explainers[k] for k in args.explainers})]
    return extra + list(args.extra)


def load(run_dir: Path, seconds: float | None) -> dict:
    return {"run_dir": run_dir, "seconds": seconds, "records": read_records(run_dir),
            "description": RunDescription.load(run_dir)}


def full_run(run_dir: Path) -> dict:
    """A run folder given with --full-run, checked to be the full-cost evaluation."""
    part = load(run_dir, None)
    searched = [spec.label for spec in part["description"].attacks if spec.settings.get("search_settings")]
    if part["description"].warm_start or searched:
        raise SystemExit(f"--full-run {run_dir} is not a full-cost run (warm_start or search_settings {searched}).")
    return part


def run(args: argparse.Namespace, name: str, workdir: Path) -> dict:
    out = workdir / name
    started = time.perf_counter()
    cli = evaluate.cli_main(evaluation_args(args, out) + RUNS[name])
    seconds = time.perf_counter() - started
    return load(Path(cli.model.run_dir), seconds)


def costs(part) -> dict:
    """Per method: gradient evaluations and seconds per image (clean map once, every attack and attacked map)."""
    result = {}
    for method, rows in part["records"].groupby("method", sort=False):
        per_sample = rows.groupby("index")
        clean = per_sample["evals_clean"].first()
        total = clean + per_sample["evals_attack"].sum() + per_sample["evals_attacked"].sum()
        unmoved_recomputed = rows.loc[rows["evals_attacked"] == 0, "evals_clean"].groupby(rows["index"]).sum()
        seconds = (per_sample["seconds_clean"].first() + per_sample["seconds_attack"].sum()
                   + per_sample["seconds_attacked"].sum())
        result[method] = {
            "evals_per_image": float(total.mean()),
            "evals_per_image_recomputing_unmoved": float(total.add(unmoved_recomputed, fill_value=0).mean()),
            "evals_clean": float(clean.mean()),
            "evals_attack": {attack: float(group["evals_attack"].mean())
                             for attack, group in rows.groupby("attack", sort=False)},
            "evals_attacked": {attack: float(group["evals_attacked"].mean())
                               for attack, group in rows.groupby("attack", sort=False)},
            "seconds_per_image": float(seconds.mean()),
        }
    return result


def worst_topk(part) -> dict:
    combined = worst_case(part["records"], part["description"])
    return {method: rows.set_index("index")["topk"].sort_index() for method, rows in combined.groupby("method")}


def compare(full: dict, cheap: dict, args: argparse.Namespace) -> dict:
    full_topk, cheap_topk = worst_topk(full), worst_topk(cheap)
    methods = {}
    for method, reference in full_topk.items():
        difference = (cheap_topk[method] - reference).dropna()
        values = difference.to_numpy(dtype="float64")
        low, high = bootstrap_interval(values, resamples=args.resamples, seed=0)
        mean = float(values.mean())
        methods[method] = {
            "samples": len(values),
            "worst_topk_full": float(reference.mean()),
            "worst_topk_cheap": float(cheap_topk[method].mean()),
            "difference": mean,
            "difference_ci95": [float(low), float(high)],
            "accepted": bool(abs(mean) <= args.tolerance
                             and -args.interval_bound <= low and high <= args.interval_bound),
        }
    return methods


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="evaluation_cost_"))
    runs = {name: full_run(Path(args.full_run)) if name == "full" and args.full_run else run(args, name, workdir)
            for name in RUNS}
    full_costs, cheap_costs = costs(runs["full"]), costs(runs["cheap"])
    family = [spec.label for spec in runs["full"]["description"].explainers if spec.family == "moreaugrad"]
    rows = [row for row in runs["full"]["description"].rows if row.label in family]
    family_full = sum(full_costs[row.method]["evals_per_image"] for row in rows)
    family_full_old = sum(full_costs[row.method]["evals_per_image_recomputing_unmoved"] for row in rows)
    family_cheap = sum(cheap_costs[row.method]["evals_per_image"] for row in rows)
    equivalence = compare(runs["full"], runs["cheap"], args)
    report = {
        "config": args.config,
        "checkpoint": args.ckpt_path,
        "samples": int(runs["full"]["description"].planned_samples),
        "epsilons": list(runs["full"]["description"].epsilons),
        "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_at_end": list(os.getloadavg()),
        "seconds": {name: None if part["seconds"] is None else round(part["seconds"], 1)
                    for name, part in runs.items()},
        "evals": {"full": full_costs, "cheap": cheap_costs},
        "moreaugrad_family": {
            "methods": [row.method for row in rows],
            "evals_per_image_full": family_full,
            "evals_per_image_full_recomputing_unmoved": family_full_old,
            "evals_per_image_cheap": family_cheap,
            "ratio": family_cheap / family_full if family_full else None,
            "ratio_to_recomputing_unmoved": family_cheap / family_full_old if family_full_old else None,
        },
        "worst_case_topk": equivalence,
        "accepted": all(item["accepted"] for item in equivalence.values()),
        "run_dirs": {name: str(part["run_dir"]) for name, part in runs.items()},
    }
    text = json.dumps(report, indent=2)
    print(text)
    default = ROOT / "benchmarks" / "results" / f"evaluation_cost_{Path(args.config).stem}.json"
    output = Path(args.output) if args.output else default
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text + "\n")
    print(f"written to {output}", file=sys.stderr)
    return report


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
