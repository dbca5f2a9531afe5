"""How much each attack moves a MoreauGrad map: the official stand-in, the implicit ("exact") derivative, the simple
gradient.

On the same samples, seeds, model and budget, the L2 top-k attack (`TopKInterpretationAttack`) runs three ways
against one MoreauGrad-family explainer:

  surrogate        `surrogate="self"`: the official code's stand-in `1[d != 0] * |grad f_c(x + d)|` (the paper's
                   procedure, the evaluation's default).
  exact            `surrogate="exact"`: the map itself, differentiated implicitly through the solver's fixed
                   point (conjugate gradients on Hessian-vector products, `mglightning.explainers.implicit`).
  simple_gradient  `surrogate="simple_gradient"`: transfer from the simple gradient of the same model.

For each, the attacked input's map is computed by the explainer itself (same seeds, cold start, as the evaluation
does), and compared with the clean map: per-sample top-k intersection (fraction 0.4) and normalized distance, with
95% percentile bootstrap intervals (seeded) of the means and of the paired differences `exact - surrogate` and
`exact - simple_gradient` (a negative top-k difference: the exact attack moves the map more); `--exact-draws 32`
adds the exact attack with its Hessian averaged over 32 noise draws (`graph_noise_samples`). Also the attacks'
gradient evaluations per image (the exact attack's include its Hessian-vector products) and the share of samples
moved.

Defaults: the photo-patches testbed with `configs/eval_patches.yaml`'s MoreauGrad settings and the paper's budget 3
(0.738 pixels), its first 32 test samples. About 20 minutes on one CPU thread:
  python train.py fit --config configs/patches.yaml
  OMP_NUM_THREADS=1 python benchmarks/exact_attack.py --threads 1

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
from mglightning.data.evaluation import sample_seeds  # noqa: E402
from mglightning.explainers import build_explainer  # noqa: E402
from mglightning.metrics.functional import normalized_distance, topk_intersection  # noqa: E402
from mglightning.reporting.statistics import bootstrap_interval  # noqa: E402

ATTACKS = {"surrogate": "self", "exact": "exact", "simple_gradient": "simple_gradient"}
METHODS = ("moreaugrad", "sparse_moreaugrad", "group_sparse_moreaugrad")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/patches/last.ckpt")
    parser.add_argument("--data", default="patches", choices=("patches", "digits"),
                        help="the test set the checkpoint was trained for")
    parser.add_argument("--samples", type=int, default=32, help="first test samples (eval_patches.yaml's 32)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--method", default="moreaugrad", choices=METHODS)
    parser.add_argument("--epsilon", type=float, default=0.738, help="L2 budget in pixels (the paper's 3 on patches)")
    parser.add_argument("--attack-steps", type=int, default=10)
    parser.add_argument("--topk-fraction", type=float, default=0.4)
    parser.add_argument("--rho", type=float, default=0.0606, help="eval_patches.yaml's (the official 1 in pixels)")
    parser.add_argument("--step-size", type=float, default=0.00606)
    parser.add_argument("--num-steps", type=int, default=50)
    parser.add_argument("--noise-std", type=float, default=0.1)
    parser.add_argument("--noise-samples", type=int, default=4)
    parser.add_argument("--eta", type=float, default=None,
                        help="sparse variants' eta (default eval_patches.yaml's: 0.0203 sparse, 0.203 group)")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--graph-tol", type=float, default=1e-3, help="the exact attack's CG tolerance")
    parser.add_argument("--graph-max-iter", type=int, default=100, help="the exact attack's most CG iterations")
    parser.add_argument("--exact-draws", type=int, nargs="*", default=[],
                        help="also run the exact attack with its Hessian averaged over this many noise draws "
                             "(graph_noise_samples; the default exact attack uses --noise-samples)")
    parser.add_argument("--internal-batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--bootstrap-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="the evaluation's seed (noise seeds, bootstrap)")
    return parser.parse_args(argv)


def progress(message: str) -> None:
    """Progress goes to stderr, so stdout stays one JSON object."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def explainer_settings(args: argparse.Namespace) -> dict:
    settings = {
        "rho": args.rho, "step_size": args.step_size, "num_steps": args.num_steps, "noise_std": args.noise_std,
        "noise_samples": args.noise_samples, "internal_batch_size": args.internal_batch_size,
        "graph_tol": args.graph_tol, "graph_max_iter": args.graph_max_iter,
    }
    if args.method == "sparse_moreaugrad":
        settings["eta"] = 0.0203 if args.eta is None else args.eta
    if args.method == "group_sparse_moreaugrad":
        settings.update(eta=0.203 if args.eta is None else args.eta, group_size=args.group_size)
    return settings


