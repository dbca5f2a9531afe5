"""How close the `target_zero_fraction` search of Sparse and Group-Sparse MoreauGrad gets, and how many solves it takes.

For each target share it explains the first `--samples` test images of a classifier (the class it predicts) and
prints, per method, the largest and the mean `|zero share - achievable target|` over the maps (the target rounded
to whole groups for the group-sparse variant) and the solves ("rounds") per sample: the gradient evaluations, less
the one at `x`, divided by the evaluations of one solve. The solver settings are `configs/eval_digits.yaml`'s
(plain mode, 50 steps), or its regularised version with `--noise_std 0.1 --noise_samples 4`.

Examples:
  python benchmarks/target_sparsity.py                                    # the digits quickstart model, plain mode
  python benchmarks/target_sparsity.py --noise_std 0.1 --noise_samples 4  # regularised mode
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from mglightning import load_classifier  # noqa: E402
from mglightning.data import DigitsDataModule  # noqa: E402
from mglightning.explainers import GroupSparseMoreauGrad, SparseMoreauGrad  # noqa: E402
from mglightning.metrics import zero_fraction  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", default="checkpoints/digits/last.ckpt", help="a digits classifier")
    parser.add_argument("--samples", type=int, default=64, help="first test images explained")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5, 0.8, 0.95])
    parser.add_argument("--rho", type=float, default=0.105)
    parser.add_argument("--step_size", type=float, default=0.0105)
    parser.add_argument("--num_steps", type=int, default=50)
    parser.add_argument("--noise_std", type=float, default=0.0)
    parser.add_argument("--noise_samples", type=int, default=1)
    parser.add_argument("--group_size", type=int, default=4)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model = load_classifier(args.ckpt_path)
    datamodule = DigitsDataModule(image_size=32)
    datamodule.setup("test")
    images = torch.stack([datamodule.test_dataset[i][0] for i in range(args.samples)])
    with torch.no_grad():
        target = model(images).argmax(1)
    seeds = torch.arange(args.samples)
    settings = {"rho": args.rho, "step_size": args.step_size, "num_steps": args.num_steps,
                "noise_std": args.noise_std, "noise_samples": args.noise_samples}
    per_solve = args.num_steps * (args.noise_samples if args.noise_std > 0 else 1)
    print(f"{args.samples} samples, {settings}")
    print("| method | target | achievable | max miss | mean miss | mean rounds | max rounds | seconds | warnings |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cls, extra in ((SparseMoreauGrad, {}), (GroupSparseMoreauGrad, {"group_size": args.group_size})):
        for share in args.targets:
            explainer = cls(model, target_zero_fraction=share, **settings, **extra)
            start = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                explanation = explainer.explain(images, target, seeds=seeds)
            maps = explanation.attribution
            seconds = time.perf_counter() - start
            goal = explainer.achievable_zero_fraction(images.shape)
            miss = (zero_fraction(maps) - goal).abs()
            rounds = (explanation.gradient_evaluations - 1).double() / per_solve
            print(f"| {cls.display_name} | {share} | {goal:.4f} | {float(miss.max()):.4f} | {float(miss.mean()):.4f} | "
                  f"{float(rounds.mean()):.2f} | {int(rounds.max())} | {seconds:.0f} | {len(caught)} |", flush=True)


if __name__ == "__main__":
    main()
