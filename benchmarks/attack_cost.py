"""What MoreauGrad under attack costs: the paper's cold-start procedure against warm starts with early stopping.

For each MoreauGrad-family method (regularised mode) and each procedure, on the same samples and model, it runs
the evaluation of one budget as `evaluate.py` does: the clean map, the top-k attack (`attack_steps` steps, so
`attack_steps + 1` map evaluations) and the map of the attacked input, and records per image the gradient
evaluations (model input rows through a forward+backward) of each part, the wall time, and the three robustness
metrics (normalized distance, top-k intersection, SSIM) with 95% percentile bootstrap intervals (seeded).

Procedures:
  cold  the paper's: every Moreau solve starts from z_0 = x and runs all `num_steps` steps.
  fast  the fast evaluation preset: `tol` / `tol_window` early stopping (and `accelerate` if asked), each solve
        warm-started from the previous one: the attack's first solve from the clean map's solution, each attack
        step from the previous step's, the attacked map from the solution at the returned adversarial input.

The target of the issue: `fast` at most 0.2x the gradient evaluations of `cold`, with each metric's mean inside
the cold run's 95% interval (`within_cold_interval` in the output).

Example (the figures of docs/background/benchmarks.md; about 6 minutes on one CPU thread):
  OMP_NUM_THREADS=1 python benchmarks/attack_cost.py --threads 1
  python benchmarks/attack_cost.py --device cuda --samples 64 --num-steps 300 --noise-samples 32   # paper scale

Prints one JSON object on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mglightning import load_classifier  # noqa: E402
from mglightning.attacks import TopKInterpretationAttack  # noqa: E402
from mglightning.data import DigitsDataModule  # noqa: E402
from mglightning.data.evaluation import sample_seeds  # noqa: E402
from mglightning.explainers import build_explainer  # noqa: E402
from mglightning.metrics.functional import normalized_distance, saliency_ssim, topk_intersection  # noqa: E402
from mglightning.reporting.statistics import bootstrap_interval  # noqa: E402

METHODS = ("moreaugrad", "sparse_moreaugrad")
METRICS = {"distance": normalized_distance, "topk": topk_intersection, "ssim": saliency_ssim}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/digits/last.ckpt",
                        help="a digits classifier checkpoint (python train.py fit --config configs/digits.yaml)")
    parser.add_argument("--samples", type=int, default=16, help="first test samples of the digits split")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--epsilon", type=float, default=1.0, help="L2 budget in pixel units (eval_digits.yaml's)")
    parser.add_argument("--attack-steps", type=int, default=10, help="the paper's 10")
    parser.add_argument("--topk-fraction", type=float, default=0.4)
    parser.add_argument("--rho", type=float, default=1.0)
    parser.add_argument("--step-size", type=float, default=0.1)
    parser.add_argument("--num-steps", type=int, default=120, help="solver steps (the paper's 300)")
    parser.add_argument("--noise-std", type=float, default=0.1)
    parser.add_argument("--noise-samples", type=int, default=2, help="noise copies per step (the paper's 32)")
    parser.add_argument("--eta", type=float, default=5e-3, help="sparse_moreaugrad's L1 coefficient")
    parser.add_argument("--tol", type=float, default=0.03, help="the fast procedure's tolerance")
    parser.add_argument("--tol-window", type=int, default=10, help="the fast procedure's window (steps)")
    parser.add_argument("--accelerate", action="store_true", help="FISTA momentum in the fast procedure")
    parser.add_argument("--internal-batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--bootstrap-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="noise seeds and the bootstrap's")
    return parser.parse_args(argv)


def progress(message: str) -> None:
    """Progress goes to stderr, so stdout stays one JSON object."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def explainer_settings(args: argparse.Namespace, method: str, fast: bool) -> dict:
    settings = {
        "rho": args.rho,
        "step_size": args.step_size,
        "num_steps": args.num_steps,
        "noise_std": args.noise_std,
        "noise_samples": args.noise_samples,
        "internal_batch_size": args.internal_batch_size,
    }
    if method == "sparse_moreaugrad":
        settings["eta"] = args.eta
    if fast:
        settings.update(tol=args.tol, tol_window=args.tol_window, accelerate=args.accelerate)
    return settings