def load_test_images(args: argparse.Namespace) -> torch.Tensor:
    if args.data == "patches":
        from mglightning.data.photo_patches import PhotoPatchesDataModule

        data = PhotoPatchesDataModule()
    else:
        from mglightning.data import DigitsDataModule

        data = DigitsDataModule(image_size=32, seed=0)
    data.setup("test")
    if args.samples > len(data.test_dataset):
        raise ValueError(f"--samples {args.samples} exceeds the {len(data.test_dataset)} test samples.")
    return torch.stack([data.test_dataset[i][0] for i in range(args.samples)])


def summary(values: np.ndarray, args: argparse.Namespace) -> dict:
    low, high = bootstrap_interval(values, args.bootstrap_samples, 0.95, args.seed)
    return {"mean": round(float(values.mean()), 4), "ci95": [round(low, 4), round(high, 4)]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = load_classifier(args.checkpoint).to(device).eval()
    images = load_test_images(args).to(device)
    with torch.no_grad():
        target = model(images).argmax(dim=1)
    seeds = sample_seeds(args.seed, torch.arange(args.samples))  # the evaluator's per-sample seeds
    explainer = build_explainer(args.method, model, **explainer_settings(args))

    attacks = {name: (surrogate, None) for name, surrogate in ATTACKS.items()}
    attacks.update({f"exact_{draws}_draws": ("exact", draws) for draws in args.exact_draws})
    per_sample = {name: {"topk": [], "distance": [], "evaluations": [], "moved": []} for name in attacks}
    seconds = dict.fromkeys(attacks, 0.0)
    for first in range(0, args.samples, args.batch_size):
        batch = slice(first, first + args.batch_size)
        x, c, s = images[batch], target[batch], seeds[batch]
        clean = explainer.attribute(x, c, seeds=s)
        for name, (surrogate, draws) in attacks.items():
            attack = TopKInterpretationAttack(
                explainer, args.epsilon, num_steps=args.attack_steps, topk_fraction=args.topk_fraction,
                surrogate=surrogate,
            )
            if draws is not None:
                attack.differentiated_explainer.graph_noise_samples = draws
            started = time.perf_counter()
            result = attack.run(x, c, seeds=s)
            seconds[name] += time.perf_counter() - started
            attacked = explainer.attribute(result.inputs, c, seeds=s)
            records = per_sample[name]
            records["topk"].append(topk_intersection(clean, attacked, args.topk_fraction).cpu())
            records["distance"].append(normalized_distance(clean, attacked).cpu())
            records["evaluations"].append(result.gradient_evaluations.double())
            records["moved"].append(result.moved.double().cpu())
            progress(f"{name}: {min(first + args.batch_size, args.samples)}/{args.samples}")

    values = {
        name: {key: torch.cat(parts).double().numpy() for key, parts in records.items()}
        for name, records in per_sample.items()
    }
    report = {
        "machine": {
            "platform": platform.platform(), "nproc": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        },
        "arguments": vars(args),
        "explainer": repr(explainer),
        "attacks": {
            name: {
                "topk": summary(v["topk"], args),
                "distance": summary(v["distance"], args),
                "moved_share": round(float(v["moved"].mean()), 4),
                "gradient_evaluations_per_image": round(float(v["evaluations"].mean()), 1),
                "seconds_per_image": round(seconds[name] / args.samples, 3),
            }
            for name, v in values.items()
        },
        "paired": {
            f"{exact} - {other}": {
                metric: summary(values[exact][metric] - values[other][metric], args) for metric in ("topk", "distance")
            }
            for exact in attacks if exact.startswith("exact")
            for other in ("surrogate", "simple_gradient")
        },
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
