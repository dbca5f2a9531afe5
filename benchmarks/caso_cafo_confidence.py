"""CASO against CAFO by confidence: the slides' claim that they agree on confident predictions and differ on
unconfident ones, measured on a trained digits classifier.

For every test digit the confidence is the softmax probability of the prediction; the `--fraction` most and least
confident samples are explained (the predicted class) by CASO and CAFO with the same settings, and the script
reports, per group, the median (and range) of the cosine between the two signed maps, the median confidence, the
median number of classes with probability above 5%, the median `sigma_max` (CASO's largest Hessian eigenvalue)
and how many maps are all zero (a map's cosine with anything is
then 0: with `lambda1 > 0` a small enough gradient is thresholded away entirely).

Examples:
  python benchmarks/caso_cafo_confidence.py --checkpoint checkpoints/digits/last.ckpt            # the defaults
  python benchmarks/caso_cafo_confidence.py --checkpoint checkpoints/digits/last.ckpt --lambda1 0
  python benchmarks/caso_cafo_confidence.py --checkpoint checkpoints/digits/last.ckpt --lambda1 0 --num-steps 100

Prints one JSON object on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mglightning import load_classifier  # noqa: E402
from mglightning.data import DigitsDataModule  # noqa: E402
from mglightning.explainers import CAFO, CASO  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/digits/last.ckpt", help="a classifier trained on digits")
    parser.add_argument("--fraction", type=float, default=0.1, help="share of the test set in each group")
    parser.add_argument("--lambda1", type=float, default=1e-4)
    parser.add_argument("--lambda2", type=float, default=4.0)
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--step-size", type=float, default=0.05)
    parser.add_argument("--power-iterations", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="the split seed of the datamodule")
    return parser.parse_args(argv)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median(values: torch.Tensor) -> float:
    return round(float(values.double().median()), 6)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    model = load_classifier(args.checkpoint).to(device).eval()
    datamodule = DigitsDataModule(seed=args.seed)
    datamodule.setup("test")
    dataset = datamodule.test_dataset
    images = torch.stack([dataset[i][0] for i in range(len(dataset))]).to(device)
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    with torch.no_grad():
        probabilities = torch.cat([model(batch).softmax(1) for batch in images.split(args.batch_size)]).cpu()
    confidence, prediction = probabilities.max(1)
    count = max(1, int(args.fraction * len(dataset)))
    order = confidence.argsort()
    groups = {"least_confident": order[:count], "most_confident": order[-count:]}

    solver = {"num_steps": args.num_steps, "step_size": args.step_size, "power_iterations": args.power_iterations}
    caso = CASO(model, lambda1=args.lambda1, lambda2=args.lambda2, **solver)
    cafo = CAFO(model, lambda1=args.lambda1, lambda2=args.lambda2)
    report = {
        "checkpoint": args.checkpoint,
        "test_samples": len(dataset),
        "test_accuracy": round(float((prediction == labels).double().mean()), 4),
        "settings": {"lambda1": args.lambda1, "lambda2": args.lambda2, **solver},
        "groups": {},
    }
    for name, index in groups.items():
        progress(f"{name}: {len(index)} samples")
        cosines, sigma, zeros, evaluations = [], [], 0, []
        for batch in index.split(args.batch_size):
            inputs, target = images[batch.to(device)], prediction[batch].to(device)
            caso_explanation = caso.explain(inputs, target, seeds=batch)
            caso_maps = caso_explanation.attribution.flatten(1)
            cafo_maps = cafo.attribute(inputs, target).flatten(1)
            cosines.append(torch.nn.functional.cosine_similarity(caso_maps, cafo_maps, dim=1).cpu())
            zeros += int(((caso_maps == 0).all(1) | (cafo_maps == 0).all(1)).sum())
            sigma.append(caso_explanation.sigma_max)
            evaluations.append(caso_explanation.gradient_evaluations)
        cosines, sigma, evaluations = torch.cat(cosines), torch.cat(sigma), torch.cat(evaluations)
        report["groups"][name] = {
            "samples": len(index),
            "median_confidence": median(confidence[index]),
            "confidence_range": [round(float(confidence[index].min()), 6), round(float(confidence[index].max()), 6)],
            "median_cosine_caso_cafo": median(cosines),
            "cosine_range": [round(float(cosines.min()), 6), round(float(cosines.max()), 6)],
            # How many classes share the probability: the slides' theorem needs many for CASO and CAFO to differ.
            "median_classes_above_5_percent": median((probabilities[index] > 0.05).sum(1)),
            "samples_with_an_all_zero_map": zeros,
            "median_sigma_max": median(sigma),
            "median_caso_gradient_evaluations_per_image": median(evaluations),
        }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