def run_procedure(args, model, images, target, seeds, method: str, fast: bool, device: torch.device) -> dict:
    """Clean map, attack and attacked map of every sample, batch by batch, with per-sample costs and metrics."""
    explainer = build_explainer(method, model, **explainer_settings(args, method, fast))
    attack = TopKInterpretationAttack(
        explainer, args.epsilon, num_steps=args.attack_steps, topk_fraction=args.topk_fraction, warm_start=fast
    )
    costs = {"clean_map": [], "attack": [], "attacked_map": []}
    metrics = {name: [] for name in METRICS}
    moved = []
    synchronize(device)
    start = time.perf_counter()
    for first in range(0, len(images), args.batch_size):
        batch = slice(first, first + args.batch_size)
        x, c, s = images[batch], target[batch], seeds[batch]
        explained = explainer.explain(x, c, seeds=s)
        clean = explained.attribution
        costs["clean_map"].append(explained.gradient_evaluations)
        result = attack.run(x, c, seeds=s, initial=explained.solution)
        batch_moved = result.moved
        costs["attack"].append(result.gradient_evaluations)
        attacked_explanation = explainer.explain(result.inputs, c, seeds=s, initial=result.solution)
        attacked = attacked_explanation.attribution
        costs["attacked_map"].append(attacked_explanation.gradient_evaluations)
        for name, metric in METRICS.items():
            metrics[name].append(metric(clean, attacked).cpu())
        moved.append(batch_moved.cpu())
        progress(f"{method} {'fast' if fast else 'cold'}: {min(first + args.batch_size, len(images))}/{len(images)}")
    synchronize(device)
    seconds = time.perf_counter() - start
    per_image = {part: torch.cat(values).double() for part, values in costs.items()}
    total = sum(per_image.values())
    result = {
        "settings": explainer_settings(args, method, fast),
        "warm_start": fast,
        "gradient_evaluations_per_image": {
            **{part: round(values.mean().item(), 1) for part, values in per_image.items()},
            "total": round(total.mean().item(), 1),
            "total_min": int(total.min()),
            "total_max": int(total.max()),
        },
        "wall_seconds": round(seconds, 2),
        "seconds_per_image": round(seconds / len(images), 4),
        "attack_success": round(torch.cat(moved).double().mean().item(), 4),
        "metrics": {},
    }
    for name, values in metrics.items():
        values = torch.cat(values).double().numpy()
        low, high = bootstrap_interval(values, args.bootstrap_samples, 0.95, args.seed)
        result["metrics"][name] = {"mean": round(float(values.mean()), 4), "ci95": [round(low, 4), round(high, 4)]}
    return result


def compare(cold: dict, fast: dict) -> dict:
    """The fast procedure's cost relative to the cold one and whether its metrics lie in the cold intervals."""
    ratio = fast["gradient_evaluations_per_image"]["total"] / cold["gradient_evaluations_per_image"]["total"]
    inside = {
        name: cold["metrics"][name]["ci95"][0] <= fast["metrics"][name]["mean"] <= cold["metrics"][name]["ci95"][1]
        for name in METRICS
    }
    return {
        "gradient_evaluations_ratio": round(ratio, 4),
        "wall_time_ratio": round(fast["wall_seconds"] / cold["wall_seconds"], 4),
        "within_cold_interval": inside,
        "target_met": ratio <= 0.2 and all(inside.values()),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = load_classifier(args.checkpoint).to(device)
    data = DigitsDataModule(image_size=32, seed=0)
    data.setup("test")
    if args.samples > len(data.test_dataset):
        raise ValueError(f"--samples {args.samples} exceeds the {len(data.test_dataset)} test samples.")
    indices = torch.arange(args.samples)
    images = torch.stack([data.test_dataset[i][0] for i in indices.tolist()]).to(device)
    with torch.no_grad():
        target = model(images).argmax(dim=1)
    seeds = sample_seeds(args.seed, indices)  # the evaluator's per-sample seeds

    report = {
        "machine": {
            "platform": platform.platform(),
            "nproc": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        },
        "arguments": vars(args),
        "methods": {},
    }
    for method in args.methods:
        cold = run_procedure(args, model, images, target, seeds, method, fast=False, device=device)
        fast = run_procedure(args, model, images, target, seeds, method, fast=True, device=device)
        report["methods"][method] = {"cold": cold, "fast": fast, "fast_vs_cold": compare(cold, fast)}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
